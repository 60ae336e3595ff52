"""Run a sweep: each cell's notebook through papermill in its own process (``jobs`` at once, a GPU each where
there are GPUs), markers and failures recorded, then the index (:mod:`helpers.experiments.sweep_index`). The sweep
file, its cells, their folders and markers: :mod:`helpers.experiments.sweep_cells`."""
from __future__ import annotations

import concurrent.futures as cf
import datetime as _dt
import json
import os
import queue
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from helpers.experiments.atomic_files import atomic_write_json
from helpers.experiments.results import find_results
from helpers.experiments.sweep_cells import (
    DONE, EXECUTED_SUFFIX, FAILED, MARKERS, REPO, RUNNING, Cell, Outcome, SweepConfig, check_keys, dir_label, expand,
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


def _kill_tree(proc: subprocess.Popen) -> None:
    """Stop papermill, its kernel (own session) and their children."""
    procs = []
    try:
        import psutil

        procs = psutil.Process(proc.pid).children(recursive=True)
    except Exception:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (OSError, AttributeError):
        proc.kill()
    for p in procs:
        try:
            p.kill()
        except Exception:
            pass
    proc.wait()


def run_cell(cell: Cell, config: SweepConfig, env_extra: dict | None = None, cell_dir: Path | None = None) -> Outcome:
    """Execute one cell's notebook with papermill in a subprocess; record the outcome in its folder.

    ``_DONE.json`` / ``_FAILED.json`` are removed and ``_RUNNING.json`` written before anything runs, so a run
    killed half way never looks finished."""
    cell_dir = cell_dir if cell_dir is not None else folder_for(config, cell)
    cell_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    record = _record(cell, cell_dir, config)
    _write_marker(cell_dir, RUNNING, {**record, "status": "running", "pid": os.getpid()})

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
        try:
            proc.wait(timeout=config.run_timeout or None)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_tree(proc)
        except BaseException:  # KeyboardInterrupt: do not leave papermill and its kernel behind
            _kill_tree(proc)
            raise
    if tmp.is_file():
        os.replace(tmp, executed)  # papermill writes the notebook even when a cell raised
    record["notebook"] = executed.name
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
    """Run every unfinished cell (all with ``force``); ``only``: a substring of the cell label to select."""
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

    def work(i: int) -> Outcome:
        slot = slots.get()
        try:
            extra = {}
            if gpus:
                extra["CUDA_VISIBLE_DEVICES"] = gpus[slot % len(gpus)]
            if jobs > 1 and "OMP_NUM_THREADS" not in os.environ:
                extra["OMP_NUM_THREADS"] = str(threads)
            return run_cell(cells[i], config, extra, cell_dir=dirs[i])
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
    with cf.ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {pool.submit(work, i): i for i in todo}
        for fut in cf.as_completed(futures):
            out = fut.result()
            outcomes[futures[fut]] = out
            counts[out.status] += 1
            bar.set_postfix(counts)
            bar.update(1)
            if out.status == "failed":
                bar.write(f"FAILED {out.cell.label}: {out.error}")
    bar.close()
    ordered = [outcomes[i] for i in range(len(cells))]
    write_summary(config, ordered)
    return ordered
