import os

import torch

# Without a GPU, Triton's kernels run in its interpreter (numpy), so the kernel tests (``triton_device``) check their
# arithmetic on a CPU too. Read when helpers.triton_kernels is imported, hence here, before any test module.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from helpers import vocabulary as V  # noqa: E402
from helpers.tokenizer_training import train_tokenizer  # noqa: E402


@pytest.fixture
def triton_device() -> str:
    """Where the Triton kernel tests run: the GPU, else the CPU under Triton's interpreter; skipped without Triton."""
    from helpers import triton_kernels
    if triton_kernels.triton is None:
        pytest.skip("Triton is not installed (CUDA builds of torch ship it; `make test` adds it to CPU ones)")
    if torch.cuda.is_available():
        return "cuda"
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU, and TRITON_INTERPRET is not 1")
    return "cpu"


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
