"""One cell's run, wherever it happens (this machine, a Ray worker): its notebook, the papermill command and
process, and how its outcome becomes markers in the cell's folder (``_DONE.json``, ``_FAILED.json``,
``_INTERRUPTED.json``; helpers.experiments.sweep_cells)."""
from __future__ import annotations

import datetime as _dt
import functools
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import yaml

from helpers.experiments.atomic_files import atomic_write_json
from helpers.experiments.results import find_results
from helpers.experiments.run_guard import claim_cell, kill_tree, release_cell
from helpers.experiments.sweep_cells import (
    DONE, EXECUTED_SUFFIX, FAILED, INTERRUPTED, MARKERS, REPO, RUNNING, Cell, Outcome, SweepConfig, dir_label,
    done_is_own, is_finished, read_marker, recorded_weights,
)
from helpers.tinysql.pair_versions import PAIRS_VERSION


def notebook_error(nb_path: Path) -> str | None:
    """``ename: evalue`` of the first error output in an executed notebook."""
    try:
        nb = json.loads(nb_path.read_text())
    except (OSError, ValueError):
        return None
    for c in nb.get("cells", []):
        for out in c.get("outputs", []):
            if out.get("output_type") == "error":
                return f"{out.get('ename')}: {out.get('evalue')}"
    return None


def write_marker(cell_dir: Path, name: str, data: dict) -> None:
    """Write marker ``name`` atomically, then remove the other markers."""
    atomic_write_json(cell_dir / name, data)
    for other in MARKERS:
        if other != name:
            (cell_dir / other).unlink(missing_ok=True)


@functools.lru_cache(maxsize=1)
def _driver_commit() -> str | None:
    """The suite's commit where the sweep runs (read once: three git calls), for its markers."""
    from helpers.experiments.result_json import suite_commit

    return suite_commit()


def cell_record(cell: Cell, cell_dir: Path, config: SweepConfig | None = None) -> dict:
    """What every marker of the cell says: the cell, its settings (as given and resolved, and their hash), when,
    the suite's commit that ran the sweep (a failure's record says which code failed; the result JSON records its
    own run's) and the pair generator's version (a result of older pairs is not this cell's)."""
    return dict(cell=dir_label(config, cell_dir) if config else cell.label, params=cell.params,
                resolved=cell.resolved, params_hash=cell.params_hash,
                started_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                suite_commit=_driver_commit(), pairs_version=PAIRS_VERSION)


def record_failure(cell: Cell, cell_dir: Path, message: str, duration_s: float = 0.0,
                   config: SweepConfig | None = None, extra: dict | None = None) -> Outcome:
    cell_dir.mkdir(parents=True, exist_ok=True)
    write_marker(cell_dir, FAILED, {**cell_record(cell, cell_dir, config), **(extra or {}), "status": "failed",
                                    "error": message, "duration_s": duration_s})
    return Outcome(cell, "failed", cell_dir, duration_s, message)


def record_failure_unclaimed(cell: Cell, cell_dir: Path, message: str, duration_s: float = 0.0,
                             config: SweepConfig | None = None, extra: dict | None = None) -> Outcome:
    """``record_failure`` where this process may not hold the cell's claim (settings refused before running; a
    runner that crashed before or after claiming): the failure is written under the claim (``claim_cell``, never
    forced), so another process's live ``_RUNNING.json`` is left alone ("running elsewhere": that run goes on and
    no third one may start), and a finished result (``_DONE.json``, this cell's or another run's) is kept, not
    replaced by the failure. (``record_failure`` unlinked every other marker, a live lock included.)"""
    cell_dir.mkdir(parents=True, exist_ok=True)
    running = read_marker(cell_dir / RUNNING) or {}
    own = running.get("pid") == os.getpid() and running.get("host") == socket.gethostname()  # (a claim let go)
    if not own:
        busy = claim_cell(cell_dir, cell_record(cell, cell_dir, config))
        if busy is not None:
            return Outcome(cell, "running elsewhere", cell_dir, duration_s, f"{message} (not recorded: {busy})")
    try:
        done = read_marker(cell_dir / DONE)
        if done is not None and (is_finished(cell_dir, cell) or not done_is_own(cell_dir, done, cell)):
            (cell_dir / RUNNING).unlink(missing_ok=True)
            return Outcome(cell, "failed", cell_dir, duration_s,
                           f"{message} (not recorded: the finished result in this folder is kept)")
        return record_failure(cell, cell_dir, message, duration_s, config, extra)
    finally:
        if not own:
            release_cell(cell_dir)


def cell_notebook(config: SweepConfig, cell: Cell) -> tuple[str, Path]:
    """(feature, its notebook) of a cell; ValueError with the reason when there is none."""
    from helpers.tinysql.pairs import parse_feature

    feature = parse_feature(cell.params.get("feature_name"))  # (an unknown feature: the library's own message)
    notebook = config.notebooks / f"{feature.value}.ipynb"
    if not notebook.is_file():
        raise ValueError(f"no notebook {notebook} for feature {feature.value}")
    return feature.value, notebook


PREVIOUS_SUFFIX = ".previous-run.ipynb"  # an earlier run's executed notebook, moved aside when the cell runs again
_EARLIER_RESULTS = "_earlier_results"  # (in the run's record until it finishes; never written to a marker)


def previous_run_path(executed: Path) -> Path:
    """Where an earlier run's executed notebook is kept: ``<feature>.previous-run.ipynb``, else the first free
    ``<feature>.previous-run-<k>.ipynb`` (each rerun's, none replaced)."""
    stem = executed.name[: -len(EXECUTED_SUFFIX)]
    path = executed.with_name(stem + PREVIOUS_SUFFIX)
    k = 2
    while path.exists():
        path = executed.with_name(f"{stem}{PREVIOUS_SUFFIX[: -len('.ipynb')]}-{k}.ipynb")
        k += 1
    return path


def _result_files(cell_dir: Path) -> dict:
    """{name: [inode, mtime_ns, size]} of the result JSONs in ``cell_dir``: a file written again (atomically: a new
    inode) or anew differs from what was there before."""
    out = {}
    for p in find_results(cell_dir):
        try:
            st = p.stat()
        except OSError:
            continue
        out[p.name] = [st.st_ino, st.st_mtime_ns, st.st_size]
    return out


def begin_cell(config: SweepConfig, cell: Cell, cell_dir: Path, record: dict, t0: float,
               force: bool = False, keep_finished: bool = False) -> tuple[str, Path] | Outcome:
    """Claim the cell (helpers.experiments.run_guard; ``force``: also another machine's marker) and clear its other
    markers: (feature, notebook) to run, or the Outcome that ends it here ("running elsewhere"; "skipped" where
    ``keep_finished`` and the cell is finished, as when another sweep finished it since this one looked; "not run"
    where the folder holds another run's result, finished there since the folder was chosen; or failed for want of
    a notebook; its claim released)."""
    busy = claim_cell(cell_dir, record, force=force)
    if busy is not None:
        return Outcome(cell, "running elsewhere", cell_dir, error=busy)

    def give_back(outcome: Outcome) -> Outcome:
        (cell_dir / RUNNING).unlink(missing_ok=True)
        release_cell(cell_dir)
        return outcome

    if keep_finished and is_finished(cell_dir, cell):  # another sweep finished it since this one looked: keep it
        return give_back(Outcome(cell, "skipped", cell_dir))
    done = read_marker(cell_dir / DONE)
    if done is not None and not done_is_own(cell_dir, done, cell):  # (even with force: it is not this cell's)
        return give_back(Outcome(cell, "not run", cell_dir, error=(
            "another run finished here, with other settings or weights, after this sweep chose the folder; its "
            "result is kept: run the sweep again and this cell gets a folder of its own")))
    for other in MARKERS:
        if other != RUNNING:
            (cell_dir / other).unlink(missing_ok=True)
    # An earlier run's executed notebook is kept, aside: if this run dies before writing its own, that one must not
    # give this run's error or be linked as its notebook. The result files that are already there are noted, so
    # that only one this run writes (or rewrites) can make it done.
    for old in cell_dir.glob(f"*{EXECUTED_SUFFIX}"):
        os.replace(old, previous_run_path(old))
    record[_EARLIER_RESULTS] = _result_files(cell_dir)
    try:
        return cell_notebook(config, cell)
    except ValueError as err:
        release_cell(cell_dir)
        return record_failure(cell, cell_dir, str(err), time.perf_counter() - t0, config,
                              {k: v for k, v in record.items() if k == "executor"})


def papermill_command(notebook: Path, out_notebook: Path, params: dict, kernel: str, cell_timeout, output_dir: Path,
                      repo: Path = REPO) -> list[str]:
    params = {k: v for k, v in params.items() if k != "feature_name"}  # fixed by the notebook
    params["output_dir"] = str(Path(output_dir).resolve())
    cmd = [sys.executable, "-m", "papermill", str(notebook), str(out_notebook), "-k", kernel,
           "-y", yaml.safe_dump(params), "--cwd", str(repo), "--no-progress-bar", "--log-level", "WARNING"]
    if cell_timeout:
        cmd += ["--execution-timeout", str(int(cell_timeout))]
    return cmd


def run_papermill(cmd: list[str], log_path: Path, run_timeout, env_extra: dict | None = None, repo: Path = REPO,
                  on_start: Callable | None = None, on_end: Callable | None = None) -> tuple[int, bool]:
    """Run papermill in its own session (log to ``log_path``); (return code, timed out). ``run_timeout`` or any
    exception (KeyboardInterrupt, a Ray cancellation) stops papermill, its kernel and their children."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(repo)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.update(env_extra or {})
    timed_out = False
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=repo,
                                start_new_session=True)
        if on_start is not None:
            on_start(proc)
        try:
            proc.wait(timeout=run_timeout or None)
        except subprocess.TimeoutExpired:
            timed_out = True
            kill_tree(proc)
        except BaseException:  # KeyboardInterrupt: do not leave papermill and its kernel behind
            kill_tree(proc)
            raise
        finally:
            if on_end is not None:
                on_end(proc)
    return proc.returncode, timed_out


def finish_cell(cell: Cell, config: SweepConfig, cell_dir: Path, record: dict, t0: float, returncode: int,
                timed_out: bool, executed: Path, stopped_by: int | None = None, extra: dict | None = None) -> Outcome:
    """The outcome of a finished papermill run whose files are in ``cell_dir``: its marker, and the Outcome.
    ``stopped_by``: the signal that stopped the sweep (the cell is interrupted: neither done nor failed)."""
    duration = time.perf_counter() - t0
    earlier = record.get(_EARLIER_RESULTS) or {}
    record = {k: v for k, v in {**record, **(extra or {}), "notebook": executed.name}.items() if k != _EARLIER_RESULTS}
    if stopped_by is not None:
        write_marker(cell_dir, INTERRUPTED, {**record, "status": "interrupted", "duration_s": duration,
                                             "signal": stopped_by})
        return Outcome(cell, "interrupted", cell_dir, duration, "stopped by a signal")

    def fail(message: str) -> Outcome:
        return record_failure(cell, cell_dir, message, duration, config, extra)

    if timed_out:
        return fail(f"timed out: the run took longer than run_timeout={config.run_timeout} s and was stopped")
    if returncode != 0:
        error = notebook_error(executed) if executed.is_file() else None
        if error is None:
            tail = (cell_dir / "papermill.log").read_text(errors="replace").strip().splitlines()[-5:]
            error = " | ".join(tail) or f"papermill exited with {returncode}"
        return fail(error)
    now = _result_files(cell_dir)
    found = [p for p in find_results(cell_dir) if p.name in now and now[p.name] != earlier.get(p.name)]
    if not found:
        return fail("the notebook ran but wrote no result JSON")
    # the weights' hash, so that a later sweep finds a result of a since-retrained local model stale
    weights, scheme = recorded_weights(cell_dir, {"json": found[0].name})
    write_marker(cell_dir, DONE, {**record, "status": "ok", "json": found[0].name,
                                  "model_weights": weights if scheme == "weights" else None,
                                  "duration_s": duration,
                                  "finished_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")})
    return Outcome(cell, "ok", cell_dir, duration)


def executed_path(cell_dir: Path, feature: str) -> Path:
    return cell_dir / f"{feature}{EXECUTED_SUFFIX}"
