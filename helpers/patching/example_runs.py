"""The unpatched runs of each example: clean and corrupt logit differences (each pair in its own forward, so
that an example's metrics never depend on the others) and the clean activations a sweep patches in."""
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


def example_metrics(model, calls: ModelCalls, pairs, swap=None) -> list[tuple[float, float, bool]]:
    """(clean_diff, corrupt_diff, clean_correct) of every pair, each from its own batch-2 forward (clean and corrupt
    have one length), so an example's metrics, and whether it is included, never depend on the other examples."""
    out = []
    with torch.inference_mode():
        for pair in pairs:
            batch = AlignedBatch([list(pair.clean_ids), list(pair.corrupt_ids)], model_device(model))
            logits, _ = aligned_forward(model, calls, batch, batch.length, swap)
            out.append(logit_diffs(logits[0], logits[1], pair))
    return out


def clean_activations(model, calls: ModelCalls, site: Site, pairs, swap=None) -> torch.Tensor:
    """The clean runs' activations at ``site``, end-aligned: [example, layer, T, unit, width] (one forward)."""
    store: dict = {}
    batch = AlignedBatch([list(p.clean_ids) for p in pairs], model_device(model))
    with torch.inference_mode(), capture_site(site, store):
        aligned_forward(model, calls, batch, batch.length, swap)
    acts = torch.stack([store[l] for l in range(len(site.modules))], 1)  # [E, L, T, U * w]
    return acts.view(*acts.shape[:3], site.n_units, site.unit_width)
