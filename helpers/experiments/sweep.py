"""Run a sweep: each cell's notebook through papermill in its own process (``jobs`` at once, a GPU each where
there are GPUs), markers and failures recorded, then the index (:mod:`helpers.experiments.sweep_index`). The sweep
file, its cells, their folders and markers: :mod:`helpers.experiments.sweep_cells`."""
from __future__ import annotations

import concurrent.futures as cf
import datetime as _dt
import json
import os
import queue
import subprocess
import sys
import time
from pathlib import Path

import yaml

from helpers.experiments.atomic_files import atomic_write_json
from helpers.experiments.results import find_results
from helpers.experiments.run_guard import (
    StopSignals, SweepInterrupted, claim_cell, kill_tree, note_child, release_cell,
)
from helpers.experiments.sweep_cells import (
    DONE, EXECUTED_SUFFIX, FAILED, INTERRUPTED, MARKERS, REPO, RUNNING, Cell, Outcome, SweepConfig, check_keys,
    dir_label, expand,
    folder_for, is_finished, setting_defaults,
)
from helpers.experiments.sweep_index import write_summary


def _notebook_error(nb_path: Path) -> str | None:
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


def _write_marker(cell_dir: Path, name: str, data: dict) -> None:
    """Write marker ``name`` atomically, then remove the other markers."""
    atomic_write_json(cell_dir / name, data)
    for other in MARKERS:
        if other != name:
            (cell_dir / other).unlink(missing_ok=True)


def _record(cell: Cell, cell_dir: Path, config: SweepConfig | None = None) -> dict:
    return dict(cell=dir_label(config, cell_dir) if config else cell.label, params=cell.params,
                resolved=cell.resolved, params_hash=cell.params_hash,
                started_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))


def record_failure(cell: Cell, cell_dir: Path, message: str, duration_s: float = 0.0,
                   config: SweepConfig | None = None) -> Outcome:
    cell_dir.mkdir(parents=True, exist_ok=True)
    _write_marker(cell_dir, FAILED, {**_record(cell, cell_dir, config), "status": "failed", "error": message,
                                     "duration_s": duration_s})
    return Outcome(cell, "failed", cell_dir, duration_s, message)


def run_cell(cell: Cell, config: SweepConfig, env_extra: dict | None = None, cell_dir: Path | None = None,
             guard: StopSignals | None = None) -> Outcome:
    """Execute one cell's notebook with papermill in a subprocess; record the outcome in its folder.

    ``_RUNNING.json`` is claimed first (helpers.experiments.run_guard: a cell a live process runs is not started a
    second time), then the other markers are removed, so a run killed half way never looks finished. ``guard``:
    the sweep's stop flag and children (a stopped sweep marks the cell interrupted)."""
    cell_dir = cell_dir if cell_dir is not None else folder_for(config, cell)
    cell_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    record = _record(cell, cell_dir, config)
    if guard is not None and guard.stop.is_set():
        return Outcome(cell, "not run", cell_dir)
    busy = claim_cell(cell_dir, record)
    if busy is not None:
        return Outcome(cell, "running elsewhere", cell_dir, error=busy)
    try:
        return _run_claimed(cell, config, env_extra, cell_dir, guard, record, t0)
    finally:
        release_cell(cell_dir)


def _run_claimed(cell: Cell, config: SweepConfig, env_extra: dict | None, cell_dir: Path, guard: StopSignals | None,
                 record: dict, t0: float) -> Outcome:
    """run_cell's run once ``_RUNNING.json`` is this process's."""
    for other in MARKERS:
        if other != RUNNING:
            (cell_dir / other).unlink(missing_ok=True)

    def fail(message: str) -> Outcome:
        return record_failure(cell, cell_dir, message, time.perf_counter() - t0, config)

    from helpers.tinysql.pairs import parse_feature

    try:  # an unknown feature has no notebook to run: record it with the library's own message
        feature = parse_feature(cell.params.get("feature_name"))
    except ValueError as err:
        return fail(str(err))
    notebook = config.notebooks / f"{feature.value}.ipynb"
    if not notebook.is_file():
        return fail(f"no notebook {notebook} for feature {feature.value}")

    executed = cell_dir / f"{feature.value}{EXECUTED_SUFFIX}"
    tmp = cell_dir / f".{executed.name}.tmp"
    params = {k: v for k, v in cell.params.items() if k != "feature_name"}  # fixed by the notebook
    params["output_dir"] = str(cell_dir.resolve())
    cmd = [sys.executable, "-m", "papermill", str(notebook), str(tmp), "-k", config.kernel,
           "-y", yaml.safe_dump(params), "--cwd", str(REPO), "--no-progress-bar", "--log-level", "WARNING"]
    if config.cell_timeout:
        cmd += ["--execution-timeout", str(int(config.cell_timeout))]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.update(env_extra or {})
    timed_out = False
    with open(cell_dir / "papermill.log", "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                start_new_session=True)
        if guard is not None:
            guard.add(proc)
        note_child(cell_dir, proc.pid)
        try:
            proc.wait(timeout=config.run_timeout or None)
        except subprocess.TimeoutExpired:
            timed_out = True
            kill_tree(proc)
        except BaseException:  # KeyboardInterrupt: do not leave papermill and its kernel behind
            kill_tree(proc)
            raise
        finally:
            if guard is not None:
                guard.discard(proc)
    if tmp.is_file():
        os.replace(tmp, executed)  # papermill writes the notebook even when a cell raised
    record["notebook"] = executed.name
    if guard is not None and guard.stop.is_set():  # stopped by a signal: neither done nor failed
        _write_marker(cell_dir, INTERRUPTED, {**record, "status": "interrupted", "duration_s": time.perf_counter() - t0,
                                              "signal": guard.signum})
        return Outcome(cell, "interrupted", cell_dir, time.perf_counter() - t0, "stopped by a signal")
    if timed_out:
        return fail(f"timed out: the run took longer than run_timeout={config.run_timeout} s and was stopped")
    if proc.returncode != 0:
        error = _notebook_error(executed) if executed.is_file() else None
        if error is None:
            tail = (cell_dir / "papermill.log").read_text(errors="replace").strip().splitlines()[-5:]
            error = " | ".join(tail) or f"papermill exited with {proc.returncode}"
        return fail(error)
    found = find_results(cell_dir)
    if not found:
        return fail("the notebook ran but wrote no result JSON")
    duration = time.perf_counter() - t0
    _write_marker(cell_dir, DONE, {**record, "status": "ok", "json": found[0].name, "duration_s": duration,
                                   "finished_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")})
    return Outcome(cell, "ok", cell_dir, duration)


def visible_gpus() -> list[str]:
    """GPU ids a worker may be given: CUDA_VISIBLE_DEVICES if set, else what torch counts (none on CPU)."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip() and g.strip() != "-1"]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:
        return []


def settings_error(cell: Cell) -> str | None:
    """Why ``helpers.experiments.experiment.validate`` refuses this cell's settings (an unknown feature, a model or command
    set outside the registry, a bad value), or None. Nothing is loaded; run_sweep asks it of every cell first, so
    a typo in the grid is reported at once instead of when its cell's turn comes."""
    from helpers.experiments.experiment import ExperimentSettings, validate

    fields = setting_defaults()
    try:
        validate(ExperimentSettings(**{k: v for k, v in cell.resolved.items() if k in fields}))
    except ValueError as err:
        return str(err)
    return None


def run_sweep(config: SweepConfig, jobs: int = 1, force: bool = False, progress: bool = True,
              only: str | None = None) -> list[Outcome]:
    """Run every unfinished cell (all with ``force``); ``only``: a substring of the cell label to select.

    SIGTERM, SIGHUP and SIGINT (while called from the main thread) stop every running cell's papermill and kernel,
    mark those cells interrupted, start no other, write the index and raise ``SweepInterrupted``
    (helpers.experiments.run_guard)."""
    check_keys(config)
    cells = expand(config)
    dirs = [folder_for(config, cell) for cell in cells]
    config.root.mkdir(parents=True, exist_ok=True)
    from helpers.experiments.plotting import write_plotlyjs

    write_plotlyjs(config.root)  # one offline copy; every heatmap HTML below links to it
    outcomes: dict[int, Outcome] = {}
    todo = []
    for i, cell in enumerate(cells):
        if not force and is_finished(dirs[i], cell):
            outcomes[i] = Outcome(cell, "skipped", dirs[i])
        elif only is not None and only not in cell.label and only not in dir_label(config, dirs[i]):
            outcomes[i] = Outcome(cell, "not run", dirs[i])  # still listed in the index
        else:
            todo.append(i)
    refused = {i: why for i in todo if (why := settings_error(cells[i])) is not None}
    for i, why in refused.items():  # recorded like any failed run, without starting a kernel
        outcomes[i] = record_failure(cells[i], dirs[i], f"settings refused before running: {why}", config=config)
    todo = [i for i in todo if i not in refused]

    jobs = max(1, int(jobs))
    gpus = visible_gpus() if jobs > 1 else []
    slots: queue.Queue = queue.Queue()
    for s in range(jobs):
        slots.put(s)
    threads = max(1, (os.cpu_count() or 1) // jobs)

    guard = StopSignals()

    def work(i: int) -> Outcome:
        if guard.stop.is_set():
            return Outcome(cells[i], "not run", dirs[i])
        slot = slots.get()
        try:
            extra = {}
            if gpus:
                extra["CUDA_VISIBLE_DEVICES"] = gpus[slot % len(gpus)]
            if jobs > 1 and "OMP_NUM_THREADS" not in os.environ:
                extra["OMP_NUM_THREADS"] = str(threads)
            return run_cell(cells[i], config, extra, cell_dir=dirs[i], guard=guard)
        except Exception as err:  # a crash of the runner itself is still a recorded failure of this cell
            message = f"the sweep runner crashed: {type(err).__name__}: {err}"
            try:
                return record_failure(cells[i], dirs[i], message, config=config)
            except Exception as err2:
                return Outcome(cells[i], "failed", dirs[i],
                               error=f"{message} (and _FAILED.json could not be written: {err2})")
        finally:
            slots.put(slot)

    from tqdm.auto import tqdm

    bar = tqdm(total=len(cells), desc=f"sweep {config.name}", disable=not progress, unit="cell")
    bar.update(len(outcomes))
    counts = {"ok": 0, "failed": len(refused), "skipped": sum(o.status == "skipped" for o in outcomes.values())}
    for i in refused:
        bar.write(f"FAILED {cells[i].label}: {outcomes[i].error}")
    stopped: SweepInterrupted | None = None
    pool = cf.ThreadPoolExecutor(max_workers=jobs)
    futures: dict = {}
    try:
        with guard:
            futures = {pool.submit(work, i): i for i in todo}
            for fut in cf.as_completed(futures):
                out = fut.result()
                outcomes[futures[fut]] = out
                counts[out.status] = counts.get(out.status, 0) + 1
                bar.set_postfix(counts)
                bar.update(1)
                if out.status in ("failed", "running elsewhere"):
                    bar.write(f"{out.status.upper()} {out.cell.label}: {out.error}")
    except SweepInterrupted as err:  # the handler already killed the running cells' processes
        stopped = err
        bar.write(f"{err}: running cells stopped and marked interrupted; rerun to resume")
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # (the workers see the stop flag and return at once)
    bar.close()
    for fut, i in futures.items():
        if i not in outcomes:
            done = fut.done() and not fut.cancelled() and fut.exception() is None
            outcomes[i] = fut.result() if done else Outcome(cells[i], "not run", dirs[i])
    ordered = [outcomes[i] for i in range(len(cells))]
    write_summary(config, ordered)
    if stopped is not None:
        raise stopped
    return ordered
