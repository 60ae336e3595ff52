"""Benchmark: fast exact head patching (helpers.patching.patch_heads) against the original loop.

Random-initialised models of the real shapes (helpers.models.tiny_models.build_random_model), one ~60-token example whose
first clean/corrupt difference is at position 10. For each shape and dtype (fp32, bf16) in the same run:

- the reference (``patch_heads_reference``: one nnsight trace per layer x head x position) is timed on a random
  subset of patches and extrapolated to the full sweep (layers x heads x all positions, as the original notebook);
- the fast path is timed on the full sweep (after a warm-up), and its values are compared with the reference on
  the subset (max abs difference of raw logit differences);
- peak GPU memory, forwards, and achieved TFLOP/s (2 x block parameters x token-layers actually processed, plus
  attention score/value products; the lm_head is restricted to two rows and not counted);
- 10 examples vs 1 (bf16 by default), a bucket-size sweep, sdpa attention, and the unfused HF modules (bf16).

- the small-model cases (``SMALL_CASES``, bf16): the SmolLM2-135M and TinyStories-2L shapes at 1 and 10 examples of
  T 71 and 10 of T 26, against the exact sweep's arithmetic at 790 TFLOP/s, with the GPU's busy share;
  ``--small-only`` runs just those (and the main table's one-example case for the other shapes), without the
  reference loop, so without nnsight.
- ``--deviation N``: the bf16 sweep's mean |difference| from the float32 sweep over N one-example sweeps per shape:
  issue 18's "bf16 deviations no larger" for a change that rounds differently, on several examples (one example's
  figure moves by ±20 % with any change of rounding).

Usage: python scripts/bench.py [--quick] [--out results.md]. ``--quick`` uses tiny shapes (CPU check).
"""
from __future__ import annotations

import argparse
import gc
import math
import os
import sys
import time
import traceback
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from transformers import GPTNeoConfig, LlamaConfig, Qwen2Config  # noqa: E402

from helpers.models.architectures import blocks, head_geometry  # noqa: E402
from helpers.patching.attribution import attribution_error, attribution_patching_heads  # noqa: E402
from helpers.patching import block_tails, patch_heads  # noqa: E402
from helpers.patching.reference import patch_heads_reference  # noqa: E402
from helpers.patching.result_types import TokenPair  # noqa: E402
from helpers.models.tiny_models import build_random_model, tiny_config  # noqa: E402


def real_configs():
    return {
        "TinyStories-2L-33M (gpt_neo)": GPTNeoConfig(
            vocab_size=50257, max_position_embeddings=2048, hidden_size=1024, num_layers=2, num_heads=16,
            attention_types=[[["global", "local"], 1]], window_size=256, intermediate_size=None,
            embed_dropout=0.0, attention_dropout=0.0, resid_dropout=0.0, bos_token_id=50256, eos_token_id=50256),
        "Qwen2.5-0.5B (qwen2)": Qwen2Config(
            vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
            num_attention_heads=14, num_key_value_heads=2, head_dim=64, max_position_embeddings=32768,
            rope_theta=1_000_000.0, tie_word_embeddings=True, rms_norm_eps=1e-6),
        "SmolLM2-135M (llama)": LlamaConfig(  # upstream's model 5 is SmolLM-135M, the same shape
            vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
            num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
            rope_theta=100_000.0, tie_word_embeddings=True, rms_norm_eps=1e-5),
        "Llama-3.2-1B (llama)": LlamaConfig(
            vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
            num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
            rope_theta=500_000.0, tie_word_embeddings=True, rms_norm_eps=1e-5),
    }


def quick_configs():
    return {f"tiny {f}": tiny_config(f, vocab_size=512, n_layers=4) for f in ("gpt_neo", "qwen2", "llama")}


Pair = TokenPair


def make_pair(gen, vocab: int, length: int, corrupted: int) -> Pair:
    clean = torch.randint(0, vocab, (length,), generator=gen).tolist()
    corrupt = list(clean)
    corrupt[corrupted] = (clean[corrupted] + 1 + int(torch.randint(0, vocab - 1, (1,), generator=gen))) % vocab
    a, b = torch.randperm(vocab, generator=gen)[:2].tolist()
    return Pair(clean, corrupt, corrupted, length - 1, a, b)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, reps: int = 1):
    """(best seconds over reps, last result)."""
    best, out = math.inf, None
    for _ in range(reps):
        sync(device)
        t = time.perf_counter()
        out = fn()
        sync(device)
        best = min(best, time.perf_counter() - t)
    return best, out


def flops_of(model, stats: dict, length: int, first_diff: int) -> float:
    """2 x block parameters x token-layers processed + attention QK^T and AV products, approximate: a row reads
    (length + first_diff) / 2 + length / 2 keys on average (one example of ``length`` tokens, first difference at
    ``first_diff``)."""
    geo = head_geometry(model.config)
    per_layer = sum(p.numel() for p in blocks(model)[0].parameters())
    token_layers = stats.get("row_token_layers", 0)
    kv = (length + first_diff) / 2 + length / 2
    attention = 4 * geo.n_heads * geo.d_head * kv * token_layers
    return 2 * per_layer * token_layers + attention


def profile_sweep(model, pair, device, name):
    """Top kernels of one fast sweep, and GPU-busy vs wall time (is the sweep launch-bound?)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    t = time.perf_counter()
    with profile(activities=acts) as prof:
        patch_heads(model, [pair], keep_incorrect=True, progress=False)
        sync(device)
    wall = time.perf_counter() - t
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = prof.key_averages()
    busy = sum(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0)) for e in events) / 1e6
    print(f"\nprofile {name}: wall {wall:.3f} s (profiled), GPU kernels {busy:.3f} s", flush=True)
    print(events.table(sort_by=key, row_limit=18, max_name_column_width=60), flush=True)


def host_profile(run):
    """cProfile of one call of ``run`` (a fast sweep), the GPU's queue drained inside, so its waits count."""
    import cProfile

    prof = cProfile.Profile()
    prof.enable()
    run()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    prof.disable()
    return prof


def print_host_profile(run, title: str, rows: int = 22) -> None:
    """Python functions by own time over one call of ``run`` (a fast sweep): where a launch-bound sweep spends its
    CPU."""
    import pstats

    prof = host_profile(run)
    print(f"\nhost profile, {title}:", flush=True)
    pstats.Stats(prof).sort_stats("tottime").print_stats(rows)


def sync_report(model, pair, name):
    """Every host-device synchronisation inside one fast sweep (file:line, count): each one stalls the launch queue."""
    from collections import Counter

    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            patch_heads(model, [pair], keep_incorrect=True, progress=False)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    where = Counter(f"{os.path.relpath(w.filename)}:{w.lineno}" for w in caught if "synchroniz" in str(w.message))
    print(f"\nsyncs in one sweep of {name}: {sum(where.values())}", flush=True)
    for loc, n in where.most_common(12):
        print(f"  {n:5d}  {loc}", flush=True)


# The small-model cases (issue "small real models at the arithmetic bound"): (label, examples, T, first difference).
# T 71 with the first difference at 10 is an ENGTABLENAME prompt, T 26 at 17 a DEFFIELDNAME one.
SMALL_CASES = (("1 example, T 71", 1, 71, 10), ("10 examples, T 71", 10, 71, 10), ("10 examples, T 26", 10, 26, 17))
SMALL_SHAPES = ("SmolLM2", "TinyStories")
LARGE_CASES = (("1 example, T 60", 1, 60, 10),)  # the main table's case, for the other shapes under --small-only
PEAK_TFLOPS = 790.0  # the H200's dense bf16 rate the arithmetic bound is quoted at (BENCHMARKS.md)


def gpu_busy_seconds(fn, device) -> float:
    """Seconds of GPU kernel time in one call of ``fn`` (torch.profiler; kernels summed, so an overlap of two
    streams would count twice: this suite runs on one stream)."""
    from torch.profiler import ProfilerActivity, profile

    sync(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        sync(device)
    total_us = 0.0
    for evt in prof.events():
        if getattr(evt, "device_type", None) == torch.autograd.DeviceType.CUDA:
            total_us += evt.device_time if hasattr(evt, "device_time") else evt.cuda_time
    return total_us / 1e6


def small_model_cases(name, model, device, gen, reps: int, cases=SMALL_CASES, host_profile: bool = False) -> list[str]:
    """Each case, in the model's dtype (bf16 in the benchmark), after a warm-up: wall seconds (best of ``reps``),
    the exact arithmetic's time at PEAK_TFLOPS and the ratio to it, forwards, and the share of the wall time the
    GPU is busy. ``host_profile``: also print the Python functions that take the host's time in the last case."""
    rows = []
    vocab = model.config.vocab_size
    for label, n, T, first in cases:
        # end-aligned examples of one length, first differences spread by ±2 (as prompts of one template are)
        pairs = [make_pair(gen, vocab, T, max(1, first + int(torch.randint(-2, 3, (1,), generator=gen))))
                 for _ in range(n)]
        run = lambda: patch_heads(model, pairs, keep_incorrect=True, progress=False)  # noqa: E731
        run()  # warm-up: compiles and autotunes this case's shapes
        t, res = timed(run, device, reps)
        stats = res.stats
        flop = flops_of(model, stats, T, first)
        bound = flop / (PEAK_TFLOPS * 1e12)
        busy = gpu_busy_seconds(run, device) / t if device.type == "cuda" else float("nan")
        if host_profile and (label, n, T, first) == cases[-1]:
            print_host_profile(run, f"{name}, {label}", rows=25)
        dname = {torch.bfloat16: "bf16", torch.float32: "fp32"}.get(next(model.parameters()).dtype, "?")
        rows.append(f"| {name} | {dname} | {label} | {t:.3f} | {stats.get('row_token_layers', 0) / 1e6:.2f} M | "
                    f"{flop / 1e12:.1f} TFLOP | {bound:.3f} | {t / bound:.1f}× | {stats.get('forwards')} | "
                    f"{busy:.0%} |")
        print(rows[-1], flush=True)
    return rows


def low_precision_deviation(model32, gen, n: int, T: int, first: int, dtype=torch.bfloat16):
    """How far the sweep in ``dtype`` lands from the float32 sweep: the mean |difference| of the patched logit
    differences, per one-example sweep of ``n`` random pairs (length ``T``, first difference ``first`` ± 2), over the
    entries finite in both; their mean; and how many entries are finite in one sweep only (an overflow, say, which a
    mean would hide). One example's figure moves by ±20 % with any change of rounding (BENCHMARKS.md), so a speed
    change that rounds differently is judged on several examples. ``model32``: float32 (left as it is; a copy is
    cast)."""
    import copy

    low = copy.deepcopy(model32).to(dtype)
    per_example, non_finite = [], 0
    for _ in range(n):
        pair = make_pair(gen, model32.config.vocab_size, T, max(1, first + int(torch.randint(-2, 3, (1,), generator=gen))))
        ref = patch_heads(model32, [pair], keep_incorrect=True, progress=False).patched_logit_diff.float()
        got = patch_heads(low, [pair], keep_incorrect=True, progress=False).patched_logit_diff.float()
        both = ref.isfinite() & got.isfinite()
        non_finite += int((ref.isfinite() != got.isfinite()).sum())
        per_example.append(float((got - ref)[both].abs().mean()))
    return sum(per_example) / max(1, n), per_example, non_finite


def fmt_s(x):
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else (f"{x:.3g}" if x < 100 else f"{x:.0f}")


def _count(text: str) -> int:
    n = int(text)
    if n < 0:
        raise argparse.ArgumentTypeError(f"a count of examples is 0 or more, got {n}")
    return n


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", nargs="?", help="also write the markdown table to this file")
    ap.add_argument("--quick", "--tiny", action="store_true", help="tiny shapes, small subsets (CPU check)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--length", type=int, default=60)
    ap.add_argument("--first-diff", type=int, default=10)
    ap.add_argument("--ref-patches", type=int, default=48, help="reference patches timed per shape and dtype")
    ap.add_argument("--examples", type=int, default=10, help="the multi-example run (0: skip)")
    ap.add_argument("--examples-dtypes", default="bf16")
    ap.add_argument("--per-forward", default="auto,1",
                    help="examples_per_forward values of the multi-example run (auto = the default)")
    ap.add_argument("--bucket-sizes", default="2,4,8,16", help="bf16 bucket-size sweep ('' to skip)")
    ap.add_argument("--sdpa", action=argparse.BooleanOptionalAction, default=True, help="also time sdpa (bf16)")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--profile", action="store_true", help="print the top GPU kernels of one bf16 fast sweep")
    ap.add_argument("--cpu-profile", action="store_true", help="cProfile one bf16 fast sweep (Python hotspots)")
    ap.add_argument("--sync-debug", action="store_true", help="list the host-device syncs of one bf16 fast sweep")
    ap.add_argument("--time-budget", type=float, default=400.0, help="seconds; optional parts are skipped after")
    ap.add_argument("--shapes", default="", help="comma-separated substrings of shape names to run")
    ap.add_argument("--small-cases", action=argparse.BooleanOptionalAction, default=True,
                    help="the small-model cases (SMALL_CASES, bf16) for the SmolLM2 and TinyStories shapes")
    ap.add_argument("--deviation", type=_count, default=0, metavar="N",
                    help="also the bf16 sweep's mean |difference| from the float32 sweep over N one-example sweeps per "
                         "shape (the exactness check of speed changes that round differently), at the length and "
                         "first difference of the shape's first small-model case (T 71 / 10; others T 60 / 10)")
    ap.add_argument("--small-only", action="store_true",
                    help="only the small-model cases (no reference loop, so no nnsight needed)")
    ap.add_argument("--block-tails", action=argparse.BooleanOptionalAction, default=True,
                    help="head patches' block tails once a group (helpers.patching.block_tails; --no-block-tails: "
                         "each forward its own, as before 2026-12-06: the A/B of its speed and bf16 deviation)")
    args = ap.parse_args(argv)
    previous, block_tails.ENABLED = block_tails.ENABLED, args.block_tails
    try:
        run(args)
    finally:
        block_tails.ENABLED = previous


def run(args) -> None:
    """The benchmark of ``main``'s parsed ``args``."""

    warnings.simplefilter("ignore")
    device = torch.device(args.device)
    configs = quick_configs() if args.quick else real_configs()
    if args.shapes:
        configs = {k: v for k, v in configs.items() if any(s.lower() in k.lower() for s in args.shapes.split(","))}
    if args.quick:
        torch.set_num_threads(1)  # tiny ops: thread wake-ups cost more than the arithmetic
        args.ref_patches = min(args.ref_patches, 16)
        args.examples = min(args.examples, 3)
        args.length = min(args.length, 24)
        args.first_diff = min(args.first_diff, 5)
        args.bucket_sizes = args.bucket_sizes if args.bucket_sizes != "2,4,8,16" else "1,4"
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    wanted = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    buckets = [int(b) for b in args.bucket_sizes.split(",") if b.strip()]
    gen = torch.Generator().manual_seed(0)

    env = f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}; torch {torch.__version__}"
    import transformers
    env += f"; transformers {transformers.__version__}"
    try:
        import nnsight
        env += f"; nnsight {nnsight.__version__}"
    except Exception:  # noqa: BLE001
        pass
    env += "" if args.block_tails else "; block tails per forward (--no-block-tails)"
    print(env, flush=True)
    rows, extra = [], []
    header = ("| shape | dtype | patches (L×H×T) | reference s/patch | reference full (extrapolated) s | fast s | "
              "speed-up | forwards | peak GPU GiB | TFLOP/s | max abs(fast−ref) on subset | base-row dev |")
    sep = "|" + "|".join(["---"] * (header.count("|") - 1)) + "|"
    t_start = time.perf_counter()
    per_forwards = [None if v == "auto" else int(v) for v in args.per_forward.split(",") if v]

    def over_budget() -> bool:
        return time.perf_counter() - t_start > args.time_budget

    small_rows: list[str] = []
    deviation_rows: list[str] = []

    def run_shape(name, config):
        with torch.device(device):
            model = build_random_model(config, seed=0, dtype=torch.float32)
        small = any(k in name for k in SMALL_SHAPES)
        if args.deviation:
            _, _, T_dev, first_dev = (SMALL_CASES if small else LARGE_CASES)[0]
            if args.quick:
                T_dev, first_dev = args.length, args.first_diff
            try:  # (its own failure, out of memory for the copy say, must not lose the shape's timings)
                mean, each, bad = low_precision_deviation(model, torch.Generator().manual_seed(11), args.deviation,
                                                          T_dev, first_dev)
                deviation_rows.append(f"| {name} | T {T_dev} | {args.deviation} | {mean:.5f} | "
                                      f"{' '.join(f'{d:.4f}' for d in each)} | {bad} |")
            except Exception as exc:  # noqa: BLE001
                traceback.print_exc()
                deviation_rows.append(f"| {name} | failed: {type(exc).__name__}: {str(exc)[:200]} |")
            print(deviation_rows[-1], flush=True)
        if args.small_cases and not args.quick and (small or args.small_only):
            model.to(torch.bfloat16)
            small_rows.extend(small_model_cases(name, model, device, torch.Generator().manual_seed(3), args.reps,
                                                SMALL_CASES if small else LARGE_CASES,
                                                host_profile=args.cpu_profile and small))
            model.to(torch.float32)
        if args.small_only:
            return
        geo = head_geometry(model.config)
        vocab = model.config.vocab_size
        pair = make_pair(gen, vocab, args.length, args.first_diff)
        many = [make_pair(gen, vocab, args.length + int(torch.randint(-5, 6, (1,), generator=gen)),
                          args.first_diff + int(torch.randint(-3, 4, (1,), generator=gen)))
                for _ in range(args.examples)]
        warm = make_pair(gen, vocab, max(args.first_diff + 6, 16), args.first_diff)
        # (its own generator: the shared one draws the timed pairs of every later shape)
        warm_short = make_pair(torch.Generator().manual_seed(2), vocab, max(args.first_diff + 6, 16) - 2,
                               max(1, args.first_diff - 1))
        L, H, T = geo.n_layers, geo.n_heads, args.length
        n_full = L * H * T
        subset_gen = torch.Generator().manual_seed(1)
        subset = [(int(torch.randint(0, L, (1,), generator=subset_gen)), int(torch.randint(0, H, (1,), generator=subset_gen)),
                   int(torch.randint(0, T, (1,), generator=subset_gen))) for _ in range(args.ref_patches)]
        for dname in wanted:
            dtype = dtypes[dname]
            model.to(dtype)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            # fast path: warm-up (compiles the fused swap-ins on CUDA: every shape of the timed sweep), then timed
            t_warm, _ = timed(lambda: patch_heads(model, [pair], keep_incorrect=True, progress=False), device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            reps = args.reps if dname == "bf16" or args.quick else 1
            t_fast, fast = timed(lambda: patch_heads(model, [pair], keep_incorrect=True, progress=False), device, reps)
            peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
            stats = fast.stats
            tflops = flops_of(model, stats, args.length, args.first_diff) / t_fast / 1e12
            # reference on a subset (first trace is a warm-up), extrapolated to every layer x head x position
            patch_heads_reference(model, [pair], keep_incorrect=True, patches=subset[:1], progress=False)
            t_ref, ref = timed(lambda: patch_heads_reference(model, [pair], keep_incorrect=True, patches=subset,
                                                             progress=False), device)
            per_patch = t_ref / max(1, len(subset))
            t_ref_full = per_patch * n_full
            idx = torch.tensor(subset)
            a = fast.patched_logit_diff[0, idx[:, 0], idx[:, 1], idx[:, 2]]
            b = ref.patched_logit_diff[0, idx[:, 0], idx[:, 1], idx[:, 2]]
            err = float((a - b).abs().max())
            rows.append(f"| {name} | {dname} | {n_full:,} | {per_patch * 1e3:.1f} ms | {fmt_s(t_ref_full)} | "
                        f"{t_fast:.3f} | {t_ref_full / t_fast:,.0f}× | {stats.get('forwards')} (≤{stats.get('max_rows_per_forward')} rows"
                        f"{', OOM halvings ' + str(stats['oom_halvings']) if stats.get('oom_halvings') else ''}) | "
                        f"{peak:.2f} | {tflops:.3g} | {err:.2e} | {stats.get('base_row_max_dev', float('nan')):.1e} |")
            print(rows[-1], flush=True)
            if over_budget():
                continue
            t_attr, attr = timed(lambda: attribution_patching_heads(model, [pair], keep_incorrect=True,
                                                                    progress=False), device)
            rep = attribution_error(attr, fast)
            extra.append(f"| {name} | {dname} | attribution patching (2 fwd + 1 bwd; on a random model a bf16 noise floor, BENCHMARKS.md) | 1 example | – | {t_attr:.3f} | "
                         f"{t_attr:.3f} | corr {rep['correlation']:.3f}, max abs err {rep['max_abs_error']:.2e}, "
                         f"rel {rep['relative_max_error']:.2f} vs exact |")
            print(extra[-1], flush=True)
            if dname in args.examples_dtypes.split(",") and args.examples:
                # warm the merged path's shapes first (the masked attention compiles on its first call)
                patch_heads(model, [warm, warm_short], keep_incorrect=True, progress=False)
                for per_forward in per_forwards:  # (None merges as many as pay; 1: one at a time)
                    # (short sweeps: best of two, the first also meeting this layout's shapes for the first time)
                    t_many, res = timed(lambda: patch_heads(model, many, keep_incorrect=True, progress=False,
                                                            examples_per_forward=per_forward), device,
                                        2 if t_fast < 1.0 else 1)
                    merged = res.stats.get("max_examples_per_forward")
                    extra.append(f"| {name} | {dname} | eager, examples_per_forward={per_forward} | {len(many)} "
                                 f"examples (T {min(len(p.clean_ids) for p in many)}–"
                                 f"{max(len(p.clean_ids) for p in many)}) | auto | {t_many:.3f} | "
                                 f"{t_many / len(many):.3f} | {t_many / t_fast:.1f}× one example; "
                                 f"{res.stats.get('forwards')} forwards, ≤{merged} examples a forward |")
                    print(extra[-1], flush=True)
                    if merged == 1 and per_forward is None and per_forwards[1:2] == [1]:
                        break  # auto already ran one example at a time
            if dname == "bf16":  # (gpt_neo: its swapped attention against HF's)
                patch_heads(model, [warm], keep_incorrect=True, progress=False, fused=False)
                t_u, res = timed(lambda: patch_heads(model, [pair], keep_incorrect=True, progress=False,
                                                     fused=False), device, reps)
                a = res.patched_logit_diff[0, idx[:, 0], idx[:, 1], idx[:, 2]]
                extra.append(f"| {name} | {dname} | HF eager modules (fused=False) | 1 example | auto | {t_u:.3f} | "
                             f"{t_u:.3f} | fused is {t_u / t_fast:.2f}× faster; first fused sweep (compiles) "
                             f"{t_warm:.1f} s; max abs vs ref {float((a - b).abs().max()):.1e} |")
                print(extra[-1], flush=True)
            if dname == "bf16":
                for bs in buckets:
                    t_b, res = timed(lambda: patch_heads(model, [pair], keep_incorrect=True, progress=False,
                                                         bucket_size=bs), device, reps)
                    extra.append(f"| {name} | {dname} | eager | 1 example | {bs} | {t_b:.3f} | {t_b:.3f} | "
                                 f"{res.stats.get('forwards')} |")
                    print(extra[-1], flush=True)
                if args.profile and not over_budget():
                    profile_sweep(model, pair, device, name)
                if args.sync_debug and device.type == "cuda":
                    sync_report(model, pair, name)
                if args.cpu_profile:
                    print_host_profile(lambda: patch_heads(model, [pair], keep_incorrect=True, progress=False), name)
                    for compile_ in (False, True):  # the compiled swap-ins' CPU cost per call, isolated
                        kw = dict(keep_incorrect=True, progress=False, compile=compile_)
                        patch_heads(model, [warm], **kw)
                        t_c, _ = timed(lambda: patch_heads(model, [pair], **kw), device, reps)
                        print(f"| {name} | bf16 | fused, compile={compile_} | {t_c:.3f} s |", flush=True)
                if args.sdpa and model.config.model_type != "gpt_neo" and not over_budget():
                    model.set_attn_implementation("sdpa")
                    patch_heads(model, [warm], keep_incorrect=True, progress=False)
                    t_s, res = timed(lambda: patch_heads(model, [pair], keep_incorrect=True, progress=False),
                                     device, reps)
                    a = res.patched_logit_diff[0, idx[:, 0], idx[:, 1], idx[:, 2]]
                    extra.append(f"| {name} | {dname} | sdpa | 1 example | auto | {t_s:.3f} | {t_s:.3f} | "
                                 f"{res.stats.get('forwards')} (max abs vs eager ref {float((a - b).abs().max()):.1e}) |")
                    print(extra[-1], flush=True)
                    model.set_attn_implementation("eager")

    for name, config in configs.items():
        if over_budget():
            rows.append(f"| {name} | skipped: over the --time-budget |")
            continue
        try:
            run_shape(name, config)
        except Exception as exc:  # noqa: BLE001 - one broken shape must not lose the others
            traceback.print_exc()
            rows.append(f"| {name} | failed: {type(exc).__name__}: {str(exc)[:200]} |")
        gc.collect()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    table = [
        f"Head patching, full layer×head×position sweep of one {args.length}-token example "
        f"(first difference at {args.first_diff}); {env}.",
        "", header, sep, *rows, "",
        "| shape | dtype | variant (attention) | examples | bucket size | s | s / example | forwards / notes |",
        "|---|---|---|---|---|---|---|---|", *extra, "",
    ]
    if small_rows:
        table += [f"Small-model cases (bf16; arithmetic bound: the exact sweep's FLOPs at {PEAK_TFLOPS:.0f} TFLOP/s; GPU "
                  "busy: kernel time over wall time):", "",
                  "| shape | dtype | case | s | row-token-layers | arithmetic | bound s | s / bound | forwards | GPU busy |",
                  "|---|---|---|---|---|---|---|---|---|---|", *small_rows, ""]
    if deviation_rows:
        table += ["bf16 against float32 (mean |difference| of the patched logit differences, one-example sweeps):", "",
                  "| shape | length | examples | mean | per example | entries finite in one dtype only |",
                  "|---|---|---|---|---|---|", *deviation_rows, ""]
    text = "\n".join(table)
    print("\n" + text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")


if __name__ == "__main__":
    main()
