"""Same formulas, fewer GPU kernels: swap-ins for the elementwise-heavy parts of llama-like models during a sweep.

A patching sweep's forwards are huge batches (thousands of patch rows x tens of positions), and there the HF eager
modules' elementwise work moves more bytes than the matmuls take time: RMSNorm upcasts in ~7 kernels, rotary's
``rotate_half`` in ~6, ``repeat_kv`` copies every key and value head group times, the additive mask and fp32
softmax take 4 more, and ``silu(gate) * up`` 2. ``fused_modules(model)`` swaps, only while inside:

- every ``*RMSNorm`` module's forward       -> ``rms_norm``   (normalise in fp32, cast back, times weight)
- every gated SiLU MLP's forward            -> ``gated_mlp``  (``down(silu(gate(x)) * up(x))``)
- the modeling module's ``apply_rotary_pos_emb`` -> ``rotary``
- its ``eager_attention_forward``           -> ``grouped_query_attention`` (query heads grouped by key/value head,
  so keys and values are never repeated; same additive mask, fp32 softmax, cast back), or, for a caller whose
  forwards are all causal without padding (the sweep) and a half-precision CUDA model, ``causal_flash_attention``

Each replacement is a plain torch function with the HF module's own formula (in float32 they agree to rounding,
tested on tiny models of every llama-like family). With ``compile=True`` (the default on CUDA) each is wrapped in
``torch.compile(dynamic=True)``, so inductor fuses its elementwise work into one or two kernels; matmuls stay
cuBLAS calls. If compilation fails (no Triton, say) the plain function is used, with one warning. Modules this
file does not recognise, and families outside ``FUSABLE_FAMILIES`` (gpt_neo, gpt2: their LayerNorm is already one
kernel), are left alone. Hooks on the swapped modules still run: only ``forward`` is replaced.
"""
from __future__ import annotations

import sys
import warnings
from contextlib import contextmanager
from typing import Callable

import torch
import torch.nn.functional as F

from helpers.architectures import blocks, family_spec, get_submodule

FUSABLE_FAMILIES = frozenset({"llama", "qwen2", "granite", "granitemoe"})
_SILU = frozenset({"silu", "swish"})


# ----------------------------------------------------------------------------------------------------------------
# The formulas (each the HF eager module's own, written as one function inductor can fuse)
# ----------------------------------------------------------------------------------------------------------------

def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: [..., d_model]. HF's LlamaRMSNorm: normalise in float32, cast back to x's dtype, then times weight."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def gated_mlp(x: torch.Tensor, w_gate, b_gate, w_up, b_up, w_down, b_down) -> torch.Tensor:
    """x: [..., d_model] -> [..., d_model]: ``down(silu(gate(x)) * up(x))`` (LlamaMLP with a SiLU activation)."""
    return F.linear(F.silu(F.linear(x, w_gate, b_gate)) * F.linear(x, w_up, b_up), w_down, b_down)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1):
    """q: [batch, head, pos, d_head], k: [batch, kv_head, pos, d_head]; cos, sin: [batch, pos, d_head].

    HF's q and k are ``[batch, pos, head, d_head]`` projections viewed head-major; computing in that memory order
    (and returning head-major views of it) keeps the kernel's reads and writes coalesced, and is the layout
    flash attention reads natively.
    """
    if unsqueeze_dim != 1:
        cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
    q, k = q.transpose(1, 2), k.transpose(1, 2)  # [batch, pos, head, d_head]
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    q_out = (q * cos + _rotate_half(q) * sin).transpose(1, 2)
    k_out = (k * cos + _rotate_half(k) * sin).transpose(1, 2)
    return q_out, k_out


def grouped_query_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            mask: torch.Tensor | None, scaling: float) -> torch.Tensor:
    """Eager attention without ``repeat_kv``.

    query: [batch, head, q, d_head]; key, value: [batch, kv_head, kv, d_head]; mask: additive, broadcastable to
    [batch, 1, q, kv] (or None). Returns z: [batch, q, head, d_head] (contiguous), as HF's eager attention.
    Query head h uses key/value head ``h // group`` (``repeat_kv``'s order), so the query heads of one group are
    stacked along the query axis and attend to their shared keys in one matmul.
    """
    b, n_heads, q_len, d_head = query.shape
    n_kv, kv_len = key.shape[1], key.shape[2]
    group = n_heads // n_kv
    scores = torch.matmul(query.reshape(b, n_kv, group * q_len, d_head), key.transpose(2, 3)) * scaling
    scores = scores.view(b, n_kv, group, q_len, kv_len)
    if mask is not None:
        scores = scores + mask[..., :kv_len].unsqueeze(2)  # [B, 1, q, kv] -> [B, 1, 1, q, kv]
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    z = torch.matmul(probs.view(b, n_kv, group * q_len, kv_len), value)  # [b, kv_head, group * q, d_head]
    return z.view(b, n_heads, q_len, d_head).transpose(1, 2).contiguous()


def causal_flash_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float):
    """Flash attention, causal, aligned to the *last* positions: the q queries are positions kv-q .. kv-1.

    query: [batch, head, q, d_head]; key, value: [batch, kv_head, kv, d_head] (grouped heads read natively, no
    copies); CUDA, fp16/bf16 only. Returns z: [batch, q, head, d_head]. The aten flash op's ``is_causal`` is
    lower-right aligned (``torch.nn.attention.bias.causal_lower_right`` dispatches to it the same way), which is
    the mask HF builds for a forward that continues a KV cache with no padding.
    """
    out = torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, 0.0, is_causal=True,
                                                             scale=scaling)[0]
    return out.transpose(1, 2).contiguous()


def _flash_applies(module, query: torch.Tensor) -> bool:
    return (query.is_cuda and query.dtype in (torch.float16, torch.bfloat16) and query.shape[-1] <= 256
            and query.shape[-1] % 8 == 0 and getattr(module, "sliding_window", None) is None
            and not module.training)


# ----------------------------------------------------------------------------------------------------------------
# Compilation with a safe fallback
# ----------------------------------------------------------------------------------------------------------------

_COMPILED: dict[Callable, Callable] = {}
_BROKEN: set[Callable] = set()


def _maybe_compiled(fn: Callable, compile: bool) -> Callable:
    """``fn`` compiled (dynamic shapes, cached per function) when asked; the plain ``fn`` if that fails."""
    if not compile or fn in _BROKEN:
        return fn
    if fn not in _COMPILED:
        # one function meets several dtypes, batch-1 and batched calls and models: allow the recompiles
        config = torch._dynamo.config
        for name in ("recompile_limit", "cache_size_limit"):
            if getattr(config, name, 64) < 64:
                setattr(config, name, 64)
        _COMPILED[fn] = torch.compile(fn, dynamic=True)
    compiled = _COMPILED[fn]

    def call(*args, **kwargs):
        if fn in _BROKEN:
            return fn(*args, **kwargs)
        try:
            return compiled(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - a missing compiler must cost speed, not the sweep
            _BROKEN.add(fn)
            warnings.warn(f"torch.compile of {fn.__name__} failed ({type(exc).__name__}: {str(exc)[:200]}); "
                          "using the plain torch version", RuntimeWarning, stacklevel=2)
            return fn(*args, **kwargs)
    return call


# ----------------------------------------------------------------------------------------------------------------
# The swap
# ----------------------------------------------------------------------------------------------------------------

def is_fusable(model) -> bool:
    return getattr(model.config, "model_type", None) in FUSABLE_FAMILIES


def _is_rms_norm(module) -> bool:
    return (type(module).__name__.endswith("RMSNorm") and isinstance(getattr(module, "weight", None), torch.Tensor)
            and isinstance(getattr(module, "variance_epsilon", None), float))


def _is_gated_silu_mlp(module, config) -> bool:
    return (all(isinstance(getattr(module, n, None), torch.nn.Linear) for n in ("gate_proj", "up_proj", "down_proj"))
            and getattr(config, "hidden_act", None) in _SILU)


@contextmanager
def fused_modules(model, *, compile: bool | None = None, causal_flash: bool = False):
    """Swap the fused formulas into ``model`` (a HF ``*ForCausalLM``) while inside; restored on exit, even on error.

    ``compile``: wrap them in ``torch.compile`` (None: only when the model is on CUDA). ``causal_flash``: the
    caller promises every forward inside is causal with no padding and no attention mask of its own (the patching
    sweep's forwards are), so fp16/bf16 attention on CUDA may use ``causal_flash_attention`` and ignore HF's mask
    tensor (sliding-window layers keep the masked path). Yields the list of what was swapped
    (``"rms_norm x49"``, ...), empty for families outside ``FUSABLE_FAMILIES``.
    """
    if not is_fusable(model):
        yield []
        return
    if compile is None:
        compile = next(model.parameters()).device.type == "cuda"
    norm_fn = _maybe_compiled(rms_norm, compile)
    mlp_fn = _maybe_compiled(gated_mlp, compile)
    rotary_fn = _maybe_compiled(rotary, compile)
    attention_fn = _maybe_compiled(grouped_query_attention, compile)

    swapped_forwards: list[tuple[torch.nn.Module, object]] = []  # (module, its own instance forward or None)
    counts = {"rms_norm": 0, "gated_mlp": 0}
    spec = family_spec(model.config)

    def swap_forward(module, forward):
        # an instance-level forward (nnsight installs one) is put back on exit; while inside, ours runs
        swapped_forwards.append((module, module.__dict__.get("forward")))
        module.forward = forward

    restore_globals: list[tuple[object, str, object]] = []
    try:
        for module in model.modules():
            if _is_rms_norm(module):
                swap_forward(module, lambda x, _m=module: norm_fn(x, _m.weight, _m.variance_epsilon))
                counts["rms_norm"] += 1
        for block in blocks(model):
            mlp = get_submodule(block, spec.mlp)
            if _is_gated_silu_mlp(mlp, model.config):
                swap_forward(mlp, lambda x, _m=mlp: mlp_fn(
                    x, _m.gate_proj.weight, _m.gate_proj.bias, _m.up_proj.weight, _m.up_proj.bias,
                    _m.down_proj.weight, _m.down_proj.bias))
                counts["gated_mlp"] += 1
        attention = get_submodule(blocks(model)[0], spec.attention)
        modeling = sys.modules[type(attention).__module__]

        def eager_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
            if scaling is None:
                scaling = module.scaling
            if causal_flash and _flash_applies(module, query):
                return causal_flash_attention(query, key, value, scaling), None
            return attention_fn(query, key, value, attention_mask, scaling), None

        globals_wanted = {"apply_rotary_pos_emb": rotary_fn, "eager_attention_forward": eager_attention}
        for name, fn in globals_wanted.items():
            if callable(getattr(modeling, name, None)):
                restore_globals.append((modeling, name, getattr(modeling, name)))
                setattr(modeling, name, fn)
        swapped = [f"{k} x{v}" for k, v in counts.items() if v]
        swapped += [name for _, name, _ in restore_globals]
        if causal_flash and "eager_attention_forward" in swapped:
            swapped.append("causal_flash_attention (CUDA fp16/bf16)")
        yield swapped
    finally:
        for module, own in reversed(swapped_forwards):
            if own is None:
                del module.forward
            else:
                module.forward = own
        for owner, name, old in reversed(restore_globals):
            setattr(owner, name, old)
