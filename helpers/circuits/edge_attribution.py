"""Edge attribution patching (EAP, Syed et al. 2023): the first-order estimate of exact path patching.

For an edge s -> (r, c), path patching adds the sender's direct contribution ``delta_s`` to the receiver's channel-c
input at p_s (helpers.circuits.path_patching). EAP linearises that around the corrupt run:
``effect ~ delta_s . dM/dx_{r,c}[p_s]``, where ``x_{r,c}`` is the residual stream *as only receiver r's channel c
sees it* and the gradient is that of the corrupt run's metric through everything after (the norm's scale included,
as in the exact version). Logits edges: ``delta_s . dM/dx_final[answer]``.

All gradients of one example come from one forward and one backward (plus its clean and corrupt runs): a row per
(receiver, input) pair, each with its own zero perturbation of that input as a leaf, only the receiver head's output
allowed to depend on it (the layer's other heads are held at their corrupt values), and the final norm's input of
row 0 as the leaf for the logits edges. The estimate is exact where the metric is linear in that input.
"""
from __future__ import annotations

from typing import Sequence

import torch

from helpers.circuits.path_patching import (
    Edge,
    EdgeScores,
    channel_slices,
    direct_contributions,
    edge_scores,
    example_edge_rows,
    prepare_edges,
    receiver_input,
)
from helpers.models.architectures import blocks, family_spec, get_submodule
from helpers.patching.example_runs import clean_and_corrupt_z
from helpers.patching.model_calls import ModelCalls, eval_mode, model_device
from helpers.patching.result_types import DEFAULT_MIN_DENOMINATOR
from helpers.patching.sites import site_of


def edge_attribution(model, pairs, edges: Sequence[Edge], *, n_columns: int | None = None,
                     keep_incorrect: bool = False,
                     min_denominator: float = DEFAULT_MIN_DENOMINATOR) -> EdgeScores:
    """EAP estimates of ``edges`` on every example, as an EdgeScores (``patched_logit_diff`` = corrupt + estimate)."""
    edges = list(edges)
    model, pairs, firsts, geo, n_columns = prepare_edges(model, pairs, edges, n_columns)
    calls, site = ModelCalls.of(model), site_of(model, "heads")
    spec = family_spec(model.config)
    slices = channel_slices(model, geo)
    H, dh = geo.n_heads, geo.d_head
    device = model_device(model)
    bl = blocks(model)
    inputs = sorted({(e.receiver[0], e.receiver[1], e.input) for e in edges if e.receiver is not None})
    row_of = {key: b for b, key in enumerate(inputs)}
    n = max(1, len(inputs))
    patched = torch.full((len(edges), len(pairs)), float("nan"), dtype=torch.float64)
    pre = []
    state: dict = {}

    # every hook is inactive outside the attribution forward (the clean and corrupt runs share them)
    def save_x(mod, args, kwargs):
        if "leaves" not in state:
            return
        state.setdefault("x", {})[mod] = args[0] if args else kwargs["hidden_states"]

    def channel(mod, args, output):
        if "leaves" not in state:
            return None
        rows = [(b, layer, c) for b, (layer, _, c) in enumerate(inputs) if get_submodule(bl[layer], slices[c][0]) is mod]
        if not rows:
            return None
        out = output.clone()
        for b, layer, c in rows:
            cols = slices[c][1]
            x = state["x"][bl[layer]][b]
            out[b, :, cols] = mod.forward(receiver_input(get_submodule(bl[layer], spec.input_norm), x,
                                                         state["leaves"][b]))[:, cols]
        return out

    def keep_receiver(layer):
        def hook(mod, args):
            if "leaves" not in state:
                return None
            z = args[0]
            T = z.shape[1]
            hold = torch.zeros(n, 1, H, 1, dtype=torch.bool, device=z.device)
            for b, (l, head, _) in enumerate(inputs):
                if l == layer:
                    hold[b, 0, :, 0] = True
                    hold[b, 0, head, 0] = False
            if not hold.any():
                return None
            corrupt = state["z_corrupt"][layer].view(1, T, H, dh)
            return (torch.where(hold, corrupt, z.view(n, T, H, dh)).view(n, T, H * dh),) + tuple(args[1:])
        return hook

    def final(mod, args):
        if "leaves" not in state:
            return None
        x = args[0]
        return (torch.cat([x[:1] + state["final_leaf"], x[1:]]),) + tuple(args[1:])

    handles = [b.register_forward_pre_hook(save_x, with_kwargs=True) for b in bl]
    handles += [m.register_forward_pre_hook(keep_receiver(l)) for l, m in enumerate(site.modules)]
    for b in bl:
        for path in set(spec.qkv):
            handles.append(get_submodule(b, path).register_forward_hook(channel))
    handles.append(get_submodule(model, spec.final_norm).register_forward_pre_hook(final))
    try:
        with eval_mode(model):
            for i, pair in enumerate(pairs):
                clean_diff, corrupt_diff, correct, z_clean, z_corrupt = clean_and_corrupt_z(model, calls, site, pair)
                pre.append((clean_diff, corrupt_diff, correct))
                rows, unchanged = example_edge_rows(edges, pair, firsts[i], n_columns)
                for e, _ in unchanged:
                    patched[e, i] = corrupt_diff
                if not rows:
                    continue
                T = len(pair.clean_ids)
                ids = torch.as_tensor(list(pair.corrupt_ids), device=device).unsqueeze(0).expand(n, T)
                dtype = z_corrupt.dtype
                leaves = [torch.zeros(T, geo.d_model, device=device, dtype=dtype, requires_grad=True)
                          for _ in range(n)]
                final_leaf = torch.zeros(T, geo.d_model, device=device, dtype=dtype, requires_grad=True)
                state.clear()
                state.update(leaves=leaves, final_leaf=final_leaf, z_corrupt=z_corrupt)
                with torch.enable_grad():
                    try:
                        logits, _ = calls.forward(model, ids)
                    finally:
                        state.clear()
                    metric = (logits[:, pair.clean_token_id] - logits[:, pair.corrupt_token_id]).float().sum()
                    grads = torch.autograd.grad(metric, leaves + [final_leaf], allow_unused=True)
                grads = [torch.zeros_like(leaves[0]) if g is None else g for g in grads]
                deltas = direct_contributions(model, [(edges[e].sender.layer, edges[e].sender.head, t)
                                                       for e, t in rows], (z_clean - z_corrupt).detach(), geo)
                # each edge's gradient: its receiver input's at the sender's position, or the final norm's at the answer
                g = torch.stack(grads)  # [n inputs + 1, T, d_model]
                which = torch.tensor([n if edges[e].receiver is None else row_of[(*edges[e].receiver, edges[e].input)]
                                      for e, _ in rows], device=device)
                where = torch.tensor([T - 1 if edges[e].receiver is None else t for e, t in rows], device=device)
                effect = (deltas.float() * g[which, where].float()).sum(-1).double().cpu()
                patched[[e for e, _ in rows], i] = corrupt_diff + effect
    finally:
        state.clear()
        for h in handles:
            h.remove()
    return edge_scores(edges, patched, pre, keep_incorrect, min_denominator)
