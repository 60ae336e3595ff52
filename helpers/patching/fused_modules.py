"""Same formulas, fewer GPU kernels: swap-ins for llama-like models while a patching sweep runs.

A sweep's forwards are huge batches (thousands of patch rows x tens of positions) of a model whose HF eager modules
launch many small kernels: RMSNorm upcasts in ~7, rotary's ``rotate_half`` in ~6, ``repeat_kv`` copies every key
and value head group times, and the KV cache concatenates the shared prefix into every row. ``fused_modules(model)``
replaces, only while inside, the ``forward`` of

- every ``*RMSNorm``           -> ``rms_norm``   (``F.rms_norm``: one kernel, float32 inside)
- every gated SiLU MLP         -> ``gated_mlp``  (``down(silu(gate(x)) * up(x))``, gate and up as one matmul)
- every (full-attention) llama-like attention -> ``q, k, v`` as one matmul with rotary (``qkv_rotary``), then
  attention without ``repeat_kv`` (``grouped_query_attention``: same additive mask, fp32 softmax, cast back), then
  the module's own ``o_proj`` (so hooks there still fire: it is where heads are patched).
- every llama-like decoder block around them -> the same residual formula, its submodules called as modules, and
  room in its output for the rows a sweep adds at the next block (``FusedSwap.extra_rows``).

For a caller whose forwards are all causal without padding (the sweep: ``causal_flash=True``), fp16/bf16 attention
on CUDA uses the aten flash kernel instead, and a forward may replace the KV cache by a **shared prefix**
(``FusedSwap.shared_prefix``): the keys and values of the positions before the fed tokens, batch 1, shared by every
row, so the prefix is never copied per row. Short rows (every sweep bucket) attend to it and to their own tokens in
one Triton kernel with one softmax (``triton_kernels.row_attention``, which also takes one prefix per example);
longer rows attend to it in *one* flash call (rows folded into the query axis) and to their own tokens in a causal
one, the two merged exactly by their log-sum-exps (``merge_attention``).

In float32 every replacement agrees with the HF modules to rounding (tested on tiny models of every llama-like
family). On CUDA, rotary, the MLP's ``silu(gate) * up``, the short rows' attention and the longer rows' prefix
merge run as hand-written Triton kernels (helpers.patching.triton_kernels; inductor's dynamic-shape versions were slower,
rotary and the merge ten times); matmuls stay cuBLAS calls, but for the MLP's gate/up matmul on GPUs with TMA
(Hopper), a Triton kernel with ``silu(gate) * up`` as its epilogue (helpers.patching.matmul_epilogues; bit for bit
the pair it replaces, as measured on an H100). On CUDA without Triton (``compiles_by_default``), and with
``compile=True``, the plain formulas are ``torch.compile(dynamic=True)``'d (the MLP only for inputs of at least
``_COMPILE_MIN_NUMEL`` elements: below that a compiled call's host cost exceeds its saving); if compilation fails
the plain function is used, with one warning.
Sliding-window attention layers, modules this file does not recognise, and families outside ``FUSABLE_FAMILIES``
(gpt_neo, gpt2: their LayerNorm is already one kernel) keep their own forward, except GPT-Neo's attention, which
reads a shared prefix in place (helpers.patching.fused_gpt_neo: the Triton row kernel, or HF's formula on the
concatenated keys; its q/k/v projections then run as one matmul, without their hooks) and otherwise runs its own
forward. Hooks on swapped modules still run:
only ``forward`` is replaced. The fused q/k/v and gate/up weights are concatenated, detached copies, held while
inside (for Llama-3.2-1B in bf16, 1.3 GB); with gradients enabled the attention and MLP run their own forwards.
"""
from __future__ import annotations

import functools
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from helpers.patching import matmul_epilogues, triton_kernels
from helpers.patching.fused_gpt_neo import attention_window, gpt_neo_attention_forward, is_gpt_neo_attention
from helpers.patching.stacked_weights import stacked_linears
from helpers.models.architectures import blocks, family_spec, get_submodule, head_geometry

FUSABLE_FAMILIES = frozenset({"llama", "qwen2", "granite", "granitemoe"})
# families whose every attention can read a shared prefix in place (FusedSwap.shares_prefix under causal_flash)
SHARED_PREFIX_FAMILIES = FUSABLE_FAMILIES | {"gpt_neo"}
_SILU = frozenset({"silu", "swish"})


# ----------------------------------------------------------------------------------------------------------------
# The formulas (each the HF eager module's own, written as one function inductor can fuse)
# ----------------------------------------------------------------------------------------------------------------

def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: [..., d_model]. HF's LlamaRMSNorm: normalise in float32, cast back to x's dtype, then times weight.

    Where x and weight share a dtype, torch's own ``F.rms_norm`` (one fused kernel on CUDA, float32 inside; in
    float32 the same formula) computes it; HF's extra rounding before the weight is the only difference. (float64:
    HF's formula, whose float32 inside F.rms_norm would not share.)"""
    if x.dtype == weight.dtype and x.dtype != torch.float64 and hasattr(F, "rms_norm"):
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def gated_mlp(x: torch.Tensor, w_gate_up, b_gate_up, w_down, b_down) -> torch.Tensor:
    """x: [..., d_model] -> [..., d_model]: ``down(silu(gate(x)) * up(x))``; ``w_gate_up`` is [gate; up] stacked."""
    gate, up = F.linear(x, w_gate_up, b_gate_up).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, w_down, b_down)


def _gated_mlp_forward(mlp, w_gate_up, b_gate_up, mlp_fn: Callable, interleaved: bool = False) -> Callable:
    """The swapped MLP forward: on CUDA where the GPU has TMA, ``silu(gate) * up`` as the gate/up matmul's epilogue
    (``interleaved``: ``w_gate_up`` is ``matmul_epilogues.interleave_gate_up``'s), elsewhere on CUDA Triton's
    ``silu_mul`` between two cuBLAS matmuls; else ``mlp_fn`` (compiled) for large inputs and the plain formula for
    small ones. With gradients on, the module's own forward (the fused weights are detached copies)."""
    down = mlp.down_proj
    original = mlp.forward

    def forward(x):
        if torch.is_grad_enabled() or (interleaved and not matmul_epilogues.applies(x, w_gate_up)):
            return original(x)  # (interleaved: x of another dtype or device than the weights, under autocast say)
        if interleaved:
            return F.linear(matmul_epilogues.linear_silu_mul(x, w_gate_up), down.weight, down.bias)
        if triton_kernels.usable(x):
            return F.linear(triton_kernels.silu_mul(F.linear(x, w_gate_up, b_gate_up)), down.weight, down.bias)
        fn = mlp_fn if x.numel() >= _COMPILE_MIN_NUMEL else gated_mlp
        return fn(x, w_gate_up, b_gate_up, down.weight, down.bias)
    return forward


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def qkv_rotary(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, cos: torch.Tensor,
               sin: torch.Tensor, n_heads: int, n_kv_heads: int, d_head: int):
    """x: [batch, q, d_model] -> query [batch, q, head, d_head], key and value [batch, q, kv_head, d_head].

    ``weight``/``bias``: q_proj, k_proj, v_proj stacked; cos, sin: [batch or 1, q, d_head] (HF's rotary embedding).
    Rotary is HF's ``apply_rotary_pos_emb`` (``x * cos + rotate_half(x) * sin``), applied in the projections'
    own [batch, pos, head, d_head] order, the layout flash attention reads natively. All three are contiguous.
    """
    qkv = F.linear(x, weight, bias).view(*x.shape[:-1], n_heads + 2 * n_kv_heads, d_head)
    q, k, v = qkv.split([n_heads, n_kv_heads, n_kv_heads], dim=-2)
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin, v.contiguous()


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


def _flash(query, key, value, causal: bool, scaling: float):
    """aten flash attention on [batch, head, seq, d_head] views: (out [batch, seq, head, d_head], lse [batch, head, seq])."""
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, 0.0, is_causal=causal,
                                                                  scale=scaling)[:2]
    return out.transpose(1, 2), lse[..., : query.shape[2]]


def causal_flash_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float):
    """Flash attention, causal, aligned to the *last* positions: the q queries are positions kv-q .. kv-1.

    query: [batch, head, q, d_head]; key, value: [batch, kv_head, kv, d_head] (grouped heads read natively, no
    copies); CUDA, fp16/bf16 only. Returns z: [batch, q, head, d_head]. The aten flash op's ``is_causal`` is
    lower-right aligned (``torch.nn.attention.bias.causal_lower_right`` dispatches to it the same way), which is
    the mask HF builds for a forward that continues a KV cache with no padding.
    """
    return _flash(query, key, value, True, scaling)[0].contiguous()


def merge_attention(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor):
    """Attention over keys A and B together, from attention over each: out [..., d_head], lse [...] (natural log).

    softmax over A u B weights each part's output by ``exp(lse_part - lse_all)``; computed in float32, cast back.
    """
    m = torch.maximum(lse_a, lse_b)
    w_a, w_b = torch.exp(lse_a - m).unsqueeze(-1), torch.exp(lse_b - m).unsqueeze(-1)
    z = (out_a.float() * w_a + out_b.float() * w_b) / (w_a + w_b)
    return z.to(out_a.dtype)


def _causal_flash_with_lse(query, key, value, scaling):
    """query [batch, q, head, d], key/value [batch, q, kv_head, d] -> (out [batch, q, head, d], lse [batch, q, head])."""
    out, lse = _flash(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), True, scaling)
    return out, lse.transpose(1, 2)


def shared_prefix_flash_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                  prefix_key: torch.Tensor, prefix_value: torch.Tensor, scaling: float,
                                  merge: Callable = merge_attention) -> torch.Tensor:
    """Causal attention of every row's tokens to one shared prefix, then to their own tokens; CUDA fp16/bf16.

    query: [batch, q, head, d_head], key/value: [batch, q, kv_head, d_head] (the fed tokens, positions s..s+q-1);
    prefix_key/value: [1, kv_head, s, d_head] (positions < s, the same for every row). Returns z: [batch, q, head,
    d_head]. Every prefix key precedes every query, so the prefix part needs no mask and the batch rows fold into
    one long query axis (one efficient flash call, no per-row copy of the prefix); the own-token part is a causal
    flash call. Short rows on CUDA take helpers.patching.triton_kernels.row_attention instead, which does both parts in one
    kernel.
    """
    b, q, n_heads, d_head = query.shape
    folded = query.reshape(1, b * q, n_heads, d_head).transpose(1, 2)  # [1, head, b * q, d_head]
    out_p, lse_p = _flash(folded, prefix_key, prefix_value, False, scaling)
    out_n, lse_n = _causal_flash_with_lse(query, key, value, scaling)
    return merge(out_p.reshape(b, q, n_heads, d_head), lse_p.reshape(n_heads, b, q).permute(1, 2, 0), out_n, lse_n)


def _flash_applies(query: torch.Tensor, d_head: int | None = None) -> bool:
    """Does aten flash attention take ``query`` (CUDA fp16/bf16, head size ``d_head``, else its last dim)?"""
    d_head = query.shape[-1] if d_head is None else d_head
    return (query.is_cuda and query.dtype in (torch.float16, torch.bfloat16) and d_head <= 256
            and d_head % 8 == 0)


def per_example_prefix_applies(like: torch.Tensor, q_len: int, d_head: int) -> bool:
    """Can forwards of ``like``'s device and dtype, feeding up to ``q_len`` tokens, share several examples'
    prefixes (``FusedSwap.shared_prefix`` with ``row_example``)? CUDA fp16/bf16 with Triton, one-tile rows, and the
    head sizes the fused attention takes its flash branch for (``_flash_applies``)."""
    return (_flash_applies(like, d_head) and triton_kernels.usable(like, d_head=d_head)
            and triton_kernels.row_attention_applies(q_len, d_head))


def causal_additive_mask(q_len: int, kv_len: int, dtype: torch.dtype, device) -> torch.Tensor:
    """Eager's additive causal mask [1, 1, q, kv] (0 or the dtype's lowest), lower-right aligned: the q queries are
    the last q of the kv positions."""
    return torch.full((q_len, kv_len), torch.finfo(dtype).min, dtype=dtype, device=device).triu(
        kv_len - q_len + 1)[None, None]


def _additive_mask(mask: torch.Tensor | None, q_len: int, kv_len: int, like: torch.Tensor) -> torch.Tensor:
    """HF's mask in eager's additive form [batch or 1, 1, q, kv]: float as given, bool (sdpa: True = attend)
    converted, None (sdpa's "causal, no padding") built by ``causal_additive_mask``."""
    if mask is None:
        return causal_additive_mask(q_len, kv_len, like.dtype, like.device)
    if mask.dtype == torch.bool:
        return torch.zeros((), dtype=like.dtype, device=like.device).masked_fill(~mask, torch.finfo(like.dtype).min)
    return mask[..., :kv_len]


# ----------------------------------------------------------------------------------------------------------------
# Compilation with a safe fallback
# ----------------------------------------------------------------------------------------------------------------

_COMPILED: dict = {}
# below this many input elements a compiled call's host-side cost (guards, wrappers: ~0.2 ms) exceeds the memory
# traffic it saves, so the plain formula runs (the sweep's one-position side computations, batch-1 prefixes)
_COMPILE_MIN_NUMEL = 1 << 20
_BROKEN: set[Callable] = set()


def _maybe_compiled(fn: Callable, compile: bool, **static) -> Callable:
    """``fn`` (with ``static`` keyword arguments bound) compiled with dynamic shapes when asked, cached per function
    and ``static``; the plain ``fn`` if compiling fails."""
    plain = functools.partial(fn, **static) if static else fn
    if not compile or fn in _BROKEN:
        return plain
    key = (fn, tuple(sorted(static.items())))
    if key not in _COMPILED:
        # one function meets several dtypes, batch-1 and batched calls and models: allow the recompiles
        config = torch._dynamo.config
        for name in ("recompile_limit", "cache_size_limit"):
            if getattr(config, name, 64) < 64:
                setattr(config, name, 64)
        _COMPILED[key] = torch.compile(plain, dynamic=True)
    compiled = _COMPILED[key]

    def call(*args, **kwargs):
        if fn in _BROKEN:
            return plain(*args, **kwargs)
        try:
            return compiled(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - a missing compiler must cost speed, not the sweep
            _BROKEN.add(fn)
            warnings.warn(f"torch.compile of {fn.__name__} failed ({type(exc).__name__}: {str(exc)[:200]}); "
                          "using the plain torch version", RuntimeWarning, stacklevel=2)
            return plain(*args, **kwargs)
    return call


# ----------------------------------------------------------------------------------------------------------------
# The swap
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class FusedSwap:
    """What ``fused_modules`` swapped in, and the channel through which a forward shares a prefix."""

    swapped: list[str] = field(default_factory=list)  # "rms_norm x49", "attention x24", ...
    n_layers: int = 0
    attention_layers: set[int] = field(default_factory=set)  # layer_idx of the attentions running the fused forward
    causal_flash: bool = False
    # per layer (keys, values): [1 or examples, kv_head, s, d_head] of positions < s, after rotary; None: no
    # shared prefix
    prefix: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    # several examples' end-aligned prefixes: each row's example [rows] and each example's first real slot [examples]
    prefix_rows: torch.Tensor | None = None
    prefix_starts: torch.Tensor | None = None
    blocks: set[int] = field(default_factory=set)  # layers whose decoder block runs the fused forward
    # layer -> n or rows [n]: a fused block appends n copies of its output's row 0, or copies of those rows (the
    # sweep's rows joining at the next block), written in place instead of concatenated to the next block's input
    # (which copies every row)
    extra_rows: dict[int, int | torch.Tensor] | None = None
    # called as qkv_edit(layer, qkv) with a fused attention's projection output before rotary, [batch, q, heads +
    # 2 kv_heads, d_head] (q | k | v), to edit in place: where path patching changes one input of a receiver head
    qkv_edit: Callable | None = None
    # the smallest window of a swapped local (sliding-window) attention, which reads several examples' prefixes only
    # where the window covers them (GPT-Neo's local layers); None: no such layer
    window: int | None = None

    def per_example_prefixes_fit(self, length: int) -> bool:
        """Can every swapped attention read several examples' prefixes in forwards of ``length`` slots?"""
        return self.window is None or length <= self.window

    @property
    def shares_prefix(self) -> bool:
        """Can a forward pass no cache and ``shared_prefix`` instead? (Every layer's attention is fused.)"""
        return self.causal_flash and self.n_layers > 0 and len(self.attention_layers) == self.n_layers

    @contextmanager
    def padded(self):
        """While inside, forwards carry padding masks: causal flash (which ignores masks) and shared prefixes off."""
        was, self.causal_flash = self.causal_flash, False
        try:
            yield
        finally:
            self.causal_flash = was

    @contextmanager
    def shared_prefix(self, cache, row_example: torch.Tensor | None = None, starts: torch.Tensor | None = None):
        """While inside, each fused attention attends first to ``cache``'s keys/values (a batch-1 transformers cache
        of the positions before the fed tokens), shared by every row; the forward itself passes no cache.

        Several examples: ``cache`` has one end-aligned prefix per example (batch = examples, example e's keys from
        slot ``starts[e]`` on), ``row_example`` [rows of the last block] says whose each row is; CUDA fp16/bf16 with
        Triton only (``per_example_prefix_applies``), and a local attention layer's window must cover the forward's
        positions (``per_example_prefixes_fit``)."""
        if cache is not None and not self.shares_prefix:
            raise RuntimeError("shared_prefix needs every layer's attention fused and causal_flash=True")
        self.prefix = None if cache is None else [(layer.keys, layer.values) for layer in cache.layers]
        self.prefix_rows, self.prefix_starts = row_example, starts
        try:
            yield
        finally:
            self.prefix = self.prefix_rows = self.prefix_starts = None


def is_fusable(model) -> bool:
    return getattr(model.config, "model_type", None) in FUSABLE_FAMILIES


def _is_rms_norm(module) -> bool:
    return (type(module).__name__.endswith("RMSNorm") and isinstance(getattr(module, "weight", None), torch.Tensor)
            and isinstance(getattr(module, "variance_epsilon", None), float))


def _is_gated_silu_mlp(module, config) -> bool:
    return (all(isinstance(getattr(module, n, None), torch.nn.Linear) for n in ("gate_proj", "up_proj", "down_proj"))
            and getattr(config, "hidden_act", None) in _SILU)


def _is_plain_attention(module) -> bool:
    """A llama-like full attention: q/k/v/o Linear projections, rotary from ``position_embeddings``, no extras."""
    return (all(isinstance(getattr(module, n, None), torch.nn.Linear) for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
            and isinstance(getattr(module, "layer_idx", None), int) and isinstance(getattr(module, "head_dim", None), int)
            and getattr(module, "sliding_window", None) is None
            and not any(hasattr(module, n) for n in ("q_norm", "k_norm")))


def _fused_attention_forward(module, swap: FusedSwap, original: Callable, compile: bool) -> Callable:
    config = module.config
    n_heads, n_kv, d_head = config.num_attention_heads, config.num_key_value_heads, module.head_dim
    weight, bias = stacked_linears([module.q_proj, module.k_proj, module.v_proj])
    qkv = _maybe_compiled(qkv_rotary, compile, n_heads=n_heads, n_kv_heads=n_kv, d_head=d_head)
    attend = _maybe_compiled(grouped_query_attention, compile)
    merge = _maybe_compiled(merge_attention, compile)
    layer = module.layer_idx

    def forward(hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, cache=None,
                **kwargs):
        kv_cache = cache if cache is not None else past_key_values
        # the HF forward where this one's promises fail: gradients (Triton kernels and detached fused weights have
        # none), dropout, masks other than eager's / sdpa's 4D ones (flash-attention-2's 2D padding mask, flex's)
        if (position_embeddings is None or torch.is_grad_enabled()
                or (module.training and getattr(module, "attention_dropout", 0.0))
                or not (attention_mask is None
                        or (isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4))):
            if swap.prefix is not None:  # (HF's forward would drop the prefix: the forward passes no cache)
                raise RuntimeError("a shared-prefix forward runs without gradients and dropout, with rotary tables "
                                   "and a 4D mask or none")
            return original(hidden_states, position_embeddings=position_embeddings, attention_mask=attention_mask,
                            **({"past_key_values": kv_cache} if kv_cache is not None else {}), **kwargs)
        b, q_len, _ = hidden_states.shape
        cos, sin = position_embeddings
        on_triton = triton_kernels.usable(hidden_states, d_head=d_head)
        prefix = None if swap.prefix is None else swap.prefix[layer]
        flash = swap.causal_flash and _flash_applies(hidden_states, d_head)
        # short rows attending to a prefix (every sweep bucket): rotary, prefix and own tokens in one Triton kernel;
        # several examples' prefixes (swap.prefix_rows) only ever come here (per_example_prefix_applies)
        rows_kernel = (prefix is not None and flash and on_triton
                       and triton_kernels.row_attention_applies(q_len, d_head))
        if on_triton:  # q, k, v are views of the one projection output, rotated in place unless rows_kernel does it
            fused = F.linear(hidden_states, weight, bias).view(b, q_len, n_heads + 2 * n_kv, d_head)
            if swap.qkv_edit is not None:
                swap.qkv_edit(layer, fused)
            if not rows_kernel:
                triton_kernels.rotary_inplace(fused, cos, sin, n_heads + n_kv)
            query, key, value = fused.split([n_heads, n_kv, n_kv], dim=2)
        elif swap.qkv_edit is not None:  # (the plain formula, split at the edit)
            fused = F.linear(hidden_states, weight, bias).view(b, q_len, n_heads + 2 * n_kv, d_head)
            swap.qkv_edit(layer, fused)
            query, key, value = fused.split([n_heads, n_kv, n_kv], dim=2)
            c, s_ = cos.unsqueeze(-2), sin.unsqueeze(-2)
            query, key = query * c + _rotate_half(query) * s_, key * c + _rotate_half(key) * s_
            value = value.contiguous()
        else:
            query, key, value = qkv(hidden_states, weight, bias, cos, sin)  # [b, q, (kv_)head, d_head]
        if rows_kernel:
            rows = None if swap.prefix_rows is None else swap.prefix_rows[:b]
            z = triton_kernels.row_attention(query, key, value, *prefix, module.scaling, rows, swap.prefix_starts,
                                             rotary=(cos, sin))
        elif prefix is not None and flash:
            if swap.prefix_rows is not None:
                raise ValueError(f"several examples' prefixes need rows of at most {triton_kernels.ROW_ATTENTION_MAX} "
                                 f"tokens and head size <= 128 on CUDA fp16/bf16 with Triton "
                                 f"(per_example_prefix_applies); got {q_len} tokens, head size {d_head}")
            z = shared_prefix_flash_attention(query, key, value, *prefix, module.scaling,
                                              merge=triton_kernels.merge_attention if on_triton else merge)
        else:
            key, value = key.transpose(1, 2), value.transpose(1, 2)  # [b, kv_head, q, d_head]
            if kv_cache is not None:
                key, value = kv_cache.update(key, value, layer)
            mask = attention_mask
            if prefix is not None:  # (plain math path of the shared prefix: the sweep's promise, no padding)
                key = torch.cat([prefix[0].expand(b, -1, -1, -1), key], dim=2)
                value = torch.cat([prefix[1].expand(b, -1, -1, -1), value], dim=2)
                mask = None
            if flash:
                z = causal_flash_attention(query.transpose(1, 2), key, value, module.scaling)
            else:
                mask = _additive_mask(mask, q_len, key.shape[2], query)
                z = attend(query.transpose(1, 2), key, value, mask, module.scaling)
        return module.o_proj(z.reshape(b, q_len, n_heads * d_head)), None
    return forward


def _fused_block_forward(block, attention, mlp, swap: FusedSwap) -> Callable:
    """The llama-like decoder block, same formula (``mid = x + attn * m``, ``out = mid + mlp(norm2(mid)) * m``,
    ``m``: granite's residual multiplier), with its submodules called as modules (their hooks fire), and room for
    the rows joining at the next block (``FusedSwap.extra_rows``)."""
    m = getattr(block, "residual_multiplier", None)
    layer = attention.layer_idx

    def forward(hidden_states, attention_mask=None, position_ids=None, past_key_values=None, cache=None,
                use_cache=False, position_embeddings=None, **kwargs):
        kv_cache = cache if cache is not None else past_key_values
        attn = attention(hidden_states=block.input_layernorm(hidden_states), attention_mask=attention_mask,
                         position_ids=position_ids, past_key_values=kv_cache, use_cache=use_cache,
                         position_embeddings=position_embeddings, **kwargs)[0]
        mid = hidden_states + (attn if m is None else attn * m)
        ff = mlp(block.post_attention_layernorm(mid))
        if m is not None:
            ff = ff * m
        extra = swap.extra_rows.get(layer) if swap.extra_rows else None
        if extra is None:
            return mid + ff
        b, n = mid.shape[0], extra if isinstance(extra, int) else extra.shape[0]
        out = mid.new_empty((b + n, *mid.shape[1:]))
        torch.add(mid, ff, out=out[:b])
        if isinstance(extra, int):
            out[b:] = out[:1]
        else:
            torch.index_select(out[:b], 0, extra, out=out[b:])
        return out
    return forward


def _is_plain_block(block, attention, mlp) -> bool:
    """A llama-like decoder block returning a tensor (transformers 5), with the submodules the formula names."""
    returns = getattr(type(block).forward, "__annotations__", {}).get("return")
    return (returns in (torch.Tensor, "torch.Tensor") and getattr(block, "self_attn", None) is attention
            and getattr(block, "mlp", None) is mlp
            and all(_is_rms_norm(getattr(block, n, None)) for n in ("input_layernorm", "post_attention_layernorm")))


def compiles_by_default(device: torch.device, d_head: int | None = None) -> bool:
    """``fused_modules``' ``compile=None``: only on CUDA where the Triton attention kernels do not apply (no Triton,
    or a head size ``triton_kernels.head_size_ok`` refuses), so rotary, attention and the merge run as plain
    formulas. Where they apply, the compiled formulas would serve float32's plain attention alone, and
    there they are no faster (H100, float32 sweeps: Llama-3.2-1B shape 12.4 s compiled, 12.2 s plain; Qwen2.5-0.5B
    shape 3.53 s, 3.44 s) but cost a compile on the first sweep of every process (7 s and 34 s on those shapes)."""
    if device.type != "cuda":
        return False
    return triton_kernels.triton is None or (d_head is not None and not triton_kernels.head_size_ok(d_head))


@contextmanager
def fused_modules(model, *, compile: bool | None = None, causal_flash: bool = False):
    """Swap the fused formulas into ``model`` (a HF ``*ForCausalLM``) while inside; restored on exit, even on error.

    ``compile``: wrap them in ``torch.compile`` (None: ``compiles_by_default``). ``causal_flash``: the
    caller promises every forward inside is causal with no padding (the patching sweep's forwards are), so
    fp16/bf16 attention on CUDA may use flash attention and ignore HF's mask, and forwards may share a prefix
    (``FusedSwap.shared_prefix``). Yields a ``FusedSwap``; its ``swapped`` is empty for families outside
    ``SHARED_PREFIX_FAMILIES`` (gpt_neo: its attention alone, ``fused_gpt_neo``).
    """
    swap = FusedSwap(n_layers=len(blocks(model)), causal_flash=causal_flash)
    if getattr(model.config, "model_type", None) not in SHARED_PREFIX_FAMILIES:
        yield swap
        return
    swapped_forwards: list[tuple[torch.nn.Module, object]] = []  # (module, its own instance forward or None)
    counts = {"rms_norm": 0, "gated_mlp": 0, "attention": 0, "block": 0, "silu_epilogue": 0}
    spec = family_spec(model.config)

    def swap_forward(module, forward):
        # an instance-level forward (nnsight installs one) is put back on exit; while inside, ours runs
        swapped_forwards.append((module, module.__dict__.get("forward")))
        module.forward = forward

    try:
        if not is_fusable(model):  # gpt_neo: its attention reads a shared prefix in place (fused_gpt_neo)
            for block in blocks(model):
                attention = getattr(get_submodule(block, spec.attention), "attention", None)
                if is_gpt_neo_attention(attention):
                    swap_forward(attention, gpt_neo_attention_forward(
                        attention, swap, attention.forward,
                        lambda like, q, d: per_example_prefix_applies(like, q, d)))  # (looked up when called)
                    swap.attention_layers.add(attention.layer_id)
                    window = attention_window(attention)
                    if window is not None:
                        swap.window = window if swap.window is None else min(swap.window, window)
            swap.swapped = [f"gpt_neo attention x{len(swap.attention_layers)}"] if swap.attention_layers else []
            if causal_flash and swap.attention_layers:
                swap.swapped.append("shared-prefix row_attention (CUDA fp16/bf16)")
            yield swap
            return
        if compile is None:
            compile = compiles_by_default(next(model.parameters()).device, head_geometry(model.config).d_head)
        norm_fn = rms_norm  # F.rms_norm: already one kernel, and a compiled call costs more host time than it saves
        mlp_fn = _maybe_compiled(gated_mlp, compile)
        for module in model.modules():
            if _is_rms_norm(module):
                swap_forward(module, lambda x, _m=module: norm_fn(x, _m.weight, _m.variance_epsilon))
                counts["rms_norm"] += 1
        for block in blocks(model):
            mlp = get_submodule(block, spec.mlp)
            if _is_gated_silu_mlp(mlp, model.config):
                w_gu, b_gu = stacked_linears([mlp.gate_proj, mlp.up_proj])
                interleaved = b_gu is None and matmul_epilogues.available(w_gu)  # (silu * up: the matmul's epilogue)
                if interleaved:
                    w_gu = matmul_epilogues.interleave_gate_up(w_gu)
                    counts["silu_epilogue"] += 1
                swap_forward(mlp, _gated_mlp_forward(mlp, w_gu, b_gu, mlp_fn, interleaved))
                counts["gated_mlp"] += 1
            attention = get_submodule(block, spec.attention)
            if _is_plain_attention(attention):
                swap_forward(attention, _fused_attention_forward(attention, swap, attention.forward, compile))
                swap.attention_layers.add(attention.layer_idx)
                counts["attention"] += 1
                if counts["gated_mlp"] and _is_plain_block(block, attention, mlp):
                    swap_forward(block, _fused_block_forward(block, attention, mlp, swap))
                    swap.blocks.add(attention.layer_idx)
                    counts["block"] += 1
        swap.swapped = [f"{k} x{v}" for k, v in counts.items() if v]
        if causal_flash and counts["attention"]:
            swap.swapped.append("flash attention (CUDA fp16/bf16)")
        yield swap
    finally:
        swap.prefix = swap.extra_rows = swap.qkv_edit = None
        for module, own in reversed(swapped_forwards):
            if own is None:
                del module.forward
            else:
                module.forward = own
