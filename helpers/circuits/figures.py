"""Figures of the circuit section, drawn from the ``circuit`` object of a result (``CircuitResult.to_dict()`` or a
saved JSON's ``data["circuit"]``: one code path for a fresh run and a re-draw)."""
from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from helpers.circuits.analysis import DEFAULT_N_RECEIVERS, edge_label
from helpers.circuits.faithfulness import DEFAULT_K_MAX, DEFAULT_N_RANDOM

INPUT_COLORS = {"q": "royalblue", "k": "seagreen", "v": "darkorange", "logits": "purple"}


def _band(fig, x, mean, std, name, color, row=None, col=None, legend: bool = False):
    """mean ± std as a shaded band; ``legend``: listed under ``name`` (say what the spread is over)."""
    upper = [m + s if m is not None and s is not None else None for m, s in zip(mean, std)]
    lower = [m - s if m is not None and s is not None else None for m, s in zip(mean, std)]
    kw = {} if row is None else dict(row=row, col=col)
    fig.add_trace(go.Scatter(x=x + x[::-1], y=upper + lower[::-1], fill="toself", fillcolor=color, opacity=0.15,
                             line=dict(width=0), hoverinfo="skip", showlegend=legend, name=name), **kw)


def faithfulness_figure(circuit: dict, title: str = "Faithfulness of the top cells") -> go.Figure:
    """Sufficiency and necessity of the top-k cells against k, with the random sets' sufficiency (mean ± std)."""
    f = circuit["faithfulness"]
    k = f["k"]
    fig = go.Figure()
    # (two different spreads: the examples' around the top cells, the draws' around the random sets)
    _band(fig, k, f["random_sufficiency_mean"], f["random_sufficiency_std"], "± 1 std over the random draws", "gray",
          legend=True)
    _band(fig, k, f["sufficiency"], f["sufficiency_std"], "± 1 std over the examples", "royalblue", legend=True)
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


def attention_example_figure(circuit: dict, tokens: list[str], example: int = 0,
                             first_column: int = 0) -> go.Figure | None:
    """Every top head's attention over one example's tokens (clean and corrupt rows), from its query position.
    ``first_column``: the end-aligned column of the example's first token, so that a token's label ``{tok}_{c}``
    (stripped as the heatmap strips them) names the same column as in the heatmap, the edge table and the graph (a
    shorter example starts later). The tokens are this example's own: where examples differ, the heatmap's label has
    the reference example's token and a ``*``."""
    heads = circuit.get("attention") or []
    if not heads:
        return None
    z, labels = [], []
    for h in heads:
        for side in ("clean", "corrupt"):
            row = h[side][example]
            z.append(row + [None] * (len(tokens) - len(row)))
            labels.append(f"L{h['layer']}H{h['head']} {h['query']} {side}")
    fig = go.Figure(go.Heatmap(z=z, x=[f"{t.strip() or repr(t)}_{first_column + i}" for i, t in enumerate(tokens)],
                               y=labels,
                               colorscale="Blues", zmin=0, colorbar=dict(title="attention")))
    fig.update_layout(title="Attention of the top heads over one example", height=140 + 28 * len(labels),
                      width=1200, yaxis=dict(autorange="reversed"), xaxis_tickangle=-60)
    return fig


def _strongest(circuit: dict, n: int) -> list[dict]:
    return [e for e in circuit.get("edges") or [] if e["score"] is not None][:n]


# edges the circuit section shows: the graph's and the table's (the reading guide quotes both)
GRAPH_EDGES, TABLE_EDGES = 15, 10


def edges_table(circuit: dict, position_labels=None, n: int = TABLE_EDGES) -> pd.DataFrame:
    """The ``n`` strongest edges (path patching): sender cell, receiver and its input, mean score, std, examples, and
    the edge attribution estimate of the same score."""
    rows = []
    for e in _strongest(circuit, n):
        s = e["sender"]
        rows.append({"sender": f"L{s['layer']}H{s['head']}",
                     "at": position_labels[s["position"]] if position_labels is not None else s["position"],
                     "receiver": "logits" if e["receiver"] is None else f"L{e['receiver']['layer']}H{e['receiver']['head']}",
                     "input": e["input"], "score": e["score"], "std": e["std"], "n": e["n"],
                     "attribution (EAP)": e.get("attribution")})
    return pd.DataFrame(rows, columns=["sender", "at", "receiver", "input", "score", "std", "n", "attribution (EAP)"])


def circuit_graph_figure(circuit: dict, n_layers: int, position_labels=None, n: int = GRAPH_EDGES,
                         title: str = "How the heads connect (path patching)") -> go.Figure | None:
    """Heads as nodes by layer (x) and head (y), the logits at the right; the ``n`` strongest edges as lines coloured
    by the receiver's input, width by |score| (hover: the edge and its score). A sender's label names the positions
    it sends from (one node per head, so a head sending from two positions is one node with both)."""
    edges = _strongest(circuit, n)
    if not edges:
        return None
    top = max(abs(e["score"]) for e in edges) or 1.0
    nodes: dict = {}
    fig = go.Figure()
    offset = {"q": -0.15, "k": 0.0, "v": 0.15, "logits": 0.0}
    heads = [e["sender"]["head"] for e in edges] + [e["receiver"]["head"] for e in edges if e["receiver"]]
    logits_y, has_logits = max(heads) / 2, False  # the logits node between the heads, off any head's row
    sent_from: dict = {}  # head -> the positions it sends from (one node per head: the positions go in its label)
    for e in edges:
        s = (e["sender"]["layer"], e["sender"]["head"])
        nodes[s] = f"L{s[0]}H{s[1]}"
        where = e["sender"]["position"]
        where = position_labels[where] if position_labels is not None else f"pos {where}"
        if where not in sent_from.setdefault(s, []):
            sent_from[s].append(where)
        if e["receiver"] is None:
            end, has_logits = (n_layers, logits_y), True
        else:
            r = (e["receiver"]["layer"], e["receiver"]["head"])
            nodes[r] = f"L{r[0]}H{r[1]}"
            end = (r[0], r[1] + offset[e["input"]])
        fig.add_trace(go.Scatter(x=[s[0], end[0]], y=[s[1], end[1]], mode="lines", hoverinfo="text",
                                 text=edge_label(e, position_labels), showlegend=False,
                                 line=dict(color=INPUT_COLORS[e["input"]], width=1 + 9 * abs(e["score"]) / top,
                                           dash="solid" if e["score"] > 0 else "dot")))
    text = [f"{name}@{', '.join(sent_from[k])}" if k in sent_from else name for k, name in nodes.items()]
    fig.add_trace(go.Scatter(x=[k[0] for k in nodes], y=[k[1] for k in nodes], mode="markers+text",
                             text=text, textposition="top center", showlegend=False,
                             marker=dict(size=14, color="white", line=dict(color="black", width=1))))
    if has_logits:
        fig.add_trace(go.Scatter(x=[n_layers], y=[logits_y], mode="markers+text", text=["logits"], showlegend=False,
                                 textposition="top center", marker=dict(size=16, color="purple")))
    for name, color in INPUT_COLORS.items():  # legend entries for the inputs
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="lines", line=dict(color=color, width=4),
                                 name=f"into {name}" if name != "logits" else "direct to the logits"))
    fig.update_layout(title=f"{title}<br><sup>{len(edges)} strongest edges; width: |score|; dotted: negative</sup>",
                      xaxis=dict(title="layer", tickvals=list(range(n_layers + 1)),
                                 ticktext=[str(l) for l in range(n_layers)] + ["logits"],
                                 range=[-0.6, n_layers + 0.4]),  # (room for layer 0's labels)
                      yaxis=dict(title="head", dtick=1), height=500, width=900)
    return fig


def reading_guide(circuit: dict) -> str:
    """How to read the circuit section's figures (Markdown), shared by every feature notebook and the explorer; its
    numbers (k, draws, heads, receivers) are the circuit's own settings."""
    from_corrupted = any(a.get("query") == "corrupted" for a in circuit.get("attention", []))
    s = circuit.get("settings", {})
    k_max, n_random = s.get("k_max", DEFAULT_K_MAX), s.get("n_random", DEFAULT_N_RANDOM)
    n_heads = len({(a["layer"], a["head"]) for a in circuit.get("attention", [])})
    n_receivers = len(circuit["receivers"]) if "receivers" in circuit else DEFAULT_N_RECEIVERS

    def count(n: int, one: str, many: str) -> str:
        return f"{n} {one if n == 1 else many}"
    return f"""**How to read this section.** The heatmap says which single cell (head, position) restores the answer on its
own. Are those cells *the* mechanism? Two curves answer it, for S_k = the k cells of largest mean score (k = 1..{k_max},
and the set of every cell above the threshold where that is larger):
- **sufficiency** (blue): the corrupt run with the clean z of all of S_k patched in at once,
  `(patched - corrupt) / (clean - corrupt)`: how much of the answer S_k brings back on its own;
- **necessity** (red): the clean run with the corrupt z of all of S_k patched in,
  `(clean - patched) / (clean - corrupt)`: how much of the answer is lost without S_k.

The grey band is the baseline: random sets of k cells at or after the corruption (mean ± std over
{count(n_random, "seeded draw", "seeded draws")}). A mechanism found by the sweep rises to ~1 in a few cells while the random sets stay near 0; a necessity
curve well below sufficiency means other routes carry the answer too. The summary gives the smallest k reaching 80 %.

Then where the top heads look: the attention probabilities of the {count(n_heads, "head", "heads")} of the top cells, from the answer
position{" (and from the corrupted token)" if from_corrupted else ""}, summed by role (the corrupted word, prompt
keywords, the Instruction / Context / Response text) and averaged over examples, clean (blue) against corrupt
(orange); then the same heads over one example's tokens. A head whose attention sits on the swapped word and does
not move between clean and corrupt *moves* it; one whose attention moves with the corruption *selects* by it.

Then how the heads connect: exact path patching of every edge from a cell of an earlier layer (at or after the
corruption) into one of the receivers (the {count(n_receivers, "top head", "top heads")} at the answer position in layers 1 and above: a
layer-0 head has no earlier head to receive from), through the receiver's query,
key or value, and of each answer-position cell straight into the logits. An edge's score is the share of the
clean-corrupt gap that comes back when the sender's change reaches *only* that input, everything else staying
corrupt. The graph draws the {GRAPH_EDGES} strongest (colour: the input; width: |score|; dotted: negative), the table lists the
{TABLE_EDGES} strongest, each beside its edge attribution (EAP) estimate, the gradient approximation of the same score from one
forward and one backward; the summary gives how far EAP is from the exact edges."""


def show_circuit_section(exp) -> None:
    """The notebooks' and the explorer's circuit section for an ExperimentResult: how to read it, the summary, the
    faithfulness curves, the attention of the top heads by role and over the first included example's tokens, and
    the path-patching graph and table."""
    if exp.circuit is None:
        print("The circuit section is off (circuit = False) or no example was included.")
        return
    from IPython.display import Markdown, display

    circuit = exp.circuit.to_dict()
    display(Markdown(reading_guide(circuit)))
    print(exp.circuit.summary(exp.token_labels()))
    first = circuit["settings"]["examples"][0]  # the attention lists hold the included examples, in order
    labels = exp.token_labels()
    for fig in (faithfulness_figure(circuit), attention_roles_figure(circuit),
                attention_example_figure(circuit, exp.tokens[first], first_column=exp.offset(first)),
                circuit_graph_figure(circuit, exp.geometry.n_layers, labels)):
        if fig is not None:
            fig.show()
    if circuit["edges_computed"]:
        display(edges_table(circuit, labels))
