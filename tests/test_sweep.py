"""The sweep end to end: a 2-cell grid (one good cell, one whose model_path is bad) plus an unknown feature,
run twice: failures are recorded while the good cell succeeds, the second run skips the finished cell and
leaves its files alone, the index pages list every cell, and a planted HF_TOKEN never reaches the outputs."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from helpers import sweep as S
from test_notebooks import REPO, model_settings

FAKE_TOKEN = "hf_FAKE-planted-sweep-token-0123456789"  # not token-shaped: repo scans stay quiet


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
        config = S.load_config(path)
        first = S.run_sweep(config, jobs=2, progress=False)
        good_dir = first[0].dir
        before = {p.name: p.stat().st_mtime_ns for p in good_dir.iterdir()}
        second = S.run_sweep(config, jobs=1, progress=False)
    return dict(config=config, first=first, second=second, before=before, root=root)


def test_failures_are_recorded_and_the_good_cell_succeeds(sweep_run):
    statuses = [o.status for o in sweep_run["first"]]
    assert statuses == ["ok", "failed", "failed"], [(o.cell.label, o.status, o.error) for o in sweep_run["first"]]
    good, bad_model, bad_feature = sweep_run["first"]
    assert S.is_finished(good.dir) and (good.dir / S.DONE).is_file()
    assert list(good.dir.glob("*.heatmap.html")) and list(good.dir.glob(f"*{S.EXECUTED_SUFFIX}"))
    # The failing notebook was still written, with the traceback in it.
    executed = next(bad_model.dir.glob(f"*{S.EXECUTED_SUFFIX}"))
    errors = [o for c in json.loads(executed.read_text())["cells"] for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert errors and "ModelLoadError" in errors[0]["ename"]
    assert "no-such-model" in json.loads((bad_model.dir / S.FAILED).read_text())["error"]
    assert not S.is_finished(bad_model.dir)
    assert "Unknown feature 'NOTAFEATURE'" in bad_feature.error
    assert (bad_feature.dir / S.FAILED).is_file()
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
    assert not S.is_finished(tmp_path)
    (tmp_path / "activation_patching_x.json").write_text("{}")
    assert not S.is_finished(tmp_path)  # a result without the marker: an interrupted cell, rerun it
    (tmp_path / S.DONE).write_text("{}")
    assert S.is_finished(tmp_path)


def test_shipped_grids_expand():
    default = S.expand(S.load_config(REPO / "params" / "default.yaml"))
    assert len(default) == 24 and {c.params["model_num"] for c in default} == {"embedded"}
    assert {str(c.relpath.parts[0]) for c in default} == {"embedded-llama", "embedded-gpt_neo"}
    assert {c.feature for c in default} == {"ENGTABLENAME", "ENGFIELDNAME", "DEFTABLENAME", "DEFFIELDNAME"}
    assert str(default[0].relpath) == str(Path("embedded-llama") / "cs1" / "ENGTABLENAME")
    full = S.expand(S.load_config(REPO / "params" / "full.yaml"))
    assert {c.params["model_num"] for c in full} == {1, 2, 3}
    assert len({c.relpath for c in full}) == len(full)


def test_cli_lists_cells(capsys):
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import sweep as cli
    finally:
        sys.path.pop(0)
    assert cli.main(["--params", str(REPO / "params" / "default.yaml"), "--list"]) == 0
    assert "embedded-llama / cs3 / DEFFIELDNAME" in capsys.readouterr().out


def test_parallel_workers_get_one_gpu_each(tmp_path, monkeypatch):
    import threading

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    config = S.SweepConfig(name="gpus", grids=[{"cs_num": [1, 2], "feature_name": ["DEFTABLENAME", "ENGTABLENAME"]}],
                           output_root=tmp_path)
    barrier, lock, seen = threading.Barrier(2, timeout=20), threading.Lock(), []

    def fake_run_cell(cell, config, env_extra=None):
        with lock:
            first_two = len(seen) < 2
            seen.append(env_extra["CUDA_VISIBLE_DEVICES"])
        if first_two:
            barrier.wait()  # the first two cells run at the same time
        return S.Outcome(cell, "ok", config.root / cell.relpath)

    monkeypatch.setattr(S, "run_cell", fake_run_cell)
    S.run_sweep(config, jobs=2, progress=False)
    assert len(seen) == 4 and sorted(seen[:2]) == ["3", "5"]  # the concurrent pair: different GPUs


def test_force_reruns_finished_cells_and_only_selects(tmp_path, monkeypatch):
    config = S.SweepConfig(name="f", grids=[{"cs_num": [1, 2], "feature_name": ["DEFTABLENAME"]}], output_root=tmp_path)
    cells = S.expand(config)
    for cell in cells:  # both cells finished earlier
        d = config.root / cell.relpath
        d.mkdir(parents=True)
        (d / "activation_patching_x.json").write_text("{}")
        (d / S.DONE).write_text("{}")
    ran = []
    monkeypatch.setattr(S, "run_cell", lambda cell, config, env_extra=None: ran.append(cell.label) or
                        S.Outcome(cell, "ok", config.root / cell.relpath))
    monkeypatch.setattr(S, "write_summary", lambda config, outcomes: None)
    assert [o.status for o in S.run_sweep(config, progress=False)] == ["skipped", "skipped"] and ran == []
    S.run_sweep(config, force=True, progress=False, only="cs2")
    assert ran == [cells[1].label]
    S.run_sweep(config, force=True, progress=False)
    assert ran == [cells[1].label] + [c.label for c in cells]
