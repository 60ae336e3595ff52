"""Heatmaps of head-patching scores, as in the original notebook: rows ``L{l}_H{h}``, columns ``{tok}_{i}``,
``RdBu`` with the colour midpoint at 0 (red: patching the clean head output moves the corrupt run *away*
from the clean answer; blue: towards it; 1 = fully restored).

Every figure can be drawn from an :class:`helpers.experiments.experiment.ExperimentResult` or re-drawn from any saved
JSON (:func:`plot_saved`). :func:`save_figure` writes HTML that works offline (it links a ``plotly.min.js`` written
once per folder tree, see :func:`plotlyjs_src`) and a PNG when kaleido can run (it needs Chrome); otherwise it
says so once and goes on.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import plotly.express as px
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from helpers.experiments.atomic_files import atomic_write_bytes, atomic_write_text
from helpers.experiments.result_json import load_results

COLOR_LABEL = "Norm. Logit Diff"
PLOTLY_JS = "plotly.min.js"


def setup_renderer() -> str:
    """Colab's renderer inside Colab; elsewhere the JupyterLab mime type plus a CDN-linked HTML fallback
    (keeps executed notebooks small: plotly.js is not embedded in each one)."""
    import plotly.io as pio

    pio.renderers.default = "colab" if "google.colab" in sys.modules else "plotly_mimetype+notebook_connected"
    return pio.renderers.default


def head_labels(n_layers: int, n_heads: int) -> list[str]:
    return [f"L{l}_H{h}" for l in range(n_layers) for h in range(n_heads)]


def heatmap(scores, position_labels=None, title: str = "Layer-Head Patching Analysis",
            color_label: str = COLOR_LABEL, midpoint: float | None = 0.0, scale: str = "RdBu",
            zmin=None, zmax=None) -> go.Figure:
    """A [layer, head, pos] array as a heatmap: rows ``L{l}_H{h}``, columns ``position_labels`` (else pos_i).

    NaN cells (no value) stay blank. ``midpoint=None`` for non-negative values such as a std.
    """
    scores = np.asarray(scores, dtype=np.float64)
    n_layers, n_heads, n_pos = scores.shape
    labels = list(position_labels) if position_labels is not None else [f"pos_{i}" for i in range(n_pos)]
    labels = (labels + [f"pos_{i}" for i in range(len(labels), n_pos)])[:n_pos]
    rows = head_labels(n_layers, n_heads)
    kwargs = dict(color_continuous_scale=scale, zmin=zmin, zmax=zmax)
    if midpoint is not None:
        kwargs["color_continuous_midpoint"] = midpoint
    fig = px.imshow(scores.reshape(n_layers * n_heads, n_pos), x=labels, y=rows, title=title, aspect="auto",
                    labels={"x": "Position", "y": "Layer_Head", "color": color_label}, **kwargs)
    fig.update_layout(
        xaxis_tickangle=-45, margin=dict(b=120, l=110, t=90),
        xaxis=dict(tickmode="array", tickvals=labels, ticktext=labels, tickfont=dict(size=10)),
        yaxis=dict(tickmode="array", tickvals=rows, ticktext=rows, tickfont=dict(size=10), title="Layer_Head"),
        height=max(420, 160 + 16 * len(rows)),
    )
    return fig


def _title(what: str, meta: dict) -> str:
    flags = (f"novel={meta.get('use_novel_names')} syn_table={meta.get('use_synonyms_table')} "
             f"syn_field={meta.get('use_synonyms_field')}")
    if meta.get("vocabulary"):
        flags += f" | {meta['vocabulary']} words"
    n = meta.get("n_included", meta.get("batch_size"))
    model = meta.get("model_name", meta.get("model_num"))
    if meta.get("model_path_override"):  # the slot's name, and the folder or hub id that stood in for it
        model = f"{model} (from {meta['model_path_override']})"
    return f"{what}: {meta.get('feature_name', '?')} | {model} CS{meta.get('commandset')} | {flags} | n={n}"


def _meta(exp) -> dict:
    s = exp.settings
    return dict(feature_name=exp.feature.value, model_name=exp.spec.name, model_path_override=s.model_path,
                commandset=s.cs_num, use_novel_names=s.use_novel_names, use_synonyms_table=s.use_synonyms_table,
                use_synonyms_field=s.use_synonyms_field, vocabulary=getattr(s, "vocabulary", None),
                n_included=int(exp.patching.included.sum()))


def mean_heatmap(exp) -> go.Figure:
    """Mean normalised score over the included examples, aligned at their last token (``*``: examples differ)."""
    return heatmap(exp.mean(), exp.token_labels(), title=_title("Mean over examples", _meta(exp)))


def spread_heatmap(exp) -> go.Figure:
    """Sample standard deviation over the included examples (blank where fewer than two have a value)."""
    return heatmap(exp.std(), exp.token_labels(), title=_title("Std over examples", _meta(exp)),
                   color_label="Std of norm. logit diff", midpoint=None, scale="Viridis")


def example_heatmaps(exp, max_examples: int = 6, cols: int = 2) -> go.Figure:
    """Small multiples: each example's own scores (rows L_H, columns its positions), one shared colour scale."""
    p = exp.patching
    shown = [i for i in range(len(exp.pairs)) if bool(p.included[i])][:max_examples]
    if not shown:
        fig = go.Figure()
        fig.update_layout(title="No included example (every clean prediction was wrong?)")
        return fig
    geo_rows = head_labels(*np.asarray(p.normalised).shape[1:3])
    rows_n = -(-len(shown) // cols)
    titles = [f"ex {i}: {exp.pairs[i].clean_word}→{exp.pairs[i].corrupt_word}" for i in shown]
    fig = make_subplots(rows=rows_n, cols=cols, subplot_titles=titles, horizontal_spacing=0.06,
                        vertical_spacing=0.12 / max(1, rows_n - 1) if rows_n > 1 else 0.1)
    for k, i in enumerate(shown):
        n = len(exp.pairs[i].clean_ids)
        z = np.asarray(p.normalised[i], dtype=np.float64)[..., :n].reshape(len(geo_rows), n)
        fig.add_trace(go.Heatmap(z=z, y=geo_rows, x=[f"{t.strip()}_{j}" for j, t in enumerate(exp.tokens[i])],
                                 coloraxis="coloraxis"), row=k // cols + 1, col=k % cols + 1)
    fig.update_layout(coloraxis=dict(colorscale="RdBu", cmid=0.0, colorbar_title=COLOR_LABEL),
                      title=_title("Per example", _meta(exp)), height=max(440, 400 * rows_n))
    # each example's own tokens under its columns, small and upright (~60 a panel); hover names them too
    fig.update_xaxes(tickfont=dict(size=7), tickangle=-90, dtick=1)
    fig.update_yaxes(tickfont=dict(size=8))
    return fig


def plot_saved(path_or_data, what: str = "mean") -> go.Figure:
    """Re-draw a saved result JSON (this suite's or the original notebook's): ``what`` = "mean" or "std"."""
    data = load_results(path_or_data) if isinstance(path_or_data, (str, os.PathLike)) else path_or_data
    meta = data["metadata"]
    scores = np.array(data["patching_results"] if what == "mean" else data["patching_std"], dtype=np.float64)
    scores = scores.reshape(meta["n_layers"], meta["n_heads"], meta["n_positions"])
    labels = data.get("position_labels")
    if what == "mean":
        return heatmap(scores, labels, title=_title("Mean over examples", meta))
    return heatmap(scores, labels, title=_title("Std over examples", meta), color_label="Std", midpoint=None,
                   scale="Viridis")


def overview_figure(rows: list[dict], title: str = "Top heads across models × command sets × features"):
    """One row per sweep cell (``label``), one column per head: the head's mean score at the position where its
    |mean| is largest (signed).

    ``rows``: dicts with ``label`` and ``scores`` ([layer, head, pos] array); heads missing from a model are
    blank. Returns None when there is nothing to draw.
    """
    rows = [r for r in rows if r.get("scores") is not None]
    if not rows:
        return None
    per_head, heads = [], []
    for r in rows:
        s = np.asarray(r["scores"], dtype=np.float64)
        idx = np.argmax(np.nan_to_num(np.abs(s), nan=-1.0), axis=-1)
        best = np.take_along_axis(s, idx[..., None], axis=-1)[..., 0]  # signed value at max |value|
        labels = head_labels(*s.shape[:2])
        per_head.append(dict(zip(labels, best.ravel())))
        heads += [h for h in labels if h not in heads]
    # layer-major across models of different sizes (first-seen order put L0_H4 after L1_H3)
    heads.sort(key=lambda label: tuple(int(n) for n in label[1:].split("_H")))
    z = np.array([[d.get(h, np.nan) for h in heads] for d in per_head], dtype=np.float64)
    fig = go.Figure(go.Heatmap(z=z, x=heads, y=[r["label"] for r in rows], colorscale="RdBu", zmid=0.0,
                               colorbar=dict(title="mean at its<br>strongest position")))
    fig.update_layout(title=title, xaxis_tickangle=-45, height=max(400, 140 + 22 * len(rows)),
                      margin=dict(l=260, b=110), yaxis=dict(autorange="reversed"))
    return fig


# --------------------------------------------------------------------------------------------- saving

_png_unavailable: str | None = None


def write_plotlyjs(folder: str | Path) -> Path:
    """``folder/plotly.min.js`` (written once) for the offline HTML figures in and below ``folder``."""
    from plotly.offline import get_plotlyjs

    target = Path(folder) / PLOTLY_JS
    return target if target.is_file() else atomic_write_text(target, get_plotlyjs())


def plotlyjs_src(html_path: Path) -> str:
    """Relative path to a ``plotly.min.js`` in the HTML's folder or an ancestor up to 5 levels (a sweep writes
    one at its root), else one written beside the HTML: offline figures without a copy of plotly.js each."""
    folder = html_path.parent.resolve()
    for up in [folder, *folder.parents][:6]:
        if (up / PLOTLY_JS).is_file():
            return os.path.relpath(up / PLOTLY_JS, folder).replace(os.sep, "/")
    return write_plotlyjs(folder).name


def save_figure(fig: go.Figure, base: str | Path, png: bool = True) -> dict[str, Path]:
    """Write ``base.html`` (atomic, offline) and, if possible, ``base.png``; returns the paths written.

    PNG export needs kaleido *and* a Chrome/Chromium; when that fails the reason is printed once per process.
    """
    global _png_unavailable
    base = Path(base)
    base.parent.mkdir(parents=True, exist_ok=True)
    html_path = base.with_name(base.name + ".html")
    out = {"html": atomic_write_text(html_path, fig.to_html(include_plotlyjs=plotlyjs_src(html_path),
                                                           full_html=True))}
    if png and _png_unavailable is None:
        try:
            out["png"] = atomic_write_bytes(base.with_name(base.name + ".png"), fig.to_image(format="png", scale=1, width=fig.layout.width or 1400))
        except Exception as err:  # kaleido missing, or no Chrome for kaleido 1.x
            _png_unavailable = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
            print(f"PNG export skipped (HTML written): {_png_unavailable.rstrip('.')}. Kaleido 1.x needs Chrome or "
                  "Chromium: `apt-get install chromium` or `plotly_get_chrome` gives PNGs.")
    return out
