"""Fast exact activation patching: heads (out_proj input), residual stream, attention output, MLP output.

Every kernel answers, for each (layer, [head,] position) of each example: run the *corrupt* prompt, overwrite
one activation slice with its value from the *clean* run, and read the metric
``logits[answer_position, clean_token_id] - logits[answer_position, corrupt_token_id]``.
``patch_heads_reference`` (helpers.patching_reference) does exactly that with one nnsight trace per patch; the
kernels here give the same numbers (to float rounding) with far less work, by five exact savings:

1. **Prefix skip.** Before the first position where clean and corrupt ids differ, clean and corrupt activations
   are identical, so a patch there changes nothing: ``patched_logit_diff = corrupt_logit_diff``, not computed.
2. **Corrupt KV cache.** A patch at position ``p`` cannot change keys/values at positions ``< p`` in any layer.
   Patch positions are grouped in buckets ``[s, e)``; one forward feeds only tokens ``s..end`` with the corrupt
   run's cache of positions ``< s`` (computed once per bucket start, batch 1), with explicit ``position_ids``. Each
   batch row is one patch, applied by a hook at its own relative position in its own layer. Fused llama-like models
   share that batch-1 cache with every row inside their attention (``FusedSwap.shared_prefix``: one flash call over
   all rows' queries, merged exactly with the causal part); other families get it as an expanded view per layer.
3. **Rows join at their layer.** Layers before a patch's layer compute exactly the corrupt activations. The
   forward starts with *one* row (the unpatched corrupt run, which is also a self-check of the machinery); a
   forward pre-hook on block ``l`` appends copies of that row for the patches joining there (rows are sorted by
   layer). Masks and rotary tables are computed for batch 1 by the model and broadcast; each layer's cache is
   expanded to that layer's batch.
4. **A head patch skips its own layer.** Patching one head at position ``p`` of layer ``l`` changes block ``l``'s
   output at ``p`` only, so that one vector is computed aside from the unpatched row's block input and z
   (``_block_tail``: out_proj, residual, post-attention norm, MLP) and the row joins at block ``l + 1`` with it
   written in. Last-layer head patches are applied at the out_proj input as usual.
5. **The last layer serves the answer only.** There the out_proj and the MLP see the last position alone (heads
   and residual sites); its keys and values still come from every position.

**Several examples share forwards** (``examples_per_forward``; by default, on a GPU, up to 32 of those whose own
sweep leaves it waiting for the host). They run end-aligned (helpers.aligned_batch): a bucket feeds every example's
last q tokens, so the answer is the last position for all; rows 0 .. E-1 are the examples' unpatched corrupt runs
and each patch row copies its own example's; each block gets the padding mask, rotary tables and cache gathered to
its rows. Fused llama-like models on a GPU share the examples' prefixes inside attention (helpers.triton_kernels'
``row_attention``: each row reads its own example's), with no padding mask at all. A group's longest span must
fit in its shortest example; models with sliding-window layers run one example at a time.

Only the answer position's logits are needed: the model runs with ``logits_to_keep=1`` and, when the output layer
is an ``nn.Linear``, its matmul is restricted to the two vocabulary rows of the metric (the model's own final norm
and logit scaling, e.g. granite's ``logits_scaling``, still apply). Rows are chunked to fit memory; a CUDA
out-of-memory error halves the chunk and retries instead of failing. Llama-family models run with
helpers.fused_modules' same-formula swap-ins (``fused=True``; on CUDA with flash attention and Triton kernels).

Measured (scripts/bench.py, H100 80GB HBM3, torch 2.11, transformers 5.17, random-init real shapes, one 60-token
example, first difference at 10, full layer x head x position sweep, default settings; README "Speed"): bf16 on
2026-11-28, TinyStories-2L 0.060-0.065 s, Qwen2.5-0.5B 0.414-0.451 s, Llama-3.2-1B 1.083-1.115 s (the nnsight
loop, extrapolated, in the README table's run: 9.6, 791, 593 s; its own time varies 3x or more between runs); fp32
in that run 0.078, 3.48, 12.2 s. Llama's matrix products take ~73 % of its GPU time at ~720 TFLOP/s; Qwen's ~55 %,
then ``silu(gate) * up`` 15 % and attention 12 %, and its GPU waits for the host ~16 % of the wall time. 10 examples
(T 55-65, bf16): TinyStories 2.2x one example (merged), Qwen 9.5-9.6x (merged), Llama 9.8-9.9x (one at a time):
patches of different examples share no arithmetic, so where one example keeps the GPU busy the cost is linear in
examples. fp32 agrees with the loop to ~1e-4 logits on these shapes (the unpatched row deviates from the full
corrupt run by as much: rounding); bf16 by up to ~0.6 logits, about one bf16 ulp at those logit sizes (the
unpatched row, likewise).

Module paths come only from helpers.architectures, so one code path serves gpt_neo, gpt2, llama, qwen2, granite,
granitemoe. ``model`` is a HF ``*ForCausalLM`` or an nnsight wrapper of one (unwrapped via ``._module``).

Sites (what "layer l" means):
- heads: the input of the attention output projection of layer l (z, head-major), one head slice.
- residual: the residual stream at the *input* of block l (``resid_pre``; layer 0 = embeddings).
- attention_output: the attention module's output of layer l (what is added to the residual).
- mlp_output: the MLP (or mixture-of-experts) output of layer l.
"""
from __future__ import annotations

import copy
import inspect
import math
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from helpers.aligned_batch import AlignedBatch
from helpers.architectures import blocks, family_spec, get_submodule, head_geometry, out_proj_modules
from helpers.fused_modules import causal_additive_mask, fused_modules, per_example_prefix_applies
from helpers.patching_results import (
    DEFAULT_MIN_DENOMINATOR,
    HeadPatchingResult,
    LayerPatchingResult,
    PatchingResult,
    build_result,
    report_inclusion,
    validate_pair,
)

OutOfMemoryError = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)

SITES = ("heads", "residual", "attention_output", "mlp_output")
# sites whose last layer runs out_proj and MLP at the answer position only (see _sweep_hooks)
_ANSWER_ONLY_LAST_LAYER = ("heads", "residual")

__all__ = [
    "patch_heads", "patch_residual", "patch_attention_output", "patch_mlp_output", "patch_sweep",
    "unwrap_model", "run_chunked", "HeadPatchingResult", "LayerPatchingResult", "PatchingResult",
]


# ----------------------------------------------------------------------------------------------------------------
# Model plumbing
# ----------------------------------------------------------------------------------------------------------------

def unwrap_model(model) -> torch.nn.Module:
    """The torch ``*ForCausalLM`` behind ``model`` (itself, or nnsight 0.8's ``._module``; ``._model`` too)."""
    if isinstance(model, torch.nn.Module):
        return model
    for attr in ("_module", "_model"):
        try:
            inner = getattr(model, attr)
        except AttributeError:
            continue
        if isinstance(inner, torch.nn.Module):
            return inner
    raise TypeError(f"Expected a transformers *ForCausalLM or an nnsight wrapper of one, got {type(model)!r}")


@dataclass
class _Calls:
    """How to call this model: the cache keyword (``cache`` in transformers >= 5.2x, else ``past_key_values``)."""

    cache_kw: str
    logits_to_keep: bool

    @classmethod
    def of(cls, model) -> "_Calls":
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
            kwargs["attention_mask"] = causal_additive_mask(q, q, _dtype(model), ids.device)
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


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _dtype(model) -> torch.dtype:
    return next(model.parameters()).dtype


def _first_tensor(args, kwargs, name: str | None = None):
    if args:
        return args[0]
    if name is not None and name in kwargs:
        return kwargs[name]
    return next(v for v in kwargs.values() if isinstance(v, torch.Tensor))


def _replace_first(args, kwargs, value, name: str | None = None):
    if args:
        return (value,) + tuple(args[1:]), kwargs
    key = name if name is not None and name in kwargs else next(
        k for k, v in kwargs.items() if isinstance(v, torch.Tensor))
    return args, {**kwargs, key: value}


@dataclass
class _Site:
    kind: str
    modules: list  # one per layer
    where: str  # "pre" (module input), "post" (module output), "block" (block input, patched in the growth hook)
    n_units: int
    unit_width: int


def _site(model, kind: str) -> _Site:
    spec = family_spec(model.config)
    geo = head_geometry(model.config)
    bl = blocks(model)
    if kind == "heads":
        return _Site(kind, out_proj_modules(model), "pre", geo.n_heads, geo.d_head)
    if kind == "residual":
        return _Site(kind, bl, "block", 1, geo.d_model)
    if kind == "attention_output":
        return _Site(kind, [get_submodule(b, spec.attention) for b in bl], "post", 1, geo.d_model)
    if kind == "mlp_output":
        return _Site(kind, [get_submodule(b, spec.mlp) for b in bl], "post", 1, geo.d_model)
    raise ValueError(f"unknown site {kind!r}; known: {SITES}")


def read_site(site: _Site, args, kwargs, output) -> torch.Tensor:
    """The activation tensor at ``site`` ([batch, pos, n_units * unit_width]) from a hook's arguments."""
    if site.where == "post":
        return output if isinstance(output, torch.Tensor) else output[0]
    return _first_tensor(args, kwargs, "hidden_states")


@contextmanager
def capture_site(site: _Site, store: dict):
    """Hooks saving ``store[layer] = activation`` ([batch, pos, width], detached) at every layer of ``site``."""
    handles = []
    for layer, module in enumerate(site.modules):
        def hook(mod, args, kwargs, output=None, _layer=layer):
            store[_layer] = read_site(site, args, kwargs, output).detach()
        if site.where == "post":
            handles.append(module.register_forward_hook(hook, with_kwargs=True))
        else:
            handles.append(module.register_forward_pre_hook(
                lambda mod, args, kwargs, _h=hook: _h(mod, args, kwargs), with_kwargs=True))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


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


# ----------------------------------------------------------------------------------------------------------------
# KV cache snapshots
# ----------------------------------------------------------------------------------------------------------------

def _snapshot(cache):
    """A copy of a (layered) transformers cache whose layers no later update can change."""
    if cache is None:
        return None
    if not hasattr(cache, "layers"):
        raise TypeError(f"patching needs a layered transformers Cache (transformers >= 4.56), got {type(cache)!r}")
    snap = copy.copy(cache)
    snap.layers = [copy.copy(layer) for layer in cache.layers]
    return snap


def _expanded(snap, batch_per_layer: Sequence[int], row_example: torch.Tensor | None = None):
    """A fresh copy of a snapshot whose layer j holds keys/values for the ``batch_per_layer[j]`` rows of that layer:
    a batch-1 snapshot's expanded (views), a batch-n one's gathered by ``row_example`` ([rows], each row's example).
    """
    if snap is None:
        return None
    out = copy.copy(snap)
    out.layers = []
    for layer, b in zip(snap.layers, batch_per_layer):
        layer = copy.copy(layer)
        if getattr(layer, "keys", None) is not None and layer.keys.numel() > 0:
            if layer.keys.shape[0] == 1:
                layer.keys = layer.keys.expand(b, *layer.keys.shape[1:])
                layer.values = layer.values.expand(b, *layer.values.shape[1:])
            else:
                layer.keys = layer.keys.index_select(0, row_example[:b])
                layer.values = layer.values.index_select(0, row_example[:b])
        out.layers.append(layer)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Chunking with out-of-memory back-off
# ----------------------------------------------------------------------------------------------------------------

def run_chunked(n_items: int, chunk_size: int, fn: Callable[[int, int], None], *, on_oom: Callable | None = None):
    """Call ``fn(start, stop)`` over ``[0, n_items)`` in chunks; on out-of-memory halve the chunk and retry.

    Returns ``(final_chunk_size, n_halvings)``. Re-raises if a chunk of 1 does not fit.
    """
    start, halvings = 0, 0
    chunk_size = max(1, int(chunk_size))
    while start < n_items:
        stop = min(n_items, start + chunk_size)
        failed = False
        try:
            fn(start, stop)
        except OutOfMemoryError:
            if stop - start <= 1:
                raise
            failed = True
        if failed:  # outside the except block, so the traceback's tensors are already released
            chunk_size = max(1, (stop - start) // 2)
            halvings += 1
            if on_oom is not None:
                on_oom()
            elif torch.cuda.is_available():
                torch.cuda.empty_cache()
            continue
        start = stop
    return chunk_size, halvings


def _auto_chunk_rows(model, q: int, kv_len: int, device: torch.device) -> int:
    """Rows per forward that should fit comfortably in memory (the OOM back-off handles the rest)."""
    cfg = model.config
    geo = head_geometry(cfg)
    nbytes = next(model.parameters()).element_size()
    inter = getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None) or 4 * geo.d_model
    inter *= max(1, getattr(cfg, "num_experts_per_tok", 1) or 1)
    per_token = nbytes * (8 * geo.d_model + 3 * inter) + 4 * 2 * geo.n_heads * kv_len  # eager scores in fp32
    per_row = q * per_token + geo.n_layers * 2 * geo.n_kv_heads * geo.d_head * kv_len * nbytes
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        # memory PyTorch's caching allocator holds but does not use is free to us too (mem_get_info omits it)
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        budget = 0.4 * free
    else:
        budget = 2 * 2**30
    return max(1, int(budget // per_row))


# ----------------------------------------------------------------------------------------------------------------
# The sweep
# ----------------------------------------------------------------------------------------------------------------

class _NotMergeable(RuntimeError):
    """These examples cannot share forwards (raised before any of their results): run them one at a time."""


class _MaskNotPassedOn(_NotMergeable):
    """A block got another mask than the one handed to the model: merged examples cannot be told apart there."""


class _Plan:
    """What the hooks do in one forward: rows joining per layer and the patch of each layer.

    Rows ``0 .. n_base - 1`` are the unpatched corrupt runs of the forward's examples (one example unless several
    are merged); every other row is a copy of its example's one, joined at its layer. ``row_example`` [batch]:
    each row's example (= the batch index of its base row), in batch order.
    """

    def __init__(self, n_new: list[int], patches: dict, computed: dict | None = None, *, n_base: int = 1,
                 row_example: torch.Tensor | None = None, mask: torch.Tensor | None = None):
        self.n_new = n_new  # rows appended at the input of block l
        self.n_base = n_base
        self.batch = (n_base + torch.tensor(n_new).cumsum(0)).tolist()  # batch of block l once its rows have joined
        self.patches = patches  # layer -> (batch_idx, rel_pos, unit, values [n, width])
        # join layer j -> (batch_idx, rel_pos, head, clean z [n, d_head], example): head patches of layer j - 1 whose
        # one changed position is computed from their base row's layer j - 1 and written into block j's input
        self.computed = computed or {}
        self.stash: dict = {}  # ("x" | "z", layer) -> the base rows' block input / out_proj input
        self.row_example = row_example
        self.mask = mask  # the batch-n_base 4D mask handed to the model (several examples), gathered per block
        self._gathered: dict = {}

    def joining(self, layer: int) -> torch.Tensor | int:
        """Where the rows joining at ``layer`` copy from: base row indices [n], or n copies of row 0."""
        n = self.n_new[layer]
        if self.n_base == 1:
            return n
        return self.row_example[self.batch[layer] - n: self.batch[layer]]

    def per_row(self, args: tuple, kwargs: dict, layer: int) -> tuple[tuple, dict]:
        """A block's batch-``n_base`` arguments (the 4D mask, rotary tables, position ids) gathered to its rows."""
        b = self.batch[layer]
        index = self.row_example[:b]

        if self._gathered.get("batch") != b:  # blocks run in order: keep only the current batch's copies
            self._gathered = {"batch": b}

        def rows(t: torch.Tensor) -> torch.Tensor:
            if id(t) not in self._gathered:
                self._gathered[id(t)] = t.index_select(0, index)
            return self._gathered[id(t)]

        if self.mask is not None and not (any(a is self.mask for a in args)
                                          or any(v is self.mask for v in kwargs.values())):
            raise _MaskNotPassedOn(f"block {layer} did not receive the sweep's 4D attention mask as given")
        mask = self.mask if self.mask is not None and self.mask.shape[0] == self.n_base else None
        args = tuple(rows(a) if mask is not None and a is mask else a for a in args)
        kwargs = dict(kwargs)
        for key, value in kwargs.items():
            if mask is not None and value is mask:
                kwargs[key] = rows(value)
            elif key == "position_embeddings" and isinstance(value, tuple) and value[0].shape[0] == self.n_base:
                kwargs[key] = tuple(rows(t) for t in value)
            elif key == "position_ids" and isinstance(value, torch.Tensor) and value.dim() == 2 \
                    and value.shape[0] == self.n_base > 1:
                kwargs[key] = rows(value)
        return args, kwargs


def _block_tail(model, layer: int, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Block ``layer``'s output at one position from its input ``x`` and its out_proj input ``z`` ([n, 1, *]).

    The residual wiring every supported family shares: ``mid = x + attn_out * m``, ``out = mid + mlp(norm2(mid))
    * m`` (``m``: granite's ``residual_multiplier``, else none), ``attn_out = out_proj(z)`` (dropout is off).
    Modules are called through ``.forward`` so that the sweep's hooks do not fire on these side computations.
    """
    spec = family_spec(model.config)
    block = blocks(model)[layer]
    m = getattr(block, "residual_multiplier", None)
    attn = get_submodule(block, spec.out_proj).forward(z)
    mid = x + (attn if m is None else attn * m)
    ff = get_submodule(block, spec.mlp).forward(get_submodule(block, spec.post_attention_norm).forward(mid))
    return mid + (ff if m is None else ff * m)


def _computed_rows(model, site: _Site, plan: _Plan, join: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(batch_idx, rel_pos, block ``join - 1`` output at rel_pos [n, d_model]) of the rows joining at ``join``."""
    batch_idx, rel_pos, head, clean, example = plan.computed[join]
    # the base rows' [n_base, q, d_model] and [n_base, q, H * d_head]
    x0, z0 = plan.stash.pop(("x", join - 1)), plan.stash.pop(("z", join - 1))
    z = z0[example, rel_pos]  # (advanced indexing: a copy)
    z.view(z.shape[0], site.n_units, site.unit_width)[torch.arange(z.shape[0], device=device), head] = clean
    out = _block_tail(model, join - 1, x0[example, rel_pos].unsqueeze(1), z.unsqueeze(1))
    return batch_idx, rel_pos, out[:, 0]


def _apply_patch(x: torch.Tensor, site: _Site, patch) -> torch.Tensor:
    batch_idx, rel_pos, unit, values = patch
    if not x.is_contiguous():
        x = x.contiguous()
    x.view(x.shape[0], x.shape[1], site.n_units, site.unit_width)[batch_idx, rel_pos, unit] = values
    return x


@contextmanager
def _sweep_hooks(model, site: _Site, state: dict):
    """Growth pre-hooks on every block and patch hooks at ``site``; inactive while ``state['plan']`` is None."""
    handles = []
    for layer, block in enumerate(blocks(model)):
        def grow(mod, args, kwargs, _layer=layer):
            plan = state.get("plan")
            if plan is None or (plan.n_new[_layer] == 0 and _layer + 1 not in plan.computed and plan.n_base == 1):
                return None
            hidden = _first_tensor(args, kwargs, "hidden_states")
            if _layer + 1 in plan.computed:
                plan.stash[("x", _layer)] = hidden[:plan.n_base]
            if plan.n_new[_layer]:
                if hidden.shape[0] != plan.batch[_layer]:  # (unless a fused block appended them: FusedSwap.extra_rows)
                    src = plan.joining(_layer)
                    new = (hidden[:1].expand(src, *hidden.shape[1:]) if isinstance(src, int)
                           else hidden.index_select(0, src))
                    hidden = torch.cat([hidden, new], dim=0)
                if site.where == "block" and _layer in plan.patches:
                    hidden = _apply_patch(hidden, site, plan.patches[_layer])
                if _layer in plan.computed:
                    batch_idx, rel_pos, values = _computed_rows(model, site, plan, _layer, hidden.device)
                    hidden[batch_idx, rel_pos] = values.to(hidden.dtype)
            if plan.n_base > 1:
                args, kwargs = plan.per_row(args, kwargs, _layer)
            return _replace_first(args, kwargs, hidden, "hidden_states")
        handles.append(block.register_forward_pre_hook(grow, with_kwargs=True))
    if site.where in ("pre", "post"):
        for layer, module in enumerate(site.modules):
            if site.where == "pre":
                def pre(mod, args, kwargs, _layer=layer):
                    plan = state.get("plan")
                    if plan is None:
                        return None
                    if _layer + 1 in plan.computed:
                        plan.stash[("z", _layer)] = _first_tensor(args, kwargs)[:plan.n_base]
                    if _layer not in plan.patches:
                        return None
                    x = _first_tensor(args, kwargs)
                    return _replace_first(args, kwargs, _apply_patch(x, site, plan.patches[_layer]))
                handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
            else:
                def post(mod, args, output, _layer=layer):
                    plan = state.get("plan")
                    if plan is None or _layer not in plan.patches:
                        return None
                    if isinstance(output, torch.Tensor):
                        return _apply_patch(output, site, plan.patches[_layer])
                    patched = _apply_patch(output[0], site, plan.patches[_layer])
                    return (patched,) + tuple(output[1:]) if isinstance(output, tuple) else output
                handles.append(module.register_forward_hook(post))
    if site.kind in _ANSWER_ONLY_LAST_LAYER:
        # Only the last (answer) position of the last layer reaches the metric, so there the attention output
        # projection and the MLP see that position alone (registered after the patch hooks: a head patch is
        # applied first). The block's residual additions broadcast the [batch, 1, d] outputs over positions;
        # positions other than the last are wrong from then on, and never read. Keys and values of the last
        # layer still come from every position.
        last = len(site.modules) - 1
        spec = family_spec(model.config)

        def keep_last(mod, args, kwargs):
            if state.get("plan") is None:
                return None
            x = _first_tensor(args, kwargs, "hidden_states")
            # contiguous: a strided [batch, 1, d] view sends compiled linears to a batched matmul per row
            return _replace_first(args, kwargs, x[:, -1:].contiguous(), "hidden_states")
        for module in (out_proj_modules(model)[last], get_submodule(blocks(model)[last], spec.mlp)):
            handles.append(module.register_forward_pre_hook(keep_last, with_kwargs=True))
    try:
        yield
    finally:
        state["plan"] = None
        for h in handles:
            h.remove()


def _group_rows(L: int, U: int, spans: Sequence[int], q: int, size: int) -> torch.Tensor:
    """Rows (layer, example, unit, r) of one bucket, layer-major (rows join the forward in this order).

    ``r`` counts positions from the end (the answer position is r = 1): the bucket feeds every example's last ``q``
    tokens and patches its positions r in (q - size, q], as far as its span (positions from its first difference).
    """
    r = torch.arange(max(1, q - size + 1), q + 1)
    grid = torch.stack(torch.meshgrid(torch.arange(L), torch.arange(len(spans)), torch.arange(U), r, indexing="ij"),
                       -1).reshape(-1, 4)
    return grid[grid[:, 3] <= torch.tensor(list(spans))[grid[:, 1]]]


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host bookkeeping to the device without waiting for the queued forwards (pinned, non-blocking)."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def _is_plain(cache) -> bool:
    """Every layer a plain full-attention DynamicLayer (keys of all positions, nothing else to track)?"""
    try:
        from transformers.cache_utils import DynamicLayer
    except ImportError:
        return False
    return all(type(layer) is DynamicLayer for layer in getattr(cache, "layers", [None]))


def _truncated(cache, s: int):
    out = copy.copy(cache)
    out.layers = []
    for layer in cache.layers:
        layer = copy.copy(layer)
        layer.keys, layer.values = layer.keys[..., :s, :], layer.values[..., :s, :]
        out.layers.append(layer)
    return out


def _aligned_forward(model, calls: _Calls, batch: AlignedBatch, stop: int, swap, *, use_cache: bool = False):
    """One forward of ``batch``'s slots ``0 .. stop - 1`` (no cache): with its padding mask where it is padded
    (fused attention then takes the masked path, not causal flash), else causal (ready-made where fused)."""
    if not batch.padded:
        return calls.forward(model, batch.ids[:, :stop], use_cache=use_cache, ready_mask=_ready_masks(swap))
    mask = batch.additive_mask(stop, stop, _dtype(model))
    with _padded(swap):
        return calls.forward(model, batch.ids[:, :stop], positions=batch.positions[:, :stop], mask=mask,
                             use_cache=use_cache)


def _padded(swap, padded: bool = True):
    """Fused attention off its causal-flash promise while a padded batch runs."""
    return swap.padded() if swap is not None and padded else nullcontext()


def _prefix_caches(model, calls: _Calls, batch: AlignedBatch, starts: list[int], stats: dict, swap) -> list:
    """The corrupt runs' cache of slots < s for every bucket start s (None for s = 0). Raises _NotMergeable for
    several examples whose cache layers are not all full attention.

    Full-attention caches: one pass up to the last start, then views truncated to each start. Other cache layers
    (sliding windows keep only their window), one example: one incremental pass, snapshotted at each start.
    """
    last = max(starts, default=0)
    if last == 0:
        return [None for _ in starts]
    _, cache = _aligned_forward(model, calls, batch, last, swap, use_cache=True)
    stats["prefix_forwards"] = stats.get("prefix_forwards", 0) + 1
    if _is_plain(cache):
        return [_truncated(cache, s) if s > 0 else None for s in starts]
    if len(batch) > 1:
        raise _NotMergeable("cache layers other than full attention")
    snaps, cache, done = [], None, 0
    for s in starts:
        if s > done:
            _, cache = calls.forward(model, batch.ids[:, done:s], start=done, cache=cache, use_cache=True)
            cache = _snapshot(cache)
            done = s
            stats["prefix_forwards"] += 1
        snaps.append(_snapshot(cache))
    return snaps


def _metric(logits: torch.Tensor, two_rows: bool, clean_tok: torch.Tensor, corrupt_tok: torch.Tensor,
            row_example: torch.Tensor) -> torch.Tensor:
    """logit[clean] - logit[corrupt] of every row [batch], each with its example's tokens. ``two_rows``: the logits
    have two columns per example (clean, corrupt), else the full vocabulary (``*_tok``: [examples] token ids)."""
    logits = logits.float()
    if two_rows:
        clean_col, corrupt_col = 2 * row_example, 2 * row_example + 1
    else:
        clean_col, corrupt_col = clean_tok[row_example], corrupt_tok[row_example]
    return (logits.gather(1, clean_col.unsqueeze(1)) - logits.gather(1, corrupt_col.unsqueeze(1))).squeeze(1)


# Default bucketing. A bucket recomputes positions s..p-1 for its rows at p (waste ~ bucket size), and each forward
# costs the host ~2 ms per layer to launch. So: at least 9 buckets, and up to 24 where the sweep's arithmetic is
# large enough to keep the GPU busy meanwhile (~20 TFLOP a forward, ~35 ms of an H100 in bf16).
# Measured on an H100, bf16, 60 tokens (scripts/bench.py, before the Triton MLP and own-token kernels): Qwen2.5-0.5B
# 0.53 s at 9 forwards, 0.57 at 13, 0.60 at 8; Llama-3.2-1B 1.30-1.34 s at 13-25 forwards, 1.36 at 9.
_MIN_BUCKETS, _MAX_BUCKETS, _FLOP_PER_FORWARD = 9, 24, 20e12


def _sweep_flop(model, site: _Site, spans: Sequence[int]) -> float:
    """A sweep's arithmetic over examples with these spans: 2 x block params x row-token-layers."""
    L = len(site.modules)
    per_layer = sum(p.numel() for p in blocks(model)[0].parameters())
    row_token_layers = site.n_units * (L * (L - 1) / 2) * sum(n * (n + 1) / 2 for n in spans)
    return 2 * per_layer * row_token_layers


def _bucket_count(model, site: _Site, spans: Sequence[int]) -> int:
    """Buckets (forwards) for one group of examples: its sweep's arithmetic / _FLOP_PER_FORWARD, within bounds."""
    return int(min(_MAX_BUCKETS, max(_MIN_BUCKETS, math.ceil(_sweep_flop(model, site, spans) / _FLOP_PER_FORWARD))))


def _bucket_sizes(span: int, bucket_size: int | None, n_buckets: int) -> tuple[int, list[int]]:
    """(bucket size, fed tokens q of each bucket): bucket k patches positions r in (q_k - size, q_k] from the end."""
    if span <= 0:
        return 1, []
    size = bucket_size if bucket_size is not None else max(1, math.ceil(span / n_buckets))
    return size, list(range(span, 0, -size))


@dataclass
class _Example:
    """One included example of a sweep: its index among the pairs, the pair, its first difference and its corrupt
    logit difference."""

    index: int
    pair: object
    first: int
    corrupt_diff: float

    @property
    def length(self) -> int:
        return len(self.pair.clean_ids)

    @property
    def span(self) -> int:
        """Positions from the first difference to the end: the ones a sweep computes."""
        return self.length - self.first


# examples merged into one group at most (its forwards' base rows, masks and clean activations grow with it), and
# the largest sweep arithmetic of an example that is merged at all: a 60-token example is ~0.5 TFLOP for
# TinyStories-2L, ~150 for Qwen2.5-0.5B (merging paid on an H100) and ~600 for Llama-3.2-1B (merging lost)
_MAX_EXAMPLES_PER_FORWARD, _MERGE_MAX_FLOP = 32, 250e12


def _example_groups(model, site: _Site, examples: list[_Example], per_forward: int | None) -> list[list[_Example]]:
    """Consecutive examples merged into one sweep's forwards. A group's forwards feed every example's last q tokens,
    so its longest span must fit in its shortest example. ``per_forward``: at most that many examples a group.

    None: on a GPU up to ``_MAX_EXAMPLES_PER_FORWARD``, but only examples whose own sweep leaves the GPU waiting
    for the host (arithmetic below ``_MERGE_MAX_FLOP``). Measured on an H100 in bf16, 10 examples of ~60 tokens:
    TinyStories-2L merged 0.08-0.13 s against 0.46-0.62 s one at a time; Qwen2.5-0.5B 4.85-5.04 s against
    5.14-5.68 s; Llama-3.2-1B, which one example keeps busy, 19.6 s merged against 13.8 s. On a CPU one at a time:
    there the arithmetic is the cost, and merged batches outgrow the caches (the embedded gpt_neo model, 16
    examples, 2 cores: 10.0 s merged against 5.7 s).
    Models whose layers need masks other than causal ones (sliding windows) run one example at a time."""
    groups: list[list[_Example]] = []
    limit = per_forward or _MAX_EXAMPLES_PER_FORWARD
    if not _pads_examples(model) or (per_forward is None and _device(model).type != "cuda"):
        limit = 1
    # (by default an example whose own sweep keeps the GPU busy runs alone)
    alone = {ex.index for ex in examples if per_forward is None and limit > 1
             and _sweep_flop(model, site, [ex.span]) > _MERGE_MAX_FLOP}
    for ex in examples:
        group = groups[-1] + [ex] if groups else None
        if group is not None and any(e.index in alone for e in group):
            group = None
        if group is not None and len(group) <= limit and max(e.span for e in group) <= min(e.length for e in group):
            groups[-1] = group
        else:
            groups.append([ex])
    return groups


def _sweep_group(model, calls: _Calls, site: _Site, group: list[_Example], *, chunk_size, bucket_size, stats,
                 bar=None, swap=None) -> list[torch.Tensor]:
    """patched_logit_diff [L, U, T] of each example of ``group`` (prefix positions = corrupt, the rest computed).

    The examples run end-aligned in the same forwards (helpers.aligned_batch): rows 0 .. E-1 are their unpatched
    corrupt runs, every patch row a copy of its example's. Fused attention reads the corrupt prefix itself where it
    can (helpers.triton_kernels' ``row_attention``; one example's rows over 128 tokens: flash); elsewhere every
    row gets its example's prefix as a cache, and several examples a padding mask. Raises _NotMergeable (before any
    result) where several examples cannot share forwards.
    """
    device = _device(model)
    L, U, E = len(site.modules), site.n_units, len(group)
    outs = [torch.full((L, U, ex.length), float(ex.corrupt_diff)) for ex in group]
    spans = [ex.span for ex in group]
    size, qs = _bucket_sizes(max(spans), bucket_size, _bucket_count(model, site, spans))
    if not qs:
        return outs
    corrupt = AlignedBatch([ex.pair.corrupt_ids for ex in group], device)
    T = corrupt.length
    clean_toks = torch.tensor([ex.pair.clean_token_id for ex in group], device=device)
    corrupt_toks = torch.tensor([ex.pair.corrupt_token_id for ex in group], device=device)
    tokens = [t for ex in group for t in (ex.pair.clean_token_id, ex.pair.corrupt_token_id)]
    state: dict = {"plan": None}
    results: list = []
    with torch.inference_mode(), two_row_output_layer(model, tokens) as two_rows, _sweep_hooks(model, site, state):
        acts = _clean_activations(model, calls, site, [ex.pair for ex in group], swap)  # [E, L, T, U, w]
        snaps = _prefix_caches(model, calls, corrupt, [T - q for q in qs], stats, swap)
        # fused attention reads the corrupt prefix itself (no per-row cache copies; several examples: each row its
        # own example's, through Triton's row_attention)
        shares_prefix = (swap is not None and swap.shares_prefix and all(_is_plain(c) for c in snaps if c is not None)
                         and (E == 1 or per_example_prefix_applies(next(model.parameters()), max(spans),
                                                               head_geometry(model.config).d_head)))
        starts = torch.tensor(corrupt.pads, device=device) if shares_prefix and E > 1 else None
        stats["shared_prefix"] = shares_prefix
        stats["max_examples_per_forward"] = max(stats.get("max_examples_per_forward", 0), E)
        for q, snap in zip(qs, snaps):
            s = T - q
            grid = _group_rows(L, U, spans, q, size)  # (layer, example, unit, r)
            n_rows = grid.shape[0]
            # (every forward also carries the E base rows)
            rows_size = chunk_size or min(n_rows, max(1, _auto_chunk_rows(model, q, T, device) - E))
            ids, positions = corrupt.ids[:, s:], corrupt.positions[:, s:]
            mask = corrupt.additive_mask(q, T, _dtype(model)) if E > 1 and not shares_prefix else None

            def run(a: int, b: int):
                rows = grid[a:b]
                rows_dev = _to_device(rows, device)
                by_layer = torch.bincount(rows[:, 0], minlength=L).tolist()
                # A head patch of layer l < L-1 changes block l's output at its position only: that one vector is
                # computed aside (_block_tail) and the row joins at block l + 1, skipping layer l's full width.
                joins_late = site.kind == "heads"
                n_new = [0] * L
                patches, computed, start = {}, {}, 0
                for layer in range(L):
                    n = by_layer[layer]
                    if not n:
                        continue
                    join = layer + 1 if joins_late and layer < L - 1 else layer
                    seg = rows_dev[start:start + n]
                    example, unit, r = seg[:, 1], seg[:, 2], seg[:, 3]
                    first_row = E + sum(n_new[:join + 1])  # after the base rows and the rows joining earlier
                    batch_idx = torch.arange(first_row, first_row + n, device=device)
                    clean = acts[example, layer, T - r, unit]
                    if join == layer:
                        patches[layer] = (batch_idx, q - r, unit, clean)
                    else:
                        computed[join] = (batch_idx, q - r, unit, clean, example)
                    n_new[join] += n
                    start += n
                # each row's example, in batch order (rows join layer-major, as the grid lists them)
                row_example = torch.cat([torch.arange(E, device=device), rows_dev[:, 1]])
                state["plan"] = plan = _Plan(n_new, patches, computed, n_base=E, row_example=row_example, mask=mask)
                per_layer_batch = plan.batch
                if swap is not None and swap.blocks:  # fused blocks make room for the next block's rows
                    swap.extra_rows = {j - 1: plan.joining(j) for j, n in enumerate(n_new)
                                       if j > 0 and n and j - 1 in swap.blocks}
                try:
                    if shares_prefix:  # every row's fed tokens are real: a causal mask, broadcast over rows
                        with swap.shared_prefix(snap, row_example if E > 1 else None, starts):
                            logits, _ = calls.forward(model, ids, positions=positions, ready_mask=True)
                    else:
                        with _padded(swap, corrupt.padded):
                            logits, _ = calls.forward(model, ids, positions=positions, mask=mask,
                                                      cache=_expanded(snap, per_layer_batch, row_example))
                finally:
                    state["plan"] = None
                    if swap is not None:
                        swap.extra_rows = None
                # stays on the device until the group is done: no host sync between forwards
                results.append((rows, _metric(logits, two_rows, clean_toks, corrupt_toks, row_example)))
                stats["forwards"] = stats.get("forwards", 0) + 1
                # token-layers through full blocks (the last layer counts one token a row: only its answer
                # position goes through the output projection and MLP)
                stats["row_token_layers"] = stats.get("row_token_layers", 0) + (
                    q * sum(per_layer_batch[:-1])
                    + per_layer_batch[-1] * (1 if site.kind in _ANSWER_ONLY_LAST_LAYER else q))
                stats["rows"] = stats.get("rows", 0) + (b - a)
                stats["max_rows_per_forward"] = max(stats.get("max_rows_per_forward", 0), b - a)
                if bar is not None:
                    bar.update(b - a)

            _, halvings = run_chunked(n_rows, rows_size, run)
            stats["oom_halvings"] = stats.get("oom_halvings", 0) + halvings
    for rows, diffs in results:
        diffs = diffs.cpu()
        for e, ex in enumerate(group):
            mine = rows[:, 1] == e
            if not mine.any():
                continue
            # the unpatched row: a self-check of the machinery
            base = abs(float(diffs[e]) - float(ex.corrupt_diff))
            stats["base_row_max_dev"] = max(stats.get("base_row_max_dev", 0.0), base)
            r = rows[mine]
            outs[e][r[:, 0], r[:, 2], ex.length - r[:, 3]] = diffs[E:][mine]
    return outs


def _clean_and_corrupt(model, calls: _Calls, site: _Site | None, pair):
    """(clean_diff, corrupt_diff, clean_correct, clean activations at site) for one example."""
    device = _device(model)
    clean = torch.as_tensor(list(pair.clean_ids), device=device).unsqueeze(0)
    corrupt = torch.as_tensor(list(pair.corrupt_ids), device=device).unsqueeze(0)
    store: dict = {}
    with torch.no_grad():
        if site is not None:
            with capture_site(site, store):
                clean_logits, _ = calls.forward(model, clean)
        else:
            clean_logits, _ = calls.forward(model, clean)
        corrupt_logits, _ = calls.forward(model, corrupt)
    return (*_logit_diffs(clean_logits[0], corrupt_logits[0], pair), {l: a[0] for l, a in store.items()})


def _logit_diffs(clean_logits: torch.Tensor, corrupt_logits: torch.Tensor, pair) -> tuple[float, float, bool]:
    """(clean_diff, corrupt_diff, clean_correct) from the answer position's logits [vocab] of both runs."""
    logits = torch.stack([clean_logits, corrupt_logits]).float()
    diffs = (logits[:, pair.clean_token_id] - logits[:, pair.corrupt_token_id]).tolist()
    return diffs[0], diffs[1], int(logits[0].argmax()) == pair.clean_token_id


def _ready_masks(swap) -> bool:
    """Hand the model ready causal masks (no host sync in transformers' mask building)? Only where the fused
    attention runs every layer under the sweep's promise (causal, no padding)."""
    return swap is not None and swap.shares_prefix


def _pads_examples(model) -> bool:
    """May examples of different lengths share a forward under one ready 4D padding mask? transformers hands such a
    mask to every layer as is, so only for eager and sdpa attention, and not where some layers need another mask:
    sliding windows (``layer_types`` other than full attention, or a model-wide ``sliding_window``). (gpt_neo's
    local layers apply their window themselves, on top of the mask.)"""
    config = model.config
    if getattr(config, "_attn_implementation", None) not in (None, "eager", "sdpa"):
        return False  # flash-attention-2 reads a mask as 2D padding, flex wants a BlockMask
    types = getattr(config, "layer_types", None)
    if types is not None:
        return all(t == "full_attention" for t in types)
    return getattr(config, "sliding_window", None) is None or getattr(config, "use_sliding_window", True) is False


def _metrics(model, calls: _Calls, pairs, swap=None) -> list[tuple[float, float, bool]]:
    """(clean_diff, corrupt_diff, clean_correct) of every pair, each from its own batch-2 forward (clean and corrupt
    have one length), so an example's metrics, and whether it is included, never depend on the other examples."""
    out = []
    with torch.inference_mode():
        for pair in pairs:
            batch = AlignedBatch([list(pair.clean_ids), list(pair.corrupt_ids)], _device(model))
            logits, _ = _aligned_forward(model, calls, batch, batch.length, swap)
            out.append(_logit_diffs(logits[0], logits[1], pair))
    return out


def _clean_activations(model, calls: _Calls, site: _Site, pairs, swap=None) -> torch.Tensor:
    """The clean runs' activations at ``site``, end-aligned: [example, layer, T, unit, width] (one forward)."""
    store: dict = {}
    batch = AlignedBatch([list(p.clean_ids) for p in pairs], _device(model))
    with torch.inference_mode(), capture_site(site, store):
        _aligned_forward(model, calls, batch, batch.length, swap)
    acts = torch.stack([store[l] for l in range(len(site.modules))], 1)  # [E, L, T, U * w]
    return acts.view(*acts.shape[:3], site.n_units, site.unit_width)


def _progress(iterable, enabled: bool, desc: str, total: int | None = None):
    """tqdm.auto over ``iterable`` (or a manual bar when it is None); ``iterable`` itself / None when disabled."""
    if not enabled:
        return iterable
    from tqdm.auto import tqdm
    return tqdm(iterable, desc=desc, total=total, unit="patch" if iterable is None else "it")


def patch_sweep(model, pairs, kind: str, *, keep_incorrect: bool = False,
                min_denominator: float = DEFAULT_MIN_DENOMINATOR, chunk_size: int | None = None,
                bucket_size: int | None = None, examples_per_forward: int | None = None, progress: bool = True,
                fused: bool = True, compile: bool | None = None) -> PatchingResult:
    """The shared driver of every kernel; ``kind`` is one of ``SITES``. See the module docstring.

    ``examples_per_forward``: examples merged into the same forwards (None: see ``_example_groups``; 1: each
    example alone). ``fused``: run llama-like models with helpers.fused_modules' same-formula swap-ins (fewer
    kernels); ``compile``: torch.compile the plain-torch formulas used where a Triton kernel is not (None: on CUDA
    without Triton only, ``fused_modules.compiles_by_default``).
    """
    if examples_per_forward is not None and examples_per_forward < 1:
        raise ValueError(f"examples_per_forward must be None or >= 1, got {examples_per_forward}")
    model = unwrap_model(model)
    calls = _Calls.of(model)
    site = _site(model, kind)
    pairs = list(pairs)
    firsts = [validate_pair(p, i) for i, p in enumerate(pairs)]
    # causal_flash: every forward of the sweep is causal, unpadded, with no mask of its own
    with _eval_mode(model), (fused_modules(model, compile=compile, causal_flash=True) if fused
                             else nullcontext()) as swap:
        result = _patch_sweep(model, calls, site, pairs, firsts, kind, keep_incorrect, min_denominator,
                              chunk_size, bucket_size, examples_per_forward, progress, swap)
    result.stats["fused"] = list(swap.swapped) if swap is not None else []
    return result


@contextmanager
def _eval_mode(model):
    """Dropout off while patching (restored afterwards): every run must be deterministic."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _patch_sweep(model, calls, site, pairs, firsts, kind, keep_incorrect, min_denominator, chunk_size,
                 bucket_size, examples_per_forward, progress, swap):
    # metrics first (no activations kept), so exclusions are reported before the long part
    pre = _metrics(model, calls, pairs, swap)
    included = report_inclusion([c for _, _, c in pre], keep_incorrect)
    stats: dict = {}
    L, U = len(site.modules), site.n_units
    lengths = [len(p.clean_ids) for p in pairs]
    patched = torch.full((len(pairs), L, U, max(lengths, default=0)), float("nan"))
    examples = [_Example(i, p, f, pre[i][1]) for i, (p, f) in enumerate(zip(pairs, firsts)) if included[i]]
    total = sum(L * U * ex.span for ex in examples)
    bar = _progress(None, progress and total > 0, f"patch {kind}", total=total)
    try:
        for group in _example_groups(model, site, examples, examples_per_forward):
            kw = dict(chunk_size=chunk_size, bucket_size=bucket_size, stats=stats, bar=bar, swap=swap)
            try:
                outs = _sweep_group(model, calls, site, group, **kw)
            except _NotMergeable as exc:
                if len(group) == 1:
                    raise
                if isinstance(exc, _MaskNotPassedOn):
                    warnings.warn(f"{exc}; running these examples one at a time", RuntimeWarning, stacklevel=3)
                    stats["max_examples_per_forward"] = 1
                outs = [out for ex in group for out in _sweep_group(model, calls, site, [ex], **kw)]
            for ex, values in zip(group, outs):
                patched[ex.index, :, :, : ex.length] = values
    finally:
        if bar is not None:
            bar.close()
    if kind == "heads":
        cls, dims = HeadPatchingResult, ("example", "layer", "head", "pos")
    else:
        cls, dims, patched = LayerPatchingResult, ("example", "layer", "pos"), patched[:, :, 0]
    return build_result(cls, kind, dims, patched, [p[0] for p in pre], [p[1] for p in pre],
                        [p[2] for p in pre], included, lengths, firsts, min_denominator, stats)


def patch_heads(model, pairs, *, keep_incorrect: bool = False, min_denominator: float = DEFAULT_MIN_DENOMINATOR,
                chunk_size: int | None = None, bucket_size: int | None = None,
                examples_per_forward: int | None = None, progress: bool = True, fused: bool = True,
                compile: bool | None = None) -> HeadPatchingResult:
    """Patch each head's z (out_proj input slice) at each position, clean into corrupt.

    Returns a HeadPatchingResult with ``normalised`` / ``patched_logit_diff`` of shape [example, layer, head, pos]
    (pos padded with NaN to the longest example). ``chunk_size``: patch rows per forward (None = from free
    memory; halves on OOM). ``bucket_size``: patch positions per cached forward (None: 9 to 24 buckets per example,
    more for larger models). ``examples_per_forward``: examples run end-aligned in the same forwards (None: on a GPU
    up to 32 where one example's sweep does not keep it busy, else and on a CPU one at a time; 1: one at a time).
    ``fused`` / ``compile``: helpers.fused_modules' swap-ins for llama-like models (see ``patch_sweep``).
    """
    return patch_sweep(model, pairs, "heads", keep_incorrect=keep_incorrect, min_denominator=min_denominator,
                       chunk_size=chunk_size, bucket_size=bucket_size, examples_per_forward=examples_per_forward,
                       progress=progress, fused=fused, compile=compile)


def patch_residual(model, pairs, **kwargs) -> LayerPatchingResult:
    """Patch the residual stream at the *input* of block l (resid_pre; l = 0 patches the embeddings).

    [example, layer, pos]. Same keyword arguments as ``patch_heads``.
    """
    return patch_sweep(model, pairs, "residual", **kwargs)


def patch_attention_output(model, pairs, **kwargs) -> LayerPatchingResult:
    """Patch the attention module's output of layer l (all heads, after out_proj). [example, layer, pos]."""
    return patch_sweep(model, pairs, "attention_output", **kwargs)


def patch_mlp_output(model, pairs, **kwargs) -> LayerPatchingResult:
    """Patch the MLP (mixture-of-experts for granitemoe) output of layer l. [example, layer, pos]."""
    return patch_sweep(model, pairs, "mlp_output", **kwargs)
