"""The sweep end to end: a 2-cell grid (one good cell, one whose model_path is bad) plus an unknown feature,
run twice: failures are recorded while the good cell succeeds, the second run skips the finished cell and
leaves its files alone, the index pages list every cell, and a planted HF_TOKEN never reaches the outputs.

Then the reviewed resume bugs, each with a test that failed before the fix, mostly against a stand-in for the
papermill subprocess (fast): changed settings are never served from (nor written over) a finished cell,
grids that differ in one value are not merged, folder names do not depend on the other cells, a ``--force``
rerun drops ``_DONE.json`` first, runner crashes and timeouts are recorded, and non-setting keys are refused."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from helpers.experiments import cell_runs
from helpers.experiments import sweep as S
from helpers.experiments import sweep_cells as C
from test_notebooks import REPO, model_settings

FAKE_TOKEN = "hf_FAKE-planted-sweep-token-0123456789"  # not token-shaped: repo scans stay quiet


@pytest.fixture(autouse=True)
def _commit_read_with_the_real_subprocess():
    """The markers' suite commit is read once a process, by git: read it before a test stands in for papermill's
    subprocess (whose stand-ins would otherwise get git's calls, in whatever order the tests run)."""
    cell_runs._driver_commit()


@pytest.fixture(scope="module")
def sweep_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    good = model_settings()
    spec = {
        "name": "t", "output_root": str(root), "kernel": "python3", "cell_timeout": 600,
        "parameters": {k: v for k, v in good.items() if k != "model_path"},
        "grid": {"feature_name": ["DEFTABLENAME"],
                 "model_path": [good.get("model_path"), str(root / "no-such-model")]},
        "cells": [{"feature_name": "NOTAFEATURE", "cs_num": 1}],
    }
    path = root / "t.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_TOKEN", FAKE_TOKEN)
        config = C.load_config(path)
        first = S.run_sweep(config, jobs=2, progress=False)
        good_dir = first[0].dir
        before = {p.name: p.stat().st_mtime_ns for p in good_dir.iterdir()}
        second = S.run_sweep(config, jobs=1, progress=False)
    return dict(config=config, first=first, second=second, before=before, root=root)


def test_failures_are_recorded_and_the_good_cell_succeeds(sweep_run):
    statuses = [o.status for o in sweep_run["first"]]
    assert statuses == ["ok", "failed", "failed"], [(o.cell.label, o.status, o.error) for o in sweep_run["first"]]
    good, bad_model, bad_feature = sweep_run["first"]
    assert C.is_finished(good.dir) and (good.dir / C.DONE).is_file()
    assert list(good.dir.glob("*.heatmap.html")) and list(good.dir.glob(f"*{C.EXECUTED_SUFFIX}"))
    # The failing notebook was still written, with the traceback in it.
    executed = next(bad_model.dir.glob(f"*{C.EXECUTED_SUFFIX}"))
    errors = [o for c in json.loads(executed.read_text())["cells"] for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert errors and "ModelLoadError" in errors[0]["ename"]
    assert "no-such-model" in json.loads((bad_model.dir / C.FAILED).read_text())["error"]
    assert not C.is_finished(bad_model.dir)
    assert "Unknown feature 'NOTAFEATURE'" in bad_feature.error
    assert (bad_feature.dir / C.FAILED).is_file()
    assert not any(p.name.endswith(".tmp") for p in sweep_run["root"].rglob("*"))


def test_rerun_skips_finished_cells_and_leaves_them_alone(sweep_run):
    assert [o.status for o in sweep_run["second"]] == ["skipped", "failed", "failed"]
    good_dir = sweep_run["second"][0].dir
    assert {p.name: p.stat().st_mtime_ns for p in good_dir.iterdir()} == sweep_run["before"]


def test_index_pages(sweep_run):
    root = sweep_run["config"].root
    md = (root / "index.md").read_text()
    page = (root / "index.html").read_text()
    summary = json.loads((root / "summary.json").read_text())
    assert [c["status"] for c in summary["cells"]] == ["done (earlier)", "failed", "failed"]
    good = summary["cells"][0]
    assert good["notebook"] and (root / good["notebook"]).is_file()
    assert good["heatmap"] and (root / good["heatmap"]).is_file()
    assert good["accuracy"] is not None
    # the circuit section ran: its smallest k and a link to each of its figures
    assert good["k80"] is not None and set(good["circuit_figures"]) == {"faithfulness", "attention", "circuit"}
    for name, path in good["circuit_figures"].items():
        assert (root / path).is_file() and f"[{name}]({path})" in md and f'href="{path}"' in page
    for row in summary["cells"]:
        assert row["cell"] in md and row["cell"] in page
    assert "NOTAFEATURE" in md and "ModelLoadError" in md
    assert (root / "overview.html").is_file() and (root / "plotly.min.js").is_file()


def test_planted_hf_token_is_written_nowhere(sweep_run):
    written = [p for p in sweep_run["root"].rglob("*") if p.is_file()]
    assert len(written) > 10
    leaks = [p for p in written if FAKE_TOKEN.encode() in p.read_bytes()]
    assert not leaks


def test_finished_needs_json_and_marker(tmp_path):
    assert not C.is_finished(tmp_path)
    (tmp_path / "activation_patching_x.json").write_text("{}")
    assert not C.is_finished(tmp_path)  # a result without the marker: an interrupted cell, rerun it
    (tmp_path / C.DONE).write_text("{}")
    assert C.is_finished(tmp_path)


def test_shipped_grids_expand():
    default = C.expand(C.load_config(REPO / "params" / "default.yaml"))
    from helpers.tinysql.pairs import FEATURES

    assert len(default) == 38 and {c.params["model_num"] for c in default} == {"embedded"}
    assert {str(c.relpath.parts[0]) for c in default} == {"embedded-llama", "embedded-gpt_neo"}
    # novel names on the default model, for the two features where it copies them, in their own folders
    novel = [c for c in default if c.params.get("use_novel_names")]
    assert {(c.params["embedded_family"], c.params["cs_num"], c.feature) for c in novel} == \
        {("llama", 1, "DEFTABLENAME"), ("llama", 1, "DEFFIELDNAME")}
    assert len({c.relpath for c in default}) == len(default)
    # every feature, on exactly the command sets that can express it
    cells = {(c.params["embedded_family"], c.params["cs_num"], c.feature) for c in default if c not in novel}
    assert cells == {(fam, cs, f.value) for fam in ("llama", "gpt_neo") for f in FEATURES
                     for cs in (1, 2, 3) if cs in f.command_sets}
    assert str(default[0].relpath) == str(Path("embedded-llama") / "cs1" / "ENGTABLENAME")
    with pytest.warns(UserWarning, match="cannot express it and are skipped"):
        full = C.expand(C.load_config(REPO / "params" / "full.yaml"))
    assert {c.params["model_num"] for c in full} == {1, 2, 3}
    assert len({c.relpath for c in full}) == len(full)
    assert all(c.resolved["cs_num"] in FEATURES[[f.value for f in FEATURES].index(c.feature)].command_sets
               for c in full)
    assert {c.feature for c in full} == {f.value for f in FEATURES}


def test_a_product_grid_skips_what_a_command_set_cannot_express_but_listed_cells_run(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("name: s\nparameters: {batch_size: 2}\ngrid:\n  model_num: [embedded]\n  cs_num: [1, 3]\n"
                    "  feature_name: [ENGTABLENAME, ENGAGGREGATEFIELD]\n"
                    "cells:\n  - {model_num: embedded, cs_num: 1, feature_name: ENGORDERBYFIELD}\n")
    with pytest.warns(UserWarning, match="1 grid combinations"):
        cells = C.expand(C.load_config(path, output_root=tmp_path / "out"))
    got = {(c.resolved["cs_num"], c.feature) for c in cells}
    # the listed cell is kept (validation records it as failed, naming the command sets), the grid's is skipped
    assert got == {(1, "ENGTABLENAME"), (3, "ENGTABLENAME"), (3, "ENGAGGREGATEFIELD"), (1, "ENGORDERBYFIELD")}


def test_cli_lists_cells(capsys):
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import sweep as cli
    finally:
        sys.path.pop(0)
    assert cli.main(["--params", str(REPO / "params" / "default.yaml"), "--list"]) == 0
    assert "embedded-llama / cs3 / DEFFIELDNAME" in capsys.readouterr().out


def test_cli_exits_1_for_a_cell_not_run_for_a_reason_and_lists_only_its_own_failures(tmp_path, monkeypatch, capsys):
    """A cell "not run" because another run's result took its folder meanwhile is not done: exit 1, with the reason
    printed (it exited 0); one left out by ``--only`` (no reason) is not. ``--list`` calls a folder "failed" only
    for a ``_FAILED.json`` of the cell's own settings."""
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import sweep as cli
    finally:
        sys.path.pop(0)
    config, cell, d = _refused_cell(tmp_path)
    params = tmp_path / "r.yaml"
    params.write_text(yaml.safe_dump({"name": "r", "output_root": str(tmp_path),
                                      "grid": {"model_num": ["embedded"], "cs_num": [7],
                                               "feature_name": ["DEFTABLENAME"]}}))
    why = "another run finished here, with other settings or weights, after this sweep chose the folder"
    for outcome, code in ((C.Outcome(cell, "not run", d, error=why), 1), (C.Outcome(cell, "not run", d), 0)):
        monkeypatch.setattr(cli, "run_sweep", lambda *a, _o=outcome, **k: [_o])
        assert cli.main(["--params", str(params)]) == code
        assert (why in capsys.readouterr().out) == bool(code)
    monkeypatch.undo()
    (d / C.FAILED).write_text(json.dumps({"params_hash": "of-other-settings", "status": "failed"}))
    assert cli.main(["--params", str(params), "--list"]) == 0
    assert capsys.readouterr().out.strip().endswith("[to run]")
    (d / C.FAILED).write_text(json.dumps({"params_hash": cell.params_hash, "status": "failed"}))
    cli.main(["--params", str(params), "--list"])
    assert capsys.readouterr().out.strip().endswith("[failed]")


def test_parallel_workers_get_one_gpu_each(tmp_path, monkeypatch):
    import threading

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    config = C.SweepConfig(name="gpus", grids=[{"cs_num": [1, 2], "feature_name": ["DEFTABLENAME", "ENGTABLENAME"]}],
                           output_root=tmp_path)
    barrier, lock, seen = threading.Barrier(2, timeout=20), threading.Lock(), []

    def fake_run_cell(cell, config, env_extra=None, cell_dir=None, guard=None, **how):
        with lock:
            first_two = len(seen) < 2
            seen.append(env_extra["CUDA_VISIBLE_DEVICES"])
        if first_two:
            barrier.wait()  # the first two cells run at the same time
        return C.Outcome(cell, "ok", config.root / cell.relpath)

    monkeypatch.setattr(S, "run_cell", fake_run_cell)
    S.run_sweep(config, jobs=2, progress=False)
    assert len(seen) == 4 and sorted(seen[:2]) == ["3", "5"]  # the concurrent pair: different GPUs


def _finish(config, cell, d=None, **marker):
    """Leave ``cell`` finished as run_cell would: a result JSON and a ``_DONE.json`` for its settings."""
    d = d or config.root / cell.relpath
    d.mkdir(parents=True, exist_ok=True)
    (d / "activation_patching_x.json").write_text("{}")
    (d / C.DONE).write_text(json.dumps({"params_hash": cell.params_hash, **marker}))
    return d


def test_force_reruns_finished_cells_and_only_selects(tmp_path, monkeypatch):
    config = C.SweepConfig(name="f", grids=[{"cs_num": [1, 2], "feature_name": ["DEFTABLENAME"]}], output_root=tmp_path)
    cells = C.expand(config)
    for cell in cells:  # both cells finished earlier
        _finish(config, cell)
    ran = []
    monkeypatch.setattr(S, "run_cell", lambda cell, config, env_extra=None, cell_dir=None, guard=None, **how: ran.append(cell.label) or
                        C.Outcome(cell, "ok", cell_dir))
    monkeypatch.setattr(S, "write_summary", lambda config, outcomes: None)
    assert [o.status for o in S.run_sweep(config, progress=False)] == ["skipped", "skipped"] and ran == []
    S.run_sweep(config, force=True, progress=False, only="cs2")
    assert ran == [cells[1].label]
    S.run_sweep(config, force=True, progress=False)
    assert ran == [cells[1].label] + [c.label for c in cells]


# ------------------------------------------------------------------ the reviewed bugs (each failed before)


class FakePapermill:
    """Stands in for the papermill subprocess (``subprocess.Popen``): writes the executed notebook and a result
    JSON holding the parameters it got, and notes what the cell's folder looked like while it "ran"."""

    runs: list = []

    def __init__(self, cmd, stdout=None, stderr=None, env=None, cwd=None, start_new_session=False, **kw):
        params = yaml.safe_load(cmd[cmd.index("-y") + 1])
        out = Path(params["output_dir"])
        self.args, self.pid, self.returncode = cmd, None, 0
        FakePapermill.runs.append(dict(params=params, dir=out, markers=sorted(p.name for p in out.glob("_*.json"))))
        Path(cmd[4]).write_text(json.dumps({"cells": [], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))
        (out / f"activation_patching_b{params.get('batch_size')}.json").write_text(json.dumps(params))

    def wait(self, timeout=None):
        return self.returncode

    # What subprocess.run needs of it as well.
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def communicate(self, input=None, timeout=None):
        return None, None

    def poll(self):
        return self.returncode


@pytest.fixture
def fake_papermill(monkeypatch):
    FakePapermill.runs = []
    monkeypatch.setattr(cell_runs.subprocess, "Popen", FakePapermill)
    monkeypatch.setattr(S, "write_summary", lambda config, outcomes: None)
    return FakePapermill


def _one_cell(tmp_path, **parameters):
    return C.SweepConfig(name="b", grids=[{"model_num": ["embedded"], "cs_num": [1], "feature_name": ["DEFTABLENAME"]}],
                         parameters=parameters, output_root=tmp_path)


def _snapshot(d: Path) -> dict:
    return {p.name: p.read_bytes() for p in d.iterdir()}


def test_changed_parameters_are_not_served_from_a_finished_cell(tmp_path, fake_papermill):
    """Bug 1: batch_size 4 -> 64 under ``parameters:`` used to skip the cell finished with 4."""
    first = S.run_sweep(_one_cell(tmp_path, batch_size=4), progress=False)[0]
    assert first.status == "ok" and first.dir == tmp_path / "b" / "embedded-llama" / "cs1" / "DEFTABLENAME"
    kept = _snapshot(first.dir)
    second = S.run_sweep(_one_cell(tmp_path, batch_size=64), progress=False)[0]
    assert second.status == "ok", "a cell finished with other settings was served as finished"
    done = json.loads((first.dir / C.DONE).read_text())
    assert done["params_hash"] == first.cell.params_hash and done["resolved"]["batch_size"] == 4
    assert second.dir != first.dir and second.dir.name.startswith("DEFTABLENAME" + C.ALT_PREFIX)
    assert FakePapermill.runs[-1]["params"]["batch_size"] == 64
    assert _snapshot(first.dir) == kept  # the batch_size=4 result survives untouched
    # Both are resumable: each settings' run is found again and skipped.
    assert S.run_sweep(_one_cell(tmp_path, batch_size=64), progress=False)[0].status == "skipped"
    again = S.run_sweep(_one_cell(tmp_path, batch_size=4), progress=False)[0]
    assert again.status == "skipped" and again.dir == first.dir and len(FakePapermill.runs) == 2


def test_marker_without_hash_is_compared_by_its_params(tmp_path, fake_papermill):
    """A ``_DONE.json`` written before the hash (params only, as in outputs/default) still resumes when its
    settings match, and is not taken for a run of other settings."""
    config = _one_cell(tmp_path, batch_size=4, seed=0)
    cell = C.expand(config)[0]
    d = config.root / cell.relpath
    d.mkdir(parents=True)
    (d / "activation_patching_x.json").write_text("{}")
    (d / C.DONE).write_text(json.dumps({"params": dict(cell.params), "status": "ok"}))
    assert S.run_sweep(config, progress=False)[0].status == "skipped"
    changed = _one_cell(tmp_path, batch_size=64, seed=7)
    assert not C.is_finished(d, C.expand(changed)[0])
    out = S.run_sweep(changed, progress=False)[0]
    assert out.status == "ok" and out.dir != d and (d / "activation_patching_x.json").read_text() == "{}"
    # A marker that records no settings at all proves nothing: not finished for any cell.
    (d / C.DONE).write_text("{}")
    assert C.is_finished(d) and not C.is_finished(d, cell)


def test_grids_differing_in_a_single_value_are_all_run(tmp_path):
    """Bug 2: two grids that differ only by ``seed: [0]`` / ``seed: [1]`` used to collapse into one cell."""
    base = {"model_num": ["embedded"], "cs_num": [1], "feature_name": ["DEFTABLENAME"]}
    config = C.SweepConfig(name="t", grids=[{**base, "seed": [0]}, {**base, "seed": [1]}], output_root=tmp_path)
    cells = C.expand(config)
    assert [c.params["seed"] for c in cells] == [0, 1]
    assert [str(c.relpath) for c in cells] == [str(Path("embedded-llama", "cs1", "DEFTABLENAME")),
                                               str(Path("embedded-llama", "cs1", "DEFTABLENAME_seed=1"))]
    batch = C.SweepConfig(name="t", grids=[{**base, "batch_size": [4]}, {**base, "batch_size": [8]}],
                          output_root=tmp_path)
    assert len({c.relpath for c in C.expand(batch)}) == 2


def test_exact_duplicates_run_once_with_a_warning(tmp_path):
    base = {"model_num": ["embedded"], "cs_num": [1], "feature_name": ["DEFTABLENAME"]}
    config = C.SweepConfig(name="t", grids=[base], output_root=tmp_path,
                           cells=[{"cs_num": 1, "feature_name": "DefTableName", "seed": 0}])  # seed 0: the default
    with pytest.warns(UserWarning, match="more than once"):
        cells = C.expand(config)
    assert len(cells) == 1


def test_settings_spelt_differently_are_one_cell_and_name_the_model_they_load(tmp_path):
    """Values validation reads alike ("1" and 1, "false" and False, "Embedded") are one cell: run once, with the
    folder and hash of the plain spelling, and ``semantic: "false"`` files under the non-semantic model it loads
    (it was filed as ``bm1``, the semantic one, and ran a second time beside ``bm1-nonsem``); values already
    plain keep the hash they had (finished cells stay finished)."""
    base = {"model_num": ["embedded"], "cs_num": [1], "feature_name": ["DEFTABLENAME"]}
    config = C.SweepConfig(name="t", grids=[base], output_root=tmp_path, cells=[
        {"model_num": "Embedded", "cs_num": "1", "feature_name": "DEFTABLENAME", "batch_size": "5"},
        {"model_num": 1, "cs_num": 1, "feature_name": "DEFTABLENAME", "semantic": False},
        {"model_num": "1", "cs_num": 1, "feature_name": "DEFTABLENAME", "semantic": "false"},
        {"model_num": 1, "cs_num": 1, "feature_name": "DEFTABLENAME", "semantic": "0", "circuit": "True"}])
    with pytest.warns(UserWarning, match="more than once"):
        cells = C.expand(config)
    assert [c.label for c in cells] == ["embedded-llama / cs1 / DEFTABLENAME", "bm1-nonsem / cs1 / DEFTABLENAME"]
    plain = cells[0]
    assert plain.params_hash == C.params_hash({**plain.defaults, **plain.params})  # (no spelling to resolve)
    assert C.resolve({"semantic": "maybe", "cs_num": "x1"}, {}) == {"semantic": "maybe", "cs_num": "x1"}
    odd = {"model_num": "²", "cs_num": "--1", "seed": "²"}  # (str.isdigit() is True for "²": int() is not)
    assert C.resolve(odd, {}) == odd
    assert C.resolve({"novel_words": " Held_Out"}, {}) == {"novel_words": "held_out"}
    # a cell finished before spellings were resolved (its marker's hash of cs_num "1") is still finished
    d = tmp_path / "done"
    d.mkdir()
    (d / "activation_patching_b5.json").write_text("{}")
    old = {**cell_runs.cell_record(plain, d), "status": "ok", "params_hash": "written-before-spellings",
           "resolved": {**plain.resolved, "cs_num": "1", "batch_size": "5"}}
    (d / C.DONE).write_text(json.dumps(old))
    assert C.is_finished(d, plain)
    (d / C.DONE).write_text(json.dumps({**old, "resolved": {**old["resolved"], "seed": 2}}))  # other settings
    assert not C.is_finished(d, plain)


def test_folder_names_do_not_depend_on_other_cells():
    """Bug 3: one ``cells:`` entry with a seed used to rename every grid folder (``..._seed=0``)."""
    config = C.load_config(REPO / "params" / "default.yaml")
    before = [c.relpath for c in C.expand(config)]
    config.cells = [dict(model_num="embedded", cs_num=1, feature_name="DEFTABLENAME", seed=1)]
    after = [c.relpath for c in C.expand(config)]
    assert after[:-1] == before
    assert after[-1] == Path("embedded-llama", "cs1", "DEFTABLENAME_seed=1")
    # A grid over a setting: the value of ``parameters`` keeps the plain name, the others get a suffix.
    config.cells = []
    config.grids = [{"cs_num": [1], "feature_name": ["DEFTABLENAME"], "dtype": ["float32", "bfloat16"]}]
    assert [c.relpath.name for c in C.expand(config)] == ["DEFTABLENAME", "DEFTABLENAME_dtype=bfloat16"]


def test_force_rerun_removes_the_done_marker_first(tmp_path, fake_papermill, monkeypatch):
    """Bug 4: a ``--force`` rerun left ``_DONE.json`` in place, so a rerun killed half way looked finished."""
    config = _one_cell(tmp_path, batch_size=4)
    first = S.run_sweep(config, progress=False)[0]
    S.run_sweep(config, force=True, progress=False)
    assert "_DONE.json" not in FakePapermill.runs[-1]["markers"]  # gone while the rerun runs
    assert FakePapermill.runs[-1]["markers"] == [C.RUNNING]
    assert sorted(p.name for p in first.dir.glob("_*.json")) == [C.DONE]

    class Kill(BaseException):  # a signal that stops the sweep half way (as KeyboardInterrupt would)
        pass

    class Killed(FakePapermill):
        def wait(self, timeout=None):
            raise Kill

    monkeypatch.setattr(cell_runs.subprocess, "Popen", Killed)
    monkeypatch.setattr(cell_runs, "kill_tree", lambda proc: None)
    with pytest.raises(Kill):
        S.run_cell(first.cell, config, cell_dir=first.dir)
    assert not C.is_finished(first.dir, first.cell) and (first.dir / C.RUNNING).is_file()
    assert not any(p.name.endswith(".tmp") for p in first.dir.iterdir() if p.name.startswith("_"))
    monkeypatch.setattr(cell_runs.subprocess, "Popen", FakePapermill)
    assert S.run_sweep(config, progress=False)[0].status == "ok"  # so the next sweep runs it again
    assert not (first.dir / C.RUNNING).exists()


def test_runner_crash_is_recorded(tmp_path, fake_papermill, monkeypatch):
    """Bug 5: an exception in the runner itself (here: papermill cannot start) wrote no marker."""
    def broken(*args, **kwargs):
        raise OSError("cannot start papermill")

    monkeypatch.setattr(cell_runs.subprocess, "Popen", broken)
    out = S.run_sweep(_one_cell(tmp_path), progress=False)[0]
    assert out.status == "failed" and "cannot start papermill" in out.error
    failed = json.loads((out.dir / C.FAILED).read_text())
    assert "cannot start papermill" in failed["error"] and failed["params_hash"] == out.cell.params_hash

    assert sorted(p.name for p in out.dir.glob("_*.json")) == [C.FAILED]


def _notebook(path: Path, code: str) -> None:
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    params = nbformat.v4.new_code_cell('model_num, cs_num, feature_name = "embedded", 1, "DEFTABLENAME"\n'
                                       'batch_size, seed = 5, 0\noutput_dir = None')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(code)]
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)


def test_run_timeout_stops_the_run_and_records_a_failure(tmp_path):
    """Bug 5: a hung run is stopped after ``run_timeout`` seconds and recorded as failed (a real papermill
    run of a notebook that sleeps)."""
    _notebook(tmp_path / "nb" / "DEFTABLENAME.ipynb", "import time\ntime.sleep(120)")
    config = C.SweepConfig(name="slow", grids=[{"cs_num": [1], "feature_name": ["DEFTABLENAME"]}],
                           output_root=tmp_path, notebooks=tmp_path / "nb", run_timeout=6)
    t0 = __import__("time").monotonic()
    out = S.run_sweep(config, progress=False)[0]
    assert __import__("time").monotonic() - t0 < 60
    assert out.status == "failed" and "timed out" in out.error
    assert "timed out" in json.loads((out.dir / C.FAILED).read_text())["error"]
    assert not (out.dir / C.RUNNING).exists() and not C.is_finished(out.dir, out.cell)


def test_notebook_defaults_come_from_the_parameters_cell(tmp_path):
    _notebook(tmp_path / "DEFTABLENAME.ipynb", "pass")
    d = C.notebook_defaults(tmp_path, "DefTableName")
    assert d["batch_size"] == 5 and d["feature_name"] == "DEFTABLENAME" and "output_dir" not in d
    assert set(d) == set(C.setting_defaults())


@pytest.mark.parametrize("block", ["parameters", "grid", "cells"])
@pytest.mark.parametrize("key", ["hf_token", "output_dir", "batchsize"])
def test_config_refuses_keys_that_are_not_settings(tmp_path, block, key):
    """Bug 6: any key under ``parameters:`` (a token, say) was passed to every notebook and the summary."""
    spec = {"name": "t", "grid": {"cs_num": [1], "feature_name": ["DEFTABLENAME"]}}
    if block == "parameters":
        spec["parameters"] = {key: "hf_not-a-real-token"}
    elif block == "grid":
        spec["grid"][key] = ["hf_not-a-real-token"]
    else:
        spec["cells"] = [{"feature_name": "DEFTABLENAME", key: "hf_not-a-real-token"}]
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(ValueError, match=rf"{key}.*HF_TOKEN"):
        C.load_config(path)


def test_cells_with_refused_settings_fail_before_any_run(tmp_path, fake_papermill):
    """A typo in the grid (a command set the embedded models lack, a misspelt feature) is recorded at once,
    without starting a kernel for it; the valid cells still run."""
    config = C.SweepConfig(name="b", grids=[{"model_num": ["embedded"], "cs_num": [1, 7],
                                             "feature_name": ["DEFTABLENAME", "DEFTABLE"]}], output_root=tmp_path)
    outcomes = S.run_sweep(config, progress=False)
    by_label = {(o.cell.params["cs_num"], o.cell.params["feature_name"]): o for o in outcomes}
    assert by_label[(1, "DEFTABLENAME")].status == "ok"
    for key in [(1, "DEFTABLE"), (7, "DEFTABLENAME"), (7, "DEFTABLE")]:
        out = by_label[key]
        assert out.status == "failed" and out.error.startswith("settings refused before running")
        assert json.loads((out.dir / C.FAILED).read_text())["error"] == out.error
    assert "Unknown feature" in by_label[(1, "DEFTABLE")].error
    assert "No registered model" in by_label[(7, "DEFTABLENAME")].error
    assert [run["params"]["cs_num"] for run in FakePapermill.runs] == [1]  # only the valid cell started


def test_word_set_settings_are_canonical_and_old_finished_cells_still_count(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("name: s\ngrid:\n  model_num: [embedded]\n  cs_num: [1]\n  feature_name: [DEFTABLENAME]\n"
                    "  vocabulary: [null, suite, Suite, upstream, Upstream]\n")
    with pytest.warns(UserWarning, match="more than once"):
        cells = C.expand(C.load_config(path, output_root=tmp_path / "out"))
    assert [c.resolved["vocabulary"] for c in cells] == [None, "upstream"]  # the embedded model's own is None
    assert [str(c.relpath) for c in cells] == [str(Path("embedded-llama") / "cs1" / "DEFTABLENAME"),
                                               str(Path("embedded-llama") / "cs1" / "DEFTABLENAME_vocabulary=upstream")]
    plain = cells[0]
    # a marker written before word sets existed (its settings had no vocabulary) is this cell's
    before = {k: v for k, v in plain.resolved.items() if k not in ("vocabulary", "novel_words")}
    assert C.params_hash(before) == plain.params_hash != cells[1].params_hash


def test_a_hub_cell_is_not_served_a_result_made_with_the_suites_words_before_word_sets(tmp_path):
    """Review finding: a hub model's unset word set means upstream's words now and meant the suite's words before
    word sets existed, under the same hash; a marker from then (its settings lack vocabulary) is not this cell's.
    (An embedded model's old markers still count: the suite's words are its own.)"""
    path = tmp_path / "s.yaml"
    path.write_text("name: s\ngrid:\n  model_num: [1]\n  cs_num: [1]\n  feature_name: [DEFTABLENAME]\n"
                    "  vocabulary: [null]\n")
    upstream, = C.expand(C.load_config(path, output_root=tmp_path / "out"))
    old_resolved = {k: v for k, v in upstream.resolved.items() if k not in ("vocabulary", "novel_words")}
    old = {"params_hash": C.params_hash(old_resolved), "resolved": old_resolved}
    assert old["params_hash"] == upstream.params_hash  # the hash alone cannot tell them apart
    assert not C.marker_matches(old, upstream)
    new = {"params_hash": upstream.params_hash, "resolved": upstream.resolved}  # written since: has vocabulary
    assert C.marker_matches(new, upstream)
    embedded = C.expand(C.load_config(_write(tmp_path / "e.yaml", "name: e\ngrid:\n  cs_num: [1]\n"
                                                                   "  feature_name: [DEFTABLENAME]\n"),
                                      output_root=tmp_path / "out"))[0]
    before = {k: v for k, v in embedded.resolved.items() if k not in ("vocabulary", "novel_words")}
    assert C.marker_matches({"params_hash": C.params_hash(before), "resolved": before}, embedded)  # suite's words


def _write(path, text):
    path.write_text(text)
    return path


# ------------------------------------------------------------------ second review (each failed before)


def test_a_cell_another_sweep_finished_meanwhile_is_not_run_again(tmp_path, fake_papermill):
    """Cells are picked at the sweep's start; one that another sweep finishes before its turn comes is skipped
    when it is claimed (its result and _DONE.json kept), not run again, unless forced."""
    config = _one_cell(tmp_path)
    cell = C.expand(config)[0]
    d = C.folder_for(config, cell)
    S.run_sweep(config, progress=False)  # "the other sweep"
    kept = _snapshot(d)
    record = cell_runs.cell_record(cell, d, config)
    out = cell_runs.begin_cell(config, cell, d, record, 0.0, keep_finished=True)  # as a sweep without --force
    assert isinstance(out, C.Outcome) and out.status == "skipped"
    assert _snapshot(d) == kept and not (d / C.RUNNING).exists()  # nothing touched, the claim given back
    begun = cell_runs.begin_cell(config, cell, d, record, 0.0, force=True)  # --force, or run_cell called directly
    assert begun[0] == "DEFTABLENAME" and not (d / C.DONE).exists()
    cell_runs.release_cell(d)


def test_a_run_that_dies_early_reports_its_own_error_not_the_last_runs(tmp_path, monkeypatch):
    """An earlier run's executed notebook (its traceback) is moved aside when the cell runs again, so a run that
    dies before writing its own gets its own error (papermill's log) and no stale notebook; an earlier result JSON
    does not make a run that wrote none done."""
    class DiesEarly:
        def __init__(self, cmd, stdout=None, **kw):
            stdout.write(b"NoSuchKernel: No such kernel named python4\n")
            stdout.flush()
            self.pid, self.returncode = None, 1

        def wait(self, timeout=None):
            return self.returncode

    monkeypatch.setattr(cell_runs.subprocess, "Popen", DiesEarly)
    monkeypatch.setattr(S, "write_summary", lambda config, outcomes: None)
    config = _one_cell(tmp_path)
    cell = C.expand(config)[0]
    d = C.folder_for(config, cell)
    d.mkdir(parents=True)
    stale = {"cells": [{"cell_type": "code", "outputs": [{"output_type": "error", "ename": "ModelLoadError",
                                                         "evalue": "model folder '/old/path' does not exist"}]}]}
    (d / f"DEFTABLENAME{C.EXECUTED_SUFFIX}").write_text(json.dumps(stale))
    [out] = S.run_sweep(config, progress=False)
    assert out.status == "failed" and "No such kernel" in out.error and "ModelLoadError" not in out.error
    assert not list(d.glob(f"*{C.EXECUTED_SUFFIX}"))
    assert json.loads((d / f"DEFTABLENAME{cell_runs.PREVIOUS_SUFFIX}").read_text()) == stale  # kept, aside
    # a run that exits 0 but writes no result: an earlier run's JSON does not make it done
    (d / "activation_patching_old.json").write_text("{}")
    DiesEarly.__init__ = lambda self, cmd, stdout=None, **kw: setattr(self, "returncode", 0) or setattr(self, "pid", None)
    [out] = S.run_sweep(config, progress=False)
    assert out.status == "failed" and "wrote no result JSON" in out.error


def test_force_only_keeps_the_other_finished_cells_done_in_the_index(tmp_path, fake_papermill):
    config = C.SweepConfig(name="f", grids=[{"cs_num": [1, 2], "feature_name": ["DEFTABLENAME"]}], output_root=tmp_path)
    S.run_sweep(config, progress=False)
    outcomes = S.run_sweep(config, force=True, progress=False, only="cs2")
    assert [o.status for o in outcomes] == ["skipped", "ok"]  # cs1: still done, listed as done (earlier)


def test_ray_cells_on_cuda_are_not_checked_against_the_drivers_gpus():
    """A Ray cluster's head node often has no GPU: a cell's CUDA device is the worker's. Its spelling is still
    checked."""
    cell = C.Cell({"device": "cuda", "feature_name": "DEFTABLENAME"}, C.setting_defaults(), {})
    if not __import__("torch").cuda.is_available():
        assert "no CUDA GPU" in S.settings_error(cell)
    assert S.settings_error(cell, remote=True) is None
    typo = C.Cell({"device": "cdua", "feature_name": "DEFTABLENAME"}, C.setting_defaults(), {})
    assert "not a device" in S.settings_error(typo, remote=True)


def test_force_reaches_the_ray_executor(tmp_path, monkeypatch):
    """--force --executor ray takes over a crashed machine's _RUNNING.json, as the local executor does."""
    from helpers.experiments import ray_executor as R

    submitted = []

    class FakeRay:
        def cluster_resources(self):
            return {"CPU": 4}

        def remote(self, **kw):
            class Task:
                def options(self, **o):
                    return self

                def remote(self, payload):
                    submitted.append(payload["params"])
                    raise RuntimeError("stop here: submitted")
            return lambda f: Task()

    monkeypatch.setattr(R, "_connect", lambda address, settings: (FakeRay(), False))
    monkeypatch.setattr(S, "write_summary", lambda config, outcomes: None)
    config = _one_cell(tmp_path)
    cell = C.expand(config)[0]
    d = C.folder_for(config, cell)
    d.mkdir(parents=True)
    crashed = json.dumps({"params_hash": cell.params_hash, "host": "old-head-node", "pid": 1234})
    (d / C.RUNNING).write_text(crashed)
    [out] = S.run_sweep(config, progress=False, executor="ray")
    assert out.status == "running elsewhere" and not submitted
    [out] = S.run_sweep(config, force=True, progress=False, executor="ray")
    assert len(submitted) == 1 and "submitted" in out.error  # taken over and submitted


def test_a_marker_whose_pid_now_belongs_to_another_process_is_stale(tmp_path, monkeypatch):
    """A pid is reused after a reboot or in a new container: the marker's recorded start time tells them apart."""
    import os

    from helpers.experiments.run_guard import marker_is_live, process_started

    me = {"host": __import__("socket").gethostname(), "pid": os.getppid()}
    assert marker_is_live(me)  # (an old marker without start times: the pid alone)
    started = process_started(os.getppid())
    assert marker_is_live({**me, "pid_started": started})
    if isinstance(started, str):  # Linux: boot id and start ticks, exact
        boot, ticks = started.rsplit(":", 1)
        assert not marker_is_live({**me, "pid_started": f"{boot}:{int(ticks) + 1}"})
        assert not marker_is_live({**me, "pid_started": f"another-boot:{ticks}"})
        # a clock step does not make a live process look like another (psutil's epoch times add a boot time read
        # from the clock: here moved to 0)
        monkeypatch.setattr("psutil._pslinux.boot_time", lambda: 0.0)
        assert marker_is_live({**me, "pid_started": started})
    else:
        assert not marker_is_live({**me, "pid_started": started - 3600})
    # markers of the earlier format (epoch seconds) are still read
    import psutil

    assert marker_is_live({**me, "pid_started": psutil.Process(os.getppid()).create_time()})
    assert not marker_is_live({**me, "pid_started": psutil.Process(os.getppid()).create_time() - 3600})


class RecordingWeights(FakePapermill):
    """Also writes the weights' hash into the result's metadata, as the notebook does."""

    def __init__(self, cmd, **kw):
        from helpers.experiments.result_json import weights_fingerprint

        super().__init__(cmd, **kw)
        params = yaml.safe_load(cmd[cmd.index("-y") + 1])
        (Path(params["output_dir"]) / "activation_patching_r.json").write_text(
            json.dumps({"metadata": {"model_weights": weights_fingerprint(params["model_path"])}}))


def _local_model(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"weights v1")
    (model / "training_meta.json").write_text('{"note": "v1"}')
    return model


def test_a_result_of_weights_since_retrained_is_not_served(tmp_path, fake_papermill, monkeypatch):
    """A local model folder (the embedded models, a local model_path) retrained after a run: the settings are the
    same, the result is not; the cell runs again, beside the older result, which stays. Notes alone (the model
    card, training_meta.json) are no retraining."""
    from helpers.experiments.result_json import weights_fingerprint

    model = _local_model(tmp_path)
    monkeypatch.setattr(cell_runs.subprocess, "Popen", RecordingWeights)
    config = _one_cell(tmp_path, model_path=str(model))
    first = S.run_sweep(config, progress=False)[0]
    assert first.status == "ok"
    assert json.loads((first.dir / C.DONE).read_text())["model_weights"] == weights_fingerprint(str(model))
    (model / "training_meta.json").write_text('{"note": "v1, notes edited"}')  # as commit a18e990 did
    assert S.run_sweep(config, progress=False)[0].status == "skipped"
    kept = _snapshot(first.dir)
    (model / "model.safetensors").write_bytes(b"weights v2, retrained")
    second = S.run_sweep(config, progress=False)[0]
    assert second.status == "ok" and second.dir.name.startswith(first.dir.name + C.ALT_PREFIX)
    assert _snapshot(first.dir) == kept  # the older weights' result survives
    again = S.run_sweep(config, progress=False)[0]
    assert again.status == "skipped" and again.dir == second.dir
    # A marker from before the hash was copied into it: the result JSON's metadata says which weights ran.
    for d in (first.dir, second.dir):
        done = json.loads((d / C.DONE).read_text())
        del done["model_weights"]
        (d / C.DONE).write_text(json.dumps(done))
    again = S.run_sweep(config, progress=False)[0]
    assert again.status == "skipped" and again.dir == second.dir


def test_results_of_the_earlier_whole_folder_hash_are_compared_in_that_scheme(tmp_path, fake_papermill):
    """Result JSONs written before ``model_weights`` record ``model_revision``, a hash of every file of the folder:
    a result of other weights is not served; one of the same folder is."""
    from helpers.experiments.result_json import folder_fingerprint

    model = _local_model(tmp_path)
    config = _one_cell(tmp_path, model_path=str(model))
    cell = C.expand(config)[0]
    d = config.root / cell.relpath
    d.mkdir(parents=True)
    (d / "activation_patching_old.json").write_text(
        json.dumps({"metadata": {"model_revision": folder_fingerprint(str(model))}}))
    (d / C.DONE).write_text(json.dumps({"params_hash": cell.params_hash, "resolved": cell.resolved,
                                        "json": "activation_patching_old.json"}))
    assert C.is_finished(d, cell) and C.folder_for(config, cell) == d
    (model / "model.safetensors").write_bytes(b"weights v2, retrained")
    assert not C.is_finished(d, cell) and C.folder_for(config, cell) != d


def test_a_claim_never_removes_another_runs_result(tmp_path, fake_papermill):
    """Sweep A listed a cell while its folder was empty; sweep B, with other settings, finished in that folder
    before A claimed it: A leaves B's result alone (with or without --force) and the cell is left for A's next run,
    which gives it a folder of its own."""
    a_cfg, b_cfg = _one_cell(tmp_path, batch_size=4), _one_cell(tmp_path, batch_size=64)
    a_cell, = C.expand(a_cfg)
    a_dir = C.folder_for(a_cfg, a_cell)  # A's listing: the natural folder, empty then
    b_out = S.run_sweep(b_cfg, progress=False)[0]
    assert b_out.status == "ok" and b_out.dir == a_dir
    kept = _snapshot(a_dir)
    record = cell_runs.cell_record(a_cell, a_dir, a_cfg)
    for how in (dict(keep_finished=True), dict(force=True)):
        out = cell_runs.begin_cell(a_cfg, a_cell, a_dir, record, 0.0, **how)
        assert isinstance(out, C.Outcome) and out.status == "not run" and "run the sweep again" in out.error
        assert _snapshot(a_dir) == kept and not (a_dir / C.RUNNING).exists()
    again = S.run_sweep(a_cfg, progress=False)[0]
    assert again.status == "ok" and again.dir != a_dir and _snapshot(a_dir) == kept


def test_folder_for_never_picks_a_folder_holding_another_runs_result(tmp_path):
    """A hub cell (upstream's words now) whose own folder holds other settings' result and whose <folder>_run-<hash>
    holds a result from before word sets (suite words, the same hash): a numbered folder, not either of those."""
    path = tmp_path / "s.yaml"
    path.write_text("name: s\ngrid:\n  model_num: [1]\n  cs_num: [1]\n  feature_name: [DEFTABLENAME]\n")
    config = C.load_config(path, output_root=tmp_path / "out")
    cell, = C.expand(config)
    natural = config.root / cell.relpath
    natural.mkdir(parents=True)
    (natural / "activation_patching_x.json").write_text("{}")
    (natural / C.DONE).write_text(json.dumps({"params_hash": "0" * 16, "resolved": {**cell.resolved, "batch_size": 64},
                                              "json": "activation_patching_x.json"}))
    alt = natural.with_name(natural.name + C.ALT_PREFIX + cell.params_hash[:10])
    alt.mkdir()
    legacy = {k: v for k, v in cell.resolved.items() if k not in ("vocabulary", "novel_words")}
    (alt / "activation_patching_old.json").write_text("{}")
    (alt / C.DONE).write_text(json.dumps({"params_hash": C.params_hash(legacy), "resolved": legacy,
                                          "json": "activation_patching_old.json"}))
    d = C.folder_for(config, cell)
    assert d not in (natural, alt) and d.name == alt.name + "-2" and not d.exists()
    old = {"params": dict(cell.params)}  # the oldest markers (before the settings hash) predate word sets too
    assert not C.marker_matches(old, cell)


def test_the_remote_device_check_refuses_devices_no_worker_has():
    for device, ok in (("meta", False), ("mps", False), ("cuda:7", True), ("cuda", True), ("auto", True)):
        cell = C.Cell({"device": device, "feature_name": "DEFTABLENAME"}, C.setting_defaults(), {})
        assert (S.settings_error(cell, remote=True) is None) == ok, device


def test_each_earlier_runs_notebook_is_kept(tmp_path, monkeypatch):
    """Three runs of a cell that keeps failing early: every earlier run's notebook (its traceback) is kept."""
    monkeypatch.setattr(S, "write_summary", lambda config, outcomes: None)
    config = _one_cell(tmp_path)
    cell, = C.expand(config)
    d = C.folder_for(config, cell)
    n = {"i": 0}

    class Fails:
        def __init__(self, cmd, stdout=None, **kw):
            n["i"] += 1
            Path(cmd[4]).write_text(json.dumps({"cells": [{"outputs": [
                {"output_type": "error", "ename": "E", "evalue": f"run {n['i']}"}]}]}))
            self.pid, self.returncode = None, 1

        def wait(self, timeout=None):
            return 1

    monkeypatch.setattr(cell_runs.subprocess, "Popen", Fails)
    for _ in range(3):
        assert S.run_sweep(config, progress=False)[0].status == "failed"
    texts = sorted(p.read_text() for p in d.glob("*.ipynb"))
    assert len(texts) == 3 and all(any(f"run {i}" in t for t in texts) for i in (1, 2, 3))


def test_an_unreadable_result_json_does_not_cost_the_index(tmp_path, fake_papermill):
    """The index is written for every cell even where one result JSON cannot be read (here: not a result)."""
    from helpers.experiments import sweep_index

    config = C.SweepConfig(name="u", grids=[{"model_num": ["embedded"], "cs_num": [1, 2],
                                             "feature_name": ["DEFTABLENAME"]}], output_root=tmp_path)
    outcomes = S.run_sweep(config, progress=False)
    (outcomes[1].dir / "activation_patching_bNone.json").write_text("{truncated")
    paths = sweep_index.write_summary(config, outcomes)
    md = paths["md"].read_text()
    assert md.count("result JSON unreadable") == 2 and "cs1" in md and "cs2" in md
    summary = json.loads((config.root / "summary.json").read_text())
    assert len(summary["cells"]) == 2
    # one that parses but holds the wrong types
    (outcomes[0].dir / "activation_patching_bNone.json").write_text(json.dumps(
        {"metadata": None, "patching_results": [[[0.1]]], "clean_logit_diff": 1, "corrupt_logit_diff": 0}))
    assert sweep_index.write_summary(config, outcomes)["md"].read_text().count("result JSON unreadable") == 2


def _markers(d: Path) -> dict:
    """A folder's files but the claim's flock file (which a claim creates empty and leaves)."""
    return {name: data for name, data in _snapshot(d).items() if name != ".claim.lock"}


def _refused_cell(tmp_path):
    """A one-cell grid whose settings are refused before running (command set 7: no embedded model has it)."""
    config = C.SweepConfig(name="r", grids=[{"model_num": ["embedded"], "cs_num": [7], "feature_name": ["DEFTABLENAME"]}],
                           output_root=tmp_path)
    cell = C.expand(config)[0]
    d = C.folder_for(config, cell)
    d.mkdir(parents=True)
    return config, cell, d


def test_a_refused_cell_leaves_another_sweeps_live_claim_alone(tmp_path):
    """Refused settings are recorded under the cell's claim: a cell another live process runs (here a sleeping
    child holds its ``_RUNNING.json``) keeps that claim ("running elsewhere", nothing written), so no third run can
    start it. (The failure record used to unlink every other marker, the live lock included.)"""
    import socket
    import subprocess

    from helpers.experiments.run_guard import claim_cell, process_started

    config, cell, d = _refused_cell(tmp_path)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        lock = {**cell_runs.cell_record(cell, d, config), "status": "running", "host": socket.gethostname(),
                "pid": other.pid, "pid_started": process_started(other.pid)}
        (d / C.RUNNING).write_text(json.dumps(lock))
        before = _markers(d)
        out = S.run_sweep(config, progress=False)[0]
        assert out.dir == d and out.status == "running elsewhere"
        assert "settings refused before running" in out.error and "already running" in out.error
        assert _markers(d) == before  # the lock as it was, no _FAILED.json
        assert claim_cell(d, {"cell": "a third run"}) is not None
    finally:
        other.kill()
        other.wait()


def test_a_refused_cell_keeps_a_finished_result_under_force(tmp_path, fake_papermill):
    """``--force`` on a finished cell whose settings are now refused (on this machine, say) fails the cell without
    replacing its result's ``_DONE.json`` by a ``_FAILED.json``; where nothing was finished the failure is recorded
    as before, and the claim taken for it is given back."""
    config, cell, d = _refused_cell(tmp_path)
    (d / C.DONE).write_text(json.dumps({**cell_runs.cell_record(cell, d, config), "status": "done"}))
    (d / "activation_patching_b5.json").write_text("{}")
    before = _markers(d)
    out = S.run_sweep(config, force=True, progress=False)[0]
    assert out.dir == d and out.status == "failed" and "finished result in this folder is kept" in out.error
    assert _markers(d) == before
    (d / "activation_patching_b5.json").unlink()  # a _DONE.json whose result is gone: nothing finished to keep
    out = S.run_sweep(config, force=True, progress=False)[0]
    assert out.status == "failed" and sorted(p.name for p in d.glob("_*.json")) == [C.FAILED]
    assert json.loads((d / C.FAILED).read_text())["error"] == out.error
    assert not fake_papermill.runs


def test_every_marker_names_the_suites_commit_that_ran_the_sweep(tmp_path):
    """A marker (here a refused cell's ``_FAILED.json``) records the suite's commit, read once a process: a
    failure's record says which code failed."""
    from helpers.experiments.result_json import suite_commit

    cell_runs._driver_commit.cache_clear()  # (a test that broke subprocess may have cached None)
    config, cell, d = _refused_cell(tmp_path)
    out = S.run_sweep(config, progress=False)[0]
    failed = json.loads((d / C.FAILED).read_text())
    assert out.status == "failed" and failed["suite_commit"] == suite_commit()
    assert failed["suite_commit"]  # (this checkout is a git one)


def test_a_runner_crash_before_its_claim_leaves_another_sweeps_live_claim_alone(tmp_path, monkeypatch):
    """The runner crashing anywhere (here before it claims the cell) records the failure under the claim: a cell
    another live process runs keeps its lock ("running elsewhere")."""
    import socket
    import subprocess

    from helpers.experiments.run_guard import process_started

    config = _one_cell(tmp_path)
    cell = C.expand(config)[0]
    d = C.folder_for(config, cell)
    d.mkdir(parents=True)

    def crash(*args, **kwargs):
        raise RuntimeError("the runner broke before claiming")

    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        (d / C.RUNNING).write_text(json.dumps({**cell_runs.cell_record(cell, d, config), "status": "running",
                                               "host": socket.gethostname(), "pid": other.pid,
                                               "pid_started": process_started(other.pid)}))
        before = _markers(d)
        monkeypatch.setattr(S, "run_cell", crash)
        out = S.run_sweep(config, progress=False)[0]
        assert out.status == "running elsewhere" and "the runner broke before claiming" in out.error
        assert _markers(d) == before
    finally:
        other.kill()
        other.wait()


def test_a_result_of_pairs_the_generator_has_changed_since_is_not_served(tmp_path):
    """A cell finished with an older pair generator (its marker's ``pairs_version``) counts as finished only where
    the generator draws the same pairs for its settings today: ENGTABLENAME's CS2/CS3 pairs (the distractor holds the
    sorted fields since version 2) run again, in a folder of their own; DEFTABLENAME's do not."""
    from helpers.tinysql.pair_versions import PAIRS_VERSION, pairs_changed_since

    config = C.SweepConfig(name="v", grids=[{"model_num": ["embedded"], "cs_num": [1, 2],
                                             "feature_name": ["ENGTABLENAME", "DEFTABLENAME"]}], output_root=tmp_path)
    stale = {}
    for cell in C.expand(config):
        d = tmp_path / cell.relpath
        d.mkdir(parents=True)
        (d / "activation_patching_b5.json").write_text("{}")
        record = {**cell_runs.cell_record(cell, d, config), "status": "ok"}
        assert record["pairs_version"] == PAIRS_VERSION
        (d / C.DONE).write_text(json.dumps(record))
        assert C.is_finished(d, cell)
        (d / C.DONE).write_text(json.dumps({k: v for k, v in record.items() if k != "pairs_version"}))
        stale[cell.label] = not C.is_finished(d, cell)
        if stale[cell.label]:
            assert C.folder_for(config, cell) != d  # (the older result stays where it is)
    assert stale == {"embedded-llama / cs1 / ENGTABLENAME": False, "embedded-llama / cs2 / ENGTABLENAME": True,
                     "embedded-llama / cs1 / DEFTABLENAME": False, "embedded-llama / cs2 / DEFTABLENAME": False}
    field = dict(feature_name="ENGFIELDNAME", cs_num=1, use_novel_names=False, use_synonyms_field=None)
    upstream, suite = {**field, "vocabulary": "upstream"}, {**field, "vocabulary": "suite"}
    assert pairs_changed_since(1, upstream) and not pairs_changed_since(1, suite)
    assert pairs_changed_since(1, {**field, "model_num": 1})  # (a hub model's own words: upstream's)
    assert not pairs_changed_since(1, {**upstream, "use_novel_names": True})
    assert pairs_changed_since(None, {**suite, "novel_words": "held_out"})
    assert not pairs_changed_since(2, upstream) and not pairs_changed_since(1, {"cs_num": "x"})
    assert not pairs_changed_since(1, {**upstream, "vocabulary": "klingon"})  # (validation reports it)
