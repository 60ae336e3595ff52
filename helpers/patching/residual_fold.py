"""The decoder block's residual additions as the output projections' own matmul epilogue.

``x + o_proj(z)`` and ``mid + down(act)`` as one ``addmm`` each (cuBLAS reads the residual as its C operand and
rounds once), instead of a matmul that writes its product and an addition kernel that reads it back: two kernels
and two passes over [rows, d_model] a layer fewer. Only where nothing reads the bare attention / MLP output
(``output_hooked``); the fused block (helpers.patching.fused_modules) decides, and passes the residual down.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F


def plus_residual(y: torch.Tensor, residual: torch.Tensor | None, out: torch.Tensor | None = None) -> torch.Tensor:
    """``residual + y`` (broadcast), into ``out`` if given; ``y`` itself when there is no residual."""
    if residual is None:
        return y
    return torch.add(residual, y) if out is None else torch.add(residual, y, out=out)


def linear_plus_residual(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         residual: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """``residual + F.linear(x, weight, bias)``: x [..., d_in], residual [..., d_out] (broadcastable), into ``out``
    if given. Where residual has x's leading shape and there is no bias, the addition is the matmul's own epilogue
    (``addmm``: cuBLAS reads the residual as its C operand and rounds once), so neither the product nor a separate
    addition kernel touches memory; otherwise the plain two steps (the last layer's answer-only rows broadcast)."""
    if residual is None:
        return F.linear(x, weight, bias)
    if bias is None and residual.shape[:-1] == x.shape[:-1] and residual.is_contiguous() and x.dtype == residual.dtype:
        d_out = residual.shape[-1]
        flat = x.reshape(-1, x.shape[-1])
        if out is None:
            return torch.addmm(residual.view(-1, d_out), flat, weight.t()).view(residual.shape)
        torch.addmm(residual.view(-1, d_out), flat, weight.t(), out=out.view(-1, d_out))
        return out
    return plus_residual(F.linear(x, weight, bias), residual, out)


def out_projection_forward(o_proj: torch.nn.Linear) -> Callable:
    """The swapped attention output projection: ``F.linear`` as before, or with ``residual`` (passed by the fused
    attention when the fused block folds its residual addition in) ``residual + o_proj(z)`` in one ``addmm``.
    Its pre-hooks (where heads are patched) still see and edit z."""
    def forward(x, residual=None):
        return linear_plus_residual(x, o_proj.weight, o_proj.bias, residual)
    return forward


def output_hooked(*modules) -> bool:
    """Does anything read or replace these modules' outputs (forward hooks, global ones included)? Then their
    output must stay the bare attention / MLP output, with no residual folded in."""
    return bool(torch.nn.modules.module._global_forward_hooks) or any(m._forward_hooks for m in modules)
