"""Train the project's own byte-level BPE tokenizer on TinySQL text.

Every table and field name, synonym and novel word (with its leading space) and every SQL keyword comes out
as exactly one token: the pre-tokenizer splits on ``' ?[A-Za-z0-9_]+'`` so snake_case names stay whole
(GPT-2's default split breaks ``due_date``), and the vocabulary words are repeated in the training text so
BPE learns them. ``train_tokenizer`` checks this and raises if a word did not make it.
"""
from __future__ import annotations

from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from helpers.tinysql import vocabulary as V
from helpers.tinysql.sql_items import generate_items
from helpers.tinysql.tokenization import single_token_id

EOS = "<|endoftext|>"
BOS = "<|startoftext|>"
SPLIT_PATTERN = r" ?[A-Za-z0-9_]+| ?[^\sA-Za-z0-9_]+|\s+"


def words_that_must_be_single_tokens() -> list[str]:
    words = set(V.TABLES) | set(V.FIELDS) | set(V.NOVEL_TABLES) | set(V.NOVEL_FIELDS) | set(V.SQL_KEYWORDS)
    for syns in list(V.TABLES.values()) + list(V.FIELDS.values()):
        words.update(syns)
    return sorted(words)


def training_corpus(n_items_per_cs: int = 3000, seed: int = 0, word_repeats: int = 50) -> list[str]:
    # Prompt and answer separately, as training tokenizes them (the answer starts with a bare "SELECT").
    texts = [text for cs in (1, 2, 3) for it in generate_items(cs, n_items_per_cs, seed) for text in (it.prompt, it.sql)]
    words = words_that_must_be_single_tokens()
    texts += [" " + " ".join(words)] * word_repeats
    return texts


def train_tokenizer(vocab_size: int = 3000, add_bos: bool = False, seed: int = 0, n_items_per_cs: int = 3000,
                    word_repeats: int = 50, require_single_tokens: bool = True,
                    extra_corpus: tuple[str, ...] = ()) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer of at most ``vocab_size`` tokens; ``add_bos`` prepends BOS like Llama.

    With ``require_single_tokens=False`` and few ``word_repeats`` it makes a tokenizer that splits some names,
    which tests use to check that such words are never drawn.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS, BOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(training_corpus(n_items_per_cs, seed, word_repeats) + list(extra_corpus), trainer=trainer)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS, unk_token=None,
                                   bos_token=BOS, add_bos_token=add_bos)
    missing = [w for w in words_that_must_be_single_tokens() if single_token_id(fast, w) is None]
    missing += [w for w in ("SELECT",) if single_token_id(fast, w, leading_space=False) is None]
    if missing and require_single_tokens:
        raise RuntimeError(f"{len(missing)} vocabulary words are not single tokens, e.g. {missing[:10]}; "
                           "raise vocab_size or word_repeats")
    return fast


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, folder: str | Path) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder)
    return folder
