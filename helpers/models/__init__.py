"""Models: the registry (upstream's numbering and the embedded models), loading (hub or local folder, offline
first), the per-family architecture table every kernel goes through, tiny random models for tests, and the
embedded models' training, tokenizer and evaluation.

    from helpers.models import load_model, resolve_model
    m = load_model(resolve_model("embedded", 1))         # m.hf_model, m.tokenizer, m.lm (nnsight)

Modules: ``registry``, ``loading``, ``architectures``, ``tiny_models``, ``checkpoints`` (a trained model's folder;
the weights live in ``embedded/``), ``tokenizer_training``, ``training``, ``evaluation``.
"""
from helpers.models.architectures import blocks, family_spec, head_geometry, out_proj_modules
from helpers.models.loading import LoadedModel, ModelLoadError, load_model
from helpers.models.registry import ModelSpec, list_models, resolve_model

__all__ = ["resolve_model", "list_models", "ModelSpec", "load_model", "LoadedModel", "ModelLoadError",
           "family_spec", "head_geometry", "blocks", "out_proj_modules"]
