"""Run the feature notebooks over a grid of settings with papermill, resumably, and summarise the results.

A sweep file (YAML, see ``params/default.yaml``)::

    name: default                 # outputs/<name>/
    output_root: outputs
    notebooks: notebooks          # <FEATURE>.ipynb for each feature
    kernel: python3
    cell_timeout: 1800            # seconds per notebook cell (papermill --execution-timeout); null = none
    run_timeout: null             # seconds per whole run (papermill process, killed after); null = none
    parameters: {batch_size: 4}   # passed to every run
    grid:                         # product of the lists (or a list of such grids); keys are notebook parameters
      model_num: [embedded]
      cs_num: [1, 2, 3]
      feature_name: [ENGTABLENAME, ENGFIELDNAME, DEFTABLENAME, DEFFIELDNAME]
    cells: []                     # optional extra runs, each a dict of parameters

Every key under ``parameters``, ``grid`` and ``cells`` must be an experiment setting (a field of
``helpers.experiment.ExperimentSettings``: the feature notebooks' parameters); anything else (a token, a
typo, ``output_dir``, which the sweep sets per cell) is refused when the file is read. The Hugging Face token
is never a sweep parameter: runs read it from the ``HF_TOKEN`` environment variable.

Each run ("cell") has *resolved* settings: the feature notebook's parameter defaults, overridden by
``parameters``, overridden by the grid/cell values (the feature name canonical). Two cells with the same
resolved settings are one run (a warning names the duplicate). A cell writes into
``outputs/<name>/<model>/cs<cs>/<feature><suffix>/`` where the suffix lists, as ``_key=value`` (or ``_h<hash>``
when values do not make a short safe name), every setting that differs from the notebook's defaults overridden
by ``parameters`` and is not already in the path: a cell of the plain grid has no suffix, a cell with
``seed: 1`` gets ``_seed=1``, whatever other cells the sweep has. That folder holds the executed notebook, the
result JSON and the heatmaps (the notebook writes those), ``papermill.log`` and a marker: ``_RUNNING.json``
while it runs, then ``_DONE.json`` after success or ``_FAILED.json`` (the error) after a failure (a crash of
the runner and a ``run_timeout`` included). Every marker records the resolved settings and their hash.

A cell is finished when its folder has a result JSON and a ``_DONE.json`` whose settings hash equals the
cell's (a marker of an older version without the hash is compared through its recorded ``params``); a rerun
skips finished cells and never touches them unless ``force``, which reruns them in place after deleting the
marker. A folder whose ``_DONE.json`` (or ``_RUNNING.json``) belongs to *other* settings (say ``parameters:``
changed from ``batch_size: 4`` to 64) is never overwritten: the cell runs in ``<folder>_run-<hash>`` instead,
so both results survive. Cells whose settings ``helpers.experiment.validate`` refuses (a typo in the grid) are
recorded as failed before anything runs. A failure is recorded and the sweep goes on: papermill still writes
the executed notebook, with the traceback in it. Every file is written atomically (temporary file +
``os.replace``).

With ``jobs > 1`` runs go in parallel, each in its own papermill process; when GPUs are visible each worker
gets one (``CUDA_VISIBLE_DEVICES``), round robin.
"""
from __future__ import annotations

import ast
import concurrent.futures as cf
import dataclasses
import datetime as _dt
import functools
import hashlib
import html
import itertools
import json
import os
import queue
import re
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from . import results as R

REPO = Path(__file__).resolve().parents[1]
DONE, FAILED, RUNNING = "_DONE.json", "_FAILED.json", "_RUNNING.json"
MARKERS = (DONE, FAILED, RUNNING)
EXECUTED_SUFFIX = ".executed.ipynb"
ALT_PREFIX = "_run-"  # <folder>_run-<hash>: a cell whose natural folder holds another settings' run
_MISSING = object()


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
    run_timeout: float | None = None

    @property
    def root(self) -> Path:
        return self.output_root / self.name


def _resolve(path, base: Path) -> Path:
    path = Path(path).expanduser()
    return path if path.is_absolute() else base / path


@functools.lru_cache(maxsize=1)
def setting_defaults() -> dict:
    """The experiment settings (``ExperimentSettings`` fields) and their defaults."""
    from .experiment import ExperimentSettings

    return {f.name: f.default for f in dataclasses.fields(ExperimentSettings)}


def check_keys(config: SweepConfig, source: str | Path | None = None) -> None:
    """Refuse any key under ``parameters``, ``grid`` or ``cells`` that is not an experiment setting."""
    allowed = setting_defaults()
    where = f"{source}: " if source else f"sweep {config.name}: "
    blocks = [("parameters", config.parameters)] + [("grid", g) for g in config.grids] + \
             [(f"cells[{i}]", c) for i, c in enumerate(config.cells)]
    for block, entries in blocks:
        if not isinstance(entries, dict):
            raise ValueError(f"{where}{block} must be a mapping of settings, got {entries!r}")
        for key in entries:
            if key in allowed:
                continue
            if key == "output_dir":
                why = "the sweep sets output_dir itself, one folder per cell (see output_root)"
            else:
                why = f"it is not an experiment setting (allowed: {', '.join(sorted(allowed))})"
            raise ValueError(
                f"{where}{block} key {key!r} refused: {why}. Only experiment settings may be swept; they are "
                f"written into every executed notebook and the summary. A Hugging Face token is never a "
                f"parameter: set the HF_TOKEN environment variable instead.")


def load_config(path: str | Path, output_root: str | Path | None = None) -> SweepConfig:
    """Read a sweep YAML. Relative ``output_root`` / ``notebooks`` are relative to the repository root."""
    path = Path(path)
    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    unknown = set(raw) - {"name", "grid", "parameters", "cells", "output_root", "notebooks", "kernel",
                          "cell_timeout", "run_timeout"}
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}")
    grid = raw.get("grid") or []
    grids = grid if isinstance(grid, list) else [grid]
    for g in grids:
        if not isinstance(g, dict):
            raise ValueError(f"{path}: a grid must be a mapping of lists, got {g!r}")
        for k, v in g.items():
            if not isinstance(v, list):
                raise ValueError(f"{path}: grid entry {k!r} must be a list, got {v!r}")
    if not grids and not raw.get("cells"):
        raise ValueError(f"{path}: neither a grid nor cells")
    config = SweepConfig(
        name=str(raw.get("name") or path.stem), grids=grids, parameters=raw.get("parameters") or {},
        cells=list(raw.get("cells") or []),
        output_root=_resolve(output_root or raw.get("output_root", "outputs"), REPO),
        notebooks=_resolve(raw.get("notebooks", "notebooks"), REPO), kernel=str(raw.get("kernel", "python3")),
        cell_timeout=raw.get("cell_timeout"), run_timeout=raw.get("run_timeout"))
    check_keys(config, path)
    config.parameters = dict(config.parameters)
    return config


# --------------------------------------------------------------------------------------------- cells


def _slug(value) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", str(value)).strip("_") or "x"


def _canon(value) -> str:
    """Canonical JSON of a value or a dict of settings (equal runs, equal text)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def params_hash(resolved: dict) -> str:
    return hashlib.sha256(_canon(resolved).encode()).hexdigest()[:16]


def model_label(params: dict) -> str:
    """Folder name of the model: ``embedded-llama``, ``bm1``, ``bm2-nonsem``, ``custom-<name>-<hash>``.

    Works for invalid settings too (a failing cell still gets a folder)."""
    if params.get("model_path"):
        mp = str(params["model_path"])
        return f"custom-{_slug(Path(mp).name)}-{hashlib.sha256(mp.encode()).hexdigest()[:8]}"
    m = params.get("model_num", "embedded")
    if _is_embedded(params):
        return f"embedded-{_slug(params.get('embedded_family', 'llama'))}"
    label = f"bm{_slug(m)}"
    return label + ("-nonsem" if params.get("semantic", True) is False else "")


def _is_embedded(params: dict) -> bool:
    return str(params.get("model_num", "embedded")).strip().lower() == "embedded"


def _in_path(params: dict) -> set[str]:
    """The settings that :func:`model_label`, ``cs<n>`` and the feature folder already spell out."""
    keys = {"cs_num", "feature_name"}
    if params.get("model_path"):
        return keys | {"model_path"}
    keys.add("model_num")
    if _is_embedded(params):
        keys.add("embedded_family")
    elif isinstance(params.get("semantic", True), bool):
        keys.add("semantic")
    return keys


def feature_label(feature_name) -> str:
    from .pairs import parse_feature

    try:
        return parse_feature(feature_name).value
    except ValueError:
        return _slug(feature_name)


def _parameters_cell(path: Path) -> dict:
    """The literal assignments of a notebook's ``parameters`` cell (``a, b = 1, 2`` included)."""
    try:
        stat = path.stat()
    except OSError:
        return {}
    return _parameters_cell_cached(str(path), stat.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _parameters_cell_cached(path: str, mtime_ns: int) -> dict:
    try:
        nb = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    for cell in nb.get("cells", []):
        if cell.get("cell_type") != "code" or "parameters" not in cell.get("metadata", {}).get("tags", []):
            continue
        source = cell.get("source", "")
        try:
            tree = ast.parse("".join(source) if isinstance(source, list) else source)
        except SyntaxError:
            return {}
        out = {}
        for node in tree.body:
            if not (isinstance(node, ast.Assign) and len(node.targets) == 1):
                continue
            try:
                value = ast.literal_eval(node.value)
            except ValueError:
                continue
            target = node.targets[0]
            if isinstance(target, ast.Name):
                out[target.id] = value
            elif (isinstance(target, ast.Tuple) and isinstance(value, tuple) and len(value) == len(target.elts)
                  and all(isinstance(e, ast.Name) for e in target.elts)):
                out.update({e.id: v for e, v in zip(target.elts, value)})
        return out
    return {}


def notebook_defaults(notebooks: Path, feature_name) -> dict:
    """The settings a run of ``feature_name``'s notebook uses when the sweep passes nothing: the notebook's
    parameters cell over the ``ExperimentSettings`` defaults (those alone for an unknown feature)."""
    defaults = dict(setting_defaults())
    feature = feature_label(feature_name)
    cell = _parameters_cell(Path(notebooks) / f"{feature}.ipynb")
    defaults.update({k: v for k, v in cell.items() if k in defaults})
    defaults["feature_name"] = feature
    return defaults


@dataclass
class Cell:
    params: dict  # the parameters passed to this run's notebook (output_dir is added when it runs)
    defaults: dict = field(default_factory=dict)  # the notebook's defaults (see notebook_defaults)
    common: dict = field(default_factory=dict)  # the sweep's ``parameters``: with defaults, the unnamed baseline

    @property
    def feature(self) -> str:
        return feature_label(self.params.get("feature_name"))

    @property
    def resolved(self) -> dict:
        """Every setting of the run: the notebook's defaults overridden by ``params``, the feature canonical."""
        return resolve(self.params, self.defaults)

    @property
    def params_hash(self) -> str:
        return params_hash(self.resolved)

    @property
    def variant(self) -> dict:
        """The settings that differ from the baseline (defaults + ``parameters``) and are not in the path."""
        resolved = self.resolved
        base = resolve(self.common, self.defaults)
        shown = _in_path(resolved)
        return {k: resolved[k] for k in sorted(resolved)
                if k not in shown and _canon(resolved[k]) != _canon(base.get(k, _MISSING))}

    @property
    def relpath(self) -> Path:
        """``<model>/cs<n>/<feature><suffix>``: a function of this cell's settings and the baseline only."""
        resolved, variant = self.resolved, self.variant
        parts = [f"{k}={_slug(v)}" for k, v in variant.items()]
        lossless = all(str(v) == _slug(v) for v in variant.values())
        suffix = "".join(f"_{p}" for p in parts)
        if variant and (not lossless or len(suffix) > 60):
            suffix = f"_h{hashlib.sha256(_canon(variant).encode()).hexdigest()[:10]}"
        return Path(model_label(resolved)) / f"cs{_slug(resolved.get('cs_num'))}" / (self.feature + suffix)

    @property
    def label(self) -> str:
        return str(self.relpath).replace(os.sep, " / ")


def resolve(params: dict, defaults: dict) -> dict:
    resolved = {**defaults, **params}
    if "feature_name" in resolved:
        resolved["feature_name"] = feature_label(resolved["feature_name"])
    return resolved


def expand(config: SweepConfig) -> list[Cell]:
    """Every cell of the sweep, in order: one per distinct set of resolved settings.

    An exact duplicate (same resolved settings) is run once, with a warning. Two different cells that would
    share a folder (values that differ only in spelling, e.g. ``cs_num: 1`` and ``"1"``) are an error."""
    cells, seen, folders = [], {}, {}
    combos = [dict(zip(g, values)) for g in config.grids for values in itertools.product(*g.values())]
    for combo in combos + [dict(c) for c in config.cells]:
        params = {**config.parameters, **combo}
        cell = Cell(params, notebook_defaults(config.notebooks, params.get("feature_name")), dict(config.parameters))
        key = _canon(cell.resolved)
        if key in seen:
            warnings.warn(f"sweep {config.name}: cell {cell.label} ({combo}) is listed more than once; it runs "
                          f"once", stacklevel=2)
            continue
        other = folders.get(cell.relpath)
        if other is not None:
            raise ValueError(f"sweep {config.name}: cells {other.params} and {cell.params} would share the folder "
                             f"{cell.relpath}; write their values the same way")
        seen[key] = cell
        folders[cell.relpath] = cell
        cells.append(cell)
    return cells


def _read_marker(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else {}


def marker_matches(marker: dict | None, cell: Cell) -> bool:
    """Whether a marker was written for ``cell``'s settings (by hash; an older marker through its params)."""
    if not marker:
        return False
    if "params_hash" in marker:
        return marker["params_hash"] == cell.params_hash
    if isinstance(marker.get("params"), dict):  # written before the hash: its params were the explicit ones
        return params_hash(resolve(marker["params"], cell.defaults)) == cell.params_hash
    return False


def is_finished(cell_dir: Path, cell: Cell | None = None) -> bool:
    """A result JSON and ``_DONE.json`` in ``cell_dir``; with ``cell``, the marker must be for its settings."""
    marker = _read_marker(cell_dir / DONE)
    if marker is None or not R.find_results(cell_dir):
        return False
    if marker.get("json") and not (cell_dir / marker["json"]).is_file():
        return False
    return cell is None or marker_matches(marker, cell)


def folder_for(config: SweepConfig, cell: Cell) -> Path:
    """Where ``cell`` runs: its own folder, unless a ``_DONE.json`` or ``_RUNNING.json`` there belongs to other
    settings; then ``<folder>_run-<hash of its settings>``, so neither run overwrites the other."""
    natural = config.root / cell.relpath
    for name in (DONE, RUNNING):
        marker = _read_marker(natural / name)
        if marker is not None and not marker_matches(marker, cell):
            return natural.with_name(f"{natural.name}{ALT_PREFIX}{cell.params_hash[:10]}")
    return natural


def _dir_label(config: SweepConfig, d: Path) -> str:
    try:
        return " / ".join(d.relative_to(config.root).parts)
    except ValueError:
        return str(d)


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
    """Write marker ``name`` atomically, then remove the other markers."""
    R.atomic_write_json(cell_dir / name, data)
    for other in MARKERS:
        if other != name:
            (cell_dir / other).unlink(missing_ok=True)


def _record(cell: Cell, cell_dir: Path, config: SweepConfig | None = None) -> dict:
    return dict(cell=_dir_label(config, cell_dir) if config else cell.label, params=cell.params,
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


def settings_error(cell: Cell) -> str | None:
    """Why ``helpers.experiment.validate`` refuses this cell's settings (an unknown feature, a model or command
    set outside the registry, a bad value), or None. Nothing is loaded; run_sweep asks it of every cell first, so
    a typo in the grid is reported at once instead of when its cell's turn comes."""
    from .experiment import ExperimentSettings, validate

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
    from .plotting import write_plotlyjs

    write_plotlyjs(config.root)  # one offline copy; every heatmap HTML below links to it
    outcomes: dict[int, Outcome] = {}
    todo = []
    for i, cell in enumerate(cells):
        if not force and is_finished(dirs[i], cell):
            outcomes[i] = Outcome(cell, "skipped", dirs[i])
        elif only is not None and only not in cell.label and only not in _dir_label(config, dirs[i]):
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


# --------------------------------------------------------------------------------------------- summary


def _cell_row(config: SweepConfig, out: Outcome) -> dict:
    d = out.dir
    row = dict(cell=_dir_label(config, d), model=model_label(out.cell.resolved), cs=out.cell.params.get("cs_num"),
               feature=out.cell.feature, status=out.status, error=out.error, duration_s=round(out.duration_s, 1),
               dir=str(d.relative_to(config.root)) if d.is_relative_to(config.root) else str(d),
               params=out.cell.params, params_hash=out.cell.params_hash)
    if out.status == "skipped":
        row["status"] = "done (earlier)"
    failed = _read_marker(d / FAILED)
    if out.status != "failed" and not is_finished(d, out.cell):
        if failed is not None and marker_matches(failed, out.cell):
            row["status"] = "failed"
        elif (d / RUNNING).is_file():
            row["status"] = "interrupted"  # killed while running (or running now, in another sweep)
        else:
            row["status"] = "not run"
    if row["status"] == "failed" and row["error"] is None and failed is not None:
        row["error"] = failed.get("error")
    notebooks = sorted(d.glob(f"*{EXECUTED_SUFFIX}"))
    row["notebook"] = str(notebooks[0].relative_to(config.root)) if notebooks else None
    found = []
    if row["status"] in ("ok", "done (earlier)"):
        done = _read_marker(d / DONE) or {}
        named = d / done["json"] if isinstance(done.get("json"), str) else None
        found = [named] if named is not None and named.is_file() else R.find_results(d)
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
font-size:13px}} tr.failed{{background:#fdd}} tr.not{{background:#eee}} tr.interrupted{{background:#ffe8c0}}</style></head><body>
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
