"""The gated MLP's gate/up matmul with ``silu(gate) * up`` as its epilogue (CUDA fp16/bf16 on GPUs with TMA).

A sweep's MLP wrote gate and up ([rows, 2 x inter]) for Triton's ``silu_mul`` to read back and halve: at small
models' widths that pass took 14-16 % of a sweep's GPU time, at 84 % of the memory bandwidth. Here one persistent
Triton kernel (a program per SM, looping over output tiles, its operands fed by the Tensor Memory Accelerator)
computes the product and applies ``silu(gate) * up`` to each tile before storing it, so gate and up never reach
memory. The weight's rows interleave gate and up (``interleave_gate_up``): each output tile then holds both halves
of its columns, pairs of neighbouring columns that one thread holds.

Same results bit for bit: the product is rounded to the output dtype first, as cuBLAS stores it, then
``silu_mul``'s formula runs in float32 and is rounded once. Measured equal to cuBLAS + ``silu_mul`` on an H100
(bf16; SmolLM2-135M, Qwen2.5-0.5B and Llama-3.2-1B MLP shapes at 8 to 40,000 rows: no element differs), and whole
sweeps' patched values are unchanged (BENCHMARKS.md). float32 stays with cuBLAS (``tl.dot`` would round to tf32).
Needs a GPU with TMA (compute capability 9.0+, Hopper) and a Triton with ``TensorDescriptor``; ``available`` says
where. (Folding the residual additions into the output projections the same way was measured and not kept:
BENCHMARKS.md.)
"""
from __future__ import annotations

import functools
import warnings
from typing import NamedTuple

import torch

from helpers.patching import triton_kernels
from helpers.patching.triton_kernels import triton

try:
    import triton.runtime.errors
    from triton.tools.tensor_descriptor import TensorDescriptor
except Exception:  # pragma: no cover - older Triton, or none
    TensorDescriptor = None

# the fused gate/up matmul where it applies (benchmarks compare it with cuBLAS + silu_mul by setting this)
FUSED_SILU_EPILOGUE = True

if triton is not None and TensorDescriptor is not None:
    import triton.language as tl

    @triton.jit
    def _tile_of(tile, n_m, n_n, GROUP_M: tl.constexpr):
        # GROUP_M consecutive row tiles per column tile, so that they find its weight tiles in L2
        per_group = GROUP_M * n_n
        first_m = (tile // per_group) * GROUP_M
        size_m = tl.minimum(n_m - first_m, GROUP_M)
        return first_m + (tile % per_group) % size_m, (tile % per_group) // size_m

    @triton.jit(do_not_specialize=["n_rows"])
    def _gate_up_silu_kernel(x_desc, w_desc, out_desc, n_rows, n_cols, k_dim,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                             GROUP_M: tl.constexpr, PROGRAMS: tl.constexpr, FLATTEN: tl.constexpr):
        # c = x @ w.T (x [n_rows, k_dim], w [n_cols, k_dim], gate and up rows interleaved) and out[:, j] =
        # silu(c[:, 2j]) * c[:, 2j + 1]. Out-of-range rows, columns and k are zeros on load and dropped on store.
        n_m = tl.cdiv(n_rows, BLOCK_M)
        n_n = tl.cdiv(n_cols, BLOCK_N)
        dtype = out_desc.dtype
        # (FLATTEN: the tile loop is pipelined with the k loop, so the next tile's loads overlap this epilogue)
        for tile in tl.range(tl.program_id(0), n_m * n_n, PROGRAMS, flatten=FLATTEN):
            pid_m, pid_n = _tile_of(tile, n_m, n_n, GROUP_M)
            off_m = pid_m * BLOCK_M
            off_n = pid_n * BLOCK_N
            acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
            for k in range(0, k_dim, BLOCK_K):
                acc = tl.dot(x_desc.load([off_m, k]), w_desc.load([off_n, k]).T, acc)
            # gate and up rounded as the unfused product stores them, then silu_mul's float32 formula
            gate, up = tl.split(tl.reshape(acc.to(dtype), (BLOCK_M, BLOCK_N // 2, 2)))
            gate = gate.to(tl.float32)
            out_desc.store([off_m, off_n // 2], (gate / (1.0 + tl.exp(-gate)) * up.to(tl.float32)).to(dtype))


class EpilogueTiles(NamedTuple):
    """A launch: rows and (interleaved) columns of a tile, the k step, pipeline stages, warps, and whether the tile
    loop is flattened into the k loop."""

    block_m: int
    block_n: int
    block_k: int
    stages: int
    warps: int
    flatten: bool


def epilogue_tiles(k_dim: int) -> EpilogueTiles:
    """The fastest of 16 launches (128 or 256 columns, 3 or 4 stages, 4 or 8 warps, flattened or not) on an H100,
    bf16, at SmolLM2-135M's, Qwen2.5-0.5B's and Llama-3.2-1B's MLP shapes and 16,384 and 65,536 rows, as a rule of
    the depth: 4 stages were fastest at depth 896 (by 1-2.5 %) and within 1 % either way at 576, 3 at 2,048 (by
    1-2.5 %)."""
    return EpilogueTiles(128, 256, 64, 4 if k_dim <= 1024 else 3, 8, True)


_SMALLER = EpilogueTiles(128, 128, 64, 3, 4, True)  # (for a GPU without the shared memory of the chosen tiles)
# small tiles for Triton's interpreter on a CPU (tests), whose cost grows with the tile
INTERPRETER_TILES = EpilogueTiles(32, 32, 32, 2, 4, True)
_OUT_OF_RESOURCES: set = set()


def _has_tma(device: torch.device) -> bool:
    return device.type != "cuda" or torch.cuda.get_device_capability(device)[0] >= 9  # (a CPU: the interpreter)


@functools.lru_cache(maxsize=None)
def _programs(device: torch.device) -> int:
    """One program per SM (Triton's interpreter on a CPU: 4)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def available(weight: torch.Tensor) -> bool:
    """Can the kernel run with this gate/up ``weight`` [2 x inter, k]: on CUDA with compute capability 9.0+, fp16 or
    bf16, input and output rows of a multiple of 16 bytes (TMA's rule: k and inter multiples of 8), a Triton with
    TensorDescriptor, and ``FUSED_SILU_EPILOGUE``?"""
    size = weight.element_size()
    return (FUSED_SILU_EPILOGUE and TensorDescriptor is not None and triton_kernels.usable(weight)
            and weight.dtype in (torch.float16, torch.bfloat16) and (weight.shape[1] * size) % 16 == 0
            and (weight.shape[0] // 2 * size) % 16 == 0 and _has_tma(weight.device))


def applies(x: torch.Tensor, w_interleaved: torch.Tensor) -> bool:
    """``linear_silu_mul`` takes ``x`` [..., k] with ``w_interleaved`` (``available``): the same dtype and device,
    the same k."""
    return (x.dtype == w_interleaved.dtype and x.device == w_interleaved.device
            and x.shape[-1] == w_interleaved.shape[1])


def interleave_gate_up(weight: torch.Tensor) -> torch.Tensor:
    """[gate; up] stacked [2 x inter, k] -> rows gate 0, up 0, gate 1, up 1, ... (``linear_silu_mul``'s weight)."""
    gate, up = weight.chunk(2, dim=0)
    return torch.stack([gate, up], dim=1).reshape(weight.shape).contiguous()


def linear_silu_mul(x: torch.Tensor, w_interleaved: torch.Tensor, tiles: EpilogueTiles | None = None) -> torch.Tensor:
    """x [..., k], ``w_interleaved`` [2 x inter, k] (``interleave_gate_up``) -> ``silu(gate) * up`` [..., inter]:
    ``triton_kernels.silu_mul(F.linear(x, w_gate_up))`` in one kernel, gate and up never stored (``available``,
    ``applies``; x copied first where TMA cannot read it in place). ``tiles``: overrides ``epilogue_tiles`` (tests,
    benchmarks)."""
    k_dim, n_cols = x.shape[-1], w_interleaved.shape[0]
    out = torch.empty(*x.shape[:-1], n_cols // 2, dtype=x.dtype, device=x.device)
    x2 = x.reshape(-1, k_dim)
    if x2.stride() != (k_dim, 1) or x2.data_ptr() % 16:  # (TMA: contiguous rows from a 16-byte aligned start)
        x2 = x2.clone(memory_format=torch.contiguous_format)
    if x2.shape[0] == 0:
        return out
    key = (n_cols, k_dim, x.device)
    t = tiles or (_SMALLER if key in _OUT_OF_RESOURCES else epilogue_tiles(k_dim))
    sms = _programs(x.device)  # (a CUDA tensor's device always names its index)
    # (fewer programs than SMs where there are fewer tiles; the loop's step stays the SM count, a constant per device,
    # so the kernel compiles once per device rather than once per tile count)
    grid = (min(sms, triton.cdiv(x2.shape[0], t.block_m) * triton.cdiv(n_cols, t.block_n)),)
    try:
        with triton_kernels._on(out):
            _gate_up_silu_kernel[grid](
                TensorDescriptor.from_tensor(x2, [t.block_m, t.block_k]),
                TensorDescriptor.from_tensor(w_interleaved, [t.block_n, t.block_k]),
                TensorDescriptor.from_tensor(out.view(-1, n_cols // 2), [t.block_m, t.block_n // 2]),
                x2.shape[0], n_cols, k_dim, BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_K=t.block_k, GROUP_M=8,
                PROGRAMS=sms, FLATTEN=t.flatten, num_stages=t.stages, num_warps=t.warps)
    except triton.runtime.errors.OutOfResources:
        if tiles is not None or key in _OUT_OF_RESOURCES:
            raise
        warnings.warn(f"linear_silu_mul: tiles {t} need more shared memory than this GPU has; using {_SMALLER}")
        _OUT_OF_RESOURCES.add(key)
        return linear_silu_mul(x, w_interleaved)
    return out
