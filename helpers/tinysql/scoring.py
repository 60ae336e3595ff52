"""Scoring a predicted SQL string against the ground truth for TinySQL command sets 1-3.

Command sets covered (see ../shared/docs/upstream-tinysql.md section 2):

* CS1: ``SELECT f1, f2 FROM t``
* CS2: CS1 + optional ``ORDER BY a ASC, b DESC`` (one explicit direction per clause)
* CS3: CS2 where select items may be ``AGG(f) AS AGG_f`` (SUM/AVG/MIN/MAX/COUNT)

Written fresh; it does not reproduce upstream's point scheme, whose verified
leniencies (missing ORDER BY, wrong direction, swapped field order and a missing
``AS`` alias all scoring 1.0, "hello world" scoring 0.64) this module rules out.

Public API
----------
``normalize_sql(s) -> str``
    Canonical form: trailing EOS markers and whitespace removed, whitespace
    between tokens normalised (``a,b`` == ``a , b`` == ``a, b``,
    ``SUM( x )`` == ``SUM(x)``). Case is kept.
``exact_match(predicted, truth) -> bool``
    Token sequences equal after :func:`normalize_sql`'s normalisation.
    **Decision: fully case-sensitive**, keywords and identifiers alike. TinySQL
    names are lower-case snake_case and keywords upper-case in every training
    target, so ``select`` or ``Price`` is a different token sequence from what
    the model was trained to emit; such an answer is not an exact match (it
    still gets partial credit, at most 0.9, from :func:`partial_score`).
    Only *trailing* EOS markers are ignored; text after an EOS in the middle
    of the string stays and counts.
``parse_sql(sql) -> ParsedSql | None``
    Tolerant parser. ``None`` when there is no ``SELECT`` keyword at all;
    otherwise the longest well-formed prefix starting at the first ``SELECT``,
    with the tokens before it and after it reported as junk. Keywords are
    recognised case-insensitively (and the case slips counted); identifiers
    keep their case.
``score_breakdown(predicted, truth) -> dict``
    All components (see below) plus the final ``score``.
``partial_score(predicted, truth) -> float``
    ``score_breakdown(...)["score"]``, in [0, 1].

Scoring
-------
::

    score = 1.0                                   if exact_match(predicted, truth)
          = 0.9 * structure * junk_factor         otherwise

So 10% of the scale is reserved for exactness: 1.0 iff exact match, and every
non-exact answer scores at most 0.9 (lower-case keywords, a missing alias, a
wrong direction, a dropped ORDER BY, ... each lose at least that 0.1).

``structure`` is the weighted mean (weights :data:`WEIGHTS`) of the
*applicable* components, each in [0, 1]:

* ``table``: predicted table equals the truth's.
* ``select_fields``: F1 of the multiset of selected field names (aggregate
  ignored); precision and recall are reported too.
* ``select_order``: among matched select items, the longest run kept in the
  truth's relative order / number matched (0 when nothing matched).
* ``aggregates``: fraction of matched select items whose aggregate (or absence
  of one) is right; a spurious ``SUM(...)`` on a CS1 field counts as wrong.
* ``aliases``: per matched item 1 if the alias matches and is written with
  ``AS`` (or both have none), 0.5 for the right alias without ``AS``, else 0.
* ``order_by_presence``: the prediction has an ORDER BY iff the truth does.
  Applicable when either has one.
* ``order_by_fields``: F1 of ORDER BY field multisets.
* ``order_by_directions``: fraction of matched ORDER BY clauses with the right
  direction (a missing direction is wrong; truths always have one).
* ``order_by_order``: like ``select_order`` for ORDER BY clauses.
  (The last three apply only when the truth has an ORDER BY.)

``junk_factor = query_tokens / (query_tokens + junk_tokens)``: the fraction of
the output's tokens that the parser accounted for as the query. Text before the
first SELECT, anything after the query (e.g. a second copy of the answer), a
trailing ``;`` and dangling commas are junk. An unparseable prediction (no
SELECT) scores 0, as does an empty one.

If the *truth* is not a complete CS1-3 query (e.g. a CS4 ``WHERE``), the score
falls back to ``0.9 * difflib ratio of the token sequences`` (1.0 when exact)
and the breakdown says ``fallback: True``.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from typing import Optional

__all__ = [
    "AGGREGATES",
    "EOS_MARKERS",
    "WEIGHTS",
    "SelectItem",
    "OrderItem",
    "ParsedSql",
    "tokenize",
    "normalize_sql",
    "exact_match",
    "parse_sql",
    "score_breakdown",
    "partial_score",
]

AGGREGATES = ("SUM", "AVG", "MIN", "MAX", "COUNT")
DIRECTIONS = ("ASC", "DESC")

# Trailing end-of-sequence / padding markers of the tokenizers in use (GPT-2/Neo,
# Llama 2/3, Qwen, Gemma, T5-style).
EOS_MARKERS = (
    "<|endoftext|>",
    "<|end_of_text|>",
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|eos|>",
    "<|pad|>",
    "</s>",
    "<eos>",
    "<pad>",
    "[EOS]",
    "[PAD]",
)

# Words that are never taken as an (upper-case) identifier or as an implicit alias.
_KEYWORDS = frozenset(
    """SELECT FROM ORDER BY AS ASC DESC WHERE JOIN ON GROUP HAVING LIMIT AND OR NOT
    LEFT RIGHT INNER OUTER UNION DISTINCT OFFSET INTO VALUES INSERT UPDATE DELETE""".split()
)

WEIGHTS = {
    "table": 0.15,
    "select_fields": 0.25,
    "select_order": 0.10,
    "aggregates": 0.075,
    "aliases": 0.075,
    "order_by_presence": 0.075,
    "order_by_fields": 0.125,
    "order_by_directions": 0.10,
    "order_by_order": 0.05,
}
EXACT_RESERVE = 0.1  # share of the scale only an exact match earns

_TOKEN_RE = re.compile(r"\w+|[^\w\s]")
_IDENT_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


# --------------------------------------------------------------------------- normalisation


def _strip_trailing_eos(s: str) -> str:
    s = s.rstrip()
    changed = True
    while changed:
        changed = False
        for m in EOS_MARKERS:
            if s.endswith(m):
                s = s[: -len(m)].rstrip()
                changed = True
    return s


def tokenize(sql: Optional[str]) -> list[str]:
    """Tokens after dropping trailing EOS markers: words (``\\w+``) and single
    punctuation characters. Whitespace is not a token, so spacing never matters."""
    if not sql:
        return []
    return _TOKEN_RE.findall(_strip_trailing_eos(str(sql)))


def _render(tokens: list[str]) -> str:
    out = ""
    prev = None
    for t in tokens:
        if prev is None:
            out = t
        elif t in (",", ")") or prev == "(":
            out += t
        elif t == "(" and (prev[-1].isalnum() or prev[-1] == "_"):
            out += t  # function call: SUM(x)
        else:
            out += " " + t
        prev = t
    return out


def normalize_sql(sql: Optional[str]) -> str:
    """Canonical spacing of ``sql``: ``SELECT SUM(a) AS SUM_a, b FROM t ORDER BY b ASC``."""
    return _render(tokenize(sql))


def exact_match(predicted: Optional[str], truth: Optional[str]) -> bool:
    """True iff the token sequences are identical (case-sensitive; whitespace and
    trailing EOS markers ignored). Two empty strings do not match."""
    p, t = tokenize(predicted), tokenize(truth)
    return bool(t) and p == t


# --------------------------------------------------------------------------- parsing


@dataclass(frozen=True)
class SelectItem:
    field: str  # column name, or "*"
    agg: Optional[str] = None  # "SUM" ... "COUNT", upper-cased
    alias: Optional[str] = None
    has_as: bool = False  # alias written with AS (vs implicit "SUM(x) SUM_x")

    def to_sql(self) -> str:
        s = f"{self.agg}({self.field})" if self.agg else self.field
        if self.alias is not None:
            s += f" AS {self.alias}" if self.has_as else f" {self.alias}"
        return s


@dataclass(frozen=True)
class OrderItem:
    field: str
    direction: Optional[str] = None  # "ASC" / "DESC" / None when omitted

    def to_sql(self) -> str:
        return f"{self.field} {self.direction}" if self.direction else self.field


@dataclass(frozen=True)
class ParsedSql:
    select: tuple[SelectItem, ...] = ()
    table: Optional[str] = None
    has_order_by: bool = False
    order_by: tuple[OrderItem, ...] = ()
    junk_before: tuple[str, ...] = ()  # tokens before the first SELECT
    junk_after: tuple[str, ...] = ()  # tokens after the well-formed prefix
    inline_junk: int = 0  # stray tokens skipped inside the query (dangling commas)
    query_tokens: int = field(default=0, compare=False)  # tokens accounted for by the query
    keyword_case_errors: int = 0  # keywords / aggregates not written in upper case
    has_from: bool = False

    @property
    def junk_tokens(self) -> int:
        return len(self.junk_before) + len(self.junk_after) + self.inline_junk

    @property
    def complete(self) -> bool:
        """A whole CS1-3 query with nothing left over."""
        return (
            bool(self.select)
            and self.table is not None
            and self.junk_tokens == 0
            and (not self.has_order_by or bool(self.order_by))
        )

    def to_sql(self) -> str:
        """Canonical SQL of the parsed query (junk dropped, keywords upper-case)."""
        parts = ["SELECT"]
        if self.select:
            parts.append(", ".join(i.to_sql() for i in self.select))
        if self.has_from:
            parts.append("FROM")
            if self.table is not None:
                parts.append(self.table)
        if self.has_order_by:
            parts.append("ORDER BY")
            if self.order_by:
                parts.append(", ".join(o.to_sql() for o in self.order_by))
        return " ".join(parts)


class _Parser:
    def __init__(self, toks: list[str], start: int):
        self.t = toks
        self.i = start
        self.case_errors = 0
        self.inline_junk = 0

    def peek(self, k: int = 0) -> Optional[str]:
        j = self.i + k
        return self.t[j] if j < len(self.t) else None

    def is_kw(self, kw: str, k: int = 0) -> bool:
        tok = self.peek(k)
        return tok is not None and tok.upper() == kw

    def take_kw(self, kw: str) -> bool:
        if self.is_kw(kw):
            if self.t[self.i] != kw:
                self.case_errors += 1
            self.i += 1
            return True
        return False

    def ident_ok(self, k: int = 0) -> bool:
        tok = self.peek(k)
        if tok is None or not _IDENT_RE.match(tok):
            return False
        # an upper-case SQL keyword is structure, not a name; lower-case "order" may be a name
        return not (tok.isupper() and tok in _KEYWORDS)

    def implicit_alias_ok(self) -> bool:
        tok = self.peek()
        return self.ident_ok() and tok.upper() not in _KEYWORDS

    def select_item(self) -> Optional[SelectItem]:
        save, save_err = self.i, self.case_errors
        tok = self.peek()
        agg = None
        if tok is not None and tok.upper() in AGGREGATES and self.peek(1) == "(":
            agg = tok.upper()
            if tok != agg:
                self.case_errors += 1
            self.i += 2
            if self.ident_ok() or self.peek() == "*":
                fld = self.t[self.i]
                self.i += 1
            else:
                self.i, self.case_errors = save, save_err
                return None
            if self.peek() != ")":
                self.i, self.case_errors = save, save_err
                return None
            self.i += 1
        elif self.ident_ok() or tok == "*":
            fld = tok
            self.i += 1
        else:
            return None
        alias, has_as = None, False
        if self.is_kw("AS") and self.ident_ok(1):
            self.take_kw("AS")
            alias, has_as = self.t[self.i], True
            self.i += 1
        elif self.implicit_alias_ok():
            alias = self.t[self.i]
            self.i += 1
        return SelectItem(fld, agg, alias, has_as)

    def order_item(self) -> Optional[OrderItem]:
        if not self.ident_ok():
            return None
        fld = self.t[self.i]
        self.i += 1
        direction = None
        for d in DIRECTIONS:
            if self.take_kw(d):
                direction = d
                break
        return OrderItem(fld, direction)

    def item_list(self, parse_one) -> list:
        items = []
        first = parse_one()
        if first is None:
            return items
        items.append(first)
        while self.peek() == ",":
            self.i += 1
            nxt = parse_one()
            if nxt is None:  # dangling comma: skip it as junk, end the list
                self.inline_junk += 1
                break
            items.append(nxt)
        return items


def parse_sql(sql: Optional[str]) -> Optional[ParsedSql]:
    """Parse a (possibly garbled) CS1-3 query. ``None`` if there is no SELECT."""
    toks = tokenize(sql)
    start = next((k for k, tok in enumerate(toks) if tok.upper() == "SELECT"), None)
    if start is None:
        return None
    p = _Parser(toks, start)
    p.take_kw("SELECT")
    select = p.item_list(p.select_item)
    table, has_from = None, False
    if p.is_kw("FROM"):
        p.take_kw("FROM")
        has_from = True
        if p.ident_ok():
            table = p.t[p.i]
            p.i += 1
    has_order_by, order_by = False, []
    if p.is_kw("ORDER") and p.is_kw("BY", 1):
        p.take_kw("ORDER")
        p.take_kw("BY")
        has_order_by = True
        order_by = p.item_list(p.order_item)
    return ParsedSql(
        select=tuple(select),
        table=table,
        has_order_by=has_order_by,
        order_by=tuple(order_by),
        junk_before=tuple(toks[:start]),
        junk_after=tuple(toks[p.i :]),
        inline_junk=p.inline_junk,
        query_tokens=p.i - start - p.inline_junk,
        keyword_case_errors=p.case_errors,
        has_from=has_from,
    )


# --------------------------------------------------------------------------- scoring


def _match(pred: list[str], truth: list[str]) -> list[tuple[int, int]]:
    """Greedy multiset matching by name: (pred_index, truth_index) pairs, in truth order."""
    used: set[int] = set()
    pairs = []
    for ti, name in enumerate(truth):
        for pi, pname in enumerate(pred):
            if pi not in used and pname == name:
                used.add(pi)
                pairs.append((pi, ti))
                break
    return pairs


def _f1(n_match: int, n_pred: int, n_truth: int) -> tuple[float, float, float]:
    if n_pred == 0 and n_truth == 0:
        return 1.0, 1.0, 1.0
    precision = n_match / n_pred if n_pred else 0.0
    recall = n_match / n_truth if n_truth else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def _order_score(pairs: list[tuple[int, int]]) -> float:
    """Longest increasing subsequence of truth positions taken in predicted order,
    over the number matched. 0 when nothing matched."""
    if not pairs:
        return 0.0
    seq = [ti for _, ti in sorted(pairs)]
    best = [1] * len(seq)
    for a in range(len(seq)):
        for b in range(a):
            if seq[b] < seq[a]:
                best[a] = max(best[a], best[b] + 1)
    return max(best) / len(seq)


def _alias_score(p: SelectItem, t: SelectItem) -> float:
    if t.alias is None:
        return 1.0 if p.alias is None else 0.0
    if p.alias != t.alias:
        return 0.0
    return 1.0 if p.has_as == t.has_as else 0.5


_COMPONENTS = tuple(WEIGHTS)


def score_breakdown(predicted: Optional[str], truth: Optional[str]) -> dict:
    """Score components of ``predicted`` against ``truth`` (see the module docstring).

    Keys: ``score``, ``exact``, ``parsed``, ``fallback``, ``structure``,
    ``junk_tokens``, ``query_tokens``, ``junk_factor``, ``keyword_case_errors``,
    ``select_precision``, ``select_recall`` and one key per :data:`WEIGHTS` entry
    (``None`` where the component does not apply).
    """
    out: dict = {c: None for c in _COMPONENTS}
    exact = exact_match(predicted, truth)
    out.update(
        exact=exact, parsed=False, fallback=False, structure=0.0, junk_tokens=0,
        query_tokens=0, junk_factor=0.0, keyword_case_errors=0,
        select_precision=None, select_recall=None,
    )
    if exact:
        out.update({c: 1.0 for c in _COMPONENTS}, parsed=True, structure=1.0,
                   junk_factor=1.0, score=1.0, select_precision=1.0, select_recall=1.0,
                   query_tokens=len(tokenize(predicted)))
        ref = parse_sql(truth)
        if ref is None or not ref.complete:
            out.update({c: None for c in _COMPONENTS}, fallback=True)
        elif not ref.has_order_by:
            for c in ("order_by_presence", "order_by_fields", "order_by_directions", "order_by_order"):
                out[c] = None
        return out

    ptoks = tokenize(predicted)
    if not ptoks:
        out["score"] = 0.0
        return out

    ref = parse_sql(truth)
    if ref is None or not ref.complete:
        ratio = difflib.SequenceMatcher(a=ptoks, b=tokenize(truth), autojunk=False).ratio()
        out.update(fallback=True, structure=ratio, score=(1 - EXACT_RESERVE) * ratio)
        return out

    pred = parse_sql(predicted)
    if pred is None:
        out.update(junk_tokens=len(ptoks), score=0.0)
        return out
    out["parsed"] = True

    comp: dict[str, Optional[float]] = {}
    comp["table"] = 1.0 if pred.table is not None and pred.table == ref.table else 0.0

    # select items
    sp = [i.field for i in pred.select]
    st = [i.field for i in ref.select]
    pairs = _match(sp, st)
    prec, rec, f1 = _f1(len(pairs), len(sp), len(st))
    comp["select_fields"] = f1
    out["select_precision"], out["select_recall"] = prec, rec
    comp["select_order"] = _order_score(pairs)
    if pairs:
        comp["aggregates"] = sum(pred.select[pi].agg == ref.select[ti].agg for pi, ti in pairs) / len(pairs)
        comp["aliases"] = sum(_alias_score(pred.select[pi], ref.select[ti]) for pi, ti in pairs) / len(pairs)
    else:
        comp["aggregates"] = comp["aliases"] = 0.0

    # ORDER BY
    if ref.has_order_by or pred.has_order_by:
        comp["order_by_presence"] = 1.0 if pred.has_order_by == ref.has_order_by else 0.0
    if ref.has_order_by:
        op = [o.field for o in pred.order_by]
        ot = [o.field for o in ref.order_by]
        opairs = _match(op, ot)
        comp["order_by_fields"] = _f1(len(opairs), len(op), len(ot))[2]
        comp["order_by_directions"] = (
            sum(pred.order_by[pi].direction == ref.order_by[ti].direction for pi, ti in opairs) / len(opairs)
            if opairs else 0.0
        )
        comp["order_by_order"] = _order_score(opairs)

    applicable = {c: v for c, v in comp.items() if v is not None}
    total_w = sum(WEIGHTS[c] for c in applicable)
    structure = sum(WEIGHTS[c] * v for c, v in applicable.items()) / total_w

    q, j = pred.query_tokens, pred.junk_tokens
    junk_factor = q / (q + j) if q + j else 0.0
    score = (1 - EXACT_RESERVE) * structure * junk_factor
    out.update(comp)
    out.update(
        structure=structure, junk_tokens=j, query_tokens=q, junk_factor=junk_factor,
        keyword_case_errors=pred.keyword_case_errors, score=min(max(score, 0.0), 1 - EXACT_RESERVE),
    )
    return out


def partial_score(predicted: Optional[str], truth: Optional[str]) -> float:
    """Graded score in [0, 1]; 1.0 iff :func:`exact_match`. See the module docstring."""
    return float(score_breakdown(predicted, truth)["score"])
