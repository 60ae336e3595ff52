"""Attribution patching of heads: a first-order estimate of ``patch_heads`` from 2 forwards and 1 backward.

For head h of layer l at position p, the effect of patching z (out_proj input) clean into corrupt is estimated as
``grad_z metric(corrupt) · (z_clean - z_corrupt)`` summed over the head's slice, where the gradient is the total
derivative of the corrupt run's metric (through every later layer). The estimate is exact where the metric is
linear in that z (e.g. the last layer's answer position when nothing nonlinear follows) and zero wherever
clean and corrupt z are equal (positions before the corruption). ``attribution_error`` compares it with
``patch_heads``.
"""
from __future__ import annotations

import math

import torch

from helpers.models.architectures import head_geometry, out_proj_modules
from helpers.patching.example_runs import clean_and_corrupt
from helpers.patching.model_calls import ModelCalls, eval_mode, progress_bar, unwrap_model
from helpers.patching.result_types import (
    DEFAULT_MIN_DENOMINATOR,
    HeadPatchingResult,
    PatchingResult,
    build_result,
    report_inclusion,
    validate_pair,
)
from helpers.patching.sites import site_of


def _attribute_example(model, calls: ModelCalls, pair, clean_z: dict) -> torch.Tensor:
    """[layer, head, pos] estimated patched-minus-corrupt logit difference for one example."""
    geo = head_geometry(model.config)
    device = next(model.parameters()).device
    corrupt = torch.as_tensor(list(pair.corrupt_ids), device=device).unsqueeze(0)
    mods = out_proj_modules(model)
    zs: list = [None] * len(mods)
    handles = []
    for layer, mod in enumerate(mods):
        def keep(m, args, _layer=layer):
            zs[_layer] = args[0]
        handles.append(mod.register_forward_pre_hook(keep))

    def needs_grad(m, args, output):  # so gradients exist even when the parameters are frozen
        if not output.requires_grad:
            return output.detach().requires_grad_(True)
        return None
    handles.append(model.get_input_embeddings().register_forward_hook(needs_grad))
    try:
        with torch.enable_grad():
            logits, _ = calls.forward(model, corrupt)
            last = logits[0].float()
            metric = last[pair.clean_token_id] - last[pair.corrupt_token_id]
            grads = torch.autograd.grad(metric, zs)
    finally:
        for h in handles:
            h.remove()
    T, H, dh = corrupt.shape[1], geo.n_heads, geo.d_head
    out = torch.empty(len(mods), H, T)
    for layer, (z, g) in enumerate(zip(zs, grads)):
        delta = (clean_z[layer].float() - z[0].detach().float()).view(T, H, dh)
        out[layer] = (g[0].float().view(T, H, dh) * delta).sum(-1).T.cpu()
    return out


def attribution_patching_heads(model, pairs, *, keep_incorrect: bool = False,
                               min_denominator: float = DEFAULT_MIN_DENOMINATOR,
                               progress: bool = True) -> HeadPatchingResult:
    """First-order estimate of ``patch_heads``; same result type and shape ([example, layer, head, pos]).

    ``patched_logit_diff`` holds ``corrupt + estimated effect``. Per example: a clean forward (no grad), a corrupt
    forward with grad, one backward (``torch.autograd.grad``, parameter ``.grad`` untouched).
    """
    model = unwrap_model(model)
    with eval_mode(model):  # dropout off for every forward, the clean/corrupt metrics included
        return _attribution_patching_heads(model, list(pairs), keep_incorrect, min_denominator, progress)


def _attribution_patching_heads(model, pairs, keep_incorrect, min_denominator, progress) -> HeadPatchingResult:
    calls = ModelCalls.of(model)
    site = site_of(model, "heads")
    firsts = [validate_pair(p, i) for i, p in enumerate(pairs)]
    pre = [clean_and_corrupt(model, calls, site, p) for p in pairs]
    included = report_inclusion([c for _, _, c, _ in pre], keep_incorrect)
    geo = head_geometry(model.config)
    lengths = [len(p.clean_ids) for p in pairs]
    patched = torch.full((len(pairs), geo.n_layers, geo.n_heads, max(lengths, default=0)), float("nan"))
    for i in progress_bar(range(len(pairs)), progress, "attribution"):
        if included[i]:
            patched[i, :, :, : lengths[i]] = pre[i][1] + _attribute_example(model, calls, pairs[i], pre[i][3])
    return build_result(HeadPatchingResult, "attribution_heads", ("example", "layer", "head", "pos"), patched,
                        [p[0] for p in pre], [p[1] for p in pre], [p[2] for p in pre], included, lengths, firsts,
                        min_denominator, {"forwards": 2 * len(pairs), "backwards": int(included.sum())})


def attribution_error(approx: PatchingResult, exact: PatchingResult) -> dict:
    """How far an estimate (e.g. attribution patching) is from the exact sweep, on raw effects.

    Compares ``patched - corrupt`` logit differences over cells finite in both (included examples only).
    Returns pearson ``correlation``, ``max_abs_error``, ``mean_abs_error``, ``relative_max_error``
    (max error / max |exact effect|), ``sign_agreement`` (over cells with |exact effect| > 1% of its max),
    ``top_k_overlap`` (fraction of the exact top-k |mean effect| cells, k = 10, also in the estimate's top-k)
    and ``n`` (cells compared).
    """
    if approx.patched_logit_diff.shape != exact.patched_logit_diff.shape:
        raise ValueError(f"shapes differ: {tuple(approx.patched_logit_diff.shape)} "
                         f"vs {tuple(exact.patched_logit_diff.shape)}")
    shape = (-1,) + (1,) * (exact.patched_logit_diff.dim() - 1)
    a = approx.patched_logit_diff - approx.corrupt_logit_diff.view(shape)
    e = exact.patched_logit_diff - exact.corrupt_logit_diff.view(shape)
    both = approx.included & exact.included
    a, e = a[both], e[both]
    mask = torch.isfinite(a) & torch.isfinite(e)
    av, ev = a[mask].detach().double(), e[mask].detach().double()  # (an EAP estimate may carry a graph)
    nan = float("nan")
    if av.numel() == 0:
        return dict(correlation=nan, max_abs_error=nan, mean_abs_error=nan, relative_max_error=nan,
                    sign_agreement=nan, top_k_overlap=nan, n=0)
    err = (av - ev).abs()
    corr = nan
    if av.numel() > 1 and av.std() > 0 and ev.std() > 0:
        corr = float(torch.corrcoef(torch.stack([av, ev]))[0, 1])
    scale = float(ev.abs().max())
    big = ev.abs() > 0.01 * scale
    sign = float((torch.sign(av[big]) == torch.sign(ev[big])).double().mean()) if big.any() else nan
    with torch.no_grad():
        ma = torch.nanmean(torch.where(torch.isfinite(a), a, torch.nan), 0).flatten().nan_to_num(0).abs()
        me = torch.nanmean(torch.where(torch.isfinite(e), e, torch.nan), 0).flatten().nan_to_num(0).abs()
    k = min(10, me.numel())
    top = len(set(me.topk(k).indices.tolist()) & set(ma.topk(k).indices.tolist())) / k if k else nan
    return dict(correlation=corr, max_abs_error=float(err.max()), mean_abs_error=float(err.mean()),
                relative_max_error=float(err.max()) / scale if scale > 0 else (0.0 if err.max() == 0 else math.inf),
                sign_agreement=sign, top_k_overlap=top, n=int(av.numel()))
