"""Oracles for the fast kernels: the original one-run-per-patch algorithm, nothing skipped, nothing batched.

``patch_heads_reference`` is the seed notebook's LLM path ported to nnsight 0.8: one trace of the corrupt prompt per
(layer, head, position), overwriting one head slice of ``out_proj.input`` at one position with the clean value,
reading the metric from the model's logits (the model's output, so granite's ``logits_scaling`` is included).
It patches *every* position, including those before the corruption, so it also checks the fast path's prefix skip.

``patch_sites_reference`` is the same loop with plain PyTorch hooks, for every site of helpers.patching
(heads, residual = block input, attention_output, mlp_output): one full forward per patch.
"""
from __future__ import annotations

from typing import Iterable

import torch

from helpers.models.architectures import head_geometry, out_proj_modules
from helpers.patching.example_runs import clean_and_corrupt
from helpers.patching.model_calls import ModelCalls, progress_bar, unwrap_model
from helpers.patching.result_types import (
    DEFAULT_MIN_DENOMINATOR,
    HeadPatchingResult,
    LayerPatchingResult,
    PatchingResult,
    build_result,
    report_inclusion,
    validate_pair,
)
from helpers.patching.sites import apply_patch, read_site, site_of


def _nnsight(model):
    """An nnsight wrapper: the caller's own (LanguageModel / NNsight), else ``NNsight(torch_model)``."""
    from nnsight import NNsight
    from nnsight.intervention.envoy import Envoy

    if isinstance(model, Envoy):
        return model
    return NNsight(model)


def patch_heads_reference(model, pairs, *, keep_incorrect: bool = False,
                          min_denominator: float = DEFAULT_MIN_DENOMINATOR,
                          patches: Iterable[tuple[int, int, int]] | None = None,
                          progress: bool = True) -> HeadPatchingResult:
    """One nnsight trace per (layer, head, position): the original algorithm, the oracle of ``patch_heads``.

    ``patches``: optional subset of (layer, head, position) to run (the others are NaN), e.g. for timing.
    """
    torch_model = unwrap_model(model)
    torch_model.eval()  # the oracle: dropout off (the model stays in eval mode)
    nn_model = _nnsight(model)
    geo = head_geometry(torch_model.config)
    envoys = out_proj_modules(nn_model)
    device = next(torch_model.parameters()).device
    pairs = list(pairs)
    firsts = [validate_pair(p, i) for i, p in enumerate(pairs)]
    lengths = [len(p.clean_ids) for p in pairs]
    t_max = max(lengths, default=0)
    L, H, dh = geo.n_layers, geo.n_heads, geo.d_head
    patched = torch.full((len(pairs), L, H, t_max), float("nan"))
    clean_diffs, corrupt_diffs, correct = [], [], []
    wanted = None if patches is None else list(patches)

    runs = []
    for pair in pairs:
        clean = torch.as_tensor(list(pair.clean_ids), device=device).unsqueeze(0)
        corrupt = torch.as_tensor(list(pair.corrupt_ids), device=device).unsqueeze(0)
        ct, xt = pair.clean_token_id, pair.corrupt_token_id
        clean_z = []
        with torch.no_grad():
            with nn_model.trace(clean):
                for envoy in envoys:
                    clean_z.append(envoy.input.save())
                clean_out = nn_model.output.save()
            with nn_model.trace(corrupt):
                corrupt_out = nn_model.output.save()
        clean_logits = clean_out.logits[0, -1].float()
        corrupt_logits = corrupt_out.logits[0, -1].float()
        clean_diffs.append(float(clean_logits[ct] - clean_logits[xt]))
        corrupt_diffs.append(float(corrupt_logits[ct] - corrupt_logits[xt]))
        correct.append(int(clean_logits.argmax()) == ct)
        runs.append((corrupt, [z.detach().clone() for z in clean_z]))
    included = report_inclusion(correct, keep_incorrect)

    for i, pair in enumerate(pairs):
        if not included[i]:
            continue
        corrupt, clean_z = runs[i]
        ct, xt = pair.clean_token_id, pair.corrupt_token_id
        todo = wanted if wanted is not None else [
            (l, h, p) for l in range(L) for h in range(H) for p in range(lengths[i])]
        todo = [(l, h, p) for l, h, p in todo if p < lengths[i]]
        for layer, head, pos in progress_bar(todo, progress, f"reference example {i}"):
            envoy = envoys[layer]
            sl = slice(head * dh, (head + 1) * dh)
            with torch.no_grad():
                with nn_model.trace(corrupt):
                    z = envoy.input
                    z[:, pos, sl] = clean_z[layer][:, pos, sl]
                    envoy.input = z
                    logits = nn_model.output.logits.save()
            last = logits[0, -1].float()
            patched[i, layer, head, pos] = float(last[ct] - last[xt])
        runs[i] = None
    return build_result(HeadPatchingResult, "heads", ("example", "layer", "head", "pos"), patched, clean_diffs,
                        corrupt_diffs, correct, included, lengths, firsts, min_denominator, {"traces": None})


def patch_sites_reference(model, pairs, kind: str, *, keep_incorrect: bool = False,
                          min_denominator: float = DEFAULT_MIN_DENOMINATOR, progress: bool = False) -> PatchingResult:
    """One plain full forward of the corrupt prompt per (layer, [head,] position), patched by a hook."""
    model = unwrap_model(model)
    model.eval()  # the oracle: dropout off (the model stays in eval mode)
    calls = ModelCalls.of(model)
    site = site_of(model, kind)
    device = next(model.parameters()).device
    pairs = list(pairs)
    firsts = [validate_pair(p, i) for i, p in enumerate(pairs)]
    pre = [clean_and_corrupt(model, calls, site, p) for p in pairs]
    included = report_inclusion([c for _, _, c, _ in pre], keep_incorrect)
    lengths = [len(p.clean_ids) for p in pairs]
    t_max = max(lengths, default=0)
    L, U, w = len(site.modules), site.n_units, site.unit_width
    patched = torch.full((len(pairs), L, U, t_max), float("nan"))
    for i, pair in enumerate(pairs):
        if not included[i]:
            continue
        acts = pre[i][3]
        corrupt = torch.as_tensor(list(pair.corrupt_ids), device=device).unsqueeze(0)
        todo = [(l, u, p) for l in range(L) for u in range(U) for p in range(lengths[i])]
        for layer, unit, pos in progress_bar(todo, progress, f"{kind} reference {i}"):
            value = acts[layer].reshape(-1, U, w)[pos, unit].unsqueeze(0)
            patch = (torch.zeros(1, dtype=torch.long, device=device), torch.tensor([pos], device=device),
                     torch.tensor([unit], device=device), value)
            module = site.modules[layer]
            if site.where == "post":
                def hook(mod, args, output):
                    if isinstance(output, torch.Tensor):
                        return apply_patch(output.clone(), site, patch)
                    return (apply_patch(output[0].clone(), site, patch),) + tuple(output[1:])
                handle = module.register_forward_hook(hook)
            else:
                def hook(mod, args, kwargs):
                    x = read_site(site, args, kwargs, None).clone()
                    x = apply_patch(x, site, patch)
                    if args:
                        return (x,) + tuple(args[1:]), kwargs
                    key = "hidden_states" if "hidden_states" in kwargs else next(
                        k for k, v in kwargs.items() if isinstance(v, torch.Tensor))
                    return args, {**kwargs, key: x}
                handle = module.register_forward_pre_hook(hook, with_kwargs=True)
            try:
                with torch.no_grad():
                    logits, _ = calls.forward(model, corrupt)
            finally:
                handle.remove()
            last = logits[0].float()
            patched[i, layer, unit, pos] = float(last[pair.clean_token_id] - last[pair.corrupt_token_id])
    if kind == "heads":
        cls, dims = HeadPatchingResult, ("example", "layer", "head", "pos")
    else:
        cls, dims, patched = LayerPatchingResult, ("example", "layer", "pos"), patched[:, :, 0]
    return build_result(cls, kind, dims, patched, [p[0] for p in pre], [p[1] for p in pre], [p[2] for p in pre],
                        included, lengths, firsts, min_denominator)
