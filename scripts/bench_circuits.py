#!/usr/bin/env python3
"""Benchmark of the circuit kernels against the head sweep and against their one-edge-at-a-time references.

A random-initialised model of a real shape (default: Llama-3.2-1B), one 60-token example whose first difference is
at position 10, in one run:
- the head sweep (``patch_heads``), the baseline;
- exact path patching of the top-3 receivers (the sweep's strongest heads at the answer position) x every sender
  cell of an earlier layer at or after the first difference x q/k/v, plus the logits edges (``path_patching``);
- the reference (``path_patching_reference``: one whole-prompt forward per edge) timed on a random subset of edges and
  extrapolated to all of them; the largest difference between the two on that subset;
- edge attribution (``edge_attribution``) on the same edges.

Usage: python scripts/bench_circuits.py [--shape llama|qwen|tiny] [--dtype bf16|fp32] [--ref-edges 24]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
warnings.filterwarnings("ignore")

from transformers import LlamaConfig, Qwen2Config  # noqa: E402

from helpers.circuits.analysis import top_heads_at  # noqa: E402
from helpers.circuits.edge_attribution import edge_attribution  # noqa: E402
from helpers.circuits.faithfulness import random_pool  # noqa: E402
from helpers.circuits.path_patching import all_edges, path_patching, path_patching_reference  # noqa: E402
from helpers.models.architectures import head_geometry  # noqa: E402
from helpers.models.tiny_models import build_random_model, tiny_config  # noqa: E402
from helpers.patching import TokenPair, patch_heads  # noqa: E402

SHAPES = {
    "llama": lambda: LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                 num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                                 max_position_embeddings=131072, rope_theta=500_000.0, tie_word_embeddings=True),
    "qwen": lambda: Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                num_attention_heads=14, num_key_value_heads=2, head_dim=64,
                                max_position_embeddings=32768, tie_word_embeddings=True),
    "tiny": lambda: tiny_config("llama", vocab_size=512, n_layers=4),
}


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t, out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama", choices=sorted(SHAPES))
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--length", type=int, default=60)
    ap.add_argument("--first-diff", type=int, default=10)
    ap.add_argument("--ref-edges", type=int, default=24)
    ap.add_argument("--receiver-layer", type=int, default=None,
                    help="heads 0-2 of this layer as the receivers instead of the sweep's top 3 (a random model's top "
                         "heads sit anywhere; -1: the last layer, the most senders)")
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    cfg = SHAPES[args.shape]()
    model = build_random_model(cfg, seed=0, dtype=dtype).to(device).eval()
    geo = head_geometry(model.config)
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(0, cfg.vocab_size, (args.length,), generator=g).tolist()
    corrupt = list(clean)
    corrupt[args.first_diff] = (clean[args.first_diff] + 7) % cfg.vocab_size
    pair = TokenPair(clean, corrupt, args.first_diff, args.length - 1, 11, 12)
    kw = dict(keep_incorrect=True, min_denominator=0.0)
    patch_heads(model, [pair], progress=False, **kw)  # warm-up (kernels compile)
    t_sweep, sweep = timed(lambda: patch_heads(model, [pair], progress=False, **kw), device)
    T = args.length
    receivers = [(r["layer"], r["head"]) for r in top_heads_at(sweep.normalised[0], T - 1, 3)]
    if args.receiver_layer is not None:
        layer = args.receiver_layer % geo.n_layers
        receivers = [(layer, h) for h in range(3)]
    senders = random_pool(geo.n_layers, geo.n_heads, [args.first_diff], T)
    edges = all_edges(senders, receivers, answer_column=T - 1)
    path_patching(model, [pair], edges[:8], **kw)  # warm-up
    t_path, fast = timed(lambda: path_patching(model, [pair], edges, **kw), device)
    subset = random.Random(0).sample(range(len(edges)), min(args.ref_edges, len(edges)))
    path_patching_reference(model, [pair], [edges[i] for i in subset[:2]], **kw)  # warm-up
    t_ref, ref = timed(lambda: path_patching_reference(model, [pair], [edges[i] for i in subset], **kw), device)
    t_eap, _ = timed(lambda: edge_attribution(model, [pair], edges, **kw), device)
    diff = float((fast.patched_logit_diff[0, subset] - ref.patched_logit_diff[0]).abs().nan_to_num().max())
    loop = t_ref / len(subset) * len(edges)
    out = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "shape": args.shape,
        "dtype": args.dtype, "receivers": receivers, "edges": len(edges), "head_sweep_s": round(t_sweep, 3),
        "path_patching_s": round(t_path, 3), "path_over_sweep": round(t_path / t_sweep, 1),
        "reference_s_per_edge": round(t_ref / len(subset), 4), "reference_extrapolated_s": round(loop, 1),
        "speedup_over_reference": round(loop / t_path, 1), "max_abs_diff_vs_reference": diff,
        "edge_attribution_s": round(t_eap, 3),
        "peak_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None,
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
