"""The four feature notebooks and the explorer notebook: jupytext pairs in sync, committed without outputs,
papermill parameters as specified, and every feature notebook executes end to end on CPU (papermill, the
venv's python3 kernel) on the embedded model, or a tiny random model saved to a temporary folder while the
embedded models are missing. ``model_settings`` is shared with the other test modules of this suite."""
from __future__ import annotations

import ast
import atexit
import functools
import json
import shutil
import sys
import tempfile
from pathlib import Path

import jupytext
import nbformat
import papermill as pm
import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
FEATURE_NOTEBOOKS = ("ENGTABLENAME", "ENGFIELDNAME", "DEFTABLENAME", "DEFFIELDNAME", "ENGORDERBYFIELD",
                     "ENGORDERBYDIRECTION", "ENGAGGREGATEFUNCTION", "ENGAGGREGATEFIELD")
ALL_NOTEBOOKS = FEATURE_NOTEBOOKS + ("explorer",)
KERNEL = "python3"
REQUIRED_PARAMETERS = {"model_num", "cs_num", "feature_name", "use_novel_names", "use_synonyms_table",
                       "use_synonyms_field", "vocabulary", "batch_size", "seed", "model_path", "dtype", "device",
                       "output_dir"}
EMBEDDED = (REPO / "helpers" / "models" / "embedded" / "llama-cs1" / "config.json").is_file()


@functools.lru_cache(maxsize=None)
def model_settings() -> dict:
    """run_experiment / notebook parameters selecting the test model (small batch, CPU)."""
    base = {"batch_size": 2, "device": "cpu", "dtype": "float32"}
    if EMBEDDED:
        return {**base, "model_num": "embedded", "cs_num": 1}
    from transformers import AutoTokenizer

    from helpers.models.tiny_models import tiny_model

    shared = REPO / "helpers" / "models" / "embedded" / "tokenizer"
    if (shared / "tokenizer.json").is_file():
        tok = AutoTokenizer.from_pretrained(shared)
    else:
        from helpers.models.tokenizer_training import train_tokenizer

        tok = train_tokenizer()
    folder = Path(tempfile.mkdtemp(prefix="tinysql-test-model-"))
    atexit.register(shutil.rmtree, folder, True)
    tiny_model("llama", vocab_size=len(tok)).save_pretrained(folder)
    tok.save_pretrained(folder)
    # A random model predicts nothing right: keep its examples so the scores are not all excluded.
    return {**base, "model_num": "embedded", "cs_num": 1, "model_path": str(folder), "keep_incorrect": True}


@pytest.fixture
def kernel_env(monkeypatch):
    """The kernel imports helpers from this checkout even when the package is not pip-installed."""
    monkeypatch.setenv("PYTHONPATH", str(REPO))


def execute(name: str, out_dir: Path, **parameters):
    out_dir.mkdir(parents=True, exist_ok=True)
    return pm.execute_notebook(str(NOTEBOOKS / f"{name}.ipynb"), str(out_dir / f"{name}.executed.ipynb"),
                               parameters=parameters, kernel_name=KERNEL, cwd=str(REPO), progress_bar=False)


# ----------------------------------------------------------------------------------------------- static


@pytest.mark.parametrize("name", ALL_NOTEBOOKS)
def test_pair_in_sync_and_without_outputs(name):
    nb = jupytext.read(NOTEBOOKS / f"{name}.ipynb")
    converted = jupytext.writes(nb, fmt="py:percent")
    strip = lambda text: [line for line in text.splitlines() if "jupytext_version" not in line]  # noqa: E731
    assert strip(converted) == strip((NOTEBOOKS / f"{name}.py").read_text()), \
        f"notebooks/{name}.ipynb and .py differ: run `jupytext --sync notebooks/{name}.py`"
    raw = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    for cell in raw.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{name}.ipynb has outputs committed"


def _assigned_names(source: str) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Assign):
            for target in node.targets:
                for t in ast.walk(target):
                    if isinstance(t, ast.Name):
                        names.add(t.id)
    return names


@pytest.mark.parametrize("name", FEATURE_NOTEBOOKS)
def test_parameters_cell_and_colab_cell(name):
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    tagged = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1
    names = _assigned_names(tagged[0].source)
    assert REQUIRED_PARAMETERS <= names
    # papermill reads them all (one a line), so it warns only about names that are not parameters
    from helpers.experiments.experiment import NOTEBOOK_ONLY_PARAMETERS, ExperimentSettings
    settings = set(ExperimentSettings.__dataclass_fields__) | set(NOTEBOOK_ONLY_PARAMETERS)
    assert set(pm.inspect_notebook(str(NOTEBOOKS / f"{name}.ipynb"))) == settings == names
    assert not any("token" in n.lower() for n in names), "a token must never be a notebook parameter"
    namespace: dict = {}
    exec(tagged[0].source, namespace)  # the defaults: offline embedded model on CPU
    assert namespace["feature_name"] == name and namespace["model_num"] == "embedded"
    from helpers.tinysql.pairs import parse_feature
    assert namespace["cs_num"] in parse_feature(name).command_sets  # its default command set can express it
    assert namespace["device"] == "cpu" and namespace["model_path"] is None
    first = code[0].source
    assert '"google.colab" in sys.modules' in first and "REPO_URL" in first
    exec(first, {})  # outside Colab it installs nothing and does not fail


@pytest.mark.parametrize("name", ALL_NOTEBOOKS)
def test_colab_cell_installs_only_what_is_missing_and_asks_for_the_repository(name, monkeypatch):
    first = next(c for c in nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4).cells if c.cell_type == "code")
    ran = []
    monkeypatch.setitem(sys.modules, "google.colab", object())
    monkeypatch.setattr("subprocess.run", lambda cmd, **kw: ran.append(cmd))
    exec(first.source, {})  # helpers importable (a clone as the working folder): nothing to install
    assert ran == []
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)
    with pytest.raises(RuntimeError, match="Set REPO_URL"):  # the shipped placeholder: a clear request
        exec(first.source, {})
    exec(first.source.replace("github.com/REPLACE-WITH-YOUR-ORG/", "github.com/someone/"), {})  # REPO_URL set
    assert ran and ran[0][-1] == "git+https://github.com/someone/tinysql-patching.git"


def test_kernel_is_the_venv_python(kernel_env, tmp_path):
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("import sys; print(sys.executable)")])
    path = tmp_path / "probe.ipynb"
    nbformat.write(nb, path)
    done = pm.execute_notebook(str(path), str(path), kernel_name=KERNEL, progress_bar=False)
    printed = done.cells[0].outputs[0]["text"].strip()
    assert Path(printed).parent.resolve() == Path(sys.executable).parent.resolve(), \
        f"kernel {KERNEL!r} runs {printed}, not this venv's python ({sys.executable})"


# ----------------------------------------------------------------------------------------------- execution


@pytest.mark.parametrize("name", FEATURE_NOTEBOOKS)
def test_feature_notebook_executes(name, tmp_path, kernel_env):
    from helpers.tinysql.pairs import parse_feature

    out = tmp_path / "out"
    settings = dict(model_settings())
    needed = parse_feature(name).command_sets
    if settings["cs_num"] not in needed:  # ORDER BY and aggregates: the first command set that has them
        settings["cs_num"] = needed[0]
    nb = execute(name, tmp_path, output_dir=str(out), **settings)
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    results = list(out.glob("activation_patching_*.json"))
    assert len(results) == 1 and f"_{name}_" in results[0].name
    data = json.loads(results[0].read_text())
    assert data["metadata"]["feature_name"] == name
    assert len(data["examples"]) == model_settings()["batch_size"]
    assert list(out.glob("*.heatmap.html")) and list(out.glob("*.spread.html"))
    text = "\n".join(str(o.get("data", o.get("text", ""))) for c in nb.cells for o in c.get("outputs", []))
    assert "[[" in text and "Clean prompt" in text  # the marked example was shown
    assert "L0_H0" in text  # the heatmap and the top-heads table were rendered


@pytest.mark.parametrize("bad, message", [({"cs_num": 7}, "No registered model"),
                                          ({"feature_name": "TABLEISH"}, "Unknown feature"),
                                          ({"feature_name": "ENGTABLENAME"}, "run notebooks/ENGTABLENAME.ipynb"),
                                          ({"vocabulary": "mine"}, "Unknown vocabulary 'mine'"),
                                          ({"cs_nmu": 2}, "unknown notebook parameter(s) 'cs_nmu'")])
def test_bad_input_fails_in_the_first_helper_call(bad, message, tmp_path, kernel_env):
    with pytest.raises(pm.PapermillExecutionError) as info:
        execute("DEFTABLENAME", tmp_path, output_dir=str(tmp_path / "out"), **{**model_settings(), **bad})
    assert message in str(info.value)
    assert "run_experiment" in info.value.source  # the first helper call of the notebook
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_command_set_that_cannot_express_the_feature_is_refused_first(tmp_path, kernel_env):
    with pytest.raises(pm.PapermillExecutionError) as info:
        execute("ENGORDERBYFIELD", tmp_path, output_dir=str(tmp_path / "out"), **{**model_settings(), "cs_num": 1})
    assert "ENGORDERBYFIELD needs a command set with ORDER BY" in str(info.value) and "CS2, CS3" in str(info.value)
    assert "run_experiment" in info.value.source


def test_explorer_notebook_builds_its_widgets(tmp_path, kernel_env):
    nb = execute("explorer", tmp_path)
    outputs = [o for c in nb.cells for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in outputs)
