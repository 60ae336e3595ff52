"""GPT-Neo's self-attention for the sweep's shared-prefix forwards (``FusedSwap.shared_prefix``).

HF's GPT-Neo attention takes the corrupt prefix as a per-row KV cache: every layer of every forward concatenates the
prefix, expanded to each row, with the row's own keys and values (for TinyStories-2L's ten-example sweeps, ``cat``
and its copies were ~38 % of the GPU's time). While a forward shares a prefix, this forward reads it in place
instead: on CUDA in fp16/bf16 with Triton, in ``triton_kernels.row_attention`` (scaling 1, no rotary: GPT-Neo does
not scale its scores and has learned absolute positions), the rows' own keys and the prefix in one softmax; elsewhere
in HF's own formula (float32 scores, the causal and local-window masks, softmax, probabilities rounded to the values'
dtype). Outside a shared-prefix forward the module's own forward runs.

The one difference from HF in fp16/bf16: the Triton kernel forms the scores from fp16/bf16 products accumulated in
float32 (HF casts query and key to float32 first: the same products, exact in float32, summed in another order) and
rounds the probabilities before normalising them, as flash attention does.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from helpers.patching import triton_kernels
from helpers.patching.stacked_weights import stacked_linears


def is_gpt_neo_attention(module) -> bool:
    """HF's eager ``GPTNeoSelfAttention`` as this forward knows it: q/k/v/out Linear projections, a layer index,
    global or local attention."""
    return (type(module).__name__ == "GPTNeoSelfAttention"
            and all(isinstance(getattr(module, n, None), torch.nn.Linear) for n in ("q_proj", "k_proj", "v_proj",
                                                                                    "out_proj"))
            and isinstance(getattr(module, "layer_id", None), int) and isinstance(getattr(module, "head_dim", None), int)
            and getattr(module, "attention_type", None) in ("global", "local"))


def attention_window(module) -> int | None:
    """The keys a local layer's query reaches back (``window_size``); None for a global layer."""
    return module.config.window_size if module.attention_type == "local" else None


def neo_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, window: int | None) -> torch.Tensor:
    """HF's ``GPTNeoSelfAttention._attn``: query [batch, head, q, d_head], key/value [batch, head, kv, d_head], the
    queries the last q of the kv positions. Scores in float32, unscaled; causal (and within ``window`` keys for a local
    layer); softmax (in float64 for a float64 model, where HF's float64 mask promotes the scores); probabilities cast
    to the values' dtype. Returns z: [batch, q, head, d_head], contiguous."""
    q_len, kv_len = query.shape[2], key.shape[2]
    scores = torch.matmul(query.float(), key.float().transpose(-1, -2))
    q_pos = torch.arange(kv_len - q_len, kv_len, device=query.device)[:, None]
    k_pos = torch.arange(kv_len, device=query.device)[None, :]
    keep = k_pos <= q_pos
    if window is not None:
        keep &= k_pos > q_pos - window
    scores = scores.masked_fill(~keep, torch.finfo(scores.dtype).min)  # (a Python scalar: no host sync)
    # (HF then adds the model's additive mask, in the model's dtype: a float64 model's softmax runs in float64)
    scores = scores.to(torch.promote_types(scores.dtype, value.dtype))
    probs = torch.softmax(scores, dim=-1).to(value.dtype)
    return torch.matmul(probs, value).transpose(1, 2).contiguous()


def gpt_neo_attention_forward(module, swap, original: Callable, rows_kernel_applies: Callable) -> Callable:
    """The swapped forward of one ``GPTNeoSelfAttention``. ``swap``: the ``FusedSwap`` whose ``prefix`` (per layer
    (keys, values) [1 or examples, head, s, d_head]), ``prefix_rows`` and ``prefix_starts`` a shared-prefix forward
    sets; ``rows_kernel_applies(like, q_len, d_head)``: may ``row_attention`` take rows of ``q_len`` tokens on
    ``like``'s device and dtype (fused_modules' ``per_example_prefix_applies``).

    Outside a shared-prefix forward the module's own forward runs. Inside one there is no fallback to it (it would
    drop the prefix: the forward passes no cache): gradients or dropout raise, and attention weights asked for
    (``output_attentions``, e.g. from the model's config) are not returned (None). The q/k/v projections run as one
    stacked matmul there, so hooks on them do not fire (path patching edits their outputs through
    ``FusedSwap.qkv_edit`` instead); out_proj runs as a module (the sweep's head patches are its pre-hooks)."""
    n_heads, d_head, layer = module.num_heads, module.head_dim, module.layer_id
    window = attention_window(module)
    weight, bias = stacked_linears([module.q_proj, module.k_proj, module.v_proj])

    def forward(hidden_states, attention_mask=None, layer_past=None, use_cache=False, output_attentions=False,
                **kwargs):
        prefix = None if swap.prefix is None else swap.prefix[layer]
        if prefix is None:
            return original(hidden_states, attention_mask=attention_mask, layer_past=layer_past, use_cache=use_cache,
                            output_attentions=output_attentions, **kwargs)
        if torch.is_grad_enabled() or (module.training and module.attn_dropout.p > 0):
            raise RuntimeError("a shared-prefix forward runs without gradients and dropout (inference and eval mode)")
        # (a cache the model made for this forward stays unfilled, as the llama-like fused attention leaves it: a
        # shared-prefix forward is never continued; one holding earlier positions would contradict the prefix)
        if layer_past is not None and layer_past.get_seq_length(layer) > 0:
            raise RuntimeError("a shared-prefix forward was given a cache holding earlier positions")
        b, q_len, _ = hidden_states.shape
        fused = F.linear(hidden_states, weight, bias).view(b, q_len, 3 * n_heads, d_head)
        if swap.qkv_edit is not None:  # path patching's receiver inputs (q | k | v, as the llama-like fused ones)
            swap.qkv_edit(layer, fused)
        query, key, value = fused.split([n_heads, n_heads, n_heads], dim=2)  # [b, q, head, d_head] views
        prefix_key, prefix_value = prefix
        s = prefix_key.shape[2]
        if (swap.causal_flash and rows_kernel_applies(hidden_states, q_len, d_head)
                and (window is None or s + q_len <= window)):
            rows = None if swap.prefix_rows is None else swap.prefix_rows[:b]
            z = triton_kernels.row_attention(query, key, value, prefix_key, prefix_value, 1.0, rows, swap.prefix_starts)
        else:
            if swap.prefix_rows is not None:
                raise ValueError(
                    f"several examples' prefixes need row_attention (CUDA fp16/bf16 with Triton, rows of at most "
                    f"{triton_kernels.ROW_ATTENTION_MAX} tokens, a head size that is a power of two from 16 to 128"
                    + ("" if window is None else f", and a local layer's window covering prefix and rows: "
                                                 f"{s + q_len} positions, window {window}") + ")")
            keys = torch.cat([prefix_key.expand(b, -1, -1, -1), key.transpose(1, 2)], dim=2)
            values = torch.cat([prefix_value.expand(b, -1, -1, -1), value.transpose(1, 2)], dim=2)
            z = neo_attention(query.transpose(1, 2), keys, values, window)
        out = module.out_proj(z.view(b, q_len, n_heads * d_head))
        return module.resid_dropout(out), None
    return forward
