"""scripts/bench.py's small-model cases run end to end on a tiny model (CPU; timings are the benchmark's, not asserted)."""

import torch

from helpers.models.tiny_models import build_random_model, tiny_config


def test_small_model_cases_report_each_case_against_its_arithmetic(bench_script):
    bench = bench_script
    model = build_random_model(tiny_config("llama", vocab_size=512, n_layers=3), seed=0, dtype=torch.float32)
    cases = (("1 example, T 14", 1, 14, 4), ("3 examples, T 12", 3, 12, 6))
    rows = bench.small_model_cases("tiny llama", model, torch.device("cpu"), torch.Generator().manual_seed(3), 1, cases)
    assert len(rows) == len(cases)
    for row, (label, *_rest) in zip(rows, cases):
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[:3] == ["tiny llama", "fp32", label]
        seconds, bound, ratio = float(cells[3]), float(cells[6]), float(cells[7].rstrip("×"))
        assert seconds > 0 and bound >= 0
        assert int(cells[8]) >= 1  # forwards
        assert cells[9] == "nan%"  # no GPU here: the busy share is not measured
        if bound > 0:
            assert abs(ratio - seconds / bound) <= 0.05 * ratio + 0.1


def test_the_low_precision_deviation_compares_each_examples_sweep_with_float32(bench_script):
    """``--deviation``'s figure: each random pair's bf16 sweep against its own float32 sweep, the mean |difference|
    over their entries; zero for float32 itself; the float32 model left as it was."""
    import copy

    from helpers.patching import patch_heads
    bench = bench_script
    model = build_random_model(tiny_config("llama", vocab_size=512, n_layers=2), seed=0, dtype=torch.float32)
    mean, each, bad = bench.low_precision_deviation(model, torch.Generator().manual_seed(3), 2, 12, 4)
    assert len(each) == 2 and abs(mean - sum(each) / 2) < 1e-12 and each[0] != each[1] and bad == 0
    # the first example by hand: the same pair (the same generator's draws), both sweeps, the mean |difference|
    g = torch.Generator().manual_seed(3)
    corrupted = max(1, 4 + int(torch.randint(-2, 3, (1,), generator=g)))
    pair = bench.make_pair(g, 512, 12, corrupted)
    kw = dict(keep_incorrect=True, progress=False)
    low = copy.deepcopy(model).to(torch.bfloat16)
    by_hand = (patch_heads(low, [pair], **kw).patched_logit_diff.float()
               - patch_heads(model, [pair], **kw).patched_logit_diff.float()).abs().mean()
    assert abs(each[0] - float(by_hand)) < 1e-9 and each[0] > 0  # (bf16 rounds)
    same, zeros, _ = bench.low_precision_deviation(model, torch.Generator().manual_seed(3), 2, 12, 4,
                                                   dtype=torch.float32)
    assert same == 0 and zeros == [0.0, 0.0]
    assert next(model.parameters()).dtype == torch.float32


def test_the_deviation_table_reaches_the_printed_and_written_report(tmp_path, bench_script):
    out = tmp_path / "bench.md"
    bench_script.main(["--quick", "--small-only", "--deviation", "1", "--shapes", "llama", "--device", "cpu", str(out)])
    rows = [line for line in out.read_text().splitlines() if line.startswith("| tiny llama | T ")]
    assert len(rows) == 1 and float(rows[0].split("|")[4]) > 0 and rows[0].rstrip().endswith("| 0 |")


def test_no_block_tails_runs_the_sweeps_with_each_forwards_own_and_says_so(tmp_path, bench_script, monkeypatch,
                                                                        capsys):
    """``--no-block-tails``: every sweep of the run computes each forward's own block tails (the A/B of
    helpers.patching.block_tails), the report's header says so, and the switch is restored afterwards."""
    from helpers.patching import block_tails

    seen = []
    real = bench_script.patch_heads
    monkeypatch.setattr(bench_script, "patch_heads", lambda *a, **k: seen.append(block_tails.ENABLED) or real(*a, **k))
    argv = ["--quick", "--small-only", "--no-small-cases", "--deviation", "1", "--shapes", "llama", "--device", "cpu"]
    bench_script.main(argv + ["--no-block-tails", str(tmp_path / "off.md")])
    assert seen and not any(seen) and block_tails.ENABLED
    assert "block tails per forward" in capsys.readouterr().out
    seen.clear()
    bench_script.main(argv + [str(tmp_path / "on.md")])
    assert seen and all(seen)
    assert "block tails per forward" not in capsys.readouterr().out
