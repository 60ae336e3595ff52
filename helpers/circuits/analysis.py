"""From the head sweep to a circuit, for one experiment: the receivers (top heads at the answer position, in layers
1 and above), the faithfulness curves of the top cells with their random baseline, the attention of the top heads,
and exact path patching of every edge from an earlier-layer cell into the receivers (q, k, v) and into the logits.

Senders are every cell of an earlier layer at or after the first difference (columns that at least half of the
examples have at or after their corrupted token), or the ``n_senders`` top cells of the head sweep. ``edges``
lists every edge computed, strongest first, each with its edge attribution estimate beside the exact score
(``attribution``; helpers.circuits.edge_attribution), and ``edge_attribution_error`` says how far the estimate is
(correlation, top-10 overlap, ... of the per-example effects; helpers.patching.attribution.attribution_error).
"""
from __future__ import annotations

import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from helpers.circuits.attention import HeadAttention, head_attention
from helpers.circuits.edge_attribution import edge_attribution
from helpers.circuits.path_patching import all_edges, path_patching
from helpers.circuits.faithfulness import (
    DEFAULT_K_MAX,
    DEFAULT_N_RANDOM,
    DEFAULT_THRESHOLD,
    FaithfulnessCurves,
    check_counts,
    faithfulness_curves,
    random_pool,
    ranked_cells,
)
from helpers.models.architectures import head_geometry
from helpers.models.loading import load_model, resolve_dtype
from helpers.patching.attribution import attribution_error
from helpers.patching.example_runs import example_metrics
from helpers.patching.model_calls import ModelCalls, eval_mode, unwrap_model

DEFAULT_N_RECEIVERS = 3
DEFAULT_N_ATTENTION_HEADS = 3


@dataclass
class CircuitResult:
    receivers: list[dict]  # [{layer, head}]: the top heads of the head sweep at the answer position, layers >= 1
    faithfulness: FaithfulnessCurves
    attention: list[HeadAttention]
    settings: dict
    edges: list = field(default_factory=list)  # path patching: dicts, strongest |score| first
    edges_computed: bool = False
    edge_attribution_error: dict | None = None  # EAP against the exact edges

    def summary(self, position_labels=None) -> str:
        """The section in a few lines: top cells, the smallest k reaching 80 %, the random baseline, the strongest
        edges. ``position_labels``: the heatmap's column labels (``ExperimentResult.token_labels()``)."""
        f = self.faithfulness
        top = ", ".join(c.label(position_labels) for c in f.cells[:5])

        def at(values, k):
            return f"{values[f.k.index(k)]:.2f}" if k in f.k else "-"
        k5 = 5 if 5 in f.k else (f.k[-1] if f.k else None)
        return (f"Top cells: {top}\n"
                f"Smallest k reaching 80 %: sufficiency {f.k80_sufficiency}, necessity {f.k80_necessity} "
                f"(of k up to {f.k[-1] if f.k else 0}). At k = {k5}: sufficiency {at(f.sufficiency, k5)}, necessity "
                f"{at(f.necessity, k5)}, {k5} random cells {at(f.random_sufficiency_mean, k5)} "
                f"(mean of {f.n_random} draws).\n" + self.edges_summary(position_labels=position_labels))

    def edges_summary(self, n: int = 5, position_labels=None) -> str:
        if not self.edges_computed:
            return "Edges (path patching): not computed."
        top = [e for e in self.edges if e["score"] is not None][:n]
        if not top:
            return ("Edges (path patching): none scored (no sender cell in a layer before a receiver's, and none at "
                    "the answer column; or no included example reaches the senders' columns).")
        text = "Strongest edges (path patching): " + ", ".join(edge_label(e, position_labels) for e in top)
        err = self.edge_attribution_error or {}
        if err.get("correlation") is not None:
            text += (f"\nEdge attribution (EAP) against these exact edges: correlation {err['correlation']:.3f}, "
                     f"top-10 overlap {err['top_k_overlap']:.1f}, largest error {err['relative_max_error']:.0%} "
                     "of the largest effect.")
        return text

    def to_dict(self) -> dict:
        return {"receivers": self.receivers, "edges": self.edges, "edges_computed": self.edges_computed,
                "edge_attribution_error": self.edge_attribution_error,
                "faithfulness": self.faithfulness.to_dict(), "attention": [a.to_dict() for a in self.attention],
                "settings": self.settings}


def edge_label(e: dict, position_labels=None) -> str:
    s = e["sender"]
    where = position_labels[s["position"]] if position_labels is not None else f"pos {s['position']}"
    to = "logits" if e["receiver"] is None else f"L{e['receiver']['layer']}H{e['receiver']['head']}.{e['input']}"
    return f"L{s['layer']}H{s['head']}@{where} -> {to} ({e['score']:+.2f})"


def top_heads_at(mean: torch.Tensor, column: int, n: int, min_layer: int = 0) -> list[dict]:
    """The ``n`` heads of largest mean score at ``column`` ([layer, head, column] scores) in layers ``min_layer``
    and above, as {layer, head}."""
    column_only = torch.as_tensor(mean)[min_layer:, :, column:column + 1]
    return [{"layer": c.layer + min_layer, "head": c.head} for c in ranked_cells(column_only)[:n]]


# tolerance of the model check, (absolute, relative to the larger difference): one example's clean / corrupt logit
# differences recomputed batch-1 with the plain modules against the experiment's. The same weights stay inside
# (float32: rounding; where either side ran in fp16/bf16 the experiment's came from fused kernels and forwards of
# several pairs: a deep model's bf16 logits move by tenths, hence the wide half-precision band); other weights of the
# same shape move them by logits (embedded llama-cs2 on llama-cs1's pairs: 6.9 / -7.4 for 12.5 / -10.9). Measured
# (2026-12-05, one H100): bf16 sweeps of 32 pairs a feature on five embedded models, 640 examples, recomputed batch-1
# in float32 on the CPU and in bf16 on the GPU, stayed within 0.26 of the half band (llama-cs3 the widest)
_SAME_MODEL_TOLERANCE = {"float32": (0.05, 0.02), "half": (0.5, 0.1)}


def _ran_in_half(exp) -> bool:
    """Did the experiment run in fp16/bf16? Its recorded dtype ("auto": bf16 where it ran on CUDA; read from the
    recorded device here, since ``resolve_dtype``'s "auto" asks this machine, which may have no GPU)."""
    dtype = exp.model_info.get("dtype") or "auto"
    if str(dtype).strip().lower() == "auto":
        return str(exp.model_info.get("device", "cpu")).startswith("cuda")
    return resolve_dtype(dtype) in (torch.float16, torch.bfloat16)


def check_same_model(exp, model, example: int | None = None) -> None:
    """A clear error where ``model`` is not the one ``exp`` ran on: another head geometry, or one example's unpatched
    clean / corrupt logit differences away from the experiment's (other weights: another command set's model of the
    same shape, say). ``example``: which (None: the first included one with finite recorded differences). One
    batch-1 forward of each prompt."""
    hf = unwrap_model(model)
    geo, want = head_geometry(hf.config), exp.geometry
    ran_on = exp.model_info.get("model_id")
    if (geo.n_layers, geo.n_heads) != (want.n_layers, want.n_heads):
        raise ValueError(f"this model ({geo.n_layers} layers x {geo.n_heads} heads) is not the one the experiment ran "
                         f"on ({ran_on}: {want.n_layers} layers x {want.n_heads} heads)")
    clean_all, corrupt_all = exp.patching.clean_logit_diff, exp.patching.corrupt_logit_diff
    if example is None:
        finite = [i for i, ok in enumerate(exp.patching.included.tolist())
                  if ok and math.isfinite(float(clean_all[i])) and math.isfinite(float(corrupt_all[i]))]
        if not finite:
            return  # (nothing recorded to compare with)
        example = finite[0]
    with eval_mode(hf):
        [(clean, corrupt, _)] = example_metrics(hf, ModelCalls.of(hf), [exp.pairs[example]], pairs_per_forward=1)
    recorded = (float(clean_all[example]), float(corrupt_all[example]))
    half = next(hf.parameters()).dtype in (torch.float16, torch.bfloat16) or _ran_in_half(exp)
    atol, rtol = _SAME_MODEL_TOLERANCE["half" if half else "float32"]
    tol = atol + rtol * max(abs(v) for v in recorded)
    if abs(clean - recorded[0]) > tol or abs(corrupt - recorded[1]) > tol:
        raise ValueError(f"this model is not the one the experiment ran on ({ran_on}): example {example}'s clean / "
                         f"corrupt logit differences are {clean:.3f} / {corrupt:.3f} here and were {recorded[0]:.3f} / "
                         f"{recorded[1]:.3f} in the experiment (tolerance {tol:.2f})")


@contextmanager
def _named_by_the_head_sweep():
    """The circuit's computations without their small-denominator warnings: the experiment's head sweep has named
    each such example already, by its own number (these count within the included examples only)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"example \d+: \|clean - corrupt\| logit difference")
        yield


def analyse_circuit(exp, model=None, *, k_max: int = DEFAULT_K_MAX, threshold: float = DEFAULT_THRESHOLD,
                    n_random: int = DEFAULT_N_RANDOM, n_receivers: int = DEFAULT_N_RECEIVERS,
                    n_attention_heads: int = DEFAULT_N_ATTENTION_HEADS, n_senders: int | None = None,
                    edges: bool = True, progress: bool = False) -> CircuitResult:
    """The circuit section of one experiment (``exp``: an ExperimentResult; ``model``: the model it ran on, a HF
    model or a ``helpers.models.LoadedModel``; another model is refused: ``check_same_model``; None: loaded again
    from the experiment's spec, dtype and device).

    The random baseline is seeded with the experiment's seed. Attention is read from the answer position, and for
    the Def* features (the corruption sits in the CREATE TABLE) also from the corrupted token. Receivers are the
    ``n_receivers`` top heads at the answer position in layers 1 and above (a layer-0 head has no earlier head to
    receive from)."""
    check_counts(1, k_max=k_max, **({} if n_senders is None else {"n_senders": n_senders}))
    check_counts(0, n_random=n_random, n_receivers=n_receivers, n_attention_heads=n_attention_heads)
    if not math.isfinite(threshold):
        raise ValueError(f"threshold must be a finite number, got {threshold!r}")
    if model is None:
        model = load_model(exp.spec, dtype=exp.settings.dtype, device=exp.settings.device, wrap=False)
    model = unwrap_model(model)
    aligned = exp.aligned
    mean, count = aligned.mean(), aligned.count()
    included = [i for i, ok in enumerate(exp.patching.included.tolist()) if ok]
    if not included:
        raise ValueError("no example of the experiment is included (every one answered wrongly on the clean prompt, "
                         "and keep_incorrect is off): nothing to analyse")
    check_same_model(exp, model)
    pairs = [exp.pairs[i] for i in included]
    with _named_by_the_head_sweep():
        curves = faithfulness_curves(model, pairs, mean, count=count, k_max=k_max, threshold=threshold,
                                     n_random=n_random, seed=exp.settings.seed, keep_incorrect=True,
                                     progress=progress)
    heads: list[tuple[int, int]] = []
    for c in curves.cells:
        if (c.layer, c.head) not in heads:
            heads.append((c.layer, c.head))
    queries = ("answer", "corrupted") if exp.feature.value.startswith("DEF") else ("answer",)
    attention = head_attention(model, pairs, [exp.tokens[i] for i in included], heads[:n_attention_heads], queries)
    receivers = top_heads_at(mean, mean.shape[-1] - 1, n_receivers, min_layer=1)
    settings = dict(k_max=k_max, threshold=threshold, n_random=n_random, seed=exp.settings.seed,
                    n_receivers=n_receivers, n_attention_heads=n_attention_heads, n_senders=n_senders,
                    examples=included)
    result = CircuitResult(receivers, curves, attention, settings)
    if edges:
        L, H, C = mean.shape
        senders = (ranked_cells(mean, count)[:n_senders] if n_senders is not None else
                   random_pool(L, H, [C - len(p.clean_ids) + p.corrupted_position for p in pairs], C))
        edge_list = all_edges(senders, [(r["layer"], r["head"]) for r in receivers], answer_column=C - 1)
        kw = dict(n_columns=C, keep_incorrect=True)
        with _named_by_the_head_sweep():
            exact = path_patching(model, pairs, edge_list, progress=progress, **kw)
            estimate = edge_attribution(model, pairs, edge_list, **kw)
        found = exact.to_dicts()
        for d, a in zip(found, estimate.to_dicts()):
            d["attribution"] = a["score"]
        result.edges = sorted(found, key=lambda e: -abs(e["score"]) if e["score"] is not None else 0.0)
        result.edges_computed = True
        if edge_list:
            error = attribution_error(estimate, exact)
            result.edge_attribution_error = {k: (v if v == v else None) for k, v in error.items()}  # NaN -> None
    return result
