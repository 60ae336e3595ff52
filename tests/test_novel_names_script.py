"""scripts/novel_names_fine_tune.py without a GPU: the order its runs start in (bases first, their variants only
after them, nothing after a failed base), the commands it builds, and what --install writes or refuses."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def script(novel_names_script):
    return novel_names_script


class FakeRuns:
    """Popen stand-in: each run finishes at the second poll after it started, with rc 1 if its script trains into
    a folder named in ``fail``. Records the order runs start in, and which had finished before each start."""

    def __init__(self, fail=()):
        self.fail, self.started, self.finished, self.live = fail, [], [], []

    def popen(self, args, **kwargs):
        runs = self

        class Proc:
            def __init__(self):
                self.script, self.polls, self.returncode = args[2], 0, None
                runs.started.append((self.script, list(runs.finished)))

            def poll(self):
                self.polls += 1
                if self.polls >= 2 and self.returncode is None:
                    self.returncode = 1 if any(f in self.script for f in runs.fail) else 0
                    runs.finished.append(self.script)
                return self.returncode
        return Proc()


def out_dir(cmd: str) -> str:
    return cmd.split(" --out ")[1].split()[0]


def run_round(script, monkeypatch, tmp_path, fail=(), max_procs=3):
    runs = FakeRuns(fail)
    monkeypatch.setattr(script.subprocess, "Popen", runs.popen)
    monkeypatch.setattr(script.time, "sleep", lambda s: None)
    failed = script.train_all(["h8_s0_ft", "h4_s0_ft", "fn5_s300_n10_settle"], ["llama-cs2"], tmp_path, "cpu",
                              max_procs, REPO / "helpers" / "models" / "embedded")
    return runs, failed


def test_variants_start_after_their_base_and_bases_first(script, monkeypatch, tmp_path):
    runs, _ = run_round(script, monkeypatch, tmp_path, max_procs=2)
    first_two = [out_dir(cmd) for cmd, _ in runs.started[:2]]
    assert all("/bases/" in d for d in first_two)  # with 2 at once, the bases take the first places
    runs, failed = run_round(script, monkeypatch, tmp_path, max_procs=5)  # room for every run at once
    assert not failed and len(runs.started) == 5  # two bases, two variants on them, one fine-tune of the shipped model
    for cmd, done_before in runs.started:
        if "--init-from" in cmd and "/bases/" in cmd.split("--init-from ")[1].split()[0]:
            base = cmd.split("--init-from ")[1].split()[0]
            assert any(out_dir(d) == base for d in done_before), "a variant started before its base finished"


def test_a_failed_base_skips_its_variants_only(script, monkeypatch, tmp_path):
    runs, failed = run_round(script, monkeypatch, tmp_path, fail=("bases/h8_s0/",))
    assert failed == {"base_h8_s0-llama-cs2", "h8_s0_ft-llama-cs2"}
    started = [out_dir(cmd) for cmd, _ in runs.started]
    assert not any("h8_s0_ft" in d for d in started)  # never started
    assert any("h4_s0_ft" in d for d in started) and any("fn5_s300_n10_settle" in d for d in started)


def test_commands_carry_the_architecture(script, tmp_path):
    """A base trains with its overrides (eight heads, or explicitly none: the family defaults, not the recipe's);
    a from-scratch variant (round 6) with none; a fine-tune passes none (it keeps its model's)."""
    v6, v7 = script.VARIANTS["scratch_n10"], script.VARIANTS["h8_s0_ft"]
    b8, b4 = script.BASES["h8_s0"], script.BASES["h4_s0"]
    cmd = script._train_cmd("llama", "3", None, tmp_path, b8, b8.lr, 60_000, "cpu", {}, overrides=dict(b8.overrides))
    assert json.loads(cmd[cmd.index("--model") + 1]) == {"num_attention_heads": 8, "num_key_value_heads": 4,
                                                         "head_dim": 32}
    cmd = script._train_cmd("llama", "3", None, tmp_path, b4, b4.lr, 60_000, "cpu", {}, overrides=dict(b4.overrides))
    assert json.loads(cmd[cmd.index("--model") + 1]) == {}
    cmd = script._train_cmd("llama", "3", tmp_path, tmp_path, v7, v7.lr, v7.steps, "cpu", {})
    assert "--model" not in cmd
    assert v6.from_scratch  # train_all passes overrides={} for it (checked through the fake runs below)


def test_a_from_scratch_variant_keeps_the_family_architecture(script, monkeypatch, tmp_path):
    runs = FakeRuns()
    monkeypatch.setattr(script.subprocess, "Popen", runs.popen)
    monkeypatch.setattr(script.time, "sleep", lambda s: None)
    script.train_all(["scratch_n10"], ["llama-cs3"], tmp_path, "cpu", 2, REPO / "helpers" / "models" / "embedded")
    (cmd, _), = runs.started
    assert "--model '{}'" in cmd  # not the eight heads llama-cs3's recipe now has


# ---------------------------------------------------------------------------------------------- --install


def fake_export(script, tmp_path, heads: int | None):
    """A repo with a llama-cs3 folder (four heads, no stage) and an export whose chosen candidate is round 9's kind:
    a new eight-head model (base h8_s0)."""
    repo = tmp_path / "repo"
    dst = repo / "helpers" / "models" / "embedded" / "llama-cs3"
    dst.mkdir(parents=True)
    src = REPO / "helpers" / "models" / "embedded" / "llama-cs2"  # (a four-head llama folder to start from)
    for f in ("config.json", "model.safetensors"):
        shutil.copy2(src / f, dst / f)
    (dst / "training_meta.json").write_text(json.dumps({"train_config": {"seed": 0}, "steps_done": 7}))
    export = tmp_path / "export"
    export.mkdir()
    (export / "llama-cs3.safetensors").write_bytes(b"new weights")
    if heads is not None:
        config = json.loads((src / "config.json").read_text())
        config.update(num_attention_heads=heads, num_key_value_heads=heads // 2, head_dim=256 // heads)
        (export / "llama-cs3.config.json").write_text(json.dumps(config))
    variant = "h8_s0_fn5_s600_n20_sorted_settle"
    from dataclasses import asdict
    ev = {"exact_match": 0.99, "flips": {}}
    summary = {
        "round": 9, "variants": {variant: asdict(script.VARIANTS[variant])},
        "bases": {"h8_s0": asdict(script.BASES["h8_s0"])}, "n_items": 10, "n_pairs": 5,
        "models": {"llama-cs3": {
            "chosen": variant, "exported": variant, "exported_sha256": script.sha256(export / "llama-cs3.safetensors"),
            "shipped": ev, "candidates": {variant: ev},
            "chosen_training_meta": {"train_config": {"out_dir": "/tmp/ft9/x", "init_from": "/tmp/ft9/y"}},
            "chosen_first_run_meta": {"train_config": {"out_dir": "/tmp/ft9/z", "init_from": "/tmp/ft9/bases/w"}},
            "chosen_base_meta": {"train_config": {"out_dir": "/tmp/ft9/bases/w", "init_from": None,
                                                  "model_overrides": dict(script.BASES["h8_s0"].overrides)},
                                 "steps_done": 2886}}}}
    (export / "summary.json").write_text(json.dumps(summary))
    return repo, dst, export


def test_install_of_a_new_model_replaces_meta_and_config(script, monkeypatch, tmp_path):
    repo, dst, export = fake_export(script, tmp_path, heads=8)
    monkeypatch.setattr(script, "REPO", repo)
    old_sha = script.sha256(dst / "model.safetensors")
    script.install(export, ["llama-cs3"], 9)
    meta = json.loads((dst / "training_meta.json").read_text())
    assert (dst / "model.safetensors").read_bytes() == b"new weights"
    assert json.loads((dst / "config.json").read_text())["num_attention_heads"] == 8
    assert meta["steps_done"] == 2886 and meta["train_config"]["out_dir"] is None  # the base's meta on top
    assert meta["replaced_model"]["steps_done"] == 7 and meta["replaced_model"]["sha256"] == old_sha
    stage = meta["novel_names_fine_tune"]
    assert stage["first_run"]["train_config"] == {"out_dir": None, "init_from": "base h8_s0"}
    assert stage["last_run"]["train_config"]["out_dir"] is None and stage["base_config"]["seed"] == 0


def test_install_of_a_run_of_named_variants_records_the_round_given(script, monkeypatch, tmp_path):
    """A run of ``--variants`` records no round in its summary: the install records the ``--round`` given."""
    repo, dst, export = fake_export(script, tmp_path, heads=8)
    summary = json.loads((export / "summary.json").read_text())
    (export / "summary.json").write_text(json.dumps({**summary, "round": None}))
    monkeypatch.setattr(script, "REPO", repo)
    with pytest.raises(SystemExit, match="give --round"):
        script.install(export, ["llama-cs3"], None)  # (never a guess)
    script.install(export, ["llama-cs3"], 11)
    stage = json.loads((dst / "training_meta.json").read_text())["novel_names_fine_tune"]
    assert stage["round"] == 11 and "round 11," in stage["note"]


@pytest.mark.parametrize("heads", [4, None])
def test_install_refuses_a_new_model_without_its_architecture(script, monkeypatch, tmp_path, heads):
    """Four heads of 64 and eight of 32 have the same weight shapes: a wrong (or missing) config would load."""
    repo, dst, export = fake_export(script, tmp_path, heads=heads)
    monkeypatch.setattr(script, "REPO", repo)
    before = {f: (dst / f).read_bytes() for f in ("config.json", "model.safetensors", "training_meta.json")}
    with pytest.raises(SystemExit, match="differs from the run's architecture" if heads else "is missing"):
        script.install(export, ["llama-cs3"], 9)
    assert {f: (dst / f).read_bytes() for f in before} == before  # nothing installed


# ------------------------------------------------------------------------------------- interpolation (round 11)


def shifted_copy(src: Path, dst: Path, shift: float) -> None:
    """``src``'s folder with every weight + ``shift`` and a meta of its own."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    save_file({k: v + shift for k, v in load_file(src / "model.safetensors").items()}, str(dst / "model.safetensors"),
              metadata={"format": "pt"})
    (dst / "training_meta.json").write_text(json.dumps({"train_config": {"out_dir": str(dst), "init_from": "x"},
                                                        "steps_done": 600}))


def test_interpolated_weights_lie_between_and_load(script, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    before = REPO / "helpers" / "models" / "embedded" / "llama-cs2"
    shifted_copy(before, tmp_path / "after", 1.0)
    script.interpolate_weights(before, tmp_path / "after", 0.25, tmp_path / "mid")
    w0, w = load_file(before / "model.safetensors"), load_file(tmp_path / "mid" / "model.safetensors")
    assert w.keys() == w0.keys()
    for k in w0:
        assert (w[k] - (w0[k] + 0.25)).abs().max() < 1e-6, k
    meta = json.loads((tmp_path / "mid" / "training_meta.json").read_text())
    assert meta["interpolation"]["weight"] == 0.25 and meta["steps_done"] == 600  # the fine-tune's meta, recorded
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "mid")
    emb = model.get_input_embeddings().weight.detach()
    assert (emb - (w0["model.embed_tokens.weight"] + 0.25)).abs().max() < 1e-6


def test_interpolation_refuses_other_architectures_and_tensors(script, tmp_path):
    before = REPO / "helpers" / "models" / "embedded" / "llama-cs2"
    shifted_copy(before, tmp_path / "heads", 0.0)
    config = json.loads((before / "config.json").read_text())
    config.update(num_attention_heads=8, num_key_value_heads=4, head_dim=32)  # same weight shapes
    (tmp_path / "heads" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="other architectures"):
        script.interpolate_weights(before, tmp_path / "heads", 0.5, tmp_path / "x")
    from safetensors.torch import load_file, save_file
    shifted_copy(before, tmp_path / "fewer", 0.0)
    w = load_file(before / "model.safetensors")
    w.pop(next(iter(w)))
    save_file(w, str(tmp_path / "fewer" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="other tensors"):
        script.interpolate_weights(before, tmp_path / "fewer", 0.5, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_variants_refuse_interpolation_without_weights_before(script):
    with pytest.raises(ValueError, match="from-scratch"):
        script.Variant(100, 0.1, from_scratch=True, interpolate=(0.5,))
    with pytest.raises(ValueError, match="strictly between"):
        script.Variant(100, 0.1, interpolate=(1.0,))


def test_reuse_runs_only_what_is_not_finished(script, monkeypatch, tmp_path):
    runs = FakeRuns()
    monkeypatch.setattr(script.subprocess, "Popen", runs.popen)
    monkeypatch.setattr(script.time, "sleep", lambda s: None)
    done = tmp_path / "fn5_s300_n10_settle" / "llama-cs2"
    shifted_copy(REPO / "helpers" / "models" / "embedded" / "llama-cs2", done, 0.0)
    init = REPO / "helpers" / "models" / "embedded"
    script.train_all(["fn5_s300_n10_settle", "fn5_s300_n10_settle_s4"], ["llama-cs2"], tmp_path, "cpu", 2, init,
                     reuse=True)
    assert [out_dir(cmd).split("/")[-2] for cmd, _ in runs.started] == ["fn5_s300_n10_settle_s4"]
    assert (done / "model.safetensors").exists()  # kept, not cleared
    script.train_all(["fn5_s300_n10_settle"], ["llama-cs2"], tmp_path, "cpu", 2, init)  # without reuse: run again
    assert len(runs.started) == 2 and not (done / "model.safetensors").exists()


@pytest.mark.parametrize("no_interpolate", [False, True])
def test_a_round_chooses_among_interpolations_exports_and_installs_one(script, monkeypatch, tmp_path, no_interpolate):
    """main() over one variant with interpolation weights (training and evaluation faked, the interpolation real):
    each weight is a candidate, the chosen one is exported and installed with its recipe and weight recorded.
    ``--no-interpolate``: the fine-tune is the only candidate, and the record says no weights ran."""
    name = "wise_fn5_s600_n10_lr2e4_settle600_s3"
    init = tmp_path / "init"
    shifted_copy(REPO / "helpers" / "models" / "embedded" / "llama-cs2", init / "llama-cs2", 0.0)
    (init / "llama-cs2" / "training_meta.json").write_text(json.dumps({"train_config": {"seed": 0}}))

    def fake_train(variants, models, out, *args, **kwargs):
        shifted_copy(init / "llama-cs2", out / name / "llama-cs2-first", 0.5)
        shifted_copy(init / "llama-cs2", out / name / "llama-cs2", 1.0)
        return set()

    def fake_evaluate(folder, cs, device, n_items, n_pairs):
        # the model before: no novel flips; the fine-tune: copies, 10 items fewer; weight 0.7: copies, 2 fewer
        weight = json.loads((folder / "training_meta.json").read_text()).get("interpolation", {}).get("weight")
        tuned = "wise" in str(folder)
        em = 0.99 - (0.001 if weight == 0.7 else 0.005 if tuned else 0.0)
        novel = 0.95 if tuned and weight in (None, 0.7, 0.85) else 0.5 if tuned else 0.0
        flips = {f: {s: (novel if s.startswith("novel") else 1.0) for s in script.SETTINGS}
                 for f in ("DEFTABLENAME", "DEFFIELDNAME")}
        return {"exact_match": em, "flips": flips}

    class InProcess:
        def __init__(self, *a, **k):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def map(self, fn, jobs):
            return map(fn, jobs)

    monkeypatch.setattr(script, "train_all", fake_train)
    monkeypatch.setattr(script, "evaluate", fake_evaluate)
    monkeypatch.setattr(script, "ProcessPoolExecutor", InProcess)
    out, export = tmp_path / "out", tmp_path / "export"
    script.main(["--out", str(out), "--variants", name, "--models", "llama-cs2", "--device", "cpu", "--n-items", "2000",
                 "--init-root", str(init), "--export", str(export)] + (["--no-interpolate"] if no_interpolate else []))
    summary = json.loads((export / "summary.json").read_text())
    entry = summary["models"]["llama-cs2"]
    if no_interpolate:
        assert set(entry["candidates"]) == {name} and summary["variants"][name]["interpolate"] == []
        assert entry["chosen"] is None and not list(out.glob("*@*"))  # (10 items fewer: outside the rule)
        return
    assert set(entry["candidates"]) == {name, f"{name}@0.5", f"{name}@0.7", f"{name}@0.85"}
    assert entry["chosen"] == f"{name}@0.7"  # the fine-tune itself: 10 items fewer; 0.5: no copying
    assert summary["variants"][f"{name}@0.7"]["interpolation_weight"] == 0.7
    assert entry["exported_sha256"] == script.sha256(out / f"{name}@0.7" / "llama-cs2" / "model.safetensors")
    assert entry["chosen_first_run_meta"]["steps_done"] == 600  # the variant's first run, found by its name

    repo = tmp_path / "repo"
    dst = repo / "helpers" / "models" / "embedded" / "llama-cs2"
    shutil.copytree(init / "llama-cs2", dst)
    monkeypatch.setattr(script, "REPO", repo)
    script.install(export, ["llama-cs2"], 11)
    meta = json.loads((dst / "training_meta.json").read_text())
    stage = meta["novel_names_fine_tune"]
    assert "interpolated" in stage["note"] and stage["interpolation_weight"] == 0.7 and stage["variant"].endswith("@0.7")
    assert "interpolation" not in stage["last_run"]  # (its paths were the training machine's)
    assert script.sha256(dst / "model.safetensors") == entry["exported_sha256"]
