"""The result JSON: what :func:`experiment_to_dict` writes and :func:`load_results` reads back.

The JSON keeps every key of the original notebook's file (``metadata`` with ``source``, ``timestamp``,
``model_num``, ``model_hf``, ``commandset``, the three flags, ``num_sql_fields``, ``batch_size``,
``n_positions``, ``n_layers``, ``n_heads``; ``patching_results`` [layer][head][position], the *mean* over the
included examples, aligned at their last token; ``clean_tokens``; ``clean_logit_diff``; ``corrupt_logit_diff``),
so the original's ``load_and_plot_results`` still reads it. It adds the feature, seed, model id and revision,
package versions and timestamps to ``metadata``, the spread (``patching_std``, ``patching_count``), column labels
and one record per example (prompts, token indices and ids, logit differences, its own [layer][head][position]
scores on its own token indices). NaN (no value) is written as JSON ``null``.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import platform
from pathlib import Path

import numpy as np

FORMAT_VERSION = 2


SOURCE = "tinysql-patching helpers.experiments.experiment"


def to_jsonable(values):
    """Array/tensor/nested list -> nested lists of float, NaN and ±inf -> None."""
    if hasattr(values, "detach"):
        values = values.detach().float().cpu().numpy()
    arr = np.asarray(values, dtype=np.float64)
    return np.where(np.isfinite(arr), arr, None).tolist()


def _float_or_none(x) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def package_versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "nnsight", "tinysql-patching"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    out["tinysql-patching-commit"] = suite_commit()
    return out


def suite_commit() -> str | None:
    """The suite's git commit (``<sha>-dirty`` with uncommitted changes to tracked files); None outside a git
    checkout. The package version alone does not change between commits."""
    import subprocess

    root = Path(__file__).resolve().parents[2]
    try:
        top = subprocess.run(["git", "-C", str(root), "rev-parse", "--show-toplevel"], capture_output=True, text=True,
                             timeout=10).stdout.strip()
        if not top or Path(top).resolve() != root:  # (installed inside another checkout: not the suite's commit)
            return None
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10).stdout.strip()
        if not sha:
            return None
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return sha + ("-dirty" if dirty else "")


def folder_fingerprint(model_id: str, max_bytes: int = 1 << 30) -> str | None:
    """``sha256:<12 hex>`` over a local folder's config and weight files (None for hub ids or > max_bytes)."""
    folder = Path(str(model_id)).expanduser()
    if not folder.is_dir():
        return None
    files = sorted(p for p in folder.iterdir() if p.is_file() and
                   (p.suffix in (".safetensors", ".bin", ".json") or p.name == "tokenizer.model"))
    if sum(p.stat().st_size for p in files) > max_bytes:
        return None
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return "sha256:" + h.hexdigest()[:12]


# The files of a model folder that change what a run computes (weights, architecture, tokenizer), not its notes
# (training_meta.json, a README): editing those must not make a finished result look like another model's.
_WEIGHT_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
                 "merges.txt", "special_tokens_map.json", "added_tokens.json")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf")
WEIGHTS_SCHEME = "sha256w:"


def weights_fingerprint(model_id: str, max_bytes: int = 4 << 30) -> str | None:
    """``sha256w:<16 hex>`` over a local folder's weights, config and tokenizer files (None for hub ids, a folder
    without weights, one over ``max_bytes`` or one that cannot be read): the sweep's test of "the same model"."""
    folder = Path(str(model_id)).expanduser()
    try:
        if not folder.is_dir():
            return None
        files = sorted(p for p in folder.iterdir() if p.is_file() and
                       (p.name in _WEIGHT_FILES or p.name.endswith(_WEIGHT_SUFFIXES)))
        if not any(p.name.endswith(_WEIGHT_SUFFIXES) for p in files) or \
                sum(p.stat().st_size for p in files) > max_bytes:
            return None
        h = hashlib.sha256()
        for p in files:
            h.update(p.name.encode() + b"\0")
            with p.open("rb") as f:
                for block in iter(lambda: f.read(1 << 22), b""):
                    h.update(block)
            h.update(b"\0")
    except OSError:  # (a file removed while a training run rewrites the folder)
        return None
    return WEIGHTS_SCHEME + h.hexdigest()[:16]


def _example_record(exp, i: int) -> dict:
    p = exp.patching
    record = exp.pairs[i].to_dict()
    record.update(
        index=i, n_positions=len(exp.pairs[i].clean_ids), column_offset=exp.offset(i),
        num_sql_fields=len(exp.pairs[i].clean_item.select),
        clean_tokens_text=exp.tokens[i], predicted_token_id=exp.predicted_ids[i],
        predicted_token=exp.decode(exp.predicted_ids[i]),
        clean_correct=bool(p.clean_correct[i]), included=bool(p.included[i]), guarded=bool(p.guarded[i]),
        clean_logit_diff=_float_or_none(p.clean_logit_diff[i]),
        corrupt_logit_diff=_float_or_none(p.corrupt_logit_diff[i]),
    )
    n = len(exp.pairs[i].clean_ids)  # drop the NaN padding past this example's end
    record["patching_results"] = to_jsonable(p.normalised[i][..., :n])
    record["patched_logit_diff"] = to_jsonable(p.patched_logit_diff[i][..., :n])
    return record


def experiment_to_dict(exp) -> dict:
    """The JSON document for an :class:`helpers.experiments.experiment.ExperimentResult`."""
    s, p, geo = exp.settings, exp.patching, exp.geometry
    mean = exp.mean()
    ref = exp.reference
    clean_diff, corrupt_diff = exp.mean_logit_diffs()
    n_flipped, n_flip_counted = exp.flips()
    finished = _dt.datetime.fromisoformat(exp.finished_at) if exp.finished_at else _dt.datetime.now(_dt.timezone.utc)

    metadata = {
        # the original notebook's keys
        "source": SOURCE,
        "timestamp": finished.strftime("%Y%m%d_%H%M%S"),
        "model_num": s.model_num,
        "model_hf": exp.spec.model_id,
        "commandset": s.cs_num,
        "use_novel_names": s.use_novel_names,
        "use_synonyms_table": s.use_synonyms_table,
        "use_synonyms_field": s.use_synonyms_field,
        "num_sql_fields": len(exp.pairs[ref].clean_item.select),
        "batch_size": s.batch_size,
        "n_positions": int(mean.shape[-1]),
        "n_layers": int(mean.shape[0]),
        "n_heads": int(mean.shape[1]),
        # added
        "format_version": FORMAT_VERSION,
        "feature_name": exp.feature.value,
        "vocabulary": s.vocabulary,
        "novel_words": s.novel_words if s.use_novel_names else None,
        "usable_words": ({"tables": len(exp.usable_words.tables), "of_tables": exp.usable_words.n_tables,
                          "fields": len(exp.usable_words.fields), "of_fields": exp.usable_words.n_fields}
                         if getattr(exp, "usable_words", None) is not None else None),
        "seed": s.seed,
        "semantic": exp.spec.semantic,
        "embedded_family": s.embedded_family if exp.spec.is_embedded else None,
        "model_name": exp.spec.name,
        "model_id": exp.spec.model_id,
        "model_revision": exp.model_info.get("revision"),
        "model_weights": exp.model_info.get("weights"),
        "model_path_override": s.model_path,
        "family": exp.model_info.get("family"),
        "d_head": getattr(geo, "d_head", None),
        "n_kv_heads": getattr(geo, "n_kv_heads", None),
        "dtype": exp.model_info.get("dtype"),
        "device": exp.model_info.get("device"),
        "sweep_devices": exp.model_info.get("sweep_devices"),  # the head sweep split across these (or null)
        "keep_incorrect": s.keep_incorrect,
        "n_examples": len(exp.pairs),
        "n_clean_correct": sum(exp.clean_correct),
        "n_included": int(p.included.sum()),
        # of n_flip_counted included examples (finite logit differences), those the corruption flips
        "n_flipped": n_flipped,
        "n_flip_counted": n_flip_counted,
        "clean_accuracy": exp.clean_accuracy,
        "reference_example": ref,
        "alignment": "examples aligned at their last token (the answer position); clean_tokens and position_labels "
                     "are the reference example's",
        "min_denominator": getattr(p, "min_denominator", None),
        "started_at": exp.started_at,
        "finished_at": exp.finished_at,
        "timings_s": {k: round(v, 3) for k, v in exp.timings.items()},
        "versions": package_versions(),
        "settings": s.to_dict(),
    }
    return {
        "metadata": metadata,
        "patching_results": to_jsonable(mean),
        "clean_tokens": list(exp.pairs[ref].clean_ids),
        # Scalars as in the original, now the mean over the included examples (per example below).
        "clean_logit_diff": clean_diff,
        "corrupt_logit_diff": corrupt_diff,
        "feature_name": exp.feature.value,
        "position_labels": exp.token_labels(),
        "patching_std": to_jsonable(exp.std()),
        "patching_count": np.asarray(exp.aligned.count()).tolist(),
        "generations": exp.generations,
        # the circuit section (helpers.circuits): receivers, faithfulness curves, attention; null when not run
        "circuit": exp.circuit.to_dict() if getattr(exp, "circuit", None) is not None else None,
        "examples": [_example_record(exp, i) for i in range(len(exp.pairs))],
    }


def load_results(path: str | Path) -> dict:
    """Read a result JSON (ours or the original notebook's); ``null`` scores come back as NaN in numpy arrays.

    Adds ``"scores"`` (np.ndarray [layer, head, pos]) and, where saved, ``"scores_std"``.
    """
    with open(path) as f:
        data = json.load(f)
    for key in ("metadata", "patching_results", "clean_logit_diff", "corrupt_logit_diff"):
        if key not in data:
            raise ValueError(f"{path}: not a patching result (missing {key!r})")
    data["scores"] = np.array(data["patching_results"], dtype=np.float64)
    if "patching_std" in data:
        data["scores_std"] = np.array(data["patching_std"], dtype=np.float64)
    return data


def top_heads_from_json(data: dict, k: int = 5) -> list[dict]:
    """The ``k`` cells of largest |mean| in a loaded result: dicts of head, position, label, mean and ``n``, the
    number of examples behind the mean (None for the original notebook's files). Columns that fewer than half
    of the examples reach (the first ones, with examples aligned at their end) are not ranked."""
    scores = data["scores"] if "scores" in data else np.array(data["patching_results"], dtype=np.float64)
    labels = data.get("position_labels") or [f"pos_{i}" for i in range(scores.shape[-1])]
    strength = np.nan_to_num(np.abs(scores), nan=-1.0)
    if "patching_count" in data:  # rank only cells that at least half of the examples reach
        count = np.array(data["patching_count"])
        strength[count < math.ceil(count.max(initial=0) / 2)] = -1.0
    flat = strength.ravel()
    out = []
    for idx in np.argsort(-flat, kind="stable")[:k]:
        if flat[idx] < 0:
            break
        layer, head, pos = np.unravel_index(idx, scores.shape)
        n = data["patching_count"][layer][head][pos] if "patching_count" in data else None
        out.append(dict(head=f"L{layer}_H{head}", position=int(pos), label=labels[pos],
                        mean=float(scores[layer, head, pos]), n=n))
    return out
