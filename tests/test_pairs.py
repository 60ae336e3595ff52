import itertools
import re
from dataclasses import replace

import pytest

from helpers.tinysql import vocabulary as V
from helpers.tinysql.pairs import (FEATURES, Feature, NotSingleTokenError, PairConstructionError, build_pair, make_pairs,
                           parse_feature)
from helpers.tinysql.tokenization import encode_prompt_and_answer, single_token_id

FLAGS = list(itertools.product([False, True], repeat=3))  # novel names, table synonyms, field synonyms


def _cs_for(feature, cs):
    """``cs``, raised to the first command set that can express ``feature`` (ORDER BY: CS2, aggregates: CS3)."""
    return max(cs, min(c for c in feature.command_sets if c))


def _pairs(feature, tokenizer, flags, cs=2, n=6, seed=3):
    novel, syn_t, syn_f = flags
    return make_pairs(feature, tokenizer, cs_num=_cs_for(feature, cs), batch_size=n, seed=seed, use_novel_names=novel,
                      use_synonyms_table=syn_t, use_synonyms_field=syn_f)


def _expected_answer(feature, item):
    """What the clean prompt asks the model to write next, read from the clean item."""
    if feature.is_table:
        return item.table
    if feature is Feature.ENGORDERBYFIELD:
        return item.order_by[0][0]
    if feature is Feature.ENGORDERBYDIRECTION:
        return item.order_by[0][1]
    if feature is Feature.ENGAGGREGATEFUNCTION:
        return item.select[0].aggregate
    return item.select[0].field  # ENGFIELDNAME, DEFFIELDNAME, ENGAGGREGATEFIELD


@pytest.mark.parametrize("flags", FLAGS, ids=lambda f: "novel{}-syntable{}-synfield{}".format(*map(int, f)))
@pytest.mark.parametrize("feature", FEATURES, ids=lambda f: f.value)
def test_pair_invariants(feature, flags, any_tokenizer):
    tok = any_tokenizer
    novel, syn_t, syn_f = flags
    if novel and not feature.corrupts_a_name:  # a direction or function word has no novel replacement
        with pytest.raises(ValueError, match=f"use_novel_names does not apply to {feature.value}"):
            _pairs(feature, tok, flags)
        return
    novel_pool = V.NOVEL_TABLES if feature.is_table else V.NOVEL_FIELDS
    if novel and not feature.answer_after_space and any(
            single_token_id(tok, w, leading_space=False) is None for w in novel_pool):
        # the answer right after "SUM(" has no leading space: novel words must be one token without it too
        with pytest.raises(NotSingleTokenError, match=rf"novel words \[.*\] are not single tokens \(with and without a "
                                                      rf"leading space.*{feature.value} cannot use novel names"):
            _pairs(feature, tok, flags)
        return
    for p in _pairs(feature, tok, flags):
        # equal length, exactly one differing position, inside the prompt, derived not assumed
        assert len(p.clean_ids) == len(p.corrupt_ids)
        diff = [i for i, (a, b) in enumerate(zip(p.clean_ids, p.corrupt_ids)) if a != b]
        assert diff == [p.corrupted_position]
        assert 0 < p.corrupted_position < p.n_prompt_tokens <= p.answer_position + 1
        # the differing tokens are the clean and corrupt words, each a single token
        assert p.clean_ids[p.corrupted_position] == single_token_id(tok, p.clean_word)
        assert p.corrupt_ids[p.corrupted_position] == single_token_id(tok, p.corrupt_word)
        # ids are the training tokenization (prompt and answer separately), cut so the LAST position
        # predicts the answer token: the original's off-by-one kept the answer token as input
        prompt_ids, answer_ids = encode_prompt_and_answer(tok, p.clean_prompt, p.clean_item.sql)
        full = prompt_ids + answer_ids
        assert list(p.clean_ids) == full[: len(p.clean_ids)]
        assert p.answer_position == len(p.clean_ids) - 1
        assert full[p.answer_position + 1] == p.clean_token_id
        # the metric compares SQL names (what the model must write), never a synonym; the field right after
        # "SUM(" (ENGAGGREGATEFIELD) is the one answer without a leading space
        spaced = feature.answer_after_space
        assert p.clean_token_id == single_token_id(tok, p.clean_answer, leading_space=spaced)
        assert p.corrupt_token_id == single_token_id(tok, p.corrupt_answer, leading_space=spaced)
        assert p.clean_answer != p.corrupt_answer and p.clean_word != p.corrupt_word
        assert p.clean_answer == _expected_answer(feature, p.clean_item)
        # the flags do what they say (synonyms and novel names concern features that corrupt a name)
        if not feature.corrupts_a_name:
            assert p.clean_answer in (V.AGGREGATES_BY_TYPE_CLASS["numeric"] + ("ASC", "DESC"))
            assert p.clean_word not in V.TABLES and p.clean_word not in V.FIELDS
        elif feature.in_instruction:
            synonyms_on = syn_t if feature.is_table else syn_f
            names = V.TABLES if feature.is_table else V.FIELDS
            assert (p.clean_word in names[p.clean_answer]) == synonyms_on
            assert (p.clean_word == p.clean_answer) == (not synonyms_on)
        else:
            assert p.clean_word == p.clean_answer and p.corrupt_word == p.corrupt_answer
        if feature.corrupts_a_name:
            assert (p.corrupt_answer in novel_pool) == novel
        # a BOS-adding tokenizer keeps its BOS in front of both sequences
        if tok.bos_token_id is not None and tok("x")["input_ids"][0] == tok.bos_token_id:
            assert p.clean_ids[0] == p.corrupt_ids[0] == tok.bos_token_id


def test_eng_corruptions_point_at_something_the_context_can_answer(project_tokenizer):
    for p in make_pairs(Feature.ENGTABLENAME, project_tokenizer, batch_size=20, seed=1):
        assert len(p.clean_item.tables) == 2  # distractor table on by default for ENGTABLENAME
        assert p.corrupt_answer in {t.name for t in p.clean_item.tables}
    for p in make_pairs(Feature.ENGFIELDNAME, project_tokenizer, batch_size=20, seed=1):
        assert p.corrupt_answer in p.clean_item.schema.field_names
        assert p.corrupt_answer not in {s.field for s in p.clean_item.select}


def test_def_corruptions_leave_the_instruction_alone(project_tokenizer):
    for feature in (Feature.DEFTABLENAME, Feature.DEFFIELDNAME):
        for p in make_pairs(feature, project_tokenizer, batch_size=10, seed=2, use_synonyms_field=True):
            assert p.clean_item.english == p.corrupt_item.english
            assert p.corrupt_answer in p.corrupt_item.context and p.corrupt_answer not in p.clean_prompt.split()


def test_pairs_are_reproducible_from_the_seed(project_tokenizer):
    a = [p.to_dict() for p in make_pairs("DEFFIELDNAME", project_tokenizer, batch_size=5, seed=11)]
    assert a == [p.to_dict() for p in make_pairs("DEFFIELDNAME", project_tokenizer, batch_size=5, seed=11)]
    assert a != [p.to_dict() for p in make_pairs("DEFFIELDNAME", project_tokenizer, batch_size=5, seed=12)]


def test_words_that_are_not_one_token_are_never_drawn(splitting_bos_tokenizer):
    tok = splitting_bos_tokenizer
    split_synonyms = [s for syns in V.TABLES.values() for s in syns if single_token_id(tok, s) is None]
    assert split_synonyms, "the test tokenizer should split some synonyms"
    for p in make_pairs("ENGTABLENAME", tok, batch_size=30, seed=0, use_synonyms_table=True):
        for word in (p.clean_word, p.corrupt_word, p.clean_answer, p.corrupt_answer):
            assert single_token_id(tok, word) is not None


def test_unknown_feature_and_command_set_are_clear_errors(project_tokenizer):
    with pytest.raises(ValueError, match="Unknown feature 'DEFWHERE'.*ENGTABLENAME"):
        make_pairs("DEFWHERE", project_tokenizer)
    with pytest.raises(ValueError, match="Unknown command set 5"):
        make_pairs("DEFTABLENAME", project_tokenizer, cs_num=5)
    assert parse_feature("DefFieldName") is Feature.DEFFIELDNAME


def test_a_word_that_is_not_one_token_names_word_and_tokenizer(splitting_bos_tokenizer):
    tok = splitting_bos_tokenizer
    p = make_pairs("DEFTABLENAME", tok, batch_size=1, seed=0)[0]
    word = next(s for syns in V.TABLES.values() for s in syns if single_token_id(tok, s) is None)
    tok.name_or_path = "splitting-test-tokenizer"
    # the message quotes the word as it was checked (with its leading space)
    with pytest.raises(NotSingleTokenError, match=f"' ?{word}' is not a single token for tokenizer "
                                                  "'splitting-test-tokenizer'"):
        build_pair("DEFTABLENAME", p.clean_item, p.corrupt_item, tok, clean_word=p.clean_word, corrupt_word=word,
                   clean_answer=p.clean_answer, corrupt_answer=p.corrupt_answer)
    with pytest.raises(NotSingleTokenError, match="novel words"):
        make_pairs("DEFTABLENAME", project_tokenizer_like_without_novel_words(), use_novel_names=True)


def project_tokenizer_like_without_novel_words():
    from helpers.models.tokenizer_training import train_tokenizer
    return train_tokenizer(vocab_size=1300, n_items_per_cs=500, word_repeats=0, require_single_tokens=False)


def test_prompts_of_different_lengths_are_refused(project_tokenizer):
    p = make_pairs("DEFTABLENAME", project_tokenizer, batch_size=1, seed=0)[0]
    longer = replace(p.corrupt_item, select_template="please " + p.corrupt_item.select_template)
    with pytest.raises(PairConstructionError, match="different lengths"):
        build_pair("DEFTABLENAME", p.clean_item, longer, project_tokenizer, clean_word=p.clean_word,
                   corrupt_word=p.corrupt_word, clean_answer=p.clean_answer, corrupt_answer=p.corrupt_answer)
    two_changes = replace(p.corrupt_item, english_words={**p.corrupt_item.english_words,
                                                         p.clean_item.select[0].field: "hammer"})
    with pytest.raises(PairConstructionError, match="differ at 2 positions"):
        build_pair("DEFTABLENAME", p.clean_item, two_changes, project_tokenizer, clean_word=p.clean_word,
                   corrupt_word=p.corrupt_word, clean_answer=p.clean_answer, corrupt_answer=p.corrupt_answer)


def test_corrupt_word_equal_to_the_true_name_is_refused(project_tokenizer):
    p = make_pairs("ENGTABLENAME", project_tokenizer, batch_size=1, seed=0)[0]
    with pytest.raises(PairConstructionError, match="equals the clean one"):
        build_pair("ENGTABLENAME", p.clean_item, p.corrupt_item, project_tokenizer, clean_word=p.clean_word,
                   corrupt_word=p.corrupt_word, clean_answer=p.clean_answer, corrupt_answer=p.clean_answer)


@pytest.mark.parametrize("feature", FEATURES, ids=lambda f: f.value)
@pytest.mark.parametrize("cs", [1, 2, 3])
def test_a_batch_shares_one_shape_so_columns_mean_the_same_token(feature, cs, any_tokenizer):
    """Averaging over examples is column by column: lengths, corrupted and answer positions must agree."""
    if cs not in feature.command_sets:  # ORDER BY features on CS1, aggregate features on CS1-2
        sets = ", ".join(f"CS{c}" for c in feature.command_sets if c)
        with pytest.raises(ValueError, match=f"cs_num={cs} cannot express it; use {sets}"):
            make_pairs(feature, any_tokenizer, cs_num=cs, batch_size=8, seed=5)
        return
    pairs = make_pairs(feature, any_tokenizer, cs_num=cs, batch_size=8, seed=5)
    assert len({(len(p.clean_ids), p.corrupted_position, p.answer_position) for p in pairs}) == 1
    # and only name slots differ between examples: the template tokens line up
    varying = {i for p in pairs[1:] for i, (a, b) in enumerate(zip(p.clean_ids, pairs[0].clean_ids)) if a != b}
    assert len(varying) < len(pairs[0].clean_ids) / 2
    assert len({p.clean_prompt for p in pairs}) == len(pairs)  # yet the examples are different


# Every feature, the direction and function ones included (a function word used to recur in the Instruction, "the
# lowest a and lowest b": fixed, and held by tests/test_word_sets_and_features.py too).
ONLY_MENTION_CASES = list(FEATURES)


@pytest.mark.parametrize("feature", ONLY_MENTION_CASES, ids=lambda f: f.value)
def test_the_corrupted_word_is_the_only_mention_of_itself(feature, project_tokenizer):
    for cs in (c for c in (1, 2, 3) if c in feature.command_sets):
        for p in make_pairs(feature, project_tokenizer, cs_num=cs, batch_size=30, seed=9,
                            use_synonyms_table=True, use_synonyms_field=True):
            for word, prompt in ((p.clean_word, p.clean_prompt), (p.corrupt_word, p.corrupt_prompt)):
                assert re.findall(r"\w+", prompt).count(word) == 1, (word, prompt)
            assert p.corrupt_word not in re.findall(r"\w+", p.clean_prompt)


def test_template_words_are_never_drawn_as_names(project_tokenizer):
    assert {"records", "total"} <= V.TEMPLATE_WORDS  # a synonym of albums, a field: both template words too
    for feature in FEATURES:
        for p in make_pairs(feature, project_tokenizer, cs_num=3, batch_size=40, seed=1, use_synonyms_table=True):
            names = {p.clean_item.table} | {f for t in p.clean_item.tables for f in t.field_names}
            assert not names & V.TEMPLATE_WORDS and "albums" not in names


def test_engtablename_distractor_can_answer_the_corrupt_request(project_tokenizer):
    """The distractor holds every field the request names: selected and sorted by (in CS2 and CS3 most corrupt
    requests sorted by a column the distractor lacked)."""
    sorted_by = 0
    for cs, seed in ((1, 4), (2, 4), (2, 5), (3, 6), (3, 7)):
        for p in make_pairs(Feature.ENGTABLENAME, project_tokenizer, cs_num=cs, batch_size=20, seed=seed,
                            use_synonyms_table=True):
            distractor = next(t for t in p.clean_item.tables if t.name == p.corrupt_answer)
            mentioned = {s.field for s in p.clean_item.select} | {f for f, _ in p.clean_item.order_by}
            assert mentioned <= set(distractor.field_names), (cs, seed, p.corrupt_answer)
            sorted_by += bool(p.clean_item.order_by)
    assert sorted_by >= 20  # (the sorted fields were checked somewhere)


def test_an_upstream_corrupt_synonym_is_never_another_fields_own_name(project_tokenizer):
    """Upstream's synonyms overlap its field names ("total" is amount's and a field): such a corrupt word does not
    say which answer it asks for, so it is never drawn (a quarter of the pairs had one)."""
    from helpers.tinysql.word_sets import parse_word_set

    fields = parse_word_set("upstream").fields
    for feature in (Feature.ENGFIELDNAME, Feature.ENGORDERBYFIELD):
        for seed in range(4):
            for p in make_pairs(feature, project_tokenizer, cs_num=2, batch_size=20, seed=seed, vocabulary="upstream",
                                use_synonyms_field=True):
                assert p.corrupt_word == p.corrupt_answer or p.corrupt_word not in fields, (feature, p.corrupt_word)


def test_make_pairs_reads_settings_as_notebooks_deliver_them_and_ignores_moot_ones(project_tokenizer):
    """"False" is False ("False" as a flag turned novel names on), "2" is 2; a float command set or batch size is
    refused; which novel words, without novel names, changes nothing (it changed the seed)."""
    base = dict(cs_num=2, batch_size=3, seed=1)
    plain = make_pairs("ENGFIELDNAME", project_tokenizer, **base)
    assert make_pairs("ENGFIELDNAME", project_tokenizer, cs_num="2", batch_size="3", seed="1",
                      use_novel_names="False", use_synonyms_table="false", use_synonyms_field=0) == plain
    assert make_pairs("ENGFIELDNAME", project_tokenizer, novel_words="held_out", **base) == plain
    for bad in (dict(cs_num=2.0), dict(batch_size=2.5), dict(use_novel_names="no"), dict(cs_num=True)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            make_pairs("ENGFIELDNAME", project_tokenizer, **{**base, **bad})


def test_deffieldname_renames_the_one_column_no_instruction_word_matches(project_tokenizer):
    for p in make_pairs("DEFFIELDNAME", project_tokenizer, cs_num=2, batch_size=20, seed=6, use_synonyms_field=True):
        mentioned = {s.field for s in p.clean_item.select} | {f for f, _ in p.clean_item.order_by}
        assert set(p.clean_item.schema.field_names) == mentioned
        unmatched = set(p.corrupt_item.schema.field_names) - mentioned
        assert unmatched == {p.corrupt_answer}
