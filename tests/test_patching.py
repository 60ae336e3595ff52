"""Patching kernels against their oracles on tiny random models of every family (CPU, float32)."""
from __future__ import annotations

import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers.models.architectures import family_spec, get_submodule, out_proj_modules
from helpers.patching.attribution import attribution_error, attribution_patching_heads
from helpers.patching.fused_modules import SHARED_PREFIX_FAMILIES
from helpers.patching import patch_attention_output, patch_heads, patch_mlp_output, patch_residual
from helpers.patching.chunking import OutOfMemoryError, run_chunked
from helpers.patching.model_calls import unwrap_model
from helpers.patching.reference import patch_heads_reference, patch_sites_reference
from helpers.patching.result_types import TokenPair
from helpers.models.tiny_models import TINY_FAMILIES, build_random_model, tiny_config, tiny_model

torch.set_num_threads(1)  # tiny ops: thread wake-ups cost more than the arithmetic (and CI shares cores)

ATOL = 1e-5
KERNELS = {"residual": patch_residual, "attention_output": patch_attention_output, "mlp_output": patch_mlp_output}


Pair = TokenPair


def make_pair(gen: torch.Generator, length: int, corrupted: int, vocab: int = 256, clean_tok=None, corrupt_tok=None):
    clean = torch.randint(0, vocab, (length,), generator=gen).tolist()
    corrupt = list(clean)
    corrupt[corrupted] = (clean[corrupted] + 1 + int(torch.randint(0, vocab - 1, (1,), generator=gen))) % vocab
    if clean_tok is None:
        clean_tok, corrupt_tok = torch.randperm(vocab, generator=gen)[:2].tolist()
    return Pair(clean, corrupt, corrupted, length - 1, clean_tok, corrupt_tok)


def decisive(model, pair):
    """Answer tokens that the corruption moves most apart, so |clean - corrupt| is a decent denominator."""
    with torch.no_grad():
        clean = model(torch.tensor([pair.clean_ids])).logits[0, -1]
        corrupt = model(torch.tensor([pair.corrupt_ids])).logits[0, -1]
    delta = clean - corrupt
    pair.clean_token_id, pair.corrupt_token_id = int(delta.argmax()), int(delta.argmin())
    return pair


def make_pairs(seed: int = 0, model=None):
    gen = torch.Generator().manual_seed(seed)
    # different lengths; the corruption never at 0, so the prefix skip is exercised
    pairs = [make_pair(gen, 12, 4), make_pair(gen, 10, 2), make_pair(gen, 13, 7)]
    return pairs if model is None else [decisive(model, p) for p in pairs]


_MODELS: dict = {}


def model_of(family: str):
    if family not in _MODELS:
        _MODELS[family] = tiny_model(family)
    return _MODELS[family]


def assert_raw_close(fast, ref, atol=ATOL):
    a, b = fast.patched_logit_diff, ref.patched_logit_diff
    assert a.shape == b.shape
    assert torch.equal(torch.isnan(a), torch.isnan(b))
    diff = (a - b).nan_to_num(0).abs().max().item()
    assert diff <= atol, diff
    assert torch.allclose(fast.clean_logit_diff, ref.clean_logit_diff, atol=atol)
    assert torch.allclose(fast.corrupt_logit_diff, ref.corrupt_logit_diff, atol=atol)


def assert_normalised_close(fast, ref, atol=ATOL):
    denom = (ref.clean_logit_diff - ref.corrupt_logit_diff).abs()
    ok = ~ref.guarded  # random tiny models move logits little; the normalised error is the raw one / denom
    assert ok.sum() >= 2, denom
    a, b = fast.normalised[ok], ref.normalised[ok]
    assert torch.equal(torch.isnan(a), torch.isnan(b))
    assert (a - b).nan_to_num(0).abs().max().item() <= 2 * atol / denom[ok].min().item()


_REFERENCES: dict = {}


def _heads_and_reference(family: str, per_forward: int | None):
    """patch_heads on the three test pairs of ``family``'s tiny model, and the nnsight reference (computed once)."""
    model = model_of(family)
    pairs = make_pairs(0, model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if family not in _REFERENCES:
            _REFERENCES[family] = patch_heads_reference(model, pairs, keep_incorrect=True, progress=False,
                                                        min_denominator=0.02)
        fast = patch_heads(model, pairs, keep_incorrect=True, progress=False, min_denominator=0.02,
                           examples_per_forward=per_forward)
    return fast, _REFERENCES[family]


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("per_forward", [3, None])
def test_heads_fast_equals_nnsight_reference(family, per_forward):
    """Both layouts: the three examples (lengths 12, 10, 13) end-aligned in the same forwards, and one example at a
    time (the default on a CPU; llama-like families then share the corrupt prefix inside fused attention)."""
    fast, ref = _heads_and_reference(family, per_forward)
    pairs = make_pairs(0, model_of(family))
    assert fast.patched_logit_diff.shape == (3, 2, 4, 13)
    assert_raw_close(fast, ref)
    assert_normalised_close(fast, ref)
    # the skipped prefix is exactly the corrupt run, and the reference agrees it has no effect
    for i, pair in enumerate(pairs):
        d = pair.corrupted_position
        assert torch.all(fast.patched_logit_diff[i, ..., :d] == fast.corrupt_logit_diff[i])
        assert torch.all(fast.normalised[i, ..., :d].nan_to_num(0) == 0)
        assert torch.isnan(fast.patched_logit_diff[i, ..., len(pair.clean_ids):]).all()
    assert fast.stats["base_row_max_dev"] < ATOL  # the unpatched row of every forward reproduces the corrupt run
    assert fast.stats["max_examples_per_forward"] == (3 if per_forward == 3 else 1)
    # one at a time, llama-like families and gpt_neo read the shared corrupt prefix inside their swapped attention in
    # place of per-row caches
    assert fast.stats["shared_prefix"] == (family in SHARED_PREFIX_FAMILIES and per_forward is None)
    # the sweep must see some effect, or the comparison above proves nothing
    assert fast.normalised.nan_to_num(0).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["llama", "gpt_neo"])
@pytest.mark.parametrize("bucket_size,chunk_size", [(1, None), (100, None), (3, 5), (2, 1)])
@pytest.mark.parametrize("per_forward", [None, 3])
def test_heads_bucketing_and_chunking_do_not_change_results(family, bucket_size, chunk_size, per_forward):
    model, pairs = model_of(family), make_pairs(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = patch_sites_reference(model, pairs, "heads", keep_incorrect=True)
        fast = patch_heads(model, pairs, keep_incorrect=True, progress=False, bucket_size=bucket_size,
                           chunk_size=chunk_size, examples_per_forward=per_forward)
    assert_raw_close(fast, ref)
    assert fast.stats["max_examples_per_forward"] == (per_forward or 1)


def test_bucket_rows_equal_the_full_grid_filtered_by_span():
    """The sweep's rows of a bucket, built from the examples' r ranges, are the full (layer, example, unit, r) grid
    filtered by each example's span: same rows, same (layer-major) order, over random shapes including empty
    buckets and examples of span 0 or beyond the bucket."""
    import random

    from helpers.patching.grouping import bucket_rows, bucket_rows_reference

    rnd = random.Random(0)
    seen_empty = False
    for _ in range(400):
        L, U, E = rnd.randint(1, 4), rnd.randint(1, 4), rnd.randint(1, 5)
        spans = [rnd.randint(0, 20) for _ in range(E)]
        q, size = rnd.randint(1, 22), rnd.randint(1, 8)
        fast, ref = bucket_rows(L, U, spans, q, size), bucket_rows_reference(L, U, spans, q, size)
        assert fast.dtype == ref.dtype and torch.equal(fast, ref), (L, U, spans, q, size)
        seen_empty |= ref.shape[0] == 0
    assert seen_empty


def test_bucket_count_trades_buckets_for_forwards_where_the_host_is_the_cost(monkeypatch):
    """A small sweep takes fewer buckets than the 9-bucket minimum where its forwards' host time is the cost (a
    GPU: the SmolLM2-135M shape's short sweeps; a CPU: the embedded models' shortest), a large one as many as
    before; a device without a measured rate keeps the bounds."""
    import helpers.patching.grouping as grouping
    from transformers import LlamaConfig

    from helpers.patching.sites import site_of

    config = LlamaConfig(vocab_size=64, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, head_dim=64)  # the SmolLM2-135M shape
    with torch.device("meta"):
        model = build_random_model(config)
    site = site_of(model, "heads")
    small, one, large = [9, 10, 11, 8, 9, 10, 11, 12, 9, 10], [61], [61] * 10
    assert [grouping.bucket_count(model, site, s) for s in (small, one, large)] == [9, 9, 24]  # meta: the bounds
    monkeypatch.setattr(grouping, "model_device", lambda m: torch.device("cuda"))
    assert [grouping.bucket_count(model, site, s) for s in (small, one, large)] == [9, 9, 24]  # float32: the bounds
    model.to(torch.bfloat16)
    counts = [grouping.bucket_count(model, site, s) for s in (small, one, large)]
    assert counts[0] < counts[1] < 9 and counts[2] == 24, counts
    assert counts[0] >= grouping._MIN_HOST_BOUND_BUCKETS
    # the embedded llama's shape on a CPU: a DEFFIELDNAME span (8) takes 2 buckets, an ENGTABLENAME one (58) 9
    with torch.device("meta"):
        embedded = build_random_model(LlamaConfig(vocab_size=64, hidden_size=256, intermediate_size=768,
                                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                  head_dim=64))
    monkeypatch.setattr(grouping, "model_device", lambda m: torch.device("cpu"))
    tiny_site = site_of(embedded, "heads")
    assert [grouping.bucket_count(embedded, tiny_site, [s]) for s in (8, 58)] == [2, 9]


@pytest.mark.parametrize("family", ["llama", "gpt_neo"])
def test_clean_activations_and_prefix_caches_share_one_forward(family):
    """The clean activations and the corrupt prefix caches of a group, from one forward of clean and corrupt rows,
    equal those of their own two forwards (float32, 1e-5), for examples of different lengths (padded)."""
    from helpers.patching.aligned_batch import AlignedBatch
    from helpers.patching.caches import clean_activations_and_prefix_caches, prefix_caches
    from helpers.patching.example_runs import clean_activations
    from helpers.patching.model_calls import ModelCalls
    from helpers.patching.sites import site_of

    model = model_of(family)
    calls, site, pairs = ModelCalls.of(model), site_of(model, "heads"), make_pairs(3, model)
    corrupt = AlignedBatch([p.corrupt_ids for p in pairs], "cpu")
    starts = [0, 3, 8, corrupt.length - 1]
    stats: dict = {}
    with torch.inference_mode():
        acts, snaps = clean_activations_and_prefix_caches(model, calls, site, pairs, corrupt, starts, stats, None)
        ref_acts = clean_activations(model, calls, site, pairs)
        ref_snaps = prefix_caches(model, calls, corrupt, starts, {}, None)
    assert stats["prefix_forwards"] == 1
    assert acts.shape == ref_acts.shape and (acts - ref_acts).abs().max() <= ATOL
    for s, snap, ref in zip(starts, snaps, ref_snaps):
        assert (snap is None) == (ref is None) == (s == 0)
        if snap is None:
            continue
        for a, b in zip(snap.layers, ref.layers):
            assert a.keys.shape == b.keys.shape == (len(pairs), *b.keys.shape[1:2], s, b.keys.shape[-1])
            assert (a.keys - b.keys).abs().max() <= ATOL and (a.values - b.values).abs().max() <= ATOL


@pytest.mark.parametrize("family", ["llama", "gpt_neo"])
def test_groups_take_clean_activations_and_prefix_caches_from_the_kept_metrics_forward(family):
    """A group whose pairs all sit in one kept forward of the unpatched runs takes its clean activations and prefix
    caches from it: equal to the group's own clean-and-prefix forward (float32, 1e-5; the whole forward's group:
    the same batch, so exactly), whether its rows are consecutive (views) or not (gathered); a group spread over
    two forwards, or with no prefix to cache, runs its own forward; forwards beyond the byte budget are not kept,
    and keeping changes no metric."""
    from helpers.patching.aligned_batch import AlignedBatch
    from helpers.patching.caches import clean_activations_and_prefix_caches, group_activations_and_prefix_caches
    from helpers.patching.example_runs import example_metrics, unpatched_runs
    from helpers.patching.model_calls import ModelCalls
    from helpers.patching.sites import site_of

    model = model_of(family)
    calls, site = ModelCalls.of(model), site_of(model, "heads")
    gen = torch.Generator().manual_seed(11)
    pairs = [make_pair(gen, 11, c) for c in (3, 5, 2, 6)] + [make_pair(gen, 9, 4)]
    with torch.inference_mode():
        metrics, kept = unpatched_runs(model, calls, pairs, keep_site=site, pairs_per_forward=4)
        assert [f.indices for f in kept] == [[0, 1, 2, 3], [4]]
        assert metrics == example_metrics(model, calls, pairs, pairs_per_forward=4)
        for indices, exact in (([0, 1, 2, 3], True), ([1, 2], False), ([3, 0], False), ([4], True)):
            group = [pairs[i] for i in indices]
            corrupt = AlignedBatch([p.corrupt_ids for p in group], "cpu")
            starts = [0, 2, corrupt.length - 1]
            stats: dict = {}
            acts, snaps = group_activations_and_prefix_caches(model, calls, site, group, indices, corrupt, starts,
                                                              stats, None, kept)
            assert stats == {"groups_from_kept_forwards": 1}  # (no forward of its own)
            ref_acts, ref_snaps = clean_activations_and_prefix_caches(model, calls, site, group, corrupt, starts,
                                                                      {}, None)
            close = (lambda a, b: torch.equal(a, b)) if exact else (lambda a, b: (a - b).abs().max() <= ATOL)
            assert acts.shape == ref_acts.shape and close(acts, ref_acts)
            for s, snap, ref in zip(starts, snaps, ref_snaps):
                assert (snap is None) == (ref is None) == (s == 0)
                for a, b in zip(snap.layers if snap else (), ref.layers if ref else ()):
                    assert a.keys.shape == b.keys.shape and close(a.keys, b.keys) and close(a.values, b.values)
        for indices, starts in (([3, 4], [0, 2]), ([0], [0])):  # (spread over two forwards; no prefix)
            group = [pairs[i] for i in indices]
            stats = {}
            corrupt = AlignedBatch([p.corrupt_ids for p in group], "cpu")
            group_activations_and_prefix_caches(model, calls, site, group, indices, corrupt, starts, stats, None, kept)
            assert "groups_from_kept_forwards" not in stats
        one = kept[1].acts.nbytes + sum(t.nbytes for layer in kept[1].cache.layers for t in (layer.keys, layer.values))
        assert [f.indices for f in unpatched_runs(model, calls, pairs, keep_site=site, pairs_per_forward=4,
                                                  keep_bytes=one)[1]] == [[4]]
    assert kept[0].rows([1, 2]) == slice(1, 3) and kept[0].rows([2, 0]).tolist() == [2, 0]
    assert kept[0].corrupt_rows([1, 2]) == slice(5, 7) and kept[0].corrupt_rows([2, 0]).tolist() == [6, 4]
    assert kept[0].rows([0, 4]) is None and kept[0].rows([]) is None and kept[0].corrupt_rows([4]) is None


@pytest.mark.parametrize("family", ["llama", "gpt_neo"])
def test_small_sweeps_run_no_second_forward_of_their_unpatched_rows(family, monkeypatch):
    """A sweep's groups take their clean activations and prefix caches from the metrics' forwards (no prefix forward
    of their own) and its results, metrics included, are those of the sweep that runs those rows again, bit for bit
    (on a CPU every pair has its own forward: the same batch), for one pair and for several, one of them excluded;
    with no byte budget nothing is kept."""
    from helpers.patching import example_runs

    model = model_of(family)
    three = make_pairs(3)
    with torch.no_grad():
        for pair in three[:2]:  # clean-correct, so included; the third is not
            pair.clean_token_id = int(model(torch.tensor([pair.clean_ids])).logits[0, -1].argmax())
    # one pair (three seeds); three, the last clean-incorrect and so excluded
    for pairs in (make_pairs(0)[:1], make_pairs(1)[1:2], make_pairs(2)[2:], three):
        keep_incorrect = len(pairs) == 1
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            kept = patch_heads(model, pairs, keep_incorrect=keep_incorrect, progress=False)
            monkeypatch.setattr(example_runs, "KEEP_UNPATCHED_MAX_BYTES", 0)
            own = patch_heads(model, pairs, keep_incorrect=keep_incorrect, progress=False)
            monkeypatch.undo()
        served = int(kept.included.sum())
        assert served == (1 if keep_incorrect else 2)
        assert kept.stats.get("groups_from_kept_forwards", 0) == served and "prefix_forwards" not in kept.stats
        assert "groups_from_kept_forwards" not in own.stats and own.stats.get("prefix_forwards", 0) == served
        assert torch.equal(kept.patched_logit_diff.nan_to_num(), own.patched_logit_diff.nan_to_num())
        for name in ("clean_logit_diff", "corrupt_logit_diff"):
            assert getattr(kept, name).tolist() == getattr(own, name).tolist()


def test_each_kept_forward_is_freed_after_its_last_group(monkeypatch):
    """The sweep hands its groups only the kept forwards still to be used: on a CPU (a forward and a group per pair)
    three, then two, then one; an excluded pair's forward is dropped before the first group."""
    from helpers.patching import sweep

    model = model_of("llama")
    pairs = make_pairs(4)
    with torch.no_grad():
        for pair in pairs:  # clean-correct, so included
            pair.clean_token_id = int(model(torch.tensor([pair.clean_ids])).logits[0, -1].argmax())
    seen, real = [], sweep.sweep_group

    def recording(*args, kept=(), **kwargs):
        seen.append(sorted(i for f in kept for i in f.indices))
        return real(*args, kept=kept, **kwargs)
    monkeypatch.setattr(sweep, "sweep_group", recording)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        patch_heads(model, pairs, progress=False)
        assert seen == [[0, 1, 2], [1, 2], [2]]
        seen.clear()
        pairs[1].clean_token_id = (pairs[1].clean_token_id + 1) % model.config.vocab_size  # now excluded
        patch_heads(model, pairs, progress=False)
    assert seen == [[0, 2], [2]]


def test_every_forwards_unpatched_rows_are_checked_against_their_examples_corrupt_metric(monkeypatch):
    """The self-check: each forward's unpatched rows reproduce their examples' corrupt metrics (three examples
    merged, four forwards of two positions): the corrupt metric of the example with the shortest span, which has no
    rows in the first forward, made 0.25 off shows as a 0.25 deviation (so the later forwards are checked), also
    beside another example's NaN corrupt metric, and the computed values do not move."""
    from helpers.patching import sweep

    model = model_of("llama")
    pairs = make_pairs(0, model)
    kw = dict(keep_incorrect=True, progress=False, examples_per_forward=3, bucket_size=2)
    honest = patch_heads(model, pairs, **kw)
    real = sweep.unpatched_runs

    nan_first = False

    def shifted(*args, **kwargs):
        pre, kept = real(*args, **kwargs)
        pre[2] = (pre[2][0], pre[2][1] + 0.25, pre[2][2])
        if nan_first:
            pre[0] = (pre[0][0], float("nan"), pre[0][2])
        return pre, kept
    monkeypatch.setattr(sweep, "unpatched_runs", shifted)
    off = patch_heads(model, pairs, **kw)
    nan_first = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # a NaN corrupt metric (its example's deviations are NaN) hides no other example's deviation
        assert patch_heads(model, pairs, **kw).stats["base_row_max_dev"] == pytest.approx(0.25, abs=ATOL)
    assert honest.stats["forwards"] == off.stats["forwards"] == 4
    assert len(pairs[2].clean_ids) - pairs[2].corrupted_position < 7  # (the first forward patches r 7 and 8)
    assert honest.stats["base_row_max_dev"] < ATOL
    assert off.stats["base_row_max_dev"] == pytest.approx(0.25, abs=ATOL)
    for i, pair in enumerate(pairs):
        d = pair.corrupted_position
        a, b = honest.patched_logit_diff[i, ..., d:], off.patched_logit_diff[i, ..., d:]
        assert torch.equal(a.nan_to_num(), b.nan_to_num())
        assert torch.all(off.patched_logit_diff[i, ..., :d] == honest.corrupt_logit_diff[i] + (0.25 if i == 2 else 0))


def test_the_block_tails_table_is_filled_in_the_order_its_lookup_reads():
    """BlockTails' rows, in a plain loop over (example, unit, r = 1..span): the i-th row fills from the unpatched row
    of its example at r tokens from the end (``base_flat``), its unit's heads (``head_flat``) and its clean
    activation (``act_flat``, into acts [E, L, T, U, w]), and ``flat`` finds it at layer * n + i; random groups with
    spans of 0, and a group whose spans are all 0."""
    from helpers.patching.block_tails import BlockTails

    gen = torch.Generator().manual_seed(0)
    draw = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=gen))  # noqa: E731
    for trial in range(60):
        E, L, U, q = draw(1, 4), draw(2, 4), draw(1, 3), draw(1, 6)
        T = q + draw(0, 3)
        spans = [0] * E if trial == 0 else [draw(0, q) for _ in range(E)]
        tails = BlockTails(torch.zeros(E, L, T, U, 2), spans, T, q)
        i = 0
        for e in range(E):
            for u in range(U):
                for r in range(1, spans[e] + 1):
                    assert int(tails.base_flat[i]) == e * q + q - r
                    assert int(tails.head_flat[i]) == i * U + u
                    for layer in range(L - 1):
                        assert int(tails.act_flat[layer, i]) == ((e * L + layer) * T + (T - r)) * U + u
                        at = tails.flat(*(torch.tensor([v]) for v in (layer, e, u, r)))
                        assert int(at) == layer * tails.n + i
                    i += 1
        assert i == tails.n == len(tails.base_flat) == len(tails.head_flat) == tails.act_flat.shape[1]


@pytest.mark.parametrize("family, n_layers", [("llama", 3), ("gpt_neo", 4)])
def test_block_tails_are_computed_once_a_group_and_equal_each_forwards_own(family, n_layers, monkeypatch):
    """Head patches' block tails: the group's first (widest) forward computes every row's, one ``block_tail`` a
    layer a group over all its rows (in slices no larger than its row-tokens), and the later forwards look theirs
    up; the sweep equals the per-forward tails (each forward's from its own unpatched rows, as where the table is
    over its memory budget) and the reference: three examples of three spans merged, and one example a group, over
    several forwards a bucket (rows 2 a forward) or one; an out-of-memory error in the fill halves the forward and
    its slices, and the sweep goes on with the same numbers."""
    from helpers.models.architectures import head_geometry
    from helpers.patching import block_tails, hooks

    model = tiny_model(family, n_layers=n_layers, seed=3)
    pairs = make_pairs(0, model)
    geo = head_geometry(model.config)
    spans = [len(p.clean_ids) - p.corrupted_position for p in pairs]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = patch_heads_reference(model, pairs, keep_incorrect=True, progress=False, min_denominator=0.02)
    real = hooks.block_tail
    rows_per_call, fail_over = [], [None]

    def counted(m, layer, x, z):
        rows_per_call.append(x.shape[0])
        if fail_over[0] is not None and x.shape[0] > fail_over[0]:
            raise OutOfMemoryError("fake: a large fill")
        return real(m, layer, x, z)
    monkeypatch.setattr(hooks, "block_tail", counted)
    kw = dict(keep_incorrect=True, progress=False, min_denominator=0.02, bucket_size=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for per_forward, groups in ((3, [spans]), (1, [[s] for s in spans])):
            for chunk in (None, 2):
                rows_per_call.clear()
                monkeypatch.setattr(block_tails, "CPU_BYTES", 512 * 2**20)
                once = patch_heads(model, pairs, examples_per_forward=per_forward, chunk_size=chunk, **kw)
                per_layer = [geo.n_heads * sum(g) for g in groups for _ in range(geo.n_layers - 1)]
                if chunk is None:  # one call a layer a group, over all its rows
                    assert rows_per_call == per_layer
                else:  # slices of at most 2 rows x the widest bucket's tokens
                    assert sum(rows_per_call) == sum(per_layer) and max(rows_per_call) <= 2 * max(spans)
                assert once.stats["block_tail_fills"] == len(groups) and once.stats["forwards"] >= 2 * len(groups)
                rows_per_call.clear()
                monkeypatch.setattr(block_tails, "CPU_BYTES", 0)  # (the table over its budget)
                own = patch_heads(model, pairs, examples_per_forward=per_forward, chunk_size=chunk, **kw)
                assert "block_tail_fills" not in own.stats and len(rows_per_call) > len(per_layer)
                assert_raw_close(once, own, atol=1e-6)
                assert_raw_close(once, ref)
                assert_normalised_close(once, ref)
        monkeypatch.setattr(block_tails, "CPU_BYTES", 512 * 2**20)
        whole = patch_heads(model, pairs, examples_per_forward=3, **kw)
        fail_over[0] = max(spans)  # a fill of more rows than one row's tokens runs out of memory
        halved = patch_heads(model, pairs, examples_per_forward=3, **kw)
    assert halved.stats["oom_halvings"] > 0 and halved.stats["block_tail_fills"] == 1
    assert_raw_close(halved, whole, atol=1e-6)


@pytest.mark.parametrize("family", ["llama", "gpt_neo"])
def test_metrics_of_pairs_sharing_a_forward_equal_each_pairs_own(family):
    """Unpatched metrics of pairs of one length sharing a forward (the GPU default) equal each pair's own batch-2
    forward to float rounding, with the same inclusion; one pair a forward is exactly ``logit_diffs`` of its own
    (a forward that keeps a cache, as every metrics forward does)."""
    from helpers.patching.aligned_batch import AlignedBatch
    from helpers.patching.example_runs import example_metrics, logit_diffs
    from helpers.patching.model_calls import ModelCalls, aligned_forward

    model = model_of(family)
    calls = ModelCalls.of(model)
    gen = torch.Generator().manual_seed(5)
    pairs = [make_pair(gen, n, c) for n, c in ((9, 3), (12, 4), (9, 5), (9, 2), (12, 7), (10, 1))]
    own = example_metrics(model, calls, pairs, pairs_per_forward=1)
    for per_forward in (2, 3, 32):
        shared = example_metrics(model, calls, pairs, pairs_per_forward=per_forward)
        for (c1, k1, ok1), (c2, k2, ok2) in zip(own, shared):
            assert abs(c1 - c2) < 1e-5 and abs(k1 - k2) < 1e-5 and ok1 == ok2
    with torch.inference_mode():
        for pair, metrics in zip(pairs, own):
            batch = AlignedBatch([list(pair.clean_ids), list(pair.corrupt_ids)], "cpu")
            logits, _ = aligned_forward(model, calls, batch, batch.length, None, use_cache=True)
            assert metrics == logit_diffs(logits[0], logits[1], pair)
    with pytest.raises(ValueError, match="pairs_per_forward"):
        example_metrics(model, calls, pairs, pairs_per_forward=0)


def test_one_example_per_forward_keeps_each_pairs_metrics_in_its_own_forward(monkeypatch):
    """``examples_per_forward=1`` is the opt-out from shared forwards: the unpatched metrics too run one pair a
    forward; by default the device decides (shared on a GPU)."""
    from helpers.patching import example_runs, sweep

    asked = []
    real = example_runs.unpatched_runs

    def recording(*args, pairs_per_forward=None, **kwargs):
        asked.append(pairs_per_forward)
        return real(*args, pairs_per_forward=pairs_per_forward, **kwargs)
    monkeypatch.setattr(sweep, "unpatched_runs", recording)
    model, pairs = model_of("llama"), make_pairs(1)
    for per_forward in (1, None, 3):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            patch_heads(model, pairs, keep_incorrect=True, progress=False, examples_per_forward=per_forward)
    assert asked == [1, None, None]


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("kind", list(KERNELS))
@pytest.mark.parametrize("per_forward", [None, 3])
def test_layer_kernels_equal_hook_loop(family, kind, per_forward):
    model, pairs = model_of(family), make_pairs(2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = patch_sites_reference(model, pairs, kind, keep_incorrect=True)
        fast = KERNELS[kind](model, pairs, keep_incorrect=True, progress=False, examples_per_forward=per_forward)
    assert fast.stats["max_examples_per_forward"] == (per_forward or 1)
    assert fast.patched_logit_diff.shape == (3, 2, 13)
    assert fast.dims == ("example", "layer", "pos")
    assert_raw_close(fast, ref)
    if kind == "residual":  # the block-0 input at the corrupted position is the whole difference
        for i, pair in enumerate(pairs):
            assert fast.normalised[i, 0, pair.corrupted_position].item() == pytest.approx(1.0, abs=1e-4) or \
                fast.guarded[i]


@pytest.mark.parametrize("family", ["qwen2", "gpt2"])
def test_sdpa_attention_and_nnsight_wrapper(family):
    """sdpa-loaded models (transformers' default), one example at a time and merged under a padding mask."""
    from nnsight import NNsight

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(family), attn_implementation="sdpa").eval()
    pairs = make_pairs(3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = patch_sites_reference(model, pairs, "heads", keep_incorrect=True)
        wrapped = NNsight(model)
        assert unwrap_model(wrapped) is model
        fast = patch_heads(wrapped, pairs, keep_incorrect=True, progress=False)
        merged = patch_heads(wrapped, pairs, keep_incorrect=True, progress=False, examples_per_forward=3)
    assert_raw_close(fast, ref)
    assert_raw_close(merged, ref)
    assert merged.stats["max_examples_per_forward"] == 3


def test_sliding_window_cache_layers():
    """Sliding-window layers keep only their window in the cache: the incremental prefix path."""
    from transformers import Qwen2Config

    config = Qwen2Config(vocab_size=256, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, use_sliding_window=True,
                         sliding_window=4, max_window_layers=1, tie_word_embeddings=False)
    assert config.layer_types == ["full_attention", "sliding_attention"]
    model = build_random_model(config)
    pairs = make_pairs(10, model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = patch_sites_reference(model, pairs, "heads", keep_incorrect=True)
        fast = patch_heads(model, pairs, keep_incorrect=True, progress=False, bucket_size=2)
    assert fast.stats["prefix_forwards"] > 1  # not the one-pass truncation, which would be wrong here
    assert_raw_close(fast, ref)


def test_nnsight_language_model_is_accepted(project_tokenizer):
    from nnsight import LanguageModel

    model = tiny_model("llama", vocab_size=len(project_tokenizer))
    wrapped = LanguageModel(model, tokenizer=project_tokenizer)
    pairs = make_pairs(11)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fast = patch_heads(wrapped, pairs, keep_incorrect=True, progress=False)
        ref = patch_heads_reference(wrapped, pairs, keep_incorrect=True, progress=False,
                                    patches=[(1, 2, 11), (0, 3, 4), (1, 0, 9), (0, 0, 1)])
    assert unwrap_model(wrapped) is model
    cells = ~torch.isnan(ref.patched_logit_diff)
    assert cells.sum() == 3 * 3 + 2  # position 11 exists only in examples 0 and 2 (lengths 12, 10, 13)
    assert (fast.patched_logit_diff[cells] - ref.patched_logit_diff[cells]).abs().max() <= ATOL


def test_metric_guard_gives_nan_and_warning_never_inf():
    model = model_of("llama")
    gen = torch.Generator().manual_seed(4)
    pairs = [make_pair(gen, 9, 3, clean_tok=5, corrupt_tok=5), make_pair(gen, 11, 2)]
    with pytest.warns(UserWarning, match=r"example 0: \|clean - corrupt\|"):
        res = patch_heads(model, pairs, keep_incorrect=True, progress=False)
    assert res.guarded.tolist() == [True, False]
    assert torch.isnan(res.normalised[0]).all()
    assert not torch.isinf(res.normalised).any()
    assert torch.isfinite(res.patched_logit_diff[0, ..., :9]).all()  # raw values are kept
    assert torch.isfinite(res.mean()[..., :11]).all()  # the guarded example drops out of the mean


def test_clean_incorrect_examples_are_excluded_by_default():
    model = model_of("gpt2")
    gen = torch.Generator().manual_seed(5)
    right, wrong = make_pair(gen, 10, 3), make_pair(gen, 12, 5)
    with torch.no_grad():
        clean = model(torch.tensor([right.clean_ids])).logits[0, -1]
        delta = clean - model(torch.tensor([right.corrupt_ids])).logits[0, -1]
        wrong_argmax = int(model(torch.tensor([wrong.clean_ids])).logits[0, -1].argmax())
    right.clean_token_id = int(clean.argmax())
    right.corrupt_token_id = int(delta.argmin())
    wrong.clean_token_id = (wrong_argmax + 1) % 256
    with pytest.warns(UserWarning, match=r"excluded from the sweep: examples \[1\]"):
        res = patch_heads(model, [right, wrong], progress=False, min_denominator=1e-4)
    assert torch.isfinite(res.mean()[..., :10]).all()
    assert res.clean_correct.tolist() == [True, False]
    assert res.included.tolist() == [True, False]
    assert torch.isnan(res.patched_logit_diff[1]).all()
    assert torch.isnan(res.mean()[..., 10:]).all()  # only the excluded example had those positions
    only = patch_heads(model, [right], progress=False, min_denominator=1e-4)
    assert torch.allclose(res.mean()[..., :10], only.mean(), equal_nan=True)
    with pytest.warns(UserWarning, match=r"kept \(keep_incorrect=True\)"):
        kept = patch_heads(model, [right, wrong], keep_incorrect=True, progress=False)
    assert kept.included.tolist() == [True, True]
    assert torch.isfinite(kept.patched_logit_diff[1, ..., :12]).all()


def test_mean_and_std_are_nan_aware_over_padded_positions():
    model = model_of("qwen2")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = patch_heads(model, make_pairs(6), keep_incorrect=True, progress=False)
    norm = res.normalised  # lengths 12, 10, 13
    assert res.mean().shape == (2, 4, 13)
    assert torch.allclose(res.mean()[..., 12], norm[2, ..., 12], equal_nan=True)  # only example 2 is that long
    assert torch.isnan(res.std()[..., 12]).all()  # a single example has no spread
    expected = norm[:, ..., :10].std(0)  # all three examples have positions 0..9
    assert torch.allclose(res.std()[..., :10], expected, atol=1e-6, equal_nan=True)
    assert res.count()[..., 11].max() == 2 and res.count()[..., 12].max() == 1


def test_run_chunked_halves_on_out_of_memory():
    seen = []

    def fn(a, b):
        if b - a > 5:
            raise OutOfMemoryError("fake: chunk too large")
        seen.extend(range(a, b))

    final, halvings = run_chunked(23, 16, fn, on_oom=lambda: None)
    assert seen == list(range(23))  # every item exactly once, in order
    assert final <= 5 and halvings == 2  # 16 -> 8 -> 4
    with pytest.raises(OutOfMemoryError):
        run_chunked(3, 4, lambda a, b: (_ for _ in ()).throw(OutOfMemoryError("always")), on_oom=lambda: None)


def test_patch_heads_survives_out_of_memory_by_halving_chunks():
    model = model_of("granite")
    pairs = make_pairs(7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = patch_heads(model, pairs, keep_incorrect=True, progress=False, bucket_size=4)

        def too_big(mod, args, kwargs):  # the output layer sees every row of a forward
            hidden = args[0] if args else next(iter(kwargs.values()))
            if hidden.shape[0] > 7:
                raise OutOfMemoryError("fake: batch > 7")
        handle = model.get_output_embeddings().register_forward_pre_hook(too_big, with_kwargs=True)
        try:
            got = patch_heads(model, pairs, keep_incorrect=True, progress=False, bucket_size=4, chunk_size=64)
        finally:
            handle.remove()
    assert got.stats["oom_halvings"] > 0
    assert_raw_close(got, expected, atol=1e-6)


def _linearise_last_layer(model):
    """Final norm -> identity and the last MLP -> zero: the metric is then linear in the last layer's z."""
    spec = family_spec(model.config)
    base = get_submodule(model, spec.blocks.rsplit(".", 1)[0])
    for name in ("norm", "ln_f"):
        if hasattr(base, name):
            setattr(base, name, torch.nn.Identity())

    class Zero(torch.nn.Module):
        def forward(self, x, *args, **kwargs):
            return torch.zeros_like(x)

    last = get_submodule(model, spec.blocks)[-1]
    parent, attr = (get_submodule(last, spec.mlp.rsplit(".", 1)[0]), spec.mlp.rsplit(".", 1)[1]) \
        if "." in spec.mlp else (last, spec.mlp)
    setattr(parent, attr, Zero())
    with torch.no_grad():  # louder last-layer heads (still linear), so their effects are far above rounding
        out_proj_modules(model)[-1].weight.mul_(20.0)
    return model


@pytest.mark.parametrize("family", ["gpt2", "granite"])
def test_attribution_is_exact_where_the_metric_is_linear(family):
    model = _linearise_last_layer(tiny_model(family))
    pairs = make_pairs(8, model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exact = patch_heads(model, pairs, keep_incorrect=True, progress=False)
        approx = attribution_patching_heads(model, pairs, keep_incorrect=True, progress=False)
    last_exact, last_approx = exact.patched_logit_diff[:, -1], approx.patched_logit_diff[:, -1]
    assert torch.equal(torch.isnan(last_exact), torch.isnan(last_approx))
    effect = (last_exact - exact.corrupt_logit_diff.view(-1, 1, 1)).nan_to_num(0).abs().max()
    assert effect > 1e-2, effect  # not trivially zero
    assert (last_exact - last_approx).nan_to_num(0).abs().max() < 1e-4 * max(1.0, float(effect))
    report = attribution_error(approx, exact)
    assert report["n"] == int(torch.isfinite(exact.patched_logit_diff).sum())
    assert report["correlation"] > 0.9, report  # the (exact) last layer dominates after the scaling


def test_attribution_error_report_on_a_plain_tiny_model():
    model = model_of("llama")
    pairs = make_pairs(9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exact = patch_heads(model, pairs, keep_incorrect=True, progress=False)
        approx = attribution_patching_heads(model, pairs, keep_incorrect=True, progress=False)
    assert approx.patched_logit_diff.shape == exact.patched_logit_diff.shape
    for i, pair in enumerate(pairs):  # zero wherever clean and corrupt z are equal
        assert torch.all(approx.patched_logit_diff[i, ..., : pair.corrupted_position] == approx.corrupt_logit_diff[i])
    report = attribution_error(approx, exact)
    assert report["correlation"] > 0.3, report
    assert 0 <= report["mean_abs_error"] <= report["max_abs_error"] < float("inf")
    assert report["n"] > 0
    self_report = attribution_error(exact, exact)
    assert self_report["max_abs_error"] == 0 and self_report["correlation"] == pytest.approx(1.0)


def test_pairs_are_validated():
    model = model_of("llama")
    bad = Pair([1, 2, 3], [1, 2], 1, 2, 3, 4)
    with pytest.raises(ValueError, match="length"):
        patch_heads(model, [bad], progress=False)
    off = Pair([1, 2, 3], [1, 5, 3], 1, 1, 3, 4)
    with pytest.raises(ValueError, match="answer_position"):
        patch_heads(model, [off], progress=False)


def test_model_is_left_as_found_even_after_an_error():
    model = model_of("gpt_neo")
    pairs = make_pairs(12)

    def hook_count():
        return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())

    before = hook_count()
    own_forward = model.get_output_embeddings().__dict__.get("forward")  # nnsight wrapping may have set one
    handle = model.get_output_embeddings().register_forward_pre_hook(
        lambda mod, args: (_ for _ in ()).throw(OutOfMemoryError("fake: always")) if args[0].shape[0] > 1 else None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(OutOfMemoryError):  # a chunk of one row still fails: re-raised, not looped
            patch_heads(model, pairs, keep_incorrect=True, progress=False)
    handle.remove()
    assert hook_count() == before
    assert model.get_output_embeddings().__dict__.get("forward") is own_forward  # the two-row head is undone
    with torch.no_grad():
        assert model(torch.tensor([pairs[0].clean_ids])).logits.shape[-1] == 256


def test_attribution_switches_dropout_off_for_every_forward():
    """A model handed over in train mode must give the same (deterministic) metrics twice."""
    from helpers.patching.attribution import attribution_patching_heads
    from helpers.models.tiny_models import build_random_model, tiny_config

    config = tiny_config("gpt_neo")
    config.attention_dropout = config.resid_dropout = config.embed_dropout = 0.5
    model = build_random_model(config, seed=3).train()
    pairs = make_pairs(seed=1)
    a = attribution_patching_heads(model, pairs, keep_incorrect=True, progress=False)
    b = attribution_patching_heads(model, pairs, keep_incorrect=True, progress=False)
    torch.testing.assert_close(a.clean_logit_diff, b.clean_logit_diff)
    torch.testing.assert_close(a.patched_logit_diff, b.patched_logit_diff, equal_nan=True)
    assert model.training  # restored


def test_a_sweep_gives_every_module_its_own_mode_back():
    """A training model with one layer the caller put in eval mode (a frozen layer, say): the sweep runs with dropout
    off (deterministic, as in eval mode), and afterwards the model trains and that layer stays in eval mode (restoring
    the top's mode alone switched the layer back to training); a model in eval mode stays so throughout."""
    from helpers.models.tiny_models import build_random_model, tiny_config
    from helpers.patching.model_calls import eval_mode

    config = tiny_config("gpt_neo")
    config.attention_dropout = config.resid_dropout = config.embed_dropout = 0.5
    model = build_random_model(config, seed=3).train()
    frozen = model.transformer.h[0]
    frozen.eval()
    before = {name: m.training for name, m in model.named_modules()}
    assert any(before.values()) and not all(before.values())
    pairs = make_pairs(seed=1)
    a = patch_heads(model, pairs, keep_incorrect=True, progress=False)
    assert {name: m.training for name, m in model.named_modules()} == before
    b = patch_heads(model.eval(), pairs, keep_incorrect=True, progress=False)
    torch.testing.assert_close(a.patched_logit_diff, b.patched_logit_diff, equal_nan=True)  # dropout was off
    assert not any(m.training for m in model.modules())
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
    assert not any(m.training for m in model.modules())


def test_a_sweep_switches_modes_through_the_modules_own_train():
    """Overrides of ``train()`` hear both switches (transformers' PreTrainedModel.train re-selects kernels, some
    attention modules drop a cache in train(True)): a training model is put in eval mode and back through them,
    its frozen layer's own train() last with False; a model already in eval mode hears nothing."""
    from helpers.models.tiny_models import build_random_model, tiny_config

    model = build_random_model(tiny_config("llama"), seed=3).train()
    frozen = model.model.layers[0]
    frozen.eval()
    heard = {"model": [], "frozen": []}
    for name, module in (("model", model), ("frozen", frozen)):
        def train(mode=True, module=module, name=name):
            heard[name].append(mode)
            return torch.nn.Module.train(module, mode)
        module.train = train  # (an instance attribute: Module.train of the parent calls it too)
    heard = {"model": [], "frozen": []}
    patch_heads(model, make_pairs(seed=1), keep_incorrect=True, progress=False)
    assert heard["model"] == [False, True] and heard["frozen"][-1] is False
    assert model.training and not frozen.training and model.model.layers[1].training
    model.eval()
    heard = {"model": [], "frozen": []}
    patch_heads(model, make_pairs(seed=1), keep_incorrect=True, progress=False)
    assert heard == {"model": [], "frozen": []}


@pytest.mark.parametrize("family", ["gpt2", "qwen2", "granite"])
def test_heads_of_deeper_models_equal_nnsight_reference(family):
    """4 layers: rows that skip their patch layer (joining at the next block) then run through further blocks."""
    model = tiny_model(family, n_layers=4)
    pairs = make_pairs(3, model)[:2]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = patch_heads_reference(model, pairs, keep_incorrect=True, progress=False, min_denominator=0.02)
        fast = patch_heads(model, pairs, keep_incorrect=True, progress=False, min_denominator=0.02, bucket_size=3)
    assert_raw_close(fast, ref)
    assert fast.normalised.nan_to_num(0)[:, :3].abs().max() > 1e-3  # early layers' patches reach the answer


def _cuda_sweeps(model, per_forward, row_attention_calls=None):
    """On CUDA: ``model``'s sweep of the three test pairs in float32 against the reference (TF32 is off: rounding
    only), then in bf16, fused and with HF's modules; (fused, plain). ``row_attention_calls``: must stay empty in
    float32."""
    pairs = make_pairs(0, model)
    model.cuda()
    kw = dict(keep_incorrect=True, progress=False, min_denominator=0.02)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = patch_heads_reference(model, pairs, **kw)
        assert_raw_close(patch_heads(model, pairs, examples_per_forward=per_forward, **kw), ref, atol=1e-4)
        assert not row_attention_calls
        model.to(torch.bfloat16)
        fused = patch_heads(model, pairs, examples_per_forward=per_forward, **kw)
        plain = patch_heads(model, pairs, fused=False, examples_per_forward=1, **kw)
    assert fused.stats["max_examples_per_forward"] == (1 if per_forward == 1 else 3)
    return fused, plain


def _assert_bf16_close(fused, plain):
    """The fused bf16 sweep against HF's modules: to bf16 rounding of the patched logit differences."""
    a, b = fused.patched_logit_diff, plain.patched_logit_diff
    assert torch.equal(torch.isnan(a), torch.isnan(b))
    scale = b.nan_to_num(0).abs().max().item()
    assert (a - b).nan_to_num(0).abs().max().item() <= 0.05 * scale + 0.05, ((a - b).nan_to_num(0).abs().max(), scale)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA kernels (Triton, flash) run on the GPU box only")
@pytest.mark.parametrize("family", ["llama", "qwen2", "granite"])
@pytest.mark.parametrize("per_forward", [1, None])
def test_cuda_sweep_matches_the_reference_and_the_hf_modules(family, per_forward):
    """On CUDA the fused sweep runs Triton rotary / silu-mul (fp32 and bf16). fp32, examples merged: the padded
    masked path with per-row rotary tables. bf16: the corrupt prefix shared inside attention, read by Triton's
    row_attention (one example's prefix for every row, or each row its own example's)."""
    fused, plain = _cuda_sweeps(tiny_model(family), per_forward)
    assert "flash attention (CUDA fp16/bf16)" in fused.stats["fused"] and fused.stats["shared_prefix"]
    # (the gate/up matmul with its silu epilogue where the GPU has TMA: helpers.patching.matmul_epilogues)
    from helpers.patching import matmul_epilogues
    tma = matmul_epilogues.TensorDescriptor is not None and matmul_epilogues._has_tma(torch.device("cuda"))
    assert ("silu_epilogue x2" in fused.stats["fused"]) == tma
    _assert_bf16_close(fused, plain)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA kernels (Triton) run on the GPU box only")
@pytest.mark.parametrize("per_forward", [1, None])
def test_cuda_gpt_neo_sweep_matches_the_reference_and_the_hf_attention(per_forward, row_attention_calls):
    """On CUDA in bf16 GPT-Neo's swapped attention reads the shared corrupt prefix in ``row_attention`` (one example's
    for every row, or each row its own example's); float32 keeps HF's formula on the concatenated keys (TF32 off)."""
    # TinyStories-2L's window; head size 16 (a power of two)
    model = tiny_model("gpt_neo", window_size=256, hidden_size=64)
    fused, plain = _cuda_sweeps(model, per_forward, row_attention_calls)
    assert fused.stats["shared_prefix"] and row_attention_calls
    _assert_bf16_close(fused, plain)


def _cpu_flash(query, key, value, causal, scaling):
    """aten's flash attention (CUDA only) as plain torch: [batch, head, seq, d] views, grouped key/value heads,
    lower-right causal; (out [batch, seq, head, d], log-sum-exp [batch, head, seq])."""
    group = query.shape[1] // key.shape[1]
    scores = query.float() @ key.repeat_interleave(group, 1).float().transpose(-1, -2) * scaling
    if causal:
        q, kv = scores.shape[-2:]
        scores = scores.masked_fill(torch.ones(q, kv, dtype=torch.bool).triu(kv - q + 1), float("-inf"))
    out = torch.softmax(scores, -1) @ value.repeat_interleave(group, 1).float()
    return out.to(query.dtype).transpose(1, 2), torch.logsumexp(scores, -1)


@pytest.mark.parametrize("family, per_forward", [("llama", 3), ("qwen2", 1)])  # (~30 s each, interpreted)
def test_the_gpu_sweep_path_equals_the_reference_under_tritons_interpreter(triton_device, gpu_branches_on_cpu,
                                                                          row_attention_calls, monkeypatch, request,
                                                                          family, per_forward):
    """The sweep as a GPU runs it (fused modules with Triton's row_attention; the MLP as a Hopper runs it, the gate/up
    matmul with its silu epilogue (llama), or as older GPUs do, cuBLAS and Triton's silu_mul (qwen2); the corrupt
    prefix shared inside attention; merged, each row reading its own example's prefix), here on a CPU in float32:
    Triton's kernels interpreted, aten's CUDA-only flash attention replaced by the same arithmetic in torch
    (_cpu_flash)."""
    if triton_device == "cuda":
        pytest.skip("on a GPU: test_cuda_sweep_matches_the_reference_and_the_hf_modules")
    import helpers.patching.fused_modules as fm
    monkeypatch.setattr(fm, "_flash", _cpu_flash)
    epilogues = request.getfixturevalue("epilogues_on_cpu") if family == "llama" else None
    silu_muls = []
    real_silu_mul = fm.triton_kernels.silu_mul
    monkeypatch.setattr(fm.triton_kernels, "silu_mul", lambda gu: silu_muls.append(gu.shape) or real_silu_mul(gu))
    fast, ref = _heads_and_reference(family, per_forward)
    rotaries = [kwargs["rotary"] for _, kwargs in row_attention_calls]
    assert fast.stats["shared_prefix"] and fast.stats["max_examples_per_forward"] == per_forward
    assert rotaries and all(r is not None for r in rotaries)  # every sweep forward's attention was the kernel
    # the MLP's gate/up matmul with silu * up as its epilogue (llama), or cuBLAS and Triton's silu_mul (qwen2)
    assert bool(epilogues) == (family == "llama") and bool(silu_muls) == (family != "llama")
    assert ("silu_epilogue" in " ".join(fast.stats["fused"])) == (family == "llama")
    if per_forward == 3:  # merged: per-row rotary tables
        assert any(r[0].shape[0] > 1 for r in rotaries)
    assert_raw_close(fast, ref)
    assert_normalised_close(fast, ref)


@pytest.mark.parametrize("window", [256, 8])
def test_gpt_neos_gpu_sweep_path_equals_the_reference_under_tritons_interpreter(triton_device, gpu_branches_on_cpu,
                                                                                row_attention_calls, window):
    """GPT-Neo's sweep as a GPU runs it in fp16/bf16: the three examples merged, each row reading its own example's
    corrupt prefix inside the swapped attention's ``row_attention`` (unscaled, no rotary), here in float32 with
    Triton interpreted. With a local window (8) shorter than the prompts (13), several examples' prefixes cannot be
    read there: the sweep falls back to per-row caches and HF's attention, with the same numbers."""
    if triton_device == "cuda":
        pytest.skip("on a GPU: test_cuda_sweep_matches_the_reference_and_the_hf_modules")
    if window == 8:
        fast, ref = _heads_and_reference("gpt_neo", 3)
    else:
        model = tiny_model("gpt_neo", window_size=window, hidden_size=64)  # (head size 16: tiles need a power of 2)
        pairs = make_pairs(0, model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = patch_heads_reference(model, pairs, keep_incorrect=True, progress=False, min_denominator=0.02)
            fast = patch_heads(model, pairs, keep_incorrect=True, progress=False, min_denominator=0.02,
                               examples_per_forward=3)
    assert fast.stats["max_examples_per_forward"] == 3
    assert fast.stats["shared_prefix"] == (window == 256) == bool(row_attention_calls)
    assert all(kw.get("rotary") is None and args[5] == 1.0 for args, kw in row_attention_calls)
    assert_raw_close(fast, ref)
    assert_normalised_close(fast, ref)
    assert fast.normalised.nan_to_num(0).abs().max() > 1e-3


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_an_end_aligned_batch_gives_each_examples_own_logits(family):
    """The padding mask reaches every layer as given: each row of a padded batch equals its example run alone."""
    from helpers.patching.aligned_batch import AlignedBatch
    from helpers.patching.model_calls import ModelCalls

    model = model_of(family)
    gen = torch.Generator().manual_seed(12)
    lists = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (7, 12, 3)]
    batch = AlignedBatch(lists, "cpu")
    assert batch.pads == [5, 0, 9] and batch.padded
    calls = ModelCalls.of(model)
    with torch.no_grad():
        merged, _ = calls.forward(model, batch.ids, positions=batch.positions,
                                  mask=batch.additive_mask(12, 12, torch.float32))
        alone = torch.cat([calls.forward(model, torch.tensor([ids]))[0] for ids in lists])
    assert torch.allclose(merged, alone, atol=1e-5, rtol=0)


def test_examples_merge_only_where_every_span_fits_the_shortest_example():
    """A long span (corruption early in a long prompt) cannot be fed from a short example's end: separate groups,
    same numbers as one example at a time."""
    model = model_of("llama")
    gen = torch.Generator().manual_seed(13)
    pairs = [decisive(model, make_pair(gen, 16, 2)), decisive(model, make_pair(gen, 8, 5)),
             decisive(model, make_pair(gen, 9, 4))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = patch_sites_reference(model, pairs, "heads", keep_incorrect=True)
        merged = patch_heads(model, pairs, keep_incorrect=True, progress=False, examples_per_forward=32)
        alone = patch_heads(model, pairs, keep_incorrect=True, progress=False)  # (the default on a CPU)
        capped = patch_heads(model, pairs, keep_incorrect=True, progress=False, examples_per_forward=2, bucket_size=2)
    assert merged.stats["max_examples_per_forward"] == 2  # span 14 > 8: the first alone, the other two together
    assert alone.stats["max_examples_per_forward"] == 1 and capped.stats["max_examples_per_forward"] == 2
    for res in (merged, alone, capped):
        assert_raw_close(res, ref)
    with pytest.raises(ValueError, match="examples_per_forward"):
        patch_heads(model, pairs, progress=False, examples_per_forward=0)
    # (a bucket size below 1 ran no forward and returned the corrupt metric at every position, without a word)
    for bad in (dict(bucket_size=-1), dict(bucket_size=0), dict(chunk_size=0), dict(bucket_size=2.5),
                dict(bucket_size=True)):
        with pytest.raises(ValueError, match=f"{next(iter(bad))} must be None or an integer >= 1"):
            patch_heads(model, pairs, progress=False, **bad)
    import numpy as np
    numpy_sized = patch_heads(model, pairs, keep_incorrect=True, progress=False, bucket_size=np.int64(2))
    assert_raw_close(numpy_sized, ref)  # (a numpy integer is an integer)


def test_a_model_that_does_not_pass_the_mask_on_runs_examples_one_at_a_time():
    """Merged rows are told apart by the 4D mask the model hands every block; where a block gets another one (here
    a user's hook copies it), the sweep warns and runs the group's examples one at a time, with the same numbers."""
    model = model_of("gpt2")
    pairs = make_pairs(14, model)

    def copy_mask(module, args, kwargs):
        return tuple(a.clone() if isinstance(a, torch.Tensor) and a.dim() == 4 else a for a in args), kwargs
    handles = [block.register_forward_pre_hook(copy_mask, with_kwargs=True) for block in model.transformer.h]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = patch_sites_reference(model, pairs, "heads", keep_incorrect=True)
        with pytest.warns(RuntimeWarning, match="one at a time"):
            fast = patch_heads(model, pairs, keep_incorrect=True, progress=False, examples_per_forward=3)
    finally:
        for h in handles:
            h.remove()
    assert fast.stats["max_examples_per_forward"] == 1
    assert_raw_close(fast, ref)
