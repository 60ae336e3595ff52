"""Fast exact activation patching: heads (out_proj input), residual stream, attention output, MLP output.

Every kernel answers, for each (layer, [head,] position) of each example: run the *corrupt* prompt, overwrite
one activation slice with its value from the *clean* run, and read the metric
``logits[answer_position, clean_token_id] - logits[answer_position, corrupt_token_id]``.
``patch_heads_reference`` (helpers.patching.reference) does exactly that with one nnsight trace per patch; the
kernels here give the same numbers (to float rounding) with far less work, by five exact savings:

1. **Prefix skip.** Before the first position where clean and corrupt ids differ, clean and corrupt activations
   are identical, so a patch there changes nothing: ``patched_logit_diff = corrupt_logit_diff``, not computed.
2. **Corrupt KV cache.** A patch at position ``p`` cannot change keys/values at positions ``< p`` in any layer.
   Patch positions are grouped in buckets ``[s, e)``; one forward feeds only tokens ``s..end`` with the corrupt
   run's cache of positions ``< s`` (computed once per bucket start, batch 1), with explicit ``position_ids``. Each
   batch row is one patch, applied by a hook at its own relative position in its own layer. Fused llama-like models
   share that batch-1 cache with every row inside their attention (``FusedSwap.shared_prefix``: one flash call over
   all rows' queries, merged exactly with the causal part), and so does GPT-Neo's swapped attention
   (helpers.patching.fused_gpt_neo); other families get it as an expanded view per layer.
3. **Rows join at their layer.** Layers before a patch's layer compute exactly the corrupt activations. The
   forward starts with *one* row (the unpatched corrupt run, which is also a self-check of the machinery); a
   forward pre-hook on block ``l`` appends copies of that row for the patches joining there (rows are sorted by
   layer). Masks and rotary tables are computed for batch 1 by the model and broadcast; each layer's cache is
   expanded to that layer's batch.
4. **A head patch skips its own layer.** Patching one head at position ``p`` of layer ``l`` changes block ``l``'s
   output at ``p`` only, so that one vector is computed aside from the unpatched row's block input and z
   (``block_tail``: out_proj, residual, post-attention norm, MLP) and the row joins at block ``l + 1`` with it
   written in. A group's first forward (its widest bucket) computes every row's that way, one ``block_tail`` a
   layer for the whole group (helpers.patching.block_tails), and the later forwards look theirs up. Last-layer
   head patches are applied at the out_proj input as usual.
5. **The last layer serves the answer only.** There the out_proj and the MLP see the last position alone (heads
   and residual sites); its keys and values still come from every position.

**Several examples share forwards** (``examples_per_forward``; by default, on a GPU, up to 32 of those whose own
sweep leaves it waiting for the host). They run end-aligned (helpers.patching.aligned_batch): a bucket feeds every example's
last q tokens, so the answer is the last position for all; rows 0 .. E-1 are the examples' unpatched corrupt runs
and each patch row copies its own example's; each block gets the padding mask, rotary tables and cache gathered to
its rows. Fused llama-like models and GPT-Neo on a GPU (fp16/bf16) share the examples' prefixes inside attention
(helpers.patching.triton_kernels' ``row_attention``: each row reads its own example's), with no padding mask at all
(GPT-Neo where its local layers' window covers the prompts). A group's longest span must
fit in its shortest example; models whose caches have sliding-window layers run one example at a time.

**The unpatched runs' forward serves the sweep too.** The clean and corrupt metrics come first (from forwards of
each length's clean rows, then corrupt rows); the sweep keeps those forwards, as far as they fit in
``KEEP_UNPATCHED_MAX_BYTES`` (helpers.patching.example_runs' ``unpatched_runs``), each until its last group, and a
group of examples that all sit in one of them takes its clean activations and corrupt prefix caches from it instead
of running the same rows again (where the group is the whole forward, the very batch its own forward would run: the
same numbers, bit for bit).

Only the answer position's logits are needed: the model runs with ``logits_to_keep=1`` and, when the output layer
is an ``nn.Linear``, its matmul is restricted to the two vocabulary rows of the metric (the model's own final norm
and logit scaling, e.g. granite's ``logits_scaling``, still apply). Rows are chunked to fit memory; a CUDA
out-of-memory error halves the chunk and retries instead of failing. Llama-family models run with
helpers.patching.fused_modules' same-formula swap-ins (``fused=True``; on CUDA with flash attention and Triton kernels),
GPT-Neo with its attention swapped (helpers.patching.fused_gpt_neo).

Measured (scripts/bench.py, H100 80GB HBM3, torch 2.11, transformers 5.17, random-init real shapes, one 60-token
example, first difference at 10, full layer x head x position sweep, default settings; BENCHMARKS.md): bf16 on
2026-11-28, TinyStories-2L 0.060-0.065 s, Qwen2.5-0.5B 0.414-0.451 s, Llama-3.2-1B 1.083-1.115 s (the nnsight
loop, extrapolated, in BENCHMARKS.md's table: 9.6, 791, 593 s; its own time varies 3x or more between runs); fp32
in that run 0.078, 3.48, 12.2 s. Llama's matrix products take ~73 % of its GPU time at ~720 TFLOP/s; Qwen's ~55 %,
then ``silu(gate) * up`` 15 % and attention 12 %, and its GPU waits for the host ~16 % of the wall time. 10 examples
(T 55-65, bf16): TinyStories 2.2x one example (merged), Qwen 9.5-9.6x (merged), Llama 9.8-9.9x (one at a time):
patches of different examples share no arithmetic, so where one example keeps the GPU busy the cost is linear in
examples. fp32 agrees with the loop to ~1e-4 logits on these shapes (the unpatched row deviates from the full
corrupt run by as much: rounding); bf16 by up to ~0.6 logits, about one bf16 ulp at those logit sizes (the
unpatched row, likewise).

Module paths come only from helpers.models.architectures, so one code path serves gpt_neo, gpt2, llama, qwen2, granite,
granitemoe. ``model`` is a HF ``*ForCausalLM`` or an nnsight wrapper of one (unwrapped via ``._module``).

Sites (what "layer l" means):
- heads: the input of the attention output projection of layer l (z, head-major), one head slice.
- residual: the residual stream at the *input* of block l (``resid_pre``; layer 0 = embeddings).
- attention_output: the attention module's output of layer l (what is added to the residual).
- mlp_output: the MLP (or mixture-of-experts) output of layer l.
"""
from __future__ import annotations

import numbers
import warnings
from contextlib import nullcontext

import torch

from helpers.patching.bucket_forwards import sweep_group
from helpers.patching.example_runs import unpatched_runs
from helpers.patching.fused_modules import fused_modules
from helpers.patching.grouping import MaskNotPassedOn, NotMergeable, SweepExample, example_groups
from helpers.patching.model_calls import ModelCalls, eval_mode, progress_bar, unwrap_model
from helpers.patching.result_types import (
    DEFAULT_MIN_DENOMINATOR,
    HeadPatchingResult,
    LayerPatchingResult,
    PatchingResult,
    build_result,
    report_inclusion,
    validate_pair,
)
from helpers.patching.sites import SITES, site_of

__all__ = ["patch_sweep", "patch_heads", "patch_residual", "patch_attention_output", "patch_mlp_output", "SITES"]


def patch_sweep(model, pairs, kind: str, *, keep_incorrect: bool = False,
                min_denominator: float = DEFAULT_MIN_DENOMINATOR, chunk_size: int | None = None,
                bucket_size: int | None = None, examples_per_forward: int | None = None, progress: bool = True,
                fused: bool = True, compile: bool | None = None) -> PatchingResult:
    """The shared driver of every kernel; ``kind`` is one of ``SITES``. See the module docstring.

    ``examples_per_forward``: examples merged into the same forwards (None: see ``example_groups``; 1: each
    example alone, its unpatched metrics too, so nothing of an example depends on the others). ``fused``: run llama-like models with helpers.patching.fused_modules' same-formula swap-ins (fewer
    kernels) and GPT-Neo with its attention reading the shared prefix in place; ``compile``: torch.compile the plain-torch formulas used where a Triton kernel is not (None: on CUDA
    without Triton only, ``fused_modules.compiles_by_default``).
    """
    for name, value in (("chunk_size", chunk_size), ("bucket_size", bucket_size),
                        ("examples_per_forward", examples_per_forward)):
        # (a bucket size below 1 ran no forward and returned the corrupt metric everywhere, without a word)
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1):
            raise ValueError(f"{name} must be None or an integer >= 1, got {value!r}")
    model = unwrap_model(model)
    calls = ModelCalls.of(model)
    site = site_of(model, kind)
    pairs = list(pairs)
    firsts = [validate_pair(p, i) for i, p in enumerate(pairs)]
    # causal_flash: every forward of the sweep is causal, unpadded, with no mask of its own
    with eval_mode(model), (fused_modules(model, compile=compile, causal_flash=True) if fused
                             else nullcontext()) as swap:
        result = _patch_sweep(model, calls, site, pairs, firsts, kind, keep_incorrect, min_denominator,
                              chunk_size, bucket_size, examples_per_forward, progress, swap)
    result.stats["fused"] = list(swap.swapped) if swap is not None else []
    return result


def _patch_sweep(model, calls, site, pairs, firsts, kind, keep_incorrect, min_denominator, chunk_size,
                 bucket_size, examples_per_forward, progress, swap):
    # metrics first, so exclusions are reported before the long part; their forwards are kept (within a memory
    # budget) and the groups they hold take their clean activations and corrupt caches from them
    pre, kept = unpatched_runs(model, calls, pairs, keep_site=site, swap=swap,
                               pairs_per_forward=1 if examples_per_forward == 1 else None)
    included = report_inclusion([c for _, _, c in pre], keep_incorrect)
    stats: dict = {}
    L, U = len(site.modules), site.n_units
    lengths = [len(p.clean_ids) for p in pairs]
    patched = torch.full((len(pairs), L, U, max(lengths, default=0)), float("nan"))
    examples = [SweepExample(i, p, f, pre[i][1]) for i, (p, f) in enumerate(zip(pairs, firsts)) if included[i]]
    groups = example_groups(model, site, examples, examples_per_forward)
    # each kept forward lives until the last group it serves (one that serves none goes now)
    last_use = {id(f): g for g, group in enumerate(groups) for f in kept if f.holds([ex.index for ex in group])}
    kept = [f for f in kept if id(f) in last_use]
    total = sum(L * U * ex.span for ex in examples)
    bar = progress_bar(None, progress and total > 0, f"patch {kind}", total=total)
    try:
        for g, group in enumerate(groups):
            kw = dict(chunk_size=chunk_size, bucket_size=bucket_size, stats=stats, bar=bar, swap=swap, kept=kept)
            try:
                outs = sweep_group(model, calls, site, group, **kw)
            except NotMergeable as exc:
                if len(group) == 1:
                    raise
                if isinstance(exc, MaskNotPassedOn):
                    warnings.warn(f"{exc}; running these examples one at a time", RuntimeWarning, stacklevel=3)
                    stats["max_examples_per_forward"] = 1
                outs = [out for ex in group for out in sweep_group(model, calls, site, [ex], **kw)]
            for ex, values in zip(group, outs):
                patched[ex.index, :, :, : ex.length] = values
            kept = [f for f in kept if last_use[id(f)] > g]
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
    up to 32 where one example's sweep does not keep it busy, else and on a CPU one at a time; 1: one at a time,
    the unpatched metrics too).
    ``fused`` / ``compile``: helpers.patching.fused_modules' swap-ins for llama-like models and GPT-Neo's attention
    (see ``patch_sweep``).
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
