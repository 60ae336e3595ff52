"""Registry: every documented combination resolves to the id in upstream-tinysql.md §4, others raise."""
import pytest

from helpers.models import registry
from helpers.models.registry import EMBEDDED_DIR, ModelSpec, list_models, resolve_model

W = "withmartian/"
# Written out by hand from ../shared/docs/upstream-tinysql.md §4 (and upstream load_constants.py for cs4/cs5),
# independently of the tables in helpers/models/registry.py, so a typo there fails here.
EXPECTED = {
    (1, 0, True): "roneneldan/TinyStories-Instruct-2Layers-33M",
    (1, 1, True): W + "sql_interp_bm1_cs1_experiment_1.10",
    (1, 2, True): W + "sql_interp_bm1_cs2_experiment_2.10",
    (1, 3, True): W + "sql_interp_bm1_cs3_experiment_3.10",
    (1, 4, True): W + "sql_interp_bm1_cs4_dataset_synonyms_experiment_1.1",
    (1, 5, True): W + "sql_interp_bm1_cs5_dataset_synonyms_experiment_1.2",
    (1, 1, False): W + "sql_interp_bm1_cs1_experiment_1.8",
    (1, 2, False): W + "sql_interp_bm1_cs2_experiment_2.8",
    (1, 3, False): W + "sql_interp_bm1_cs3_experiment_3.8",
    (2, 0, True): "Qwen/Qwen2.5-0.5B-Instruct",
    (2, 1, True): W + "sql_interp_bm2_cs1_experiment_4.3",
    (2, 2, True): W + "sql_interp_bm2_cs2_experiment_5.3",
    (2, 3, True): W + "sql_interp_bm2_cs3_experiment_6.3",
    (2, 1, False): W + "sql_interp_bm2_cs1_experiment_4.2",
    (2, 2, False): W + "sql_interp_bm2_cs2_experiment_5.2",
    (2, 3, False): W + "sql_interp_bm2_cs3_experiment_6.2",
    (3, 0, True): W + "Llama-3.2-1B-Instruct",
    (3, 1, True): W + "sql_interp_bm3_cs1_experiment_7.3",
    (3, 2, True): W + "sql_interp_bm3_cs2_experiment_8.3",
    (3, 3, True): W + "sql_interp_bm3_cs3_experiment_9.3",
    (3, 1, False): W + "sql_interp_bm3_cs1_experiment_7.2",
    (3, 2, False): W + "sql_interp_bm3_cs2_experiment_8.2",
    (3, 3, False): W + "sql_interp_bm3_cs3_experiment_9.2",
    (4, 0, True): "ibm-granite/granite-3.0-1b-a400m-instruct",
    (5, 0, True): "HuggingFaceTB/SmolLM-360M-Instruct",
}


@pytest.mark.parametrize("key", sorted(EXPECTED))
def test_documented_combos_resolve(key):
    m, cs, sem = key
    spec = resolve_model(m, cs, sem)
    assert spec.model_id == EXPECTED[key]
    assert (spec.model_num, spec.cs_num, spec.is_embedded, spec.overridden) == (m, cs, False, False)
    if cs == 0:
        assert spec.semantic is None and spec.name == f"bm{m}-cs0-base"
        assert resolve_model(m, cs, not sem).model_id == EXPECTED[key]  # base models ignore semantic
    else:
        assert spec.semantic is sem and spec.name == f"bm{m}-cs{cs}-{'sem' if sem else 'nonsem'}"
    # upstream's pad-token handling only for the fine-tuned TinyStories checkpoints
    assert spec.needs_bm1_pad == (m == 1 and cs != 0)


def test_default_semantic_is_true():
    assert resolve_model(1, 1).model_id == EXPECTED[(1, 1, True)]


@pytest.mark.parametrize("cs", range(6))
def test_gpt2_any_cs(cs):
    spec = resolve_model(0, cs, semantic=False)
    assert spec.model_id == "openai-community/gpt2" and spec.cs_num == cs and spec.name == f"bm0-cs{cs}-base"
    assert spec.family_hint == "gpt2" and not spec.needs_bm1_pad


@pytest.mark.parametrize("bad", [
    (1, 4, False), (1, 5, False), (1, 6, True), (2, 4, True), (3, 5, True), (4, 1, True), (5, 2, False),
    (6, 0, True), (-1, 0, True), (2, None, True), (0, 6, True), ("seven", 1, True), (True, 1, True),
    (1.0, 1, True), ("embedded", 0, True), ("embedded", 4, True), ("embedded", 1, False),
])
def test_invalid_combos_raise_with_list(bad):
    with pytest.raises(ValueError) as info:
        resolve_model(*bad)
    msg = str(info.value)
    assert "Valid combinations" in msg
    # the list names real ids and the embedded option
    assert EXPECTED[(2, 1, True)] in msg and "embedded" in msg and "model_path" in msg


def test_invalid_embedded_family():
    """Said first and alone (it was the last of ~30 lines of hub models)."""
    with pytest.raises(ValueError, match=r"^embedded_family must be one of \['llama', 'gpt_neo'\], got 'qwen2'$"):
        resolve_model("embedded", 1, embedded_family="qwen2")


def test_string_model_nums_from_notebook_parameters():
    assert resolve_model("2", "3").model_id == EXPECTED[(2, 3, True)]
    assert resolve_model(" Embedded ", 1).name == "embedded-llama-cs1"


@pytest.mark.parametrize("family", ["llama", "gpt_neo"])
@pytest.mark.parametrize("cs", [1, 2, 3])
def test_embedded_resolves_without_folder(family, cs):
    spec = resolve_model("embedded", cs, embedded_family=family)
    assert spec.is_embedded and spec.model_num == "embedded" and spec.cs_num == cs and spec.semantic is True
    assert spec.model_id == str(EMBEDDED_DIR / f"{family}-cs{cs}")
    assert spec.name == f"embedded-{family}-cs{cs}" and spec.family_hint == family
    assert EMBEDDED_DIR.parent.name == "models" and EMBEDDED_DIR.parent.parent.name == "helpers"  # shipped inside the package (package-data)


def test_model_path_override(tmp_path):
    spec = resolve_model(1, 2, semantic=False, model_path=str(tmp_path))
    assert spec.model_id == str(tmp_path) and spec.overridden and spec.is_local
    # the slot (name, pad handling, family hint) is kept: the override is "this model, from elsewhere"
    assert spec.name == "bm1-cs2-nonsem" and spec.needs_bm1_pad and spec.family_hint == "gpt_neo"
    hub = resolve_model(2, 1, model_path="someone/other-model")
    assert hub.model_id == "someone/other-model" and not hub.is_local
    emb = resolve_model("embedded", 3, embedded_family="gpt_neo", model_path=str(tmp_path))
    assert emb.model_id == str(tmp_path) and emb.is_embedded and emb.overridden


def test_an_override_is_named_as_its_slot_and_shown_with_its_source(tmp_path):
    assert resolve_model(1, 2).display_name == "bm1-cs2-sem"
    spec = resolve_model("embedded", 1, model_path=str(tmp_path))
    assert spec.name == "embedded-llama-cs1" and spec.display_name == f"embedded-llama-cs1 (from {tmp_path})"


def test_papermill_raw_strings_are_read_or_refused():
    """``papermill -r`` and quoted YAML values arrive as strings: digits and true/false are read, not misread."""
    assert resolve_model("embedded", "2").cs_num == 2
    assert resolve_model(None, "3", model_path="x/y").cs_num == 3
    assert resolve_model(1, 1, semantic="False").semantic is False and resolve_model(1, 1, semantic="true").semantic
    with pytest.raises(ValueError, match="semantic"):
        resolve_model(1, 1, semantic="no")
    with pytest.raises(ValueError, match="Valid combinations"):
        resolve_model("embedded", "two")


def test_model_path_without_model_num(tmp_path):
    spec = resolve_model(None, 1, model_path=str(tmp_path / "my ckpt"))
    assert spec.model_num is None and spec.name == "custom-my_ckpt" and spec.overridden
    assert spec.display_name == f"custom-my_ckpt (from {tmp_path / 'my ckpt'})"
    assert not spec.needs_bm1_pad
    with pytest.raises(ValueError):
        resolve_model(None, 1)


def test_empty_model_path_means_no_override():
    assert resolve_model(3, 1, model_path="").model_id == EXPECTED[(3, 1, True)]


def test_model_path_override_still_validates_slot():
    with pytest.raises(ValueError):
        resolve_model(2, 4, model_path="x/y")


def test_list_models_is_the_full_grid():
    specs = list_models()
    assert all(isinstance(s, ModelSpec) for s in specs)
    hub = {(s.model_num, s.cs_num, s.semantic if s.semantic is not None else True): s.model_id
           for s in specs if not s.is_embedded and s.model_num != 0}
    assert hub == EXPECTED
    assert [s.model_id for s in specs if s.model_num == 0] == ["openai-community/gpt2"]
    emb = {(s.family_hint, s.cs_num) for s in specs if s.is_embedded}
    assert emb == {(f, c) for f in ("llama", "gpt_neo") for c in (1, 2, 3)}
    names = [s.name for s in specs]
    assert len(names) == len(set(names)), "display names must be unique (they become file names)"
    assert all(registry.re.fullmatch(r"[A-Za-z0-9._-]+", n) for n in names)
    assert not any(s.is_embedded for s in list_models(include_embedded=False))
    assert all(s.is_embedded for s in list_models(include_hub=False))
