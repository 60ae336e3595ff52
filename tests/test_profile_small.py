"""scripts/profile_small.py on the CPU: its idle attribution on a synthetic torch.profiler trace, and its host
timeline's timers."""

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


def test_host_timeline_times_each_phase_once_a_call_and_puts_the_functions_back(profile_small_script, bench_script):
    """``--host``'s timers: each bucket forward's helpers counted once a bucket (as many as the sweep's forwards, the
    metrics' forward being the one extra model call), nested phases within their callers and every phase within the
    wall time; and the original functions back afterwards, also after a call that raises."""
    import torch

    from helpers.models.tiny_models import build_random_model, tiny_config
    from helpers.patching import bucket_forwards, model_calls, patch_heads, sweep

    ps = profile_small_script
    model = build_random_model(tiny_config("llama", vocab_size=64, n_layers=2), seed=0)
    pairs = [bench_script.make_pair(torch.Generator().manual_seed(0), 64, 14, 6)]
    originals = (sweep.__dict__["unpatched_runs"], bucket_forwards.__dict__["bucket_rows"],
                 model_calls.ModelCalls.__dict__["forward"])
    forwards = []
    run = lambda: forwards.append(  # noqa: E731
        patch_heads(model, pairs, keep_incorrect=True, progress=False, bucket_size=3).stats["forwards"])
    wall, per = ps.host_timeline(run, torch.device("cpu"), reps=2)
    assert forwards[0] == forwards[1] >= 2
    assert per["bucket_forwards.bucket_rows"][1] == per["bucket_forwards.run_chunked"][1] == forwards[0]
    assert per["ModelCalls.forward"][1] == forwards[0] + 1
    assert per["sweep.sweep_group"][0] <= per["sweep._patch_sweep"][0] <= wall
    assert per["bucket_forwards.run_chunked"][0] <= per["sweep.sweep_group"][0]
    assert (sweep.__dict__["unpatched_runs"], bucket_forwards.__dict__["bucket_rows"],
            model_calls.ModelCalls.__dict__["forward"]) == originals

    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        with ps.timed_functions([(sweep, "unpatched_runs")]) as totals:
            assert sweep.unpatched_runs is not originals[0]
            raise Boom
    assert sweep.unpatched_runs is originals[0] and not totals


def test_host_replaces_the_bucket_scan_and_the_host_profile(profile_small_script, bench_script, monkeypatch, capsys):
    """``--host`` prints the host timeline of each case instead of the bucket scan and the cProfile listing."""
    import sys

    ps = profile_small_script
    reports = []
    monkeypatch.setattr(ps, "SMALL_CASES", (("1 example, T 71", 1, 71, 10),))
    llama_only = {k: v for k, v in bench_script.quick_configs().items() if "llama" in k}
    monkeypatch.setattr(ps, "quick_configs", lambda: llama_only)
    monkeypatch.setattr(ps, "host_report", lambda run, device: reports.append(device) or "   (host report)")
    monkeypatch.setattr(sys, "argv", ["profile_small.py", "--quick", "--host"])
    ps.main()
    out = capsys.readouterr().out
    assert out.count("\n== ") == 1 and out.count("(host report)") == 1 and len(reports) == 1
    assert "buckets " not in out and "cum " not in out


def test_kernels_are_sorted_into_kinds_by_their_names(profile_small_script):
    """cuBLAS's GEMMs and the gate/up epilogue are products; torch's elementwise kernels are told apart by their
    functor (an index or copy kernel is not an addition, though both are elementwise); unknown names are "other"."""
    kind = profile_small_script.kernel_kind
    assert kind("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_TNT") == "matrix products"
    assert kind("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_cublas") == "matrix products"
    assert kind("_gate_up_silu_kernel") == "matrix products"
    assert kind("void gemv2T_kernel_val<int, int, __nv_bfloat16, __nv_bfloat16, float, 128, 16, 4, 4>") \
        == "matrix products"
    assert kind("void cublasLt::splitKreduce_kernel<32, 16, int, float, __nv_bfloat16>") == "matrix products"
    assert kind("_row_attention_kernel") == "attention"
    # (torch's own attention kernels name cutlass and gemm types inside: attention, not products)
    assert kind("void pytorch_flash::flash_fwd_kernel<pytorch_flash::Flash_fwd_kernel_traits<64, 128, 128, 4, "
                "false, false, cutlass::bfloat16_t>>") == "attention"
    assert kind("fmha_cutlassF_bf16_aligned_64x64_rf_sm80(PyTorchMemEffAttention::AttentionKernel<"
                "cutlass::bfloat16_t, cutlass::Sm80, true, 64, 64, 64>::Params)") == "attention"
    assert kind("_rotary_kernel") == "rotary"
    assert kind("void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<c10::BFloat16, float, "
                "true>(int, float, c10::BFloat16 const*)") == "norms"
    assert kind("void at::native::(anonymous namespace)::RowwiseMomentsCUDAKernel<float, float>") == "norms"
    assert kind("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::BFloat16>, "
                "std::array<char*, 3ul> >(int, at::native::CUDAFunctor_add<c10::BFloat16>)") == "additions"
    assert kind("void at::native::index_elementwise_kernel<128, 4, at::native::gpu_index_kernel<"
                "at::native::index_add_kernel_impl>>") == "gathers and copies"
    assert kind("void at::native::vectorized_elementwise_kernel<4, at::native::direct_copy_kernel_cuda(...)>") \
        == "gathers and copies"
    assert kind("void at::native::vectorized_elementwise_kernel<4, at::native::BinaryFunctor<float, float, float, "
                "at::native::binary_internal::MulFunctor<float> > >") == "other"


def test_the_floor_says_what_the_products_leave_of_the_target(profile_small_script):
    """A trace's kernels summed by kind (copies and memsets as copies; host events and events without a duration
    left out), the products' rate from the block count, and the target less the products against the rest."""
    ps = profile_small_script
    events = [{"cat": "kernel", "name": "nvjet_gemm_a", "ts": 0, "dur": 600_000},
              {"cat": "kernel", "name": "_gate_up_silu_kernel", "ts": 0, "dur": 200_000},
              {"cat": "kernel", "name": "_row_attention_kernel", "ts": 0, "dur": 250_000},
              {"cat": "gpu_memcpy", "name": "Memcpy HtoD (Pinned -> Device)", "ts": 0, "dur": 50_000},
              {"cat": "kernel", "name": "no duration", "ts": 0},
              {"cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 9_000_000}]
    by_kind = ps.kernel_seconds_by_kind(events)
    assert by_kind == pytest.approx({"matrix products": 0.8, "attention": 0.25, "gathers and copies": 0.05})
    lines = ps.floor_lines(by_kind, product_flop=560e12, wall=1.2, target=1.0)
    assert lines[0].startswith("   GPU kernels 1100.0 ms of a 1200.0 ms wall: matrix products 800.0 ms (73%), "
                               "attention 250.0 ms (23%)")
    assert "at 700 TFLOP/s" in lines[1] and "(560.0 TFLOP)" in lines[1]
    assert "leave 200.0 ms for the rest, whose kernels take 300.0 ms now (over it)" in lines[2]
    assert "idle 100.0 ms" in lines[2]
    assert "(within it)" in ps.floor_lines(by_kind, 560e12, 1.2, target=1.2)[2]
    assert len(ps.floor_lines(by_kind, 560e12, 1.2, target=None)) == 2


def test_floor_replaces_the_bucket_scan_and_says_it_needs_cuda(profile_small_script, bench_script, monkeypatch,
                                                                capsys):
    """``--floor`` on a CPU: each case says that it needs CUDA, and the bucket scan and host profile do not run."""
    import sys

    import torch

    if torch.cuda.is_available():
        pytest.skip("on a GPU the floor report itself runs (profiled)")
    ps = profile_small_script
    monkeypatch.setattr(ps, "SMALL_CASES", (("1 example, T 71", 1, 71, 10),))
    llama_only = {k: v for k, v in bench_script.quick_configs().items() if "llama" in k}
    monkeypatch.setattr(ps, "quick_configs", lambda: llama_only)
    monkeypatch.setattr(sys, "argv", ["profile_small.py", "--quick", "--floor"])
    ps.main()
    out = capsys.readouterr().out
    assert out.count("\n== ") == 1 and out.count("(--floor needs CUDA)") == 1
    assert "buckets " not in out and "cum " not in out


def test_every_target_names_a_case_the_floor_runs(profile_small_script, bench_script):
    """Each of issue 18's targets belongs to a shape of the real configurations and to a case ``--floor`` runs for
    it; the one-example shapes run their one case under ``--floor`` (only), and a case without a target has None."""
    ps = profile_small_script
    names = list(bench_script.real_configs())
    for shape, case in ps.TARGETS:
        name = next(n for n in names if n.startswith(shape))
        assert case in [c[0] for c in ps.cases_of(name, floor=True, quick=False)], (shape, case)
        assert ps.case_target(name, case) == ps.TARGETS[shape, case]
    qwen = next(n for n in names if n.startswith("Qwen"))
    assert ps.cases_of(qwen, floor=True, quick=False) == ps.LARGE_CASES
    assert ps.cases_of(qwen, floor=False, quick=False) == ps.cases_of(qwen, floor=True, quick=True) == ps.SMALL_CASES
    assert ps.case_target(qwen, "10 examples, T 71") is None


def test_floor_runs_the_large_shapes_one_example_case(profile_small_script, bench_script, monkeypatch, capsys):
    """``--floor`` without ``--quick`` runs the small shapes' cases and the others' one case (tiny stand-ins under
    the real shapes' names; on a CPU each case says that it needs CUDA)."""
    import sys

    import torch

    if torch.cuda.is_available():
        pytest.skip("on a GPU the floor report itself runs (profiled)")
    ps = profile_small_script
    tiny = next(v for k, v in bench_script.quick_configs().items() if "llama" in k)
    monkeypatch.setattr(ps, "real_configs", lambda: {"SmolLM2-135M (llama)": tiny, "Qwen2.5-0.5B (qwen2)": tiny})
    monkeypatch.setattr(ps, "SMALL_CASES", (("1 example, T 71", 1, 12, 4), ("10 examples, T 71", 2, 12, 4)))
    monkeypatch.setattr(ps, "LARGE_CASES", (("1 example, T 60", 1, 10, 3),))
    monkeypatch.setattr(sys, "argv", ["profile_small.py", "--floor"])
    ps.main()
    out = capsys.readouterr().out
    headers = [line.split(":")[0] for line in out.splitlines() if line.startswith("== ")]
    assert headers == ["== SmolLM2-135M (llama) | 1 example, T 71", "== SmolLM2-135M (llama) | 10 examples, T 71",
                       "== Qwen2.5-0.5B (qwen2) | 1 example, T 60"]
    assert out.count("(--floor needs CUDA)") == 3
