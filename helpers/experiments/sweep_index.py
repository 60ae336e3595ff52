"""The sweep's index: ``index.md``, ``index.html``, ``summary.json`` and the overview figure."""
from __future__ import annotations

import datetime as _dt
import html
from pathlib import Path

from helpers.experiments import plotting
from helpers.experiments.atomic_files import atomic_write_json, atomic_write_text
from helpers.experiments.result_json import load_results, top_heads_from_json
from helpers.experiments.results import CIRCUIT_FIGURES, figure_base, find_results
from helpers.experiments.sweep_cells import (
    DONE, EXECUTED_SUFFIX, FAILED, INTERRUPTED, RUNNING, Outcome, SweepConfig, dir_label, is_finished, marker_matches,
    model_label, read_marker,
)


def _cell_row(config: SweepConfig, out: Outcome) -> dict:
    d = out.dir
    row = dict(cell=dir_label(config, d), model=model_label(out.cell.resolved), cs=out.cell.params.get("cs_num"),
               feature=out.cell.feature, status=out.status, error=out.error, duration_s=round(out.duration_s, 1),
               dir=str(d.relative_to(config.root)) if d.is_relative_to(config.root) else str(d),
               params=out.cell.params, params_hash=out.cell.params_hash)
    if out.status == "skipped":
        row["status"] = "done (earlier)"
    failed = read_marker(d / FAILED)
    if out.status not in ("failed", "running elsewhere") and not is_finished(d, out.cell):
        if failed is not None and marker_matches(failed, out.cell):
            row["status"] = "failed"
        elif (d / INTERRUPTED).is_file() or (d / RUNNING).is_file():
            row["status"] = "interrupted"  # stopped or killed while running (or running now, in another sweep)
        else:
            row["status"] = "not run"
    if row["status"] == "failed" and row["error"] is None and failed is not None:
        row["error"] = failed.get("error")
    notebooks = sorted(d.glob(f"*{EXECUTED_SUFFIX}"))
    row["notebook"] = str(notebooks[0].relative_to(config.root)) if notebooks else None
    found = []
    row["ran_on"] = None
    if row["status"] in ("ok", "done (earlier)"):
        done = read_marker(d / DONE) or {}
        if done.get("host"):  # which machine (and Ray node) and GPUs ran the cell
            node = f" (Ray node {done['node'][:8]})" if done.get("node") else ""
            row["ran_on"] = f"{done['host']}{node}" + (f" GPU {','.join(done['gpus'])}" if done.get("gpus") else "")
        named = d / done["json"] if isinstance(done.get("json"), str) else None
        found = [named] if named is not None and named.is_file() else find_results(d)
    row["json"] = row["heatmap"] = row["accuracy"] = row["k80"] = None
    row["top_heads"], row["scores"], row["circuit_figures"] = [], None, {}
    if found:
        try:
            row.update(_result_part(config, found[0]))
        except Exception as err:  # noqa: BLE001 - one unreadable result must not cost the index of every cell
            row["error"] = f"result JSON unreadable: {type(err).__name__}: {err}"[:300]
    return row


def _result_part(config: SweepConfig, path: Path) -> dict:
    """What the index shows of one result JSON (raises where it is not one)."""
    data = load_results(path)
    meta = data["metadata"]
    part = dict(json=str(path.relative_to(config.root)), accuracy=meta.get("clean_accuracy"),
                n_clean_correct=meta.get("n_clean_correct"), n_examples=meta.get("n_examples"),
                top_heads=top_heads_from_json(data, 3), scores=data["scores"], circuit_figures={}, k80=None)
    heat = Path(f"{figure_base(path)}.html")
    part["heatmap"] = str(heat.relative_to(config.root)) if heat.is_file() else None
    faith = (data.get("circuit") or {}).get("faithfulness") or {}
    if faith:  # the circuit section ran: smallest k reaching 80 %, and its figures
        part["k80"] = {"sufficiency": faith.get("k80_sufficiency"), "necessity": faith.get("k80_necessity")}
        for name in CIRCUIT_FIGURES:
            page = Path(f"{figure_base(path, name)}.html")
            if page.is_file():
                part["circuit_figures"][name] = str(page.relative_to(config.root))
    return part


def _link(path: str | None, text: str) -> str:
    return f"[{text}]({path})" if path else "-"


def _figure_links(figures: dict, link) -> str:
    """The circuit figures a cell has, as links (``link(path, text)``), or "-"."""
    return ", ".join(link(figures[n], n) for n in CIRCUIT_FIGURES if n in figures) or "-"


def write_summary(config: SweepConfig, outcomes: list[Outcome]) -> dict[str, Path]:
    """``index.md``, ``index.html``, ``summary.json`` and the overview figure in the sweep's folder."""
    rows = [_cell_row(config, o) for o in outcomes]
    root = config.root

    def heads_text(r) -> str:
        return ", ".join(f"{h['head']}@{h['label']} ({h['mean']:+.2f}, n={h['n']})" for h in r["top_heads"]) or "-"

    def k80_text(r) -> str:
        k = r.get("k80")
        return "-" if not k else f"{k['sufficiency'] or '>max'} / {k['necessity'] or '>max'}"

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
    md += ["| cell | status | clean accuracy | top heads (head@token: mean, examples) | k for 80 % (sufficiency / "
           "necessity) | notebook | heatmap | circuit figures | ran on | error |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        err = (r["error"] or "").replace("|", "\\|").replace("\n", " ")[:300]
        md.append(f"| {r['cell']} | {r['status']} | {acc_text(r)} | {heads_text(r)} | {k80_text(r)} | "
                  f"{_link(r['notebook'], 'notebook')} | {_link(r['heatmap'], 'heatmap')} | "
                  f"{_figure_links(r['circuit_figures'], _link)} | {r['ran_on'] or '-'} | {err} |")
    paths["md"] = atomic_write_text(root / "index.md", "\n".join(md) + "\n")

    def a(path, text):
        return f'<a href="{html.escape(path)}">{text}</a>' if path else "-"

    trs = "\n".join(
        f"<tr class='{html.escape(r['status'].split()[0])}'><td>{html.escape(r['cell'])}</td><td>{html.escape(r['status'])}</td>"
        f"<td>{acc_text(r)}</td><td>{html.escape(heads_text(r))}</td><td>{html.escape(k80_text(r))}</td>"
        f"<td>{a(r['notebook'], 'notebook')}</td><td>{a(r['heatmap'], 'heatmap')}</td>"
        f"<td>{_figure_links(r['circuit_figures'], a)}</td><td>{a(r['json'], 'json')}</td>"
        f"<td>{html.escape(r['ran_on'] or '-')}</td>"
        f"<td>{html.escape((r['error'] or '')[:500])}</td></tr>" for r in rows)
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>Sweep {html.escape(config.name)}</title>
<style>body{{font-family:sans-serif}} table{{border-collapse:collapse}} td,th{{border:1px solid #ccc;padding:3px 6px;
font-size:13px}} tr.failed{{background:#fdd}} tr.not{{background:#eee}} tr.interrupted{{background:#ffe8c0}}</style></head><body>
<h1>Sweep {html.escape(config.name)}</h1><p>{len(rows)} cells: {n_ok} done, {n_failed} failed. Updated {stamp}.</p>
{'<p><a href="overview.html">Overview figure</a>: per cell, each head&#39;s mean score at its strongest position.</p>' if fig is not None else ''}
<table><tr><th>cell</th><th>status</th><th>clean accuracy</th><th>top heads (head@token: mean, examples)</th>
<th>k for 80 % (sufficiency / necessity)</th><th>notebook</th><th>heatmap</th><th>circuit figures</th><th>JSON</th><th>ran on</th><th>error</th></tr>
{trs}
</table></body></html>
"""
    paths["html"] = atomic_write_text(root / "index.html", page)
    summary = [{k: v for k, v in r.items() if k != "scores"} for r in rows]
    paths["json"] = atomic_write_json(root / "summary.json", {"name": config.name, "updated": stamp,
                                                                  "cells": summary})
    return paths
