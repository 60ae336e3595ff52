"""Clean/corrupt prompt pairs for the eight patching features.

| feature              | corrupts (one token)                              | answer token (clean / corrupt)        | CS  |
|----------------------|---------------------------------------------------|---------------------------------------|-----|
| ENGTABLENAME         | the table's word in the Instruction               | the table / the other table           | 0-3 |
| ENGFIELDNAME         | the first selected field's Instruction word       | that field / the other field          | 0-3 |
| DEFTABLENAME         | the table's name in the CREATE TABLE              | the table / the new name              | 0-3 |
| DEFFIELDNAME         | the first selected field's CREATE name            | that field / the new name             | 0-3 |
| ENGORDERBYFIELD      | the Instruction word of the field to sort by      | the field after ``ORDER BY``          | 2-3 |
| ENGORDERBYDIRECTION  | "ascending" <-> "descending" (or smallest/largest)| ``ASC`` / ``DESC``                    | 2-3 |
| ENGAGGREGATEFUNCTION | the aggregate's word ("total" <-> "average", ...) | the function (``SUM``, ``AVG``, ...)  | 3   |
| ENGAGGREGATEFIELD    | the Instruction word of the aggregated field      | the field inside ``AGG(``             | 3   |

Each pair holds token ids built as training built them (prompt and answer tokenized separately), truncated
so that the *last* position predicts the answer token (the original notebook kept the answer token itself
as input and so scored the token after it). Clean and corrupt ids have equal length and differ at exactly
one position; ``corrupted_position`` is derived from the ids, never assumed. Logit differences compare the
SQL tokens (what the model must write), never a synonym, and a corrupt word never equals the true one.

All pairs of one batch share one skeleton (template, tables, column types, which fields are selected, sorted and
aggregated) and differ only in the names filling it, so every example has the same length, the same corrupted
position and the same answer position: averaging over examples compares like with like, column by column.

With the suite's words the Eng* name corruptions point at something the Context can answer: ENGFIELDNAME,
ENGORDERBYFIELD and ENGAGGREGATEFIELD swap in another column of the same table, and ENGTABLENAME (by default)
adds a distractor table to the Context and swaps in its word. A model that reads the Instruction to decide
*which* name and the Context to decide its *spelling* then changes its answer under every corruption. The
direction and function corruptions swap one word of a phrase for the one word that makes it the other phrase
("sorted by cost ascending" / "sorted by cost descending"); phrases that differ in more than one word
("from lowest to highest") are not used for them. ``vocabulary="upstream"`` draws upstream's patching words and
template instead (helpers.tinysql.word_sets).
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass, replace

from helpers.parameter_values import as_bool, as_int
from helpers.tinysql import vocabulary as V
from helpers.tinysql.sql_items import COMMAND_SETS, Column, GeneratorConfig, SqlItem, TableSchema, generate_item
from helpers.tinysql.tokenization import NotSingleTokenError, encode_prompt_and_answer, single_token_id, tokenizer_name
from helpers.tinysql.features import (DESCRIPTIONS, FEATURES, NAME_FEATURES, Feature, check_command_set,
                                      parse_feature)
from helpers.tinysql.word_sets import WordSet, parse_word_set

# The features themselves (names, command sets, descriptions) live in helpers.tinysql.features; they are
# re-exported here, where the notebooks and tests have always found them.
__all__ = ["Feature", "FEATURES", "NAME_FEATURES", "DESCRIPTIONS", "parse_feature", "check_command_set",
           "PairConstructionError", "CleanCorruptPair", "PairOptions", "NOVEL_WORDS", "UsableWords", "usable_words",
           "one_word_partners", "build_pair", "make_pairs", "DEFAULT_PAIR_OPTIONS"]


class PairConstructionError(ValueError):
    """A clean/corrupt pair that cannot be built as specified (the message names word and tokenizer)."""


@dataclass(frozen=True)
class CleanCorruptPair:
    feature: Feature
    clean_item: SqlItem
    corrupt_item: SqlItem
    clean_word: str  # the prompt word that is corrupted (a synonym when synonyms are on)
    corrupt_word: str  # what replaces it
    clean_answer: str  # the SQL name the clean prompt asks for
    corrupt_answer: str  # the SQL name the corrupt prompt asks for
    clean_ids: tuple[int, ...]  # prompt + answer prefix; the last position predicts the answer token
    corrupt_ids: tuple[int, ...]
    corrupted_position: int  # the one index where clean_ids and corrupt_ids differ
    answer_position: int  # index whose logits predict the answer token (== len(clean_ids) - 1)
    clean_token_id: int  # vocabulary id of " clean_answer"
    corrupt_token_id: int
    n_prompt_tokens: int

    @property
    def clean_prompt(self) -> str:
        return self.clean_item.prompt

    @property
    def corrupt_prompt(self) -> str:
        return self.corrupt_item.prompt

    def to_dict(self) -> dict:
        return dict(
            feature=self.feature.value, clean_prompt=self.clean_prompt, corrupt_prompt=self.corrupt_prompt,
            clean_sql=self.clean_item.sql, clean_word=self.clean_word, corrupt_word=self.corrupt_word,
            clean_answer=self.clean_answer, corrupt_answer=self.corrupt_answer, clean_ids=list(self.clean_ids),
            corrupt_ids=list(self.corrupt_ids), corrupted_position=self.corrupted_position,
            answer_position=self.answer_position, clean_token_id=self.clean_token_id,
            corrupt_token_id=self.corrupt_token_id, n_prompt_tokens=self.n_prompt_tokens,
        )


@dataclass(frozen=True)
class PairOptions:
    """The original notebook's flags, plus the distractor table (None: on for ENGTABLENAME with the suite's words)."""

    use_novel_names: bool = False  # corrupt with words the model never saw as names (apple, hammer, ...)
    use_synonyms_table: bool = False  # the Instruction names the table by a synonym
    use_synonyms_field: bool = False  # the Instruction names fields by synonyms
    distractor_table: bool | None = None
    novel_words: str = "trained"  # "trained": upstream's novel words; "held_out": never in any training text


NOVEL_WORDS = ("trained", "held_out")


# ---------------------------------------------------------------------------------------------- words


def _usable_names(tokenizer, names: dict, with_synonyms: bool, template_words, bare: bool = False) -> tuple[str, ...]:
    """Names that are one token, and (when synonyms are used) whose synonyms are one token each too.

    Names or synonyms that are also words of the English templates ("records", "total") are left out: a
    corruption must change the only mention of a word, and the clean prompt must not say it twice. ``bare``:
    the name must also be one token without its leading space (it is the answer right after ``SUM(``).
    """
    def ok(word: str) -> bool:
        return single_token_id(tokenizer, word) is not None and word not in template_words

    return tuple(n for n, syns in names.items() if ok(n) and (not with_synonyms or all(ok(w) for w in syns))
                 and (not bare or single_token_id(tokenizer, n, leading_space=False) is not None))


def _word_for(name: str, synonyms: dict, use_synonym: bool, rng: random.Random) -> str:
    return rng.choice(synonyms[name]) if use_synonym and name in synonyms else name


def _novel_pool(feature: Feature, words: WordSet, opts: PairOptions) -> tuple[str, ...]:
    if opts.novel_words == "held_out":
        return V.HELD_OUT_NOVEL_TABLES if feature.is_table else V.HELD_OUT_NOVEL_FIELDS
    return words.novel_tables if feature.is_table else words.novel_fields


def one_word_partners(template: str, others) -> list[tuple[str, str, str]]:
    """(other template, this template's word, the other's word) for each template of ``others`` that differs
    from ``template`` in exactly one word, not a ``[slot]``: "sorted by [field] ascending" and "... descending"."""
    a = template.split()
    out = []
    for other in others:
        b = other.split()
        diff = [i for i in range(len(a)) if len(a) == len(b) and a[i] != b[i]]
        if len(a) == len(b) and len(diff) == 1 and not a[diff[0]].startswith("["):
            out.append((other, a[diff[0]], b[diff[0]]))
    return out


# ---------------------------------------------------------------------------------------------- pairs


def _first_field(item: SqlItem) -> str:
    return item.select[0].field


def _target(feature: Feature, item: SqlItem) -> str:
    """The name (or the SQL keyword) the clean prompt asks for."""
    if feature.is_table:
        return item.table
    if feature is Feature.ENGORDERBYFIELD:
        return item.order_by[0][0]
    if feature is Feature.ENGORDERBYDIRECTION:
        return item.order_by[0][1]
    if feature is Feature.ENGAGGREGATEFUNCTION:
        return item.select[0].aggregate
    return _first_field(item)


def _mentioned(item: SqlItem) -> set[str]:
    return {s.field for s in item.select} | {f for f, _ in item.order_by}


def _context_names(item: SqlItem) -> set[str]:
    """Every table and column name the CREATE TABLE Context holds."""
    return {t.name for t in item.tables} | {f for t in item.tables for f in t.field_names}


def _said_once(item: SqlItem, clean_word: str, corrupt_word: str) -> bool:
    """The Instruction says the clean word once and the corrupt word nowhere (else the swap is not one mention)."""
    said = re.findall(r"\w+", item.english)
    return said.count(clean_word) == 1 and corrupt_word not in said


def _function_swaps(item: SqlItem, words: WordSet) -> list[tuple[str, str, str, str]]:
    """(other function, its phrase, this phrase's word, the other's word) for the first select's aggregate."""
    sel = item.select[0]
    sql_type = next(c.sql_type for c in item.schema.columns if c.name == sel.field)
    return [(fn, other, a, b) for fn in V.allowed_aggregates(sql_type) if fn != sel.aggregate
            for other, a, b in one_word_partners(item.aggregate_templates[0], words.aggregate_templates[fn])
            if _said_once(item, a, b)]


def _direction_swaps(item: SqlItem, words: WordSet) -> list[tuple[str, str, str]]:
    """(other phrase, this phrase's word, the other's word) that turn the first sort clause's direction."""
    other = "DESC" if item.order_by[0][1] == "ASC" else "ASC"
    return [(t, a, b) for t, a, b in one_word_partners(item.order_templates[0], words.order_templates[other])
            if _said_once(item, a, b)]


def _agg_field_swaps(item: SqlItem) -> list[str]:
    """Unmentioned columns of the target table whose type admits the first select's aggregate."""
    agg = item.select[0].aggregate
    return [c.name for c in item.schema.columns if c.name not in _mentioned(item)
            and agg in V.allowed_aggregates(c.sql_type)]


def _fits(feature: Feature, item: SqlItem, words: WordSet) -> bool:
    """Whether a generator item can carry ``feature``: one mention of the corrupted word, answer reachable."""
    target = _first_field(item)
    selected = [s.field for s in item.select]
    free = set(item.schema.field_names) - _mentioned(item)  # columns the Instruction never mentions
    if feature.aggregates:
        if not item.select[0].aggregate or any(f == target for f, _ in item.order_by):
            return False
        if feature is Feature.ENGAGGREGATEFUNCTION:
            return bool(_function_swaps(item, words))
        return bool(_agg_field_swaps(item)) or not words.corrupt_from_context
    if item.select[0].aggregate:  # "SUM(price)" tokenizes "price" without its leading space
        return False
    if feature.sorts:
        if not item.order_by:
            return False
        if feature is Feature.ENGORDERBYDIRECTION:
            return bool(_direction_swaps(item, words))
        sort_field = item.order_by[0][0]
        return (sort_field not in selected and [f for f, _ in item.order_by].count(sort_field) == 1
                and (bool(free) or not words.corrupt_from_context))
    if any(f == target for f, _ in item.order_by):  # the Instruction would mention the field twice
        return False
    if feature is Feature.ENGFIELDNAME and not free and words.corrupt_from_context:
        return False  # no field the Instruction leaves unmentioned, to swap in
    return True


def _base_item(feature: Feature, cs: int, rng: random.Random, opts: PairOptions, tables, fields,
               words: WordSet) -> SqlItem:
    """A generator item (the batch's skeleton) fit for ``feature``."""
    distractor = opts.distractor_table if opts.distractor_table is not None else (
        feature is Feature.ENGTABLENAME and words.corrupt_from_context)
    upstream_like = words.select_leading_columns  # upstream's prompts sort or aggregate only when the feature does
    columns = (words.min_columns, words.max_columns)
    if feature is Feature.ENGORDERBYFIELD and upstream_like:
        columns = (words.max_selected + 1,) * 2  # a column to sort by
    cfg = GeneratorConfig(
        table_synonym_p=float(opts.use_synonyms_table), field_synonym_p=float(opts.use_synonyms_field),
        distractor_table_p=float(distractor), min_columns=columns[0], max_columns=columns[1],
        max_selected=words.max_selected, tables=tables, fields=fields, words=words.name,
        order_by_p=1.0 if feature.sorts else 0.0 if upstream_like else 0.9,
        max_order_by=1 if upstream_like else GeneratorConfig.max_order_by,
        # No aggregate before the answer of a sort feature: "SUM(price) AS SUM_price" tokenizes to a different
        # length for each field filled in, and a batch's examples must share one shape.
        aggregate_p=(0.7 if feature.aggregates else 0.0 if feature.sorts or upstream_like
                     else GeneratorConfig.aggregate_p),
    )
    for _ in range(2000):
        item = generate_item(cs, rng, cfg)
        if not _fits(feature, item, words):
            continue
        if feature is Feature.DEFFIELDNAME:
            # Only columns the Instruction asks for (as upstream's two-column tables): after the rename, the
            # renamed column is then the one column no Instruction word matches, and the corrupt answer is
            # well defined. With other unmentioned columns it could be any of them.
            schema = TableSchema(item.table, tuple(c for c in item.schema.columns if c.name in _mentioned(item)))
            item = replace(item, tables=tuple(schema if t.name == item.table else t for t in item.tables))
        return item
    raise PairConstructionError(f"could not draw a base item for {feature.value} in CS{cs} ({words.name} words)")


def _corruption(feature: Feature, item: SqlItem, rng: random.Random, opts: PairOptions, tables, fields,
                words: WordSet):
    """(corrupt item, clean word, corrupt word, clean answer, corrupt answer)."""
    names = item.english_words
    prompt_words = set(names.values()) | _context_names(item)
    novel = [w for w in _novel_pool(feature, words, opts) if w not in prompt_words] if opts.use_novel_names else []

    if feature is Feature.ENGTABLENAME:
        clean_answer, clean_word = item.table, names[item.table]
        distractors = [t.name for t in item.tables if t.name != item.table]
        if opts.use_novel_names:
            corrupt_answer = corrupt_word = rng.choice(novel)
        else:  # the distractor table if there is one, so the Context can answer the corrupt request
            corrupt_answer = distractors[0] if distractors else rng.choice([t for t in tables if t not in prompt_words])
            corrupt_word = _word_for(corrupt_answer, words.tables, opts.use_synonyms_table, rng)
        corrupt = item.with_english_word(item.table, corrupt_word)
        return corrupt, clean_word, corrupt_word, clean_answer, corrupt_answer

    if feature in (Feature.ENGFIELDNAME, Feature.ENGORDERBYFIELD, Feature.ENGAGGREGATEFIELD):
        clean_answer = _target(feature, item)
        clean_word = names[clean_answer]
        if opts.use_novel_names:
            corrupt_answer = corrupt_word = rng.choice(novel)
        elif words.corrupt_from_context:  # another column of the same table: the Context can answer
            pool = (_agg_field_swaps(item) if feature is Feature.ENGAGGREGATEFIELD
                    else [f for f in item.schema.field_names if f not in _mentioned(item)])
            corrupt_answer = rng.choice(pool)
            corrupt_word = _word_for(corrupt_answer, words.fields, opts.use_synonyms_field, rng)
        else:  # upstream: any field of the list that the prompt does not hold
            corrupt_answer = rng.choice([f for f in fields if f not in prompt_words
                                         and not set(words.fields.get(f, ())) & prompt_words])
            corrupt_word = _word_for(corrupt_answer, words.fields, opts.use_synonyms_field, rng)
            if corrupt_word != corrupt_answer and corrupt_word in words.fields:  # ("total": amount's, a field too)
                raise PairConstructionError(f"the corrupt word {corrupt_word!r} stands for {corrupt_answer!r} but is "
                                            "a field's own name: which answer it asks for is ambiguous")
        corrupt = item.with_english_word(clean_answer, corrupt_word)
        return corrupt, clean_word, corrupt_word, clean_answer, corrupt_answer

    if feature is Feature.ENGORDERBYDIRECTION:
        (field_, clean_answer), rest = item.order_by[0], item.order_by[1:]
        corrupt_answer = "DESC" if clean_answer == "ASC" else "ASC"
        template, clean_word, corrupt_word = rng.choice(_direction_swaps(item, words))
        corrupt = replace(item, order_by=((field_, corrupt_answer),) + rest,
                          order_templates=(template,) + item.order_templates[1:])
        return corrupt, clean_word, corrupt_word, clean_answer, corrupt_answer

    if feature is Feature.ENGAGGREGATEFUNCTION:
        clean_answer = item.select[0].aggregate
        corrupt_answer, template, clean_word, corrupt_word = rng.choice(_function_swaps(item, words))
        select = (replace(item.select[0], aggregate=corrupt_answer),) + item.select[1:]
        corrupt = replace(item, select=select, aggregate_templates=(template,) + item.aggregate_templates[1:])
        return corrupt, clean_word, corrupt_word, clean_answer, corrupt_answer

    if feature is Feature.DEFTABLENAME:
        clean_answer = item.table
        corrupt_answer = rng.choice(novel if opts.use_novel_names else [t for t in tables if t not in prompt_words])
        renamed = tuple(TableSchema(corrupt_answer, t.columns) if t.name == item.table else t for t in item.tables)
        english = {**names, corrupt_answer: names[item.table]}  # the Instruction is untouched
        corrupt = replace(item, tables=renamed, table=corrupt_answer, english_words=english)
        return corrupt, clean_answer, corrupt_answer, clean_answer, corrupt_answer

    # DEFFIELDNAME
    clean_answer = _first_field(item)
    corrupt_answer = rng.choice(novel if opts.use_novel_names else [f for f in fields if f not in prompt_words])
    schema = item.schema
    columns = tuple(Column(corrupt_answer, c.sql_type) if c.name == clean_answer else c for c in schema.columns)
    tables_ = tuple(TableSchema(t.name, columns) if t.name == item.table else t for t in item.tables)
    select = tuple(replace(s, field=corrupt_answer) if s.field == clean_answer else s for s in item.select)
    english = {**names, corrupt_answer: names[clean_answer]}
    corrupt = replace(item, tables=tables_, select=select, english_words=english)
    return corrupt, clean_answer, corrupt_answer, clean_answer, corrupt_answer


def build_pair(feature: Feature | str, clean: SqlItem, corrupt: SqlItem, tokenizer, *, clean_word: str,
               corrupt_word: str, clean_answer: str, corrupt_answer: str) -> CleanCorruptPair:
    """Tokenize a clean/corrupt item pair and check every invariant; raise naming word and tokenizer if not."""
    feature = parse_feature(feature)
    name = tokenizer_name(tokenizer)
    if corrupt_answer == clean_answer or corrupt_word == clean_word:
        raise PairConstructionError(f"corrupt word {corrupt_word!r} equals the clean one ({feature.value})")
    ids = {}
    for word, spaced in ((clean_word, True), (corrupt_word, True), (clean_answer, feature.answer_after_space),
                         (corrupt_answer, feature.answer_after_space)):
        ids[word, spaced] = single_token_id(tokenizer, word, leading_space=spaced)
        if ids[word, spaced] is None:
            raise NotSingleTokenError(f"{(' ' if spaced else '') + word!r} is not a single token for tokenizer "
                                      f"{name!r} ({feature.value})")

    prompt_ids, answer_ids = encode_prompt_and_answer(tokenizer, clean.prompt, clean.sql)
    corrupt_prompt_ids, _ = encode_prompt_and_answer(tokenizer, corrupt.prompt, clean.sql)
    clean_token_id = ids[clean_answer, feature.answer_after_space]
    corrupt_token_id = ids[corrupt_answer, feature.answer_after_space]
    if clean_token_id not in answer_ids:
        raise PairConstructionError(f"answer token {clean_answer!r} not found in the tokenized SQL {clean.sql!r} "
                                    f"by tokenizer {name!r}")
    k = answer_ids.index(clean_token_id)
    clean_ids = tuple(prompt_ids + answer_ids[:k])  # last position predicts answer_ids[k]
    corrupt_ids = tuple(corrupt_prompt_ids + answer_ids[:k])
    if len(clean_ids) != len(corrupt_ids):
        raise PairConstructionError(
            f"clean and corrupt prompts tokenize to different lengths ({len(clean_ids)} vs {len(corrupt_ids)}) "
            f"with tokenizer {name!r} when {clean_word!r} becomes {corrupt_word!r}")
    diff = [i for i, (a, b) in enumerate(zip(clean_ids, corrupt_ids)) if a != b]
    if len(diff) != 1:
        raise PairConstructionError(
            f"clean and corrupt ids differ at {len(diff)} positions {diff}, expected exactly one, when "
            f"{clean_word!r} becomes {corrupt_word!r} (tokenizer {name!r})")
    pos = diff[0]
    if (clean_ids[pos], corrupt_ids[pos]) != (ids[clean_word, True], ids[corrupt_word, True]) or pos >= len(prompt_ids):
        raise PairConstructionError(
            f"the differing position {pos} does not hold {clean_word!r}/{corrupt_word!r} in the prompt "
            f"(tokenizer {name!r})")
    return CleanCorruptPair(
        feature=feature, clean_item=clean, corrupt_item=corrupt, clean_word=clean_word, corrupt_word=corrupt_word,
        clean_answer=clean_answer, corrupt_answer=corrupt_answer, clean_ids=clean_ids, corrupt_ids=corrupt_ids,
        corrupted_position=pos, answer_position=len(clean_ids) - 1, clean_token_id=clean_token_id,
        corrupt_token_id=corrupt_token_id, n_prompt_tokens=len(prompt_ids),
    )


@dataclass(frozen=True)
class UsableWords:
    """How many of a word set's lists a tokenizer keeps as single tokens (the rest are never drawn)."""

    vocabulary: str
    tables: tuple[str, ...]
    fields: tuple[str, ...]
    n_tables: int  # in the word set
    n_fields: int

    def summary(self) -> str:
        return (f"{self.vocabulary} words usable with this tokenizer: {len(self.tables)} of {self.n_tables} tables, "
                f"{len(self.fields)} of {self.n_fields} fields")


def _template_words(words: WordSet, feature: Feature | None) -> frozenset[str]:
    """Words the feature's prompts may hold besides names. The suite's prompts may hold any of its phrases;
    upstream's hold a sort or aggregate phrase only when the feature is about one."""
    if feature is None or not words.select_leading_columns:
        return words.template_words
    used = replace(words, order_templates=words.order_templates if feature.sorts else {},
                   aggregate_templates=words.aggregate_templates if feature.aggregates else {})
    return used.template_words


def usable_words(tokenizer, vocabulary: str = "suite", use_synonyms_table: bool = False,
                 use_synonyms_field: bool = False, feature: Feature | str | None = None) -> UsableWords:
    """The tables and fields of ``vocabulary`` that pairs of ``feature`` may draw for ``tokenizer`` (single tokens,
    synonyms included when they are used, not words the feature's English phrases use themselves)."""
    words = parse_word_set(vocabulary)
    feature = None if feature is None else parse_feature(feature)
    bare = feature is not None and not feature.answer_after_space
    tw = _template_words(words, feature)
    return UsableWords(words.name, _usable_names(tokenizer, words.tables, use_synonyms_table, tw),
                       _usable_names(tokenizer, words.fields, use_synonyms_field, tw, bare=bare),
                       len(words.tables), len(words.fields))


def make_pairs(feature: Feature | str, tokenizer, *, cs_num: int = 1, batch_size: int = 5, seed: int = 0,
               use_novel_names: bool = False, use_synonyms_table: bool = False, use_synonyms_field: bool = False,
               distractor_table: bool | None = None, vocabulary: str | None = None,
               novel_words: str = "trained") -> list[CleanCorruptPair]:
    """``batch_size`` validated pairs for ``feature``, reproducible from ``seed``.

    Only words that ``tokenizer`` keeps as one token are drawn. ``cs_num`` 0 (base models) uses CS1 items.
    ``vocabulary``: "suite" (this project's words, the embedded models') or "upstream" (upstream's patching words
    and template, the released checkpoints'); None is "suite". ``novel_words``: with ``use_novel_names``, upstream's
    novel words ("trained") or words no training text holds ("held_out", helpers.tinysql.vocabulary).
    """
    feature = parse_feature(feature)
    words = parse_word_set(vocabulary or "suite")
    # as notebooks and YAML deliver them ("False" is False: bool("False") turned novel names on), else refused
    cs_num, batch_size, seed = as_int("cs_num", cs_num), as_int("batch_size", batch_size), as_int("seed", seed)
    use_novel_names = as_bool("use_novel_names", use_novel_names)
    use_synonyms_table = as_bool("use_synonyms_table", use_synonyms_table)
    use_synonyms_field = as_bool("use_synonyms_field", use_synonyms_field)
    distractor_table = as_bool("distractor_table", distractor_table, allow_none=True)
    if cs_num not in (0,) + COMMAND_SETS:
        raise ValueError(f"Unknown command set {cs_num!r}: pairs exist for {(0,) + COMMAND_SETS}")
    check_command_set(feature, cs_num)
    cs = max(1, cs_num)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if novel_words not in NOVEL_WORDS:
        raise ValueError(f"Unknown novel_words {novel_words!r}: choose one of {list(NOVEL_WORDS)}")
    if not use_novel_names:
        novel_words = "trained"  # (which novel words is moot without them: the same pairs, the same seed)
    if use_novel_names and not feature.corrupts_a_name:
        raise ValueError(f"use_novel_names does not apply to {feature.value}: it corrupts a "
                         f"{'direction' if feature is Feature.ENGORDERBYDIRECTION else 'function'} word, not a name")
    keywords = {Feature.ENGORDERBYDIRECTION: ("ASC", "DESC"),
                Feature.ENGAGGREGATEFUNCTION: ("SUM", "AVG", "MIN", "MAX", "COUNT")}.get(feature, ())
    split = [k for k in keywords if single_token_id(tokenizer, k) is None]
    if split and (feature is Feature.ENGORDERBYDIRECTION or len(keywords) - len(split) < 2):
        raise NotSingleTokenError(f"{', '.join(repr(' ' + k) for k in split)} {'is' if len(split) == 1 else 'are'} "
                                  f"not a single token for tokenizer {tokenizer_name(tokenizer)!r}: {feature.value} "
                                  "cannot score its answers with it")
    opts = PairOptions(use_novel_names, use_synonyms_table, use_synonyms_field, distractor_table, novel_words)
    usable = usable_words(tokenizer, words.name, use_synonyms_table, use_synonyms_field, feature)
    tables, fields = usable.tables, usable.fields
    need_tables, need_fields = (3, 8) if words.corrupt_from_context else (3, 4)
    if len(tables) < need_tables or len(fields) < need_fields:
        raise PairConstructionError(
            f"tokenizer {tokenizer_name(tokenizer)!r} keeps too few {words.name} names as single tokens "
            f"({len(tables)} tables, {len(fields)} fields) to build {feature.value} pairs")
    if use_novel_names:
        bad = [w for w in _novel_pool(feature, words, opts) if single_token_id(tokenizer, w) is None
               or (not feature.answer_after_space and single_token_id(tokenizer, w, leading_space=False) is None)]
        if bad:
            how = "" if feature.answer_after_space else " (with and without a leading space: the answer follows 'SUM(')"
            raise NotSingleTokenError(f"novel words {bad} are not single tokens{how} for {tokenizer_name(tokenizer)!r}"
                                      f"; {feature.value} cannot use novel names with this tokenizer")

    rng = random.Random(f"pairs-{feature.value}-cs{cs}-{seed}-{_rng_key(opts, words)}")
    pairs, failures = [], []
    skeleton = _base_item(feature, cs, rng, opts, tables, fields, words)
    while len(pairs) < batch_size:
        if len(failures) > 20 * batch_size + 50:
            raise PairConstructionError(f"{len(failures)} failed attempts building {feature.value} pairs; last: "
                                        f"{failures[-1]}")
        if not pairs and len(failures) >= 10:  # a skeleton that does not tokenize cleanly: draw another
            skeleton = _base_item(feature, cs, rng, opts, tables, fields, words)
        try:
            item = _fill_skeleton(skeleton, feature, rng, opts, tables, fields, words)
            _check_unambiguous(item)
            corrupt, cw, xw, ca, xa = _corruption(feature, item, rng, opts, tables, fields, words)
            pair = build_pair(feature, item, corrupt, tokenizer, clean_word=cw, corrupt_word=xw,
                              clean_answer=ca, corrupt_answer=xa)
            if pairs and _shape(pair) != _shape(pairs[0]):
                raise PairConstructionError(f"pair shape {_shape(pair)} differs from the batch's {_shape(pairs[0])}")
            pairs.append(pair)
        except (PairConstructionError, NotSingleTokenError, IndexError, ValueError) as err:  # rare: draw again
            failures.append(err)
    return pairs


def _rng_key(opts: PairOptions, words: WordSet) -> str:
    """The seed string's options part; the suite's trained-novel pairs keep the seeds they had before word sets."""
    base = PairOptions(opts.use_novel_names, opts.use_synonyms_table, opts.use_synonyms_field, opts.distractor_table)
    legacy = repr(base).replace(", novel_words='trained')", ")")
    if words.name == "suite" and opts.novel_words == "trained":
        return legacy
    return f"{legacy}-{words.name}-{opts.novel_words}"


def _check_unambiguous(item: SqlItem) -> None:
    """Refuse a clean Instruction word that stands for one name while the Context holds another name spelled so
    (the corrupt prompt of an Eng* feature does that on purpose).

    Upstream's synonyms overlap its names (title is name's synonym and a field too); the suite's never do.
    """
    in_context = _context_names(item)
    clash = [(name, word) for name, word in item.english_words.items() if word != name and word in in_context]
    if clash:
        raise PairConstructionError(f"the Instruction's word {clash[0][1]!r} stands for {clash[0][0]!r} while the "
                                    "Context has a name spelled so")


def _shape(pair: CleanCorruptPair) -> tuple[int, int, int]:
    return len(pair.clean_ids), pair.corrupted_position, pair.answer_position


def _fill_skeleton(skeleton: SqlItem, feature: Feature, rng: random.Random, opts: PairOptions, tables,
                   fields, words: WordSet) -> SqlItem:
    """The skeleton with fresh names: a distinct table name per table and a distinct field per column slot.

    Everything else (templates, types, which slots are selected, sorted or aggregated) is kept, so with
    single-token names every filled item tokenizes to the same length with the same positions. For
    ENGTABLENAME the distractor table also has the selected and the sorted fields, so the corrupt request is
    answerable (a skeleton whose distractor has too few columns is refused: another is drawn).
    """
    new_tables = rng.sample(list(tables), len(skeleton.tables))
    new_fields = iter(rng.sample(list(fields), sum(len(t.columns) for t in skeleton.tables)))
    schemas, target_fields = [], {}
    for old, name in zip(skeleton.tables, new_tables):
        columns = tuple(Column(next(new_fields), c.sql_type) for c in old.columns)
        if old.name == skeleton.table:
            target_fields = {c.name: n.name for c, n in zip(old.columns, columns)}
            table = name
        schemas.append(TableSchema(name, columns))
    select = tuple(replace(s, field=target_fields[s.field]) for s in skeleton.select)
    if feature is Feature.ENGTABLENAME:  # every field the request mentions: selected, then sorted by
        mentioned = [s.field for s in select]
        mentioned += [target_fields[f] for f, _ in skeleton.order_by if target_fields[f] not in mentioned]
        if any(len(t.columns) < len(mentioned) for t in schemas):
            raise PairConstructionError("a distractor table has fewer columns than the request mentions")
        schemas = [t if t.name == table else TableSchema(t.name, tuple(
            Column(mentioned[i], c.sql_type) if i < len(mentioned) else c for i, c in enumerate(t.columns)))
            for t in schemas]
    names = {table: _word_for(table, words.tables, opts.use_synonyms_table, rng)}
    for f in target_fields.values():
        names[f] = _word_for(f, words.fields, opts.use_synonyms_field, rng)
    return replace(skeleton, tables=tuple(schemas), table=table, select=select,
                   order_by=tuple((target_fields[f], d) for f, d in skeleton.order_by), english_words=names)


# Notebook defaults per feature, chosen on the embedded models (helpers/models/embedded/README.md has the
# measured flip rates for every flag setting): synonyms of the feature's own kind, so the Instruction word and
# the Context spelling differ and the answer has to come from the Context. ENGTABLENAME keeps its distractor.
# The direction and function features corrupt no name: no synonyms by default.
DEFAULT_PAIR_OPTIONS: dict[Feature, PairOptions] = {
    Feature.ENGTABLENAME: PairOptions(use_synonyms_table=True),
    Feature.ENGFIELDNAME: PairOptions(use_synonyms_field=True),
    Feature.DEFTABLENAME: PairOptions(use_synonyms_table=True),
    Feature.DEFFIELDNAME: PairOptions(use_synonyms_field=True),
    Feature.ENGORDERBYFIELD: PairOptions(use_synonyms_field=True),
    Feature.ENGORDERBYDIRECTION: PairOptions(),
    Feature.ENGAGGREGATEFUNCTION: PairOptions(),
    Feature.ENGAGGREGATEFIELD: PairOptions(use_synonyms_field=True),
}
