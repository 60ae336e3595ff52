"""results/plotting: the JSON keeps the original notebook's keys (its loader still reads it), adds the
per-example and provenance fields, writes NaN as null, names files by settings, writes atomically."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import stat
import subprocess
from pathlib import Path

import numpy as np
import plotly.express as px
import pytest
import torch

from helpers.experiments import atomic_files, plotting, result_json, results
from helpers.experiments.experiment import ExperimentSettings, run_experiment, validate
from test_notebooks import EMBEDDED, model_settings

ORIGINAL_METADATA = {"source", "timestamp", "model_num", "model_hf", "commandset", "use_novel_names",
                     "use_synonyms_table", "use_synonyms_field", "num_sql_fields", "batch_size", "n_positions",
                     "n_layers", "n_heads"}


def original_load_and_plot_results(json_path):
    """The original notebook's loader (its data handling and plot call, verbatim apart from layout)."""
    with open(json_path) as f:
        data = json.load(f)
    patching_results = np.array(data["patching_results"])
    metadata = data["metadata"]
    results_2d = patching_results.reshape(metadata["n_layers"] * metadata["n_heads"], metadata["n_positions"])
    layer_head_labels = [f"L{l}_H{h}" for l in range(metadata["n_layers"]) for h in range(metadata["n_heads"])]
    position_labels = [f"pos_{i}" for i in range(metadata["n_positions"])]
    title = (f"Layer-Head Patching Analysis\nSource: {metadata['source']}, Model: {metadata['model_num']}, "
             f"Dataset: {metadata['commandset']}\nTime: {metadata['timestamp']}")
    fig = px.imshow(results_2d, color_continuous_midpoint=0.0, color_continuous_scale="RdBu",
                    labels={"x": "Position", "y": "Layer_Head", "color": "Norm. Logit Diff"},
                    x=position_labels, y=layer_head_labels, title=title)
    for key, value in metadata.items():
        print(f"{key.replace('_', ' ').title()}: {value}")
    print(f"Clean logit difference: {data['clean_logit_diff']:.3f}")
    print(f"Corrupt logit difference: {data['corrupt_logit_diff']:.3f}")
    return fig


@pytest.fixture(scope="module")
def exp():
    return run_experiment(feature_name="DEFFIELDNAME", progress=False, **model_settings())


@pytest.fixture(scope="module")
def saved(exp, tmp_path_factory):
    return results.save_experiment(exp, tmp_path_factory.mktemp("saved"))


def _strict_load(path):
    def no_constants(name):
        raise ValueError(f"non-JSON constant {name}")
    return json.loads(path.read_text(), parse_constant=no_constants)


def test_json_is_strict_and_keeps_the_original_keys(saved, exp, capsys):
    data = _strict_load(saved["json"])
    assert ORIGINAL_METADATA <= set(data["metadata"])
    meta = data["metadata"]
    geo = exp.geometry
    assert (meta["n_layers"], meta["n_heads"], meta["n_positions"]) == (geo.n_layers, geo.n_heads, exp.n_positions)
    arr = np.array(data["patching_results"], dtype=float)
    assert arr.shape == (geo.n_layers, geo.n_heads, exp.n_positions)
    assert len(data["clean_tokens"]) == exp.n_positions  # the reference example is the longest
    fig = original_load_and_plot_results(saved["json"])
    assert fig.data and "Clean logit difference" in capsys.readouterr().out


def test_nan_is_written_as_null(saved, exp):
    text = saved["json"].read_text()
    assert "NaN" not in text and "Infinity" not in text
    mean = exp.mean().numpy()
    stored = np.array(_strict_load(saved["json"])["patching_results"], dtype=float)
    assert np.array_equal(np.isnan(mean), np.isnan(stored))
    assert np.allclose(mean[~np.isnan(mean)], stored[~np.isnan(stored)])
    assert result_json.to_jsonable([1.0, float("nan"), float("inf")]) == [1.0, None, None]


def test_added_fields(saved, exp):
    data = _strict_load(saved["json"])
    meta = data["metadata"]
    assert meta["feature_name"] == data["feature_name"] == "DEFFIELDNAME"
    assert meta["seed"] == 0 and meta["model_id"] and meta["model_revision"]
    # a local folder: its weights' hash, which a sweep compares with the folder's now (retrained: not served)
    assert meta["model_weights"] == result_json.weights_fingerprint(meta["model_id"]) and \
        meta["model_weights"].startswith(result_json.WEIGHTS_SCHEME)
    assert set(meta["versions"]) >= {"python", "torch", "transformers", "nnsight"}
    head = subprocess.run(["git", "-C", str(Path(__file__).parent), "rev-parse", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    if head:  # (a checkout: the commit that produced it, beside the package version, which commits do not change)
        assert meta["versions"]["tinysql-patching-commit"].removesuffix("-dirty") == head
    assert meta["started_at"] <= meta["finished_at"]
    assert len(data["examples"]) == len(exp.pairs)
    for ex, pair in zip(data["examples"], exp.pairs):
        assert ex["clean_prompt"] == pair.clean_prompt and ex["corrupt_prompt"] == pair.corrupt_prompt
        assert ex["corrupted_position"] == pair.corrupted_position
        assert ex["answer_position"] == pair.answer_position
        assert (ex["clean_token_id"], ex["corrupt_token_id"]) == (pair.clean_token_id, pair.corrupt_token_id)
        scores = np.array(ex["patched_logit_diff"], dtype=float)
        assert scores.shape == (exp.geometry.n_layers, exp.geometry.n_heads, len(pair.clean_ids))
        if ex["included"]:  # raw patched logit differences exist for every position of a patched example
            assert np.isfinite(scores).all()
    assert len(data["position_labels"]) == exp.n_positions


def test_plot_saved_and_figures(saved, exp):
    fig = plotting.plot_saved(saved["json"])
    assert list(fig.data[0].y[:2]) == ["L0_H0", "L0_H1"]
    assert fig.layout.coloraxis.cmid == 0.0  # RdBu centred on 0, as the original
    labels = exp.token_labels()
    assert all(lab.rsplit("_", 1)[1] == str(i) for i, lab in enumerate(labels))
    assert plotting.plot_saved(saved["json"], what="std").data
    assert len(plotting.example_heatmaps(exp).data) == int(exp.patching.included.sum())
    assert saved["html"].read_text().count("<script") >= 1
    assert (saved["html"].parent / plotting.PLOTLY_JS).is_file()  # offline: plotly.js beside the HTML


def test_png_written_or_skipped_with_a_message(saved, capsys):
    # Kaleido 1.x needs Chrome; where it is missing the save goes on without a PNG and says why once.
    assert "png" in saved or plotting._png_unavailable


@pytest.mark.skipif(not any(shutil.which(b) for b in ("chromium", "google-chrome", "chrome")),
                    reason="no Chrome/Chromium for kaleido (.ci/run installs Debian's chromium)")
def test_png_is_a_real_image_where_chromium_exists(saved):
    assert "png" in saved, plotting._png_unavailable
    assert saved["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_top_heads_table(exp):
    table = exp.top_heads(5)
    assert list(table.columns[:3]) == ["head", "layer", "head_index"]
    assert len(table) <= 5
    if len(table) > 1:
        assert table["mean"].abs().is_monotonic_decreasing


def test_file_names_differ_by_setting():
    settings, _, spec = validate(ExperimentSettings(model_num="embedded", cs_num=1, feature_name="ENGTABLENAME",
                                                    use_synonyms_table=False, use_synonyms_field=False))
    names = {results.file_stem(settings, spec)}
    for change in ({"use_novel_names": True}, {"use_synonyms_table": True}, {"use_synonyms_field": True},
                   {"batch_size": 7}, {"seed": 3}, {"feature_name": "DEFTABLENAME"}, {"cs_num": 2},
                   {"circuit": False}, {"keep_incorrect": True}):
        other, _, other_spec = validate(dataclasses.replace(settings, **change))
        names.add(results.file_stem(other, other_spec))
    assert len(names) == 10  # (a run without the circuit section replaced one with it)
    stem = results.file_stem(settings, spec)
    assert "embedded-llama-cs1" in stem and "ENGTABLENAME" in stem and "novel_names.False" in stem


def test_atomic_write_leaves_no_temporary_and_normal_mode(tmp_path):
    path = atomic_files.atomic_write_json(tmp_path / "a.json", {"x": [1, None]})
    atomic_files.atomic_write_json(path, {"x": 2})
    assert json.loads(path.read_text()) == {"x": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    with pytest.raises(ValueError):
        atomic_files.atomic_write_json(tmp_path / "b.json", {"x": math.nan})
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_atomic_writes_never_set_the_process_umask(tmp_path, monkeypatch):
    """The file gets 0666 less the umask (here 027) without the process's umask being touched: reading it in
    Python means setting it to 0 for a moment, and another thread's file made then got no umask at all."""
    real = os.umask
    old = real(0o027)
    try:
        def forbidden(mask):
            raise AssertionError("os.umask called: process-wide, it races with other threads")
        monkeypatch.setattr(os, "umask", forbidden)
        path = atomic_files.atomic_write_json(tmp_path / "a.json", {"x": 1})
        assert stat.S_IMODE(path.stat().st_mode) == 0o640
        assert [p.name for p in tmp_path.iterdir()] == ["a.json"]
    finally:
        monkeypatch.undo()
        real(old)


def test_load_results_rejects_other_json(tmp_path):
    (tmp_path / "x.json").write_text('{"a": 1}')
    with pytest.raises(ValueError, match="not a patching result"):
        result_json.load_results(tmp_path / "x.json")


@pytest.mark.parametrize("bad, message", [({"feature_name": "TABLE"}, "Unknown feature"),
                                          ({"cs_num": 9}, "No registered model"),
                                          ({"model_num": 42}, "No registered model"),
                                          ({"batch_size": 0}, "batch_size"),
                                          ({"use_novel_names": "yes"}, "use_novel_names"),
                                          ({"device": "gpu"}, "not a device"),
                                          ({"semantic": "yes"}, "semantic"),
                                          ({"keep_incorrect": "maybe"}, "keep_incorrect"),
                                          ({"seed": "x"}, "seed")])
def test_bad_settings_fail_before_loading(bad, message):
    with pytest.raises(ValueError, match=message):
        run_experiment(**{**model_settings(), "model_path": "/nonexistent", **bad})


def test_notebook_parameters_refuse_unknown_names_and_another_feature():
    from helpers.experiments.experiment import notebook_parameters

    cell = {"model_num": "embedded", "feature_name": "DEFTABLENAME", "output_dir": None, "exp": object()}
    assert notebook_parameters(cell, "DEFTABLENAME") == {"model_num": "embedded", "feature_name": "DEFTABLENAME"}
    injected = {**cell, "cs_num": 2, "In": ["", "import x", "# Parameters\ncs_num = 2\noutput_dir = '/o'\n"]}
    assert notebook_parameters(injected, "DEFTABLENAME")["cs_num"] == 2  # papermill's own names pass
    paths = {**cell, "In": ["# Parameters\nPAPERMILL_INPUT_PATH = 'a'\nPAPERMILL_OUTPUT_PATH = 'b'\n"]}
    assert notebook_parameters(paths, "DEFTABLENAME")["feature_name"] == "DEFTABLENAME"  # papermill --inject-paths
    typo = {**cell, "cs_nmu": 2, "In": ["", "# Parameters\ncs_nmu = 2\n", "print(1)"]}
    with pytest.raises(ValueError, match="unknown notebook parameter.*'cs_nmu'"):
        notebook_parameters(typo, "DEFTABLENAME")
    with pytest.raises(ValueError, match="studies DEFTABLENAME.*notebooks/ENGTABLENAME.ipynb"):
        notebook_parameters({**cell, "feature_name": "EngTableName"}, "DEFTABLENAME")
    with pytest.raises(ValueError, match="Unknown feature"):
        notebook_parameters({**cell, "feature_name": "TABLE"}, "DEFTABLENAME")


def test_settings_given_as_strings_are_recorded_as_read():
    """``papermill -r cs_num 2`` passes "2": the command set used and recorded is the int 2."""
    settings, _, spec = validate(ExperimentSettings(model_num="embedded", cs_num="2", batch_size="3", seed="7",
                                                    keep_incorrect="False", use_novel_names="true",
                                                    use_synonyms_table="0", model_path="  "))
    assert settings.cs_num == 2 == spec.cs_num and settings.batch_size == 3 and settings.seed == 7
    assert settings.keep_incorrect is False and settings.use_novel_names is True  # bool("False") would be True
    assert settings.use_synonyms_table is False and settings.model_path is None and not spec.overridden
    hub, _, _ = validate(ExperimentSettings(model_num=1, cs_num=1, semantic="False"))
    assert hub.semantic is False


def test_plot_saved_reads_an_original_notebook_file(tmp_path):
    """A file as the original notebook wrote it (no labels, no feature) is re-drawn with pos_i columns."""
    original = {
        "metadata": {"source": "tinysql_activation_patching_json.ipynb", "timestamp": "20250204_101010",
                     "model_num": 1, "model_hf": "withmartian/sql_interp_bm1_cs1_experiment_1.10", "commandset": 1,
                     "use_novel_names": False, "use_synonyms_table": False, "use_synonyms_field": False,
                     "num_sql_fields": 2, "batch_size": 5, "n_positions": 3, "n_layers": 2, "n_heads": 2},
        "patching_results": [[[0.0, 0.5, 1.0], [0.0, -0.2, 0.1]], [[0.0, 0.0, 0.9], [0.0, 0.3, None]]],
        "clean_tokens": [1, 2, 3], "clean_logit_diff": 3.2, "corrupt_logit_diff": -1.0,
    }
    path = tmp_path / "activation_patching_results_1_1_novel_names.False.table.False.field.False.json"
    path.write_text(json.dumps(original))
    fig = plotting.plot_saved(path)
    assert list(fig.data[0].x) == ["pos_0", "pos_1", "pos_2"] and len(fig.data[0].y) == 4
    assert result_json.top_heads_from_json(result_json.load_results(path), 1)[0]["head"] == "L0_H0"


def test_columns_are_aligned_at_the_answer_position(exp, saved):
    """Examples differ in length; the mean lines them up at their last token, where the answer is read."""
    included = exp.patching.included
    last = exp.mean()[..., -1]
    role = exp.role_table(10 ** 6).set_index("head")["at_answer_position"]
    for layer in range(last.shape[0]):
        for head in range(last.shape[1]):
            a, b = float(last[layer, head]), float(role[f"L{layer}_H{head}"])
            assert (np.isnan(a) and np.isnan(b)) or abs(a - b) < 1e-5
    assert int(exp.aligned.count()[0, 0, -1]) == int((included & ~exp.patching.guarded).sum())
    data = _strict_load(saved["json"])
    for ex in data["examples"]:
        assert ex["column_offset"] + ex["n_positions"] == data["metadata"]["n_positions"]
    assert data["position_labels"][-1].endswith(f"_{exp.n_positions - 1}")


def test_titles_show_where_an_overriding_model_came_from():
    from helpers.experiments.plotting import _title

    meta = {"feature_name": "DEFTABLENAME", "model_name": "embedded-llama-cs1", "commandset": 1}
    assert "embedded-llama-cs1 CS1" in _title("Mean", meta)
    overridden = _title("Mean", {**meta, "model_path_override": "/m/gpt_neo-cs2"})
    assert "embedded-llama-cs1 (from /m/gpt_neo-cs2) CS1" in overridden


def test_overview_columns_are_layer_major_across_models_of_different_sizes():
    small = np.zeros((2, 2, 3))  # 2 layers x 2 heads
    large = np.arange(2 * 4 * 3, dtype=float).reshape(2, 4, 3)  # 2 layers x 4 heads
    fig = plotting.overview_figure([{"label": "small", "scores": small}, {"label": "large", "scores": large}])
    heads = list(fig.data[0].x)
    assert heads == [f"L{l}_H{h}" for l in range(2) for h in range(4)]
    z = np.asarray(fig.data[0].z)
    assert z[1, heads.index("L1_H2")] == large[1, 2].max() and np.isnan(z[0, heads.index("L0_H3")])


def test_a_corruption_that_does_not_flip_the_answer_is_flagged(exp):
    p = exp.patching
    flipped, n = exp.flips()
    assert n == int(p.included.sum())
    unflipped = dataclasses.replace(p, corrupt_logit_diff=p.clean_logit_diff.abs() / 2)  # still prefers clean
    weak = dataclasses.replace(exp, patching=unflipped)
    assert weak.flips() == (0, n) and "flips the model's answer in only 0 of" in weak.summary()
    data = result_json.experiment_to_dict(weak)["metadata"]
    assert (data["n_flipped"], data["n_flip_counted"]) == (0, n)
    # an example the clean run already gets backwards is not "flipped"; an infinite difference is not counted
    clean, corrupt = p.clean_logit_diff.clone(), -p.clean_logit_diff.abs()
    clean[0], corrupt[1] = -1.0, float("-inf")
    odd = dataclasses.replace(exp, patching=dataclasses.replace(p, clean_logit_diff=clean, corrupt_logit_diff=corrupt,
                                                               included=torch.ones_like(p.included)))
    assert odd.flips() == (len(clean) - 2, len(clean) - 1)
    if EMBEDDED:  # the embedded model's DEFFIELDNAME corruption flips it (a random stand-in model may not)
        assert 2 * flipped >= n and exp.flip_warning() is None and "flips" not in exp.summary()


@pytest.mark.skipif(not EMBEDDED, reason="a random stand-in model's flips are arbitrary")
def test_run_experiment_warns_when_the_corruption_does_not_flip_the_answer():
    """A novel name in the Instruction names nothing in the schema, so the embedded models keep their answer
    (ENGTABLENAME novel flips 0.00-0.05 in helpers/models/embedded/README.md): warned, with why. In the schema,
    llama-cs2 copies a novel table only with the default table synonyms (0.40 without): warned, with why. The
    default model (llama-cs1) copies them (1.00), and is not warned about."""
    import warnings

    settings = dict(model_settings())  # (a copy: model_settings is cached and shared by later tests)
    with pytest.warns(UserWarning, match=r"flips the model's answer in only \d+ of") as record:
        run_experiment(feature_name="ENGTABLENAME", use_novel_names=True, progress=False, generate=False, **settings)
    assert any("Expected with use_novel_names in the Instruction" in str(w.message) for w in record)
    if settings.get("model_num") == "embedded":
        with pytest.warns(UserWarning, match=r"flips the model's answer in only \d+ of") as record:
            run_experiment(feature_name="DEFTABLENAME", use_novel_names=True, use_synonyms_table=False, progress=False,
                           generate=False, **{**settings, "embedded_family": "llama", "cs_num": 2})
        assert any("fewer without them" in str(w.message) for w in record)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run_experiment(feature_name="DEFTABLENAME", use_novel_names=True, progress=False, generate=False,
                           **{**settings, "embedded_family": "llama", "cs_num": 1})
        assert not [w for w in caught if "flips the model's answer" in str(w.message)]
