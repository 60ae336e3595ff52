"""The six shipped models: they load offline, keep the vocabulary single-token, and answer TinySQL.

CPU, a few seconds per model. A missing model folder fails (run `make train`), it is not skipped.
"""
from pathlib import Path

import pytest
import torch

from helpers.models.evaluation import EVAL_SEED, generation_accuracy, last_logits
from helpers.tinysql.pairs import FEATURES, make_pairs
from helpers.tinysql.sql_items import generate_items
from helpers.tinysql.tokenization import single_token_id
from helpers.models.tokenizer_training import words_that_must_be_single_tokens

ROOT = Path(__file__).resolve().parents[1] / "helpers" / "models" / "embedded"
MODELS = [(family, cs) for family in ("llama", "gpt_neo") for cs in (1, 2, 3)]
MAX_BYTES = 20 * 1024 * 1024


@pytest.fixture(scope="module", params=MODELS, ids=lambda m: f"{m[0]}-cs{m[1]}")
def embedded(request):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    family, cs = request.param
    folder = ROOT / f"{family}-cs{cs}"
    assert (folder / "config.json").exists(), f"{folder} missing: run `make train FAMILY={family} CS={cs}`"
    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True,
                                                 attn_implementation="eager").eval()
    return family, cs, folder, model, tok


def test_loads_offline_and_is_small(embedded):
    family, _, folder, model, tok = embedded
    assert model.config.model_type == family
    weights = folder / "model.safetensors"
    assert weights.stat().st_size < MAX_BYTES
    if family == "llama":
        assert model.config.num_key_value_heads < model.config.num_attention_heads  # grouped-query attention
    assert len(tok) == model.config.vocab_size


def test_loads_through_helpers_loading(embedded):
    loading = pytest.importorskip("helpers.models.loading")
    family, _, folder, model, _ = embedded
    loaded = loading.load_model(str(folder), device="cpu", dtype="float32", wrap=False)
    assert loaded.hf_model.config.model_type == family
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(loaded.hf_model(ids).logits, model(ids).logits)


def test_vocabulary_words_are_single_tokens(embedded):
    tok = embedded[4]
    bad = [w for w in words_that_must_be_single_tokens() if single_token_id(tok, w) is None]
    assert not bad, bad[:10]


def test_held_out_items_answered(embedded):
    _, cs, _, model, tok = embedded
    items = generate_items(cs, 50, EVAL_SEED + 7)
    res = generation_accuracy(model, tok, items)
    assert res["exact_match"] >= 0.9, res["errors"]


@pytest.mark.parametrize("feature", FEATURES, ids=lambda f: f.value)
def test_clean_prompts_of_each_feature_answered(embedded, feature):
    from helpers.tinysql.pairs import DEFAULT_PAIR_OPTIONS

    _, cs, _, model, tok = embedded
    if cs not in feature.command_sets:
        pytest.skip(f"CS{cs} cannot express {feature.value}")
    opts = DEFAULT_PAIR_OPTIONS[feature]
    pairs = make_pairs(feature, tok, cs_num=cs, batch_size=20, seed=123, use_novel_names=opts.use_novel_names,
                       use_synonyms_table=opts.use_synonyms_table, use_synonyms_field=opts.use_synonyms_field,
                       distractor_table=opts.distractor_table)
    logits = last_logits(model, [list(p.clean_ids) for p in pairs], tok.pad_token_id)
    predicted = logits.argmax(-1).tolist()
    wrong = [(p.clean_prompt, p.clean_answer) for p, t in zip(pairs, predicted) if t != p.clean_token_id]
    assert not wrong, wrong[:3]


def test_shipped_data_recipe_is_the_default(embedded):
    """`make train FAMILY=.. CS=..` trains on the same data options as the shipped model."""
    import json

    from helpers.models.training import recipe_generator, recipe_model

    family, cs, folder, model, _ = embedded
    meta = json.loads((folder / "training_meta.json").read_text())
    assert meta["train_config"]["generator"] == recipe_generator(family, cs)
    assert meta["train_config"].get("init_from") is None  # stage 1 starts from random weights
    # and on the recipe's architecture (llama-cs3: eight heads), which is the shipped config's
    overrides = meta["train_config"].get("model_overrides") or {}
    assert overrides == recipe_model(family, cs)
    assert all(getattr(model.config, k) == v for k, v in overrides.items())


def test_fine_tune_stage_is_documented(embedded):
    """A shipped model fine-tuned after `make train` records that run, as helpers.models.training.RECIPE_FINE_TUNE says
    (none now: the llama-cs3 that had such a stage was replaced, and its record moved under "replaced_model")."""
    import json

    from helpers.models.training import RECIPE_FINE_TUNE

    family, cs, folder, _, _ = embedded
    meta = json.loads((folder / "training_meta.json").read_text())
    want = RECIPE_FINE_TUNE.get((family, cs))
    assert ("fine_tune" in meta) == (want is not None)
    if want is None:
        return
    cfg = meta["fine_tune"]["train_config"]
    # the folder it was fine-tuned from, as recorded at the time (the folder was helpers/embedded_models/ then)
    assert Path(cfg["init_from"]).name == f"{family}-cs{cs}" and "embedded" in cfg["init_from"]
    assert (cfg["family"], cfg["cs"]) == (family, cs)
    assert {k: cfg[k] for k in want} == want


def _novel_flips(model, tok, cs: int) -> int:
    """How many of 30 DEFTABLENAME pairs with novel names (and table synonyms, the notebook default) flip: three
    batches, so three templates and schemas."""
    flips = 0
    for seed in (7, 8, 9):
        pairs = make_pairs("DEFTABLENAME", tok, cs_num=cs, batch_size=10, seed=seed, use_novel_names=True,
                           use_synonyms_table=True)
        corrupt = last_logits(model, [list(p.corrupt_ids) for p in pairs], tok.pad_token_id)
        flips += sum(int(corrupt[i, p.corrupt_token_id] > corrupt[i, p.clean_token_id]) for i, p in enumerate(pairs))
    return flips


def test_novel_names_stage_is_documented(embedded, novel_names_script):
    """A model shipped with the novel-names fine-tune holds the installed file, records the script's variant as it
    ran, and was chosen by the script's rule against the model before it; its weights copy novel names (24 or more
    of 30 pairs; the shipped ones 28-30), and a model without the stage does not (2 or fewer; the shipped ones 0)."""
    import hashlib
    import json

    family, cs, folder, model, tok = embedded
    meta = json.loads((folder / "training_meta.json").read_text())
    stage = meta.get("novel_names_fine_tune")
    flips = _novel_flips(model, tok, cs)
    if stage is None:
        assert flips <= 2, "weights that copy novel names, but no novel_names_fine_tune record"
        return
    assert flips >= 24, f"the novel-names stage is recorded, but only {flips} of 30 novel-name pairs flip"
    assert hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest() == stage["sha256"]
    script = novel_names_script
    variant = script.VARIANTS[stage["variant"]]
    assert f"{family}-cs{cs}" in variant.models
    fields = ("steps", "nonce_name_p", "filler_p", "filler_loss", "lr", "settle_steps", "seed")
    assert {k: stage[k] for k in fields} == {k: getattr(variant, k) for k in fields}
    last = stage["last_run"]["train_config"]
    assert (last["family"], last["cs"]) == (family, cs) and last["filler_loss"] == variant.filler_loss
    assert (last["steps"], last["lr"], last["seed"]) == ((variant.settle_steps, variant.settle_lr, variant.seed)
                                                        if variant.settle_steps else (variant.steps, variant.lr, variant.seed))
    want = {"filler_p": variant.filler_p, "nonce_name_p": variant.nonce_name_p, **dict(variant.generator)}
    if variant.settle_steps:
        want.update(dict(variant.settle_generator))
    assert {k: last["generator"].get(k) for k in want} == want
    if variant.base:  # a new model: its first stage (the folder's train_config) is the variant's base
        base = script.BASES[variant.base]
        first = meta["train_config"]
        assert (first["seed"], first["lr"], first["warmup"], first["max_minutes"], first["init_from"]) == \
            (base.seed, base.lr, base.warmup, base.max_minutes, None)
        assert first["model_overrides"] == dict(base.overrides) and stage["base_config"]["seed"] == base.seed
        assert first["generator"] == script.base_generator(family, cs)
    ev = stage["evaluation"]
    assert script.choose(ev["shipped_before"], {stage["variant"]: ev["chosen"]}, ev["n_items"], ev["n_pairs"]) == \
        stage["variant"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (the CPU run is the reference)")
@pytest.mark.parametrize("family", ["llama", "gpt_neo"])
def test_cuda_experiment_equals_the_cpu_one(family, row_attention_calls):
    """A researcher's run on a GPU: run_experiment end to end (five examples merged into the sweep's forwards; in
    bf16 Triton's row_attention with each row's own example's prefix: llama's fused modules, gpt_neo's swapped
    attention) gives the CPU's patched logit differences: to float rounding in float32, to bf16 rounding in
    bfloat16."""
    from helpers.experiments.experiment import run_experiment

    def run(device, dtype):
        result = run_experiment("embedded", 1, "ENGTABLENAME", embedded_family=family, batch_size=5, seed=0,
                                device=device, dtype=dtype, progress=False, generate=False)
        assert result.model_info["device"].startswith(device)  # (nnsight's pipeline once moved "cpu" to the GPU)
        return result.patching

    cpu = run("cpu", "float32")
    for dtype, tol in (("float32", 1e-3), ("bfloat16", 0.5)):
        gpu = run("cuda", dtype)
        assert torch.equal(gpu.included, cpu.included) and int(cpu.included.sum()) >= 4
        assert gpu.stats["max_examples_per_forward"] > 1  # merged, as a GPU runs them by default
        diff = (gpu.patched_logit_diff - cpu.patched_logit_diff).abs().max().item()
        assert diff < tol, (dtype, diff)
        if dtype == "bfloat16":
            flat = torch.stack([gpu.patched_logit_diff.flatten(), cpu.patched_logit_diff.flatten()])
            assert torch.corrcoef(flat)[0, 1] > 0.999
            assert gpu.stats["shared_prefix"]
            # the sweep's attention went through row_attention, each row reading its own example's prefix (gpt_neo:
            # its local layers' window, 256, covers the prompts)
            assert any(args[6] is not None for args, _ in row_attention_calls)  # (args[6]: row_example)


def test_word_set_table_spans_the_models():
    """evaluate_word_sets (scripts/evaluate.py --word-sets): every feature the command set holds, both word sets,
    the suite's words answered and flipped by the embedded model; word_set_table prints each range over models."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from helpers.models.evaluation import evaluate_word_sets, word_set_table

    folder = ROOT / "llama-cs1"
    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True).eval()
    r = evaluate_word_sets(model, tok, 1, seeds=(900,))
    assert set(r) == {"ENGTABLENAME", "ENGFIELDNAME", "DEFTABLENAME", "DEFFIELDNAME"}
    assert all(r[f]["suite"] == {"n": 10, "clean_accuracy": 1.0, "flip_rate": 1.0} for f in r)
    assert all(r[f]["upstream"]["n"] == 10 for f in r)
    other = {f: {v: {"n": 10, "clean_accuracy": 0.5, "flip_rate": 0.25} for v in ("suite", "upstream")} for f in r}
    table = word_set_table({"a": r, "b": other})
    assert "| DEFTABLENAME | 0.50–1.00 / 0.25–1.00 |" in table and "ENGORDERBYFIELD" not in table
