"""Where the small-model sweeps spend their time: per case of scripts/bench.py's SMALL_CASES (SmolLM2-135M and
TinyStories-2L shapes, random weights, bf16 on a GPU): wall and GPU-busy seconds at the default bucketing and at
1-9 buckets, the sweep's phases (cProfile cumulative: metrics, clean activations and prefix caches, bucket
forwards), the host's top functions, and with ``--kernels`` the GPU's top kernels. ``--tiles``: row_attention's
tile choices, head-major and position-major, at SmolLM2's, Qwen2.5-0.5B's and Llama-3.2-1B's sweep shapes instead
(``TILE_SHAPES``; CUDA), with the default's bandwidth, its time without rotary and torch's causal attention over the
own tokens as a reference point. ``--idle``: where the GPU waits for the host, instead of the bucket scan and the
host's profile (CUDA): each idle gap of one profiled sweep attributed to the Python code that launched the kernel
ending it (``idle_gaps``). ``--host``: the host's seconds in each of the sweep's phases and per-bucket helpers,
unprofiled (``host_timeline``: timers around them, median of five sweeps), instead of the bucket scan and the
profile; a function's time includes any wait for the GPU inside it (those that copy results to the host).
``--floor``: the GPU's kernel time of one profiled sweep by kind (``kernel_kind``: matrix products, attention,
norms, ...), the products' rate by the block count, and what issue 18's target for the case leaves for the rest
once the products alone are paid (``floor_lines``; CUDA); by default for SmolLM2 and TinyStories (their cases) and
Qwen2.5-0.5B and Llama-3.2-1B (their one-example case).

python scripts/profile_small.py [--quick] [--kernels] [--buckets 1,2,3] [--tiles] [--idle] [--host] [--floor]
(--quick: tiny, CPU)
"""
from __future__ import annotations

import argparse
import bisect
import functools
import io
import json
import os
import pstats
import statistics
import sys
import tempfile
import time
from collections import Counter, defaultdict
from contextlib import contextmanager

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from scripts.bench import (LARGE_CASES, SMALL_CASES, SMALL_SHAPES, gpu_busy_seconds, host_profile,  # noqa: E402
                           make_pair, quick_configs, real_configs, sync, timed)
from helpers.models.tiny_models import build_random_model  # noqa: E402
from helpers.models.architectures import blocks  # noqa: E402
from helpers.patching import patch_heads  # noqa: E402

PHASES = ("unpatched_runs", "group_activations_and_prefix_caches", "clean_activations_and_prefix_caches",
          "clean_activations", "prefix_caches", "run_chunked", "sweep_group", "forward")


def phase_profile(run) -> str:
    """The sweep's phases (cumulative seconds) and the host's top functions (own time) over one call of ``run``."""
    prof = host_profile(run)
    st = pstats.Stats(prof)
    lines = []
    for (file, line, fn), (cc, nc, tt, ct, callers) in st.stats.items():
        if fn in PHASES and "helpers/patching" in file:
            lines.append(f"    {fn:20s} {os.path.basename(file)}:{line} calls {nc:5d} cum {ct:.3f} s")
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(18)
    return "\n".join(sorted(lines)) + "\n" + "\n".join(out.getvalue().splitlines()[6:32])


def idle_gaps(events: list[dict], min_gap_us: float = 5.0) -> tuple[float, float, Counter, Counter]:
    """(kernel seconds, idle seconds, {label: idle seconds}, {label: gaps}) from a torch.profiler chrome trace's
    ``traceEvents`` (profiled with CUDA activity and ``with_stack=True``). Every gap longer than ``min_gap_us``
    between the GPU's kernels and copies is the host's: it is labelled with the two innermost helpers/ Python frames
    running when the kernel ending the gap was launched (the launch found by its correlation id; outside helpers/,
    the innermost frame), so the labels say which host code the GPU waited for. (A profiled host runs slower than
    an unprofiled one: the labels' shares, not their seconds, are the reading.)"""
    kernels = sorted((e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e),
                     key=lambda e: e["ts"])
    launches = {e["args"]["correlation"]: e for e in events
                if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})}
    frames = sorted((e for e in events if e.get("cat") == "python_function" and "dur" in e), key=lambda e: e["ts"])
    starts = [f["ts"] for f in frames]

    def label(ts: float) -> str:
        # the frames enclosing ts, outermost first (looked for among the 4,000 that started last before it)
        i = bisect.bisect_right(starts, ts)
        names = [f["name"] for f in frames[max(0, i - 4000):i] if f["ts"] + f["dur"] >= ts]
        ours = [n for n in names if "helpers/" in n]
        return " < ".join(n.split("/")[-1] for n in ours[-2:][::-1]) if ours else (names[-1] if names else "?")

    idle, by_label, count = 0.0, Counter(), Counter()
    end = kernels[0]["ts"] if kernels else 0.0
    for k in kernels:
        gap = k["ts"] - end
        if gap > min_gap_us:
            launch = launches.get(k.get("args", {}).get("correlation"))
            where = label(launch["ts"]) if launch is not None else "?"
            idle += gap
            by_label[where] += gap / 1e6
            count[where] += 1
        end = max(end, k["ts"] + k["dur"])
    return sum(k["dur"] for k in kernels) / 1e6, idle / 1e6, by_label, count


# where the host's time in a sweep goes: its phases and the helpers every bucket forward calls, as (owner, name) of
# the attribute each caller looks up (a module's imported name, or a class's method)
def _host_targets():
    from helpers.patching import block_tails, bucket_forwards, model_calls, sweep
    return [(sweep, "_patch_sweep"), (sweep, "unpatched_runs"), (sweep, "example_groups"), (sweep, "sweep_group"),
            (sweep, "build_result"), (model_calls.ModelCalls, "forward"),
            (bucket_forwards, "group_activations_and_prefix_caches"), (bucket_forwards, "run_chunked"),
            (bucket_forwards, "bucket_rows"), (bucket_forwards, "auto_chunk_rows"), (bucket_forwards, "to_device"),
            (bucket_forwards, "row_metric"), (bucket_forwards, "placed_results"), (block_tails, "for_group"),
            (block_tails.BlockTails, "flat")]


@contextmanager
def timed_functions(targets):
    """While inside, each (owner, name) of ``targets`` is wrapped in a timer; yields {"owner.name": [seconds, calls]}
    (nested calls count in both); the originals are put back on exit."""
    totals: dict = defaultdict(lambda: [0.0, 0])
    saved = [(owner, name, owner.__dict__[name]) for owner, name in targets]

    def timer(fn, label):
        @functools.wraps(fn)
        def wrapped(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                totals[label][0] += time.perf_counter() - start
                totals[label][1] += 1
        return wrapped

    try:
        for owner, name, fn in saved:
            setattr(owner, name, timer(fn, f"{owner.__name__.split('.')[-1]}.{name}"))
        yield totals
    finally:
        for owner, name, fn in saved:
            setattr(owner, name, fn)


def host_timeline(run, device, reps: int = 5) -> tuple[float, dict]:
    """(median wall seconds, {function: (median seconds a sweep, calls a sweep)}) over ``reps`` unprofiled calls of
    ``run`` with ``_host_targets`` timed (no syncs added; each call ends with one)."""
    walls, per = [], defaultdict(list)
    calls: dict = {}
    with timed_functions(_host_targets()) as totals:
        for _ in range(reps):
            totals.clear()
            sync(device)
            start = time.perf_counter()
            run()
            sync(device)
            walls.append(time.perf_counter() - start)
            for label, (seconds, n) in totals.items():
                per[label].append(seconds)
                calls[label] = n
    return statistics.median(walls), {k: (statistics.median(v), calls[k]) for k, v in per.items()}


def host_report(run, device, reps: int = 5) -> str:
    """``host_timeline`` as lines to print, longest first."""
    wall, per = host_timeline(run, device, reps)
    lines = [f"   host seconds a sweep (median of {reps}, unprofiled; wall {wall * 1e3:.1f} ms):"]
    for label, (t, n) in sorted(per.items(), key=lambda kv: -kv[1][0]):
        lines.append(f"     {t * 1e3:8.2f} ms  x{n:<4d} {label}")
    return "\n".join(lines)


def profiled_events(run, device, with_stack: bool = False) -> tuple[float, list[dict]]:
    """(profiled wall seconds, the chrome trace's events) of one call of ``run`` on ``device`` (CUDA)."""
    from torch.profiler import ProfilerActivity, profile

    sync(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=with_stack) as prof:
        start = time.perf_counter()
        run()
        sync(device)
        wall = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            return wall, json.load(f)["traceEvents"]


def idle_report(run, device, rows: int = 12) -> str:
    """``idle_gaps`` of one profiled call of ``run`` on ``device`` (CUDA), as lines to print."""
    wall, events = profiled_events(run, device, with_stack=True)
    busy, idle, by_label, count = idle_gaps(events)
    lines = [f"   profiled wall {wall:.3f} s: GPU kernels {busy:.3f} s, idle gaps {idle:.3f} s, before a kernel "
             f"launched in:"]
    lines += [f"     {t * 1e3:8.2f} ms in {count[where]:5d} gaps  {where}" for where, t in by_label.most_common(rows)]
    return "\n".join(lines)


# A kernel's kind by its name, first match wins: attention first (torch's flash and memory-efficient kernels name
# cutlass and gemm types inside), then cuBLAS's GEMMs, GEMVs and split-k reductions (nvjet, xmma, cutlass) and the
# gate/up epilogue as the products; the elementwise kernels told apart by their functor, index and copy kernels
# before additions ("additions": torch's add kernels, the residual additions and any other, e.g. in GPT-Neo's GELU).
KERNEL_KINDS = (("attention", ("row_attention", "attention", "flash", "fmha", "merge_kernel", "softmax")),
                ("matrix products", ("gemm", "gemv", "splitkreduce", "nvjet", "xmma", "cutlass", "gate_up_silu")),
                ("rotary", ("rotary",)),
                ("norms", ("norm", "rowwisemoments")),
                ("gathers and copies", ("index", "gather", "scatter", "copy", "catarray", "memcpy", "memset")),
                ("additions", ("_add<", "addfunctor", "add_kernel")))

# issue 18's targets, bf16 wall seconds (stated for an NVIDIA H200): (shape name's start, case label) -> seconds
TARGETS = {("SmolLM2", "1 example, T 71"): 0.15, ("SmolLM2", "10 examples, T 71"): 1.0,
           ("SmolLM2", "10 examples, T 26"): 0.2, ("TinyStories", "10 examples, T 71"): 0.05,
           ("Qwen2.5", "1 example, T 60"): 0.30, ("Llama-3.2", "1 example, T 60"): 0.90}


def kernel_kind(name: str) -> str:
    """``KERNEL_KINDS``' kind of a GPU kernel or copy named ``name``; "other" where none matches."""
    low = name.lower()
    return next((kind for kind, keys in KERNEL_KINDS if any(k in low for k in keys)), "other")


def kernel_seconds_by_kind(events: list[dict]) -> dict[str, float]:
    """{kind: GPU seconds} over a chrome trace's kernels, copies and memsets (one stream: no overlap counted twice)."""
    out: dict = defaultdict(float)
    for e in events:
        if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e:
            out[kernel_kind(e["name"]) if e["cat"] == "kernel" else "gathers and copies"] += e["dur"] / 1e6
    return dict(out)


def floor_lines(by_kind: dict[str, float], product_flop: float, wall: float, target: float | None) -> list[str]:
    """The GPU's seconds by kind (largest first) within a sweep of ``wall`` seconds, the products' rate
    (``product_flop``: 2 x block params x the sweep's row-token-layers, which count a head sweep's last layer at the
    answer position alone: its q/k/v at the other positions and the rows computed aside are not counted, so the
    rate is a little low), and, against ``target`` (wall seconds), the time the products alone leave for the rest."""
    busy = sum(by_kind.values())
    products = by_kind.get("matrix products", 0.0)
    kinds = ", ".join(f"{k} {t * 1e3:.1f} ms ({t / busy:.0%})"
                      for k, t in sorted(by_kind.items(), key=lambda kv: -kv[1]))
    lines = [f"   GPU kernels {busy * 1e3:.1f} ms of a {wall * 1e3:.1f} ms wall: {kinds}"]
    if products > 0:
        lines.append(f"   matrix products at {product_flop / products / 1e12:.0f} TFLOP/s by the block count "
                     f"({product_flop / 1e12:.1f} TFLOP)")
    if target is not None:
        rest = busy - products
        lines.append(f"   issue 18's target {target * 1e3:.0f} ms: the products alone leave "
                     f"{(target - products) * 1e3:.1f} ms for the rest, whose kernels take {rest * 1e3:.1f} ms now "
                     f"({'within' if rest <= target - products else 'over'} it), the GPU idle "
                     f"{max(wall - busy, 0) * 1e3:.1f} ms of the wall besides")
    return lines


def case_target(name: str, label: str) -> float | None:
    """Issue 18's target (wall seconds) for the case ``label`` of the shape ``name`` (``TARGETS``), or None."""
    return next((goal for (shape, case), goal in TARGETS.items() if name.startswith(shape) and case == label), None)


def cases_of(name: str, floor: bool, quick: bool) -> tuple:
    """The cases run for the shape ``name``: ``SMALL_CASES``, except under ``--floor`` for the shapes outside
    ``SMALL_SHAPES`` (Qwen2.5-0.5B, Llama-3.2-1B), which run ``LARGE_CASES`` (their targets' case)."""
    return SMALL_CASES if not floor or quick or any(s in name for s in SMALL_SHAPES) else LARGE_CASES


def floor_report(run, device, model, stats: dict, target: float | None, wall: float) -> str:
    """``floor_lines`` of one profiled call of ``run`` (CUDA) whose unprofiled wall time is ``wall``, as lines."""
    _, events = profiled_events(run, device)
    product_flop = 2 * sum(p.numel() for p in blocks(model)[0].parameters()) * stats.get("row_token_layers", 0)
    return "\n".join(floor_lines(kernel_seconds_by_kind(events), product_flop, wall, target))


# (name, query heads, key/value heads, [(rows, fed tokens q)]): sweep-like row_attention calls, T 71 (prefix 71 - q)
TILE_SHAPES = (("SmolLM2-135M", 9, 3, ((4000, 7), (2000, 35), (1000, 63), (4000, 11))),
               ("Qwen2.5-0.5B", 14, 2, ((2000, 9), (1000, 35), (600, 63))),
               ("Llama-3.2-1B", 32, 8, ((1500, 9), (800, 35), (400, 63))))


def tile_scan(device) -> None:
    """row_attention alone at sweep shapes (``TILE_SHAPES``, d_head 64, one example's prefix): each tile choice's
    time, head-major and position-major (``RowTiles``; position-major in full width and in halves), and its largest
    difference from the default's output; then the default's bandwidth, its time without rotary, and torch's causal
    attention over the own tokens alone."""
    from helpers.patching import triton_kernels as tk

    gen = torch.Generator(device=device).manual_seed(0)
    for name, heads, kv, shapes in TILE_SHAPES:
        group = heads // kv
        for b, q in shapes:
            s = 71 - q
            qkv = torch.randn(b, q, heads + 2 * kv, 64, device=device, dtype=torch.bfloat16, generator=gen)
            query, key, value = qkv.split([heads, kv, kv], dim=2)
            pk, pv = (torch.randn(1, kv, s, 64, device=device, dtype=torch.bfloat16, generator=gen) for _ in range(2))
            cos = torch.randn(1, q, 64, device=device, generator=gen).to(torch.bfloat16)
            sin = torch.randn(1, q, 64, device=device, generator=gen).to(torch.bfloat16)
            call = lambda tiles=None: tk.row_attention(query, key, value, pk, pv, 0.125, rotary=(cos, sin),  # noqa
                                                       tiles=tiles)
            head_major, pos_major = (tk.row_attention_tiles(q, 64, group, position_major=p) for p in (False, True))
            ref = call(head_major)
            options = {head_major, pos_major}
            # (head-major's tile choices were within ~20 % of each other at these shapes: 2026-12-05's scan)
            bj = max(16, tk.triton.next_power_of_2(q))
            for bm in (64, 128):
                for w in (4, 8):
                    for bn in (16, 32, 64):
                        if bn <= bj:
                            for halves in (False, True):  # (query and key in full width or in halves)
                                options.add(tk.RowTiles(bm, bn, 64, w, True, halves))
            rows = []
            for tiles in sorted(options):
                try:
                    out = call(tiles)
                    t, _ = timed(lambda: [call(tiles) for _ in range(20)], device, 3)
                    rows.append((t / 20, tiles, float((out.float() - ref.float()).abs().max())))
                except Exception as exc:  # noqa: BLE001 (register limits of a tile choice)
                    rows.append((float("inf"), tiles, type(exc).__name__))
            rows.sort(key=lambda r: r[0])
            base = next(r[0] for r in rows if r[1] == head_major)
            pos = next(r[0] for r in rows if r[1] == pos_major)
            print(f"\nrow_attention {name} b {b}, q {q}, s {s}: head-major {tuple(head_major)} {base * 1e6:.0f} us;"
                  f" position-major (the default) {tuple(pos_major)} {pos * 1e6:.0f} us ({base / pos:.2f}x); best:",
                  flush=True)
            for t, tiles, err in rows[:5]:
                print(f"   {tuple(tiles)}: {t * 1e6:.0f} us ({base / t:.2f}x), max diff {err}", flush=True)
            # what bounds it: the bytes it must move (queries, own keys and values read, z written; the prefix is
            # shared), the rotary it applies as it loads (timed without), and torch's causal attention over the own
            # tokens alone, keys repeated per query head (no prefix: a reference point, not the same arithmetic)
            n_bytes = b * q * (2 * heads + 2 * kv) * 64 * qkv.element_size()
            plain, _ = timed(lambda: [tk.row_attention(query, key, value, pk, pv, 0.125, tiles=pos_major)
                                      for _ in range(20)], device, 3)
            own = [t.transpose(1, 2)
                   for t in (query, key.repeat_interleave(group, 2), value.repeat_interleave(group, 2))]
            sdpa, _ = timed(lambda: [F.scaled_dot_product_attention(*own, is_causal=True) for _ in range(20)],
                            device, 3)
            print(f"   the default moves {n_bytes / pos / 1e9:.0f} GB/s; without rotary {plain / 20 * 1e6:.0f} us "
                  f"({pos * 20 / plain:.2f}x); torch's causal attention over the own tokens alone "
                  f"{sdpa / 20 * 1e6:.0f} us", flush=True)


def bucket_scan(run, pairs, T: int, counts: list[int], device) -> None:
    """Wall and GPU-busy seconds of ``run`` (a sweep of ``pairs``, prompts of length T) at each bucket count."""
    span = max(T - int(torch.nonzero(torch.tensor(p.clean_ids) != torch.tensor(p.corrupt_ids))[0]) for p in pairs)
    for nb in counts:
        size = -(-span // nb)
        sized = lambda: run(bucket_size=size)  # noqa: E731
        sized()
        tb, rb = timed(sized, device, 3)
        bb = gpu_busy_seconds(sized, device) if device.type == "cuda" else float("nan")
        print(f"   buckets {nb:2d} (size {size:2d}): {tb:.3f} s, GPU busy {bb:.3f} s, forwards "
              f"{rb.stats.get('forwards')}, rtl {rb.stats.get('row_token_layers', 0) / 1e6:.2f} M", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--shapes", default=None, help="default SmolLM2,TinyStories (with --floor: and Qwen,Llama)")
    ap.add_argument("--buckets", default="1,2,3,4,6,9")
    ap.add_argument("--kernels", action="store_true")
    ap.add_argument("--tiles", action="store_true", help="only the row_attention tile scan (CUDA)")
    ap.add_argument("--idle", action="store_true", help="where the GPU waits for the host, by launching code (CUDA)")
    ap.add_argument("--host", action="store_true", help="the host's seconds per sweep phase and helper (unprofiled)")
    ap.add_argument("--floor", action="store_true",
                    help="GPU time by kernel kind against issue 18's targets (CUDA; also Qwen's and Llama's case)")
    args = ap.parse_args()
    shapes = args.shapes or ("SmolLM2,TinyStories,Qwen,Llama" if args.floor else "SmolLM2,TinyStories")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.tiles:
        return tile_scan(device)
    configs = quick_configs() if args.quick else real_configs()
    configs = {k: v for k, v in configs.items() if args.quick or any(s in k for s in shapes.split(","))}
    print(f"device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}")
    for name, config in configs.items():
        with torch.device(device):
            model = build_random_model(config, seed=0, dtype=torch.float32)
        model.to(torch.bfloat16 if device.type == "cuda" else torch.float32)
        gen = torch.Generator().manual_seed(3)
        for label, n, T, first in cases_of(name, args.floor, args.quick):
            if args.quick:
                T, first = min(T, 24), min(first, 10)
            pairs = [make_pair(gen, model.config.vocab_size, T,
                               max(1, first + int(torch.randint(-2, 3, (1,), generator=gen)))) for _ in range(n)]
            run = lambda **kw: patch_heads(model, pairs, keep_incorrect=True, progress=False, **kw)  # noqa: E731
            run()
            t, res = timed(run, device, 3)
            busy = gpu_busy_seconds(run, device) if device.type == "cuda" else float("nan")
            s = res.stats
            print(f"\n== {name} | {label}: {t:.3f} s, GPU busy {busy:.3f} s, forwards {s.get('forwards')}, "
                  f"rows {s.get('rows')}, max rows/fwd {s.get('max_rows_per_forward')}, "
                  f"rtl {s.get('row_token_layers', 0) / 1e6:.2f} M, ex/fwd {s.get('max_examples_per_forward')}",
                  flush=True)
            if args.idle:  # instead of the bucket scan and the host profile
                print(idle_report(run, device) if device.type == "cuda" else "   (--idle needs CUDA)", flush=True)
            if args.host:  # (likewise)
                print(host_report(run, device), flush=True)
            if args.floor:  # (likewise)
                print(floor_report(run, device, model, s, case_target(name, label), t) if device.type == "cuda"
                      else "   (--floor needs CUDA)", flush=True)
            if not (args.idle or args.host or args.floor):
                bucket_scan(run, pairs, T, [int(b) for b in args.buckets.split(",")], device)
                print(phase_profile(run), flush=True)
            if args.kernels and device.type == "cuda":
                from torch.profiler import ProfilerActivity, profile
                sync(device)
                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    run()
                    sync(device)
                print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=14,
                                                max_name_column_width=50), flush=True)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
