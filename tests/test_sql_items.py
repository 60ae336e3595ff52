import random
import re

import pytest

from helpers.tinysql import vocabulary as V
from helpers.tinysql.sql_items import GeneratorConfig, format_prompt, generate_item, generate_items


def test_prompt_format_is_the_training_format():
    prompt = format_prompt("show  me\nthe price from orders ", "CREATE TABLE orders ( price INTEGER )")
    assert prompt == ("### Instruction: show me the price from orders ### Context: "
                      "CREATE TABLE orders ( price INTEGER ) ### Response: ")


@pytest.mark.parametrize("cs", [1, 2, 3])
def test_generation_is_reproducible_and_seed_dependent(cs):
    a = [(i.prompt, i.sql) for i in generate_items(cs, 20, seed=7)]
    assert a == [(i.prompt, i.sql) for i in generate_items(cs, 20, seed=7)]
    assert a != [(i.prompt, i.sql) for i in generate_items(cs, 20, seed=8)]


@pytest.mark.parametrize("cs", [1, 2, 3])
def test_items_are_well_formed(cs):
    for item in generate_items(cs, 300, seed=0):
        assert re.fullmatch(r"### Instruction: \S.* ### Context: CREATE TABLE .* \) ### Response: ", item.prompt)
        assert "  " not in item.prompt
        schema = item.schema
        assert item.sql.startswith("SELECT ") and f" FROM {item.table}" in item.sql
        assert all(s.field in schema.field_names for s in item.select)
        assert all(f in schema.field_names for f, _ in item.order_by)
        for s in item.select:  # the Instruction names every selected field by its name or a synonym
            assert item.english_words[s.field] in (s.field, *V.FIELDS[s.field])
            assert f" {item.english_words[s.field]}" in f" {item.english}"
        if cs == 1:
            assert "ORDER BY" not in item.sql and "(" not in item.sql
        if cs < 3:
            assert all(s.aggregate is None for s in item.select)


def test_cs2_orders_most_items_with_explicit_directions():
    items = generate_items(2, 500, seed=1)
    ordered = [i for i in items if i.order_by]
    assert 0.8 < len(ordered) / len(items) < 0.97
    for item in ordered:
        tail = item.sql.split(" ORDER BY ")[1]
        assert all(clause.split()[-1] in ("ASC", "DESC") for clause in tail.split(", "))
        for (field, direction), phrase in zip(item.order_by, item.order_templates):
            assert ("ascending" in phrase or "lowest to" in phrase or "smallest" in phrase) == (direction == "ASC")


def test_cs3_aggregates_respect_column_types_and_are_aliased():
    items = generate_items(3, 500, seed=2)
    aggregated = [(i, s) for i in items for s in i.select if s.aggregate]
    assert len(aggregated) > 100
    for item, sel in aggregated:
        sql_type = {c.name: c.sql_type for c in item.schema.columns}[sel.field]
        assert sel.aggregate in V.AGGREGATES_BY_TYPE_CLASS[V.type_class(sql_type)]
        assert f"{sel.aggregate}({sel.field}) AS {sel.aggregate}_{sel.field}" in item.sql


def test_synonyms_and_distractor_tables_follow_the_config():
    rng = random.Random(0)
    cfg = GeneratorConfig(table_synonym_p=1.0, field_synonym_p=0.0, distractor_table_p=1.0)
    for _ in range(100):
        item = generate_item(1, rng, cfg)
        assert len(item.tables) == 2 and item.table in {t.name for t in item.tables}
        assert item.english_words[item.table] in V.TABLES[item.table]
        assert all(item.english_words[s.field] == s.field for s in item.select)


def test_unknown_command_set_is_a_clear_error():
    with pytest.raises(ValueError, match="Unknown command set 7"):
        generate_items(7, 1, seed=0)
