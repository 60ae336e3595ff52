"""The sweep's hooks: rows joining at their layer (block pre-hooks), patches at the site, head patches computed
aside (``block_tail``), and the last layer restricted to the answer position."""
from __future__ import annotations

from contextlib import contextmanager

import torch

from helpers.models.architectures import blocks, family_spec, get_submodule, out_proj_modules
from helpers.patching.model_calls import first_tensor, replace_first
from helpers.patching.plan import RowPlan
from helpers.patching.sites import Site, apply_patch


# sites whose last layer runs out_proj and MLP at the answer position only (see sweep_hooks)
ANSWER_ONLY_LAST_LAYER = ("heads", "residual")


def block_tail(model, layer: int, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Block ``layer``'s output at one position from its input ``x`` and its out_proj input ``z`` ([n, 1, *]).

    The residual wiring every supported family shares: ``mid = x + attn_out * m``, ``out = mid + mlp(norm2(mid))
    * m`` (``m``: granite's ``residual_multiplier``, else none), ``attn_out = out_proj(z)`` (dropout is off).
    Modules are called through ``.forward`` so that the sweep's hooks do not fire on these side computations.
    """
    spec = family_spec(model.config)
    block = blocks(model)[layer]
    m = getattr(block, "residual_multiplier", None)
    attn = get_submodule(block, spec.out_proj).forward(z)
    mid = x + (attn if m is None else attn * m)
    ff = get_submodule(block, spec.mlp).forward(get_submodule(block, spec.post_attention_norm).forward(mid))
    return mid + (ff if m is None else ff * m)


def tail_values(model, site: Site, layer: int, x0: torch.Tensor, z0: torch.Tensor, base_flat: torch.Tensor,
                head_flat: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """Block ``layer``'s output [n, d_model] at one position of each of n rows, each a copy of an unpatched row with
    one head's z set to its clean value: ``x0`` [n_base, q, d_model] and ``z0`` [n_base, q, U * w] the unpatched
    rows' block input and out_proj input; ``base_flat`` [n] each row's (unpatched row, position) in them viewed
    [n_base * q, *], ``head_flat`` [n] its head among the rows' z viewed [n * U, w], ``clean`` [n, w] the value."""
    z = z0.reshape(-1, z0.shape[-1]).index_select(0, base_flat)
    z.view(-1, site.unit_width).index_copy_(0, head_flat, clean.to(z.dtype))
    x = x0.reshape(-1, x0.shape[-1]).index_select(0, base_flat)
    return block_tail(model, layer, x.unsqueeze(1), z.unsqueeze(1))[:, 0]


def computed_rows(model, site: Site, plan: RowPlan, join: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(out_flat: the rows' places in block ``join``'s input viewed [batch * q, d_model], block ``join - 1``'s
    output there [n, d_model]) of the rows joining at ``join``: looked up in the group's block tails
    (helpers.patching.block_tails) where it has them, else computed from this forward's unpatched rows."""
    rows = plan.computed[join]
    if plan.tails is not None:
        return rows.out_flat, plan.tails.lookup(rows.tails_flat)
    # the base rows' [n_base, q, d_model] and [n_base, q, H * d_head], as [n_base * q, *]: one index_select each
    x0, z0 = plan.stash.pop(("x", join - 1)), plan.stash.pop(("z", join - 1))
    return rows.out_flat, tail_values(model, site, join - 1, x0, z0, rows.base_flat, rows.head_flat, rows.clean)


@contextmanager
def sweep_hooks(model, site: Site, state: dict):
    """Growth pre-hooks on every block and patch hooks at ``site``; inactive while ``state['plan']`` is None."""
    handles = []
    for layer, block in enumerate(blocks(model)):
        def grow(mod, args, kwargs, _layer=layer):
            plan = state.get("plan")
            if plan is None or (plan.n_new[_layer] == 0 and not plan.stashes(_layer) and not plan.fills(_layer)
                                and plan.n_base == 1):
                return None
            hidden = first_tensor(args, kwargs, "hidden_states")
            if plan.fills(_layer):  # the group's first forward: every row's tail of the block before
                x0, z0 = plan.stash.pop(("x", _layer - 1)), plan.stash.pop(("z", _layer - 1))
                plan.tails.fill(_layer - 1, x0, z0, lambda *a: tail_values(model, site, *a))
            if plan.stashes(_layer):
                plan.stash[("x", _layer)] = hidden[:plan.n_base]
            if plan.n_new[_layer]:
                if hidden.shape[0] != plan.batch[_layer]:  # (unless a fused block appended them: FusedSwap.extra_rows)
                    src = plan.joining(_layer)
                    new = (hidden[:1].expand(src, *hidden.shape[1:]) if isinstance(src, int)
                           else hidden.index_select(0, src))
                    hidden = torch.cat([hidden, new], dim=0)
                if site.where == "block" and _layer in plan.patches:
                    hidden = apply_patch(hidden, site, plan.patches[_layer])
                if _layer in plan.computed:
                    if hidden.shape[1] != plan.q:  # (the flat indices were made for q fed tokens)
                        raise RuntimeError(f"block {_layer} got {hidden.shape[1]} tokens, the plan {plan.q}")
                    out_flat, values = computed_rows(model, site, plan, _layer)
                    if not hidden.is_contiguous():
                        hidden = hidden.contiguous()
                    hidden.view(-1, hidden.shape[-1]).index_copy_(0, out_flat, values.to(hidden.dtype))
            if plan.n_base > 1:
                args, kwargs = plan.per_row(args, kwargs, _layer)
            return replace_first(args, kwargs, hidden, "hidden_states")
        handles.append(block.register_forward_pre_hook(grow, with_kwargs=True))
    if site.where in ("pre", "post"):
        for layer, module in enumerate(site.modules):
            if site.where == "pre":
                def pre(mod, args, kwargs, _layer=layer):
                    plan = state.get("plan")
                    if plan is None:
                        return None
                    if plan.stashes(_layer):
                        plan.stash[("z", _layer)] = first_tensor(args, kwargs)[:plan.n_base]
                    if _layer not in plan.patches:
                        return None
                    x = first_tensor(args, kwargs)
                    return replace_first(args, kwargs, apply_patch(x, site, plan.patches[_layer]))
                handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
            else:
                def post(mod, args, output, _layer=layer):
                    plan = state.get("plan")
                    if plan is None or _layer not in plan.patches:
                        return None
                    if isinstance(output, torch.Tensor):
                        return apply_patch(output, site, plan.patches[_layer])
                    patched = apply_patch(output[0], site, plan.patches[_layer])
                    return (patched,) + tuple(output[1:]) if isinstance(output, tuple) else output
                handles.append(module.register_forward_hook(post))
    if site.kind in ANSWER_ONLY_LAST_LAYER:
        # Only the last (answer) position of the last layer reaches the metric, so there the attention output
        # projection and the MLP see that position alone (registered after the patch hooks: a head patch is
        # applied first). The block's residual additions broadcast the [batch, 1, d] outputs over positions;
        # positions other than the last are wrong from then on, and never read. Keys and values of the last
        # layer still come from every position.
        last = len(site.modules) - 1
        spec = family_spec(model.config)

        def keep_last(mod, args, kwargs):
            if state.get("plan") is None:
                return None
            x = first_tensor(args, kwargs, "hidden_states")
            # contiguous: a strided [batch, 1, d] view sends compiled linears to a batched matmul per row
            return replace_first(args, kwargs, x[:, -1:].contiguous(), "hidden_states")
        for module in (out_proj_modules(model)[last], get_submodule(blocks(model)[last], spec.mlp)):
            handles.append(module.register_forward_pre_hook(keep_last, with_kwargs=True))
    try:
        yield
    finally:
        state["plan"] = None
        for h in handles:
            h.remove()
