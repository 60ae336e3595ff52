#!/usr/bin/env python
"""Run a sweep of the feature notebooks (papermill) over a parameter grid; see helpers/experiments/sweep_cells.py.

    python scripts/sweep.py                         # params/default.yaml: embedded models, CPU, offline
    python scripts/sweep.py --params params/full.yaml --jobs 4
    python scripts/sweep.py --force                 # rerun finished cells too (in place, same settings)
    python scripts/sweep.py --executor ray [--address ADDR]   # each cell a Ray task (local Ray or a cluster)
    python scripts/sweep.py --list                  # each cell's folder and whether it is finished

Exit status 0 when every cell is done, 1 when any failed (each failure is recorded in its cell's folder and
in the index page, and the other cells still run), 128 + the signal's number when SIGTERM, SIGHUP or SIGINT
stopped it (the running cells' processes are stopped and the cells marked interrupted; a rerun resumes).
A cell that a live process is running (its _RUNNING.json) is never started a second time.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from helpers.experiments.run_guard import SweepInterrupted  # noqa: E402
from helpers.experiments.sweep import run_sweep  # noqa: E402
from helpers.experiments.sweep_cells import (  # noqa: E402
    FAILED, dir_label, expand, folder_for, is_finished, load_config, marker_matches, read_marker,
)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params/default.yaml", help="sweep YAML (default: %(default)s)")
    ap.add_argument("--jobs", type=int, default=None,
                    help="cells run at once (local: default 1, one GPU each when several are visible; ray: default "
                         "what the cluster holds)")
    ap.add_argument("--force", action="store_true",
                    help="rerun finished cells too, in their folders (a folder finished with other settings is "
                         "never overwritten: such a cell runs in <folder>_run-<hash>)")
    ap.add_argument("--only", help="run only cells whose label contains this text, e.g. 'cs2' or 'DEFFIELDNAME'")
    ap.add_argument("--output-root", help="override the YAML's output_root")
    ap.add_argument("--run-timeout", type=float,
                    help="seconds a whole cell may run before it is stopped and recorded as failed (overrides the "
                         "YAML's run_timeout)")
    ap.add_argument("--executor", choices=["local", "ray"], default="local",
                    help="local: --jobs papermill processes here; ray: each cell a Ray task (a local Ray, or the "
                         "cluster at --address / RAY_ADDRESS; GPUs per cell: the YAML's ray: gpus_per_cell)")
    ap.add_argument("--address", help="a Ray cluster's address (ray start --head prints it); default RAY_ADDRESS")
    ap.add_argument("--list", action="store_true", help="print the cells (folder, state) and exit")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)

    config = load_config(args.params, output_root=args.output_root)
    if args.run_timeout is not None:
        config.run_timeout = args.run_timeout
    if args.list:
        for cell in expand(config):
            folder = folder_for(config, cell)
            failed = marker_matches(read_marker(folder / FAILED), cell)  # (not another settings' failure)
            state = "done" if is_finished(folder, cell) else "failed" if failed else "to run"
            print(f"{dir_label(config, folder)}  [{state}]")
        return 0
    try:
        outcomes = run_sweep(config, jobs=args.jobs, force=args.force, progress=not args.no_progress,
                             only=args.only, executor=args.executor, address=args.address)
    except SweepInterrupted as err:
        print(f"sweep {config.name}: {err}; the running cells are marked interrupted -> {config.root / 'index.html'}",
              file=sys.stderr)
        return 128 + err.signum
    counts = {s: sum(o.status == s for o in outcomes) for s in ("ok", "skipped", "failed", "running elsewhere")}
    # a cell "not run" with a reason (another run's result in its folder since the sweep chose it) is not done;
    # one without (left out by --only, or by a stop) is what was asked
    unfinished = [o for o in outcomes if o.status in ("failed", "running elsewhere") or (o.status == "not run"
                                                                                         and o.error)]
    print(f"sweep {config.name}: {counts['ok']} ran, {counts['skipped']} already finished, {counts['failed']} "
          f"failed, {counts['running elsewhere']} running in another process -> {config.root / 'index.html'} "
          f"(also index.md)")
    for o in unfinished:
        print(f"  {o.status.upper()} {o.cell.label}: {o.error}")
    return 1 if unfinished else 0


if __name__ == "__main__":
    sys.exit(main())
