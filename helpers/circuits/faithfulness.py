"""Faithfulness curves: are the head sweep's top cells the mechanism?

``S_k`` = the k cells of largest mean score in the head sweep (end-aligned columns, as the heatmap shows them; a
column counts only where at least half of the included examples reach it, as in the top-heads table), for
k = 1 .. ``k_max``, plus the set of *all* cells scoring at least ``threshold`` when there are more of them. For each
S_k: its sufficiency and necessity (helpers.circuits.cell_patching), mean over examples. Baseline: ``n_random``
random sets of k cells each, drawn without replacement from the cells at or after the first difference (columns that
at least half of the included examples have at or after their corrupted token; patching earlier changes nothing),
with the same seed every time; their sufficiency's mean and standard deviation over the draws.

Reading the curves: sufficiency rising to ~1 at small k while the random baseline stays near 0 says the few top
cells carry the name on their own; necessity near 1 says nothing else can carry it when they are removed; a
necessity well below sufficiency says other routes (backup heads, or the MLPs) carry it too. ``k80_*`` is the
smallest k whose mean reaches 0.8 (None if none does).
"""
from __future__ import annotations

import math
import numbers
import random
from dataclasses import asdict, dataclass
from typing import Sequence

import torch

from helpers.circuits.cell_patching import patch_cell_sets
from helpers.circuits.types import Cell
from helpers.models.architectures import head_geometry
from helpers.patching.model_calls import unwrap_model
from helpers.patching.result_types import DEFAULT_MIN_DENOMINATOR, validate_pair

DEFAULT_K_MAX = 20
DEFAULT_THRESHOLD = 0.05
DEFAULT_N_RANDOM = 10
REACHES = 0.8


@dataclass
class FaithfulnessCurves:
    """Both curves and the random baseline; every list is indexed like ``k``."""

    k: list[int]
    cells: list[Cell]  # the ranked top cells: S_k = cells[:k]
    sufficiency: list[float]
    sufficiency_std: list[float]
    necessity: list[float]
    necessity_std: list[float]
    random_sufficiency_mean: list[float]
    random_sufficiency_std: list[float]
    k80_sufficiency: int | None
    k80_necessity: int | None
    n_random: int
    threshold: float
    seed: int

    def to_dict(self) -> dict:
        d = asdict(self)
        d["cells"] = [c.to_dict() for c in self.cells]
        return {k: _finite(v) for k, v in d.items()}


def _finite(value):
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def ranked_cells(mean: torch.Tensor, count: torch.Tensor | None = None) -> list[Cell]:
    """Cells by descending mean score (``mean``: [layer, head, column]); NaN cells and columns that fewer than half
    of the examples reach are left out. Ties keep layer, head, column order."""
    mean = torch.as_tensor(mean, dtype=torch.float64)
    ok = torch.isfinite(mean)
    if count is not None and torch.as_tensor(count).numel():
        count = torch.as_tensor(count)
        ok &= count >= math.ceil(int(count.max()) / 2)
    _, order = torch.sort(torch.where(ok, -mean, torch.full_like(mean, math.inf)).flatten(), stable=True)
    _, H, C = mean.shape
    return [Cell(i // (H * C), (i // C) % H, i % C) for i in order[:int(ok.sum())].tolist()]


def random_pool(n_layers: int, n_heads: int, first_columns: Sequence[int], n_columns: int) -> list[Cell]:
    """Cells at or after the first difference: columns that at least half of the examples (``first_columns``: each
    one's corrupted column, end-aligned) have at or after it."""
    need = math.ceil(len(first_columns) / 2) if first_columns else 1
    columns = [c for c in range(n_columns) if sum(c >= f for f in first_columns) >= need]
    return [Cell(l, h, c) for l in range(n_layers) for h in range(n_heads) for c in columns]


def k_values(ranked: Sequence[Cell], mean: torch.Tensor, k_max: int, threshold: float) -> list[int]:
    ks = list(range(1, min(k_max, len(ranked)) + 1))
    above = sum(1 for c in ranked if float(mean[c.layer, c.head, c.position]) >= threshold)
    if above > (ks[-1] if ks else 0):
        ks.append(above)
    return ks


def check_counts(at_least: int, **counts) -> None:
    """A clear error for a count that is not an integer >= ``at_least``: a negative count would otherwise slice from
    the end, and k_max = 0 would silently test the above-threshold set alone."""
    for name, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < at_least:
            raise ValueError(f"{name} must be an integer >= {at_least}, got {value!r}")


def _k80(ks: list[int], values: list[float]) -> int | None:
    return next((k for k, v in zip(ks, values) if math.isfinite(v) and v >= REACHES), None)


def faithfulness_curves(model, pairs, mean: torch.Tensor, *, count: torch.Tensor | None = None,
                        first_columns: Sequence[int] | None = None, k_max: int = DEFAULT_K_MAX,
                        threshold: float = DEFAULT_THRESHOLD, n_random: int = DEFAULT_N_RANDOM, seed: int = 0,
                        keep_incorrect: bool = False, min_denominator: float = DEFAULT_MIN_DENOMINATOR,
                        progress: bool = False) -> FaithfulnessCurves:
    """Both faithfulness curves of the head sweep's top cells, with the random baseline (module docstring).

    ``mean`` / ``count``: the head sweep's end-aligned mean score and example count, [layer, head, column] (an
    ExperimentResult's ``aligned.mean()`` / ``aligned.count()``). ``first_columns``: each example's corrupted column
    (None: from the pairs).
    """
    pairs = list(pairs)
    check_counts(1, k_max=k_max)
    check_counts(0, n_random=n_random)
    mean = torch.as_tensor(mean, dtype=torch.float64)
    geo = head_geometry(unwrap_model(model).config)
    if mean.dim() != 3 or tuple(mean.shape[:2]) != (geo.n_layers, geo.n_heads):
        raise ValueError(f"mean must be the head sweep's [layer, head, column] scores of this model "
                         f"([{geo.n_layers}, {geo.n_heads}, columns]), got shape {list(mean.shape)}")
    L, H, C = mean.shape
    if count is not None and tuple(torch.as_tensor(count).shape) != tuple(mean.shape):
        raise ValueError(f"count must have mean's shape {list(mean.shape)}, got {list(torch.as_tensor(count).shape)}")
    if first_columns is None:
        first_columns = [C - len(p.clean_ids) + validate_pair(p, i) for i, p in enumerate(pairs)]
    elif len(first_columns) != len(pairs) or not all(isinstance(c, numbers.Integral) and 0 <= c < C
                                                       for c in first_columns):
        raise ValueError(f"first_columns must give each of the {len(pairs)} examples' corrupted column, an integer in "
                         f"0..{C - 1}, got {list(first_columns)}")
    ranked = ranked_cells(mean, count)
    ks = k_values(ranked, mean, k_max, threshold)
    top_sets = [ranked[:k] for k in ks]
    pool = random_pool(L, H, first_columns, C)
    rng = random.Random(seed)
    random_sets = [rng.sample(pool, min(k, len(pool))) for k in ks for _ in range(n_random)]
    kw = dict(n_columns=C, keep_incorrect=keep_incorrect, min_denominator=min_denominator, progress=progress)
    suff = patch_cell_sets(model, pairs, top_sets + random_sets, "sufficiency", **kw)
    nec = patch_cell_sets(model, pairs, top_sets, "necessity", **kw)
    s_mean, s_std = suff.mean(), suff.std()
    n = len(ks)
    rand = s_mean[n:].view(n, n_random) if n_random else torch.full((n, 1), float("nan"))
    rand_std = rand.std(1) if n_random > 1 else torch.full((n,), float("nan"))
    curves = FaithfulnessCurves(
        k=ks, cells=ranked[:max(ks, default=0)], sufficiency=s_mean[:n].tolist(), sufficiency_std=s_std[:n].tolist(),
        necessity=nec.mean().tolist(), necessity_std=nec.std().tolist(),
        random_sufficiency_mean=rand.mean(1).tolist(), random_sufficiency_std=rand_std.tolist(),
        k80_sufficiency=None, k80_necessity=None, n_random=n_random, threshold=threshold, seed=seed)
    curves.k80_sufficiency = _k80(ks, curves.sufficiency)
    curves.k80_necessity = _k80(ks, curves.necessity)
    return curves

