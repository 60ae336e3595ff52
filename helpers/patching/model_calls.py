"""How the sweep calls a transformers model: unwrapping nnsight, the cache keyword, forwards of aligned batches,
the output layer restricted to the metric's two tokens, eval mode, progress bars."""
from __future__ import annotations

import inspect
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from helpers.patching.aligned_batch import AlignedBatch
from helpers.patching.fused_modules import causal_additive_mask


def unwrap_model(model) -> torch.nn.Module:
    """The torch ``*ForCausalLM`` behind ``model``: itself, nnsight 0.8's ``._module`` (``._model`` too), or a
    ``helpers.models.LoadedModel``'s ``.hf_model``."""
    if isinstance(model, torch.nn.Module):
        return model
    for attr in ("hf_model", "_module", "_model"):
        try:
            inner = getattr(model, attr)
        except AttributeError:
            continue
        if isinstance(inner, torch.nn.Module):
            return inner
    raise TypeError(f"Expected a transformers *ForCausalLM or an nnsight wrapper of one, got {type(model)!r}")


@dataclass
class ModelCalls:
    """How to call this model: the cache keyword (``cache`` in transformers >= 5.2x, else ``past_key_values``)."""

    cache_kw: str
    logits_to_keep: bool

    @classmethod
    def of(cls, model) -> "ModelCalls":
        params = inspect.signature(model.forward).parameters
        cache_kw = "cache" if "cache" in params else "past_key_values"
        return cls(cache_kw, "logits_to_keep" in params)

    def forward(self, model, ids: torch.Tensor, *, start: int = 0, positions: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, cache=None, use_cache: bool = False, ready_mask: bool = False):
        """Run ``ids`` ([batch, q] tokens at absolute positions start..start+q-1, or at ``positions`` [batch, q]);
        return (last logits, cache).

        ``mask``: a ready 4D additive mask [batch or 1, 1, q, kv] (transformers passes 4D masks through as is).
        ``ready_mask``: hand the model eager's causal mask [1, 1, q, q] ready-made (no cache, no padding). Its own
        mask building has a packed-sequence check that reads a GPU value: a host sync per forward, which stalls a
        sweep's launch queue."""
        q = ids.shape[1]
        kwargs = {"use_cache": use_cache or cache is not None}
        if cache is not None:
            kwargs[self.cache_kw] = cache
        if mask is not None:
            kwargs["attention_mask"] = mask
        elif ready_mask:
            assert cache is None, "a ready causal mask is q x q: no cached positions"
            kwargs["attention_mask"] = causal_additive_mask(q, q, model_dtype(model), ids.device)
        if self.logits_to_keep:
            kwargs["logits_to_keep"] = 1
        position_ids = positions if positions is not None else torch.arange(
            start, start + q, device=ids.device).unsqueeze(0)
        out = model(input_ids=ids, position_ids=position_ids, **kwargs)
        new_cache = None
        if kwargs["use_cache"]:
            new_cache = getattr(out, self.cache_kw, None)
            if new_cache is None:  # output field named differently from the keyword in some versions
                new_cache = getattr(out, "past_key_values" if self.cache_kw == "cache" else "cache", None)
        return out.logits[:, -1], new_cache


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def model_dtype(model) -> torch.dtype:
    return next(model.parameters()).dtype


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host bookkeeping to the device without waiting for the queued forwards (pinned, non-blocking)."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def first_tensor(args, kwargs, name: str | None = None):
    if args:
        return args[0]
    if name is not None and name in kwargs:
        return kwargs[name]
    return next(v for v in kwargs.values() if isinstance(v, torch.Tensor))


def replace_first(args, kwargs, value, name: str | None = None):
    if args:
        return (value,) + tuple(args[1:]), kwargs
    key = name if name is not None and name in kwargs else next(
        k for k, v in kwargs.items() if isinstance(v, torch.Tensor))
    return args, {**kwargs, key: value}


@contextmanager
def two_row_output_layer(model, token_ids: Sequence[int]):
    """Restrict the output layer's matmul to ``token_ids`` while inside (only for an ``nn.Linear`` head).

    The model's final norm and any logit scaling still apply. Yields True if restricted (logits then have
    ``len(token_ids)`` columns), False if the head is not a Linear (full vocabulary logits).
    """
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        yield False
        return
    idx = torch.as_tensor(list(token_ids), device=head.weight.device)
    weight = head.weight.detach().index_select(0, idx)
    bias = None if head.bias is None else head.bias.detach().index_select(0, idx)
    had_own = "forward" in head.__dict__
    old = head.__dict__.get("forward")
    head.forward = lambda x: F.linear(x, weight, bias)
    try:
        yield True
    finally:
        if had_own:
            head.forward = old
        else:
            del head.forward


@contextmanager
def eval_mode(model):
    """Dropout off while patching: every run must be deterministic. Afterwards each module's own mode comes back (a
    layer the caller had put in eval mode inside a training model stays so; ``model.train(was)`` flipped every
    module to the top's mode), through each module's own ``train()``, so that overrides hear the switch back
    (transformers' ``PreTrainedModel.train`` re-selects its kernels, some attention modules drop a cache). A model
    already in eval mode, the usual case, is left untouched (switching every module and back took ~1.7 ms of host a
    sweep for a 30-layer model)."""
    modes = [(module, module.training) for module in model.modules()]
    if any(training for _, training in modes):
        model.eval()
    try:
        yield
    finally:
        # parents come before their descendants in modules(): a parent's train() sets its subtree, and a descendant
        # that differs from it is set again after; a module shared by two parents may be flipped by the second
        for module, training in modes:
            if module.training != training:
                module.train(training)
        for module, training in modes:
            if module.training != training:
                module.training = training


def progress_bar(iterable, enabled: bool, desc: str, total: int | None = None):
    """tqdm.auto over ``iterable`` (or a manual bar when it is None); ``iterable`` itself / None when disabled."""
    if not enabled:
        return iterable
    from tqdm.auto import tqdm
    return tqdm(iterable, desc=desc, total=total, unit="patch" if iterable is None else "it")


def ready_masks(swap) -> bool:
    """Hand the model ready causal masks (no host sync in transformers' mask building)? Only where the fused
    attention runs every layer under the sweep's promise (causal, no padding)."""
    return swap is not None and swap.shares_prefix


def padded(swap, padded: bool = True):
    """Fused attention off its causal-flash promise while a padded batch runs."""
    return swap.padded() if swap is not None and padded else nullcontext()


def aligned_forward(model, calls: ModelCalls, batch: AlignedBatch, stop: int, swap, *, use_cache: bool = False):
    """One forward of ``batch``'s slots ``0 .. stop - 1`` (no cache): with its padding mask where it is padded
    (fused attention then takes the masked path, not causal flash), else causal (ready-made where fused)."""
    if not batch.padded:
        return calls.forward(model, batch.ids[:, :stop], use_cache=use_cache, ready_mask=ready_masks(swap))
    mask = batch.additive_mask(stop, stop, model_dtype(model))
    with padded(swap):
        return calls.forward(model, batch.ids[:, :stop], positions=batch.positions[:, :stop], mask=mask,
                             use_cache=use_cache)
