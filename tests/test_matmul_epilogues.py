"""The gated MLP's gate/up matmul with ``silu(gate) * up`` as its epilogue (helpers.patching.matmul_epilogues): the
kernel against cuBLAS + ``silu_mul`` (on a GPU bit for bit, in fp16 and bf16; on a CPU under Triton's interpreter
in float32 and fp16), and the fused MLP's use of it."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from helpers.models.tiny_models import tiny_model
from helpers.patching import matmul_epilogues as me
from helpers.patching import triton_kernels
from helpers.patching.fused_modules import fused_modules

pytestmark = pytest.mark.skipif(me.TensorDescriptor is None, reason="this Triton has no TensorDescriptor")


@pytest.fixture
def tma_device(triton_device) -> str:
    """``triton_device`` where TMA is: a GPU of compute capability 9.0+, or the CPU under Triton's interpreter."""
    if not me._has_tma(torch.device(triton_device)):
        pytest.skip("a GPU without TMA (compute capability < 9.0): the fused MLP keeps cuBLAS + silu_mul")
    return triton_device

# the launches epilogue_tiles picks (4 stages at depths up to 1,024, 3 deeper), the fallback for GPUs with less shared
# memory, and a small one (the interpreter's cost grows with the tile)
TILE_CHOICES = {"shallow": me.epilogue_tiles(576), "deep": me.epilogue_tiles(2048), "fallback": me._SMALLER,
                "small": me.INTERPRETER_TILES}


def _unfused(x: torch.Tensor, w_gate_up: torch.Tensor) -> torch.Tensor:
    """cuBLAS's product, then ``triton_kernels.silu_mul`` (on a CPU its formula: float32 inside, rounded once)."""
    gate_up = F.linear(x, w_gate_up)
    if gate_up.is_cuda:
        return triton_kernels.silu_mul(gate_up)
    gate, up = gate_up.float().chunk(2, dim=-1)
    return (gate / (1.0 + torch.exp(-gate)) * up).to(gate_up.dtype)


@pytest.mark.parametrize("tiles", list(TILE_CHOICES))
@pytest.mark.parametrize("shape", [(300, 64, 200), (5, 48, 96), (129, 96, 256), (0, 64, 64)])  # rows, k, inter
def test_the_gate_up_matmul_with_its_silu_epilogue_equals_cublas_and_silu_mul(tma_device, tiles, shape):
    """Rows, columns and depth that straddle the tiles (TMA pads loads with zeros and clips stores); on a GPU the
    result is the unfused pair's bit for bit. (Triton's interpreter mishandles bf16 tensor descriptors and truncates
    bf16 casts: bf16 on the GPU only.)"""
    n_rows, k, inter = shape
    triton_device = tma_device
    if triton_device == "cpu" and tiles != "small" and n_rows > 5:
        pytest.skip("large tiles under the interpreter: the small rows case covers them")
    gen = torch.Generator().manual_seed(n_rows + k)
    dtypes = (torch.float16, torch.bfloat16) if triton_device == "cuda" else (torch.float32, torch.float16)
    for dtype in dtypes:
        x = torch.randn(n_rows, k, generator=gen).to(triton_device, dtype)
        w_gu = (torch.randn(2 * inter, k, generator=gen) / k ** 0.5).to(triton_device, dtype)
        got = me.linear_silu_mul(x, me.interleave_gate_up(w_gu), tiles=TILE_CHOICES[tiles])
        want = _unfused(x, w_gu)
        assert got.shape == (n_rows, inter)
        if triton_device == "cuda":
            assert torch.equal(got, want), ((got != want).sum(), dtype)
        else:
            tol = 1e-5 if dtype == torch.float32 else 2e-2
            assert torch.allclose(got.float(), want.float(), atol=tol, rtol=tol), (got - want).abs().max()


def test_interleaving_puts_each_gate_row_beside_its_up_row():
    w = torch.arange(12.0).view(6, 2)  # gate rows 0-2, up rows 3-5
    assert me.interleave_gate_up(w)[:, 0].tolist() == [0.0, 6.0, 2.0, 8.0, 4.0, 10.0]


def test_the_epilogue_takes_rows_of_16_byte_multiples_and_copies_an_input_tma_cannot_read(tma_device,
                                                                                           gpu_branches_on_cpu):
    """TMA reads and writes rows whose size is a multiple of 16 bytes from 16-byte aligned starts: the weight's k
    and inter decide (``available``: fp16/bf16 only); an input that is strided or starts off that alignment is
    copied first, with the same result."""
    triton_device = tma_device
    half = dict(dtype=torch.float16, device=triton_device)
    assert me.available(torch.randn(2 * 40, 48, **half))  # rows of 96 bytes in, 80 out
    assert not me.available(torch.randn(2 * 40, 44, **half))  # (88 bytes in)
    assert not me.available(torch.randn(2 * 36, 48, **half))  # (72 bytes out)
    assert not me.available(torch.randn(2 * 40, 48, device=triton_device))  # (float32: cuBLAS)
    dtype = torch.float32 if triton_device == "cpu" else torch.bfloat16  # (a GPU's tl.dot: tf32 in float32)
    w_gu = (torch.randn(64, 48) / 48 ** 0.5).to(triton_device, dtype)
    w = me.interleave_gate_up(w_gu)
    base = torch.randn(4, 9, 48).to(triton_device, dtype)
    want = _unfused(base, w_gu)
    shifted = torch.empty(base.numel() + 1, device=triton_device, dtype=dtype)[1:].view(4, 9, 48)  # (start off 16 B)
    shifted.copy_(base)
    strided = torch.empty(4, 9, 96, device=triton_device, dtype=dtype)[..., ::2]
    strided.copy_(base)
    for x in (base, shifted, strided):
        assert me.applies(x, w)
        got = me.linear_silu_mul(x, w, tiles=TILE_CHOICES["small"])
        assert torch.allclose(got, want, atol=1e-5, rtol=0) if triton_device == "cpu" else torch.equal(got, want)
    assert not me.applies(base.to(torch.float16 if dtype != torch.float16 else torch.float32), w)
    assert not me.applies(base[..., :44], w)


def test_a_gpu_without_the_shared_memory_of_the_chosen_tiles_falls_back_to_smaller_ones(monkeypatch):
    """The first launch that runs out of shared memory warns and takes ``_SMALLER`` from then on for that shape; a
    launch that fails with those, or with tiles the caller chose, raises."""
    launched = []

    class Kernel:
        def __getitem__(self, grid):
            def launch(*args, BLOCK_N, **kwargs):
                launched.append(BLOCK_N)
                if BLOCK_N > limit[0]:
                    raise me.triton.runtime.errors.OutOfResources(BLOCK_N, limit[0], "shared memory")
            return launch
    limit = [128]
    monkeypatch.setattr(me, "_gate_up_silu_kernel", Kernel())
    monkeypatch.setattr(me, "_OUT_OF_RESOURCES", set())
    x, w = torch.randn(3, 64, dtype=torch.float16), torch.randn(2 * 32, 64, dtype=torch.float16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (tiles the caller chose: no fallback, no warning)
        with pytest.raises(me.triton.runtime.errors.OutOfResources):
            me.linear_silu_mul(x, w, tiles=me.epilogue_tiles(64))
    assert launched == [256] and not me._OUT_OF_RESOURCES
    with pytest.warns(UserWarning, match="more shared memory"):
        me.linear_silu_mul(x, w)
    me.linear_silu_mul(x, w)
    assert launched == [256, 256, 128, 128]  # (the chosen 256 columns once, then the fallback's 128)
    limit[0] = 64
    with pytest.raises(me.triton.runtime.errors.OutOfResources):
        me.linear_silu_mul(x, w)


@pytest.mark.parametrize("family", ["llama", "qwen2", "granite"])
def test_the_fused_mlp_takes_the_epilogue_and_equals_hfs_modules(triton_device, epilogues_on_cpu, family):
    """Each layer's MLP runs its gate/up matmul with the silu epilogue (forced here on a CPU, in float32), and the
    model's logits equal HF's modules'; with gradients on, the module's own forward."""
    if triton_device == "cuda":
        pytest.skip("forced on a CPU; on a GPU the CUDA sweep tests run the real choice")
    model = tiny_model(family)
    ids = torch.randint(0, model.config.vocab_size, (3, 9), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want = model(input_ids=ids).logits
        with fused_modules(model, compile=False) as swap:
            assert "silu_epilogue x2" in swap.swapped
            got = model(input_ids=ids).logits
    assert epilogues_on_cpu == [(3, 9, 48)] * 2
    assert torch.allclose(got, want, atol=1e-5, rtol=0), (got - want).abs().max()
    with fused_modules(model, compile=False):
        model(input_ids=ids).logits.sum().backward()
    assert len(epilogues_on_cpu) == 2 and model.model.layers[0].mlp.gate_proj.weight.grad is not None


@pytest.mark.parametrize("case", ["mlp bias", "input it does not apply to"])
def test_the_fused_mlp_keeps_the_unfused_product_where_the_epilogue_does_not_apply(triton_device, epilogues_on_cpu,
                                                                                  monkeypatch, case):
    """An MLP with biases keeps cuBLAS and ``silu_mul`` (the kernel adds none); an input the kernel cannot take
    (another dtype than the weights', under autocast say: ``applies``) runs the module's own forward."""
    if triton_device == "cuda":
        pytest.skip("forced on a CPU")
    model = tiny_model("llama", mlp_bias=True) if case == "mlp bias" else tiny_model("llama")
    if case == "mlp bias":  # (HF initialises biases to zero: ones that count)
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
                    proj.bias.copy_(torch.randn(proj.bias.shape, generator=torch.Generator().manual_seed(1)))
    else:
        monkeypatch.setattr(me, "applies", lambda x, w: False)
    ids = torch.randint(0, model.config.vocab_size, (3, 9), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want = model(input_ids=ids).logits
        with fused_modules(model, compile=False) as swap:
            got = model(input_ids=ids).logits
    assert "gated_mlp x2" in swap.swapped and not epilogues_on_cpu
    assert ("silu_epilogue x2" in swap.swapped) == (case != "mlp bias")
    assert torch.allclose(got, want, atol=1e-5, rtol=0), (got - want).abs().max()


def test_the_kernel_compiles_once_per_device_whatever_the_row_count():
    """``PROGRAMS`` is the SM count, not the number of tiles: launches at many row counts (from fewer tiles than SMs
    to many more) reuse one compiled kernel. (CUDA with TMA only: Triton's interpreter compiles nothing.)"""
    if not torch.cuda.is_available() or not me._has_tma(torch.device("cuda")):
        pytest.skip("a GPU with TMA")
    device = torch.device("cuda")
    w = me.interleave_gate_up((torch.randn(2 * 96, 64) / 8).to(device, torch.bfloat16))
    caches = me._gate_up_silu_kernel.device_caches
    before = len(caches[torch.cuda.current_device()][0]) if torch.cuda.current_device() in caches else 0
    for rows in (3, 130, 1000, 40_000):  # 1 to 313 tiles of 128 rows x 256 columns
        me.linear_silu_mul(torch.randn(rows, 64, device=device, dtype=torch.bfloat16), w)
    after = len(caches[torch.cuda.current_device()][0])
    assert after >= 1 and after - before <= 1, (before, after)
