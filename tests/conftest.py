import os

import torch

# Without a GPU, Triton's kernels run in its interpreter (numpy), so the kernel tests (``triton_device``) check their
# arithmetic on a CPU too. Read when helpers.patching.triton_kernels is imported, hence here, before any test module.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from helpers.tinysql import vocabulary as V  # noqa: E402
from helpers.models.tokenizer_training import train_tokenizer  # noqa: E402


@pytest.fixture
def triton_device() -> str:
    """Where the Triton kernel tests run: the GPU, else the CPU under Triton's interpreter; skipped without Triton."""
    from helpers.patching import triton_kernels
    if triton_kernels.triton is None:
        pytest.skip("Triton is not installed (CUDA builds of torch ship it; `make test` adds it to CPU ones)")
    if torch.cuda.is_available():
        return "cuda"
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU, and TRITON_INTERPRET is not 1")
    return "cpu"


@pytest.fixture
def row_attention_calls(monkeypatch) -> list:
    """Every call of ``triton_kernels.row_attention`` while the test runs, as (args, kwargs); the kernel still runs."""
    from helpers.patching import triton_kernels
    calls = []
    real = triton_kernels.row_attention

    def recording(*args, **kwargs):
        calls.append((args, kwargs))
        return real(*args, **kwargs)
    monkeypatch.setattr(triton_kernels, "row_attention", recording)
    return calls


@pytest.fixture
def gpu_branches_on_cpu(monkeypatch) -> None:
    """The fused attention takes its CUDA fp16/bf16 branches (flash, Triton kernels) on a CPU, in float32: for tests
    that run those branches with Triton interpreted (aten's flash itself still needs CUDA)."""
    import helpers.patching.fused_modules as fm
    from helpers.patching import triton_kernels
    monkeypatch.setattr(fm, "_flash_applies", lambda like, d_head=None: True)
    monkeypatch.setattr(triton_kernels, "usable", lambda *tensors, d_head=None: True)


@pytest.fixture
def epilogues_on_cpu(monkeypatch, gpu_branches_on_cpu) -> list:
    """The fused MLP takes the gate/up matmul with its silu epilogue on a CPU (float32, Triton interpreted, small
    tiles: the interpreter's cost grows with the tile); records each call's input shape."""
    from helpers.patching import matmul_epilogues as me
    calls = []
    real = me.linear_silu_mul

    def recording(x, w_interleaved, tiles=None):
        calls.append(tuple(x.shape))
        return real(x, w_interleaved, me.INTERPRETER_TILES if tiles is None else tiles)
    monkeypatch.setattr(me, "available", lambda like: True)
    monkeypatch.setattr(me, "linear_silu_mul", recording)
    return calls


@pytest.fixture(scope="session")
def project_tokenizer():
    """The embedded models' tokenizer recipe: every vocabulary word is one token, no BOS."""
    return train_tokenizer()


@pytest.fixture(scope="session")
def splitting_bos_tokenizer():
    """A second, Llama-like tokenizer: prepends BOS and splits many synonyms into several tokens."""
    novel = " " + " ".join(V.NOVEL_TABLES + V.NOVEL_FIELDS)
    return train_tokenizer(vocab_size=1300, add_bos=True, n_items_per_cs=1000, word_repeats=0,
                           require_single_tokens=False, extra_corpus=(novel,) * 50)


@pytest.fixture(scope="session", params=["project", "splitting_bos"])
def any_tokenizer(request, project_tokenizer, splitting_bos_tokenizer):
    return {"project": project_tokenizer, "splitting_bos": splitting_bos_tokenizer}[request.param]


def script_module(filename: str, name: str):
    """scripts/<filename> loaded as the module ``name`` (registered in sys.modules: dataclasses look it up there)."""
    import importlib.util
    import sys
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "scripts" / filename)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def novel_names_script():
    """scripts/novel_names_fine_tune.py as a module (its variants, choice rule, scheduler and install)."""
    return script_module("novel_names_fine_tune.py", "novel_names_fine_tune")


@pytest.fixture(scope="session")
def bench_script():
    """scripts/bench.py as a module."""
    return script_module("bench.py", "bench_script")


@pytest.fixture(scope="session")
def profile_small_script():
    """scripts/profile_small.py as a module."""
    return script_module("profile_small.py", "profile_small_script")
