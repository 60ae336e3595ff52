"""helpers.fused_modules: the swap-ins compute what the HF modules compute, and the model is left as found."""
from __future__ import annotations

import sys

import pytest
import torch

import helpers.fused_modules as fm
from helpers.architectures import blocks, family_spec, get_submodule
from helpers.fused_modules import FUSABLE_FAMILIES, fused_modules
from helpers.tiny_models import TINY_FAMILIES, tiny_model

torch.set_num_threads(1)

IDS = torch.tensor([[3, 17, 99, 4, 250, 8, 8, 41, 77, 5, 120, 2]])


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _modeling(model):
    attention = get_submodule(blocks(model)[0], family_spec(model.config).attention)
    return sys.modules[type(attention).__module__]


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_fused_forward_equals_hf_modules_and_is_undone(family):
    model = tiny_model(family)
    plain = _logits(model)
    modeling = _modeling(model)
    before = {n: getattr(modeling, n, None) for n in ("apply_rotary_pos_emb", "eager_attention_forward")}
    with fused_modules(model, compile=False) as swapped:
        fused = _logits(model)
        # batch > 1 with a shared mask, as in a sweep, and grouped-query attention (4 heads, 2 kv heads)
        fused_batch = _logits(model, IDS.expand(3, -1))
    if family in FUSABLE_FAMILIES:
        assert "apply_rotary_pos_emb" in swapped and "eager_attention_forward" in swapped
        assert any(s.startswith("rms_norm x") for s in swapped)
        assert any(s.startswith("gated_mlp x") for s in swapped) == (family != "granitemoe")
    else:
        assert swapped == []
    assert torch.allclose(fused, plain, atol=1e-5, rtol=0), (fused - plain).abs().max()
    assert torch.allclose(fused_batch, plain.expand(3, -1, -1), atol=1e-5, rtol=0)
    # everything restored: no instance forwards left, module globals back
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert {n: getattr(modeling, n, None) for n in before} == before
    assert torch.equal(_logits(model), plain)


def test_swaps_are_undone_after_an_error():
    model = tiny_model("llama")
    modeling = _modeling(model)
    original = modeling.eager_attention_forward
    with pytest.raises(RuntimeError, match="boom"):
        with fused_modules(model, compile=False):
            assert modeling.eager_attention_forward is not original
            raise RuntimeError("boom")
    assert modeling.eager_attention_forward is original
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


def test_compiled_swaps_match_the_plain_ones():
    """The CUDA default path (torch.compile) on CPU: same logits; no silent fallback to the plain functions."""
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
