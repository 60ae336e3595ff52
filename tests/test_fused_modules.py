"""helpers.patching.fused_modules: the swap-ins compute what the HF modules compute, and the model is left as found."""
from __future__ import annotations

import os
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import helpers.patching.fused_modules as fm
from helpers.patching.fused_modules import FUSABLE_FAMILIES, SHARED_PREFIX_FAMILIES, causal_additive_mask, fused_modules
from helpers.models.tiny_models import TINY_FAMILIES, tiny_model

torch.set_num_threads(1)

IDS = torch.tensor([[3, 17, 99, 4, 250, 8, 8, 41, 77, 5, 120, 2]])


def skip_rounding_checks_of_the_interpreter(device: str, dtype: torch.dtype) -> None:
    """Triton's interpreter truncates casts to bfloat16 (numpy has none), where the GPU rounds to nearest: bounds
    set at half an ulp of bfloat16 hold on the GPU only."""
    if device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("bfloat16 rounding: checked on the GPU (Triton's interpreter truncates)")


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_fused_forward_equals_hf_modules_and_is_undone(family):
    model = tiny_model(family)
    plain = _logits(model)
    with fused_modules(model, compile=False) as swap:
        fused = _logits(model)
        # batch > 1 with a shared mask, as in a sweep, and grouped-query attention (4 heads, 2 kv heads)
        fused_batch = _logits(model, IDS.expand(3, -1))
    if family in FUSABLE_FAMILIES:
        assert "attention x2" in swap.swapped and "rms_norm x5" in swap.swapped
        assert ("gated_mlp x2" in swap.swapped) == (family != "granitemoe")
        assert swap.attention_layers == {0, 1}
        assert ("block x2" in swap.swapped) == (swap.blocks == {0, 1}) == (family != "granitemoe")
    elif family == "gpt_neo":  # its attention alone, which runs its own forward outside a shared-prefix one
        assert swap.swapped == ["gpt_neo attention x2"] and swap.attention_layers == {0, 1}
        assert swap.window == 8 and not swap.shares_prefix  # (no causal promise here)
    else:
        assert swap.swapped == [] and not swap.shares_prefix
    assert torch.allclose(fused, plain, atol=1e-5, rtol=0), (fused - plain).abs().max()
    assert torch.allclose(fused_batch, plain.expand(3, -1, -1), atol=1e-5, rtol=0)
    # everything restored: no instance forwards left
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert torch.equal(_logits(model), plain)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_fused_attention_reads_eager_and_sdpa_masks_and_continues_a_cache(attn):
    """Real checkpoints load with sdpa (bool or no mask), tiny test models with eager (additive mask)."""
    from transformers import AutoModelForCausalLM
    from helpers.models.tiny_models import tiny_config
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("qwen2"), attn_implementation=attn).eval()
    plain = _logits(model)
    with fused_modules(model, compile=False):
        fused = _logits(model)
        with torch.no_grad():
            head = model(input_ids=IDS[:, :5], use_cache=True)
            tail = model(input_ids=IDS[:, 5:], past_key_values=head.past_key_values,
                         position_ids=torch.arange(5, IDS.shape[1])[None]).logits
    assert torch.allclose(fused, plain, atol=1e-5, rtol=0)
    assert torch.allclose(tail, plain[:, 5:], atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", sorted(SHARED_PREFIX_FAMILIES))
@pytest.mark.parametrize("s", [2, 5])
def test_a_shared_prefix_stands_in_for_a_per_row_cache(family, s):
    """The sweep's forwards: no cache, the corrupt prefix's keys/values (batch 1) shared by every row. (gpt_neo's
    local layer, window 8, then masks the prefix's first positions for the last queries of the 12.)"""
    model = tiny_model(family)
    plain = _logits(model)
    with fused_modules(model, compile=False, causal_flash=True) as swap, torch.no_grad():
        assert swap.shares_prefix
        prefix = model(input_ids=IDS[:, :s], use_cache=True).past_key_values
        with swap.shared_prefix(prefix):
            tail = model(input_ids=IDS[:, s:].expand(3, -1), position_ids=torch.arange(s, IDS.shape[1])[None]).logits
        assert swap.prefix is None
    assert torch.allclose(tail, plain[:, s:].expand(3, -1, -1), atol=1e-5, rtol=0), (tail - plain[:, s:]).abs().max()


@pytest.mark.parametrize("family", ["gpt_neo", "llama"])
def test_a_shared_prefix_forward_never_falls_back_to_hfs_forward(family):
    """HF's forward would attend without the prefix (a shared-prefix forward passes no cache): attention weights asked
    for (a config's ``output_attentions``) are not returned, and gradients raise instead of silently dropping it."""
    model = tiny_model(family)
    plain = _logits(model)
    s = 5
    with fused_modules(model, compile=False, causal_flash=True) as swap:
        with torch.no_grad():
            prefix = model(input_ids=IDS[:, :s], use_cache=True).past_key_values
            with swap.shared_prefix(prefix):
                tail = model(input_ids=IDS[:, s:], position_ids=torch.arange(s, IDS.shape[1])[None],
                             output_attentions=family == "gpt_neo").logits
        assert torch.allclose(tail, plain[:, s:], atol=1e-5, rtol=0)
        with swap.shared_prefix(prefix), pytest.raises(RuntimeError, match="without gradients"):
            model(input_ids=IDS[:, s:], position_ids=torch.arange(s, IDS.shape[1])[None])


def test_a_shared_prefix_needs_every_attention_fused():
    model = tiny_model("llama")
    with fused_modules(model, compile=False) as swap:  # no causal promise
        with pytest.raises(RuntimeError, match="every layer's attention"):
            with swap.shared_prefix(object()):
                pass


def _attention_with_lse(query, key, value, scaling, causal_offset=None):
    """query [b, q, h, d], key/value [b, k, h, d] -> (out [b, q, h, d], lse [b, q, h]); the math of flash."""
    scores = torch.einsum("bqhd,bkhd->bhqk", query, key) * scaling
    if causal_offset is not None:
        q, k = scores.shape[-2:]
        scores = scores.masked_fill(~torch.ones(q, k, dtype=torch.bool).tril(causal_offset), float("-inf"))
    lse = scores.logsumexp(-1)
    out = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(scores, -1), value)
    return out, lse.transpose(1, 2)


def test_merge_attention_of_two_key_sets_equals_attention_over_both():
    gen = torch.Generator().manual_seed(1)
    b, q, h, d, s = 3, 5, 4, 8, 7
    query = torch.randn(b, q, h, d, generator=gen)
    key, value = torch.randn(b, s + q, h, d, generator=gen), torch.randn(b, s + q, h, d, generator=gen)
    full, _ = _attention_with_lse(query, key, value, 0.3, causal_offset=s)
    out_p, lse_p = _attention_with_lse(query, key[:, :s], value[:, :s], 0.3)
    out_n, lse_n = _attention_with_lse(query, key[:, s:], value[:, s:], 0.3, causal_offset=0)
    assert torch.allclose(fm.merge_attention(out_p, lse_p, out_n, lse_n), full, atol=1e-6)


def test_additive_mask_from_sdpa_forms_equals_the_eager_one():
    like = torch.zeros(1, dtype=torch.float32)
    q, kv = 3, 7
    keep = torch.ones(q, kv, dtype=torch.bool).tril(kv - q)
    eager = torch.zeros(q, kv).masked_fill(~keep, torch.finfo(torch.float32).min)[None, None]
    assert torch.equal(fm._additive_mask(None, q, kv, like), eager)
    assert torch.equal(fm._additive_mask(keep[None, None], q, kv, like), eager)
    assert torch.equal(fm._additive_mask(eager, q, kv, like), eager)


def test_swaps_are_undone_after_an_error():
    model = tiny_model("llama")
    attention = model.model.layers[0].self_attn
    with pytest.raises(RuntimeError, match="boom"):
        with fused_modules(model, compile=False):
            assert "forward" in attention.__dict__
            raise RuntimeError("boom")
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_an_instance_forward_already_there_is_put_back():
    model = tiny_model("qwen2")
    norm = model.model.norm
    own = norm.forward  # e.g. nnsight installs instance-level forwards
    norm.forward = own
    with fused_modules(model, compile=False):
        assert norm.forward is not own
    assert norm.__dict__["forward"] is own
    del norm.forward


def test_grouped_query_attention_equals_repeat_kv_attention():
    gen = torch.Generator().manual_seed(0)
    b, heads, kv_heads, q, kv, d = 3, 6, 2, 4, 9, 8
    query = torch.randn(b, heads, q, d, generator=gen)
    key, value = torch.randn(b, kv_heads, kv, d, generator=gen), torch.randn(b, kv_heads, kv, d, generator=gen)
    mask = torch.zeros(1, 1, q, kv)
    mask[..., :, kv - q:] = torch.triu(torch.full((q, q), float("-inf")), 1)  # causal, lower-right aligned
    k_rep, v_rep = key.repeat_interleave(3, dim=1), value.repeat_interleave(3, dim=1)
    probs = torch.softmax(query @ k_rep.transpose(2, 3) * 0.3 + mask, dim=-1)
    expected = (probs @ v_rep).transpose(1, 2)
    got = fm.grouped_query_attention(query, key, value, mask, 0.3)
    assert got.shape == (b, q, heads, d) and got.is_contiguous()
    assert torch.allclose(got, expected, atol=1e-6)


def test_compile_is_the_default_only_on_cuda_without_triton(monkeypatch):
    """With Triton, a compiled plain formula would serve only float32's attention, no faster and ~50 s to compile."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.setattr(fm.triton_kernels, "triton", object())
    assert not fm.compiles_by_default(cuda, 64) and not fm.compiles_by_default(cpu, 64)
    assert fm.compiles_by_default(cuda, 80) and not fm.compiles_by_default(cpu, 80)  # no Triton attention there
    monkeypatch.setattr(fm.triton_kernels, "triton", None)
    assert fm.compiles_by_default(cuda, 64) and not fm.compiles_by_default(cpu, 64)
    # fused_modules asks it with the model's head size
    asked = []
    monkeypatch.setattr(fm, "compiles_by_default", lambda device, d_head: asked.append((device.type, d_head)))
    model = tiny_model("llama")
    with fused_modules(model):
        pass
    assert asked == [("cpu", model.model.layers[0].self_attn.head_dim)]


def test_compiled_swaps_match_the_plain_ones():
    """The CUDA-without-Triton default (torch.compile) on CPU: same logits; no silent fallback to the plain ones."""
    pytest.importorskip("torch._inductor")
    model = tiny_model("llama")
    plain = _logits(model)
    fm._BROKEN.clear()
    with fused_modules(model, compile=True):
        compiled = _logits(model, IDS.expand(2, -1))
    assert not fm._BROKEN, f"compilation fell back for {fm._BROKEN}"
    assert torch.allclose(compiled, plain.expand(2, -1, -1), atol=1e-5, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flash attention needs CUDA (checked on the GPU box)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_causal_flash_attention_equals_masked_grouped_attention_on_cuda(dtype):
    gen = torch.Generator(device="cuda").manual_seed(0)
    b, heads, kv_heads, q, kv, d = 5, 14, 2, 23, 60, 64
    query = torch.randn(b, heads, q, d, generator=gen, device="cuda", dtype=dtype)
    key = torch.randn(b, kv_heads, kv, d, generator=gen, device="cuda", dtype=dtype)
    value = torch.randn(b, kv_heads, kv, d, generator=gen, device="cuda", dtype=dtype)
    mask = torch.zeros(1, 1, q, kv, device="cuda", dtype=dtype)
    mask[..., :, kv - q:] = torch.triu(torch.full((q, q), torch.finfo(dtype).min, device="cuda", dtype=dtype), 1)
    expected = fm.grouped_query_attention(query.float(), key.float(), value.float(), mask.float(), 0.125)
    got = fm.causal_flash_attention(query, key, value, 0.125)
    assert got.shape == expected.shape
    assert (got.float() - expected).abs().max().item() < 2e-2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flash attention needs CUDA (checked on the GPU box)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_shared_prefix_flash_attention_equals_attention_over_the_concatenated_keys_on_cuda(dtype):
    gen = torch.Generator(device="cuda").manual_seed(0)
    b, heads, kv_heads, q, s, d = 5, 14, 2, 23, 37, 64
    rand = lambda *shape: torch.randn(*shape, generator=gen, device="cuda", dtype=dtype)  # noqa: E731
    query, key, value = rand(b, q, heads, d), rand(b, q, kv_heads, d), rand(b, q, kv_heads, d)
    prefix_key, prefix_value = rand(1, kv_heads, s, d), rand(1, kv_heads, s, d)
    full_key = torch.cat([prefix_key.expand(b, -1, -1, -1), key.transpose(1, 2)], 2).float()
    full_value = torch.cat([prefix_value.expand(b, -1, -1, -1), value.transpose(1, 2)], 2).float()
    mask = fm._additive_mask(None, q, s + q, full_key)
    expected = fm.grouped_query_attention(query.transpose(1, 2).float(), full_key, full_value, mask, 0.125)
    got = fm.shared_prefix_flash_attention(query, key, value, prefix_key, prefix_value, 0.125)
    assert got.shape == expected.shape and got.dtype == dtype
    assert (got.float() - expected).abs().max().item() < 2e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("cos_batch", [1, 3])
def test_triton_rotary_equals_the_torch_formula(triton_device, dtype, cos_batch):
    skip_rounding_checks_of_the_interpreter(triton_device, dtype)
    from helpers.patching import triton_kernels
    gen = torch.Generator(device=triton_device).manual_seed(0)
    b, q, heads, kv_heads, d = 3, 37, 14, 2, 64
    x = torch.randn(b, q, 16, device=triton_device, dtype=dtype, generator=gen)
    weight = torch.randn((heads + 2 * kv_heads) * d, 16, device=triton_device, dtype=dtype, generator=gen)
    angles = torch.randn(cos_batch, q, d // 2, device=triton_device, generator=gen).repeat(1, 1, 2)
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    expected = fm.qkv_rotary(x.float(), weight.float(), None, cos.float(), sin.float(), heads, kv_heads, d)
    fused = torch.nn.functional.linear(x, weight).view(b, q, heads + 2 * kv_heads, d)
    triton_kernels.rotary_inplace(fused, cos, sin, heads + kv_heads)
    got = fused.split([heads, kv_heads, kv_heads], dim=2)
    tol = 1e-5 if dtype == torch.float32 else 0.05 * expected[0].abs().max().item() / 8
    for g, e in zip(got, expected):
        assert (g.float() - e).abs().max().item() <= tol


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_triton_merge_equals_the_torch_merge(triton_device, dtype):
    skip_rounding_checks_of_the_interpreter(triton_device, dtype)
    from helpers.patching import triton_kernels
    gen = torch.Generator(device=triton_device).manual_seed(0)
    b, q, h, d = 5, 23, 14, 64
    out_a = torch.randn(1, b * q, h, d, device=triton_device, generator=gen).to(dtype).reshape(b, q, h, d)
    out_b = torch.randn(b, h, q, d, device=triton_device, generator=gen).to(dtype).transpose(1, 2)  # strided, as flash
    lse_a = (3 * torch.randn(h, b * q, device=triton_device, generator=gen)).reshape(h, b, q).permute(1, 2, 0)
    lse_b = (3 * torch.randn(b, h, q, device=triton_device, generator=gen)).transpose(1, 2)
    expected = fm.merge_attention(out_a.float(), lse_a, out_b.float(), lse_b)
    got = triton_kernels.merge_attention(out_a, lse_a, out_b, lse_b)
    assert got.shape == (b, q, h, d) and got.is_contiguous() and got.dtype == dtype
    assert (got.float() - expected).abs().max().item() <= (1e-5 if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("family", ["llama", "granite"])
def test_a_fused_block_appends_copies_of_row_zero_for_the_next_block(family):
    model = tiny_model(family)
    plain = _logits(model)
    seen = []
    handle = model.model.layers[1].register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[0]))
    try:
        with fused_modules(model, compile=False) as swap:
            swap.extra_rows = {0: 2}
            grown = _logits(model)
    finally:
        handle.remove()
    assert seen == [3] and grown.shape[0] == 3
    assert torch.allclose(grown, plain.expand(3, -1, -1), atol=1e-5, rtol=0)


def test_a_fused_block_appends_copies_of_the_rows_it_is_given():
    model = tiny_model("llama")
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(3))
    mask = causal_additive_mask(9, 9, torch.float32, "cpu")  # [1, 1, q, q]: broadcasts over the grown batch
    with torch.no_grad():
        plain = model(ids).logits
        with fused_modules(model, compile=False) as swap:
            swap.extra_rows = {0: torch.tensor([1, 1, 0])}
            grown = model(ids, attention_mask=mask).logits
    assert grown.shape[0] == 5
    assert torch.allclose(grown, plain[[0, 1, 1, 1, 0]], atol=1e-5, rtol=0)


def _row_attention_reference(query, key, value, prefix_key, prefix_value, row_example, starts, scaling):
    """Per row, in float32: softmax over [its example's prefix keys from starts[e], its own keys up to the query]."""
    b, q, heads, d = query.shape
    group = heads // key.shape[2]
    z = torch.empty(b, q, heads, d)
    causal = torch.ones(q, q, dtype=torch.bool).tril()
    for row in range(b):
        e = int(row_example[row])
        pk = prefix_key[e, :, int(starts[e]):].float().cpu().repeat_interleave(group, 0)  # [head, n, d]
        pv = prefix_value[e, :, int(starts[e]):].float().cpu().repeat_interleave(group, 0)
        k = torch.cat([pk, key[row].float().cpu().transpose(0, 1).repeat_interleave(group, 0)], 1)
        v = torch.cat([pv, value[row].float().cpu().transpose(0, 1).repeat_interleave(group, 0)], 1)
        scores = query[row].float().cpu().transpose(0, 1) @ k.transpose(1, 2) * scaling  # [head, q, n + q]
        keep = torch.cat([torch.ones(q, pk.shape[1], dtype=torch.bool), causal], 1)
        probs = torch.softmax(scores.masked_fill(~keep, float("-inf")), -1)
        z[row] = (probs @ v).transpose(0, 1)
    return z


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("q, s, heads, kv_heads, d_head", [(50, 40, 14, 2, 64), (9, 130, 32, 8, 64),
                                                       (20, 7, 4, 4, 128), (128, 3, 4, 4, 64), (12, 5, 4, 2, 16),
                                                       (6, 9, 8, 2, 64), (1, 4, 14, 2, 64)])
@pytest.mark.parametrize("per_example", [False, True])
def test_triton_row_attention_equals_softmax_over_prefix_and_own_tokens(triton_device, dtype, q, s, heads, kv_heads,
                                                                        d_head, per_example):
    """Un-rotated query and key with rotary tables (one for all rows, or one per row when examples are merged), and
    already rotated ones without; default tiles and the smallest ones (every 16 stacked (head, position) pairs a
    program, so tiles straddle heads). Group sizes and row lengths with and without a common factor: a wrong
    (head, position) mapping can still visit every pair once when they share none."""
    skip_rounding_checks_of_the_interpreter(triton_device, dtype)
    from helpers.patching import triton_kernels
    gen = torch.Generator(device=triton_device).manual_seed(0)
    qkv = torch.randn(11, q, heads + 2 * kv_heads, d_head, generator=gen, device=triton_device).to(dtype)
    query, key, value = qkv.split([heads, kv_heads, kv_heads], dim=2)  # strided views, as in the sweep
    n_prefixes = 3 if per_example else 1
    prefix_key, prefix_value = torch.randn(2, n_prefixes, kv_heads, s, d_head, generator=gen,
                                           device=triton_device).to(dtype)
    # (halves that differ: HF's tables repeat theirs, so a kernel reading the wrong half would pass with those)
    angles = torch.randn(11 if per_example else 1, q, d_head, generator=gen, device=triton_device)
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    rotated = qkv.clone()
    triton_kernels.rotary_inplace(rotated, cos, sin, heads + kv_heads)  # (its own test compares it with HF's formula)
    r_query, r_key, _ = rotated.split([heads, kv_heads, kv_heads], dim=2)
    if per_example:
        row_example = torch.tensor([0, 1, 2, 2, 1, 0, 0, 2, 1, 1, 2], device=triton_device)
        starts = torch.tensor([0, s // 3, s], device=triton_device)  # example 2's prefix is empty
        extra = (row_example, starts)
    else:
        row_example, starts = torch.zeros(11, dtype=torch.long), torch.zeros(1, dtype=torch.long)
        extra = ()
    assert triton_kernels.row_attention_tiles(q, d_head, heads // kv_heads).position_major  # (the default)
    got = triton_kernels.row_attention(r_query, r_key, value, prefix_key, prefix_value, 0.125, *extra)
    got_rotating = triton_kernels.row_attention(query, key, value, prefix_key, prefix_value, 0.125, *extra,
                                                rotary=(cos, sin))
    small = triton_kernels.row_attention(query, key, value, prefix_key, prefix_value, 0.125, *extra,
                                         rotary=(cos, sin), tiles=(16, max(16, 1 << (q - 1).bit_length()), 16, 4))
    # head-major's default tiles (the default is position-major: own keys in causal steps, query and key in halves
    # from head size 32), and position-major's small ones (16 keys a step, 32 stacked queries: with 7 query heads a
    # key/value head, tiles straddle positions), in full width and in halves
    variants = [triton_kernels.row_attention(query, key, value, prefix_key, prefix_value, 0.125, *extra,
                                             rotary=(cos, sin), tiles=tiles)
                for tiles in (triton_kernels.row_attention_tiles(q, d_head, heads // kv_heads, position_major=False),
                              (32, 16, 16, 4, True), (32, 16, 16, 4, True, d_head >= 32))]
    expected = _row_attention_reference(r_query, r_key, value, prefix_key, prefix_value, row_example, starts, 0.125)
    for z in (got, got_rotating, small, *variants):
        assert z.shape == (11, q, heads, d_head) and z.is_contiguous() and z.dtype == dtype
        assert (z.float().cpu() - expected).abs().max().item() < 2e-2
    if not per_example and triton_device == "cuda":  # what the longer rows' path (flash on the prefix and on the own
        # tokens, merged) computes
        flash = fm.shared_prefix_flash_attention(r_query, r_key, value, prefix_key, prefix_value, 0.125)
        assert (got.float() - flash.float()).abs().max().item() < 2e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_triton_silu_mul_equals_the_torch_formula(triton_device, dtype):
    from helpers.patching import triton_kernels
    gen = torch.Generator(device=triton_device).manual_seed(0)
    gate_up = torch.randn(3, 37, 2 * 1500, generator=gen, device=triton_device).to(dtype)
    gate, up = gate_up.float().chunk(2, dim=-1)
    got = triton_kernels.silu_mul(gate_up)
    expected = F.silu(gate) * up
    assert got.shape == (3, 37, 1500) and got.dtype == dtype
    # computed in float32, rounded once to the output dtype: within one unit in the last place (relative 2^-7 for
    # bfloat16, whatever the rounding mode; an absolute bound failed on an unlucky unseeded draw, outputs reach ~15)
    rel = 1e-5 if dtype == torch.float32 else 2.0 ** -7  # (float32: the kernel's exp is an approximation)
    assert ((got.float() - expected).abs() <= rel * expected.abs() + 1e-5).all()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU compiles and runs the kernels in the tests above")
@pytest.mark.skipif(find_spec("triton") is None, reason="Triton is not installed (`make test` adds it)")
def test_every_triton_kernel_compiles_for_an_h100():
    """Without a GPU the kernel tests above run under Triton's interpreter, which skips its compiler's checks (types,
    tile shapes, tl.dot's minimum sizes, names that change shape in a loop): compile every kernel, in the launch
    configurations the sweep uses, for sm_90 (in a subprocess: this one runs the kernels interpreted)."""
    # (Triton's cache is keyed by the kernel's source, the configuration and Triton's version, and failures are not
    # cached: a hit is an earlier successful compile of the same thing)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("triton_compile_check.py")
    run = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    lines = run.stdout.splitlines()
    assert "FAILED" not in run.stdout and lines[-1] == f"compiled {len(lines) - 1} configurations for sm_90"
    assert sum(line.startswith("ok _row_attention_kernel") for line in lines) >= 18


def test_with_gradients_on_the_hf_forwards_run_and_gradients_match():
    """The fused weights are detached copies and the Triton kernels have no backward: autograd gets HF's forwards."""
    model = tiny_model("llama")
    ids = IDS[:, :8]
    model.zero_grad()
    model(input_ids=ids).logits.sum().backward()
    expected = model.model.layers[0].self_attn.q_proj.weight.grad.clone()
    model.zero_grad()
    with fused_modules(model, compile=False):
        model(input_ids=ids).logits.sum().backward()
    got = model.model.layers[0].self_attn.q_proj.weight.grad
    assert got is not None and torch.allclose(got, expected, atol=1e-6)


def _rows_continuing_caches(model, per_example: bool):
    """A sweep forward of ``model`` with a shared prefix (one example's, or each row its own example's, end-aligned:
    examples of 9 and 7 tokens, rows of their last 4) under ``fused_modules``, and HF's logits of the same rows from
    each example's full run: (got, expected) [rows, 4, vocab]."""
    from types import SimpleNamespace

    gen = torch.Generator().manual_seed(4)
    q = 4
    examples = [torch.randint(3, 250, (1, n), generator=gen) for n in ((9, 7) if per_example else (9,))]
    rows = [1, 0, 0, 1, 1] if per_example else [0, 0, 0]
    with torch.no_grad():
        caches = [model(ids[:, :-q], use_cache=True).past_key_values for ids in examples]
        expected = torch.cat([model(examples[e]).logits[:, -q:] for e in rows])
        s = max(ids.shape[1] - q for ids in examples)
        starts = torch.tensor([s - (ids.shape[1] - q) for ids in examples])
        # the examples' prefixes end-aligned in s slots (slots before an example's start: noise, never read)
        layers = []
        for layer in range(len(caches[0].layers)):
            _, kv_heads, _, d_head = caches[0].layers[layer].keys.shape
            keys, values = (torch.randn(len(examples), kv_heads, s, d_head, generator=gen) for _ in range(2))
            for e, cache in enumerate(caches):
                keys[e, :, starts[e]:] = cache.layers[layer].keys[0]
                values[e, :, starts[e]:] = cache.layers[layer].values[0]
            layers.append(SimpleNamespace(keys=keys, values=values))
        fed = torch.cat([examples[e][:, -q:] for e in rows])
        positions = torch.stack([torch.arange(examples[e].shape[1] - q, examples[e].shape[1]) for e in rows])
        with fused_modules(model, compile=False, causal_flash=True) as swap:
            extra = (torch.tensor(rows), starts) if per_example else ()
            with swap.shared_prefix(SimpleNamespace(layers=layers), *extra):
                got = model(fed, position_ids=positions).logits
    return got, expected


@pytest.mark.parametrize("family", ["llama", "qwen2", "granite", "llama head size 32"])
@pytest.mark.parametrize("per_example", [False, True])
def test_the_fused_attentions_row_kernel_branch_equals_hf_continuing_a_cache(triton_device, gpu_branches_on_cpu,
                                                                            row_attention_calls, family, per_example):
    """What a sweep forward runs on a GPU: the fused attention hands un-rotated query and key, its rows' rotary
    tables and the shared prefix (one example's, or each row its own example's, end-aligned) to
    ``triton_kernels.row_attention``. Here on a CPU under Triton's interpreter, in float32 (on a GPU this branch is
    fp16/bf16 only, and the CUDA sweep test covers it), against HF continuing each example's own cache."""
    if triton_device == "cuda":
        pytest.skip("on a GPU the branch runs in fp16/bf16: test_cuda_sweep_matches_the_reference_and_the_hf_modules")
    model = tiny_model("llama", head_dim=32) if family.endswith("32") else tiny_model(family)
    got, expected = _rows_continuing_caches(model, per_example)
    assert len(row_attention_calls) == 2  # both layers' attention took the branch
    # (head size 16: full-width tiles, tl.dot's minimum; 32: the default's halves)
    d_head = model.config.head_dim
    assert fm.triton_kernels.row_attention_tiles(9, d_head, 2).halves == (d_head == 32)
    assert torch.allclose(got, expected, atol=1e-5, rtol=0), (got - expected).abs().max()


@pytest.mark.parametrize("window", [16, 9, 8])
@pytest.mark.parametrize("per_example", [False, True])
def test_gpt_neos_attention_reads_the_shared_prefix_in_the_row_kernel_where_its_window_covers_it(
        triton_device, gpu_branches_on_cpu, row_attention_calls, window, per_example):
    """GPT-Neo's swapped attention in a sweep forward on a GPU: its unscaled scores, without rotary, over the shared
    prefix and each row's own tokens in ``row_attention``; a local layer whose window (8) does not cover prefix and
    rows (9 positions) takes HF's formula instead, and several examples' prefixes cannot go there (the sweep does
    not ask: ``FusedSwap.per_example_prefixes_fit``). Float32 under Triton's interpreter, against HF continuing each
    example's own cache."""
    if triton_device == "cuda":
        pytest.skip("on a GPU the branch runs in fp16/bf16: test_cuda_sweep_matches_the_reference_and_the_hf_modules")
    model = tiny_model("gpt_neo", window_size=window, hidden_size=64)  # (head size 16: tiles need a power of two)
    if window == 8 and per_example:
        with pytest.raises(ValueError, match=r"9 positions, window 8"):
            _rows_continuing_caches(model, per_example)
        return
    got, expected = _rows_continuing_caches(model, per_example)
    # global layer 0 always; local layer 1 where its window covers the 9 positions (9: exactly)
    assert len(row_attention_calls) == (2 if window >= 9 else 1)
    assert all(kw.get("rotary") is None and args[5] == 1.0 for args, kw in row_attention_calls)
    assert torch.allclose(got, expected, atol=1e-5, rtol=0), (got - expected).abs().max()


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_fused_attention_honours_a_padding_mask(attn):
    from transformers import AutoModelForCausalLM
    from helpers.models.tiny_models import tiny_config
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama"), attn_implementation=attn).eval()
    ids = IDS[:, :8].repeat(2, 1)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding in row 1
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask).logits
        with fused_modules(model, compile=False):
            fused = model(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(fused[0], plain[0], atol=1e-5, rtol=0)
    assert torch.allclose(fused[1, 3:], plain[1, 3:], atol=1e-5, rtol=0)
