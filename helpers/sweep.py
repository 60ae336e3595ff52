"""Run the feature notebooks over a grid of settings with papermill, resumably, and summarise the results.

A sweep file (YAML, see ``params/default.yaml``)::

    name: default                 # outputs/<name>/
    output_root: outputs
    notebooks: notebooks          # <FEATURE>.ipynb for each feature
    kernel: python3
    cell_timeout: 1800            # seconds per notebook cell (papermill --execution-timeout); null = none
    parameters: {batch_size: 4}   # passed to every run
    grid:                         # product of the lists (or a list of such grids); keys are notebook parameters
      model_num: [embedded]
      cs_num: [1, 2, 3]
      feature_name: [ENGTABLENAME, ENGFIELDNAME, DEFTABLENAME, DEFFIELDNAME]
    cells: []                     # optional extra runs, each a dict of parameters

Each run ("cell") writes into ``outputs/<name>/<model>/<cs>/<feature>/``: the executed notebook, the result
JSON and the heatmaps (the notebook writes those), ``papermill.log``, and last a marker: ``_DONE.json`` after
success, ``_FAILED.json`` (the error) after a failure. A cell is finished when its result JSON and
``_DONE.json`` exist; a rerun skips finished cells and never touches them unless ``force``. A failure is
recorded and the sweep goes on: papermill still writes the executed notebook, with the traceback in it.
Every file is written atomically (temporary file + ``os.replace``).

With ``jobs > 1`` runs go in parallel, each in its own papermill process; when GPUs are visible each worker
gets one (``CUDA_VISIBLE_DEVICES``), round robin.
"""
from __future__ import annotations

import concurrent.futures as cf
import datetime as _dt
import hashlib
import html
import itertools
import json
import os
import queue
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from . import results as R

REPO = Path(__file__).resolve().parents[1]
DONE, FAILED = "_DONE.json", "_FAILED.json"
EXECUTED_SUFFIX = ".executed.ipynb"
# Parameters that name the model or the place in the tree rather than a variant of a feature run.
_PLACED = ("model_num", "cs_num", "feature_name", "semantic", "embedded_family", "model_path")


# --------------------------------------------------------------------------------------------- config


@dataclass
class SweepConfig:
    name: str
    grids: list[dict]
    parameters: dict = field(default_factory=dict)
    cells: list[dict] = field(default_factory=list)
    output_root: Path = REPO / "outputs"
    notebooks: Path = REPO / "notebooks"
    kernel: str = "python3"
    cell_timeout: int | None = None

    @property
    def root(self) -> Path:
        return self.output_root / self.name


def _resolve(path, base: Path) -> Path:
    path = Path(path).expanduser()
    return path if path.is_absolute() else base / path


def load_config(path: str | Path, output_root: str | Path | None = None) -> SweepConfig:
    """Read a sweep YAML. Relative ``output_root`` / ``notebooks`` are relative to the repository root."""
    path = Path(path)
    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    unknown = set(raw) - {"name", "grid", "parameters", "cells", "output_root", "notebooks", "kernel", "cell_timeout"}
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}")
    grid = raw.get("grid") or []
    grids = grid if isinstance(grid, list) else [grid]
    for g in grids:
        for k, v in g.items():
            if not isinstance(v, list):
                raise ValueError(f"{path}: grid entry {k!r} must be a list, got {v!r}")
    if not grids and not raw.get("cells"):
        raise ValueError(f"{path}: neither a grid nor cells")
    return SweepConfig(
        name=str(raw.get("name") or path.stem), grids=grids, parameters=dict(raw.get("parameters") or {}),
        cells=list(raw.get("cells") or []),
        output_root=_resolve(output_root or raw.get("output_root", "outputs"), REPO),
        notebooks=_resolve(raw.get("notebooks", "notebooks"), REPO), kernel=str(raw.get("kernel", "python3")),
        cell_timeout=raw.get("cell_timeout"))


# --------------------------------------------------------------------------------------------- cells


def _slug(value) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", str(value)).strip("_") or "x"


def model_label(params: dict) -> str:
    """Folder name of the model: ``embedded-llama``, ``bm1``, ``bm2-nonsem``, ``custom-<name>-<hash>``.

    Works for invalid settings too (a failing cell still gets a folder)."""
    if params.get("model_path"):
        mp = str(params["model_path"])
        return f"custom-{_slug(Path(mp).name)}-{hashlib.sha256(mp.encode()).hexdigest()[:8]}"
    m = params.get("model_num", "embedded")
    if str(m).strip().lower() == "embedded":
        return f"embedded-{_slug(params.get('embedded_family', 'llama'))}"
    label = f"bm{_slug(m)}"
    return label + ("-nonsem" if params.get("semantic", True) is False else "")


def feature_label(feature_name) -> str:
    from .pairs import parse_feature

    try:
        return parse_feature(feature_name).value
    except ValueError:
        return _slug(feature_name)


@dataclass
class Cell:
    params: dict  # the notebook parameters of this run (output_dir is added when it runs)
    varying: tuple[str, ...] = ()  # grid keys besides the placed ones: they name the variant

    @property
    def feature(self) -> str:
        return feature_label(self.params.get("feature_name"))

    @property
    def relpath(self) -> Path:
        variant = "".join(f"_{k}={_slug(self.params[k])}" for k in self.varying if k in self.params)
        return Path(model_label(self.params)) / f"cs{_slug(self.params.get('cs_num'))}" / (self.feature + variant)

    @property
    def label(self) -> str:
        return str(self.relpath).replace(os.sep, " / ")


def expand(config: SweepConfig) -> list[Cell]:
    """Every cell of the sweep, in order, without duplicates."""
    cells, seen = [], set()
    varying = tuple(sorted({k for g in config.grids for k, v in g.items() if k not in _PLACED and len(v) > 1}
                           | {k for c in config.cells for k in c if k not in _PLACED}))
    combos = [dict(zip(g, values)) for g in config.grids for values in itertools.product(*g.values())]
    for combo in combos + [dict(c) for c in config.cells]:
        cell = Cell({**config.parameters, **combo}, varying)
        if cell.relpath not in seen:
            seen.add(cell.relpath)
            cells.append(cell)
    return cells


def is_finished(cell_dir: Path) -> bool:
    return (cell_dir / DONE).is_file() and bool(R.find_results(cell_dir))


# --------------------------------------------------------------------------------------------- running


@dataclass
class Outcome:
    cell: Cell
    status: str  # "ok", "failed", "skipped" (finished earlier), "not run" (left out by ``only``)
    dir: Path
    duration_s: float = 0.0
    error: str | None = None


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
    R.atomic_write_json(cell_dir / name, data)
    other = cell_dir / (FAILED if name == DONE else DONE)
    other.unlink(missing_ok=True)


def run_cell(cell: Cell, config: SweepConfig, env_extra: dict | None = None) -> Outcome:
    """Execute one cell's notebook with papermill in a subprocess; record the outcome in its folder."""
    cell_dir = config.root / cell.relpath
    cell_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    record = dict(cell=cell.label, params=cell.params, started_at=started)

    def fail(message: str) -> Outcome:
        duration = time.perf_counter() - t0
        _write_marker(cell_dir, FAILED, {**record, "status": "failed", "error": message, "duration_s": duration})
        return Outcome(cell, "failed", cell_dir, duration, message)

    from .pairs import parse_feature

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
    with open(cell_dir / "papermill.log", "wb") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    if tmp.is_file():
        os.replace(tmp, executed)  # papermill writes the notebook even when a cell raised
    record["notebook"] = executed.name
    if proc.returncode != 0:
        error = _notebook_error(executed) if executed.is_file() else None
        if error is None:
            tail = (cell_dir / "papermill.log").read_text(errors="replace").strip().splitlines()[-5:]
            error = " | ".join(tail) or f"papermill exited with {proc.returncode}"
        return fail(error)
    found = R.find_results(cell_dir)
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


def run_sweep(config: SweepConfig, jobs: int = 1, force: bool = False, progress: bool = True,
              only: str | None = None) -> list[Outcome]:
    """Run every unfinished cell (all with ``force``); ``only``: a substring of the cell label to select."""
    cells = expand(config)
    config.root.mkdir(parents=True, exist_ok=True)
    from .plotting import write_plotlyjs

    write_plotlyjs(config.root)  # one offline copy; every heatmap HTML below links to it
    outcomes: dict[int, Outcome] = {}
    todo = []
    for i, cell in enumerate(cells):
        cell_dir = config.root / cell.relpath
        if not force and is_finished(cell_dir):
            outcomes[i] = Outcome(cell, "skipped", cell_dir)
        elif only is not None and only not in cell.label:
            outcomes[i] = Outcome(cell, "not run", cell_dir)  # still listed in the index
        else:
            todo.append(i)

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
            return run_cell(cells[i], config, extra)
        except Exception as err:  # a crash of the runner itself is still a recorded failure of this cell
            return Outcome(cells[i], "failed", config.root / cells[i].relpath, error=f"{type(err).__name__}: {err}")
        finally:
            slots.put(slot)

    from tqdm.auto import tqdm

    bar = tqdm(total=len(cells), desc=f"sweep {config.name}", disable=not progress, unit="cell")
    bar.update(len(outcomes))
    counts = {"ok": 0, "failed": 0, "skipped": sum(o.status == "skipped" for o in outcomes.values())}
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


# --------------------------------------------------------------------------------------------- summary


def _cell_row(config: SweepConfig, out: Outcome) -> dict:
    d = out.dir
    row = dict(cell=out.cell.label, model=model_label(out.cell.params), cs=out.cell.params.get("cs_num"),
               feature=out.cell.feature, status=out.status, error=out.error, duration_s=round(out.duration_s, 1),
               dir=str(d.relative_to(config.root)) if d.is_relative_to(config.root) else str(d))
    if out.status == "skipped":
        row["status"] = "done (earlier)"
    marker = d / FAILED
    if out.status != "failed" and not is_finished(d):
        row["status"] = "failed" if marker.is_file() else "not run"
    if row["status"] == "failed" and row["error"] is None and marker.is_file():
        row["error"] = json.loads(marker.read_text()).get("error")
    notebooks = sorted(d.glob(f"*{EXECUTED_SUFFIX}"))
    row["notebook"] = str(notebooks[0].relative_to(config.root)) if notebooks else None
    found = R.find_results(d) if row["status"] in ("ok", "done (earlier)") else []
    row["json"] = row["heatmap"] = row["accuracy"] = None
    row["top_heads"], row["scores"] = [], None
    if found:
        data = R.load_results(found[0])
        meta = data["metadata"]
        row["json"] = str(found[0].relative_to(config.root))
        heat = Path(f"{R.figure_base(found[0])}.html")
        row["heatmap"] = str(heat.relative_to(config.root)) if heat.is_file() else None
        row["accuracy"] = meta.get("clean_accuracy")
        row["n_clean_correct"], row["n_examples"] = meta.get("n_clean_correct"), meta.get("n_examples")
        row["top_heads"] = R.top_heads_from_json(data, 3)
        row["scores"] = data["scores"]
    return row


def _link(path: str | None, text: str) -> str:
    return f"[{text}]({path})" if path else "-"


def write_summary(config: SweepConfig, outcomes: list[Outcome]) -> dict[str, Path]:
    """``index.md``, ``index.html``, ``summary.json`` and the overview figure in the sweep's folder."""
    from . import plotting

    rows = [_cell_row(config, o) for o in outcomes]
    root = config.root

    def heads_text(r) -> str:
        return ", ".join(f"{h['head']}@{h['label']} ({h['mean']:+.2f}, n={h['n']})" for h in r["top_heads"]) or "-"

    def acc_text(r) -> str:
        return f"{r['n_clean_correct']}/{r['n_examples']}" if r["accuracy"] is not None else "-"

    n_ok = sum(r["status"] in ("ok", "done (earlier)") for r in rows)
    n_failed = sum(r["status"] == "failed" for r in rows)
    stamp = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    fig = plotting.overview_figure([dict(label=r["cell"], scores=r["scores"]) for r in rows if r["scores"] is not None])
    paths = {}
    if fig is not None:
        paths.update({f"overview_{k}": v for k, v in plotting.save_figure(fig, root / "overview").items()})

    md = [f"# Sweep `{config.name}`", "", f"{len(rows)} cells: {n_ok} done, {n_failed} failed, "
          f"{len(rows) - n_ok - n_failed} not run. Updated {stamp}.", ""]
    if fig is not None:
        md += ["Overview (per cell, each head's mean score at its strongest position): [overview.html](overview.html)", ""]
    md += ["| cell | status | clean accuracy | top heads (head@token: mean, examples) | notebook | heatmap | error |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        err = (r["error"] or "").replace("|", "\\|").replace("\n", " ")[:300]
        md.append(f"| {r['cell']} | {r['status']} | {acc_text(r)} | {heads_text(r)} | "
                  f"{_link(r['notebook'], 'notebook')} | {_link(r['heatmap'], 'heatmap')} | {err} |")
    paths["md"] = R.atomic_write_text(root / "index.md", "\n".join(md) + "\n")

    def a(path, text):
        return f'<a href="{html.escape(path)}">{text}</a>' if path else "-"

    trs = "\n".join(
        f"<tr class='{html.escape(r['status'].split()[0])}'><td>{html.escape(r['cell'])}</td><td>{html.escape(r['status'])}</td>"
        f"<td>{acc_text(r)}</td><td>{html.escape(heads_text(r))}</td><td>{a(r['notebook'], 'notebook')}</td>"
        f"<td>{a(r['heatmap'], 'heatmap')}</td><td>{a(r['json'], 'json')}</td>"
        f"<td>{html.escape((r['error'] or '')[:500])}</td></tr>" for r in rows)
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>Sweep {html.escape(config.name)}</title>
<style>body{{font-family:sans-serif}} table{{border-collapse:collapse}} td,th{{border:1px solid #ccc;padding:3px 6px;
font-size:13px}} tr.failed{{background:#fdd}} tr.not{{background:#eee}}</style></head><body>
<h1>Sweep {html.escape(config.name)}</h1><p>{len(rows)} cells: {n_ok} done, {n_failed} failed. Updated {stamp}.</p>
{'<p><a href="overview.html">Overview figure</a>: per cell, each head&#39;s mean score at its strongest position.</p>' if fig is not None else ''}
<table><tr><th>cell</th><th>status</th><th>clean accuracy</th><th>top heads (head@token: mean, examples)</th><th>notebook</th>
<th>heatmap</th><th>JSON</th><th>error</th></tr>
{trs}
</table></body></html>
"""
    paths["html"] = R.atomic_write_text(root / "index.html", page)
    summary = [{k: v for k, v in r.items() if k != "scores"} for r in rows]
    paths["json"] = R.atomic_write_json(root / "summary.json", {"name": config.name, "updated": stamp,
                                                                  "cells": summary})
    return paths
