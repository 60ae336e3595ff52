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
    ray: {gpus_per_cell: 0.25}    # optional, the Ray executor (--executor ray): GPUs a CUDA cell asks for (1),
                                  # cpus_per_cell (1), working_dir (ship the repository to a cluster: true)

Every key under ``parameters``, ``grid`` and ``cells`` must be an experiment setting (a field of
``helpers.experiments.experiment.ExperimentSettings``: the feature notebooks' parameters); anything else (a token, a
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
while it runs (a lock: helpers.experiments.run_guard), then ``_DONE.json`` after success, ``_FAILED.json`` (the
error) after a failure (a crash of the runner and a ``run_timeout`` included) or ``_INTERRUPTED.json`` when a
signal stopped the sweep. Every marker records the resolved settings and their hash.

A cell is finished when its folder has a result JSON and a ``_DONE.json`` whose settings hash equals the
cell's (a marker of an older version without the hash is compared through its recorded ``params``); a rerun
skips finished cells and never touches them unless ``force``, which reruns them in place after deleting the
marker. A folder whose ``_DONE.json`` (or ``_RUNNING.json``) belongs to *other* settings (say ``parameters:``
changed from ``batch_size: 4`` to 64) is never overwritten: the cell runs in ``<folder>_run-<hash>`` instead,
so both results survive. A result of a local model folder (the embedded models, a local ``model_path``) whose
weights, config or tokenizer have changed since (its recorded content hash differs, as after ``make train``; notes
such as ``training_meta.json`` do not count) is not finished either: the cell runs again in a
``<folder>_run-<hash>`` (of its settings, or where that is taken of its settings and weights), and the older result
stays. Cells whose settings ``helpers.experiments.experiment.validate`` refuses (a typo in the grid) are
recorded as failed before anything runs. A failure is recorded and the sweep goes on: papermill still writes
the executed notebook, with the traceback in it. Every file is written atomically (temporary file +
``os.replace``).

With ``jobs > 1`` runs go in parallel, each in its own papermill process; when GPUs are visible each worker
gets one (``CUDA_VISIBLE_DEVICES``), round robin.
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import hashlib
import itertools
import json
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from helpers.experiments.results import find_results
from helpers.parameter_values import spelled_once
from helpers.tinysql.pair_versions import pairs_changed_since


REPO = Path(__file__).resolve().parents[2]


DONE, FAILED, RUNNING, INTERRUPTED = "_DONE.json", "_FAILED.json", "_RUNNING.json", "_INTERRUPTED.json"


MARKERS = (DONE, FAILED, RUNNING, INTERRUPTED)

# the sweep YAML's ``ray:`` settings and their defaults (helpers.experiments.ray_executor; working_dir None: ship
# the repository only to a cluster given by address)
RAY_SETTINGS = {"gpus_per_cell": 1, "cpus_per_cell": 1, "working_dir": None}


EXECUTED_SUFFIX = ".executed.ipynb"


ALT_PREFIX = "_run-"  # <folder>_run-<hash>: a cell whose natural folder holds another settings' run


_MISSING = object()


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
    # the Ray executor's settings (RAY_SETTINGS): gpus_per_cell (1; a fraction packs
    # small models onto one GPU), cpus_per_cell (1), working_dir (ship the repository to a cluster's workers)
    ray: dict = field(default_factory=dict)

    @property
    def root(self) -> Path:
        return self.output_root / self.name


def _resolve(path, base: Path) -> Path:
    path = Path(path).expanduser()
    return path if path.is_absolute() else base / path


@functools.lru_cache(maxsize=1)
def setting_defaults() -> dict:
    """The experiment settings (``ExperimentSettings`` fields) and their defaults."""
    from helpers.experiments.experiment import ExperimentSettings

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
                          "cell_timeout", "run_timeout", "ray"}
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
        cell_timeout=raw.get("cell_timeout"), run_timeout=raw.get("run_timeout"), ray=dict(raw.get("ray") or {}))
    bad = set(config.ray) - set(RAY_SETTINGS)
    if bad:
        raise ValueError(f"{path}: unknown ray keys {sorted(bad)} (known: {', '.join(RAY_SETTINGS)})")
    check_keys(config, path)
    config.parameters = dict(config.parameters)
    return config


def _slug(value) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", str(value)).strip("_") or "x"


def _canon(value) -> str:
    """Canonical JSON of a value or a dict of settings (equal runs, equal text)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


# Settings added after sweeps existed, with the value that means "as before": left out of the hash at that value, so
# the cells a sweep finished earlier still count as finished (and are not re-run into a `_run-<hash>` folder).
ADDED_SETTINGS = {"vocabulary": None, "novel_words": "trained"}


def params_hash(resolved: dict) -> str:
    kept = {k: v for k, v in resolved.items() if not (k in ADDED_SETTINGS and v == ADDED_SETTINGS[k])}
    return hashlib.sha256(_canon(kept).encode()).hexdigest()[:16]


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
    from helpers.tinysql.pairs import parse_feature

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
    resolved = spelled_once({**defaults, **params})
    if "feature_name" in resolved:
        resolved["feature_name"] = feature_label(resolved["feature_name"])
    if "vocabulary" in resolved:  # "Upstream" is "upstream"; the model's own word set is None (one run, one folder)
        from helpers.tinysql.word_sets import default_vocabulary, resolve_vocabulary

        model_num = resolved.get("model_num")
        try:
            name = resolve_vocabulary(resolved["vocabulary"], model_num)
        except ValueError:  # an unknown word set: validation records the cell as failed, naming the choices
            pass
        else:
            resolved["vocabulary"] = None if name == default_vocabulary(model_num) else name
    return resolved


def expand(config: SweepConfig) -> list[Cell]:
    """Every cell of the sweep, in order: one per distinct set of resolved settings.

    An exact duplicate (same resolved settings; values validation reads alike, such as ``cs_num: 1`` and ``"1"``,
    resolve to one) is run once, with a warning. Two different cells that would share a folder (values whose
    folder spelling is the same) are an error."""
    cells, seen, folders = [], {}, {}
    combos = [dict(zip(g, values)) for g in config.grids for values in itertools.product(*g.values())]
    n_grid, skipped = len(combos), []
    for i, combo in enumerate(combos + [dict(c) for c in config.cells]):
        params = {**config.parameters, **combo}
        cell = Cell(params, notebook_defaults(config.notebooks, params.get("feature_name")), dict(config.parameters))
        if i < n_grid and not _expressible(cell.resolved):  # a product grid's ORDER BY x CS1, say: not a cell
            skipped.append(cell.label)
            continue
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
    if skipped:
        warnings.warn(f"sweep {config.name}: {len(skipped)} grid combinations pair a feature with a command set that "
                      f"cannot express it and are skipped (e.g. {skipped[0]}); list one under cells: to run it anyway",
                      stacklevel=2)
    return cells


def _expressible(resolved: dict) -> bool:
    """Whether the cell's command set can express its feature (ORDER BY needs CS2-3, aggregates CS3). Unknown
    features and command sets count as expressible: validation records them as failed cells, naming the choices."""
    from helpers.tinysql.pairs import parse_feature

    try:
        feature = parse_feature(resolved.get("feature_name"))
        cs = int(str(resolved.get("cs_num")).strip())
    except (ValueError, TypeError):
        return True
    return cs not in (0, 1, 2, 3) or cs in feature.command_sets


def read_marker(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else {}


def _ran_before_word_sets(marker: dict) -> bool:
    """A marker of a run from before the ``vocabulary`` setting (its recorded settings lack it): the suite's words."""
    recorded = marker.get("resolved")  # (the oldest markers record ``params`` only: older still)
    return "vocabulary" not in recorded if isinstance(recorded, dict) else isinstance(marker.get("params"), dict)


def _word_set(cell: Cell) -> str | None:
    """The word set ``cell`` runs (None where its setting is unknown: validation fails the cell)."""
    from helpers.tinysql.word_sets import resolve_vocabulary

    try:
        return resolve_vocabulary(cell.resolved.get("vocabulary"), cell.resolved.get("model_num"))
    except ValueError:
        return None


def marker_matches(marker: dict | None, cell: Cell) -> bool:
    """Whether a marker was written for ``cell``'s settings (by hash; an older marker through its params)."""
    if not marker:
        return False
    if _ran_before_word_sets(marker) and _word_set(cell) != "suite":
        return False  # (the same hash: a hub model's unset word set meant the suite's words then, upstream's now)
    if pairs_changed_since(marker.get("pairs_version"), cell.resolved):
        return False  # (the same hash: the pair generator has changed these settings' pairs since)
    if "params_hash" in marker:
        if marker["params_hash"] == cell.params_hash:
            return True
        # written before spellings were resolved (cs_num "1", say): the same settings if its full resolved settings,
        # spelt once, hash to this cell's (its own record of the defaults then, not today's)
        recorded = marker.get("resolved")
        return isinstance(recorded, dict) and params_hash(spelled_once(recorded)) == cell.params_hash
    if isinstance(marker.get("params"), dict):  # written before the hash: its params were the explicit ones
        return params_hash(resolve(marker["params"], cell.defaults)) == cell.params_hash
    return False


def _model_folder(cell: Cell) -> Path | None:
    """The local folder ``cell`` loads (an embedded model, a local ``model_path``), or None (a hub id, settings that
    name no model). A relative ``model_path`` is read from the repository root, where the notebooks run."""
    from helpers.models.registry import resolve_model

    r = cell.resolved
    try:
        spec = resolve_model(r.get("model_num"), r.get("cs_num"), r.get("semantic", True), r.get("model_path"),
                             embedded_family=r.get("embedded_family", "llama"))
    except (ValueError, TypeError):
        return None
    folder = Path(spec.model_id).expanduser()
    if not folder.is_absolute():
        folder = REPO / folder
    return folder if folder.is_dir() else None


def _stat_key(folder: Path) -> tuple | None:
    try:
        return tuple(sorted((p.name, st.st_mtime_ns, st.st_size) for p in folder.iterdir() if p.is_file()
                            for st in [p.stat()]))
    except OSError:
        return None


@functools.lru_cache(maxsize=64)
def _hash(folder: str, files: tuple, scheme: str) -> str | None:
    """The ``scheme`` hash of a folder in the state ``files`` describes (the earlier whole-folder one is computed
    only for results that recorded it)."""
    from helpers.experiments.result_json import folder_fingerprint, weights_fingerprint

    if scheme == "weights":
        return weights_fingerprint(folder)
    try:
        return folder_fingerprint(folder)
    except OSError:
        return None


def model_fingerprint(cell: Cell, scheme: str = "weights") -> str | None:
    """The content hash of the local folder ``cell`` loads, as its result JSON records it: ``metadata.model_weights``
    (weights, config and tokenizer: helpers.experiments.result_json.weights_fingerprint), or with ``scheme="folder"``
    the earlier ``metadata.model_revision`` (every file). None for a hub id (its revision is a setting). Cached while
    the folder's files keep their sizes and times."""
    folder = _model_folder(cell)
    key = _stat_key(folder) if folder is not None else None
    if key is None:
        return None
    return _hash(str(folder.resolve()), key, scheme)


@functools.lru_cache(maxsize=1024)
def _json_metadata(path: str, mtime_ns: int, size: int) -> dict:
    try:
        meta = json.loads(Path(path).read_text()).get("metadata")
    except (OSError, ValueError, AttributeError):
        return {}
    return meta if isinstance(meta, dict) else {}


def recorded_weights(cell_dir: Path, marker: dict) -> tuple[str | None, str]:
    """(hash, scheme) of the weights a finished run used: its ``_DONE.json``'s ``model_weights``; a marker written
    before that was recorded: its result JSON's ``metadata.model_weights``, else ``metadata.model_revision`` (the
    earlier whole-folder hash, ``scheme="folder"``). (None, "weights") where neither says."""
    if "model_weights" in marker:
        return marker["model_weights"], "weights"
    found = [cell_dir / marker["json"]] if isinstance(marker.get("json"), str) else find_results(cell_dir)
    try:
        st = found[0].stat()
    except (OSError, IndexError):
        return None, "weights"
    meta = _json_metadata(str(found[0]), st.st_mtime_ns, st.st_size)
    if meta.get("model_weights"):
        return meta["model_weights"], "weights"
    revision = meta.get("model_revision")
    if isinstance(revision, str) and revision.startswith("sha256:"):  # (a hub commit is no folder hash)
        return revision, "folder"
    return None, "weights"


def weights_match(cell_dir: Path, marker: dict, cell: Cell) -> bool:
    """False only where the recorded hash and the folder's hash now (same scheme) are both known and differ: the
    local model was retrained since the run."""
    recorded, scheme = recorded_weights(cell_dir, marker)
    if recorded is None:
        return True
    current = model_fingerprint(cell, scheme)
    return current is None or recorded == current


def is_finished(cell_dir: Path, cell: Cell | None = None) -> bool:
    """A result JSON and ``_DONE.json`` in ``cell_dir``; with ``cell``, the marker must be for its settings, and
    for the weights its local model folder holds now."""
    marker = read_marker(cell_dir / DONE)
    if marker is None or not find_results(cell_dir):
        return False
    if marker.get("json") and not (cell_dir / marker["json"]).is_file():
        return False
    return cell is None or done_is_own(cell_dir, marker, cell)


def folder_for(config: SweepConfig, cell: Cell) -> Path:
    """Where ``cell`` runs: its own folder, unless a ``_DONE.json`` or ``_RUNNING.json`` there belongs to other
    settings or to other weights of its local model; then ``<folder>_run-<hash of its settings>``, or where that is
    taken too ``<folder>_run-<hash of its settings and weights>``: no run overwrites another's result."""
    natural = config.root / cell.relpath
    candidates = [natural, natural.with_name(f"{natural.name}{ALT_PREFIX}{cell.params_hash[:10]}")]
    weights = model_fingerprint(cell)
    key = (hashlib.sha256(f"{cell.params_hash}|{weights}".encode()).hexdigest()[:10] if weights is not None
           else cell.params_hash[:10])
    if weights is not None:
        candidates.append(natural.with_name(f"{natural.name}{ALT_PREFIX}{key}"))
    for k in itertools.count(2):  # (all taken, as by results of older formats: numbered, never another's folder)
        for d in candidates:
            if free_for(d, cell):
                return d
        candidates = [natural.with_name(f"{natural.name}{ALT_PREFIX}{key}-{k}")]


def free_for(d: Path, cell: Cell) -> bool:
    """Whether ``cell`` may run in ``d``: no ``_RUNNING.json`` of other settings, no ``_DONE.json`` of other settings
    or of other weights of its local model."""
    running, done = read_marker(d / RUNNING), read_marker(d / DONE)
    if running is not None and not marker_matches(running, cell):
        return False
    return done is None or done_is_own(d, done, cell)


def done_is_own(d: Path, done: dict, cell: Cell) -> bool:
    """Whether the ``_DONE.json`` ``done`` in ``d`` is ``cell``'s (its settings, its local model's weights now): no
    other may be replaced by a run of ``cell``."""
    return marker_matches(done, cell) and weights_match(d, done, cell)


def dir_label(config: SweepConfig, d: Path) -> str:
    try:
        return " / ".join(d.relative_to(config.root).parts)
    except ValueError:
        return str(d)


@dataclass
class Outcome:
    cell: Cell
    # "ok", "failed", "skipped" (finished earlier), "not run" (left out by ``only``, or not started before a stop),
    # "interrupted" (stopped by a signal while running), "running elsewhere" (a live process holds its _RUNNING.json)
    status: str
    dir: Path
    duration_s: float = 0.0
    error: str | None = None
