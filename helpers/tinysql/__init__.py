"""The task: TinySQL's vocabulary, the item generator and prompt format, tokenization, clean/corrupt pairs for each
feature, and SQL scoring.

    from helpers.tinysql import make_pairs
    pairs = make_pairs("DEFTABLENAME", tokenizer, cs_num=1, batch_size=10, seed=0)
    # (the suite's words and no synonyms unless told; the notebooks add the feature's DEFAULT_PAIR_OPTIONS and, for
    # the hub models, vocabulary="upstream")

Modules: ``vocabulary`` (tables, fields, synonyms, novel words), ``features`` (the eight features and the command
sets that can express them), ``word_sets`` (the suite's words or upstream's patching words and template),
``sql_items`` (items, ``format_prompt``, ``generate_items``), ``tokenization``, ``pairs`` (``make_pairs``),
``pair_versions`` (which settings' pairs each generator change altered), ``scoring`` (exact match, partial score).
"""
from helpers.tinysql.pairs import (FEATURES, CleanCorruptPair, Feature, PairConstructionError, check_command_set,
                                   make_pairs, parse_feature, usable_words)
from helpers.tinysql.scoring import exact_match, partial_score
from helpers.tinysql.sql_items import COMMAND_SETS, format_prompt, generate_items
from helpers.tinysql.tokenization import NotSingleTokenError
from helpers.tinysql.word_sets import WORD_SETS, parse_word_set

__all__ = ["make_pairs", "FEATURES", "Feature", "parse_feature", "CleanCorruptPair", "PairConstructionError",
           "NotSingleTokenError", "COMMAND_SETS", "format_prompt", "generate_items", "exact_match", "partial_score",
           "check_command_set", "usable_words", "WORD_SETS", "parse_word_set"]
