"""One head sweep across several devices: the examples split in order into one contiguous share per device, each
share swept by a worker process holding its own copy of the model on its device (the first share by the caller's
model, in this process, meanwhile), the per-example results merged back in example order.

An example's sweep never depends on the other examples (on a CPU each example has its own forwards unless
``examples_per_forward`` asks otherwise; on a GPU examples share forwards, for their metrics and their sweeps,
which changes nothing but rounding), so the merged
result is the one-device result: bit for bit on the CPU (tested with two worker processes, which take the caller's
intra-op thread count), and to rounding on GPUs of one model. Workers start with ``spawn`` (CUDA cannot be
forked) and load the model from its spec.
"""
from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
import os
from typing import Sequence

import torch

from helpers.patching.result_types import HeadPatchingResult, PatchingResult


def split_in_order(n: int, parts: int) -> list[range]:
    """``parts`` contiguous ranges covering 0..n-1 in order, sizes differing by at most one (empty ones dropped)."""
    base, extra = divmod(n, parts)
    out, start = [], 0
    for k in range(parts):
        size = base + (k < extra)
        if size:
            out.append(range(start, start + size))
        start += size
    return out


def merge_in_order(parts: Sequence[PatchingResult]) -> PatchingResult:
    """The results of consecutive example shares as one result (positions padded with NaN to the longest)."""
    T = max(p.patched_logit_diff.shape[-1] for p in parts)

    def padded(x: torch.Tensor) -> torch.Tensor:
        pad = T - x.shape[-1]
        return x if pad == 0 else torch.nn.functional.pad(x, (0, pad), value=float("nan"))

    first = parts[0]
    stats = {"devices": [p.stats.get("device") for p in parts], "shares": [p.n_examples for p in parts],
             "pids": [p.stats.get("pid") for p in parts]}
    return type(first)(
        kind=first.kind, dims=first.dims, patched_logit_diff=torch.cat([padded(p.patched_logit_diff) for p in parts]),
        **{name: torch.cat([getattr(p, name) for p in parts])
           for name in ("clean_logit_diff", "corrupt_logit_diff", "clean_correct", "included", "lengths",
                        "first_difference")},
        min_denominator=first.min_denominator, stats=stats)


def _sweep_share(spec, dtype, device: str, pairs, kwargs: dict, cpu_threads: int | None = None
                 ) -> HeadPatchingResult:
    """A worker process: load the model on ``device`` and sweep its share (results on the CPU). ``cpu_threads``:
    the caller's intra-op thread count, which a CPU share takes too (a CPU matmul's rounding depends on it, and
    the merged result must be the one-device result bit for bit)."""
    from helpers.models.loading import load_model
    from helpers.patching.sweep import patch_heads

    if cpu_threads and torch.device(device).type == "cpu":
        torch.set_num_threads(cpu_threads)
    loaded = load_model(spec, dtype=dtype, device=device)
    result = patch_heads(loaded.hf_model, pairs, progress=False, **kwargs)
    result.stats.update(device=device, pid=os.getpid())
    return result


def patch_heads_across_devices(model, spec, dtype, devices: Sequence[str], pairs, **kwargs) -> HeadPatchingResult:
    """``patch_heads`` of ``pairs`` split over ``devices`` (module docstring). ``model``: the caller's copy, on
    ``devices[0]``, which sweeps the first share here; ``spec`` / ``dtype``: how the workers load theirs."""
    from helpers.patching.sweep import patch_heads

    pairs = list(pairs)
    shares = split_in_order(len(pairs), len(devices))
    if len(shares) <= 1:
        return patch_heads(model, pairs, **kwargs)
    progress = kwargs.pop("progress", False)
    context = mp.get_context("spawn")
    with cf.ProcessPoolExecutor(max_workers=len(shares) - 1, mp_context=context) as pool:
        futures = [pool.submit(_sweep_share, spec, dtype, device, [pairs[i] for i in share], kwargs,
                               torch.get_num_threads())
                   for device, share in zip(devices[1:], shares[1:])]
        try:
            here = patch_heads(model, [pairs[i] for i in shares[0]], progress=progress, **kwargs)
        except BaseException:  # (an error or an interrupt here: the workers' shares are moot, stop them now)
            for f in futures:
                f.cancel()
            for proc in list((getattr(pool, "_processes", None) or {}).values()):
                proc.terminate()
            raise
        here.stats.update(device=str(devices[0]), pid=os.getpid())
        parts = [here] + [f.result() for f in futures]
    return merge_in_order(parts)
