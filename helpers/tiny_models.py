"""Random-initialised models of every supported family, built from configs (no hub access).

Tests use the tiny shapes (fast on CPU); the benchmark uses the real shapes of the upstream models. Tiny
Llama-like configs set ``head_dim`` unequal to ``hidden_size // num_attention_heads`` and use grouped-query
attention, so code that ignores ``config.head_dim`` or confuses key/value heads with query heads fails.
"""
from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPTNeoConfig,
    GraniteConfig,
    GraniteMoeConfig,
    LlamaConfig,
    Qwen2Config,
)

TINY_FAMILIES = ("gpt_neo", "gpt2", "llama", "qwen2", "granite", "granitemoe")


def tiny_config(family: str, vocab_size: int = 256, n_layers: int = 2, max_positions: int = 256):
    """A small config of ``family`` (2 layers, 4 heads) for CPU tests."""
    common_llama = dict(
        vocab_size=vocab_size, hidden_size=48, intermediate_size=96, num_hidden_layers=n_layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=max_positions,
        tie_word_embeddings=False,
    )
    if family == "gpt_neo":  # global + local attention, like TinyStories-Instruct-2Layers-33M
        return GPTNeoConfig(
            vocab_size=vocab_size, max_position_embeddings=max_positions, hidden_size=48, num_layers=n_layers,
            bos_token_id=0, eos_token_id=0,
            num_heads=4, attention_types=[[["global", "local"], max(1, n_layers // 2)]], window_size=8,
            intermediate_size=96, embed_dropout=0.0, attention_dropout=0.0, resid_dropout=0.0,
        )
    if family == "gpt2":
        return GPT2Config(vocab_size=vocab_size, bos_token_id=0, eos_token_id=0, n_positions=max_positions, n_embd=48, n_layer=n_layers, n_head=4,
                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    if family == "llama":
        return LlamaConfig(**common_llama)
    if family == "qwen2":
        return Qwen2Config(**common_llama)
    if family == "granite":  # granite scales embeddings, residuals, attention and logits
        return GraniteConfig(**common_llama, embedding_multiplier=2.0, residual_multiplier=0.5,
                             attention_multiplier=0.2, logits_scaling=4.0)
    if family == "granitemoe":
        return GraniteMoeConfig(**common_llama, num_local_experts=4, num_experts_per_tok=2,
                                embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.2,
                                logits_scaling=4.0)
    raise ValueError(f"No tiny config for family {family!r}; known: {TINY_FAMILIES}")


def build_random_model(config, seed: int = 0, dtype: torch.dtype = torch.float32):
    """Random-initialised ``*ForCausalLM`` from a config, eager attention (gpt_neo supports nothing else)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=dtype)
    # Random init gives tiny logits; scale the output layer so logit differences are O(1) and tests meaningful.
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(10.0)
    return model.eval()


def tiny_model(family: str, vocab_size: int = 256, seed: int = 0, n_layers: int = 2):
    return build_random_model(tiny_config(family, vocab_size=vocab_size, n_layers=n_layers), seed=seed)
