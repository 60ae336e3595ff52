"""Patch sites: where "layer l" of a sweep reads and writes its activation (see ``SITES``), through the
per-family module table (helpers.models.architectures)."""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from helpers.models.architectures import blocks, family_spec, get_submodule, head_geometry, out_proj_modules
from helpers.patching.model_calls import first_tensor


SITES = ("heads", "residual", "attention_output", "mlp_output")


@dataclass
class Site:
    kind: str
    modules: list  # one per layer
    where: str  # "pre" (module input), "post" (module output), "block" (block input, patched in the growth hook)
    n_units: int
    unit_width: int


def site_of(model, kind: str) -> Site:
    spec = family_spec(model.config)
    geo = head_geometry(model.config)
    bl = blocks(model)
    if kind == "heads":
        return Site(kind, out_proj_modules(model), "pre", geo.n_heads, geo.d_head)
    if kind == "residual":
        return Site(kind, bl, "block", 1, geo.d_model)
    if kind == "attention_output":
        return Site(kind, [get_submodule(b, spec.attention) for b in bl], "post", 1, geo.d_model)
    if kind == "mlp_output":
        return Site(kind, [get_submodule(b, spec.mlp) for b in bl], "post", 1, geo.d_model)
    raise ValueError(f"unknown site {kind!r}; known: {SITES}")


def read_site(site: Site, args, kwargs, output) -> torch.Tensor:
    """The activation tensor at ``site`` ([batch, pos, n_units * unit_width]) from a hook's arguments."""
    if site.where == "post":
        return output if isinstance(output, torch.Tensor) else output[0]
    return first_tensor(args, kwargs, "hidden_states")


@contextmanager
def capture_site(site: Site, store: dict):
    """Hooks saving ``store[layer] = activation`` ([batch, pos, width], detached) at every layer of ``site``."""
    handles = []
    for layer, module in enumerate(site.modules):
        def hook(mod, args, kwargs, output=None, _layer=layer):
            store[_layer] = read_site(site, args, kwargs, output).detach()
        if site.where == "post":
            handles.append(module.register_forward_hook(hook, with_kwargs=True))
        else:
            handles.append(module.register_forward_pre_hook(
                lambda mod, args, kwargs, _h=hook: _h(mod, args, kwargs), with_kwargs=True))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


def apply_patch(x: torch.Tensor, site: Site, patch) -> torch.Tensor:
    """``x`` [batch, pos, units * width] with ``values`` [n, width] written at (batch_idx, rel_pos, unit) [n] each;
    ``patch``: those four, or a ``plan.Patch``, whose flat index (for ``x.shape[1] == q``) makes it one
    ``index_copy_`` instead of an advanced-index assignment (fewer kernels and less host time a layer)."""
    batch_idx, rel_pos, unit, values = patch[:4]
    flat, q = getattr(patch, "flat", None), getattr(patch, "q", None)
    if not x.is_contiguous():
        x = x.contiguous()
    if flat is not None and x.shape[1] == q:
        x.view(-1, site.unit_width).index_copy_(0, flat, values.to(x.dtype))
        return x
    x.view(x.shape[0], x.shape[1], site.n_units, site.unit_width)[batch_idx, rel_pos, unit] = values
    return x
