"""The corrupt run's key/value caches: snapshots no later update can change, per-layer expansion to a forward's
rows, and the prefix cache of every bucket start."""
from __future__ import annotations

import copy
from typing import Sequence

import torch

from helpers.patching.aligned_batch import AlignedBatch
from helpers.patching.example_runs import UnpatchedForward, clean_activations, site_activations
from helpers.patching.grouping import NotMergeable
from helpers.patching.model_calls import ModelCalls, aligned_forward
from helpers.patching.sites import Site, capture_site


def snapshot(cache):
    """A copy of a (layered) transformers cache whose layers no later update can change."""
    if cache is None:
        return None
    if not hasattr(cache, "layers"):
        raise TypeError(f"patching needs a layered transformers Cache (transformers >= 4.56), got {type(cache)!r}")
    snap = copy.copy(cache)
    snap.layers = [copy.copy(layer) for layer in cache.layers]
    return snap


def expanded(snap, batch_per_layer: Sequence[int], row_example: torch.Tensor | None = None):
    """A fresh copy of a snapshot whose layer j holds keys/values for the ``batch_per_layer[j]`` rows of that layer:
    a batch-1 snapshot's expanded (views), a batch-n one's gathered by ``row_example`` ([rows], each row's example).
    """
    if snap is None:
        return None
    out = copy.copy(snap)
    out.layers = []
    for layer, b in zip(snap.layers, batch_per_layer):
        layer = copy.copy(layer)
        if getattr(layer, "keys", None) is not None and layer.keys.numel() > 0:
            if layer.keys.shape[0] == 1:
                layer.keys = layer.keys.expand(b, *layer.keys.shape[1:])
                layer.values = layer.values.expand(b, *layer.values.shape[1:])
            else:
                layer.keys = layer.keys.index_select(0, row_example[:b])
                layer.values = layer.values.index_select(0, row_example[:b])
        out.layers.append(layer)
    return out


def is_plain(cache) -> bool:
    """Every layer a plain full-attention DynamicLayer (keys of all positions, nothing else to track)?"""
    try:
        from transformers.cache_utils import DynamicLayer
    except ImportError:
        return False
    return all(type(layer) is DynamicLayer for layer in getattr(cache, "layers", [None]))


def truncated(cache, s: int, rows: slice | torch.Tensor = slice(None)):
    """Views of a plain cache's keys/values at slots < ``s`` (of its batch ``rows``; copies where ``rows`` is an
    index tensor)."""
    out = copy.copy(cache)
    out.layers = []
    for layer in cache.layers:
        layer = copy.copy(layer)
        layer.keys, layer.values = layer.keys[rows, ..., :s, :], layer.values[rows, ..., :s, :]
        out.layers.append(layer)
    return out


def per_start(cache, starts: list[int], rows: slice | torch.Tensor = slice(None)) -> list:
    """``truncated`` views of a plain cache at every bucket start s (None where s = 0: nothing precedes it)."""
    return [truncated(cache, s, rows) if s > 0 else None for s in starts]


def prefix_caches(model, calls: ModelCalls, batch: AlignedBatch, starts: list[int], stats: dict, swap) -> list:
    """The corrupt runs' cache of slots < s for every bucket start s (None for s = 0). Raises NotMergeable for
    several examples whose cache layers are not all full attention.

    Full-attention caches: one pass up to the last start, then views truncated to each start. Other cache layers
    (sliding windows keep only their window), one example: one incremental pass, snapshotted at each start.
    """
    last = max(starts, default=0)
    if last == 0:
        return [None for _ in starts]
    _, cache = aligned_forward(model, calls, batch, last, swap, use_cache=True)
    stats["prefix_forwards"] = stats.get("prefix_forwards", 0) + 1
    if is_plain(cache):
        return per_start(cache, starts)
    if len(batch) > 1:
        raise NotMergeable("cache layers other than full attention")
    snaps, cache, done = [], None, 0
    for s in starts:
        if s > done:
            _, cache = calls.forward(model, batch.ids[:, done:s], start=done, cache=cache, use_cache=True)
            cache = snapshot(cache)
            done = s
            stats["prefix_forwards"] += 1
        snaps.append(snapshot(cache))
    return snaps


def clean_activations_and_prefix_caches(model, calls: ModelCalls, site: Site, pairs, corrupt: AlignedBatch,
                                        starts: list[int], stats: dict, swap) -> tuple[torch.Tensor, list]:
    """``clean_activations`` of ``pairs`` and ``prefix_caches`` of their ``corrupt`` batch from *one* forward: the
    clean rows and the corrupt rows in one batch (every forward costs the host ~1 ms a layer, and small models'
    sweeps wait on the host; a batch of 2 x examples rounds like the two batches of examples apart, to float
    rounding). Where the cache is not plain full attention (sliding windows, snapshotted over an incremental
    pass), the prefix caches come from their own pass as before. The caches are views of the 2 x examples rows'
    full-length keys and values (held while the group's sweep runs: small beside its batches)."""
    n = len(pairs)
    if max(starts, default=0) == 0:
        return clean_activations(model, calls, site, pairs, swap), [None for _ in starts]
    both = AlignedBatch([list(p.clean_ids) for p in pairs] + [list(p.corrupt_ids) for p in pairs], corrupt.ids.device)
    if both.length != corrupt.length or both.pads[n:] != corrupt.pads:
        raise ValueError("each pair's clean and corrupt prompts must have one length")
    store: dict = {}
    with torch.inference_mode(), capture_site(site, store):
        _, cache = aligned_forward(model, calls, both, both.length, swap, use_cache=True)
    acts = site_activations(store, site, slice(None, n))  # the clean rows: [E, L, T, U, w]
    if not is_plain(cache):  # (its clean activations stand; the prefix caches come from their own pass)
        del cache
        return acts, prefix_caches(model, calls, corrupt, starts, stats, swap)
    stats["prefix_forwards"] = stats.get("prefix_forwards", 0) + 1
    return acts, per_start(cache, starts, slice(n, None))


def group_activations_and_prefix_caches(model, calls: ModelCalls, site: Site, pairs, indices: list[int],
                                        corrupt: AlignedBatch, starts: list[int], stats: dict, swap,
                                        kept: Sequence[UnpatchedForward] = ()) -> tuple[torch.Tensor, list]:
    """``clean_activations_and_prefix_caches`` of a group's ``pairs`` (``indices``: theirs among the sweep's), taken
    from the kept forward of their unpatched runs (helpers.patching.example_runs.unpatched_runs) where one holds
    them all: its clean rows' activations and its corrupt rows' cache, no forward of its own. A group that is the
    whole kept forward gets the very batch its own forward would run (the same numbers, bit for bit); some of a
    forward's pairs, the same to float rounding. Else (or with no prefix to cache) their own forward."""
    forward = next((f for f in kept if f.holds(indices)), None)
    if forward is None or max(starts, default=0) == 0:
        return clean_activations_and_prefix_caches(model, calls, site, pairs, corrupt, starts, stats, swap)
    acts = forward.acts[forward.rows(indices)]
    stats["groups_from_kept_forwards"] = stats.get("groups_from_kept_forwards", 0) + 1
    if not is_plain(forward.cache):  # (sliding windows: the prefix caches come from their own pass, as there)
        return acts, prefix_caches(model, calls, corrupt, starts, stats, swap)
    # the group's corrupt rows up to the last start (a copy, once, where they are not consecutive), then views
    return acts, per_start(truncated(forward.cache, max(starts), forward.corrupt_rows(indices)), starts)
