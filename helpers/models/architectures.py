"""Per-family table: where each architecture keeps its blocks, its attention output projection and its MLP.

Everything that patches or reads activations goes through this table, so every family shares one code path.
A head's output "z" is the *input* of the attention output projection, of width ``n_heads * d_head``, head
major (``b s (nh dh) -> b s nh dh``). Grouped-query attention does not change this: key/value heads are
repeated before attention, so head indices are query heads.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class FamilySpec:
    """Dotted module paths for one architecture family (``config.model_type``).

    ``blocks`` is relative to the ``*ForCausalLM`` module; the others are relative to one block.
    """

    model_type: str
    blocks: str  # ModuleList of transformer blocks
    out_proj: str  # attention output projection; its input is z: [batch, pos, n_heads * d_head]
    attention: str  # attention module; its first output is the attention output added to the residual
    mlp: str  # MLP (or mixture-of-experts) module; its output is added to the residual
    post_attention_norm: str  # the norm between the attention's residual addition and the MLP
    input_norm: str  # the norm before the attention (its output feeds the query, key and value projections)
    qkv: tuple[str, str, str]  # query, key, value projections; one path thrice: a fused projection, sliced q|k|v
    final_norm: str  # relative to the *ForCausalLM: the norm before the unembedding


_LLAMA_LIKE = dict(blocks="model.layers", out_proj="self_attn.o_proj", attention="self_attn", mlp="mlp",
                   post_attention_norm="post_attention_layernorm", input_norm="input_layernorm",
                   qkv=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), final_norm="model.norm")

FAMILIES: dict[str, FamilySpec] = {
    "gpt_neo": FamilySpec("gpt_neo", "transformer.h", "attn.attention.out_proj", "attn", "mlp", "ln_2", "ln_1",
                          ("attn.attention.q_proj", "attn.attention.k_proj", "attn.attention.v_proj"),
                          "transformer.ln_f"),
    "gpt2": FamilySpec("gpt2", "transformer.h", "attn.c_proj", "attn", "mlp", "ln_2", "ln_1", ("attn.c_attn",) * 3,
                       "transformer.ln_f"),
    "llama": FamilySpec("llama", **_LLAMA_LIKE),  # Llama-3.2, SmolLM, the embedded Llama-family models
    "qwen2": FamilySpec("qwen2", **_LLAMA_LIKE),
    "granite": FamilySpec("granite", **_LLAMA_LIKE),
    # granite-3.0-1b-a400m is a mixture of experts: same attention, experts instead of an MLP.
    "granitemoe": FamilySpec("granitemoe", **{**_LLAMA_LIKE, "mlp": "block_sparse_moe"}),
}


@dataclass(frozen=True)
class HeadGeometry:
    n_layers: int
    n_heads: int  # query heads: the heads we patch
    n_kv_heads: int
    d_head: int
    d_model: int


def family_spec(config) -> FamilySpec:
    """The table row for a transformers config; a clear error for families the suite does not know."""
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(
            f"Unsupported architecture family {model_type!r}: the suite knows {sorted(FAMILIES)}. "
            "Add a row to helpers.models.architectures.FAMILIES (blocks, out_proj, attention, mlp paths)."
        )
    return FAMILIES[model_type]


def head_geometry(config) -> HeadGeometry:
    """Layers, heads and head width, using ``config.head_dim`` where the config has one.

    ``hidden_size // num_attention_heads`` is only a fallback: Llama-style configs may set head_dim freely.
    """
    n_heads = config.num_attention_heads
    d_model = config.hidden_size
    d_head = getattr(config, "head_dim", None) or d_model // n_heads
    n_kv_heads = getattr(config, "num_key_value_heads", None) or n_heads
    return HeadGeometry(config.num_hidden_layers, n_heads, n_kv_heads, d_head, d_model)


def get_submodule(root, dotted: str):
    """Follow a dotted path (``"model.layers"``) from a torch module or an nnsight envoy."""
    for name in dotted.split("."):
        root = getattr(root, name)
    return root


def blocks(model) -> list:
    """The transformer blocks of a ``*ForCausalLM`` (torch module or nnsight LanguageModel)."""
    return list(get_submodule(model, family_spec(_config(model)).blocks))


def out_proj_modules(model) -> list[torch.nn.Module]:
    """The attention output projection of every layer, in order."""
    spec = family_spec(_config(model))
    return [get_submodule(block, spec.out_proj) for block in blocks(model)]


def _config(model):
    return model.config
