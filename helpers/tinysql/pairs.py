"""Clean/corrupt prompt pairs for the four patching features.

| feature       | corrupts                                   | clean answer token    | corrupt answer token   |
|---------------|--------------------------------------------|-----------------------|------------------------|
| ENGTABLENAME  | the table's word in the Instruction        | the table (SQL name)  | the corrupt table      |
| ENGFIELDNAME  | the first selected field's Instruction word| that field            | the corrupt field      |
| DEFTABLENAME  | the table's name in the CREATE TABLE       | the table             | the new name           |
| DEFFIELDNAME  | the first selected field's CREATE name     | that field            | the new name           |

Each pair holds token ids built as training built them (prompt and answer tokenized separately), truncated
so that the *last* position predicts the answer token (the original notebook kept the answer token itself
as input and so scored the token after it). Clean and corrupt ids have equal length and differ at exactly
one position; ``corrupted_position`` is derived from the ids, never assumed. Logit differences compare the
SQL names (what the model must write), never a synonym, and a corrupt word never equals the true name.

All pairs of one batch share one skeleton (template, tables, column types, which fields are selected and
sorted) and differ only in the names filling it, so every example has the same length, the same corrupted
position and the same answer position: averaging over examples compares like with like, column by column.

The Eng* corruptions point at something the Context can answer: ENGFIELDNAME swaps in another field of the
same table, and ENGTABLENAME (by default) adds a distractor table to the Context and swaps in its word. A
model that reads the Instruction to decide *which* name and the Context to decide its *spelling* then
changes its answer under all four corruptions.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, replace
from enum import Enum

from helpers.tinysql import vocabulary as V
from helpers.tinysql.sql_items import COMMAND_SETS, Column, GeneratorConfig, SqlItem, TableSchema, generate_item
from helpers.tinysql.tokenization import NotSingleTokenError, encode_prompt_and_answer, single_token_id, tokenizer_name


class Feature(str, Enum):
    ENGTABLENAME = "ENGTABLENAME"
    ENGFIELDNAME = "ENGFIELDNAME"
    DEFTABLENAME = "DEFTABLENAME"
    DEFFIELDNAME = "DEFFIELDNAME"

    @property
    def is_table(self) -> bool:
        return self in (Feature.ENGTABLENAME, Feature.DEFTABLENAME)

    @property
    def in_instruction(self) -> bool:
        return self in (Feature.ENGTABLENAME, Feature.ENGFIELDNAME)


FEATURES: tuple[Feature, ...] = tuple(Feature)

DESCRIPTIONS = {
    Feature.ENGTABLENAME: "the table's word in the English Instruction",
    Feature.ENGFIELDNAME: "a selected field's word in the English Instruction",
    Feature.DEFTABLENAME: "the table's name in the CREATE TABLE Context",
    Feature.DEFFIELDNAME: "a selected field's name in the CREATE TABLE Context",
}


def parse_feature(name: str | Feature) -> Feature:
    """``"DefFieldName"``, ``"DEFFIELDNAME"`` or a Feature; a clear error for anything else."""
    if isinstance(name, Feature):
        return name
    key = str(name).replace("_", "").upper()
    if key not in Feature.__members__:
        raise ValueError(f"Unknown feature {name!r}: choose one of {[f.value for f in FEATURES]}")
    return Feature[key]


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
    """The original notebook's flags, plus the distractor table (None: on for ENGTABLENAME only)."""

    use_novel_names: bool = False  # corrupt with words the model never saw as names (apple, hammer, ...)
    use_synonyms_table: bool = False  # the Instruction names the table by a synonym
    use_synonyms_field: bool = False  # the Instruction names fields by synonyms
    distractor_table: bool | None = None


# ---------------------------------------------------------------------------------------------- words


def _usable_names(tokenizer, names: dict, with_synonyms: bool) -> tuple[str, ...]:
    """Names that are one token, and (when synonyms are used) whose synonyms are one token each too.

    Names or synonyms that are also words of the English templates ("records", "total") are left out: a
    corruption must change the only mention of a word, and the clean prompt must not say it twice.
    """
    def ok(word: str) -> bool:
        return single_token_id(tokenizer, word) is not None and word not in V.TEMPLATE_WORDS

    return tuple(n for n, syns in names.items() if ok(n) and (not with_synonyms or all(ok(w) for w in syns)))


def _word_for(name: str, synonyms: dict, use_synonym: bool, rng: random.Random) -> str:
    return rng.choice(synonyms[name]) if use_synonym and name in synonyms else name


# ---------------------------------------------------------------------------------------------- pairs


def _first_field(item: SqlItem) -> str:
    return item.select[0].field


def _base_item(feature: Feature, cs: int, rng: random.Random, opts: PairOptions, tables, fields) -> SqlItem:
    """A generator item fit for ``feature``: one mention of the corrupted word, answer token reachable."""
    distractor = opts.distractor_table if opts.distractor_table is not None else feature is Feature.ENGTABLENAME
    cfg = GeneratorConfig(
        table_synonym_p=float(opts.use_synonyms_table), field_synonym_p=float(opts.use_synonyms_field),
        distractor_table_p=float(distractor), min_columns=3, max_columns=5, max_selected=2,
        tables=tables, fields=fields,
    )
    for _ in range(1000):
        item = generate_item(cs, rng, cfg)
        target = _first_field(item)
        if item.select[0].aggregate:  # "SUM(price)" tokenizes "price" without its leading space
            continue
        if any(f == target for f, _ in item.order_by):  # the Instruction would mention the field twice
            continue
        mentioned = {s.field for s in item.select} | {f for f, _ in item.order_by}
        if feature is Feature.ENGFIELDNAME and not set(item.schema.field_names) - mentioned:
            continue  # no field the Instruction leaves unmentioned, to swap in
        if feature is Feature.DEFFIELDNAME:
            # Only columns the Instruction asks for (as upstream's two-column tables): after the rename, the
            # renamed column is then the one column no Instruction word matches, and the corrupt answer is
            # well defined. With other unmentioned columns it could be any of them.
            schema = TableSchema(item.table, tuple(c for c in item.schema.columns if c.name in mentioned))
            item = replace(item, tables=tuple(schema if t.name == item.table else t for t in item.tables))
        return item
    raise PairConstructionError(f"could not draw a base item for {feature.value} in CS{cs}")


def _corruption(feature: Feature, item: SqlItem, rng: random.Random, opts: PairOptions, tables, fields):
    """(corrupt item, clean word, corrupt word, clean answer, corrupt answer)."""
    words = item.english_words
    in_context = {t.name for t in item.tables} | {f for t in item.tables for f in t.field_names}
    prompt_words = set(words.values()) | in_context

    if feature is Feature.ENGTABLENAME:
        clean_answer, clean_word = item.table, words[item.table]
        distractors = [t.name for t in item.tables if t.name != item.table]
        if opts.use_novel_names:
            corrupt_answer = rng.choice([w for w in V.NOVEL_TABLES if w not in prompt_words])
            corrupt_word = corrupt_answer
        else:  # the distractor table if there is one, so the Context can answer the corrupt request
            corrupt_answer = distractors[0] if distractors else rng.choice([t for t in tables if t not in prompt_words])
            corrupt_word = _word_for(corrupt_answer, V.TABLES, opts.use_synonyms_table, rng)
        corrupt = item.with_english_word(item.table, corrupt_word)
        return corrupt, clean_word, corrupt_word, clean_answer, corrupt_answer

    if feature is Feature.ENGFIELDNAME:
        clean_answer = _first_field(item)
        clean_word = words[clean_answer]
        mentioned = {s.field for s in item.select} | {f for f, _ in item.order_by}
        unmentioned = [f for f in item.schema.field_names if f not in mentioned]
        if opts.use_novel_names:
            corrupt_answer = corrupt_word = rng.choice([w for w in V.NOVEL_FIELDS if w not in prompt_words])
        else:  # another field of the same table, so the Context can answer the corrupt request
            corrupt_answer = rng.choice(unmentioned)
            corrupt_word = _word_for(corrupt_answer, V.FIELDS, opts.use_synonyms_field, rng)
        corrupt = item.with_english_word(clean_answer, corrupt_word)
        return corrupt, clean_word, corrupt_word, clean_answer, corrupt_answer

    if feature is Feature.DEFTABLENAME:
        clean_answer = item.table
        pool = V.NOVEL_TABLES if opts.use_novel_names else tables
        corrupt_answer = rng.choice([t for t in pool if t not in prompt_words])
        renamed = tuple(TableSchema(corrupt_answer, t.columns) if t.name == item.table else t for t in item.tables)
        english = {**words, corrupt_answer: words[item.table]}  # the Instruction is untouched
        corrupt = replace(item, tables=renamed, table=corrupt_answer, english_words=english)
        return corrupt, clean_answer, corrupt_answer, clean_answer, corrupt_answer

    # DEFFIELDNAME
    clean_answer = _first_field(item)
    pool = V.NOVEL_FIELDS if opts.use_novel_names else fields
    corrupt_answer = rng.choice([f for f in pool if f not in prompt_words])
    schema = item.schema
    columns = tuple(Column(corrupt_answer, c.sql_type) if c.name == clean_answer else c for c in schema.columns)
    tables_ = tuple(TableSchema(t.name, columns) if t.name == item.table else t for t in item.tables)
    select = tuple(replace(s, field=corrupt_answer) if s.field == clean_answer else s for s in item.select)
    english = {**words, corrupt_answer: words[clean_answer]}
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
    for word in (clean_word, corrupt_word, clean_answer, corrupt_answer):
        ids[word] = single_token_id(tokenizer, word)
        if ids[word] is None:
            raise NotSingleTokenError(f"{word!r} is not a single token for tokenizer {name!r} ({feature.value})")

    prompt_ids, answer_ids = encode_prompt_and_answer(tokenizer, clean.prompt, clean.sql)
    corrupt_prompt_ids, _ = encode_prompt_and_answer(tokenizer, corrupt.prompt, clean.sql)
    clean_token_id, corrupt_token_id = ids[clean_answer], ids[corrupt_answer]
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
    if (clean_ids[pos], corrupt_ids[pos]) != (ids[clean_word], ids[corrupt_word]) or pos >= len(prompt_ids):
        raise PairConstructionError(
            f"the differing position {pos} does not hold {clean_word!r}/{corrupt_word!r} in the prompt "
            f"(tokenizer {name!r})")
    return CleanCorruptPair(
        feature=feature, clean_item=clean, corrupt_item=corrupt, clean_word=clean_word, corrupt_word=corrupt_word,
        clean_answer=clean_answer, corrupt_answer=corrupt_answer, clean_ids=clean_ids, corrupt_ids=corrupt_ids,
        corrupted_position=pos, answer_position=len(clean_ids) - 1, clean_token_id=clean_token_id,
        corrupt_token_id=corrupt_token_id, n_prompt_tokens=len(prompt_ids),
    )


def make_pairs(feature: Feature | str, tokenizer, *, cs_num: int = 1, batch_size: int = 5, seed: int = 0,
               use_novel_names: bool = False, use_synonyms_table: bool = False, use_synonyms_field: bool = False,
               distractor_table: bool | None = None) -> list[CleanCorruptPair]:
    """``batch_size`` validated pairs for ``feature``, reproducible from ``seed``.

    Only words that ``tokenizer`` keeps as one token are drawn. ``cs_num`` 0 (base models) uses CS1 items.
    """
    feature = parse_feature(feature)
    cs = max(1, cs_num)
    if cs not in COMMAND_SETS:
        raise ValueError(f"Unknown command set {cs_num!r}: pairs exist for {(0,) + COMMAND_SETS}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    opts = PairOptions(use_novel_names, use_synonyms_table, use_synonyms_field, distractor_table)
    tables = _usable_names(tokenizer, V.TABLES, use_synonyms_table)
    fields = _usable_names(tokenizer, V.FIELDS, use_synonyms_field)
    if len(tables) < 3 or len(fields) < 8:
        raise PairConstructionError(
            f"tokenizer {tokenizer_name(tokenizer)!r} keeps too few vocabulary names as single tokens "
            f"({len(tables)} tables, {len(fields)} fields) to build {feature.value} pairs")
    if use_novel_names:
        novel = V.NOVEL_TABLES if feature.is_table else V.NOVEL_FIELDS
        bad = [w for w in novel if single_token_id(tokenizer, w) is None]
        if bad:
            raise NotSingleTokenError(f"novel words {bad} are not single tokens for {tokenizer_name(tokenizer)!r}")

    rng = random.Random(f"pairs-{feature.value}-cs{cs}-{seed}-{opts}")
    pairs, failures = [], []
    skeleton = _base_item(feature, cs, rng, opts, tables, fields)
    while len(pairs) < batch_size:
        if len(failures) > 20 * batch_size + 50:
            raise PairConstructionError(f"{len(failures)} failed attempts building {feature.value} pairs; last: "
                                        f"{failures[-1]}")
        if not pairs and len(failures) >= 10:  # a skeleton that does not tokenize cleanly: draw another
            skeleton = _base_item(feature, cs, rng, opts, tables, fields)
        item = _fill_skeleton(skeleton, feature, rng, opts, tables, fields)
        try:
            corrupt, cw, xw, ca, xa = _corruption(feature, item, rng, opts, tables, fields)
            pair = build_pair(feature, item, corrupt, tokenizer, clean_word=cw, corrupt_word=xw,
                              clean_answer=ca, corrupt_answer=xa)
            if pairs and _shape(pair) != _shape(pairs[0]):
                raise PairConstructionError(f"pair shape {_shape(pair)} differs from the batch's {_shape(pairs[0])}")
            pairs.append(pair)
        except (PairConstructionError, NotSingleTokenError, IndexError, ValueError) as err:  # rare: draw again
            failures.append(err)
    return pairs


def _shape(pair: CleanCorruptPair) -> tuple[int, int, int]:
    return len(pair.clean_ids), pair.corrupted_position, pair.answer_position


def _fill_skeleton(skeleton: SqlItem, feature: Feature, rng: random.Random, opts: PairOptions, tables,
                   fields) -> SqlItem:
    """The skeleton with fresh names: a distinct table name per table and a distinct field per column slot.

    Everything else (templates, types, which slots are selected, sorted or aggregated) is kept, so with
    single-token names every filled item tokenizes to the same length with the same positions. For
    ENGTABLENAME the distractor table also has the selected fields, so the corrupt request is answerable.
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
    if feature is Feature.ENGTABLENAME:
        selected = [s.field for s in select]
        schemas = [t if t.name == table else TableSchema(t.name, tuple(
            Column(selected[i], c.sql_type) if i < len(selected) else c for i, c in enumerate(t.columns)))
            for t in schemas]
    words = {table: _word_for(table, V.TABLES, opts.use_synonyms_table, rng)}
    for f in target_fields.values():
        words[f] = _word_for(f, V.FIELDS, opts.use_synonyms_field, rng)
    return replace(skeleton, tables=tuple(schemas), table=table, select=select,
                   order_by=tuple((target_fields[f], d) for f, d in skeleton.order_by), english_words=words)


# Notebook defaults per feature, chosen on the embedded models (helpers/models/embedded/README.md has the
# measured flip rates for every flag setting): synonyms of the feature's own kind, so the Instruction word and
# the Context spelling differ and the answer has to come from the Context. ENGTABLENAME keeps its distractor.
DEFAULT_PAIR_OPTIONS: dict[Feature, PairOptions] = {
    Feature.ENGTABLENAME: PairOptions(use_synonyms_table=True),
    Feature.ENGFIELDNAME: PairOptions(use_synonyms_field=True),
    Feature.DEFTABLENAME: PairOptions(use_synonyms_table=True),
    Feature.DEFFIELDNAME: PairOptions(use_synonyms_field=True),
}
