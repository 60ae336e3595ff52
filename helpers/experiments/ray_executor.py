"""Sweeps on Ray: each cell a Ray task, on a laptop (a local Ray started for the sweep) or a cluster (``ray start`` /
``RAY_ADDRESS`` / ``--address``; SLURM, Kubernetes and cloud clusters are Ray's business, not ours).

- A cell's task asks for ``gpus_per_cell`` GPUs (YAML ``ray:``; default 1, a fraction packs small models onto one
  GPU) where its device is CUDA (``device: cuda``, or ``auto`` on a cluster that has GPUs), else ``cpus_per_cell``
  CPUs; Ray sets ``CUDA_VISIBLE_DEVICES``. No retries: a failed or lost task (its worker died, its node gone) is a
  failed cell with Ray's reason, and a rerun retries what is not done.
- No shared filesystem is assumed: the driver sends the notebook, the worker runs papermill in a temporary folder
  and returns every file it wrote (executed notebook, JSON, figures, log); the driver writes them into the cell's
  folder atomically and sets the markers, as the local executor does (helpers.experiments.cell_runs), with the
  node, host and GPUs that ran the cell.
- On a cluster, ``working_dir: true`` (the default with ``--address``) ships the repository to the workers (Ray's
  runtime environment, outputs and virtual environments left out); a local Ray's workers import it from here.
- SIGTERM, SIGHUP or SIGINT (helpers.experiments.run_guard) cancel the running tasks (a cancelled task stops its
  papermill and kernel), mark their cells interrupted and shut the sweep's own local Ray down.
"""
from __future__ import annotations

import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Callable

from helpers.experiments.atomic_files import atomic_write_bytes
from helpers.experiments.cell_runs import (
    begin_cell, cell_record, executed_path, finish_cell, papermill_command, record_failure,
    record_failure_unclaimed, run_papermill,
)
from helpers.experiments.plotting import PLOTLY_JS, plotlyjs_src
from helpers.experiments.run_guard import StopSignals, SweepInterrupted, release_cell
from helpers.experiments.sweep_cells import RAY_SETTINGS, REPO, Cell, Outcome, SweepConfig

_EXCLUDES = ["outputs/", ".git/", ".venv/", "*.egg-info/", "**/.ipynb_checkpoints/", "**/__pycache__/"]


def cell_resources(cell: Cell, settings: dict, cluster_gpus: float) -> dict:
    """The Ray task options of a cell: GPUs where its device is CUDA (or ``auto`` on a cluster with GPUs)."""
    device = str(cell.resolved.get("device", "auto")).lower()
    cpus = float(settings.get("cpus_per_cell", RAY_SETTINGS["cpus_per_cell"]))
    if device.startswith("cuda") or (device == "auto" and cluster_gpus > 0):
        return {"num_gpus": float(settings.get("gpus_per_cell", RAY_SETTINGS["gpus_per_cell"])), "num_cpus": cpus}
    return {"num_gpus": 0, "num_cpus": cpus}


def execute_on_worker(payload: dict) -> dict:
    """A Ray task: run one cell's notebook in a temporary folder; return its files and where it ran."""
    import ray

    repo = Path(payload["repo"])
    if not (repo / "helpers").is_dir():  # the repository shipped as the runtime environment's working_dir
        repo = Path.cwd()
    threads = str(max(1, int(payload["cpus"])))
    with tempfile.TemporaryDirectory(prefix="tinysql-cell-") as tmp:
        tmp = Path(tmp)
        notebook = tmp / payload["notebook_name"]
        notebook.write_bytes(payload["notebook"])
        out = tmp / "out"
        out.mkdir()
        cmd = papermill_command(notebook, out / payload["executed_name"], payload["params"], payload["kernel"],
                                payload["cell_timeout"], out, repo)
        # (a cancelled task gets KeyboardInterrupt here: run_papermill stops papermill and its kernel first)
        returncode, timed_out = run_papermill(cmd, out / "papermill.log", payload["run_timeout"],
                                              {"OMP_NUM_THREADS": threads}, repo)
        files = {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    context = ray.get_runtime_context()
    return {"returncode": returncode, "timed_out": timed_out, "files": files, "node": context.get_node_id(),
            "host": socket.gethostname(), "gpus": [str(g) for g in ray.get_gpu_ids()]}


def _connect(address: str | None, settings: dict):
    """ray.init for the sweep (unless the caller has one): (ray, whether this call started it)."""
    import ray

    if ray.is_initialized():
        return ray, False
    address = address or os.environ.get("RAY_ADDRESS")
    ship = settings.get("working_dir")
    ship = bool(address) if ship is None else bool(ship)
    runtime_env = ({"working_dir": str(REPO), "excludes": _EXCLUDES} if ship
                   else {"env_vars": {"PYTHONPATH": str(REPO)}})
    ray.init(address=address, runtime_env=runtime_env, log_to_driver=False, include_dashboard=False,
             configure_logging=False)
    return ray, True


def run_on_ray(config: SweepConfig, items: list[tuple[int, Cell, Path]], guard: StopSignals,
               on_outcome: Callable[[int, Outcome], None], address: str | None = None,
               max_in_flight: int | None = None, force: bool = False) -> None:
    """Run ``items`` ((index, cell, folder)) as Ray tasks, at most ``max_in_flight`` at once (default: what the
    cluster can run at once); ``on_outcome(index, Outcome)`` as each ends. Raises SweepInterrupted after cancelling
    the running tasks when a signal stops the sweep. ``force``: as the local executor's (rerun finished cells, take
    over another machine's ``_RUNNING.json``)."""
    guard.raise_in_handler = False  # (the loop below polls the stop flag; an exception inside Ray's calls breaks them)
    ray, started = None, False
    pending, running = list(items), {}
    try:
        ray, started = _connect(address, config.ray)
        guard.reinstall()  # (ray.init installs its own SIGTERM handler)
        cluster = ray.cluster_resources()
        remote = ray.remote(max_retries=0)(execute_on_worker)
        if max_in_flight is None:
            per_cell = cell_resources(items[0][1], config.ray, cluster.get("GPU", 0)) if items else {"num_cpus": 1}
            gpu, cpu = per_cell.get("num_gpus", 0), per_cell.get("num_cpus", 1)
            max_in_flight = int(cluster.get("GPU", 0) // gpu if gpu else cluster.get("CPU", 1) // max(cpu, 1e-9))
        max_in_flight = max(1, max_in_flight)
        while pending or running:
            while pending and len(running) < max_in_flight and not guard.stop.is_set():
                i, cell, cell_dir = pending.pop(0)
                try:
                    submitted = _submit(config, cell, cell_dir, remote, cluster, on_outcome, i, force)
                except Exception as err:  # (a cell's own trouble is its failure, not the sweep's)
                    release_cell(cell_dir)
                    # (it may have failed before its claim: another run's live lock and a finished result stay)
                    on_outcome(i, record_failure_unclaimed(cell, cell_dir, f"could not submit to Ray: "
                                                           f"{type(err).__name__}: {err}", 0.0, config,
                                                           {"executor": "ray"}))
                    continue
                if submitted is not None:
                    running[submitted[0]] = (i, cell, cell_dir) + submitted[1:]
            if running:
                ready, _ = ray.wait(list(running), num_returns=1, timeout=0.5)
                for ref in ready:  # (finished results are kept, also when a stop comes now)
                    i, cell, cell_dir, record, t0, feature = running.pop(ref)
                    try:
                        on_outcome(i, _collect(ray, ref, config, cell, cell_dir, record, t0, feature))
                    except Exception as err:
                        on_outcome(i, record_failure(cell, cell_dir, f"could not collect its files: "
                                                                     f"{type(err).__name__}: {err}",
                                                     time.perf_counter() - t0, config, {"executor": "ray"}))
                    finally:
                        release_cell(cell_dir)
            if guard.stop.is_set():
                raise SweepInterrupted(guard.signum)
            if not running and not pending:
                break
    except SweepInterrupted:
        if ray is not None:
            _cancel(ray, running, config, guard, on_outcome)
        raise
    finally:
        if started:
            ray.shutdown()


def _submit(config, cell, cell_dir, remote, cluster, on_outcome, i, force: bool = False):
    """Claim a cell and submit its task: (ref, record, t0, feature), or None (its outcome already reported)."""
    cell_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    record = {**cell_record(cell, cell_dir, config), "executor": "ray"}
    begun = begin_cell(config, cell, cell_dir, record, t0, force=force, keep_finished=not force)
    if isinstance(begun, Outcome):
        on_outcome(i, begun)
        return None
    feature, notebook = begun
    options = cell_resources(cell, config.ray, cluster.get("GPU", 0))
    if options["num_gpus"] > cluster.get("GPU", 0):  # (Ray would queue it forever)
        release_cell(cell_dir)
        on_outcome(i, record_failure(cell, cell_dir, f"the cell asks for {options['num_gpus']:g} GPU (device "
                                                     f"{cell.resolved.get('device')!r}) and the Ray cluster has "
                                                     f"{cluster.get('GPU', 0):g}", 0.0, config, {"executor": "ray"}))
        return None
    payload = {"repo": str(REPO), "notebook_name": notebook.name, "notebook": notebook.read_bytes(),
               "executed_name": executed_path(cell_dir, feature).name, "params": cell.params,
               "kernel": config.kernel, "cell_timeout": config.cell_timeout, "run_timeout": config.run_timeout,
               "cpus": options["num_cpus"]}
    return remote.options(**options).remote(payload), record, t0, feature


def _collect(ray, ref, config, cell, cell_dir, record, t0, feature) -> Outcome:
    """A finished task's files into the cell's folder, and its marker."""
    try:
        result = ray.get(ref)
    except Exception as err:  # the task raised, its worker died, its node is gone
        reason = str(err).strip().splitlines()
        message = f"Ray: {type(err).__name__}: {reason[0] if reason else ''}"
        return record_failure(cell, cell_dir, message, time.perf_counter() - t0, config, {"executor": "ray"})
    files = dict(result["files"])
    own_js = files.pop(PLOTLY_JS, None)  # the worker's copy of plotly.js: link the sweep's one instead
    for name, data in files.items():
        target = cell_dir / name
        if own_js is not None and name.endswith(".html"):
            data = data.replace(f'src="{PLOTLY_JS}"'.encode(), f'src="{plotlyjs_src(target)}"'.encode())
        atomic_write_bytes(target, data)
    extra = {k: result[k] for k in ("node", "host", "gpus")}
    return finish_cell(cell, config, cell_dir, record, t0, result["returncode"], result["timed_out"],
                       executed_path(cell_dir, feature), None, extra)


def _cancel(ray, running: dict, config, guard: StopSignals, on_outcome) -> None:
    """Stop the running tasks (KeyboardInterrupt in each, which stops its papermill; forced after 10 s) and mark
    their cells interrupted."""
    refs = list(running)
    for ref in refs:
        ray.cancel(ref, force=False)
    _, left = ray.wait(refs, num_returns=len(refs), timeout=10) if refs else ([], [])
    for ref in left:
        ray.cancel(ref, force=True)
    for ref, (i, cell, cell_dir, record, t0, feature) in running.items():
        on_outcome(i, finish_cell(cell, config, cell_dir, record, t0, -1, False, executed_path(cell_dir, feature),
                                  guard.signum or 0))
        release_cell(cell_dir)
