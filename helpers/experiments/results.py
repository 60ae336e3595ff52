"""Result files: their names (model, command set, feature, flags, batch size and seed, so runs with different
settings never overwrite each other; a rerun of the same settings replaces its file atomically), finding them, and
saving an experiment as its JSON (format: :mod:`helpers.experiments.result_json`) and heatmaps."""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

from helpers.circuits import figures as circuit_figures
from helpers.experiments import plotting
from helpers.experiments.atomic_files import atomic_write_json
from helpers.experiments.result_json import experiment_to_dict

PREFIX = "activation_patching"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("_") or "x"


def file_stem(settings, spec) -> str:
    """``activation_patching_{model}_cs{n}_{FEATURE}_novel_names.{b}.table.{b}.field.{b}_batch{n}_seed{s}[_{dtype}]``
    and, where set, ``_keepincorrect``, ``_nocircuit``, the word set and the novel words.

    ``model`` is the registry's display name; a ``model_path`` override adds a short hash of the path so
    two folders with the same name do not collide. (The device is not named: the same settings on another device
    give the same result, to rounding, and replace it.)
    """
    model = spec.name
    if getattr(spec, "overridden", False):
        model += "-" + hashlib.sha256(str(spec.model_id).encode()).hexdigest()[:8]
    stem = (f"{PREFIX}_{model}_cs{settings.cs_num}_{settings.feature_name}"
            f"_novel_names.{settings.use_novel_names}.table.{settings.use_synonyms_table}"
            f".field.{settings.use_synonyms_field}_batch{settings.batch_size}_seed{settings.seed}")
    if settings.dtype != "float32":
        stem += f"_{settings.dtype}"
    if settings.keep_incorrect:
        stem += "_keepincorrect"
    if not getattr(settings, "circuit", True):  # (a run without the circuit section must not replace one with it)
        stem += "_nocircuit"
    from helpers.tinysql.word_sets import default_vocabulary

    vocabulary = getattr(settings, "vocabulary", None)
    # upstream's words are always named (hub results from before word sets used the suite's words, under the
    # bare name); the suite's only where it is not the model's own
    if vocabulary and (vocabulary == "upstream" or vocabulary != default_vocabulary(settings.model_num)):
        stem += f"_{vocabulary}words"
    if settings.use_novel_names and getattr(settings, "novel_words", "trained") != "trained":
        stem += f"_novel-{settings.novel_words}"
    return _slug(stem)


def find_results(folder: str | Path) -> list[Path]:
    """The result JSON files in ``folder`` (not recursive), newest first."""
    files = [p for p in Path(folder).glob(f"{PREFIX}_*.json") if p.is_file()]
    return sorted(files, key=lambda p: p.stat().st_mtime, reverse=True)


def figure_base(json_path: str | Path, kind: str = "heatmap") -> Path:
    """Where a result's figure lives, without extension: ``<stem>.heatmap`` (mean) or ``<stem>.spread``."""
    json_path = Path(json_path)
    return json_path.with_name(f"{json_path.stem}.{kind}")


def default_output_dir() -> Path:
    """``outputs/notebooks`` of this checkout when the package runs from one (it is git-ignored), else ./outputs."""
    repo = Path(__file__).resolve().parents[2]
    if (repo / "pyproject.toml").is_file() and (repo / "notebooks").is_dir():  # a checkout, not site-packages
        return repo / "outputs" / "notebooks"
    return Path("outputs")


#: the circuit section's figures, each saved as ``<stem>_<name>.html`` (helpers.circuits.figures)
CIRCUIT_FIGURES = ("faithfulness", "attention", "circuit")


def save_experiment(exp, output_dir: str | Path | None = None, figures: bool = True,
                    png: bool = True) -> dict[str, Path]:
    """Write the JSON (and, with ``figures``, the mean and spread heatmaps as HTML, plus PNG when possible, and
    where the circuit section ran its faithfulness, attention and edge figures as HTML) into ``output_dir`` (None:
    :func:`default_output_dir`); returns the paths written."""
    out = Path(output_dir) if output_dir not in (None, "") else default_output_dir()
    json_path = out / f"{file_stem(exp.settings, exp.spec)}.json"
    data = experiment_to_dict(exp)
    paths = {"json": atomic_write_json(json_path, data)}
    if figures:
        drawn = [("heatmap", plotting.mean_heatmap(exp)), ("spread", plotting.spread_heatmap(exp))]
        if data["circuit"] is not None:
            drawn += [("faithfulness", circuit_figures.faithfulness_figure(data["circuit"])),
                      ("attention", circuit_figures.attention_roles_figure(data["circuit"])),
                      ("circuit", circuit_figures.circuit_graph_figure(
                          data["circuit"], data["metadata"]["n_layers"], data.get("position_labels")))]
        for kind, fig in drawn:
            if fig is None:
                continue
            # PNG (a Chrome start per figure, ~1 s) for the heatmaps only; the circuit figures are HTML
            written = plotting.save_figure(fig, figure_base(json_path, kind), png=png and kind in ("heatmap", "spread"))
            paths.update({(k if kind == "heatmap" else f"{kind}_{k}"): v for k, v in written.items()})
    return paths
