"""load_model: local folders of every family round-trip exactly; hub failures give a clear ModelLoadError."""
import inspect
import sys
import time
import types

import pytest
import torch

from helpers.models import loading
from helpers.models.architectures import FAMILIES, get_submodule
from helpers.models.loading import ModelLoadError, hf_token, load_model, resolve_dtype
from helpers.models.registry import resolve_model
from helpers.models.tiny_models import TINY_FAMILIES, build_random_model, build_tiny_tokenizer, tiny_config

PROMPT = "### Instruction: show me the price from the orders table ### Response: SELECT price FROM orders"
PLANTED = "hf_plantedSECRETtoken1234567890"


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


def _save(folder, family, tokenizer, vocab_size=None, seed=0):
    model = build_random_model(tiny_config(family, vocab_size=vocab_size or len(tokenizer)), seed=seed)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tok):
    """One saved tiny folder per family: {family: (folder, original model)}."""
    out = {}
    for family in TINY_FAMILIES:
        folder = tmp_path_factory.mktemp(family)
        out[family] = (folder, _save(folder, family, tok, seed=TINY_FAMILIES.index(family)))
    return out


@pytest.fixture
def no_colab(monkeypatch):
    monkeypatch.setitem(sys.modules, "google.colab", None)  # `import google.colab` raises ImportError


def _fake_colab(monkeypatch, get):
    google = types.ModuleType("google")
    colab = types.ModuleType("google.colab")
    colab.userdata = types.SimpleNamespace(get=get)
    google.colab = colab
    monkeypatch.setitem(sys.modules, "google", google)
    monkeypatch.setitem(sys.modules, "google.colab", colab)


# ------------------------------------------------------------------ local folders, every family
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_local_roundtrip(family, saved, tok):
    folder, original = saved[family]
    loaded = load_model(str(folder), dtype="float32", device="cpu")
    model, cfg = loaded.hf_model, loaded.hf_model.config
    assert not model.training and loaded.dtype == torch.float32 and loaded.device.type == "cpu"
    assert next(model.parameters()).dtype == torch.float32
    assert loaded.spec.model_id == str(folder) and loaded.spec.name == f"custom-{folder.name}"
    assert loaded.revision is None  # local folder: no hub commit

    # the same tokenizer came back
    assert loaded.tokenizer(PROMPT).input_ids == tok(PROMPT).input_ids
    # the same weights came back: logits equal the original model's (original is eager; loaded may be sdpa)
    ids = torch.tensor([tok(PROMPT).input_ids])
    with torch.no_grad():
        want, got = original(ids).logits, model(ids).logits
    assert want.abs().max() > 1.0  # not trivially zero
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)

    # family and geometry from the config, head_dim honoured (tiny llama-likes use 16 != 48 // 4)
    assert loaded.family == FAMILIES[cfg.model_type] and cfg.model_type == family
    g = loaded.geometry
    assert (g.n_layers, g.n_heads, g.d_model) == (2, 4, 48)
    if family in ("gpt_neo", "gpt2"):
        assert (g.d_head, g.n_kv_heads) == (12, 4)
    else:
        assert (g.d_head, g.n_kv_heads) == (16, 2) and cfg.head_dim == 16
    if family == "gpt_neo":
        assert loaded.attn_implementation == "eager"


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_nnsight_trace_reads_out_proj_input(family, saved):
    folder, _ = saved[family]
    loaded = load_model(folder, dtype="float32", device="cpu")
    lm, spec, g = loaded.lm, loaded.family, loaded.geometry
    assert lm.tokenizer is loaded.tokenizer and loaded.tokenizer.padding_side == "left"
    last = g.n_layers - 1
    with torch.no_grad(), lm.trace(PROMPT):
        z = get_submodule(get_submodule(lm, spec.blocks)[last], spec.out_proj).input.save()
    n_pos = len(loaded.tokenizer(PROMPT).input_ids)
    assert tuple(z.shape) == (1, n_pos, g.n_heads * g.d_head)

    # the same tensor through a plain torch hook on the wrapped model
    seen = {}
    module = get_submodule(get_submodule(loaded.hf_model, spec.blocks)[last], spec.out_proj)
    handle = module.register_forward_pre_hook(lambda m, args: seen.setdefault("z", args[0].detach().clone()))
    try:
        with torch.no_grad():
            loaded.hf_model(torch.tensor([loaded.tokenizer(PROMPT).input_ids]))
    finally:
        handle.remove()
    torch.testing.assert_close(z, seen["z"])


def test_the_nnsight_wrapper_leaves_the_model_on_its_device(saved, monkeypatch):
    """nnsight wraps the model in a transformers pipeline, which moves a model given no device to cuda:0 whenever
    a GPU exists: device="cpu" on a GPU machine ran on the GPU. Here a GPU is made to seem present."""
    import transformers.pipelines.base as pipeline_base

    monkeypatch.setattr(pipeline_base, "is_torch_cuda_available", lambda: True)
    folder, _ = saved["llama"]
    loaded = load_model(folder, dtype="float32", device="cpu")
    assert next(loaded.hf_model.parameters()).device.type == "cpu" and loaded.device.type == "cpu"
    with torch.no_grad():
        loaded.hf_model(torch.tensor([loaded.tokenizer(PROMPT).input_ids]))  # inputs on the CPU still fit


def test_spec_from_registry_with_model_path(saved):
    folder, _ = saved["llama"]
    spec = resolve_model(3, 2, semantic=False, model_path=str(folder))
    loaded = load_model(spec, device="cpu")
    assert loaded.spec is spec and loaded.spec.name == "bm3-cs2-nonsem" and not loaded.pad_resized


def test_dtype_and_attention_options(saved):
    folder, _ = saved["llama"]
    bf = load_model(folder, dtype="bf16", device="cpu", wrap=False)
    assert bf.lm is None and next(bf.hf_model.parameters()).dtype == torch.bfloat16
    assert load_model(folder, device="cpu", wrap=False).attn_implementation == "sdpa"
    assert load_model(folder, device="cpu", attn_implementation="eager", wrap=False).attn_implementation == "eager"
    with pytest.warns(UserWarning, match="sdpa"):
        neo = load_model(saved["gpt_neo"][0], device="cpu", attn_implementation="sdpa", wrap=False)
    assert neo.attn_implementation == "eager"


def test_resolve_dtype():
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("bfloat16", "cpu") == torch.bfloat16 and resolve_dtype("fp16", "cpu") == torch.float16
    assert resolve_dtype(torch.float64, "cpu") == torch.float64
    with pytest.raises(ValueError, match="dtype"):
        resolve_dtype("int8", "cpu")
    with pytest.raises(ValueError, match="not a device"):
        loading.resolve_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            loading.resolve_device("cuda")
    else:
        assert resolve_dtype("auto", "cuda") == torch.bfloat16


# ------------------------------------------------------------------ BM1 pad handling
def test_bm1_pad_added_and_embeddings_resized(tmp_path):
    tok = build_tiny_tokenizer(pad_token=None)
    n = len(tok)
    original = _save(tmp_path, "gpt_neo", tok)  # n rows: no pad row in the checkpoint
    loaded = load_model(resolve_model(1, 1, model_path=str(tmp_path)), device="cpu")
    t, m = loaded.tokenizer, loaded.hf_model
    assert t.pad_token == "<|pad|>" and t.pad_token_id == n and len(t) == n + 1
    assert loaded.pad_resized and m.get_input_embeddings().weight.shape[0] == n + 1
    assert m.get_output_embeddings().weight.shape[0] == n + 1
    assert m.config.pad_token_id == n and m.generation_config.pad_token_id == n
    ids = torch.tensor([tok(PROMPT).input_ids])
    with torch.no_grad():  # the old rows are untouched
        torch.testing.assert_close(m(ids).logits[..., :n], original(ids).logits)
    # nnsight kept our pad token (it only sets pad=eos when there is none)
    assert loaded.lm.tokenizer.pad_token == "<|pad|>"


def test_bm1_pad_row_already_in_checkpoint_is_not_resized(tmp_path):
    tok = build_tiny_tokenizer(pad_token=None)
    n = len(tok)
    _save(tmp_path, "gpt_neo", tok, vocab_size=n + 1)  # the checkpoint already has the pad row
    before = load_model(str(tmp_path), device="cpu", wrap=False).hf_model.get_input_embeddings().weight.clone()
    loaded = load_model(resolve_model(1, 3, semantic=False, model_path=str(tmp_path)), device="cpu")
    emb = loaded.hf_model.get_input_embeddings().weight
    assert not loaded.pad_resized and emb.shape[0] == n + 1 and torch.equal(emb, before)
    assert loaded.tokenizer.pad_token_id == n == loaded.hf_model.config.pad_token_id


def test_bm1_tokenizer_already_has_pad(tmp_path):
    tok = build_tiny_tokenizer(pad_token="<|pad|>")
    _save(tmp_path, "gpt_neo", tok)
    loaded = load_model(resolve_model(1, 2, model_path=str(tmp_path)), device="cpu")
    assert len(loaded.tokenizer) == len(tok) and not loaded.pad_resized
    assert loaded.hf_model.config.pad_token_id == tok.pad_token_id


def test_no_pad_handling_for_base_or_other_models(tmp_path):
    tok = build_tiny_tokenizer(pad_token=None)
    _save(tmp_path, "gpt_neo", tok)
    for spec in (resolve_model(1, 0, model_path=str(tmp_path)), resolve_model(2, 1, model_path=str(tmp_path))):
        loaded = load_model(spec, device="cpu")
        assert len(loaded.tokenizer) == len(tok) and not loaded.pad_resized
        assert loaded.tokenizer.pad_token == tok.eos_token  # nnsight's default, not <|pad|>


# ------------------------------------------------------------------ errors: embedded, folders, hub
def test_missing_embedded_model_error(monkeypatch, tmp_path):
    monkeypatch.setattr("helpers.models.registry.EMBEDDED_DIR", tmp_path / "nowhere")
    spec = resolve_model("embedded", 2, embedded_family="gpt_neo")
    with pytest.raises(ModelLoadError) as info:
        load_model(spec)
    msg = str(info.value)
    assert "embedded model embedded-gpt_neo-cs2 not found at" in msg and spec.model_id in msg
    assert "make train FAMILY=gpt_neo CS=2" in msg
    # a model_path standing in for the embedded model is the user's folder: no advice to train the embedded one
    with pytest.raises(ModelLoadError, match="does not exist") as info:
        load_model(resolve_model("embedded", 2, model_path=str(tmp_path / "my_model")))
    assert "make train" not in str(info.value)


def test_missing_local_folder_and_incomplete_folder(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "no" / "such" / "folder"))
    build_random_model(tiny_config("llama")).save_pretrained(tmp_path)  # weights but no tokenizer files
    with pytest.raises(ModelLoadError, match="tokenizer") as info:
        load_model(tmp_path)
    assert str(tmp_path) in str(info.value)


def _hub_failure(model_id):
    t0 = time.time()
    with pytest.raises(ModelLoadError) as info:
        load_model(model_id, device="cpu")
    return str(info.value), time.time() - t0


def test_hub_offline_env_gives_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_TOKEN", PLANTED)
    spec = resolve_model(1, 1)
    msg, elapsed = _hub_failure(spec)
    assert spec.model_id in msg and "could not be reached" in msg and "HF_HUB_OFFLINE" in msg
    assert "HF_TOKEN is set" in msg and "model_path" in msg
    assert PLANTED not in msg and PLANTED[3:15] not in msg
    assert elapsed < 5


def test_hub_without_offline_env_fails_fast_and_clearly(monkeypatch, no_colab):
    """No HF_HUB_OFFLINE: offline (here) the reachability probe fails fast; online the repo does not exist."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_TOKEN", PLANTED)
    model_id = "tinysql-tests-nonexistent/definitely-not-a-model-3f9a"
    msg, elapsed = _hub_failure(model_id)
    assert msg.startswith("Could not load") and model_id in msg and "model_path" in msg
    assert "HF_TOKEN is set" in msg and PLANTED not in msg
    assert elapsed < 15  # transformers' own retries take ~25 s per file offline


def test_hub_error_says_no_token(monkeypatch, no_colab):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    msg, _ = _hub_failure(resolve_model(3, 1))
    assert "no HF_TOKEN was found" in msg and "withmartian/sql_interp_bm3_cs1_experiment_7.3" in msg


def test_hub_error_classification_gated_and_unknown():
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    for exc_type, words in ((GatedRepoError, "gated"), (RepositoryNotFoundError, "not found on the hub")):
        inner = exc_type.__new__(exc_type)
        Exception.__init__(inner, "401 Client Error")
        outer = OSError("wrapped")
        outer.__cause__ = inner
        msg = str(loading._hub_error("org/name", outer, offline_reason=None, what="config"))
        assert words in msg and "'org/name'" in msg and "HF_TOKEN" in msg


# ------------------------------------------------------------------ token lookup
def test_token_env_wins_over_colab(monkeypatch):
    _fake_colab(monkeypatch, lambda key: "from-colab")
    monkeypatch.setenv("HF_TOKEN", "from-env")
    assert hf_token() == "from-env"
    monkeypatch.delenv("HF_TOKEN")
    assert hf_token() == "from-colab"


def test_token_colab_errors_are_swallowed(monkeypatch, no_colab):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    assert hf_token() is None  # google.colab not importable

    def boom(key):
        raise RuntimeError("SecretNotFoundError")

    _fake_colab(monkeypatch, boom)
    assert hf_token() is None


def test_no_token_parameter():
    params = set(inspect.signature(load_model).parameters)
    assert not {p for p in params if "token" in p.lower() or "auth" in p.lower()}, params


# ------------------------------------------------------------------ hub ids served from the local HF cache
def test_hub_id_loads_from_cache_offline_with_commit(monkeypatch, tmp_path, tok):
    """A hub id already in the HF cache loads offline, through the same from_pretrained path, and reports its commit."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--fakeorg--tiny-llama"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    original = _save(repo / "snapshots" / commit, "llama", tok)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_TOKEN", PLANTED)
    loaded = load_model(resolve_model(2, 1, model_path="fakeorg/tiny-llama"), device="cpu", cache_dir=str(tmp_path))
    assert loaded.revision == commit and loaded.spec.name == "bm2-cs1-sem" and not loaded.spec.is_local
    ids = torch.tensor([tok(PROMPT).input_ids])
    with torch.no_grad():
        torch.testing.assert_close(loaded.hf_model(ids).logits, original(ids).logits, atol=1e-4, rtol=1e-4)
    # a repo missing from that cache still fails clearly
    with pytest.raises(ModelLoadError, match="not in the local Hugging Face cache"):
        load_model("fakeorg/other", device="cpu", cache_dir=str(tmp_path))


def test_unknown_family_fails_before_weights(tmp_path, tok):
    from transformers import MistralConfig

    cfg = MistralConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2)
    cfg.save_pretrained(tmp_path)  # config only: the family check must come before the weights are read
    tok.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="Unsupported architecture family 'mistral'"):
        load_model(tmp_path)
