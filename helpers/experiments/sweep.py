"""Run a sweep: each cell's notebook through papermill in its own process (``jobs`` at once, a GPU each where
there are GPUs; or as Ray tasks, helpers.experiments.ray_executor), markers and failures recorded, then the index
(:mod:`helpers.experiments.sweep_index`). The sweep file, its cells, their folders and markers:
:mod:`helpers.experiments.sweep_cells`; one cell's run: :mod:`helpers.experiments.cell_runs`."""
from __future__ import annotations

import concurrent.futures as cf
import os
import queue
import re
import socket
import time
from pathlib import Path

from helpers.experiments.cell_runs import (
    begin_cell, cell_record, executed_path, finish_cell, papermill_command, record_failure_unclaimed,
    run_papermill,
)
from helpers.experiments.ray_executor import run_on_ray
from helpers.experiments.run_guard import StopSignals, SweepInterrupted, note_child, release_cell
from helpers.experiments.sweep_cells import (
    Cell, Outcome, SweepConfig, check_keys, dir_label, expand, folder_for, is_finished,
    setting_defaults,
)
from helpers.experiments.sweep_index import write_summary


def run_cell(cell: Cell, config: SweepConfig, env_extra: dict | None = None, cell_dir: Path | None = None,
             guard: StopSignals | None = None, takeover: bool = False, keep_finished: bool = False) -> Outcome:
    """Execute one cell's notebook with papermill in a subprocess; record the outcome in its folder.

    ``_RUNNING.json`` is claimed first (helpers.experiments.run_guard: a cell a live process runs is not started a
    second time), then the other markers are removed, so a run killed half way never looks finished. ``guard``:
    the sweep's stop flag and children (a stopped sweep marks the cell interrupted). ``takeover``: also take over
    another machine's ``_RUNNING.json`` (``force``). ``keep_finished``: a cell found finished once claimed (another
    sweep finished it meanwhile) is "skipped", not run again (a sweep without ``force``)."""
    cell_dir = cell_dir if cell_dir is not None else folder_for(config, cell)
    cell_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    record = cell_record(cell, cell_dir, config)
    if guard is not None and guard.stop.is_set():
        return Outcome(cell, "not run", cell_dir)
    begun = begin_cell(config, cell, cell_dir, record, t0, force=takeover, keep_finished=keep_finished)
    if isinstance(begun, Outcome):
        return begun
    feature, notebook = begun
    try:
        executed = executed_path(cell_dir, feature)
        tmp = cell_dir / f".{executed.name}.tmp"
        cmd = papermill_command(notebook, tmp, cell.params, config.kernel, config.cell_timeout, cell_dir)

        def started(proc):
            if guard is not None:
                guard.add(proc)
            note_child(cell_dir, proc.pid)

        returncode, timed_out = run_papermill(cmd, cell_dir / "papermill.log", config.run_timeout, env_extra,
                                              on_start=started, on_end=guard.discard if guard is not None else None)
        if tmp.is_file():
            os.replace(tmp, executed)  # papermill writes the notebook even when a cell raised
        stopped = guard.signum if guard is not None and guard.stop.is_set() else None
        gpus = (env_extra or {}).get("CUDA_VISIBLE_DEVICES", os.environ.get("CUDA_VISIBLE_DEVICES"))
        where = {"executor": "local", "host": socket.gethostname(), "gpus": gpus.split(",") if gpus else []}
        return finish_cell(cell, config, cell_dir, record, t0, returncode, timed_out, executed, stopped, where)
    finally:
        release_cell(cell_dir)


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


def _is_device_name(device) -> bool:
    """A device a Ray worker may have, whether or not this machine has it: "auto", "cpu", "cuda", "cuda:N" (a
    spelling check only; the worker validates it again)."""
    return device is None or re.fullmatch(r"auto|cpu|cuda(:\d+)?", str(device).strip().lower()) is not None


def settings_error(cell: Cell, remote: bool = False) -> str | None:
    """Why ``helpers.experiments.experiment.validate`` refuses this cell's settings (an unknown feature, a model or command
    set outside the registry, a bad value), or None. Nothing is loaded; run_sweep asks it of every cell first, so
    a typo in the grid is reported at once instead of when its cell's turn comes. ``remote``: the cell runs on
    another machine (a Ray worker), so a CUDA device is not checked against this machine's GPUs."""
    from helpers.experiments.experiment import ExperimentSettings, validate

    fields = setting_defaults()
    values = {k: v for k, v in cell.resolved.items() if k in fields}
    if remote:  # (the worker's GPUs, not this machine's: only the spelling is checked here)
        if not _is_device_name(values.get("device")):
            return (f"device={values.get('device')!r} is not a device a Ray worker runs: use 'auto', 'cpu', 'cuda' or "
                    "'cuda:N'")
        values["device"] = "cpu"
    try:
        validate(ExperimentSettings(**values))
    except ValueError as err:
        return str(err)
    return None


def run_sweep(config: SweepConfig, jobs: int | None = None, force: bool = False, progress: bool = True,
              only: str | None = None, executor: str = "local", address: str | None = None) -> list[Outcome]:
    """Run every unfinished cell (all with ``force``); ``only``: a substring of the cell label to select.

    ``executor``: ``"local"`` (``jobs`` papermill processes on this machine, one GPU each where there are several)
    or ``"ray"`` (each cell a Ray task, helpers.experiments.ray_executor; ``address``: a cluster's, else
    ``RAY_ADDRESS``, else a local Ray; ``jobs`` caps the tasks at once, None: what the cluster holds).

    SIGTERM, SIGHUP and SIGINT (while called from the main thread) stop every running cell's papermill and kernel,
    mark those cells interrupted, start no other, write the index and raise ``SweepInterrupted``
    (helpers.experiments.run_guard)."""
    if executor not in ("local", "ray"):
        raise ValueError(f"unknown executor {executor!r}: choose 'local' or 'ray'")
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
            # still listed in the index (as done where finished: --force --only reruns the selected cells only)
            outcomes[i] = Outcome(cell, "skipped" if is_finished(dirs[i], cell) else "not run", dirs[i])
        else:
            todo.append(i)
    refused = {i: why for i in todo if (why := settings_error(cells[i], remote=executor == "ray")) is not None}
    for i, why in refused.items():  # recorded like a failed run (under its claim), without starting a kernel
        outcomes[i] = record_failure_unclaimed(cells[i], dirs[i], f"settings refused before running: {why}",
                                               config=config)
    todo = [i for i in todo if i not in refused]

    ray_jobs = None if jobs is None else max(1, int(jobs))
    jobs = 1 if jobs is None else max(1, int(jobs))
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
            return run_cell(cells[i], config, extra, cell_dir=dirs[i], guard=guard, takeover=force,
                            keep_finished=not force)
        except Exception as err:  # a crash of the runner itself is still a recorded failure of this cell
            message = f"the sweep runner crashed: {type(err).__name__}: {err}"
            try:
                return record_failure_unclaimed(cells[i], dirs[i], message, config=config)
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
    def report(i: int, out: Outcome) -> None:
        outcomes[i] = out
        counts[out.status] = counts.get(out.status, 0) + 1
        bar.set_postfix(counts)
        bar.update(1)
        if out.status in ("failed", "running elsewhere"):
            bar.write(f"{out.status.upper()} {out.cell.label}: {out.error}")

    stopped: SweepInterrupted | None = None
    pool = cf.ThreadPoolExecutor(max_workers=jobs if executor == "local" else 1)
    futures: dict = {}
    with guard:  # (held until the index is written: a later signal only sets the flag and stops children)
        try:
            if executor == "ray":
                run_on_ray(config, [(i, cells[i], dirs[i]) for i in todo], guard, report, address=address,
                           max_in_flight=ray_jobs, force=force)
            else:
                futures = {pool.submit(work, i): i for i in todo}
                for fut in cf.as_completed(futures):
                    report(futures[fut], fut.result())
        except SweepInterrupted as err:  # the handler already killed the running cells' processes
            stopped = err
            bar.write(f"{err}: running cells stopped and marked interrupted; rerun to resume")
        finally:
            guard.raise_in_handler = False
            pool.shutdown(wait=True, cancel_futures=True)  # (the workers see the stop flag and return at once)
        bar.close()
        for fut, i in futures.items():
            if i not in outcomes and fut.done() and not fut.cancelled() and fut.exception() is None:
                outcomes[i] = fut.result()
        for i in todo:  # (not started before a stop)
            outcomes.setdefault(i, Outcome(cells[i], "not run", dirs[i]))
        ordered = [outcomes[i] for i in range(len(cells))]
        write_summary(config, ordered)
    if stopped is None and guard.stop.is_set():  # a signal after the last cell: still a stopped sweep
        stopped = SweepInterrupted(guard.signum)
    if stopped is not None:
        raise stopped
    return ordered
