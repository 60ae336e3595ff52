"""The unpatched runs of each example: clean and corrupt logit differences (pairs of one length share unpadded
forwards on a GPU, each pair its own on a CPU) and the clean activations a sweep patches in."""
from __future__ import annotations

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


def example_metrics(model, calls: ModelCalls, pairs, swap=None, pairs_per_forward: int | None = None
                    ) -> list[tuple[float, float, bool]]:
    """(clean_diff, corrupt_diff, clean_correct) of every pair, from the clean and corrupt rows of unpadded forwards.

    ``pairs_per_forward`` (None: METRICS_PAIRS_PER_FORWARD_GPU on a GPU, 1 elsewhere): pairs *of one length* that
    share a forward, so no row is padded and each row's arithmetic is its own; its metrics then differ from its
    own batch-2 forward by float rounding only (a test holds them to 1e-5 in float32). With 1, each pair has its
    own forward and an example's metrics, and whether it is included, do not depend on the other examples at all."""
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
    with torch.inference_mode():
        for indices in by_length.values():
            for k in range(0, len(indices), pairs_per_forward):
                chunk = indices[k:k + pairs_per_forward]
                ids = [list(x) for i in chunk for x in (pairs[i].clean_ids, pairs[i].corrupt_ids)]
                batch = AlignedBatch(ids, model_device(model))  # (one length: no padding)
                logits, _ = aligned_forward(model, calls, batch, batch.length, swap)
                for i, metrics in zip(chunk, paired_logit_diffs(logits, [pairs[i] for i in chunk])):
                    out[i] = metrics
    return out


def paired_logit_diffs(logits: torch.Tensor, pairs) -> list[tuple[float, float, bool]]:
    """``logit_diffs`` of every pair at once (two host reads, not two a pair): ``logits`` [2 * pairs, vocab], each
    pair's clean row then its corrupt row."""
    logits = logits.double()  # (as logit_diffs)
    tokens = torch.tensor([[p.clean_token_id, p.corrupt_token_id] for p in pairs], device=logits.device)
    picked = logits.view(len(pairs), 2, -1).gather(2, tokens.unsqueeze(1).expand(-1, 2, -1))  # [n, row, token]
    diffs = (picked[..., 0] - picked[..., 1]).tolist()  # [n, (clean, corrupt)]
    top = logits[0::2].argmax(-1).tolist()
    return [(d[0], d[1], t == p.clean_token_id) for d, t, p in zip(diffs, top, pairs)]


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
