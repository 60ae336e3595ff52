"""Figures of the circuit section, drawn from the ``circuit`` object of a result (``CircuitResult.to_dict()`` or a
saved JSON's ``data["circuit"]``: one code path for a fresh run and a re-draw)."""
from __future__ import annotations

import plotly.graph_objects as go
from plotly.subplots import make_subplots


def _band(fig, x, mean, std, name, color, row=None, col=None):
    upper = [m + s if m is not None and s is not None else None for m, s in zip(mean, std)]
    lower = [m - s if m is not None and s is not None else None for m, s in zip(mean, std)]
    kw = {} if row is None else dict(row=row, col=col)
    fig.add_trace(go.Scatter(x=x + x[::-1], y=upper + lower[::-1], fill="toself", fillcolor=color, opacity=0.15,
                             line=dict(width=0), hoverinfo="skip", showlegend=False, name=name), **kw)


def faithfulness_figure(circuit: dict, title: str = "Faithfulness of the top cells") -> go.Figure:
    """Sufficiency and necessity of the top-k cells against k, with the random sets' sufficiency (mean ± std)."""
    f = circuit["faithfulness"]
    k = f["k"]
    fig = go.Figure()
    _band(fig, k, f["random_sufficiency_mean"], f["random_sufficiency_std"], "random", "gray")
    _band(fig, k, f["sufficiency"], f["sufficiency_std"], "sufficiency", "royalblue")
    fig.add_trace(go.Scatter(x=k, y=f["sufficiency"], mode="lines+markers", name="sufficiency (top k patched into "
                             "corrupt)", line=dict(color="royalblue")))
    fig.add_trace(go.Scatter(x=k, y=f["necessity"], mode="lines+markers", name="necessity (top k removed from clean)",
                             line=dict(color="firebrick")))
    fig.add_trace(go.Scatter(x=k, y=f["random_sufficiency_mean"], mode="lines", name=f"random k cells "
                             f"(sufficiency, {f['n_random']} draws)", line=dict(color="gray", dash="dash")))
    fig.add_hline(y=0.8, line=dict(color="black", dash="dot", width=1), annotation_text="80 %")
    k80 = f"smallest k reaching 80 %: sufficiency {f['k80_sufficiency']}, necessity {f['k80_necessity']}"
    fig.update_layout(title=f"{title}<br><sup>{k80}</sup>", xaxis_title="k (top cells of the head sweep)",
                      yaxis_title="share of the clean-corrupt gap", height=450, width=900,
                      legend=dict(orientation="h", y=-0.25))
    return fig


def attention_roles_figure(circuit: dict, title: str = "Where the top heads look") -> go.Figure | None:
    """One panel per (head, query): attention mass by role, clean against corrupt, mean over examples."""
    heads = circuit.get("attention") or []
    if not heads:
        return None
    roles: list[str] = []
    for h in heads:
        for side in ("clean", "corrupt"):
            roles += [r for r in h["by_role"][side] if r not in roles]
    fig = make_subplots(rows=len(heads), cols=1, shared_xaxes=True, vertical_spacing=0.06,
                        subplot_titles=[f"L{h['layer']}H{h['head']} from the {h['query']} position" for h in heads])
    for i, h in enumerate(heads, start=1):
        for side, color in (("clean", "royalblue"), ("corrupt", "darkorange")):
            fig.add_trace(go.Bar(x=roles, y=[h["by_role"][side].get(r, 0.0) for r in roles], name=side,
                                 marker_color=color, showlegend=i == 1), row=i, col=1)
    fig.update_layout(title=title, barmode="group", height=220 * len(heads) + 120, width=900,
                      yaxis_title="attention")
    return fig


def attention_example_figure(circuit: dict, tokens: list[str], example: int = 0) -> go.Figure | None:
    """Every top head's attention over one example's tokens (clean and corrupt rows), from its query position."""
    heads = circuit.get("attention") or []
    if not heads:
        return None
    z, labels = [], []
    for h in heads:
        for side in ("clean", "corrupt"):
            row = h[side][example]
            z.append(row + [None] * (len(tokens) - len(row)))
            labels.append(f"L{h['layer']}H{h['head']} {h['query']} {side}")
    fig = go.Figure(go.Heatmap(z=z, x=[f"{t}_{i}" for i, t in enumerate(tokens)], y=labels, colorscale="Blues",
                               zmin=0, colorbar=dict(title="attention")))
    fig.update_layout(title="Attention of the top heads over one example", height=140 + 28 * len(labels),
                      width=1200, yaxis=dict(autorange="reversed"), xaxis_tickangle=-60)
    return fig


def show_circuit_section(exp) -> None:
    """The notebooks' and the explorer's circuit section for an ExperimentResult: the summary, the faithfulness
    curves, the attention of the top heads by role and over the first included example's tokens."""
    if exp.circuit is None:
        print("The circuit section is off (circuit = False) or no example was included.")
        return
    print(exp.circuit.summary(exp.token_labels()))
    circuit = exp.circuit.to_dict()
    first = circuit["settings"]["examples"][0]  # the attention lists hold the included examples, in order
    for fig in (faithfulness_figure(circuit), attention_roles_figure(circuit),
                attention_example_figure(circuit, exp.tokens[first])):
        if fig is not None:
            fig.show()
