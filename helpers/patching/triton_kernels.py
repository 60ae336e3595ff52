"""Four steps of the fused modules as hand-written Triton kernels (CUDA only).

torch.compile with dynamic shapes turned rotary and the merge into kernels that reached ~0.2 TB/s on an H100 (index
arithmetic on symbolic sizes); these run near the memory bandwidth. Each computes the same formula as its plain
torch twin in helpers.patching.fused_modules (in float32, rounded once), and is used only when ``usable`` says so; tests
compare the two on the GPU box. No autograd: callers use them under no_grad / inference_mode only.

- ``rotary_inplace(qkv, cos, sin, n_rotated_heads)``: HF's ``x * cos + rotate_half(x) * sin`` on the first
  ``n_rotated_heads`` heads (query then key heads) of the fused q/k/v projection, in place.
- ``merge_attention(out_a, lse_a, out_b, lse_b)``: attention over two key sets from each one's output and
  log-sum-exp (``helpers.patching.fused_modules.merge_attention``).
- ``silu_mul(gate_up)``: the gated MLP's ``silu(gate) * up`` (inductor's version ran at ~1.6 TB/s).
- ``row_attention(query, key, value, prefix_key, prefix_value, scaling[, row_example, starts, rotary])``: a
  sweep forward's attention, short rows that attend to a prefix (one shared, or each row its own example's) and
  causally to their own tokens, in one kernel and one softmax, rotating query and key as it loads them.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import NamedTuple

import torch

try:  # Triton ships with CUDA builds of torch; CPU builds have none
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the torch build
    triton = None


def head_size_ok(d_head: int) -> bool:
    """The attention kernels' tile width is the head size: a power of two, at least tl.dot's 16."""
    return d_head >= 16 and d_head & (d_head - 1) == 0


def usable(*tensors: torch.Tensor, d_head: int | None = None) -> bool:
    """Triton present, every tensor on CUDA, and (attention kernels) ``head_size_ok(d_head)``."""
    return triton is not None and all(t.is_cuda for t in tensors) and (d_head is None or head_size_ok(d_head))


if triton is not None:
    # Triton specialises integer arguments on ``== 1`` and divisibility by 16 (a compile per new combination); the
    # sizes and strides here change with every example's length and every forward's batch, so none is specialised.
    @triton.jit(do_not_specialize=["n_rows", "q_len", "x_row_stride", "cs_row_stride"])
    def _rotary_kernel(x_ptr, cos_ptr, sin_ptr, n_rows, q_len, x_row_stride, cs_row_stride,
                       HALF: tl.constexpr, BLOCK_R: tl.constexpr):
        # program (row block, head): rows are (batch, pos) pairs, pos = row % q_len indexes cos/sin
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        head = tl.program_id(1)
        ok = rows < n_rows
        pos = (rows % q_len).to(tl.int64)
        i = tl.arange(0, HALF)
        ptr = x_ptr + rows[:, None].to(tl.int64) * x_row_stride + head * (2 * HALF) + i[None, :]
        cs = pos[:, None] * cs_row_stride + i[None, :]
        x1 = tl.load(ptr, mask=ok[:, None]).to(tl.float32)
        x2 = tl.load(ptr + HALF, mask=ok[:, None]).to(tl.float32)
        c1 = tl.load(cos_ptr + cs, mask=ok[:, None]).to(tl.float32)
        c2 = tl.load(cos_ptr + cs + HALF, mask=ok[:, None]).to(tl.float32)
        s1 = tl.load(sin_ptr + cs, mask=ok[:, None]).to(tl.float32)
        s2 = tl.load(sin_ptr + cs + HALF, mask=ok[:, None]).to(tl.float32)
        # rotate_half(x) = [-x2, x1]
        tl.store(ptr, (x1 * c1 - x2 * s1).to(x_ptr.dtype.element_ty), mask=ok[:, None])
        tl.store(ptr + HALF, (x2 * c2 + x1 * s2).to(x_ptr.dtype.element_ty), mask=ok[:, None])

    @triton.jit(do_not_specialize=["n_rows", "q_len", "oa_sb", "oa_sq", "oa_sh", "la_sb", "la_sq", "la_sh",
                                   "ob_sb", "ob_sq", "ob_sh", "lb_sb", "lb_sq", "lb_sh"])
    def _merge_kernel(oa_ptr, la_ptr, ob_ptr, lb_ptr, z_ptr, n_rows, q_len,
                      oa_sb, oa_sq, oa_sh, la_sb, la_sq, la_sh, ob_sb, ob_sq, ob_sh, lb_sb, lb_sq, lb_sh,
                      D: tl.constexpr, BLOCK_R: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        head = tl.program_id(1)
        ok = rows < n_rows
        b = (rows // q_len).to(tl.int64)
        pos = (rows % q_len).to(tl.int64)
        la = tl.load(la_ptr + b * la_sb + pos * la_sq + head * la_sh, mask=ok, other=0.0)
        lb = tl.load(lb_ptr + b * lb_sb + pos * lb_sq + head * lb_sh, mask=ok, other=0.0)
        m = tl.maximum(la, lb)
        wa = tl.exp(la - m)
        wb = tl.exp(lb - m)
        inv = 1.0 / (wa + wb)
        d = tl.arange(0, D)
        oa = tl.load(oa_ptr + (b * oa_sb + pos * oa_sq + head * oa_sh)[:, None] + d[None, :], mask=ok[:, None])
        ob = tl.load(ob_ptr + (b * ob_sb + pos * ob_sq + head * ob_sh)[:, None] + d[None, :], mask=ok[:, None])
        z = oa.to(tl.float32) * (wa * inv)[:, None] + ob.to(tl.float32) * (wb * inv)[:, None]
        z_off = (rows.to(tl.int64) * tl.num_programs(1) + head) * D
        tl.store(z_ptr + z_off[:, None] + d[None, :], z.to(z_ptr.dtype.element_ty), mask=ok[:, None])


    @triton.jit
    def _rotated(ptr, cos_ptr, sin_ptr, rows, cs_rows, ok, D: tl.constexpr, ROTARY: tl.constexpr):
        # [len(rows), D] vectors at ptr + rows, with HF's rotary when ROTARY: x * cos + rotate_half(x) * sin, where
        # rotate_half(x)[c] = -x[c + D/2] (first half) or x[c - D/2] (second half); in float32, rounded to x's
        # dtype as rotary_inplace stores it
        d = tl.arange(0, D)
        x = tl.load(ptr + rows[:, None] + d[None, :], mask=ok[:, None], other=0.0)
        if ROTARY:
            half = D // 2
            partner = tl.load(ptr + rows[:, None] + ((d + half) % D)[None, :], mask=ok[:, None], other=0.0)
            sign = tl.where(d < half, -1.0, 1.0)
            cs = cs_rows[:, None] + d[None, :]
            c = tl.load(cos_ptr + cs, mask=ok[:, None], other=0.0).to(tl.float32)
            s = tl.load(sin_ptr + cs, mask=ok[:, None], other=0.0).to(tl.float32)
            x = (x.to(tl.float32) * c + sign[None, :] * partner.to(tl.float32) * s).to(x.dtype)
        return x

    @triton.jit
    def _halves(ptr, cos_ptr, sin_ptr, rows, cs_rows, ok, D: tl.constexpr, ROTARY: tl.constexpr):
        # the two halves [len(rows), D/2] of the vectors at ptr + rows, with HF's rotary when ROTARY (as _rotated:
        # x1 * cos1 - x2 * sin1 and x2 * cos2 + x1 * sin2, in float32, each rounded to x's dtype); half-width tiles
        # keep fewer float32 temporaries live than _rotated's four full-width ones
        h = tl.arange(0, D // 2)
        p = ptr + rows[:, None] + h[None, :]
        x1 = tl.load(p, mask=ok[:, None], other=0.0)
        x2 = tl.load(p + D // 2, mask=ok[:, None], other=0.0)
        if ROTARY:
            cs = cs_rows[:, None] + h[None, :]
            c = tl.load(cos_ptr + cs, mask=ok[:, None], other=0.0).to(tl.float32)
            s = tl.load(sin_ptr + cs, mask=ok[:, None], other=0.0).to(tl.float32)
            r1 = (x1.to(tl.float32) * c - x2.to(tl.float32) * s).to(x1.dtype)
            c = tl.load(cos_ptr + cs + D // 2, mask=ok[:, None], other=0.0).to(tl.float32)
            s = tl.load(sin_ptr + cs + D // 2, mask=ok[:, None], other=0.0).to(tl.float32)
            x2 = (x2.to(tl.float32) * c + x1.to(tl.float32) * s).to(x1.dtype)
            x1 = r1
        return x1, x2

    @triton.jit
    def _softmax_step(q, keys, values, keep, scale, m, total, acc):
        # one step of an online softmax: queries q [M, D] against keys [N, D] where keep ([M or 1, N]), folding the
        # values [N, D] into the running maximum m, normaliser total and float32 accumulator acc
        return _softmax_fold(tl.dot(q, tl.trans(keys)), values, keep, scale, m, total, acc)

    @triton.jit
    def _softmax_fold(dots, values, keep, scale, m, total, acc):
        # _softmax_step from the queries' dot products with the keys [M, N]
        scores = tl.where(keep, dots * scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, 1))
        p = tl.exp(scores - m_new[:, None])
        alpha = tl.exp(m - m_new)
        # (probabilities rounded to the values' dtype, as flash does)
        return m_new, total * alpha + tl.sum(p, 1), acc * alpha[:, None] + tl.dot(p.to(values.dtype), values)

    @triton.jit
    def _own_step(q, i, j, k_base, v_base, cos_ptr, sin_ptr, k_sq, v_sq, cs_row, cs_sq, q_len, scale, m, total, acc,
                  D: tl.constexpr, ROTARY: tl.constexpr):
        # queries at positions i against the row's own keys j (those < q_len; causal: j <= i), rotated as loaded
        own_ok = j < q_len
        k = _rotated(k_base, cos_ptr, sin_ptr, j * k_sq, cs_row + j * cs_sq, own_ok, D, ROTARY)
        v = tl.load(v_base + j[:, None] * v_sq + tl.arange(0, D)[None, :], mask=own_ok[:, None], other=0.0)
        return _softmax_step(q, k, v, (j[None, :] <= i[:, None]) & own_ok[None, :], scale, m, total, acc)

    @triton.jit
    def _own_step_halves(q1, q2, i, j, k_base, v_base, cos_ptr, sin_ptr, k_sq, v_sq, cs_row, cs_sq, q_len, scale, m,
                         total, acc, D: tl.constexpr, ROTARY: tl.constexpr):
        # _own_step with queries and keys as halves: the dot product is q1 . k1 + q2 . k2
        own_ok = j < q_len
        k1, k2 = _halves(k_base, cos_ptr, sin_ptr, j * k_sq, cs_row + j * cs_sq, own_ok, D, ROTARY)
        v = tl.load(v_base + j[:, None] * v_sq + tl.arange(0, D)[None, :], mask=own_ok[:, None], other=0.0)
        dots = tl.dot(q2, tl.trans(k2), tl.dot(q1, tl.trans(k1)))
        return _softmax_fold(dots, v, (j[None, :] <= i[:, None]) & own_ok[None, :], scale, m, total, acc)

    @triton.jit(do_not_specialize=["q_len", "s_len", "q_sb", "q_sq", "q_sh", "k_sb", "k_sq", "k_sh", "v_sb", "v_sq",
                                   "v_sh", "pk_sb", "pk_sh", "pk_ss", "pv_sb", "pv_sh", "pv_ss", "cs_sb", "cs_sq"])
    def _row_attention_kernel(q_ptr, k_ptr, v_ptr, pk_ptr, pv_ptr, ex_ptr, start_ptr, cos_ptr, sin_ptr, z_ptr,
                              q_len, s_len, scale, q_sb, q_sq, q_sh, k_sb, k_sq, k_sh, v_sb, v_sq, v_sh,
                              pk_sb, pk_sh, pk_ss, pv_sb, pv_sh, pv_ss, cs_sb, cs_sq,
                              GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                              BLOCK_K: tl.constexpr, D: tl.constexpr, PER_ROW: tl.constexpr, ROTARY: tl.constexpr,
                              POS_MAJOR: tl.constexpr, HALVES: tl.constexpr = False):
        # program (row, kv head, tile): the GROUP query heads sharing one key/value head are stacked into one query
        # axis of GROUP * q_len (head, position) pairs, and this program takes BLOCK_M of them: head-major (a
        # tile holds runs of one head's positions; its own keys are every one of the row's, BLOCK_N >= q_len, one
        # step) or position-major (a tile holds consecutive positions, every head of the group at each; its own keys
        # run in steps of BLOCK_N up to its last position, skipping the causal mask's empty blocks). They attend to
        # the row's prefix keys start .. s_len - 1 (all precede every query: no mask), then causally to the row's own
        # tokens, in one online softmax (float32 accumulators); z is written once, contiguous. HALVES (position-major,
        # head size >= 32): query and key are taken as two halves each (_halves)
        b = tl.program_id(0).to(tl.int64)
        kv_head = tl.program_id(1)
        if PER_ROW:
            ex = tl.load(ex_ptr + b).to(tl.int64)
            start = tl.load(start_ptr + ex).to(tl.int32)
        else:
            ex = 0
            start = 0
        f = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
        if POS_MAJOR:
            g = f % GROUP  # query head within the group
            i = f // GROUP  # position
            valid = i < q_len
            own_end = tl.minimum(q_len, (tl.program_id(2) * BLOCK_M + BLOCK_M - 1) // GROUP + 1)
        else:
            g = f // q_len
            i = f % q_len
            valid = g < GROUP
            own_end = q_len
        head = kv_head * GROUP + g
        d = tl.arange(0, D)
        pk_base = pk_ptr + ex * pk_sb + kv_head * pk_sh
        pv_base = pv_ptr + ex * pv_sb + kv_head * pv_sh
        k_base = k_ptr + b * k_sb + kv_head * k_sh  # (the row's own keys and values)
        v_base = v_ptr + b * v_sb + kv_head * v_sh
        m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        total = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, D), tl.float32)
        # prefix keys, then own tokens: the first own step holds key 0, kept by every query, so every query's maximum
        # is finite from then on (or from the prefix) and total > 0; a later step's masked scores then weigh exactly 0
        if HALVES:  # (position-major only)
            q1, q2 = _halves(q_ptr + b * q_sb, cos_ptr, sin_ptr, head * q_sh + i * q_sq, b * cs_sb + i * cs_sq, valid,
                             D, ROTARY)
            for k0 in range(start, s_len, BLOCK_K):
                kk = k0 + tl.arange(0, BLOCK_K)
                ok = kk < s_len
                pk1, pk2 = _halves(pk_base, cos_ptr, sin_ptr, kk.to(tl.int64) * pk_ss, kk, ok, D, False)
                pv = tl.load(pv_base + kk[:, None].to(tl.int64) * pv_ss + d[None, :], mask=ok[:, None], other=0.0)
                dots = tl.dot(q2, tl.trans(pk2), tl.dot(q1, tl.trans(pk1)))
                m, total, acc = _softmax_fold(dots, pv, ok[None, :], scale, m, total, acc)
            for j0 in range(0, own_end, BLOCK_N):
                m, total, acc = _own_step_halves(q1, q2, i, j0 + tl.arange(0, BLOCK_N), k_base, v_base, cos_ptr,
                                                 sin_ptr, k_sq, v_sq, b * cs_sb, cs_sq, q_len, scale, m, total, acc,
                                                 D, ROTARY)
        else:
            q = _rotated(q_ptr + b * q_sb, cos_ptr, sin_ptr, head * q_sh + i * q_sq, b * cs_sb + i * cs_sq, valid, D,
                         ROTARY)
            for k0 in range(start, s_len, BLOCK_K):
                kk = k0 + tl.arange(0, BLOCK_K)
                ok = kk < s_len
                pk = tl.load(pk_base + kk[:, None].to(tl.int64) * pk_ss + d[None, :], mask=ok[:, None], other=0.0)
                pv = tl.load(pv_base + kk[:, None].to(tl.int64) * pv_ss + d[None, :], mask=ok[:, None], other=0.0)
                m, total, acc = _softmax_step(q, pk, pv, ok[None, :], scale, m, total, acc)
            if POS_MAJOR:
                for j0 in range(0, own_end, BLOCK_N):
                    m, total, acc = _own_step(q, i, j0 + tl.arange(0, BLOCK_N), k_base, v_base, cos_ptr, sin_ptr,
                                              k_sq, v_sq, b * cs_sb, cs_sq, q_len, scale, m, total, acc, D, ROTARY)
            else:  # (one step, straight-line code)
                m, total, acc = _own_step(q, i, tl.arange(0, BLOCK_N), k_base, v_base, cos_ptr, sin_ptr, k_sq, v_sq,
                                          b * cs_sb, cs_sq, q_len, scale, m, total, acc, D, ROTARY)
        z_off = ((b * q_len + i) * (tl.num_programs(1) * GROUP) + head) * D
        tl.store(z_ptr + z_off[:, None] + d[None, :], (acc / total[:, None]).to(z_ptr.dtype.element_ty),
                 mask=valid[:, None])

    @triton.jit(do_not_specialize=["n_rows", "width", "row_stride"])
    def _silu_mul_kernel(gu_ptr, out_ptr, n_rows, width, row_stride, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        # out[r, c] = silu(gu[r, c]) * gu[r, width + c]: gate and up halves of the fused gate/up projection
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        ok = (rows < n_rows)[:, None] & (cols < width)[None, :]
        src = gu_ptr + rows[:, None].to(tl.int64) * row_stride + cols[None, :]
        gate = tl.load(src, mask=ok).to(tl.float32)
        up = tl.load(src + width, mask=ok).to(tl.float32)
        out = gate / (1.0 + tl.exp(-gate)) * up
        tl.store(out_ptr + rows[:, None].to(tl.int64) * width + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=ok)


_BLOCK_R = 32


def _on(t: torch.Tensor):
    """Triton launches on the current CUDA device: make it ``t``'s (a model on cuda:1, say) while launching."""
    if t.device.type != "cuda" or t.device.index is None or t.device.index == torch.cuda.current_device():
        return nullcontext()
    return torch.cuda.device(t.device)


ROW_ATTENTION_MAX = 128  # longest row row_attention takes (head-major, a program holds all its own keys in one tile)


def row_attention_applies(q_len: int, d_head: int) -> bool:
    """Rows short enough for ``row_attention`` (head-major holds a row's own keys in one tile), head sizes up to 128
    (a tile of float32 accumulators lives in registers; larger ones go the flash way)."""
    return q_len <= ROW_ATTENTION_MAX and d_head <= 128


def rotary_inplace(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_rotated_heads: int) -> torch.Tensor:
    """qkv: [batch, q, heads, d_head] with contiguous rows; cos, sin: [1 or batch, q, d_head]. Rotates heads
    ``0 .. n_rotated_heads - 1`` of every (batch, pos) row in place; returns ``qkv``."""
    b, q, n_heads, d_head = qkv.shape
    assert qkv.stride(3) == 1 and qkv.stride(2) == d_head and qkv.stride(0) == q * qkv.stride(1)
    if cos.shape[0] != 1:  # a table per row: index by row, not by row % q
        cos, sin, q_len = cos.reshape(b * q, d_head), sin.reshape(b * q, d_head), b * q
    else:
        cos, sin, q_len = cos[0], sin[0], q
    cos, sin = cos.contiguous(), sin.contiguous()
    n_rows = b * q
    grid = (triton.cdiv(n_rows, _BLOCK_R), n_rotated_heads)
    with _on(qkv):
        _rotary_kernel[grid](qkv, cos, sin, n_rows, q_len, qkv.stride(1), cos.stride(0),
                             HALF=d_head // 2, BLOCK_R=_BLOCK_R)
    return qkv


def merge_attention(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor):
    """out_*: [batch, q, head, d_head] (any strides, d_head contiguous); lse_*: [batch, q, head] float32 (any
    strides). Returns the merged z: [batch, q, head, d_head], contiguous, in out_a's dtype."""
    b, q, n_heads, d_head = out_a.shape
    assert out_a.stride(3) == 1 and out_b.stride(3) == 1
    z = torch.empty(b, q, n_heads, d_head, dtype=out_a.dtype, device=out_a.device)
    n_rows = b * q
    grid = (triton.cdiv(n_rows, _BLOCK_R), n_heads)
    with _on(z):
        _merge_kernel[grid](out_a, lse_a, out_b, lse_b, z, n_rows, q,
                            *out_a.stride()[:3], *lse_a.stride(), *out_b.stride()[:3], *lse_b.stride(),
                            D=d_head, BLOCK_R=_BLOCK_R)
    return z


class RowTiles(NamedTuple):
    """``row_attention``'s launch: stacked queries a program, own keys a step (head-major: all of a row's, one step),
    prefix keys a step, warps, and the stacking of the (head, position) query axis."""

    block_m: int
    block_n: int
    block_k: int
    warps: int
    position_major: bool = False
    halves: bool = False  # (position-major, head size >= 32) query and key in half-width tiles, two dots a score


# position-major stacking by default (benchmarks compare the two by setting this)
ROW_POSITION_MAJOR = True
# position-major tiles take query and key in halves (head size >= 32): the same z (bf16, an H100: no difference at
# the four decimals printed), the kernel alone 1.05-1.13x faster at Qwen, Llama and SmolLM2's longer rows,
# 1.33-1.36x at head size 128, equal (0.98-1.01x) at SmolLM2's q 5 and 13 (an H100, bf16, 2026-12-05,
# BENCHMARKS.md; benchmarks compare by setting this)
ROW_HALVES = True


def row_attention_tiles(q_len: int, d_head: int, group: int, position_major: bool | None = None) -> RowTiles:
    """``row_attention``'s tiles for rows of q_len tokens and ``group`` query heads per key/value head."""
    position_major = ROW_POSITION_MAJOR if position_major is None else position_major
    # up to 64 stacked queries a program: on an H100 (bf16, Llama-3.2-1B and Qwen2.5-0.5B sweep shapes) faster
    # overall than 32 or 128 (more programs in flight; 128 won only for the longest rows, by a few percent)
    block_m = max(16, min(64, triton.next_power_of_2(group * q_len)))
    block_k = 64 if d_head <= 64 else 32
    if position_major:
        # own keys 16 a step: the kernel alone 1.00-1.42x faster than head-major at SmolLM2, Qwen and Llama sweep
        # shapes on an H200 (scripts/profile_small.py --tiles, 2026-12-05; 32 a step 1.00-1.20x); not timed at head
        # size 128 (where head-major takes 8 warps) nor for GPT-Neo's one query head a key/value head
        return RowTiles(block_m, 16, block_k, 4, True, ROW_HALVES and d_head >= 32)  # (tl.dot's minimum K: 16)
    block_j = max(16, triton.next_power_of_2(q_len))
    # (8 warps where the own-key tile is 128 x 128: with 4, ptxas spills ~4x more registers there; not timed)
    return RowTiles(block_m, block_j, block_k, 8 if block_j * d_head >= 128 * 128 else 4)


def row_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, prefix_key: torch.Tensor,
                  prefix_value: torch.Tensor, scaling: float, row_example: torch.Tensor | None = None,
                  starts: torch.Tensor | None = None, rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
                  tiles: tuple | None = None) -> torch.Tensor:
    """Each row's queries against its prefix, then causally against its own tokens: one kernel, one softmax.

    query: [batch, q, head, d_head], key/value: [batch, q, kv_head, d_head] (the fed tokens, the last q positions;
    any strides, d_head contiguous; ``row_attention_applies(q, d_head)``); prefix_key/value: [1 or examples,
    kv_head, s, d_head], the keys/values of the positions before the fed tokens, shared by every row (batch 1) or,
    with ``row_example`` [batch] (each row's example) and ``starts`` [examples], one end-aligned prefix per example
    (example e's keys are slots starts[e] .. s-1; the slots before are padding). fp16 or bf16 (float32 runs, but a
    GPU's ``tl.dot`` then rounds to tf32). ``rotary``: (cos, sin) [1 or batch, q, d_head]: query and key are not
    rotated yet, and the kernel rotates them as it loads them (``rotary_inplace``'s formula and rounding; the prefix
    is rotated already). Returns z: [batch, q, head, d_head], contiguous, in query's dtype. ``tiles``: a ``RowTiles``
    (or its fields) overriding ``row_attention_tiles`` (benchmarks).

    The query heads that share a key/value head are stacked into one query axis (head-major, or position-major:
    ``RowTiles.position_major``; no padding between heads), so one pass over the keys serves them all with matrix
    products of up to 64 stacked queries (position-major from head size 32: query and key as halves,
    ``RowTiles.halves``, whose rotation keeps fewer float32 temporaries live; each score is q1 . k1 + q2 . k2). One
    program per (row, key/value head, tile of that axis): the prefix is read in place (never copied per row), and
    the softmax runs over prefix and own keys together, so nothing is written between them (flash on the prefix, a
    causal kernel on the own tokens and a log-sum-exp merge wrote and re-read three outputs of z's size).
    """
    b, q, n_heads, d_head = query.shape
    n_kv, s = prefix_key.shape[1], prefix_key.shape[2]
    assert row_attention_applies(q, d_head) and n_heads % n_kv == 0, (q, d_head, n_heads, n_kv)
    assert key.shape == value.shape == (b, q, n_kv, d_head) and prefix_value.shape == prefix_key.shape
    assert query.stride(3) == key.stride(3) == value.stride(3) == prefix_key.stride(3) == prefix_value.stride(3) == 1
    # (offsets within a row are int32 in the kernel; row offsets are int64)
    assert max((q - 1) * t.stride(1) + (t.shape[2] - 1) * t.stride(2) for t in (query, key, value)) < 2**31
    per_row = row_example is not None
    if per_row:
        assert row_example.shape[0] >= b and starts.shape[0] == prefix_key.shape[0]
        assert row_example.device == starts.device == query.device
    else:
        assert prefix_key.shape[0] == 1, "several prefixes need row_example and starts"
        row_example = starts = query  # (unread placeholders)
    if rotary is None:
        cos = sin = query  # (unread placeholders)
        cs_sb = cs_sq = 0
    else:
        cos, sin = (t.expand(-1, q, d_head).contiguous() for t in rotary)  # [1 or batch, q, d_head]
        assert cos.shape[0] in (1, b)
        cs_sb, cs_sq = (cos.stride(0) if cos.shape[0] == b > 1 else 0), cos.stride(1)
    z = torch.empty(b, q, n_heads, d_head, dtype=query.dtype, device=query.device)
    group = n_heads // n_kv
    t = RowTiles(*tiles) if tiles else row_attention_tiles(q, d_head, group)
    # (tl.dot's minimum is 16; head-major takes every own key in one step)
    assert (t.position_major or t.block_n >= q) and min(t.block_m, t.block_n, t.block_k) >= 16, (tiles, q)
    assert not (t.position_major and t.halves) or d_head >= 32, (tiles, d_head)  # (halves: tl.dot's K >= 16)
    with _on(z):
        _row_attention_kernel[(b, n_kv, triton.cdiv(group * q, t.block_m))](
            query, key, value, prefix_key, prefix_value, row_example, starts, cos, sin, z, q, s, scaling,
            *query.stride()[:3], *key.stride()[:3], *value.stride()[:3],
            prefix_key.stride(0), prefix_key.stride(1), prefix_key.stride(2),
            prefix_value.stride(0), prefix_value.stride(1), prefix_value.stride(2), cs_sb, cs_sq,
            GROUP=group, BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_K=t.block_k, D=d_head, PER_ROW=per_row,
            ROTARY=rotary is not None, POS_MAJOR=t.position_major, HALVES=t.position_major and t.halves,
            num_warps=t.warps)
    return z


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up: [..., 2 * inter] (gate then up, rows contiguous) -> ``silu(gate) * up``: [..., inter], contiguous."""
    width = gate_up.shape[-1] // 2
    rows = gate_up.reshape(-1, 2 * width)
    assert rows.stride(1) == 1
    out = torch.empty(*gate_up.shape[:-1], width, dtype=gate_up.dtype, device=gate_up.device)
    n_rows = rows.shape[0]
    # one row x 1024 columns a program: 2.7 TB/s on an H100 (bf16, 40,000 rows of 2 x 8192 or 2 x 4864), where
    # 4 x 1024 reached 1.8 TB/s
    grid = (n_rows, triton.cdiv(width, 1024))
    with _on(out):
        _silu_mul_kernel[grid](rows, out, n_rows, width, rows.stride(0), BLOCK_R=1, BLOCK_C=1024, num_warps=4)
    return out
