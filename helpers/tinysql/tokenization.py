"""Tokenizing TinySQL text exactly as training did, and single-token checks.

Training tokenized the prompt and the answer *separately* and concatenated the ids. Tokenizing the joined
string instead can merge the prompt's trailing space into the first answer token (``' SELECT'``), shifting
every answer index; decoding and re-encoding can double a BOS. So ids are built once, here, and indexed.
"""
from __future__ import annotations


class NotSingleTokenError(ValueError):
    """A vocabulary word that the tokenizer splits into several tokens (it cannot be patched as one)."""


def tokenizer_name(tokenizer) -> str:
    return getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__


def encode_prompt_and_answer(tokenizer, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """Prompt ids (with the tokenizer's special tokens, e.g. BOS) and answer ids (without), as in training."""
    prompt_ids = list(tokenizer(prompt)["input_ids"])
    answer_ids = list(tokenizer(answer, add_special_tokens=False)["input_ids"])
    return prompt_ids, answer_ids


def word_token_ids(tokenizer, word: str, leading_space: bool = True) -> list[int]:
    return list(tokenizer((" " if leading_space else "") + word, add_special_tokens=False)["input_ids"])


def single_token_id(tokenizer, word: str, leading_space: bool = True) -> int | None:
    """The id of ``word`` (with its leading space) if the tokenizer keeps it as one token, else None."""
    ids = word_token_ids(tokenizer, word, leading_space)
    return ids[0] if len(ids) == 1 else None


def require_single_token(tokenizer, word: str, leading_space: bool = True) -> int:
    token_id = single_token_id(tokenizer, word, leading_space)
    if token_id is None:
        pieces = tokenizer.convert_ids_to_tokens(word_token_ids(tokenizer, word, leading_space))
        raise NotSingleTokenError(
            f"{word!r} is not a single token for tokenizer {tokenizer_name(tokenizer)!r} "
            f"(it splits into {pieces}); it cannot be corrupted or read as one position."
        )
    return token_id
