"""The training recipe on CPU in seconds: loss goes down, save/load round-trips, padded evaluation is exact."""
import pytest
import torch

from helpers.models.evaluation import greedy_generate, last_logits
from helpers.tinysql.sql_items import generate_items
from helpers.models.checkpoints import load_project_tokenizer, load_trained
from helpers.models.training import TrainConfig, train

TINY = {
    "llama": {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
              "head_dim": 8},
    "gpt_neo": {"hidden_size": 32, "intermediate_size": 64, "num_heads": 4},
}


@pytest.fixture(scope="module")
def tokenizer():
    return load_project_tokenizer()


@pytest.fixture(scope="module", params=["llama", "gpt_neo"])
def trained(request, tmp_path_factory):
    family = request.param
    out = tmp_path_factory.mktemp(family)
    cfg = TrainConfig(family=family, cs=1, steps=40, batch_size=8, lr=3e-3, warmup=5, eval_every=0, eval_items=8,
                      log_every=1, progress=False, out_dir=str(out), model_overrides=TINY[family])
    model, history = train(cfg, log=lambda *_: None)
    return family, model, history, out


def test_loss_goes_down(trained):
    _, _, history, _ = trained
    losses = [v for _, v in history["loss"]]
    assert len(losses) == 40
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 1.0, (first, last)


def test_save_load_round_trip(trained, tokenizer):
    family, model, _, out = trained
    assert (out / "model.safetensors").exists() and (out / "config.json").exists()
    assert (out / "tokenizer.json").exists()
    loaded, tok = load_trained(out)
    assert loaded.config.model_type == family
    assert tok("### Response: ")["input_ids"] == tokenizer("### Response: ")["input_ids"]
    ids = torch.tensor([tokenizer(generate_items(1, 1, 5)[0].prompt)["input_ids"]])
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, loaded(ids).logits)


def test_left_padded_logits_and_greedy_match_unpadded(trained, tokenizer):
    _, model, _, _ = trained
    model.eval()
    prompts = [tokenizer(it.prompt)["input_ids"] for it in generate_items(2, 6, 11)]
    assert len({len(p) for p in prompts}) > 1  # padding really happens
    batched = last_logits(model, prompts, tokenizer.pad_token_id)
    for i, p in enumerate(prompts):
        single = last_logits(model, [p], tokenizer.pad_token_id)[0]
        torch.testing.assert_close(batched[i], single, atol=1e-4, rtol=1e-4)
    gen_b = greedy_generate(model, prompts, tokenizer.eos_token_id, tokenizer.pad_token_id, max_new_tokens=12)
    for p, g in zip(prompts, gen_b):
        # reference: no cache, no padding, one token at a time
        ids = list(p)
        ref = []
        with torch.no_grad():
            for _ in range(12):
                nxt = int(model(torch.tensor([ids])).logits[0, -1].argmax())
                if nxt == tokenizer.eos_token_id:
                    break
                ref.append(nxt)
                ids.append(nxt)
        assert g == ref


def test_schema_reading_generator_options():
    """The recipe's data: SQL names are always spelled as in the Context; with the options at 0 nothing changes."""
    from helpers.tinysql import vocabulary as V
    from helpers.tinysql.sql_items import GeneratorConfig

    assert [i.prompt for i in generate_items(3, 50, 1)] == \
        [i.prompt for i in generate_items(3, 50, 1, GeneratorConfig(context_spelling_p=0, field_rename_p=0))]
    cfg = GeneratorConfig(context_spelling_p=0.5, table_rename_p=0.3, field_rename_p=0.3)
    synonyms = {s for syns in list(V.TABLES.values()) + list(V.FIELDS.values()) for s in syns}
    spelled_as_synonym = 0
    for item in generate_items(3, 300, 2, cfg):
        schema = item.schema
        assert item.table in {t.name for t in item.tables}
        assert all(s.field in schema.field_names for s in item.select)
        assert all(f in schema.field_names for f, _ in item.order_by)
        spelled_as_synonym += item.table in synonyms
    assert spelled_as_synonym > 50


def test_field_rename_sorted_keeps_one_sorted_unselected_column():
    """field_rename_sorted_p: a renamed item may keep one unselected column, which ORDER BY then mentions, so every
    column is still mentioned (the rename is still found by elimination); on CS1, which cannot sort, nothing changes
    (at 0, the training data's digests in test_word_sets_and_features hold)."""
    from helpers.tinysql.sql_items import GeneratorConfig

    base = dict(context_spelling_p=0.0, field_rename_p=1.0)
    assert generate_items(1, 60, 4, GeneratorConfig(**base)) == \
        generate_items(1, 60, 4, GeneratorConfig(**base, field_rename_sorted_p=1.0))  # CS1 cannot sort: unchanged
    with_extra = 0
    for cs in (2, 3):
        for item in generate_items(cs, 300, 5, GeneratorConfig(**base, field_rename_sorted_p=1.0)):
            selected = {s.field for s in item.select}
            sorted_ = [f for f, _ in item.order_by]
            extra = [f for f in item.schema.field_names if f not in selected]
            assert len(extra) <= 1 and all(f in sorted_ for f in extra), item.prompt
            if extra:
                with_extra += 1
                assert sorted_[0] == extra[0]
                assert item.english_words[extra[0]] in item.prompt.split(" ### Context")[0]
    assert with_extra > 200


def test_filler_loss_labels_exactly_the_filler(tokenizer):
    """With filler_loss the English filler (holding a novel word) is predicted too, and nothing else of the prompt."""
    from helpers.models.training import collate, encode_items
    from helpers.tinysql import vocabulary as V
    from helpers.tinysql.sql_items import GeneratorConfig

    items = generate_items(2, 40, 3, GeneratorConfig(filler_p=0.5, nonce_name_p=0.2))
    assert {bool(i.filler) for i in items} == {True, False}
    plain = encode_items(tokenizer, items)
    with_filler = encode_items(tokenizer, items, filler_loss=True)
    ids, _, labels = collate(with_filler, tokenizer.pad_token_id)
    _, _, plain_labels = collate(plain, tokenizer.pad_token_id)
    novel = set(V.NOVEL_TABLES + V.NOVEL_FIELDS)
    for k, (item, (p, a), (p2, a2, positions)) in enumerate(zip(items, plain, with_filler)):
        assert (p, a) == (p2, a2)  # the same ids; only the labels differ
        prompt_labels = [j for j in range(len(p)) if labels[k, j] != -100]
        assert prompt_labels == positions and (plain_labels[k, :len(p)] == -100).all()
        assert (labels[k, len(p):len(p) + len(a)] == torch.tensor(a)).all()
        if not item.filler:
            assert positions == []
            continue
        text = tokenizer.decode([p[j] for j in positions])
        assert text.strip() == item.filler  # the whole phrase, its first word included
        assert novel & set(text.split()), text  # the novel word is among the predicted tokens


def test_fine_tune_with_filler_loss_runs(tmp_path):
    cfg = TrainConfig(family="llama", cs=2, steps=3, batch_size=8, lr=1e-3, warmup=1, eval_every=0, eval_items=4,
                      log_every=1, progress=False, out_dir=str(tmp_path), model_overrides=TINY["llama"],
                      generator={"filler_p": 0.5, "nonce_name_p": 0.2}, filler_loss=True)
    _, history = train(cfg, log=lambda *_: None)
    assert len(history["loss"]) == 3 and all(v == v for _, v in history["loss"])
    import json

    meta = json.loads((tmp_path / "training_meta.json").read_text())
    assert meta["train_config"]["filler_loss"] is True and meta["generator"]["nonce_name_p"] == 0.2
