"""Tests for helpers/tinysql/scoring.py (pure Python, runs in well under a second)."""

import random

import pytest

from helpers.tinysql.scoring import (
    WEIGHTS,
    OrderItem,
    ParsedSql,
    SelectItem,
    exact_match,
    normalize_sql,
    parse_sql,
    partial_score,
    score_breakdown,
)

CS1 = "SELECT name, price FROM products"
CS1_B = "SELECT started_at, user_id, id FROM search_history"
CS2 = "SELECT id, name, price FROM orders ORDER BY price ASC, id DESC"
CS2_NO_OB = "SELECT id, name FROM orders "  # the 10% without ORDER BY keep a trailing space
CS3 = "SELECT SUM(price) AS SUM_price, name FROM orders ORDER BY name DESC"
CS3_B = "SELECT COUNT(id) AS COUNT_id, MAX(started_at) AS MAX_started_at, city FROM users"
TRUTHS = [CS1, CS1_B, CS2, CS2_NO_OB, CS3, CS3_B]


# --------------------------------------------------------------------------- ground truth


@pytest.mark.parametrize("truth", TRUTHS)
def test_ground_truth_scores_one(truth):
    assert partial_score(truth, truth) == 1.0
    assert exact_match(truth, truth)
    for variant in (truth + "<|endoftext|>", truth.strip() + " </s>\n", "  " + truth + "  \n"):
        assert partial_score(variant, truth) == 1.0
        assert exact_match(variant, truth)


# --------------------------------------------------------------------------- leniencies of upstream

LENIENCIES = [
    # (name, prediction, truth)
    ("missing ORDER BY (CS2)", "SELECT id, name, price FROM orders", CS2),
    ("missing ORDER BY (CS3)", "SELECT SUM(price) AS SUM_price, name FROM orders", CS3),
    ("wrong direction", "SELECT SUM(price) AS SUM_price, name FROM orders ORDER BY name ASC", CS3),
    ("one of two directions wrong", "SELECT id, name, price FROM orders ORDER BY price ASC, id ASC", CS2),
    ("missing direction", "SELECT id, name, price FROM orders ORDER BY price ASC, id", CS2),
    ("swapped ORDER BY clauses", "SELECT id, name, price FROM orders ORDER BY id DESC, price ASC", CS2),
    ("swapped select fields (CS1)", "SELECT price, name FROM products", CS1),
    ("swapped select fields (CS3)", "SELECT name, SUM(price) AS SUM_price FROM orders ORDER BY name DESC", CS3),
    ("missing AS alias", "SELECT SUM(price), name FROM orders ORDER BY name DESC", CS3),
    ("alias without AS", "SELECT SUM(price) SUM_price, name FROM orders ORDER BY name DESC", CS3),
    ("wrong aggregate", "SELECT AVG(price) AS AVG_price, name FROM orders ORDER BY name DESC", CS3),
    ("aggregate dropped", "SELECT price, name FROM orders ORDER BY name DESC", CS3),
    ("spurious ORDER BY", "SELECT id, name FROM orders ORDER BY id ASC", CS2_NO_OB),
    ("lower-case keywords", "select name, price from products", CS1),
    ("trailing semicolon", CS1 + ";", CS1),
]


@pytest.mark.parametrize("name,pred,truth", LENIENCIES, ids=[x[0] for x in LENIENCIES])
def test_leniencies_score_noticeably_below_exact(name, pred, truth):
    s = partial_score(pred, truth)
    assert not exact_match(pred, truth)
    assert 0.0 < s <= 0.9, (name, s)
    assert s < partial_score(truth, truth)


# --------------------------------------------------------------------------- junk and garbage


@pytest.mark.parametrize("truth", TRUTHS)
def test_garbage_and_empty(truth):
    assert partial_score("hello world", truth) <= 0.1
    assert partial_score("", truth) == 0.0
    assert partial_score("   \n", truth) == 0.0
    assert partial_score("<|endoftext|>", truth) == 0.0
    assert partial_score("SELECT", truth) <= 0.1
    assert partial_score("SELECT SELECT FROM FROM", truth) <= 0.1


BAD = [
    ("duplicated answer", "SELECT name, price FROM products SELECT name, price FROM products", CS1),
    ("JSON-style output", '{"sql": "SELECT name, price FROM products"}', CS1),
    ("JSON-style keys", '{"select": ["name", "price"], "from": "products"}', CS1),
    ("wrong table", "SELECT name, price FROM orders", CS1),
    ("missing field", "SELECT name FROM products", CS1),
    ("extra field", "SELECT name, price, id FROM products", CS1),
    ("missing table", "SELECT name, price FROM", CS1),
    ("prose around", "Sure! SELECT name, price FROM products is the query.", CS1),
    ("duplicated CS3", CS3 + " " + CS3, CS3),
]


@pytest.mark.parametrize("name,pred,truth", BAD, ids=[x[0] for x in BAD])
def test_bad_answers_below_one(name, pred, truth):
    s = partial_score(pred, truth)
    assert 0.0 <= s < 0.9, (name, s)
    assert not exact_match(pred, truth)


def test_junk_heavy_outputs_score_low():
    for pred, truth in [
        ("SELECT name, price FROM products SELECT name, price FROM products", CS1),
        ('{"sql": "SELECT name, price FROM products"}', CS1),
        ("Sure! SELECT name, price FROM products is the query.", CS1),
    ]:
        assert partial_score(pred, truth) < 0.75, pred


def test_sensible_ordering():
    ps = partial_score
    one_dir = ps("SELECT id, name, price FROM orders ORDER BY price ASC, id ASC", CS2)
    two_dir = ps("SELECT id, name, price FROM orders ORDER BY price DESC, id ASC", CS2)
    no_ob = ps("SELECT id, name, price FROM orders", CS2)
    garbage = ps("hello world", CS2)
    assert 1.0 > one_dir > two_dir > garbage
    assert one_dir > no_ob > garbage
    assert one_dir > ps("SELECT id, name, price FROM order_items ORDER BY price ASC, id DESC", CS2)

    # fields: more missing is worse; wrong table worse than a swap
    assert ps("SELECT started_at, user_id FROM search_history", CS1_B) > ps("SELECT started_at FROM search_history", CS1_B)
    assert ps("SELECT name, price FROM products", CS1) > ps("SELECT price, name FROM products", CS1) > ps(
        "SELECT name, price FROM orders", CS1)

    # alias: right alias without AS beats no alias; wrong aggregate beats missing field
    with_alias = ps("SELECT SUM(price) SUM_price, name FROM orders ORDER BY name DESC", CS3)
    no_alias = ps("SELECT SUM(price), name FROM orders ORDER BY name DESC", CS3)
    assert with_alias > no_alias

    # a near miss beats a duplicated answer, which beats garbage
    dup = ps("SELECT name, price FROM products SELECT name, price FROM products", CS1)
    assert ps("SELECT price, name FROM products", CS1) > dup > ps("hello world", CS1)


# --------------------------------------------------------------------------- breakdown


def test_breakdown_isolates_components():
    b = score_breakdown("SELECT SUM(price) AS SUM_price, name FROM orders ORDER BY name ASC", CS3)
    assert b["order_by_directions"] == 0.0
    for c in ("table", "select_fields", "select_order", "aggregates", "aliases",
              "order_by_presence", "order_by_fields", "order_by_order"):
        assert b[c] == 1.0, c
    assert b["junk_tokens"] == 0 and b["junk_factor"] == 1.0 and not b["exact"]
    assert b["score"] == pytest.approx(0.9 * (1 - WEIGHTS["order_by_directions"]))

    b = score_breakdown("SELECT SUM(price), name FROM orders ORDER BY name DESC", CS3)
    assert b["aliases"] == 0.5 and b["aggregates"] == 1.0
    b = score_breakdown("SELECT SUM(price) SUM_price, name FROM orders ORDER BY name DESC", CS3)
    assert b["aliases"] == 0.75  # right alias without AS: half credit on that item
    b = score_breakdown("SELECT AVG(price) AS AVG_price, name FROM orders ORDER BY name DESC", CS3)
    assert b["aggregates"] == 0.5 and b["aliases"] == 0.5 and b["select_fields"] == 1.0

    b = score_breakdown("SELECT price, name FROM products", CS1)
    assert b["select_order"] == 0.5 and b["select_fields"] == 1.0
    assert b["score"] < partial_score("select name, price from products", CS1)  # a swap costs more than case
    b = score_breakdown("SELECT id, name, price FROM orders ORDER BY id DESC, price ASC", CS2)
    assert b["order_by_order"] == 0.5 and b["order_by_directions"] == 1.0 and b["order_by_fields"] == 1.0
    b = score_breakdown("SELECT id, name, price FROM orders", CS2)
    assert b["order_by_presence"] == 0.0 and b["order_by_fields"] == 0.0

    b = score_breakdown("SELECT name, price, id FROM products", CS1)
    assert b["select_recall"] == 1.0 and b["select_precision"] == pytest.approx(2 / 3)
    assert b["order_by_presence"] is None  # no ORDER BY on either side: not applicable

    b = score_breakdown("SELECT name, price FROM products SELECT name, price FROM products", CS1)
    assert b["structure"] == 1.0 and b["junk_tokens"] == 6 and b["junk_factor"] == 0.5

    for _, pred, truth in LENIENCIES + BAD:
        b = score_breakdown(pred, truth)
        for c in WEIGHTS:
            assert b[c] is None or 0.0 <= b[c] <= 1.0
        assert 0.0 <= b["score"] <= 1.0


def test_non_cs123_truth_falls_back():
    truth = "SELECT name FROM users WHERE age > 5"
    assert partial_score(truth, truth) == 1.0
    b = score_breakdown("SELECT name FROM users WHERE age > 6", truth)
    assert b["fallback"] and 0.0 < b["score"] < 0.9
    assert partial_score("hello world", truth) <= 0.1


# --------------------------------------------------------------------------- exact_match


@pytest.mark.parametrize("pred,truth,expected", [
    (CS1, CS1, True),
    ("SELECT name,price FROM products", CS1, True),
    ("SELECT  name ,  price\nFROM\tproducts", CS1, True),
    ("SELECT SUM( price ) AS SUM_price, name FROM orders ORDER BY name DESC", CS3, True),
    (CS1 + "<|endoftext|><|endoftext|>", CS1, True),
    (CS1 + " <|im_end|>", CS1, True),
    (CS2_NO_OB, CS2_NO_OB.strip(), True),
    ("select name, price from products", CS1, False),  # keywords are case-sensitive
    ("SELECT Name, price FROM products", CS1, False),  # identifiers are case-sensitive
    ("SELECT name, price FROM Products", CS1, False),
    (CS1 + ";", CS1, False),
    (CS1 + "<|endoftext|> junk", CS1, False),  # only *trailing* EOS is ignored
    ("SELECT price, name FROM products", CS1, False),
    ("SELECT nameprice FROM products", CS1, False),
    ("SELECT SUM(price), name FROM orders ORDER BY name DESC", CS3, False),
    ("", "", False),
    ("", CS1, False),
])
def test_exact_match(pred, truth, expected):
    assert exact_match(pred, truth) is expected
    assert (partial_score(pred, truth) == 1.0) is expected


def test_normalize_sql():
    assert normalize_sql("SELECT SUM( price ) AS SUM_price ,name FROM t  </s>") == \
        "SELECT SUM(price) AS SUM_price, name FROM t"
    assert normalize_sql(CS2_NO_OB) == CS2_NO_OB.strip()


# --------------------------------------------------------------------------- parse_sql


@pytest.mark.parametrize("sql", [CS1, CS1_B, CS2, CS2_NO_OB.strip(), CS3, CS3_B])
def test_parse_round_trip(sql):
    p = parse_sql(sql)
    assert p is not None and p.complete
    assert p.to_sql() == sql == normalize_sql(sql)
    assert parse_sql(p.to_sql()) == p


def test_parse_structure():
    p = parse_sql(CS3)
    assert p.select == (SelectItem("price", "SUM", "SUM_price", True), SelectItem("name"))
    assert p.table == "orders"
    assert p.has_order_by and p.order_by == (OrderItem("name", "DESC"),)
    assert p.junk_tokens == 0 and p.keyword_case_errors == 0

    p = parse_sql(CS2)
    assert [o.field for o in p.order_by] == ["price", "id"]
    assert [o.direction for o in p.order_by] == ["ASC", "DESC"]
    assert [i.field for i in p.select] == ["id", "name", "price"]
    assert all(i.agg is None and i.alias is None for i in p.select)


def test_parse_garbage_and_partial():
    assert parse_sql("hello world") is None
    assert parse_sql("") is None
    assert parse_sql(None) is None

    p = parse_sql("SELECT a, b FROM")
    assert p is not None and [i.field for i in p.select] == ["a", "b"] and p.table is None
    assert not p.complete

    p = parse_sql('{"sql": "SELECT a, b FROM t"}')
    assert p.table == "t" and p.junk_before == ("{", '"', "sql", '"', ":", '"') and p.junk_after == ('"', "}")

    p = parse_sql("SELECT a, b FROM t SELECT a, b FROM t")
    assert p.table == "t" and len(p.junk_after) == 6 and not p.complete

    p = parse_sql("select sum(x) as sum_x from t order by x desc")
    assert p.select == (SelectItem("x", "SUM", "sum_x", True),) and p.order_by == (OrderItem("x", "DESC"),)
    assert p.keyword_case_errors == 7 and p.to_sql() == "SELECT SUM(x) AS sum_x FROM t ORDER BY x DESC"

    p = parse_sql("SELECT count, sum FROM t")  # aggregate names without "(" are plain columns
    assert [i.field for i in p.select] == ["count", "sum"] and all(i.agg is None for i in p.select)

    p = parse_sql("SELECT SUM(price SUM_price FROM t")  # broken aggregate: stops, rest is junk
    assert p.select == () and p.table is None and len(p.junk_after) == 6

    p = parse_sql("SELECT a, FROM t ORDER BY a")
    assert [i.field for i in p.select] == ["a"] and p.inline_junk == 1
    assert p.table == "t" and p.order_by == (OrderItem("a", None),)
    assert isinstance(p, ParsedSql)


# --------------------------------------------------------------------------- randomised CS1-3 properties

FIELDS = ["id", "name", "price", "user_id", "started_at", "city", "status", "amount", "count", "level"]
TABLES = ["orders", "products", "search_history", "todo", "links"]
AGGS = ["SUM", "AVG", "MIN", "MAX", "COUNT"]


def _random_query(rng):
    fields = rng.sample(FIELDS, rng.randint(1, 5))
    items = []
    for f in fields:
        if rng.random() < 0.4:
            a = rng.choice(AGGS)
            items.append(SelectItem(f, a, f"{a}_{f}", True))
        else:
            items.append(SelectItem(f))
    has_ob = rng.random() < 0.6
    ob = tuple(OrderItem(f, rng.choice(["ASC", "DESC"])) for f in rng.sample(FIELDS, rng.randint(1, 3))) if has_ob else ()
    return ParsedSql(select=tuple(items), table=rng.choice(TABLES), has_order_by=has_ob, order_by=ob, has_from=True)


def _mutations(q, rng):
    out = {}
    if q.has_order_by:
        out["drop ORDER BY"] = ParsedSql(select=q.select, table=q.table, has_from=True)
        k = rng.randrange(len(q.order_by))
        ob = list(q.order_by)
        ob[k] = OrderItem(ob[k].field, "ASC" if ob[k].direction == "DESC" else "DESC")
        out["flip direction"] = ParsedSql(select=q.select, table=q.table, has_from=True, has_order_by=True, order_by=tuple(ob))
        if len(q.order_by) > 1:
            out["reverse ORDER BY"] = ParsedSql(select=q.select, table=q.table, has_from=True, has_order_by=True,
                                                order_by=q.order_by[::-1])
    if len(q.select) > 1:
        out["reverse select"] = ParsedSql(select=q.select[::-1], table=q.table, has_from=True,
                                          has_order_by=q.has_order_by, order_by=q.order_by)
        out["drop field"] = ParsedSql(select=q.select[:-1], table=q.table, has_from=True,
                                      has_order_by=q.has_order_by, order_by=q.order_by)
    aggs = [i for i, it in enumerate(q.select) if it.agg]
    if aggs:
        sel = list(q.select)
        sel[aggs[0]] = SelectItem(sel[aggs[0]].field, sel[aggs[0]].agg)
        out["drop alias"] = ParsedSql(select=tuple(sel), table=q.table, has_from=True,
                                      has_order_by=q.has_order_by, order_by=q.order_by)
    extra = next(f for f in FIELDS if f not in {i.field for i in q.select})
    out["extra field"] = ParsedSql(select=q.select + (SelectItem(extra),), table=q.table, has_from=True,
                                   has_order_by=q.has_order_by, order_by=q.order_by)
    out["wrong table"] = ParsedSql(select=q.select, table=q.table + "_x", has_from=True,
                                   has_order_by=q.has_order_by, order_by=q.order_by)
    return out


def test_random_queries_round_trip_and_mutations():
    rng = random.Random(1234)
    for _ in range(300):
        q = _random_query(rng)
        truth = q.to_sql()
        assert parse_sql(truth) == q
        assert partial_score(truth + "<|endoftext|>", truth) == 1.0
        assert partial_score(truth + " " + truth, truth) < 0.75
        assert partial_score("hello world", truth) <= 0.1
        for name, m in _mutations(q, rng).items():
            pred = m.to_sql()
            s = partial_score(pred, truth)
            assert not exact_match(pred, truth), name
            assert 0.0 < s <= 0.9, (name, truth, pred, s)
