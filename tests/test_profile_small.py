"""scripts/profile_small.py's idle attribution on a synthetic torch.profiler trace (CPU; no GPU needed)."""

import pytest


def _kernel(name, ts, dur, corr, cat="kernel"):
    return {"cat": cat, "name": name, "ts": ts, "dur": dur, "args": {"correlation": corr}}


def _launch(ts, corr):
    return {"cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": ts, "dur": 2, "args": {"correlation": corr}}


def _frame(name, ts, dur):
    return {"cat": "python_function", "name": name, "ts": ts, "dur": dur}


def test_each_gpu_idle_gap_is_charged_to_the_code_that_launched_the_kernel_ending_it(profile_small_script):
    """Gaps of 40 us before a kernel launched inside helpers' inner() (called by outer(); a torch frame inside it
    is left out of the label), of 20 us before a copy launched in outer() alone, of 20 us before a kernel launched
    outside helpers (labelled with its innermost frame) and of 92 us before a kernel whose launch is not in the
    trace ('?'); a gap of 3 us (below the threshold) is ignored, and kernels overlapping one another (one inside
    another) leave none."""
    ps = profile_small_script
    events = [
        _frame("helpers/patching/a.py(10): outer", 0, 120),
        _frame("helpers/patching/b.py(5): inner", 40, 20),
        _frame("torch/nn/functional.py(7): cat", 44, 3),  # (not ours: the label keeps helpers/ frames)
        _frame("torch/nn/functional.py(9): linear", 150, 10),
        _launch(1, 1), _kernel("k1", 0, 10, 1),
        _launch(45, 2), _kernel("k2", 50, 10, 2),          # gap 40 after k1's end at 10
        _launch(52, 3), _kernel("k3", 55, 20, 3),          # overlaps k2: no gap
        _launch(56, 6), _kernel("k4", 58, 4, 6),           # inside k3: the GPU is busy until k3's end at 75
        _launch(90, 4), _kernel("HtoD", 95, 5, 4, cat="gpu_memcpy"),  # gap 20 after k3's end at 75
        _launch(101, 5), _kernel("k5", 103, 5, 5),         # gap 3: below 5 us
        _kernel("k6", 200, 10, 99),                        # gap 92, its launch not in the trace
        _launch(155, 7), _kernel("k7", 230, 5, 7),         # gap 20, launched in torch's linear alone
    ]
    busy, idle, by_label, count = ps.idle_gaps(events)
    assert busy == pytest.approx((10 + 10 + 20 + 4 + 5 + 5 + 10 + 5) / 1e6)
    assert idle == pytest.approx((40 + 20 + 92 + 20) / 1e6)
    assert by_label["b.py(5): inner < a.py(10): outer"] == pytest.approx(40 / 1e6)
    assert by_label["a.py(10): outer"] == pytest.approx(20 / 1e6)
    assert by_label["?"] == pytest.approx(92 / 1e6)
    assert by_label["torch/nn/functional.py(9): linear"] == pytest.approx(20 / 1e6)
    assert count == {"b.py(5): inner < a.py(10): outer": 1, "a.py(10): outer": 1, "?": 1,
                     "torch/nn/functional.py(9): linear": 1}
    assert ps.idle_gaps([]) == (0.0, 0.0, {}, {})


def test_idle_replaces_the_bucket_scan_and_the_host_profile(profile_small_script, monkeypatch, capsys):
    """``--idle`` reports where the GPU waits instead of the bucket scan and the host's profile (which took minutes
    of a GPU call before the idle report came), and says that it needs CUDA where there is none."""
    import sys

    import torch

    if torch.cuda.is_available():
        pytest.skip("on a GPU the idle report itself runs (profiled)")
    monkeypatch.setattr(sys, "argv", ["profile_small.py", "--quick", "--idle"])
    profile_small_script.main()
    out = capsys.readouterr().out
    cases = out.count("\n== ")
    assert cases >= 3 and out.count("(--idle needs CUDA)") == cases
    assert "buckets " not in out and "cum " not in out
