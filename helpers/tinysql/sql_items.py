"""TinySQL items: one English request, its CREATE TABLE context and the SQL answer, for command sets 1-3.

- CS1: ``SELECT f1, f2 FROM t``
- CS2: CS1 + ``ORDER BY a ASC, b DESC`` (present in 90% of items, as upstream)
- CS3: CS2 + aggregates ``SUM(f) AS SUM_f`` (allowed per column type class)

The Context may hold a second, distractor table: the Instruction then decides which table (and which of
its fields) the SQL uses, and the Context decides their spelling. Generation is seeded: the same seed and
arguments give the same items.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass, field, replace

from helpers.tinysql import vocabulary as V
from helpers.tinysql.word_sets import parse_word_set

COMMAND_SETS = (1, 2, 3)


@dataclass(frozen=True)
class Column:
    name: str
    sql_type: str


@dataclass(frozen=True)
class TableSchema:
    name: str
    columns: tuple[Column, ...]

    @property
    def field_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns)

    def create_statement(self) -> str:
        cols = ", ".join(f"{c.name} {c.sql_type}" for c in self.columns)
        return f"CREATE TABLE {self.name} ( {cols} )"


@dataclass(frozen=True)
class SelectItem:
    field: str
    aggregate: str | None = None  # SUM/AVG/MIN/MAX/COUNT (CS3)

    def sql(self) -> str:
        if self.aggregate is None:
            return self.field
        return f"{self.aggregate}({self.field}) AS {self.aggregate}_{self.field}"


@dataclass(frozen=True)
class SqlItem:
    """One TinySQL example. ``english_words`` records the word the Instruction uses for each name."""

    command_set: int
    tables: tuple[TableSchema, ...]  # the Context, in order
    table: str  # the table the SQL selects from
    select: tuple[SelectItem, ...]
    order_by: tuple[tuple[str, str], ...]  # (field, "ASC"|"DESC")
    english_words: dict = field(default_factory=dict, hash=False, compare=False)  # name -> word used
    select_template: str = ""
    order_templates: tuple[str, ...] = ()
    aggregate_templates: tuple[str, ...] = ()
    filler: str = ""  # English filler after the request (training only, GeneratorConfig.filler_p)
    order_joiner: str = ", "  # between the request and each sort phrase (the word set's)

    @property
    def schema(self) -> TableSchema:
        return next(t for t in self.tables if t.name == self.table)

    @property
    def english(self) -> str:
        return render_english(self)

    @property
    def context(self) -> str:
        return " ".join(t.create_statement() for t in self.tables)

    @property
    def sql(self) -> str:
        text = f"SELECT {', '.join(s.sql() for s in self.select)} FROM {self.table}"
        if self.order_by:
            text += " ORDER BY " + ", ".join(f"{f} {d}" for f, d in self.order_by)
        return text

    @property
    def prompt(self) -> str:
        return format_prompt(self.english, self.context)

    def with_english_word(self, name: str, word: str) -> "SqlItem":
        """The same item whose Instruction says ``word`` for ``name`` (the SQL is unchanged)."""
        return replace(self, english_words={**self.english_words, name: word})


def format_prompt(english: str, context: str) -> str:
    """The training prompt: ``### Instruction: … ### Context: … ### Response: `` (whitespace collapsed, one
    trailing space), exactly as upstream's ``get_alpaca_prompt``."""
    text = f"### Instruction: {english} ### Context: {context} ### Response:"
    return re.sub(r"\s+", " ", text).strip() + " "


def join_english_list(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def render_english(item: SqlItem) -> str:
    words = item.english_words
    parts = []
    for sel, agg_template in zip(item.select, item.aggregate_templates or (None,) * len(item.select)):
        word = words[sel.field]
        parts.append(agg_template.replace("[field]", word) if sel.aggregate and agg_template else word)
    text = item.select_template.replace("[fields]", join_english_list(parts)).replace("[table]", words[item.table])
    for (f, _), template in zip(item.order_by, item.order_templates):
        text += item.order_joiner + template.replace("[field]", words[f]) if template else ""
    return text + (", " + item.filler if item.filler else "")


@dataclass
class GeneratorConfig:
    """Knobs of the item generator. Probabilities are per item (table) or per mention (field)."""

    table_synonym_p: float = 0.8  # Instruction says a synonym of the table (upstream's semantic data: 0.8)
    field_synonym_p: float = 0.5
    distractor_table_p: float = 0.5  # a second table in the Context
    min_columns: int = 2
    max_columns: int = 6
    max_selected: int = 3
    order_by_p: float = 0.9  # CS2+: share of items with ORDER BY
    max_order_by: int = 2
    aggregate_p: float = 0.5  # CS3: chance that a selected field is aggregated
    # With ONE table in the Context: chance that the Instruction names another vocabulary table (by its name
    # or a synonym) while the SQL uses the Context's table. Teaches that the schema, not the Instruction, decides
    # the spelling (0 keeps the generator's random stream unchanged).
    table_rename_p: float = 0.0
    # Chance that each name in the Context (tables and columns) is spelled as one of its synonyms; the SQL copies
    # the Context's spelling. The Instruction still says the name or any synonym: it decides WHICH, the Context
    # decides the spelling, so the answer cannot be recalled from the Instruction alone.
    context_spelling_p: float = 0.0
    # Chance of an item whose Instruction mentions every column of the target table and one of them is spelled
    # in the Context as an unrelated vocabulary field (the only column no Instruction word matches); the SQL
    # uses the Context's name. Teaches that a name absent from the Context is never written.
    field_rename_p: float = 0.0
    # CS2+, with a field rename: chance that one unselected column stays too, mentioned only by ORDER BY (the
    # shape of the DEF* pairs that sort by another column): the rename is then found by elimination over the
    # selected *and* sorted columns. 0 keeps the generator's random stream unchanged.
    field_rename_sorted_p: float = 0.0
    # Chance of an English filler phrase holding a novel word (vocabulary.FILLER_TEMPLATES): the novel words are
    # then familiar words that are never names.
    filler_p: float = 0.0
    # Chance that each name in the Context is spelled as a nonce token (vocabulary.NONCE_NAMES) that the SQL copies:
    # teaches copying of any schema token, not only learnt names.
    nonce_name_p: float = 0.0
    # Chance that a filler's word is a nonce name (one the item's schema does not hold) instead of a novel word:
    # the nonce names are then words of the English filler *and* names, so having been seen in filler is no
    # evidence that a token is never a name (the novel words stay filler only). 0 keeps the random stream unchanged.
    filler_nonce_p: float = 0.0
    tables: tuple[str, ...] = tuple(V.TABLES)
    fields: tuple[str, ...] = tuple(V.FIELDS)
    words: str = "suite"  # the word set (helpers.tinysql.word_sets): synonyms, types, English templates


def _english_word(rng: random.Random, name: str, synonyms: dict, p: float) -> str:
    return rng.choice(synonyms[name]) if name in synonyms and rng.random() < p else name


def random_schema(rng: random.Random, name: str, cfg: GeneratorConfig, exclude_fields=()) -> TableSchema:
    n = rng.randint(cfg.min_columns, cfg.max_columns)
    pool = [f for f in cfg.fields if f not in exclude_fields]
    names = rng.sample(pool, n)
    types = parse_word_set(cfg.words).column_types
    return TableSchema(name, tuple(Column(f, rng.choice(types)) for f in names))


def generate_item(cs: int, rng: random.Random, cfg: GeneratorConfig | None = None) -> SqlItem:
    """One random item of command set ``cs``."""
    if cs not in COMMAND_SETS:
        raise ValueError(f"Unknown command set {cs!r}: the generator knows {COMMAND_SETS}")
    cfg = cfg or GeneratorConfig()
    ws = parse_word_set(cfg.words)
    n_tables = 2 if rng.random() < cfg.distractor_table_p else 1
    table_names = rng.sample(list(cfg.tables), n_tables)
    schemas = [random_schema(rng, t, cfg) for t in table_names]
    target = schemas[0]
    rng.shuffle(schemas)

    fields = list(target.field_names)
    if ws.select_leading_columns:
        selected = fields[:cfg.max_selected]
    else:
        selected = rng.sample(fields, rng.randint(1, min(cfg.max_selected, len(fields))))
    field_rename = cfg.field_rename_p > 0 and rng.random() < cfg.field_rename_p
    sorted_extra = None  # an unselected column kept with the rename, which ORDER BY then mentions
    if field_rename and cs >= 2 and cfg.field_rename_sorted_p > 0 and len(fields) > len(selected) \
            and rng.random() < cfg.field_rename_sorted_p:
        sorted_extra = rng.choice([f for f in fields if f not in selected])
    if field_rename:  # keep only the mentioned columns (selected, or sorted_extra), so every column is mentioned
        kept = set(selected) | {sorted_extra}
        restricted = TableSchema(target.name, tuple(c for c in target.columns if c.name in kept))
        schemas = [restricted if t.name == target.name else t for t in schemas]
        target = restricted
        fields = list(target.field_names)
    types = {c.name: c.sql_type for c in target.columns}
    select, agg_templates = [], []
    for f in selected:
        agg = None
        if cs >= 3 and rng.random() < cfg.aggregate_p:
            agg = rng.choice(V.allowed_aggregates(types[f]))
        select.append(SelectItem(f, agg))
        agg_templates.append(rng.choice(ws.aggregate_templates[agg]) if agg else "")

    order_by, order_templates = [], []
    if sorted_extra is not None:  # sorted by the kept column, then perhaps by a selected one
        others = [f for f in fields if f != sorted_extra]
        sort_fields = [sorted_extra] + rng.sample(others, rng.randint(0, min(cfg.max_order_by - 1, len(others))))
    elif cs >= 2 and rng.random() < cfg.order_by_p:
        sort_fields = rng.sample(fields, rng.randint(1, min(cfg.max_order_by, len(fields))))
    else:
        sort_fields = []
    if sort_fields:
        for f in sort_fields:
            direction = rng.choice(("ASC", "DESC"))
            order_by.append((f, direction))
            order_templates.append(rng.choice(ws.order_templates[direction]))

    words = {target.name: _english_word(rng, target.name, ws.tables, cfg.table_synonym_p)}
    if cfg.table_rename_p > 0 and n_tables == 1 and rng.random() < cfg.table_rename_p:
        other = rng.choice([t for t in cfg.tables if t != target.name])
        words[target.name] = _english_word(rng, other, ws.tables, cfg.table_synonym_p)
    for f in fields:  # one word per field, reused by every mention so the Instruction is consistent
        words[f] = _english_word(rng, f, ws.fields, cfg.field_synonym_p)
    spelling: dict[str, str] = {}
    if field_rename:
        used = {n for t in schemas for n in (t.name, *t.field_names)} | set(words.values())
        used |= {w for n in used for w in ws.fields.get(n, ())}
        old = rng.choice(selected)
        spelling[old] = rng.choice([f for f in cfg.fields if f not in used])
    if cfg.context_spelling_p > 0:
        for t in schemas:
            for name in (t.name, *t.field_names):
                current = spelling.get(name, name)
                syns = ws.tables.get(current, ()) if name == t.name else ws.fields.get(current, ())
                if syns and rng.random() < cfg.context_spelling_p:
                    spelling[name] = rng.choice(syns)
    if cfg.nonce_name_p > 0:
        used = {spelling.get(n, n) for t in schemas for n in (t.name, *t.field_names)}
        pool = [w for w in V.NONCE_NAMES if w not in used]
        for t in schemas:
            for name in (t.name, *t.field_names):
                if rng.random() < cfg.nonce_name_p:
                    spelling[name] = pool.pop(rng.randrange(len(pool)))
    filler = ""
    if cfg.filler_p > 0 and rng.random() < cfg.filler_p:
        filler_template = rng.choice(V.FILLER_TEMPLATES)
        if cfg.filler_nonce_p > 0 and rng.random() < cfg.filler_nonce_p:
            held = {spelling.get(n, n) for t in schemas for n in (t.name, *t.field_names)}
            word = rng.choice([w for w in V.NONCE_NAMES if w not in held])
        else:
            word = rng.choice(V.NOVEL_TABLES + V.NOVEL_FIELDS)
        filler = filler_template.replace("[w]", word)
    template = rng.choice(ws.select_templates)
    if spelling:
        m = lambda n: spelling.get(n, n)  # noqa: E731
        schemas = [TableSchema(m(t.name), tuple(Column(m(c.name), c.sql_type) for c in t.columns)) for t in schemas]
        select = [SelectItem(m(x.field), x.aggregate) for x in select]
        order_by = [(m(f), d) for f, d in order_by]
        words = {m(k): v for k, v in words.items()}
        target = next(t for t in schemas if t.name == m(target.name))
    return SqlItem(
        command_set=cs, tables=tuple(schemas), table=target.name, select=tuple(select),
        order_by=tuple(order_by), english_words=words, select_template=template,
        order_templates=tuple(order_templates), aggregate_templates=tuple(agg_templates), filler=filler,
        order_joiner=ws.order_joiner,
    )


def generate_items(cs: int, n: int, seed: int, cfg: GeneratorConfig | None = None) -> list[SqlItem]:
    """``n`` items of command set ``cs``, reproducible from ``seed``."""
    rng = random.Random(f"tinysql-cs{cs}-{seed}")
    return [generate_item(cs, rng, cfg) for _ in range(n)]
