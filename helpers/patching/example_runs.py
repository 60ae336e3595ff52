"""The unpatched runs of each example: clean and corrupt logit differences (pairs of one length share unpadded
forwards on a GPU, each pair its own on a CPU) and the clean activations a sweep patches in. A sweep keeps the
metrics' forwards (``UnpatchedForward``, within a memory budget), which give it its clean activations and corrupt
prefix caches too, so that no second forward of the same rows runs."""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch

from helpers.patching.aligned_batch import AlignedBatch
from helpers.patching.model_calls import ModelCalls, aligned_forward, model_device
from helpers.patching.sites import Site, capture_site


def captured_forward(model, calls: ModelCalls, site: Site | None, ids) -> tuple[torch.Tensor, dict]:
    """One prompt's forward (``ids``: token ids): (last logits [vocab], {layer: activation at site [pos, width]})."""
    store: dict = {}
    ids = torch.as_tensor(list(ids), device=model_device(model)).unsqueeze(0)
    with torch.no_grad():
        if site is not None:
            with capture_site(site, store):
                logits, _ = calls.forward(model, ids)
        else:
            logits, _ = calls.forward(model, ids)
    return logits[0], {l: a[0] for l, a in store.items()}


def clean_and_corrupt(model, calls: ModelCalls, site: Site | None, pair):
    """(clean_diff, corrupt_diff, clean_correct, clean activations at site) for one example."""
    clean_logits, store = captured_forward(model, calls, site, pair.clean_ids)
    corrupt_logits, _ = captured_forward(model, calls, None, pair.corrupt_ids)
    return (*logit_diffs(clean_logits, corrupt_logits, pair), store)


def clean_and_corrupt_z(model, calls: ModelCalls, site: Site, pair):
    """(clean_diff, corrupt_diff, clean_correct, clean and corrupt activations at ``site``, each [layer, pos, width])."""
    (clean, z_clean), (corrupt, z_corrupt) = (captured_forward(model, calls, site, ids)
                                              for ids in (pair.clean_ids, pair.corrupt_ids))
    z_clean, z_corrupt = (torch.stack([z[l] for l in range(len(site.modules))]) for z in (z_clean, z_corrupt))
    return (*logit_diffs(clean, corrupt, pair), z_clean, z_corrupt)


def logit_diffs(clean_logits: torch.Tensor, corrupt_logits: torch.Tensor, pair) -> tuple[float, float, bool]:
    """(clean_diff, corrupt_diff, clean_correct) from the answer position's logits [vocab] of both runs."""
    logits = torch.stack([clean_logits, corrupt_logits]).double()  # (a float64 model's differences stay exact)
    diffs = (logits[:, pair.clean_token_id] - logits[:, pair.corrupt_token_id]).tolist()
    return diffs[0], diffs[1], int(logits[0].argmax()) == pair.clean_token_id


# Pairs of one length whose unpatched runs share a forward by default on a GPU (there the host's per-forward cost
# dominates short prompts; on a CPU the arithmetic does, and each pair keeps its own forward).
METRICS_PAIRS_PER_FORWARD_GPU = 32
# The unpatched runs' forwards a sweep keeps for its groups (``unpatched_runs``) hold at most this many bytes of
# clean activations and caches (a forward that would exceed it is not kept: its groups run their own). The sweep
# frees each one after its last group; 32 one-pair forwards of Llama-3.2-1B at T 60 in bf16 are ~250 MB.
KEEP_UNPATCHED_MAX_BYTES = 256 * 2**20


@dataclass
class UnpatchedForward:
    """One forward of the unpatched runs of pairs ``indices`` (one length, no padding): their clean rows, then their
    corrupt rows. Kept for the sweep: ``acts`` [n, L, T, U, w], the clean rows' activations at the sweep's site, and
    ``cache``, the forward's key/value cache of all 2n rows (the corrupt rows' prefixes are views of it)."""

    indices: list[int]
    acts: torch.Tensor
    cache: object

    def holds(self, indices: list[int]) -> bool:
        """Is every one of pairs ``indices`` (at least one) in this forward? (host only: no tensor made)"""
        return bool(indices) and set(indices) <= set(self.indices)

    def rows(self, indices: list[int]) -> slice | torch.Tensor | None:
        """Batch rows (0 .. n-1: the clean ones) of pairs ``indices``, in their order: a slice where consecutive
        (views, no copy); None unless ``holds(indices)``."""
        if not self.holds(indices):
            return None
        where = {i: r for r, i in enumerate(self.indices)}
        rows = [where[i] for i in indices]
        if rows == list(range(rows[0], rows[0] + len(rows))):
            return slice(rows[0], rows[0] + len(rows))
        return torch.tensor(rows, device=self.acts.device)

    def corrupt_rows(self, indices: list[int]) -> slice | torch.Tensor | None:
        """``rows`` of the same pairs' corrupt runs (n .. 2n-1)."""
        rows, n = self.rows(indices), len(self.indices)
        if rows is None:
            return None
        return slice(rows.start + n, rows.stop + n) if isinstance(rows, slice) else rows + n


def _nbytes(cache) -> int:
    """Bytes of a layered cache's key and value tensors."""
    return sum(t.nbytes for layer in getattr(cache, "layers", ()) for t in (getattr(layer, "keys", None),
                                                                             getattr(layer, "values", None))
               if isinstance(t, torch.Tensor))


def example_metrics(model, calls: ModelCalls, pairs, swap=None, pairs_per_forward: int | None = None
                    ) -> list[tuple[float, float, bool]]:
    """(clean_diff, corrupt_diff, clean_correct) of every pair, from the clean and corrupt rows of unpadded forwards.

    ``pairs_per_forward`` (None: METRICS_PAIRS_PER_FORWARD_GPU on a GPU, 1 elsewhere): pairs *of one length* that
    share a forward, so no row is padded and each row's arithmetic is its own; its metrics then differ from its
    own batch-2 forward by float rounding only (a test holds them to 1e-5 in float32). With 1, each pair has its
    own forward and an example's metrics, and whether it is included, do not depend on the other examples at all."""
    return unpatched_runs(model, calls, pairs, swap=swap, pairs_per_forward=pairs_per_forward)[0]


def unpatched_runs(model, calls: ModelCalls, pairs, *, keep_site: Site | None = None, swap=None,
                   pairs_per_forward: int | None = None, keep_bytes: int | None = None
                   ) -> tuple[list[tuple[float, float, bool]], list[UnpatchedForward]]:
    """``example_metrics`` of ``pairs``, and with ``keep_site`` their forwards kept for the sweep (``UnpatchedForward``:
    the clean rows' activations at that site and the forward's cache) as long as they fit in ``keep_bytes`` (None:
    ``KEEP_UNPATCHED_MAX_BYTES``).
    A sweep's group of examples that all sit in one kept forward takes its clean activations and corrupt prefix
    caches from it (helpers.patching.caches) instead of running the same rows again. Every forward keeps a cache,
    kept or not, so the metrics do not depend on which forwards are kept (a cache changes some attention paths'
    rounding)."""
    if pairs_per_forward is None:
        on_gpu = model_device(model).type == "cuda"
        pairs_per_forward = METRICS_PAIRS_PER_FORWARD_GPU if on_gpu else 1
    if pairs_per_forward < 1:
        raise ValueError(f"pairs_per_forward must be >= 1, got {pairs_per_forward}")
    pairs = list(pairs)
    by_length: dict[int, list[int]] = {}
    for i, pair in enumerate(pairs):
        by_length.setdefault(len(pair.clean_ids), []).append(i)
    out: list = [None] * len(pairs)
    kept: list[UnpatchedForward] = []
    free = KEEP_UNPATCHED_MAX_BYTES if keep_bytes is None else keep_bytes
    with torch.inference_mode():
        for indices in by_length.values():
            for k in range(0, len(indices), pairs_per_forward):
                chunk = indices[k:k + pairs_per_forward]
                # clean rows, then corrupt rows: the batch a sweep's own clean-and-prefix forward runs
                ids = [list(pairs[i].clean_ids) for i in chunk] + [list(pairs[i].corrupt_ids) for i in chunk]
                batch = AlignedBatch(ids, model_device(model))  # (one length: no padding)
                store: dict = {}
                with capture_site(keep_site, store) if keep_site is not None else nullcontext():
                    logits, cache = aligned_forward(model, calls, batch, batch.length, swap, use_cache=True)
                for i, metrics in zip(chunk, paired_logit_diffs(logits, [pairs[i] for i in chunk])):
                    out[i] = metrics
                if keep_site is not None:
                    size = _nbytes(cache) + sum(store[l][:len(chunk)].nbytes for l in store)
                    if size <= free:
                        free -= size
                        kept.append(UnpatchedForward(chunk, site_activations(store, keep_site, slice(None, len(chunk))),
                                                     cache))
                del store, cache
    return out, kept


def paired_logit_diffs(logits: torch.Tensor, pairs) -> list[tuple[float, float, bool]]:
    """``logit_diffs`` of every pair at once (two host reads, not two a pair): ``logits`` [2 * pairs, vocab], the
    pairs' clean rows, then their corrupt rows."""
    n = len(pairs)
    logits = logits.double()  # (as logit_diffs)
    tokens = torch.tensor([[p.clean_token_id, p.corrupt_token_id] for p in pairs], device=logits.device)  # [n, 2]
    picked = logits.view(2, n, -1).gather(2, tokens.unsqueeze(0).expand(2, -1, -1))  # [run, n, token]
    diffs = (picked[..., 0] - picked[..., 1]).tolist()  # [(clean, corrupt)][n]
    top = logits[:n].argmax(-1).tolist()
    return [(diffs[0][i], diffs[1][i], top[i] == p.clean_token_id) for i, p in enumerate(pairs)]


def clean_activations(model, calls: ModelCalls, site: Site, pairs, swap=None) -> torch.Tensor:
    """The clean runs' activations at ``site``, end-aligned: [example, layer, T, unit, width] (one forward)."""
    store: dict = {}
    batch = AlignedBatch([list(p.clean_ids) for p in pairs], model_device(model))
    with torch.inference_mode(), capture_site(site, store):
        aligned_forward(model, calls, batch, batch.length, swap)
    return site_activations(store, site)


def site_activations(store: dict, site: Site, rows: slice = slice(None)) -> torch.Tensor:
    """``capture_site``'s store ({layer: [batch, T, U * w]}) of batch ``rows`` as [rows, L, T, U, w]."""
    acts = torch.stack([store[l][rows] for l in range(len(site.modules))], 1)  # [E, L, T, U * w]
    return acts.view(*acts.shape[:3], site.n_units, site.unit_width)
