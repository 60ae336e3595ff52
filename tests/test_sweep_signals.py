"""A sweep killed by SIGTERM leaves no process behind and no cell looking done; a rerun resumes; a cell a live process
holds is never started twice (helpers.experiments.run_guard)."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest
import yaml

from helpers.experiments import sweep as S
from helpers.experiments import sweep_cells as C
from helpers.experiments.run_guard import claim_cell, marker_is_live
from test_notebooks import REPO, model_settings


def _grid(root, features=("DEFTABLENAME", "ENGTABLENAME"), notebooks=None, name="sig.yaml"):
    good = model_settings()
    spec = {"name": "sig", "output_root": str(root / "out"), "kernel": "python3", "cell_timeout": 900,
            "parameters": {**good, "circuit": False}, "grid": {"feature_name": list(features)}}
    if notebooks is not None:
        spec["notebooks"] = str(notebooks)
    path = root / name
    path.write_text(yaml.safe_dump(spec))
    return path


def _slow_notebooks(folder, features):
    """The feature notebooks with a 10-minute sleep after their parameters cell (same parameters, same cells)."""
    import nbformat

    folder.mkdir()
    for feature in features:
        nb = nbformat.read(REPO / "notebooks" / f"{feature}.ipynb", as_version=4)
        at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
        nb.cells.insert(at + 1, nbformat.v4.new_code_cell("import time\ntime.sleep(600)"))
        nbformat.write(nb, folder / f"{feature}.ipynb")
    return folder


def _wait(condition, timeout: float, what: str):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def sigterm_and_check(sweep: subprocess.Popen, children: list, exit_within: float, gone_within: float) -> None:
    """SIGTERM ``sweep``: it must exit with 128 + SIGTERM within ``exit_within`` s, and ``children`` (psutil
    processes) be gone within ``gone_within`` s more."""
    t0 = time.monotonic()
    sweep.send_signal(signal.SIGTERM)
    out, _ = sweep.communicate(timeout=2 * exit_within)
    assert sweep.returncode == 128 + signal.SIGTERM, out.decode(errors="replace")
    assert time.monotonic() - t0 < exit_within
    _wait(lambda: not [p for p in children if p.is_running() and p.status() != psutil.STATUS_ZOMBIE], gone_within,
          "the sweep's children to be gone")


def kill_leftovers(sweep: subprocess.Popen, children: list) -> None:
    """(a failed test must not leave a sleeping sweep behind)"""
    if sweep.poll() is None:
        sweep.kill()
    for p in children:
        try:
            p.kill()
        except psutil.Error:
            pass


def test_sigterm_stops_every_child_and_a_rerun_resumes(tmp_path):
    """The cells sleep 10 minutes after their parameters: only a stopped child lets the sweep exit in seconds."""
    features = ("DEFTABLENAME", "ENGTABLENAME")
    path = _grid(tmp_path, features, notebooks=_slow_notebooks(tmp_path / "slow", features))
    cmd = [sys.executable, str(REPO / "scripts" / "sweep.py"), "--params", str(path), "--no-progress"]
    sweep = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    family: list = []
    try:
        config = C.load_config(path)
        cells = C.expand(config)
        first = C.folder_for(config, cells[0])

        def kernel_running():  # papermill started and its kernel too: the cell is really running
            marker = C.read_marker(first / C.RUNNING) or {}
            pid = marker.get("child_pid")
            return pid and psutil.pid_exists(pid) and psutil.Process(pid).children(recursive=True)

        _wait(kernel_running, 120, "the first cell's kernel")
        family = psutil.Process(sweep.pid).children(recursive=True)
        assert len(family) >= 2  # papermill and its kernel
        sigterm_and_check(sweep, family, exit_within=15, gone_within=10)
    finally:
        kill_leftovers(sweep, family)
    assert (first / C.INTERRUPTED).is_file() and not (first / C.DONE).is_file()
    assert not (first / C.RUNNING).is_file() and not C.is_finished(first, cells[0])
    summary = json.loads((config.root / "summary.json").read_text())
    assert [c["status"] for c in summary["cells"]] == ["interrupted", "not run"]

    config = C.load_config(_grid(tmp_path, features, name="resume.yaml"))  # the same cells, the real notebooks
    assert [C.folder_for(config, c) for c in C.expand(config)][0] == first
    resumed = S.run_sweep(config, progress=False)
    assert [o.status for o in resumed] == ["ok", "ok"]
    assert all(C.is_finished(o.dir, o.cell) and not (o.dir / C.INTERRUPTED).is_file() for o in resumed)
    assert [o.status for o in S.run_sweep(config, progress=False)] == ["skipped", "skipped"]  # done exactly once


def test_a_cell_held_by_a_live_process_is_not_started_twice(tmp_path):
    path = _grid(tmp_path, features=("DEFTABLENAME",))
    config = C.load_config(path)
    cell = C.expand(config)[0]
    folder = C.folder_for(config, cell)
    folder.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        marker = {"params_hash": cell.params_hash, "host": socket.gethostname(), "pid": holder.pid}
        (folder / C.RUNNING).write_text(json.dumps(marker))
        [out] = S.run_sweep(config, progress=False)
        assert out.status == "running elsewhere" and str(holder.pid) in out.error
        assert not (folder / "papermill.log").exists()  # nothing was started
        assert json.loads((folder / C.RUNNING).read_text()) == marker  # and its marker left alone
        summary = json.loads((config.root / "summary.json").read_text())
        assert summary["cells"][0]["status"] == "running elsewhere"
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone: its marker is stale and taken over
    messages = []
    assert not marker_is_live(json.loads((folder / C.RUNNING).read_text()))
    assert claim_cell(folder, {"params_hash": cell.params_hash}, log=messages.append) is None
    assert messages and "is gone" in messages[0]
    claimed = json.loads((folder / C.RUNNING).read_text())
    assert claimed["pid"] == os.getpid() and claimed["host"] == socket.gethostname()
    assert claim_cell(folder, {}) is not None  # held by this live process now: a second claim is refused


def test_a_marker_of_another_host_counts_as_live_unless_forced(tmp_path):
    assert marker_is_live({"host": "some-other-machine", "pid": 1})
    assert not marker_is_live({"host": socket.gethostname(), "pid": 2 ** 22 + 12345})
    assert not marker_is_live(None)
    other = {"host": "some-other-machine", "pid": 1}
    (tmp_path / C.RUNNING).write_text(json.dumps(other))
    why = claim_cell(tmp_path, {})
    assert "some-other-machine" in why and "--force" in why
    assert claim_cell(tmp_path, {}, log=lambda m: None, force=True) is None  # a crashed node's marker: taken over
    assert json.loads((tmp_path / C.RUNNING).read_text())["host"] == socket.gethostname()
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="no SIGHUP here")
def test_stop_signals_restore_the_handlers():
    from helpers.experiments.run_guard import StopSignals, SweepInterrupted

    before = signal.getsignal(signal.SIGHUP)
    guard = StopSignals()
    with pytest.raises(SweepInterrupted):
        with guard:
            os.kill(os.getpid(), signal.SIGHUP)
            time.sleep(1)
    assert guard.stop.is_set() and guard.signum == signal.SIGHUP
    assert signal.getsignal(signal.SIGHUP) == before
