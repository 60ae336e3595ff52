#!/usr/bin/env python3
"""How good are the gradient approximations on trained models? Head attribution patching against the exact head
sweep, and edge attribution patching (EAP) against exact path patching, on the embedded TinySQL models.

For every embedded model (gpt_neo / llama x cs1-3) and feature, ``--examples`` pairs at the feature's default
options; the truth is the exact computation in float32. Reported, per dtype (fp32, bf16): the estimate's
``helpers.patching.attribution.attribution_error`` against that truth (correlation of the per-example effects,
top-10 overlap of the mean effects), and for bf16 also the exact computation's own deviation from the fp32 truth
(the bf16 noise floor any estimate in bf16 sits on). Edges: the top-3 receivers (layers 1 and up, as the circuit
section's) of the fp32 sweep at the answer position x every sender cell at or after the first difference x q/k/v,
plus the logits edges.

Usage: python scripts/attribution_quality.py [--device cuda] [--examples 20] [--json outputs/attribution_quality.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
warnings.filterwarnings("ignore")

from helpers.circuits.analysis import top_heads_at  # noqa: E402
from helpers.circuits.edge_attribution import edge_attribution  # noqa: E402
from helpers.circuits.faithfulness import random_pool  # noqa: E402
from helpers.circuits.path_patching import all_edges, path_patching  # noqa: E402
from helpers.models.architectures import head_geometry  # noqa: E402
from helpers.models.checkpoints import load_trained  # noqa: E402
from helpers.models.registry import embedded_model_dir  # noqa: E402
from helpers.patching import attribution_error, attribution_patching_heads, patch_heads  # noqa: E402
from helpers.tinysql.pairs import DEFAULT_PAIR_OPTIONS, Feature, make_pairs  # noqa: E402

FEATURES = ("ENGTABLENAME", "ENGFIELDNAME", "DEFTABLENAME", "DEFFIELDNAME")


def short(err: dict) -> dict:
    return {"correlation": round(err["correlation"], 4) if err["correlation"] == err["correlation"] else None,
            "top10": err["top_k_overlap"], "n": err["n"]}


def one(folder, cs: int, feature: str, n: int, device: str) -> dict:
    model, tok = load_trained(folder, device)
    opts = DEFAULT_PAIR_OPTIONS[Feature(feature)]
    pairs = make_pairs(feature, tok, cs_num=cs, batch_size=n, seed=0,
                       **{k: v for k, v in vars(opts).items() if v is not None})
    T = len(pairs[0].clean_ids)
    assert all(len(p.clean_ids) == T for p in pairs), "one skeleton per make_pairs call: equal lengths"
    geo = head_geometry(model.config)
    kw = dict(keep_incorrect=False, progress=False)
    exact = patch_heads(model.float(), pairs, **kw)
    # the circuit section's receivers: the top 3 at the answer position in layers 1 and up (analyse_circuit)
    receivers = [(r["layer"], r["head"]) for r in top_heads_at(exact.mean(), T - 1, 3, min_layer=1)]
    senders = random_pool(geo.n_layers, geo.n_heads, [p.corrupted_position for p in pairs], T)
    edges = all_edges(senders, receivers, answer_column=T - 1)
    exact_edges = path_patching(model, pairs, edges, keep_incorrect=False)
    out = {"model": os.path.basename(folder), "feature": feature, "examples": n, "included": exact.n_included,
           "clean_accuracy": float(exact.clean_correct.float().mean()), "receivers": receivers,
           "edges": len(edges)}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        m = model.to(dtype)
        t = time.perf_counter()
        heads = attribution_patching_heads(m, pairs, keep_incorrect=False)
        eap = edge_attribution(m, pairs, edges, keep_incorrect=False)
        out[f"{name}_s"] = round(time.perf_counter() - t, 2)
        out[f"head_attribution_{name}"] = short(attribution_error(heads, exact))
        out[f"edge_attribution_{name}"] = short(attribution_error(eap, exact_edges))
        if dtype != torch.float32:
            out[f"head_sweep_{name}"] = short(attribution_error(patch_heads(m, pairs, **kw), exact))
            out[f"path_patching_{name}"] = short(attribution_error(path_patching(m, pairs, edges, keep_incorrect=False),
                                                                   exact_edges))
    return out


def markdown(rows: list[dict]) -> str:
    def c(d):
        return "–" if d["correlation"] is None else f"{d['correlation']:.3f} / {d['top10']:.1f}"
    lines = ["| model | feature | head attr. fp32 | head attr. bf16 | exact sweep bf16 | EAP fp32 | EAP bf16 | "
             "exact edges bf16 |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['feature']} | {c(r['head_attribution_fp32'])} | "
                     f"{c(r['head_attribution_bf16'])} | {c(r['head_sweep_bf16'])} | {c(r['edge_attribution_fp32'])} "
                     f"| {c(r['edge_attribution_bf16'])} | {c(r['path_patching_bf16'])} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--examples", type=int, default=20)
    ap.add_argument("--models", nargs="*", default=[f"{f}-cs{c}" for f in ("gpt_neo", "llama") for c in (1, 2, 3)])
    ap.add_argument("--features", nargs="*", default=list(FEATURES))
    ap.add_argument("--json", default="outputs/attribution_quality.json")
    args = ap.parse_args()
    rows = []
    for name in args.models:
        family, cs = name.rsplit("-cs", 1)
        for feature in args.features:
            if int(cs) not in Feature(feature).command_sets:  # ORDER BY on CS1, say: nothing to measure
                continue
            rows.append(one(embedded_model_dir(family, int(cs)), int(cs), feature, args.examples, args.device))
            print(json.dumps(rows[-1]), flush=True)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"device": device, "torch": torch.__version__, "examples": args.examples, "rows": rows}, f, indent=1)
    print(f"\n{device}, {args.examples} examples a cell; each entry: correlation of per-example effects with the "
          f"exact fp32 result / top-10 overlap of the mean effects\n")
    print(markdown(rows))


if __name__ == "__main__":
    main()
