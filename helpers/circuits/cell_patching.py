"""Patch a *set* of cells at once: is the set sufficient (it restores the clean answer on its own), is it necessary
(removing it destroys the clean answer)?

- **Sufficiency** of a set S: run the *corrupt* prompt with the clean z of every cell of S patched in at once;
  score ``(patched - corrupt) / (clean - corrupt)`` (1: S alone carries the whole effect).
- **Necessity** of S: run the *clean* prompt with the corrupt z of every cell of S patched in at once;
  score ``(clean - patched) / (clean - corrupt)``: the share of the clean-corrupt gap that removing S destroys.

The metric is the head sweep's: ``logit[clean answer] - logit[corrupt answer]`` at the last position. ``z`` is a
head's slice of the attention output projection's input (helpers.patching.sites, through the per-family table), so
one code path serves every family. ``patch_cell_sets`` runs many sets in one forward (a row per set, every patched
cell written by one ``torch.where`` per layer); ``patch_cell_sets_reference`` is its oracle: one forward per set and
example, the cells written one by one with plain indexing.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from helpers.circuits.types import Cell, check_cell, check_direction, frame_columns, token_index
from helpers.models.architectures import head_geometry
from helpers.patching.chunking import run_chunked
from helpers.patching.example_runs import clean_and_corrupt_z
from helpers.patching.model_calls import ModelCalls, eval_mode, model_device, progress_bar, unwrap_model
from helpers.patching.result_types import (DEFAULT_MIN_DENOMINATOR, report_inclusion, validate_pair,
                                           warn_small_denominators)
from helpers.patching.sites import site_of

#: rows (sets) per forward; the embedded models' and tests' sets fit at once, larger models chunk (halving on OOM)
DEFAULT_SETS_PER_FORWARD = 64


@dataclass
class CellSetResult:
    """Scores of several sets of cells over several examples. ``patched_logit_diff`` / ``scores``: [set, example]."""

    direction: str
    cell_sets: list[list[Cell]]
    patched_logit_diff: torch.Tensor  # [set, example]
    clean_logit_diff: torch.Tensor  # [example]
    corrupt_logit_diff: torch.Tensor  # [example]
    included: torch.Tensor  # [example] bool
    min_denominator: float = DEFAULT_MIN_DENOMINATOR
    scores: torch.Tensor = field(init=False)  # [set, example], NaN for excluded or guarded examples

    def __post_init__(self):
        denom = self.clean_logit_diff - self.corrupt_logit_diff
        usable = self.included & (denom.abs() >= self.min_denominator)
        safe = torch.where(usable, denom, torch.ones_like(denom))
        if self.direction == "sufficiency":
            scores = (self.patched_logit_diff - self.corrupt_logit_diff) / safe
        else:
            scores = (self.clean_logit_diff - self.patched_logit_diff) / safe
        scores[:, ~usable] = float("nan")
        self.scores = scores
        warn_small_denominators(self.clean_logit_diff, self.corrupt_logit_diff, self.included, self.min_denominator,
                                stacklevel=5)  # (past __post_init__ and the dataclass's __init__: its creator)

    def mean(self) -> torch.Tensor:
        """[set]: the mean score over the usable examples (NaN if none)."""
        return torch.nanmean(self.scores, dim=1)

    def std(self) -> torch.Tensor:
        """[set]: the sample standard deviation over the usable examples (NaN where fewer than 2)."""
        n = torch.isfinite(self.scores).sum(1)
        var = torch.nansum((self.scores - self.mean()[:, None]) ** 2, dim=1) / (n - 1).clamp(min=1)
        return torch.where(n >= 2, var.sqrt(), torch.full_like(var, float("nan")))


def _token_cells(cells: Sequence[Cell], length: int, n_columns: int) -> list[tuple[int, int, int]]:
    """(layer, head, token index) of the cells this example has (columns before its first token dropped)."""
    out = []
    for c in cells:
        t = token_index(c.position, length, n_columns)
        if t is not None:
            out.append((c.layer, c.head, t))
    return out


def _check_cells(cell_sets, geo, n_columns: int) -> list[list[Cell]]:
    sets = [[c if isinstance(c, Cell) else Cell(*c) for c in s] for s in cell_sets]
    for s in sets:
        for c in s:
            check_cell(c, geo.n_layers, geo.n_heads, n_columns)
    return sets


def _prepare(model, pairs, cell_sets, direction, n_columns):
    check_direction(direction)
    model = unwrap_model(model)
    pairs = list(pairs)
    for i, p in enumerate(pairs):
        validate_pair(p, i)
    n_columns = frame_columns(pairs, n_columns)
    geo = head_geometry(model.config)
    return model, pairs, _check_cells(cell_sets, geo, n_columns), n_columns, geo


def _result(direction, sets, patched, pre, keep_incorrect, min_denominator) -> CellSetResult:
    included = report_inclusion([c for _, _, c in pre], keep_incorrect)
    return CellSetResult(direction, sets, patched, torch.tensor([p[0] for p in pre], dtype=torch.float32),
                         torch.tensor([p[1] for p in pre], dtype=torch.float32), included, min_denominator)


def patch_cell_sets(model, pairs, cell_sets: Sequence[Sequence[Cell]], direction: str = "sufficiency", *,
                    n_columns: int | None = None, keep_incorrect: bool = False,
                    min_denominator: float = DEFAULT_MIN_DENOMINATOR, sets_per_forward: int | None = None,
                    progress: bool = False) -> CellSetResult:
    """Sufficiency or necessity (module docstring) of every set in ``cell_sets`` on every example.

    Batched: per example, one forward carries a row per set; a pre-hook on each layer's output projection writes
    ``where(mask[row, pos, head], source z, own z)`` (the source: the clean run for sufficiency, the corrupt run for
    necessity). Rows are chunked (``sets_per_forward``), halving on out-of-memory. Examples the clean run gets
    wrong are excluded unless ``keep_incorrect`` (their scores NaN), as in the head sweep.
    """
    model, pairs, sets, n_columns, geo = _prepare(model, pairs, cell_sets, direction, n_columns)
    calls, site = ModelCalls.of(model), site_of(model, "heads")
    L, H, dh = geo.n_layers, geo.n_heads, geo.d_head
    device = model_device(model)
    patched = torch.full((len(sets), len(pairs)), float("nan"))
    pre = []
    state: dict = {}

    def hook(layer):
        def pre_hook(mod, args, kwargs):
            if "mask" not in state:
                return None
            x = args[0] if args else kwargs["hidden_states"]
            b, t = x.shape[:2]
            x = torch.where(state["mask"][:, layer, :, :, None], state["source"][layer].view(1, t, H, dh),
                            x.reshape(b, t, H, dh)).reshape(b, t, H * dh)
            return ((x,) + tuple(args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": x})
        return pre_hook

    handles = [m.register_forward_pre_hook(hook(l), with_kwargs=True) for l, m in enumerate(site.modules)]
    try:
        with eval_mode(model), torch.inference_mode():
            for i in progress_bar(range(len(pairs)), progress, f"{direction} of {len(sets)} sets"):
                pair = pairs[i]
                clean_diff, corrupt_diff, correct, z_clean, z_corrupt = clean_and_corrupt_z(model, calls, site, pair)
                pre.append((clean_diff, corrupt_diff, correct))
                T = len(pair.clean_ids)
                masks = torch.zeros(len(sets), L, T, H, dtype=torch.bool)
                for s, cells in enumerate(sets):
                    for layer, head, t in _token_cells(cells, T, n_columns):
                        masks[s, layer, t, head] = True
                masks = masks.to(device)
                state["source"] = z_clean if direction == "sufficiency" else z_corrupt
                base = pair.corrupt_ids if direction == "sufficiency" else pair.clean_ids
                ids = torch.as_tensor(list(base), device=device).unsqueeze(0)

                def run(a: int, b: int, _i=i):
                    state["mask"] = masks[a:b]
                    try:
                        logits, _ = calls.forward(model, ids.expand(b - a, -1))
                    finally:
                        state.pop("mask", None)
                    logits = logits.float()
                    patched[a:b, _i] = (logits[:, pair.clean_token_id] - logits[:, pair.corrupt_token_id]).cpu()
                run_chunked(len(sets), sets_per_forward or DEFAULT_SETS_PER_FORWARD, run)
    finally:
        for h in handles:
            h.remove()
    return _result(direction, sets, patched, pre, keep_incorrect, min_denominator)


def patch_cell_sets_reference(model, pairs, cell_sets: Sequence[Sequence[Cell]], direction: str = "sufficiency", *,
                              n_columns: int | None = None, keep_incorrect: bool = False,
                              min_denominator: float = DEFAULT_MIN_DENOMINATOR) -> CellSetResult:
    """The oracle of :func:`patch_cell_sets`: one batch-1 forward per (set, example), each cell's z written by a
    plain index assignment in the output projection's pre-hook."""
    model, pairs, sets, n_columns, geo = _prepare(model, pairs, cell_sets, direction, n_columns)
    calls, site = ModelCalls.of(model), site_of(model, "heads")
    dh = geo.d_head
    device = model_device(model)
    patched = torch.full((len(sets), len(pairs)), float("nan"))
    pre = []
    with eval_mode(model), torch.no_grad():
        for i, pair in enumerate(pairs):
            clean_diff, corrupt_diff, correct, z_clean, z_corrupt = clean_and_corrupt_z(model, calls, site, pair)
            pre.append((clean_diff, corrupt_diff, correct))
            source = z_clean if direction == "sufficiency" else z_corrupt
            base = pair.corrupt_ids if direction == "sufficiency" else pair.clean_ids
            for s, cells in enumerate(sets):
                todo = _token_cells(cells, len(pair.clean_ids), n_columns)
                handles = []
                for layer, module in enumerate(site.modules):
                    mine = [(h, t) for l, h, t in todo if l == layer]

                    def pre_hook(mod, args, _mine=mine, _layer=layer):
                        x = args[0].clone()
                        for h, t in _mine:
                            x[0, t, h * dh:(h + 1) * dh] = source[_layer, t, h * dh:(h + 1) * dh]
                        return (x,) + tuple(args[1:])
                    if mine:
                        handles.append(module.register_forward_pre_hook(pre_hook))
                try:
                    logits, _ = calls.forward(model, torch.as_tensor(list(base), device=device).unsqueeze(0))
                finally:
                    for h in handles:
                        h.remove()
                logits = logits[0].float()
                patched[s, i] = float(logits[pair.clean_token_id] - logits[pair.corrupt_token_id])
    return _result(direction, sets, patched, pre, keep_incorrect, min_denominator)
