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


def tiny_model(family: str, vocab_size: int = 256, seed: int = 0, n_layers: int = 2, **config_overrides):
    """``tiny_config``'s model, random-initialised; ``config_overrides`` set config attributes (window_size=...)."""
    config = tiny_config(family, vocab_size=vocab_size, n_layers=n_layers)
    for name, value in config_overrides.items():
        setattr(config, name, value)
    return build_random_model(config, seed=seed)


# --- Shared tiny tokenizer for tests (appended; the code above is unchanged) --------------------------------
TINY_CORPUS = (
    "### Instruction: show me the price and count from the orders table ### Context: CREATE TABLE orders "
    "( price INT, count TEXT ) ### Response: SELECT price, count FROM orders",
    "### Instruction: get the amount from the people table ordered by amount in descending order ### Context: "
    "CREATE TABLE people ( amount JSON, duration TIME ) ### Response: SELECT amount FROM people ORDER BY amount DESC",
    "Once upon a time there was a little wolf who looked at the blue sky and the yellow sun.",
)


def build_tiny_tokenizer(
    texts=TINY_CORPUS,
    vocab_size: int = 400,
    pad_token: str | None = "<|pad|>",
    eos_token: str = "<|endoftext|>",
    bos_token: str | None = None,
    add_bos: bool = False,
):
    """A small byte-level BPE ``PreTrainedTokenizerFast`` (never an unknown token), trained in milliseconds.

    The first special token is ``eos_token`` (id 0, matching ``tiny_config``'s bos/eos ids 0), then ``bos_token``
    when given and different, then ``pad_token`` when given (``pad_token=None`` builds a tokenizer without a pad
    token, like TinyStories/GPT-2). ``add_bos`` prepends ``bos_token`` to every encoding, Llama style. The
    vocabulary has at least 256 byte tokens plus the specials, so build the model with
    ``vocab_size >= len(tokenizer)``. The pre-tokenizer splits on words incl. ``_`` with their leading space (the
    recipe of ``../shared/docs/training-small-tinysql-models.md``). ``tok.save_pretrained(folder)`` writes a folder
    ``AutoTokenizer.from_pretrained(folder)`` loads.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [eos_token]
    if bos_token is not None and bos_token not in specials:
        specials.append(bos_token)
    if pad_token is not None and pad_token not in specials:
        specials.append(pad_token)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r" ?[A-Za-z0-9_]+| ?[^\sA-Za-z0-9_]+|\s+"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(texts), trainer=trainer)
    if add_bos:
        if bos_token is None:
            raise ValueError("add_bos=True needs a bos_token")
        bos_id = tok.token_to_id(bos_token)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos_token} $A", pair=f"{bos_token} $A {bos_token} $B",
            special_tokens=[(bos_token, bos_id)])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=eos_token, bos_token=bos_token if bos_token is not None else eos_token,
        pad_token=pad_token, unk_token=None,
    )
