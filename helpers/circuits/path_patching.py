"""Exact path patching: how much of the answer flows from one sender cell into one receiver head through one input.

An *edge* runs from a sender cell s = (l_s, h_s, p_s) to a receiver head r = (l_r, h_r), l_s < l_r, through the
receiver's query, key or value input (``"q"``, ``"k"``, ``"v"``), or from s straight to the logits (``"logits"``).

- The sender's *direct contribution* is its output projection applied to ``z_clean - z_corrupt`` of head h_s at
  p_s (no bias; times the block's residual multiplier where the family has one, granite): what s alone adds to the
  residual stream, nothing routed through later components.
- q/k/v edge: the corrupt prompt runs; at layer l_r the receiver's channel-c input at position p_s is computed from
  the corrupt residual stream there plus that contribution, through the layer's input norm, with the norm's scale
  **recomputed from the modified input** (the norm module applied to ``x + delta``; RMSNorm and LayerNorm statistics
  are not frozen at their corrupt values). Only head h_r uses it: every other head of layer l_r keeps its corrupt
  output, and the MLP of layer l_r and every later layer see the corrupt stream plus what flows out of the
  receiver's changed output; the model runs on normally from there.
- logits edge: the corrupt run's final residual at the answer position plus the contribution, through the model's
  final norm and unembedding (so only senders at the answer position have one).

The metric is the head sweep's, normalised ``(patched - corrupt) / (clean - corrupt)``, averaged over examples.
Positions are end-aligned columns (helpers.circuits.types). A sender before an example's first difference has no
contribution there (its clean and corrupt z are equal): its edges score 0 for that example without a forward.

``path_patching`` batches: per example, receiver layer and bucket of sender positions, forwards feed the corrupt
tokens from the bucket's start on (the slots before come from the corrupt run's cache) as one corrupt row, which
becomes one row per edge at block l_r (the layers before are the same for every edge); rows are chunked, halving
on out-of-memory. ``path_patching_reference`` is its oracle: one plain forward per edge and example.
"""
from __future__ import annotations

from dataclasses import dataclass
import math
import operator
from contextlib import nullcontext
from typing import Sequence

import torch

from helpers.circuits.types import Cell, check_cell, frame_columns, token_index
from helpers.models.architectures import blocks, family_spec, get_submodule, head_geometry
from helpers.patching.aligned_batch import AlignedBatch
from helpers.patching.caches import expanded, is_plain, prefix_caches
from helpers.patching.chunking import auto_chunk_rows, run_chunked
from helpers.patching.example_runs import clean_and_corrupt_z
from helpers.patching.fused_modules import fused_modules
from helpers.patching.model_calls import (ModelCalls, eval_mode, first_tensor, model_device, progress_bar,
                                         replace_first, two_row_output_layer, unwrap_model)
from helpers.patching.result_types import (DEFAULT_MIN_DENOMINATOR, report_inclusion, validate_pair,
                                           warn_small_denominators)
from helpers.patching.sites import site_of

INPUTS = ("q", "k", "v")


@dataclass(frozen=True)
class Edge:
    sender: Cell  # (a (layer, head, position) tuple is taken as that Cell)
    receiver: tuple[int, int] | None  # (layer, head); None for the logits
    input: str  # "q" | "k" | "v" | "logits"

    def __post_init__(self):
        if not isinstance(self.sender, Cell):
            sender = _integers(self.sender, 3)
            if sender is None:
                raise TypeError(f"an edge's sender is a Cell(layer, head, position) or such a tuple, got "
                                f"{self.sender!r}")
            object.__setattr__(self, "sender", Cell(*sender))
        if self.receiver is not None:
            receiver = _integers(self.receiver, 2)
            if receiver is None:
                raise TypeError(f"an edge's receiver is a (layer, head) pair or None (the logits), got "
                                f"{self.receiver!r}")
            object.__setattr__(self, "receiver", receiver)


def _integers(value, n: int) -> tuple[int, ...] | None:
    """``value`` as a tuple of ``n`` Python ints (numpy and torch integers too), or None where it is no such thing."""
    if not isinstance(value, (tuple, list)) or len(value) != n:
        return None
    try:
        return tuple(operator.index(x) for x in value)
    except TypeError:
        return None


@dataclass
class EdgeScores:
    """Per-example edge effects, shaped like a patching result (so helpers.patching.attribution.attribution_error
    compares two of them): ``patched_logit_diff`` / ``scores`` [example, edge], ``scores`` normalised, NaN where an
    example is excluded, guarded or lacks the sender's column."""

    edges: list[Edge]
    patched_logit_diff: torch.Tensor  # [example, edge]
    clean_logit_diff: torch.Tensor  # [example]
    corrupt_logit_diff: torch.Tensor  # [example]
    included: torch.Tensor  # [example] bool
    scores: torch.Tensor  # [example, edge]

    def to_dicts(self) -> list[dict]:
        mean = torch.nanmean(self.scores, dim=0)
        n = torch.isfinite(self.scores).sum(0)
        var = torch.nansum((self.scores - mean) ** 2, dim=0) / (n - 1).clamp(min=1)
        std = torch.where(n >= 2, var.sqrt(), torch.full_like(var, float("nan")))
        out = []
        for e, m, s, k in zip(self.edges, mean.tolist(), std.tolist(), n.tolist()):
            out.append({"sender": e.sender.to_dict(),
                        "receiver": None if e.receiver is None else {"layer": e.receiver[0], "head": e.receiver[1]},
                        "input": e.input, "score": m if k else None, "std": s if k >= 2 else None, "n": k})
        return out


def receiver_input(norm: torch.nn.Module, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """The normed input a receiver's projection sees: ``norm(x + delta)``, the scale recomputed (module docstring)."""
    return norm.forward(x + delta)


def check_receiver(receiver: tuple[int, int], geo, what: str = "receiver") -> None:
    """A clear error for a receiver head outside the model (negative indices too)."""
    layer, head = receiver
    if not (0 <= layer < geo.n_layers and 0 <= head < geo.n_heads):
        raise ValueError(f"{what} (layer {layer}, head {head}) is outside the model ({geo.n_layers} layers x "
                         f"{geo.n_heads} heads)")


def all_edges(senders: Sequence[Cell], receivers: Sequence[tuple[int, int]], inputs=INPUTS,
              logits: bool = True, answer_column: int | None = None) -> list[Edge]:
    """Every (sender, receiver, input) with the sender in an earlier layer, plus the logits edges of the senders at
    ``answer_column``. A receiver in layer 0 has no senders. (Cells and heads are checked against the model where
    the edges are used: ``path_patching``, ``edge_attribution``.)"""
    if isinstance(inputs, str):
        inputs = (inputs,)
    unknown = set(inputs) - set(INPUTS)
    if unknown:
        raise ValueError(f"unknown inputs {sorted(unknown)}; known: {INPUTS}")
    senders = [s if isinstance(s, Cell) else Cell(*s) for s in senders]
    edges = [Edge(s, tuple(r), c) for r in receivers for c in inputs for s in senders if s.layer < r[0]]
    if logits and answer_column is not None:
        edges += [Edge(s, None, "logits") for s in senders if s.position == answer_column]
    return edges


def direct_contributions(model, senders: Sequence[tuple[int, int, int]], dz_all: torch.Tensor, geo) -> torch.Tensor:
    """What each sender (layer, head, token) adds to the residual stream: [n, d_model]. ``dz_all``: z_clean - z_corrupt
    [layer, pos, head * d_head]. One output projection per sender layer, bias cancelled, times the block's residual
    multiplier where the family has one (granite)."""
    spec = family_spec(model.config)
    H, dh = geo.n_heads, geo.d_head
    out = dz_all.new_zeros(len(senders), geo.d_model)
    for layer in sorted({l for l, _, _ in senders}):
        rows = [i for i, (l, _, _) in enumerate(senders) if l == layer]
        heads = torch.tensor([senders[i][1] for i in rows], device=dz_all.device)
        tokens = torch.tensor([senders[i][2] for i in rows], device=dz_all.device)
        z = dz_all.new_zeros(len(rows), H, dh)
        z[torch.arange(len(rows), device=z.device), heads] = dz_all[layer, tokens].view(len(rows), H, dh)[
            torch.arange(len(rows), device=z.device), heads]
        block = blocks(model)[layer]
        out_proj = get_submodule(block, spec.out_proj)
        z = z.view(len(rows), H * dh)
        delta = out_proj.forward(z) - out_proj.forward(torch.zeros_like(z))
        m = getattr(block, "residual_multiplier", None)
        out[rows] = delta if m is None else delta * m
    return out


def channel_slices(model, geo) -> dict[str, tuple[str, slice]]:
    """input -> (its projection's path in a block, the columns of that projection's output that are the input).
    Separate projections: all of their output; a fused one (GPT-2's c_attn): its q | k | v thirds."""
    spec = family_spec(model.config)
    if len(set(spec.qkv)) > 1:
        return {c: (path, slice(None)) for c, path in zip(INPUTS, spec.qkv)}
    width = geo.n_heads * geo.d_head
    return {c: (spec.qkv[0], slice(i * width, (i + 1) * width)) for i, c in enumerate(INPUTS)}


def prepare_edges(model, pairs, edges, n_columns: int | None = None):
    """(model, pairs, each pair's first difference, head geometry, the frame's width) with every edge checked: its
    input known, its sender a cell of the model and the frame, its receiver a head of a later layer, and a logits
    edge's sender at the answer column (the only position whose output reaches the logits)."""
    model = unwrap_model(model)
    pairs = list(pairs)
    firsts = [validate_pair(p, i) for i, p in enumerate(pairs)]
    geo = head_geometry(model.config)
    n_columns = frame_columns(pairs, n_columns)
    for e in edges:
        if e.input not in INPUTS + ("logits",):
            raise ValueError(f"unknown input {e.input!r}; known: {INPUTS + ('logits',)}")
        if (e.receiver is None) != (e.input == "logits"):
            raise ValueError(f"edge {e}: a logits edge has no receiver head, a q/k/v edge has one")
        check_cell(e.sender, geo.n_layers, geo.n_heads, n_columns, what=f"edge {e}: sender")
        if e.receiver is not None:
            check_receiver(e.receiver, geo, what=f"edge {e}: receiver")
            if not e.sender.layer < e.receiver[0]:
                raise ValueError(f"edge {e}: the receiver must be a head of a later layer than the sender")
        if e.input == "logits" and e.sender.position != n_columns - 1:
            raise ValueError(f"edge {e}: only a sender at the answer column ({n_columns - 1}) reaches the logits "
                             "directly")
    return model, pairs, firsts, geo, n_columns


def edge_scores(edges, patched: torch.Tensor, pre, keep_incorrect: bool, min_denominator: float) -> EdgeScores:
    """``patched``: [edge, example] logit differences; ``pre``: each example's (clean, corrupt, clean correct)."""
    included = report_inclusion([c for _, _, c in pre], keep_incorrect)
    clean = torch.tensor([p[0] for p in pre], dtype=torch.float64)
    corrupt = torch.tensor([p[1] for p in pre], dtype=torch.float64)
    denom = clean - corrupt
    usable = included & (denom.abs() >= min_denominator)
    scores = (patched - corrupt) / torch.where(usable, denom, torch.ones_like(denom))
    scores[:, ~usable] = float("nan")
    warn_small_denominators(clean, corrupt, included, min_denominator)
    return EdgeScores(list(edges), patched.T.contiguous(), clean, corrupt, included, scores.T.contiguous())


def example_edge_rows(edges, pair, first, n_columns):
    """(edge index, sender token, delta needed) of the edges this example has; the others stay NaN (no column) or
    are the corrupt run (a sender before the first difference)."""
    T = len(pair.clean_ids)
    rows, unchanged = [], []
    for i, e in enumerate(edges):
        t = token_index(e.sender.position, T, n_columns)
        if t is None:
            continue
        (rows if t >= first else unchanged).append((i, t))
    return rows, unchanged


def edge_buckets(ts: Sequence[int], bucket_size: int | None) -> list[tuple[int, list[int]]]:
    """Sender tokens grouped into buckets (start s, tokens): a bucket's rows feed tokens s.. and read the corrupt
    cache of the slots before s. Default: about 8 buckets over the tokens present (fewer forwards against fewer
    recomputed positions; a bucket recomputes up to its width - 1 positions per row)."""
    ts = sorted(set(ts))
    if not ts:
        return []
    size = bucket_size or max(1, math.ceil((ts[-1] - ts[0] + 1) / 8))
    out: list[tuple[int, list[int]]] = []
    for t in ts:
        if out and t - out[-1][0] < size:
            out[-1][1].append(t)
        else:
            out.append((t, [t]))
    return out


def path_patching(model, pairs, edges: Sequence[Edge], *, n_columns: int | None = None, keep_incorrect: bool = False,
                  min_denominator: float = DEFAULT_MIN_DENOMINATOR, rows_per_forward: int | None = None,
                  bucket_size: int | None = None, fused: bool = True, progress: bool = False) -> EdgeScores:
    """Exact path patching of every edge on every example, batched (module docstring).

    Per example, the edges are grouped by receiver layer and by sender token into buckets (:func:`edge_buckets`).
    A bucket's forwards feed the corrupt tokens from its start s on, over the corrupt run's cache of the slots
    before s (a sender at p_s >= s changes nothing before p_s, in any layer); each forward is one corrupt row up to
    the receiver's layer, where it becomes one row per edge. In the last layer only the answer position reaches
    the metric: a query edge from another position changes nothing there, so it is the corrupt run without a
    forward (exact), and the receiver layer's output projection and MLP see the answer position alone. Rows per
    forward: ``rows_per_forward`` or a memory estimate; chunks halve on out-of-memory. ``fused``: llama-like models
    (and GPT-Neo's attention) run helpers.patching.fused_modules' same-formula swap-ins, as the head sweep does (the corrupt prefix shared by
    every row instead of copied into it; the receiver's input edited in the fused q|k|v projection, ``qkv_edit``).
    """
    edges = list(edges)
    model, pairs, firsts, geo, n_columns = prepare_edges(model, pairs, edges, n_columns)
    calls, site = ModelCalls.of(model), site_of(model, "heads")
    spec = family_spec(model.config)
    slices = channel_slices(model, geo)
    H, dh, L = geo.n_heads, geo.d_head, geo.n_layers
    device = model_device(model)
    patched = torch.full((len(edges), len(pairs)), float("nan"), dtype=torch.float64)
    pre = []
    state: dict = {}

    def grow(mod, args, kwargs):  # block l_r: the corrupt row of layers < l_r becomes one row per edge
        if state.get("join") is not mod:
            return None
        x = first_tensor(args, kwargs, "hidden_states")
        state["x"] = x[0]  # [q, d_model]: the corrupt residual stream entering l_r, slots s ..
        return replace_first(args, kwargs, x.expand(state["n"], *x.shape[1:]).contiguous(), "hidden_states")

    def modified_input(rows):  # (position in the fed tokens, the normed modified input) of these edge rows
        rel = state["rel"][rows]
        return rel, receiver_input(state["norm"], state["x"][rel], state["delta"][rows])

    def channel(mod, args, output):  # the receiver layer's q/k/v projection: each edge's input at its p_s
        todo = state.get("channel", {}).get(id(mod))
        if not todo:
            return None
        output = output.clone()
        for rows, cols in todo:
            rel, normed = modified_input(rows)
            output[rows, rel, cols] = mod.forward(normed)[:, cols].to(output.dtype)
        return output

    def edit(layer, qkv):  # a fused attention's q | k | v before rotary [n, q, heads + 2 kv_heads, d_head]
        if state.get("layer") != layer:
            return
        for c, rows in state["by_channel"].items():
            rel, normed = modified_input(rows)
            lo, hi = head_ranges[c]
            new = get_submodule(bl[layer], slices[c][0]).forward(normed)[:, slices[c][1]]
            qkv[rows, rel, lo:hi] = new.view(len(rows), hi - lo, dh).to(qkv.dtype)

    def keep_receiver(mod, args):  # out_proj of layer l_r: only the receiver head's output changes
        if state.get("out_proj") is not mod:
            return None
        z = args[0]
        n, q = z.shape[:2]
        new = state["z_corrupt"].view(1, q, H, dh).expand(n, q, H, dh).clone()
        idx = torch.arange(n, device=z.device)
        new[idx, :, state["heads"]] = z.view(n, q, H, dh)[idx, :, state["heads"]]
        new = new.view(n, q, H * dh)
        # in the last layer only the answer position reaches the metric: out_proj and MLP see it alone (the
        # block's residual additions broadcast; the other positions are wrong from here and never read)
        return (new[:, -1:].contiguous() if state["last_layer"] else new,) + tuple(args[1:])

    def answer_only(mod, args):  # the last layer's MLP, as above
        if not state.get("last_layer"):
            return None
        return (args[0][:, -1:].contiguous(),) + tuple(args[1:])

    def final(mod, args, kwargs):  # the final norm: logits edges add the contribution at the answer position
        if "logit_delta" not in state:
            return None
        x = first_tensor(args, kwargs, "hidden_states")
        x = x.expand(state["n"], *x.shape[1:]).clone()
        x[:, -1] += state["logit_delta"].to(x.dtype)
        return replace_first(args, kwargs, x, "hidden_states")

    bl = blocks(model)
    handles = [b.register_forward_pre_hook(grow, with_kwargs=True) for b in bl]
    handles += [m.register_forward_pre_hook(keep_receiver) for m in site.modules]
    handles.append(get_submodule(bl[-1], spec.mlp).register_forward_pre_hook(answer_only))
    for b in bl:
        for path in set(spec.qkv):
            handles.append(get_submodule(b, path).register_forward_hook(channel))
    handles.append(get_submodule(model, spec.final_norm).register_forward_pre_hook(final, with_kwargs=True))
    head_ranges = {"q": (0, H), "k": (H, H + geo.n_kv_heads), "v": (H + geo.n_kv_heads, H + 2 * geo.n_kv_heads)}
    stats: dict = {}
    results = []  # (edge indices, example, their logit differences on the device)
    try:
        with eval_mode(model), torch.inference_mode(), (
                fused_modules(model, causal_flash=True) if fused else nullcontext()) as swap:
            if swap is not None and swap.attention_layers:
                swap.qkv_edit = edit
            for i in progress_bar(range(len(pairs)), progress, f"path patching {len(edges)} edges"):
                pair = pairs[i]
                T = len(pair.clean_ids)
                clean_diff, corrupt_diff, correct, z_clean, z_corrupt = clean_and_corrupt_z(model, calls, site, pair)
                pre.append((clean_diff, corrupt_diff, correct))
                rows, unchanged = example_edge_rows(edges, pair, firsts[i], n_columns)
                # (last layer, a query from another position than the answer: nothing reaches the metric)
                moot = [(e, t) for e, t in rows if edges[e].input == "q" and edges[e].receiver[0] == L - 1
                        and t != T - 1]
                for e, _ in unchanged + moot:
                    patched[e, i] = corrupt_diff
                moot_set = {e for e, _ in moot}
                rows = [(e, t) for e, t in rows if e not in moot_set]
                if not rows:
                    continue
                corrupt = AlignedBatch([pair.corrupt_ids], device)
                dz = z_clean - z_corrupt
                by_layer: dict = {}
                for e, t in rows:  # the logits edges (all at the answer position) as the last group
                    by_layer.setdefault(L if edges[e].receiver is None else edges[e].receiver[0], []).append((e, t))
                buckets = {layer: edge_buckets([t for _, t in group], bucket_size)
                           for layer, group in by_layer.items()}
                starts = sorted({s for bs in buckets.values() for s, _ in bs})
                caches = dict(zip(starts, prefix_caches(model, calls, corrupt, starts, stats, swap)))
                # fused attention reads the corrupt prefix itself, shared by every row (no per-row copies)
                shares = (swap is not None and swap.shares_prefix
                          and all(is_plain(c) for c in caches.values() if c is not None))
                with two_row_output_layer(model, [pair.clean_token_id, pair.corrupt_token_id]) as two_rows:
                    for layer, group in sorted(by_layer.items()):
                        for s, ts in buckets[layer]:
                            members = set(ts)
                            mine = [(e, t) for e, t in group if t in members]
                            q = T - s
                            size = rows_per_forward or auto_chunk_rows(model, q, T, device)

                            def run(a: int, b: int, _part=mine, _layer=layer, _s=s):
                                part = _part[a:b]
                                n = len(part)
                                deltas = direct_contributions(
                                    model, [(edges[e].sender.layer, edges[e].sender.head, t) for e, t in part], dz,
                                    geo)
                                state.clear()
                                state["n"] = n
                                if _layer == L:
                                    state["logit_delta"] = deltas
                                    batch = [1] * L
                                else:
                                    block = bl[_layer]
                                    state.update(join=block, norm=get_submodule(block, spec.input_norm),
                                                 last_layer=_layer == L - 1, out_proj=site.modules[_layer],
                                                 z_corrupt=z_corrupt[_layer, _s:], delta=deltas,
                                                 rel=torch.tensor([t - _s for _, t in part], device=device),
                                                 heads=torch.tensor([edges[e].receiver[1] for e, _ in part],
                                                                    device=device))
                                    by_channel = {c: torch.tensor(js, device=device) for c in INPUTS if (js := [
                                        j for j, (e, _) in enumerate(part) if edges[e].input == c])}
                                    todo: dict = {}  # (the projections' hooks, where the attention is not fused)
                                    for c, js in by_channel.items():
                                        path, cols = slices[c]
                                        todo.setdefault(id(get_submodule(block, path)), []).append((js, cols))
                                    state.update(channel=todo, by_channel=by_channel, layer=_layer)
                                    batch = [1] * _layer + [n] * (L - _layer)
                                try:
                                    if shares:
                                        with swap.shared_prefix(caches[_s]):
                                            logits, _ = calls.forward(model, corrupt.ids[:, _s:], start=_s,
                                                                      ready_mask=True)
                                    else:
                                        logits, _ = calls.forward(model, corrupt.ids[:, _s:], start=_s,
                                                                  cache=expanded(caches[_s], batch))
                                finally:
                                    state.clear()
                                logits = logits.double()
                                diffs = (logits[:, 0] - logits[:, 1] if two_rows
                                         else logits[:, pair.clean_token_id] - logits[:, pair.corrupt_token_id])
                                results.append(([e for e, _ in part], i, diffs))
                            run_chunked(len(mine), size, run)
    finally:
        state.clear()
        for h in handles:
            h.remove()
    for index, i, diffs in results:  # one host sync at the end
        patched[index, i] = diffs.cpu()
    return edge_scores(edges, patched, pre, keep_incorrect, min_denominator)


def path_patching_reference(model, pairs, edges: Sequence[Edge], *, n_columns: int | None = None,
                            keep_incorrect: bool = False,
                            min_denominator: float = DEFAULT_MIN_DENOMINATOR) -> EdgeScores:
    """The oracle of :func:`path_patching`: one batch-1 forward per edge and example, plain hooks, the whole prompt.
    A q/k/v edge: the receiver layer's channel input at p_s is replaced (every head of the layer sees it), then the
    layer's out_proj input is the corrupt run's z except the receiver head's. A logits edge: the contribution added
    before the final norm."""
    edges = list(edges)
    model, pairs, firsts, geo, n_columns = prepare_edges(model, pairs, edges, n_columns)
    calls, site = ModelCalls.of(model), site_of(model, "heads")
    spec = family_spec(model.config)
    slices = channel_slices(model, geo)
    dh = geo.d_head
    device = model_device(model)
    patched = torch.full((len(edges), len(pairs)), float("nan"), dtype=torch.float64)
    pre = []

    def forward(ids, hooks):
        handles = [register(hook) for register, hook in hooks]
        try:
            logits, _ = calls.forward(model, ids)
        finally:
            for h in handles:
                h.remove()
        return logits[0].double()

    with eval_mode(model), torch.no_grad():
        for i, pair in enumerate(pairs):
            clean_diff, corrupt_diff, correct, z_clean, z_corrupt = clean_and_corrupt_z(model, calls, site, pair)
            pre.append((clean_diff, corrupt_diff, correct))
            ids = torch.as_tensor(list(pair.corrupt_ids), device=device).unsqueeze(0)
            T = len(pair.clean_ids)
            for k, e in enumerate(edges):
                t = token_index(e.sender.position, T, n_columns)
                if t is None:
                    continue
                # the sender's contribution, from its own z slice alone (the fast path gathers them per layer)
                block = blocks(model)[e.sender.layer]
                z = torch.zeros_like(z_clean[e.sender.layer, t])
                cols = slice(e.sender.head * dh, (e.sender.head + 1) * dh)
                z[cols] = z_clean[e.sender.layer, t, cols] - z_corrupt[e.sender.layer, t, cols]
                out_proj = get_submodule(block, spec.out_proj)
                delta = out_proj(z[None])[0] - out_proj(torch.zeros_like(z)[None])[0]
                if getattr(block, "residual_multiplier", None) is not None:
                    delta = delta * block.residual_multiplier
                if e.receiver is None:
                    def add(mod, args, _d=delta):
                        x = args[0].clone()
                        x[0, -1] += _d
                        return (x,) + tuple(args[1:])
                    logits = forward(ids, [(get_submodule(model, spec.final_norm).register_forward_pre_hook, add)])
                else:
                    layer, head = e.receiver
                    block = blocks(model)[layer]
                    seen: dict = {}
                    path, cols = slices[e.input]

                    def save_x(mod, args, kwargs):
                        seen["x"] = (args[0] if args else kwargs["hidden_states"])[0]

                    def replace(mod, args, output, _t=t, _d=delta, _cols=cols, _block=block):
                        out = output.clone()
                        normed = receiver_input(get_submodule(_block, spec.input_norm), seen["x"][_t], _d)
                        out[0, _t, _cols] = mod.forward(normed[None])[0, _cols]
                        return out

                    def others_corrupt(mod, args, _head=head, _layer=layer):
                        z = z_corrupt[_layer][None].clone()
                        z[0, :, _head * dh:(_head + 1) * dh] = args[0][0, :, _head * dh:(_head + 1) * dh]
                        return (z,) + tuple(args[1:])
                    logits = forward(ids, [(lambda h: block.register_forward_pre_hook(h, with_kwargs=True), save_x),
                                           (get_submodule(block, path).register_forward_hook, replace),
                                           (site.modules[layer].register_forward_pre_hook, others_corrupt)])
                patched[k, i] = float(logits[pair.clean_token_id] - logits[pair.corrupt_token_id])
    return edge_scores(edges, patched, pre, keep_incorrect, min_denominator)
