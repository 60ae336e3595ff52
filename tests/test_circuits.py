"""helpers.circuits: multi-cell patching against its plain reference for every family, the faithfulness curves, the
attention probabilities, and the circuit object of a result."""
import dataclasses
import json
import math
import random

import pytest
import torch

from helpers.circuits import Cell, faithfulness_curves, patch_cell_sets, patch_cell_sets_reference
from helpers.circuits.attention import attention_probabilities, eager_attention, head_attention, token_roles
from helpers.circuits.faithfulness import random_pool, ranked_cells
from helpers.models.architectures import head_geometry
from helpers.models.tiny_models import TINY_FAMILIES, tiny_model
from helpers.tinysql import make_pairs


@pytest.fixture(scope="module")
def pairs(project_tokenizer):
    return make_pairs("DEFFIELDNAME", project_tokenizer, cs_num=1, batch_size=3, seed=2)


def _first(pair) -> int:
    return next(i for i, (a, b) in enumerate(zip(pair.clean_ids, pair.corrupt_ids)) if a != b)


def _sets(geo, pairs, seed=0):
    """Random sets of cells at or after the corruption (end-aligned columns), of several sizes, and the empty set."""
    T = max(len(p.clean_ids) for p in pairs)
    start = min(T - len(p.clean_ids) + _first(p) for p in pairs)
    rng = random.Random(seed)
    cells = [Cell(l, h, c) for l in range(geo.n_layers) for h in range(geo.n_heads) for c in range(start, T)]
    return [[]] + [rng.sample(cells, k) for k in (1, 2, 5, 17)]


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("direction", ["sufficiency", "necessity"])
def test_cell_sets_match_the_reference(family, direction, project_tokenizer, pairs):
    model = tiny_model(family, vocab_size=len(project_tokenizer))
    sets = _sets(head_geometry(model.config), pairs)
    fast = patch_cell_sets(model, pairs, sets, direction, keep_incorrect=True, min_denominator=0.0)
    ref = patch_cell_sets_reference(model, pairs, sets, direction, keep_incorrect=True, min_denominator=0.0)
    assert torch.isfinite(fast.patched_logit_diff).all()
    assert torch.allclose(fast.patched_logit_diff, ref.patched_logit_diff, atol=1e-5, rtol=0)
    # the empty set changes nothing: the corrupt run (sufficiency) or the clean run (necessity)
    base = fast.corrupt_logit_diff if direction == "sufficiency" else fast.clean_logit_diff
    assert torch.allclose(fast.patched_logit_diff[0], base, atol=1e-5)
    # the sets do something (the test would pass on a no-op otherwise)
    assert (fast.patched_logit_diff[1:] - base).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["gpt_neo", "llama"])
def test_every_cell_at_once_is_the_joint_patch_of_every_head(family, project_tokenizer, pairs):
    """Sufficiency of all cells = the corrupt run with every head's clean z at every position (the reference);
    necessity of all cells likewise from the clean run."""
    model = tiny_model(family, vocab_size=len(project_tokenizer))
    geo = head_geometry(model.config)
    T = max(len(p.clean_ids) for p in pairs)
    every = [[Cell(l, h, c) for l in range(geo.n_layers) for h in range(geo.n_heads) for c in range(T)]]
    for direction in ("sufficiency", "necessity"):
        fast = patch_cell_sets(model, pairs, every, direction, keep_incorrect=True, min_denominator=0.0)
        ref = patch_cell_sets_reference(model, pairs, every, direction, keep_incorrect=True, min_denominator=0.0)
        assert torch.allclose(fast.patched_logit_diff, ref.patched_logit_diff, atol=1e-5, rtol=0)


def test_cells_before_the_corruption_change_nothing(project_tokenizer, pairs):
    model = tiny_model("llama", vocab_size=len(project_tokenizer))
    T = max(len(p.clean_ids) for p in pairs)
    early = [[Cell(l, h, c) for l in range(2) for h in range(4) for c in range(T - len(p.clean_ids) + _first(p))]
             for p in pairs[:1]]
    res = patch_cell_sets(model, pairs[:1], early, "sufficiency", keep_incorrect=True, min_denominator=0.0)
    assert torch.allclose(res.patched_logit_diff[0], res.corrupt_logit_diff, atol=1e-5)


def test_scores_are_normalised_by_direction(project_tokenizer, pairs):
    model = tiny_model("gpt2", vocab_size=len(project_tokenizer))
    sets = _sets(head_geometry(model.config), pairs)
    for direction in ("sufficiency", "necessity"):
        r = patch_cell_sets(model, pairs, sets, direction, keep_incorrect=True, min_denominator=0.0)
        gap = r.clean_logit_diff - r.corrupt_logit_diff
        want = ((r.patched_logit_diff - r.corrupt_logit_diff) / gap if direction == "sufficiency"
                else (r.clean_logit_diff - r.patched_logit_diff) / gap)
        assert torch.allclose(r.scores, want, atol=1e-6)
        assert torch.allclose(r.mean(), want.mean(1), atol=1e-6)


def test_cell_sets_and_edges_warn_for_each_example_whose_denominator_is_too_small(project_tokenizer, pairs):
    """Scores of an example whose |clean - corrupt| is below min_denominator are NaN, so means leave it out: each
    such example is named in a warning, as the head sweep does (cell sets, edges and edge estimates said nothing)."""
    import re
    import warnings

    from helpers.circuits.edge_attribution import edge_attribution
    from helpers.circuits.path_patching import all_edges, path_patching

    model = tiny_model("llama", vocab_size=len(project_tokenizer))
    T = max(len(p.clean_ids) for p in pairs)
    edges = all_edges([Cell(0, 1, T - 1)], [(1, 0)], answer_column=T - 1)
    calls = (lambda md: patch_cell_sets(model, pairs, [[Cell(0, 1, T - 1)]], keep_incorrect=True, min_denominator=md),
             lambda md: path_patching(model, pairs, edges, keep_incorrect=True, min_denominator=md),
             lambda md: edge_attribution(model, pairs, edges, keep_incorrect=True, min_denominator=md))
    for call in calls:
        res = call(0.0)
        gap = (res.clean_logit_diff - res.corrupt_logit_diff).abs().double()
        limit = float(gap.sort().values[1])  # the smallest example falls below it, the others do not
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            res = call(limit)
        named = {int(re.match(r"example (\d+):", str(w.message)).group(1)) for w in caught
                 if "min_denominator" in str(w.message)}
        assert named == {int(gap.argmin())}
        assert res.scores.isnan().all(dim=-1 if res.scores.shape[0] == len(pairs) else 0)[int(gap.argmin())]


def test_bad_input_is_refused(project_tokenizer, pairs):
    model = tiny_model("llama", vocab_size=len(project_tokenizer))
    with pytest.raises(ValueError, match="unknown direction"):
        patch_cell_sets(model, pairs, [[Cell(0, 0, 5)]], "sideways")
    with pytest.raises(ValueError, match="outside the model"):
        patch_cell_sets(model, pairs, [[Cell(7, 0, 5)]])
    with pytest.raises(ValueError, match="outside the model"):
        patch_cell_sets(model, pairs, [[Cell(0, 0, 10_000)]])


def test_ranked_cells_and_the_random_pool():
    mean = torch.tensor([[[0.1, float("nan"), 0.5], [0.9, 0.2, -0.3]]])  # [layer 1, head 2, column 3]
    count = torch.tensor([[[4, 0, 4], [4, 1, 4]]])
    assert ranked_cells(mean) == [Cell(0, 1, 0), Cell(0, 0, 2), Cell(0, 1, 1), Cell(0, 0, 0), Cell(0, 1, 2)]
    assert Cell(0, 1, 1) not in ranked_cells(mean, count)  # a column only 1 of 4 examples reach
    pool = random_pool(2, 3, first_columns=[5, 6, 9], n_columns=10)
    assert {c.position for c in pool} == {6, 7, 8, 9} and len(pool) == 2 * 3 * 4


def test_faithfulness_curves(project_tokenizer, pairs):
    model = tiny_model("qwen2", vocab_size=len(project_tokenizer))
    from helpers.patching import patch_heads
    sweep = patch_heads(model, pairs, keep_incorrect=True, progress=False, min_denominator=0.0)
    # end-align the per-example sweep as the experiment does
    T = max(len(p.clean_ids) for p in pairs)
    aligned = torch.full_like(sweep.normalised, float("nan"))
    for i, p in enumerate(pairs):
        aligned[i, ..., T - len(p.clean_ids):] = sweep.normalised[i, ..., :len(p.clean_ids)]
    mean = torch.nanmean(aligned, 0)
    kw = dict(k_max=6, n_random=3, seed=5, keep_incorrect=True, min_denominator=0.0)
    a = faithfulness_curves(model, pairs, mean, **kw)
    b = faithfulness_curves(model, pairs, mean, **kw)
    assert a.k[:6] == [1, 2, 3, 4, 5, 6] and len(a.sufficiency) == len(a.necessity) == len(a.k)
    assert a.cells[:6] == ranked_cells(mean)[:6]
    assert all(math.isfinite(x) for x in a.sufficiency + a.necessity + a.random_sufficiency_mean)
    assert a.random_sufficiency_mean == b.random_sufficiency_mean  # seeded
    # S_1's sufficiency is the single-cell patch of the head sweep (same cell, same examples)
    top = a.cells[0]
    assert math.isclose(a.sufficiency[0], float(mean[top.layer, top.head, top.position]), abs_tol=1e-4)
    reached = [k for k, v in zip(a.k, a.sufficiency) if v >= 0.8]
    assert a.k80_sufficiency == (reached[0] if reached else None)
    # each point of both curves is the plain reference's patch of the top k cells (the necessity curve was only
    # checked for its length: computing it as sufficiency passed)
    ref_kw = dict(n_columns=T, keep_incorrect=True, min_denominator=0.0)
    for k in (1, 4):
        top_k = [a.cells[:k]]
        for direction, curve in (("sufficiency", a.sufficiency), ("necessity", a.necessity)):
            ref = patch_cell_sets_reference(model, pairs, top_k, direction, **ref_kw)
            # (normalised by small denominators: 1e-6 logits of float32 become ~1e-5 of a score)
            assert math.isclose(curve[k - 1], float(ref.mean()[0]), abs_tol=1e-4), (direction, k)
    json.dumps(a.to_dict(), allow_nan=False)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_attention_probabilities_are_causal_distributions(family, project_tokenizer, pairs):
    model = tiny_model(family, vocab_size=len(project_tokenizer))
    p = attention_probabilities(model, pairs[0].clean_ids)
    geo = head_geometry(model.config)
    T = len(pairs[0].clean_ids)
    assert p.shape == (geo.n_layers, geo.n_heads, T, T)
    assert torch.allclose(p.sum(-1), torch.ones(p.shape[:-1]), atol=1e-5)
    assert p.triu(1).abs().max() == 0


def test_attention_probabilities_from_queries_and_keys_gpt2(project_tokenizer, pairs):
    """Recomputed independently for GPT-2 (no rotary): softmax(q k^T / sqrt(d)) under a causal mask."""
    model = tiny_model("gpt2", vocab_size=len(project_tokenizer)).eval()
    geo = head_geometry(model.config)
    ids = torch.tensor([pairs[0].clean_ids])
    store = {}
    h = model.transformer.h[1].attn.c_attn.register_forward_hook(lambda m, a, o: store.setdefault("qkv", o))
    with torch.no_grad():
        model(ids)
    h.remove()
    q, k, _ = store["qkv"][0].split(geo.d_model, dim=-1)
    q = q.view(-1, geo.n_heads, geo.d_head).transpose(0, 1)
    k = k.view(-1, geo.n_heads, geo.d_head).transpose(0, 1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(geo.d_head)
    T = ids.shape[1]
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    assert torch.allclose(attention_probabilities(model, pairs[0].clean_ids)[1], scores.softmax(-1), atol=1e-5)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_attention_from_captured_queries_and_keys_is_the_eager_formula(family, project_tokenizer, pairs):
    """The captured-q/k route against the eager modules' own probability output (GPT-Neo takes that route itself)."""
    from helpers.circuits.attention import _eager_module_probabilities, goes_through_interface

    model = tiny_model(family, vocab_size=len(project_tokenizer))
    assert goes_through_interface(model) == (family != "gpt_neo")
    ids = torch.tensor([pairs[0].clean_ids])
    assert torch.allclose(attention_probabilities(model, pairs[0].clean_ids),
                          _eager_module_probabilities(model, ids), atol=1e-5)


def test_sdpa_and_sliding_window_models_are_read_from_their_own_forward(project_tokenizer, pairs):
    """An sdpa-loaded model keeps its implementation (no switch to eager) and reads as its eager twin; a Qwen2 model
    whose second layer has a 4-token sliding window gets the window (keys further back: probability 0)."""
    from transformers import Qwen2Config

    from helpers.circuits.attention import _eager_module_probabilities
    from helpers.models.tiny_models import build_random_model

    model = tiny_model("llama", vocab_size=len(project_tokenizer))
    eager = attention_probabilities(model, pairs[0].clean_ids)
    model.config._attn_implementation = "sdpa"
    seen = []
    h = model.model.layers[0].self_attn.register_forward_pre_hook(
        lambda m, a: seen.append(model.config._attn_implementation))
    sdpa = attention_probabilities(model, pairs[0].clean_ids)
    h.remove()
    assert seen == ["sdpa"] and model.config._attn_implementation == "sdpa"
    assert torch.allclose(sdpa, eager, atol=1e-6)
    with eager_attention(model):
        assert model.config._attn_implementation == "eager"
    assert model.config._attn_implementation == "sdpa"

    config = Qwen2Config(vocab_size=len(project_tokenizer), hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, use_sliding_window=True,
                         sliding_window=4, max_window_layers=1)
    model = build_random_model(config)
    p = attention_probabilities(model, pairs[0].clean_ids)
    T = p.shape[-1]
    far = torch.ones(T, T, dtype=torch.bool).tril(-4)  # keys 4 or more positions back
    assert p[0][:, far].max() > 0.01 and p[1][:, far].max() == 0
    assert torch.allclose(p, _eager_module_probabilities(model, torch.tensor([pairs[0].clean_ids])), atol=1e-5)


def test_head_attention_by_role(project_tokenizer, pairs):
    model = tiny_model("gpt_neo", vocab_size=len(project_tokenizer))
    tokens = [[project_tokenizer.decode([i]) for i in p.clean_ids] for p in pairs]
    roles = token_roles(tokens[0], pairs[0].corrupted_position)
    assert roles[pairs[0].corrupted_position] == "corrupted name" and "SELECT" in roles and "Context text" in roles
    (out,) = head_attention(model, pairs, tokens, [(1, 2)], ("corrupted",))
    for side in ("clean", "corrupt"):
        assert math.isclose(sum(out.by_role[side].values()), 1.0, abs_tol=1e-5)
        assert [len(row) for row in getattr(out, side)] == [p.corrupted_position + 1 for p in pairs]
        # the rows are that head's attention from the corrupted position, in that run (not a neighbouring head's,
        # not the other run's: the sums and lengths alone passed either)
        for p, row in zip(pairs, getattr(out, side)):
            q = p.corrupted_position
            probs = attention_probabilities(model, p.clean_ids if side == "clean" else p.corrupt_ids)
            assert torch.allclose(torch.as_tensor(row, dtype=probs.dtype), probs[1, 2, q, :q + 1], atol=1e-6)


def test_head_attention_refuses_tokens_heads_and_queries_that_do_not_fit(project_tokenizer, pairs):
    """Review findings: fewer token lists than pairs dropped examples (by_role summed to 2/3), short token lists
    dropped positions (by_role 0), head -1 was head 3 under another label, an unknown query meant "corrupted"."""
    from helpers.circuits.attention import head_attention

    model = tiny_model("gpt_neo", vocab_size=len(project_tokenizer))
    tokens = [[project_tokenizer.decode([i]) for i in p.clean_ids] for p in pairs]
    for bad in (tokens[:2], [t[:10] for t in tokens]):
        with pytest.raises(ValueError, match="token texts"):
            head_attention(model, pairs, bad, [(1, 2)])
    for heads in ([(1, -1)], [(1, 7)], [(2, 0)]):
        with pytest.raises(ValueError, match="outside the model"):
            head_attention(model, pairs, tokens, heads)
    with pytest.raises(ValueError, match="unknown queries"):
        head_attention(model, pairs, tokens, [(1, 2)], ("corrupt",))
    (ok,) = head_attention(model, pairs, tokens, [(1, 2)])
    assert abs(sum(ok.by_role["clean"].values()) - 1) < 1e-5

def test_the_result_json_carries_the_circuit_and_redraws_it(tmp_path):
    from test_notebooks import model_settings

    from helpers.circuits import figures
    from helpers.experiments import run_experiment, save_experiment
    from helpers.experiments.result_json import experiment_to_dict, load_results

    exp = run_experiment(feature_name="DEFTABLENAME", progress=False, generate=False, **model_settings())
    saved = save_experiment(exp, tmp_path, png=False)
    data = load_results(saved["json"])
    circuit = data["circuit"]
    assert data["metadata"]["settings"]["circuit"] is True
    assert circuit["edges_computed"] is True and circuit["edges"]
    scores = [abs(e["score"]) for e in circuit["edges"] if e["score"] is not None]
    assert scores == sorted(scores, reverse=True)  # strongest first
    assert {"sender", "receiver", "input", "score", "std", "n", "attribution"} == set(circuit["edges"][0])
    assert -1 <= circuit["edge_attribution_error"]["correlation"] <= 1
    assert circuit["receivers"] and {"layer", "head"} == set(circuit["receivers"][0])
    f = circuit["faithfulness"]
    assert f["k"][0] == 1 and len(f["sufficiency"]) == len(f["necessity"]) == len(f["random_sufficiency_mean"])
    assert [a["query"] for a in circuit["attention"]][:2] == ["answer", "corrupted"]  # a Def* feature
    assert figures.faithfulness_figure(circuit).data and figures.attention_roles_figure(circuit).data
    # an example's token labels name the heatmap's columns: a shorter example's first token is a later column
    tokens = exp.tokens[0]
    labels = figures.attention_example_figure(circuit, tokens, first_column=3).data[0].x
    assert list(labels) == [f"{t.strip() or repr(t)}_{3 + i}" for i, t in enumerate(tokens)]
    # the heatmap's labels name the same columns (the reference example's tokens, "*" on mixed columns)
    ref = exp.reference
    drawn = figures.attention_example_figure(circuit, exp.tokens[ref], first_column=exp.offset(ref)).data[0].x
    assert list(drawn) == [label.replace("*", "") for label in exp.token_labels()]
    # the reading guide every notebook shows names the corrupted token's attention only where it is drawn
    assert "(and from the corrupted token)" in figures.reading_guide(circuit)
    answer_only = {**circuit, "attention": [a for a in circuit["attention"] if a["query"] == "answer"]}
    assert "corrupted token)" not in figures.reading_guide(answer_only)
    assert saved["faithfulness_html"].is_file() and saved["attention_html"].is_file()
    assert "Smallest k reaching 80 %" in exp.circuit.summary(exp.token_labels())
    off = run_experiment(feature_name="DEFTABLENAME", progress=False, generate=False, circuit="False",
                         **model_settings())
    assert off.circuit is None and experiment_to_dict(off)["circuit"] is None and "circuit_s" not in off.timings


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_path_patching_matches_the_reference(family, project_tokenizer, pairs):
    """Every input (q, k, v, logits), receivers in a middle and in the last layer, senders before and after the
    corruption (the last layer's query edges from other positions than the answer are the corrupt run without a
    forward); GQA (llama, qwen2, granite) and GPT-Neo's local layers included (4 layers: two local ones)."""
    from helpers.circuits.path_patching import all_edges, path_patching, path_patching_reference

    model = tiny_model(family, vocab_size=len(project_tokenizer), n_layers=4)
    if family == "granitemoe":  # (no float64 check below: attention sharp enough for float32 to see q and k)
        _sharpen_attention(model)
    geo = head_geometry(model.config)
    T = max(len(p.clean_ids) for p in pairs)
    rng = random.Random(1)
    cells = [Cell(l, h, c) for l in range(3) for h in range(geo.n_heads) for c in (2, T - 8, T - 3, T - 1)]
    senders = rng.sample(cells, 8) + [Cell(0, 1, T - 1), Cell(2, 0, T - 1), Cell(1, 1, T - 2)]
    senders += [Cell(0, h, T - 3) for h in range(geo.n_heads)]
    edges = all_edges(senders, [(1, 2), (3, 1)], answer_column=T - 1)
    assert {e.input for e in edges} == {"q", "k", "v", "logits"}
    ref = path_patching_reference(model, pairs, edges, keep_incorrect=True, min_denominator=0.0)
    # small chunks in the default buckets; one bucket per sender token, chunks from the memory estimate; the plain
    # HF modules (llama-like families otherwise run the fused ones, the receiver's input edited in their q|k|v)
    for kw in ({"rows_per_forward": 7}, {"bucket_size": 1}, {"fused": False}):
        fast = path_patching(model, pairs, edges, keep_incorrect=True, min_denominator=0.0, **kw)
        assert torch.equal(fast.patched_logit_diff.isnan(), ref.patched_logit_diff.isnan())
        assert torch.allclose(fast.patched_logit_diff.nan_to_num(), ref.patched_logit_diff.nan_to_num(), atol=1e-5,
                              rtol=0)
    if family == "granitemoe":  # (its expert matmul has no float64 kernel): q and k edges well above the tolerance
        effect = (ref.patched_logit_diff - ref.corrupt_logit_diff[:, None]).nan_to_num().abs()
        for part in ("q", "k"):
            assert effect[:, [i for i, e in enumerate(edges) if e.input == part]].max() > 1e-4, part
        return
    # A random model's edge effects are often ~1e-5 logits, the size of the float32 tolerance. In float64 the same
    # comparison tells them apart: e.g. a middle layer's query edges from before the answer position act, their
    # change flowing on through later layers (in the last layer they would not).
    model.double()
    ref = path_patching_reference(model, pairs, edges, keep_incorrect=True, min_denominator=0.0)
    effect = (ref.patched_logit_diff - ref.corrupt_logit_diff[:, None]).nan_to_num()
    mid_q = [i for i, e in enumerate(edges) if e.input == "q" and e.receiver == (1, 2) and e.sender.position == T - 3]
    assert effect[:, mid_q].abs().max() > 4e-10
    for fused in (True, False):
        fast = path_patching(model, pairs, edges, keep_incorrect=True, min_denominator=0.0, rows_per_forward=5,
                             fused=fused)
        dev = (fast.patched_logit_diff - ref.patched_logit_diff).nan_to_num().abs().max()
        # (gpt_neo's attention computes in float32 even here: deviations ~5e-10 against effects ~1e-7)
        assert dev < 0.02 * effect[:, mid_q].abs().max()


def test_a_receiver_in_layer_0_has_no_senders():
    from helpers.circuits.path_patching import all_edges

    assert all_edges([Cell(0, 1, 5), Cell(1, 0, 7)], [(0, 2)]) == []
    assert [e.input for e in all_edges([Cell(0, 1, 9)], [(0, 2)], answer_column=9)] == ["logits"]


def test_the_receiver_norm_is_recomputed_from_the_modified_input():
    """RMSNorm(x + a x) = RMSNorm(x): a recomputed scale sees only the direction; a frozen one would not."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from helpers.circuits.path_patching import receiver_input

    norm = LlamaRMSNorm(16)
    x = torch.randn(3, 16)
    assert torch.allclose(receiver_input(norm, x, 2 * x), norm(x), atol=1e-6)
    delta = torch.randn(3, 16)
    assert torch.allclose(receiver_input(norm, x, delta), norm(x + delta))
    frozen = (x + delta) * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon) * norm.weight
    assert not torch.allclose(receiver_input(norm, x, delta), frozen, atol=1e-3)


@pytest.mark.parametrize("family", ["llama", "gpt_neo"])
def test_path_patching_and_cell_sets_match_their_references_on_examples_of_different_lengths(family,
                                                                                           project_tokenizer):
    """Examples of two lengths, corrupted at different tokens, end-aligned in one frame (the fixture's pairs have
    one length): senders in columns that the shorter examples lack, and before either corruption."""
    from helpers.circuits.cell_patching import patch_cell_sets, patch_cell_sets_reference
    from helpers.circuits.path_patching import all_edges, path_patching, path_patching_reference

    mixed = (make_pairs("DEFFIELDNAME", project_tokenizer, cs_num=1, batch_size=2, seed=3)
             + make_pairs("DEFFIELDNAME", project_tokenizer, cs_num=2, batch_size=2, seed=3))
    lengths = sorted({len(p.clean_ids) for p in mixed})
    assert len(lengths) == 2 and len({p.corrupted_position for p in mixed}) == 2
    T = lengths[-1]
    model = tiny_model(family, vocab_size=len(project_tokenizer), n_layers=4)
    heads = head_geometry(model.config).n_heads
    senders = [Cell(l, h, c) for l in range(3) for h in (0, heads - 1) for c in (1, T - lengths[0] + 2, T - 8, T - 1)]
    edges = all_edges(senders, [(1, 2), (3, 1)], answer_column=T - 1)
    kw = dict(keep_incorrect=True, min_denominator=0.0)
    ref = path_patching_reference(model, mixed, edges, **kw)
    assert ref.patched_logit_diff.isnan().any() and not ref.patched_logit_diff.isnan().all()  # columns some lack
    for options in ({}, {"bucket_size": 1}):
        fast = path_patching(model, mixed, edges, **options, **kw)
        assert torch.equal(fast.patched_logit_diff.isnan(), ref.patched_logit_diff.isnan())
        assert torch.allclose(fast.patched_logit_diff.nan_to_num(), ref.patched_logit_diff.nan_to_num(), atol=1e-5,
                              rtol=0)
    rng = random.Random(0)
    cells = [Cell(l, h, c) for l in range(4) for h in range(heads) for c in range(T - 25, T)]
    sets = [rng.sample(cells, k) for k in (1, 10, 40)]
    for direction in ("sufficiency", "necessity"):
        fast = patch_cell_sets(model, mixed, sets, direction, **kw)
        ref = patch_cell_sets_reference(model, mixed, sets, direction, **kw)
        assert torch.allclose(fast.patched_logit_diff, ref.patched_logit_diff, atol=1e-5, rtol=0)


def test_path_patching_refuses_bad_edges(project_tokenizer, pairs):
    from helpers.circuits.path_patching import Edge, path_patching

    model = tiny_model("llama", vocab_size=len(project_tokenizer))
    with pytest.raises(ValueError, match="later layer"):
        path_patching(model, pairs, [Edge(Cell(1, 0, 5), (1, 2), "q")])
    with pytest.raises(ValueError, match="unknown input"):
        path_patching(model, pairs, [Edge(Cell(0, 0, 5), (1, 2), "o")])
    with pytest.raises(ValueError, match="no receiver head"):
        path_patching(model, pairs, [Edge(Cell(0, 0, 5), (1, 2), "logits")])
    with pytest.raises(ValueError, match="no receiver head"):
        path_patching(model, pairs, [Edge(Cell(0, 0, 5), None, "q")])


@pytest.mark.parametrize("kernel", ["path_patching", "path_patching_reference", "edge_attribution"])
def test_edges_from_cells_outside_the_model_or_frame_are_refused(project_tokenizer, pairs, kernel):
    """Review findings: negative layers and heads meant the last ones (and the fast path and its reference disagreed
    on head -1), an out-of-range position scored NaN, a logits edge from a position other than the answer got a
    score for a path that does not exist, and a narrow frame moved every sender onto another token."""
    from helpers.circuits import edge_attribution as EA, path_patching as PP
    from helpers.circuits.path_patching import Edge

    fn = getattr(EA if kernel == "edge_attribution" else PP, kernel)
    model = tiny_model("llama", vocab_size=len(project_tokenizer))
    T = len(pairs[0].clean_ids)
    for sender in (Cell(-1, 0, T - 1), Cell(0, -1, 5), Cell(0, 4, 5), Cell(0, 0, T), Cell(0, 0, -3)):
        edge = Edge(sender, None, "logits") if sender.layer < 0 else Edge(sender, (1, 2), "v")
        with pytest.raises(ValueError, match="outside the model"):
            fn(model, pairs, [edge], keep_incorrect=True)
    with pytest.raises(ValueError, match="reaches the logits"):
        fn(model, pairs, [Edge(Cell(0, 0, T - 8), None, "logits")], keep_incorrect=True)
    with pytest.raises(ValueError, match="shorter than the longest example"):
        fn(model, pairs, [Edge(Cell(0, 1, 5), (1, 2), "k")], n_columns=T - 6, keep_incorrect=True)


def test_the_edges_graph_and_table_redraw_from_a_circuit_dict():
    from helpers.circuits import figures

    cell = {"layer": 0, "head": 1, "position": 3}
    circuit = {"edges_computed": True, "edges": [
        {"sender": cell, "receiver": {"layer": 1, "head": 0}, "input": "q", "score": 0.5, "std": 0.1, "n": 3},
        {"sender": cell, "receiver": None, "input": "logits", "score": -0.2, "std": None, "n": 1},
        {"sender": cell, "receiver": {"layer": 1, "head": 2}, "input": "v", "score": None, "std": None, "n": 0}]}
    table = figures.edges_table(circuit, [f"t{i}" for i in range(5)])
    assert table["receiver"].tolist() == ["L1H0", "logits"] and table["at"].tolist() == ["t3", "t3"]
    fig = figures.circuit_graph_figure(circuit, n_layers=2)
    nodes = next(t for t in fig.data if t.mode == "markers+text" and "L0H1@pos 3" in t.text)
    assert "L1H0" in nodes.text  # a receiver: no position
    other = {**cell, "position": 4}
    two = {"edges_computed": True, "edges": circuit["edges"][:2] + [
        {"sender": other, "receiver": {"layer": 1, "head": 0}, "input": "k", "score": 0.1, "std": 0.0, "n": 3}]}
    labelled = figures.circuit_graph_figure(two, n_layers=2, position_labels=[f"t{i}" for i in range(5)])
    assert any("L0H1@t3, t4" in (t.text or ()) for t in labelled.data if t.mode == "markers+text")
    lines = [t for t in fig.data if t.mode == "lines" and t.x[0] is not None]
    assert len(lines) == 2 and lines[1].line.dash == "dot" and lines[0].line.width > lines[1].line.width
    assert figures.circuit_graph_figure({"edges": []}, n_layers=2) is None


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_edge_attribution_estimates_path_patching(family, project_tokenizer, pairs):
    """EAP is the first-order estimate of path patching: on a random model, whose effects are small, it must agree
    closely (a wrong gradient route, e.g. through the layer's other heads or the wrong position, does not)."""
    from helpers.circuits.edge_attribution import edge_attribution
    from helpers.circuits.path_patching import all_edges, path_patching
    from helpers.patching.attribution import attribution_error

    model = tiny_model(family, vocab_size=len(project_tokenizer), n_layers=4)
    # Each input on its own: the logits edges' effects (~1e-2) dwarf q's and k's (~1e-6 in a random float32 model),
    # so together they hid a broken q/k route. In float64 (granitemoe: no float64 expert kernel, its attention
    # sharpened instead) every input's effects stand well above rounding.
    if family == "granitemoe":
        _sharpen_attention(model)
    else:
        model.double()
    geo = head_geometry(model.config)
    T = max(len(p.clean_ids) for p in pairs)
    senders = [Cell(l, h, c) for l in range(3) for h in range(geo.n_heads) for c in (T - 8, T - 3, T - 1)]
    edges = all_edges(senders, [(1, 2), (3, 1)], answer_column=T - 1)
    exact = path_patching(model, pairs, edges, keep_incorrect=True, min_denominator=0.0)
    estimate = edge_attribution(model, pairs, edges, keep_incorrect=True, min_denominator=0.0)
    error = attribution_error(estimate, exact)
    sharp = 0.03 if family == "granitemoe" else 0.02  # (sharper attention: larger second-order terms)
    assert error["correlation"] > 0.99 and error["top_k_overlap"] == 1.0 and error["relative_max_error"] < sharp
    for part in ("q", "k", "v", "logits"):
        idx = [i for i, e in enumerate(edges) if e.input == part]
        part_error = attribution_error(*(dataclasses.replace(r, patched_logit_diff=r.patched_logit_diff[:, idx])
                                         for r in (estimate, exact)))
        assert part_error["correlation"] > 0.98 and part_error["top_k_overlap"] >= 0.9, (part, part_error)


def _sharpen_attention(model, scale: float = 8.0) -> None:
    """Queries and keys x ``scale`` (scores x scale^2): a random tiny model's nearly uniform attention makes its q
    and k edges' effects ~1e-6, below float32's tolerance; sharpened, they are ~1e-3."""
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(scale)
            layer.self_attn.k_proj.weight.mul_(scale)


def test_the_circuit_section_checks_its_model_and_settings_and_reads_its_own_settings():
    """Review findings: a model other than the experiment's was scored without complaint (another geometry, or
    another command set's weights of the same shape); k_max 0 and negative counts were accepted (a negative
    n_receivers sliced from the end); layer-0 receivers wasted the path-patching slots (no earlier head sends to
    them); the reading guide quoted the default settings whatever the circuit's; the summary labelled its edges by
    column number beside cells labelled by token."""
    from test_notebooks import model_settings

    from helpers.circuits import analyse_circuit, check_same_model, figures
    from helpers.experiments import run_experiment
    from helpers.models import load_model, resolve_model
    from helpers.models.tiny_models import tiny_model

    settings = model_settings()
    exp = run_experiment(feature_name="ENGTABLENAME", progress=False, generate=False, circuit=False, **settings)
    loaded = load_model(exp.spec, dtype=torch.float32, device="cpu", wrap=False)
    geo = exp.geometry
    with pytest.raises(ValueError, match="not the one the experiment ran on"):
        check_same_model(exp, tiny_model("llama", vocab_size=len(exp.tokenizer), n_layers=geo.n_layers + 1), 0)
    same_shape = load_model(exp.spec, dtype=torch.float32, device="cpu", wrap=False).hf_model
    with torch.no_grad():  # other weights of the same geometry
        for p in same_shape.parameters():
            p.add_(0.05 * torch.randn_like(p))
    with pytest.raises(ValueError, match="logit differences are"):
        check_same_model(exp, same_shape, 0)
    for bad, message in ((dict(k_max=0), "k_max must be an integer >= 1"),
                         (dict(n_receivers=-1), "n_receivers must be an integer >= 0"),
                         (dict(n_random=1.5), "n_random must be an integer"),
                         (dict(n_senders=0), "n_senders must be an integer >= 1"),
                         (dict(threshold=float("nan")), "threshold must be a finite number")):
        with pytest.raises(ValueError, match=message):
            analyse_circuit(exp, loaded.hf_model, **bad)
    reloaded = analyse_circuit(exp, k_max=1, n_random=0, n_attention_heads=0, edges=False)  # loads exp's model
    assert reloaded.faithfulness.k[0] == 1 and not reloaded.edges_computed
    circuit = analyse_circuit(exp, loaded, k_max=3, n_random=2, n_receivers=2, n_attention_heads=1)  # a LoadedModel
    assert circuit.receivers and all(r["layer"] >= 1 for r in circuit.receivers) and len(circuit.receivers) <= 2
    assert circuit.edges and any(e["receiver"] is not None for e in circuit.edges)
    guide = figures.reading_guide(circuit.to_dict())
    assert "k = 1..3" in guide and "2 seeded draws" in guide and "1 head of the top cells" in guide
    assert "2 top heads at the answer position" in guide and "k = 1..20" not in guide
    labels = exp.token_labels()
    edges_line = circuit.summary(labels).splitlines()[-2 if circuit.edge_attribution_error else -1]
    assert edges_line.startswith("Strongest edges") and "@pos " not in edges_line
    assert any(f"@{label} ->" in edges_line for label in labels)


def test_edges_take_tuples_and_name_a_receiver_outside_the_model(project_tokenizer, pairs):
    from helpers.circuits import Edge, all_edges
    from helpers.circuits.path_patching import path_patching

    model = tiny_model("llama", vocab_size=len(project_tokenizer))
    heads = head_geometry(model.config).n_heads
    assert Edge((0, 1, 5), [1, 2], "q") == Edge(Cell(0, 1, 5), (1, 2), "q")
    with pytest.raises(TypeError, match="sender is a Cell"):
        Edge((0, 1), (1, 2), "q")
    with pytest.raises(TypeError, match="receiver is a"):
        Edge(Cell(0, 1, 5), (1, 2, 3), "q")
    assert all_edges([(0, 1, 5)], [(1, 0)], inputs=("v",)) == [Edge(Cell(0, 1, 5), (1, 0), "v")]
    with pytest.raises(ValueError, match="unknown inputs"):
        all_edges([Cell(0, 1, 5)], [(1, 0)], inputs=("o",))
    with pytest.raises(ValueError, match=f"head {heads}\\) is outside the model"):
        path_patching(model, pairs, [Edge(Cell(0, 0, 5), (1, heads), "q")], keep_incorrect=True)
    with pytest.raises(ValueError, match="no examples"):
        path_patching(model, [], [Edge(Cell(0, 0, 5), (1, 0), "q")])
    with pytest.raises(ValueError, match="no examples"):
        patch_cell_sets(model, [], [[Cell(0, 0, 5)]])


def test_faithfulness_refuses_a_mean_of_another_shape_and_bad_counts(project_tokenizer, pairs):
    model = tiny_model("llama", vocab_size=len(project_tokenizer))
    geo = head_geometry(model.config)
    T = len(pairs[0].clean_ids)
    with pytest.raises(ValueError, match=r"\[layer, head, column\] scores of this model"):
        faithfulness_curves(model, pairs, torch.zeros(geo.n_layers, geo.n_heads + 1, T))
    with pytest.raises(ValueError, match="k_max must be an integer >= 1"):
        faithfulness_curves(model, pairs, torch.zeros(geo.n_layers, geo.n_heads, T), k_max=0)
    with pytest.raises(ValueError, match="n_random must be an integer >= 0"):
        faithfulness_curves(model, pairs, torch.zeros(geo.n_layers, geo.n_heads, T), n_random=-2)
    mean = torch.zeros(geo.n_layers, geo.n_heads, T)
    for columns in ([5], [5, 6, -7], [5, 6, T + 50], [5.5, 6, 7]):  # one per example, inside the frame
        with pytest.raises(ValueError, match="first_columns must give each"):
            faithfulness_curves(model, pairs, mean, first_columns=columns)
    with pytest.raises(ValueError, match="count must have mean's shape"):
        faithfulness_curves(model, pairs, mean, count=torch.ones(1, 1, 1))
    with pytest.raises(ValueError, match="n_columns=0 is shorter"):
        patch_cell_sets(model, pairs, [[Cell(0, 0, 5)]], n_columns=0)


def test_edge_parts_are_checked_and_the_model_check_reads_the_experiments_precision():
    """Second review: dicts and strings became cells of strings; numpy counts were refused; a bf16 experiment
    re-analysed in float32 got float32's tolerance."""
    import numpy as np

    from helpers.circuits import Edge, all_edges
    from helpers.circuits.analysis import _ran_in_half
    from helpers.circuits.faithfulness import check_counts

    for sender in ({"layer": 0, "head": 1, "position": 5}, "015", (0, 1)):
        with pytest.raises(TypeError, match="sender is a Cell"):
            Edge(sender, (1, 2), "q")
    for receiver in ({"layer": 1, "head": 2}, 3, (1, "2")):
        with pytest.raises(TypeError, match="receiver is a"):
            Edge(Cell(0, 1, 5), receiver, "q")
    assert Edge((np.int64(0), 1, 5), (torch.tensor(1), 2), "q") == Edge(Cell(0, 1, 5), (1, 2), "q")
    assert [e.input for e in all_edges([Cell(0, 1, 5)], [(1, 0)], inputs="v")] == ["v"]
    check_counts(1, k_max=np.int64(5))
    with pytest.raises(ValueError, match="k_max must be an integer >= 1"):
        check_counts(1, k_max=np.int64(0))

    class Exp:  # what _ran_in_half reads
        def __init__(self, dtype, device):
            self.model_info = {"dtype": dtype, "device": device}
    assert _ran_in_half(Exp("auto", "cuda:0")) and _ran_in_half(Exp("bfloat16", "cpu"))
    assert not _ran_in_half(Exp("auto", "cpu")) and not _ran_in_half(Exp("float32", "cuda:0"))


def test_the_circuit_section_leaves_small_denominators_to_the_head_sweep():
    """Inside analyse_circuit the cell sets' and edges' small-denominator warnings are silenced: the head sweep has
    named each such example by its own number (the circuit's count only the included ones); other warnings pass."""
    import warnings

    from helpers.circuits.analysis import _named_by_the_head_sweep
    from helpers.patching.result_types import warn_small_denominators

    small = (torch.tensor([1.0, 0.01]), torch.tensor([0.0, 0.0]), torch.tensor([True, True]), 0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warn_small_denominators(*small)
        with _named_by_the_head_sweep():
            warn_small_denominators(*small)
            warnings.warn("another warning")
    assert [str(w.message)[:10] for w in caught] == ["example 1:", "another wa"]
