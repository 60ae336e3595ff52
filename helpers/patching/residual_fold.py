"""The decoder block's residual additions as the output projections' own matmul epilogue.

``mid = x + o_proj(z)`` as one ``addmm`` (cuBLAS reads x as its C operand and rounds once), and ``mid + down(act)``
as an in-place ``mid.addmm_`` (the block owns ``mid``): no product written and read back by a separate addition
kernel, two kernels a layer fewer. Only where nothing reads the bare attention / MLP output, nor ``mid`` itself,
which the MLP's fold overwrites (``hooked``); the fused block (helpers.patching.fused_modules) decides, and passes
the residual down.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.view(-1, t.shape[-1])


def _epilogue_applies(x: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor) -> bool:
    # (a bias would need a third operand; the last layer's answer-only rows broadcast against the residual)
    return (bias is None and residual.shape[:-1] == x.shape[:-1] and residual.is_contiguous()
            and x.dtype == residual.dtype)


def linear_plus_residual(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         residual: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """``residual + F.linear(x, weight, bias)`` (x [..., d_in], residual [..., d_out], broadcastable), into ``out``
    if given (a contiguous [..., d_out] that is not residual); one ``addmm`` where ``_epilogue_applies``."""
    if residual is None:
        return F.linear(x, weight, bias)
    if _epilogue_applies(x, bias, residual):
        flat = torch.addmm(_flat(residual), x.reshape(-1, x.shape[-1]), weight.t(),
                           **({} if out is None else {"out": _flat(out)}))
        return flat.view(residual.shape) if out is None else out
    y = F.linear(x, weight, bias)
    return torch.add(residual, y) if out is None else torch.add(residual, y, out=out)


def add_linear_(residual: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
    """``residual += F.linear(x, weight, bias)`` in place (``addmm_`` where ``_epilogue_applies``, else a
    broadcasting ``add_``); returns ``residual``. No autograd: the caller owns ``residual`` and holds no graph."""
    if _epilogue_applies(x, bias, residual):
        _flat(residual).addmm_(x.reshape(-1, x.shape[-1]), weight.t())
        return residual
    return residual.add_(F.linear(x, weight, bias))


def out_projection_forward(o_proj: torch.nn.Linear) -> Callable:
    """The swapped attention output projection: ``F.linear`` as before, or with ``residual`` (passed down by the
    fused block through the fused attention) ``residual + o_proj(z)`` in one ``addmm``, into ``out`` if given.
    Its pre-hooks (where heads are patched) still see and edit z."""
    def forward(x, residual=None, out=None):
        return linear_plus_residual(x, o_proj.weight, o_proj.bias, residual, out)
    return forward


def hooked(*modules, inputs: bool = False) -> bool:
    """Does anything read or replace these modules' outputs (forward hooks, global ones included), or with
    ``inputs`` also see their inputs (pre-hooks)? Then a fold must not change what they see."""
    g = torch.nn.modules.module
    if g._global_forward_hooks or (inputs and g._global_forward_pre_hooks):
        return True
    return any(m._forward_hooks or (inputs and m._forward_pre_hooks) for m in modules)
