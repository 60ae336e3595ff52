"""Word sets for clean/corrupt pairs: the suite's own vocabulary, or upstream's patching words and phrasing.

- ``"suite"``: this project's vocabulary (``helpers.tinysql.vocabulary``): 42 tables, 70 fields, two synonyms each,
  16 select templates, the column types of training. The embedded models were trained on it.
- ``"upstream"``: the words, template and layout of upstream TinySQL's patching generator
  (``CorruptFeatureTestGenerator`` at 54fa129; ../shared/docs/upstream-tinysql.md section 3b), which made the
  original notebook's published heatmaps: 7 tables and 19 fields with one synonym each, the novel words, the types
  INT/CHAR/TIME/TEXT/JSON, two columns both selected in column order, ``show me the {fields} from the {table}
  table`` and `` ordered by {field} in ascending|descending order``. The released hub checkpoints were trained on
  upstream's data. Upstream never built ORDER BY or aggregate pairs; for those features the upstream set keeps
  its words and template and adds what the feature needs (a third, unselected column to sort by; the suite's
  aggregate phrases "total price", "average price", ...).

Upstream's synonyms overlap its names (amount, total, title and category are fields *and* synonyms); a pair whose
Instruction word for one column is another column's name is drawn again, so every pair is unambiguous. Its Eng*
corruptions draw words the Context may not hold, as upstream's did. ``GeneratorConfig(words=...)`` changes only
synonyms, types and templates: ``make_pairs`` also sets the word set's tables, fields and column counts.
"""
from __future__ import annotations

from dataclasses import dataclass

from helpers.tinysql import vocabulary as V


@dataclass(frozen=True)
class WordSet:
    name: str
    tables: dict  # name -> synonyms
    fields: dict
    novel_tables: tuple[str, ...]
    novel_fields: tuple[str, ...]
    column_types: tuple[str, ...]
    select_templates: tuple[str, ...]
    order_templates: dict  # "ASC"/"DESC" -> phrases with [field]
    aggregate_templates: dict  # SUM/AVG/... -> phrases with [field]
    order_joiner: str = ", "  # between the request and a sort phrase
    min_columns: int = 3
    max_columns: int = 5
    max_selected: int = 2
    select_leading_columns: bool = False  # upstream: the first max_selected columns, in column order
    # Eng* corruptions swap in a name the Context holds (a distractor table, an unmentioned column), so the Context
    # can answer the corrupt request; upstream draws any other word of its lists.
    corrupt_from_context: bool = True

    @property
    def template_words(self) -> frozenset[str]:
        texts = self.select_templates + tuple(t for ts in self.order_templates.values() for t in ts)
        texts += tuple(t for ts in self.aggregate_templates.values() for t in ts)
        return frozenset(w for t in texts for w in t.replace(",", " ").split() if not w.startswith("["))


SUITE = WordSet(
    name="suite", tables=V.TABLES, fields=V.FIELDS, novel_tables=V.NOVEL_TABLES, novel_fields=V.NOVEL_FIELDS,
    column_types=V.ALL_TYPES, select_templates=V.SELECT_TEMPLATES, order_templates=V.ORDER_TEMPLATES,
    aggregate_templates=V.AGGREGATE_TEMPLATES,
)

UPSTREAM_TABLES: dict[str, tuple[str, ...]] = {
    "people": ("children",), "inventory": ("stock",), "orders": ("requests",), "products": ("goods",),
    "items": ("objects",), "users": ("customers",), "links": ("connections",),
}
UPSTREAM_FIELDS: dict[str, tuple[str, ...]] = {
    "price": ("cost",), "count": ("quantity",), "amount": ("total",), "total": ("sum",), "name": ("title",),
    "code": ("reference",), "number": ("identifier",), "label": ("tag",), "type": ("category",),
    "category": ("class",), "status": ("state",), "title": ("heading",), "date": ("time",), "value": ("amount",),
    "rating": ("score",), "color": ("shade",), "size": ("dimension",), "weight": ("mass",), "duration": ("period",),
}

UPSTREAM = WordSet(
    name="upstream", tables=UPSTREAM_TABLES, fields=UPSTREAM_FIELDS, novel_tables=V.NOVEL_TABLES,
    novel_fields=V.NOVEL_FIELDS, column_types=("INT", "CHAR", "TIME", "TEXT", "JSON"),
    select_templates=("show me the [fields] from the [table] table",),
    order_templates={"ASC": ("ordered by [field] in ascending order",),
                     "DESC": ("ordered by [field] in descending order",)},
    aggregate_templates=V.AGGREGATE_TEMPLATES, order_joiner=" ", min_columns=2, max_columns=2, max_selected=2,
    select_leading_columns=True, corrupt_from_context=False,
)

WORD_SETS: dict[str, WordSet] = {"suite": SUITE, "upstream": UPSTREAM}


def parse_word_set(name: str | WordSet) -> WordSet:
    """``"suite"`` or ``"upstream"`` (any case); a clear error for anything else."""
    if isinstance(name, WordSet):
        return name
    key = str(name).strip().lower()
    if key not in WORD_SETS:
        raise ValueError(f"Unknown vocabulary {name!r}: choose one of {list(WORD_SETS)}")
    return WORD_SETS[key]


def default_vocabulary(model_num) -> str:
    """"upstream" for the hub models (model_num 0-5, trained on upstream's data), else "suite"."""
    return "suite" if model_num is None or str(model_num).strip().lower() == "embedded" else "upstream"


def resolve_vocabulary(vocabulary, model_num) -> str:
    """The word set's name: ``vocabulary`` in any case, or the model's own where it is unset (None, "", "None" as
    papermill or YAML may pass it, "auto")."""
    unset = vocabulary is None or str(vocabulary).strip() in ("", "None", "auto")
    return parse_word_set(default_vocabulary(model_num) if unset else vocabulary).name
