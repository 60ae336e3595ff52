"""Compile every Triton kernel of helpers.patching.triton_kernels for an H100 (sm_90), no GPU needed.

Triton's interpreter (the CPU kernel tests) skips what its compiler checks: types, tile shapes, ``tl.dot``'s minimum
sizes, names that change shape inside a loop. Run as a script, without TRITON_INTERPRET (the test suite sets it on a
CPU), by tests/test_fused_modules.py; prints one line per compiled configuration, exits 1 on the first failure.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from helpers.patching import triton_kernels as tk  # noqa: E402

_FLOAT32_POINTERS = {"la_ptr", "lb_ptr"}  # the merge's log-sum-exps
_INT64_POINTERS = {"ex_ptr", "start_ptr"}  # row_attention's row -> example and example -> first slot


def _signature(kernel, dtype: str) -> dict:
    sig = {}
    for p in kernel.params:
        if p.is_constexpr:
            sig[p.name] = "constexpr"
        elif p.name.endswith("_ptr"):
            sig[p.name] = ("*fp32" if p.name in _FLOAT32_POINTERS else "*i64" if p.name in _INT64_POINTERS
                           else f"*{dtype}")
        else:
            sig[p.name] = "fp32" if p.name == "scale" else "i32"
    return sig


def configurations():
    """(kernel, element type, constexprs, warps): what the launch wrappers pass, for the shapes the sweep meets."""
    for dtype in ("bf16", "fp32"):
        for d_head in (16, 32, 64, 128):
            yield tk._rotary_kernel, dtype, dict(HALF=d_head // 2, BLOCK_R=tk._BLOCK_R), 4
            yield tk._merge_kernel, dtype, dict(D=d_head, BLOCK_R=tk._BLOCK_R), 4
        yield tk._silu_mul_kernel, dtype, dict(BLOCK_R=1, BLOCK_C=1024), 4
    # llama (4 query heads a key/value head), qwen2 (7), the tiny test models (2, head size 16), the embedded
    # llama-cs3 (2, head size 32), head size 128, gpt_neo (1: TinyStories-2L head size 64, the embedded ones 32)
    for group, d_head, q_lens in ((4, 64, (3, 9, 60, 128)), (7, 64, (2, 33)), (2, 16, (12,)), (2, 32, (12, 60)),
                                  (1, 128, (100, 128)), (1, 64, (12, 61)), (1, 32, (20,))):
        for q_len in q_lens:
            assert tk.row_attention_applies(q_len, d_head)
            for position_major, halves in ((False, False), (True, False), (True, True)):
                t = tk.row_attention_tiles(q_len, d_head, group, position_major)._replace(halves=halves)
                if halves and d_head < 32:  # (row_attention_tiles' rule: tl.dot's minimum K)
                    continue
                for dtype, per_row, rotary in (("bf16", False, True), ("bf16", True, True), ("bf16", False, False),
                                               ("bf16", True, False), ("fp16", True, True)):
                    yield tk._row_attention_kernel, dtype, dict(GROUP=group, BLOCK_M=t.block_m, BLOCK_N=t.block_n,
                                                                BLOCK_K=t.block_k, D=d_head, PER_ROW=per_row,
                                                                ROTARY=rotary, POS_MAJOR=position_major,
                                                                HALVES=halves), t.warps


def epilogue_configurations():
    """(signature, constexprs, warps, stages) of ``matmul_epilogues``' kernel for the tiles ``epilogue_tiles`` picks
    (SmolLM2's, Qwen's and Llama's depths) and the fallback for GPUs with less shared memory."""
    from helpers.patching import matmul_epilogues as me
    for t in (me.epilogue_tiles(576), me.epilogue_tiles(2048), me._SMALLER):
        for dtype in ("bf16", "fp16"):
            sig = {"x_desc": f"tensordesc<{dtype}[{t.block_m},{t.block_k}]>",
                   "w_desc": f"tensordesc<{dtype}[{t.block_n},{t.block_k}]>",
                   "out_desc": f"tensordesc<{dtype}[{t.block_m},{t.block_n // 2}]>",
                   "n_rows": "i32", "n_cols": "i32", "k_dim": "i32"}
            constexprs = dict(BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_K=t.block_k, GROUP_M=8, PROGRAMS=132,
                              FLATTEN=t.flatten)
            sig.update({k: "constexpr" for k in constexprs})
            yield sig, constexprs, t.warps, t.stages


def compile_jobs():
    """(kernel, signature, constexprs, options) of every configuration above: the row-wise kernels' and the matmul
    epilogue's (where this Triton has TensorDescriptor)."""
    for kernel, dtype, constexprs, warps in configurations():
        yield kernel, _signature(kernel, dtype), constexprs, {"num_warps": warps}
    from helpers.patching import matmul_epilogues as me
    if me.TensorDescriptor is not None:
        for sig, constexprs, warps, stages in epilogue_configurations():
            yield me._gate_up_silu_kernel, sig, constexprs, {"num_warps": warps, "num_stages": stages}


def main() -> int:
    if tk.triton is None or os.environ.get("TRITON_INTERPRET") == "1":
        print("needs Triton, not in interpreter mode", file=sys.stderr)
        return 2
    target = GPUTarget("cuda", 90, 32)
    n = 0
    for kernel, signature, constexprs, options in compile_jobs():
        src = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
        # (the element type: the first pointer's or descriptor's)
        dtype = next(v for v in signature.values() if v.startswith(("*", "tensordesc"))).lstrip("*")
        try:
            compiled = triton.compile(src, target=target, options=options)
        except Exception as exc:  # noqa: BLE001 - report which configuration, then fail
            print(f"FAILED {kernel.__name__} {dtype} {constexprs} {options}: {type(exc).__name__}: {exc}")
            return 1
        n += 1
        # (an H100 has 227 KiB a block; an epilogue launch that needs more falls back to matmul_epilogues._SMALLER)
        print(f"ok {kernel.__name__} {dtype} {constexprs} {options} shared {compiled.metadata.shared} bytes",
              flush=True)
    print(f"compiled {n} configurations for sm_90")
    return 0


if __name__ == "__main__":
    sys.exit(main())
