"""The patching kernels: exact activation patching, batched (``patch_heads`` and the per-site sweeps), its plain
one-trace-per-patch reference, gradient attribution, and the result types.

    from helpers.patching import patch_heads
    result = patch_heads(hf_model, pairs)        # result.mean(): [layer, head, pos]

Modules: ``sweep`` (the driver and the public functions), ``example_runs`` (clean/corrupt runs), ``grouping``
(examples sharing forwards, buckets), ``bucket_forwards`` (one group's forwards), ``plan`` / ``hooks`` (rows joining
at their layer, the patches), ``block_tails`` (head patches' one changed vector, once a group), ``caches`` (corrupt
prefix caches), ``chunking`` (rows per forward, OOM back-off), ``sites``, ``model_calls``, ``aligned_batch``,
``fused_modules`` / ``fused_gpt_neo`` / ``triton_kernels`` / ``matmul_epilogues`` / ``stacked_weights``
(same-formula swap-ins for llama-like models and GPT-Neo's attention), ``reference``, ``attribution``, ``result_types``.
"""
from helpers.patching.attribution import attribution_error, attribution_patching_heads
from helpers.patching.reference import patch_heads_reference, patch_sites_reference
from helpers.patching.result_types import HeadPatchingResult, LayerPatchingResult, PatchingResult, TokenPair
from helpers.patching.sweep import (
    SITES,
    patch_attention_output,
    patch_heads,
    patch_mlp_output,
    patch_residual,
    patch_sweep,
)

__all__ = [
    "patch_heads", "patch_residual", "patch_attention_output", "patch_mlp_output", "patch_sweep", "SITES",
    "patch_heads_reference", "patch_sites_reference", "attribution_patching_heads", "attribution_error",
    "HeadPatchingResult", "LayerPatchingResult", "PatchingResult", "TokenPair",
]
