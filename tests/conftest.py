import pytest

from helpers import vocabulary as V
from helpers.tokenizer_training import train_tokenizer


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
