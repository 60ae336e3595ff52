"""Which examples share a sweep's forwards, and how a sweep is cut into buckets of patch positions."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from helpers.models.architectures import blocks
from helpers.patching.model_calls import model_device
from helpers.patching.sites import Site


class NotMergeable(RuntimeError):
    """These examples cannot share forwards (raised before any of their results): run them one at a time."""


class MaskNotPassedOn(NotMergeable):
    """A block got another mask than the one handed to the model: merged examples cannot be told apart there."""


def pads_examples(model) -> bool:
    """May examples of different lengths share a forward under one ready 4D padding mask? transformers hands such a
    mask to every layer as is, so only for eager and sdpa attention, and not where some layers need another mask:
    sliding windows (``layer_types`` other than full attention, or a model-wide ``sliding_window``). (gpt_neo's
    local layers apply their window themselves, on top of the mask.)"""
    config = model.config
    if getattr(config, "_attn_implementation", None) not in (None, "eager", "sdpa"):
        return False  # flash-attention-2 reads a mask as 2D padding, flex wants a BlockMask
    types = getattr(config, "layer_types", None)
    if types is not None:
        return all(t == "full_attention" for t in types)
    return getattr(config, "sliding_window", None) is None or getattr(config, "use_sliding_window", True) is False


# Default bucketing. A bucket recomputes positions s..p-1 for its rows at p (waste ~ bucket size), and each forward
# costs the host ~1-2 ms per layer to launch. So: at least 9 buckets, and up to 24 where the sweep's arithmetic is
# large enough to keep the GPU busy meanwhile (~20 TFLOP a forward, ~35 ms of an H100 in bf16).
# Measured on an H100, bf16, 60 tokens (scripts/bench.py, before the Triton MLP and own-token kernels): Qwen2.5-0.5B
# 0.53 s at 9 forwards, 0.57 at 13, 0.60 at 8; Llama-3.2-1B 1.30-1.34 s at 13-25 forwards, 1.36 at 9.
_MIN_BUCKETS, _MAX_BUCKETS, _FLOP_PER_FORWARD = 9, 24, 20e12
# Small sweeps take fewer (down to 2) where a forward's host time outweighs a bucket's waste. On a GPU the GPU does
# a forward's arithmetic faster than the host launches it, so a bucket saved is ~1 ms a layer saved and its waste
# costs nothing: while the host launches one layer (~0.8 ms), the GPU gets through ~0.24 TFLOP of a small model's
# sweep (~300 TFLOP/s reached). Measured on an H200, bf16, SmolLM2-135M shape (30 layers), 10 examples of T 26:
# 0.124 s with 2 buckets, 0.131 s with 3, 0.186-0.206 s with 6 (the 9-bucket minimum); TinyStories-2L, one example
# of T 71: 0.020 s with 1-2 buckets, 0.042 s with 9 (scripts/profile_small.py). On a CPU host time and arithmetic
# add up, and only the shortest sweeps gain: the embedded models (2 layers, 2 cores), 5 DEFFIELDNAME examples (span
# 8), before and after in one run: llama 0.128 s at 9 buckets, 0.056 s at 2; gpt_neo 0.145 s, 0.082 s at 3; spans of
# 24-58 were as fast or faster at 9 or more.
_MIN_HOST_BOUND_BUCKETS = 2
_FLOP_PER_LAYER_LAUNCH = {"cuda": 0.24e12, "cpu": 0.1e9}


def sweep_flop(model, site: Site, spans: Sequence[int]) -> float:
    """A sweep's arithmetic over examples with these spans: 2 x block params x row-token-layers.

    (A head sweep's last layer counts in full, though it runs its output projection and MLP at the answer position
    alone: the rates above were measured against this count, and counting that layer as a quarter of one changed no
    measured default's speed, BENCHMARKS.md 2026-12-06.)"""
    L = len(site.modules)
    per_layer = sum(p.numel() for p in blocks(model)[0].parameters())
    row_token_layers = site.n_units * (L * (L - 1) / 2) * sum(n * (n + 1) / 2 for n in spans)
    return 2 * per_layer * row_token_layers


def bucket_count(model, site: Site, spans: Sequence[int]) -> int:
    """Buckets (forwards) for one group of examples: its sweep's arithmetic / _FLOP_PER_FORWARD, within bounds, and
    fewer where the forwards' host time would outweigh the buckets' waste (_FLOP_PER_LAYER_LAUNCH: a sweep with
    less arithmetic than that per bucket and layer; GPU and CPU, each measured; other devices keep the bounds)."""
    flop = sweep_flop(model, site, spans)
    n = int(min(_MAX_BUCKETS, max(_MIN_BUCKETS, math.ceil(flop / _FLOP_PER_FORWARD))))
    device = model_device(model).type
    per_layer = _FLOP_PER_LAYER_LAUNCH.get(device)
    if device == "cuda" and next(model.parameters()).element_size() > 2:
        per_layer = None  # (the GPU rate is bf16's; float32 sweeps keep the bounds, as fast as before by construction)
    if per_layer is not None:
        n = min(n, max(_MIN_HOST_BOUND_BUCKETS, math.ceil(flop / (len(site.modules) * per_layer))))
    return n


def bucket_sizes(span: int, bucket_size: int | None, n_buckets: int) -> tuple[int, list[int]]:
    """(bucket size, fed tokens q of each bucket): bucket k patches positions r in (q_k - size, q_k] from the end."""
    if span <= 0:
        return 1, []
    size = bucket_size if bucket_size is not None else max(1, math.ceil(span / n_buckets))
    return size, list(range(span, 0, -size))


@dataclass
class SweepExample:
    """One included example of a sweep: its index among the pairs, the pair, its first difference and its corrupt
    logit difference."""

    index: int
    pair: object
    first: int
    corrupt_diff: float

    @property
    def length(self) -> int:
        return len(self.pair.clean_ids)

    @property
    def span(self) -> int:
        """Positions from the first difference to the end: the ones a sweep computes."""
        return self.length - self.first


# examples merged into one group at most (its forwards' base rows, masks and clean activations grow with it), and
# the largest sweep arithmetic of an example that is merged at all: a 60-token example is ~0.5 TFLOP for
# TinyStories-2L, ~150 for Qwen2.5-0.5B (merging paid on an H100) and ~600 for Llama-3.2-1B (merging lost)
_MAX_EXAMPLES_PER_FORWARD, _MERGE_MAX_FLOP = 32, 250e12


def example_groups(model, site: Site, examples: list[SweepExample], per_forward: int | None) -> list[list[SweepExample]]:
    """Consecutive examples merged into one sweep's forwards. A group's forwards feed every example's last q tokens,
    so its longest span must fit in its shortest example. ``per_forward``: at most that many examples a group.

    None: on a GPU up to ``_MAX_EXAMPLES_PER_FORWARD``, but only examples whose own sweep leaves the GPU waiting
    for the host (arithmetic below ``_MERGE_MAX_FLOP``). Measured on an H100 in bf16, 10 examples of ~60 tokens:
    TinyStories-2L merged 0.08-0.13 s against 0.46-0.62 s one at a time; Qwen2.5-0.5B 4.85-5.04 s against
    5.14-5.68 s; Llama-3.2-1B, which one example keeps busy, 19.6 s merged against 13.8 s. On a CPU one at a time:
    there the arithmetic is the cost, and merged batches outgrow the caches (the embedded gpt_neo model, 16
    examples, 2 cores: 10.0 s merged against 5.7 s).
    Models whose layers need masks other than causal ones (sliding windows) run one example at a time."""
    groups: list[list[SweepExample]] = []
    limit = per_forward or _MAX_EXAMPLES_PER_FORWARD
    if not pads_examples(model) or (per_forward is None and model_device(model).type != "cuda"):
        limit = 1
    # (by default an example whose own sweep keeps the GPU busy runs alone)
    alone = {ex.index for ex in examples if per_forward is None and limit > 1
             and sweep_flop(model, site, [ex.span]) > _MERGE_MAX_FLOP}
    for ex in examples:
        group = groups[-1] + [ex] if groups else None
        if group is not None and any(e.index in alone for e in group):
            group = None
        if group is not None and len(group) <= limit and max(e.span for e in group) <= min(e.length for e in group):
            groups[-1] = group
        else:
            groups.append([ex])
    return groups


def bucket_rows(L: int, U: int, spans: Sequence[int], q: int, size: int) -> torch.Tensor:
    """Rows (layer, example, unit, r) of one bucket, layer-major (rows join the forward in this order).

    ``r`` counts positions from the end (the answer position is r = 1): the bucket feeds every example's last ``q``
    tokens and patches its positions r in (q - size, q], as far as its span (positions from its first difference).
    Built from the examples' r ranges in a few whole-tensor steps and repeated per layer, only the rows kept (the
    full grid filtered by span, ``bucket_rows_reference``, showed ~9 ms a bucket under the profiler on an H200 host;
    a loop over the examples ~0.65 ms a bucket for ten examples on an H100's host; a test holds them equal).
    """
    lo = max(1, q - size + 1)
    # each example's r range lo .. min(q, span), the same for each of its units; rows unit-major within an example
    counts = (torch.tensor([int(s) for s in spans], dtype=torch.long).clamp(max=q) - lo + 1).clamp(min=0)
    per_example = counts * U
    n = int(per_example.sum())
    if not n:
        return torch.empty((0, 4), dtype=torch.long)
    example = torch.repeat_interleave(torch.arange(len(spans)), per_example)
    j = torch.arange(n) - (per_example.cumsum(0) - per_example)[example]  # the row's place within its example
    c = counts[example]
    layer_rows = torch.stack([example, j // c, lo + j % c], 1)  # (example, unit, r)
    layer = torch.arange(L).repeat_interleave(n)
    return torch.cat([layer.unsqueeze(1), layer_rows.repeat(L, 1)], 1)


def bucket_rows_reference(L: int, U: int, spans: Sequence[int], q: int, size: int) -> torch.Tensor:
    """``bucket_rows`` as the full (layer, example, unit, r) grid filtered by each example's span."""
    r = torch.arange(max(1, q - size + 1), q + 1)
    grid = torch.stack(torch.meshgrid(torch.arange(L), torch.arange(len(spans)), torch.arange(U), r, indexing="ij"),
                       -1).reshape(-1, 4)
    return grid[grid[:, 3] <= torch.tensor(list(spans))[grid[:, 1]]]
