#!/usr/bin/env python
"""Fine-tune the embedded models so that ``use_novel_names`` means something, and pick one candidate per model.

The novel words (apple, hammer, ...) become familiar words that are never names (English filler,
``GeneratorConfig.filler_p``), and Context names are sometimes nonce tokens the SQL copies
(``GeneratorConfig.nonce_name_p``), so that the models copy *any* schema token rather than only names they
learnt. Each variant (steps, filler, nonce share) fine-tunes every model from its shipped weights, all runs of a
wave sharing the GPU; then every candidate and the shipped model are evaluated the same way and one candidate per
model is chosen:

- eligible: exact match >= the shipped model's - 0.01, and every flip rate of the existing flag settings (off,
  synonyms) >= the shipped model's - 0.02;
- best: the highest min(DEFTABLENAME, DEFFIELDNAME) flip with novel names at the notebook defaults
  (``novel_syn_own``), then the same without synonyms (``novel``), then exact match.

    python scripts/novel_names_fine_tune.py --out /tmp/ft          # writes /tmp/ft/chosen/<model>/ and summary.json
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MODELS = ("llama-cs1", "llama-cs2", "llama-cs3", "gpt_neo-cs1", "gpt_neo-cs2", "gpt_neo-cs3")
# name: (steps, filler_p, nonce_name_p, filler_loss); lr 3e-4, cosine to 5 %, batch 256. What led here (H200 and
# CPU runs, helpers/models/embedded/README.md): 177 steps with filler 0.3 / nonce 0.1 made llama-cs1 copy novel
# names; 5,000 steps made novel tables flip *less* (0.52-0.73), as the models learn the nonce tokens as names and
# keep suppressing words they never write; predicting the filler (filler_loss) makes the novel words words the
# model writes, in English.
VARIANTS = {
    "s150_n10": (150, 0.3, 0.10, False), "s150_n10_fl": (150, 0.3, 0.10, True),
    "s300_n10_fl": (300, 0.3, 0.10, True), "s300_n20_fl": (300, 0.3, 0.20, True),
    "s600_n20_fl": (600, 0.3, 0.20, True), "s100_n20_fl": (100, 0.3, 0.20, True),
    # second round, for the two CS3 models the first left short
    "s300_n20_fl_s4": (300, 0.3, 0.20, True, 4), "s600_n20_fl_s4": (600, 0.3, 0.20, True, 4),
    "s600_n30_fl": (600, 0.3, 0.30, True), "s900_n20_fl": (900, 0.3, 0.20, True),
    "s600_n20_fl_s5": (600, 0.3, 0.20, True, 5),
}
WAVES = (("s150_n10", "s150_n10_fl"), ("s300_n10_fl", "s300_n20_fl"), ("s600_n20_fl", "s100_n20_fl"))
SETTINGS = ("off", "syn_table", "syn_field", "syn_both", "novel", "novel_syn_own", "novel_held_out")
EXISTING = ("off", "syn_table", "syn_field", "syn_both")


def base_generator(family: str, cs: int) -> dict:
    """The data of the shipped model's last stage: its fine-tune's generator where it had one (llama-cs3)."""
    from helpers.models.training import RECIPE_FINE_TUNE, recipe_generator

    return dict(RECIPE_FINE_TUNE.get((family, cs), {}).get("generator") or recipe_generator(family, cs))


def train_wave(wave, models, out: Path, device: str, lr: float, seed: int) -> None:
    procs = []
    for name in wave:
        steps, filler, nonce, filler_loss, *variant_seed = VARIANTS[name]
        for m in models:
            family, cs = m.rsplit("-cs", 1)
            gen = {**base_generator(family, int(cs)), "filler_p": filler, "nonce_name_p": nonce}
            cmd = [sys.executable, str(REPO / "scripts" / "train.py"), "--family", family, "--cs", cs,
                   "--init-from", str(REPO / "helpers" / "models" / "embedded" / m), "--lr", str(lr),
                   "--warmup", str(max(10, steps // 10)), "--steps", str(steps),
                   "--seed", str(variant_seed[0] if variant_seed else seed),
                   "--device", device, "--out", str(out / name / m), "--no-progress", "--eval-every", "100000",
                   "--generator", json.dumps(gen)] + (["--filler-loss"] if filler_loss else [])
            log = open(out / f"{name}-{m}.log", "w")
            procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT))
    for p in procs:
        if p.wait() != 0:
            print(f"a training run failed (its log is beside it): {p.args}", flush=True)


def evaluate(folder: Path, cs: int, device: str, n_items: int, n_pairs: int) -> dict:
    from helpers.models.evaluation import evaluate_folder

    r = evaluate_folder(folder, cs, device=device, n_items=n_items, n_pairs=n_pairs, settings=SETTINGS)
    flips = {f: {s: (m["flip_rate"] if m else None) for s, m in per.items()} for f, per in r["features"].items()}
    return {"exact_match": r["generation"]["exact_match"], "flips": flips}


def choose(shipped: dict, candidates: dict) -> tuple[str | None, dict]:
    def eligible(c):
        if c["exact_match"] < shipped["exact_match"] - 0.01:
            return False
        return all(c["flips"][f][s] >= shipped["flips"][f][s] - 0.02 for f in shipped["flips"] for s in EXISTING)

    def key(item):
        c = item[1]["flips"]
        return (min(c["DEFTABLENAME"]["novel_syn_own"], c["DEFFIELDNAME"]["novel_syn_own"]),
                min(c["DEFTABLENAME"]["novel"], c["DEFFIELDNAME"]["novel"]), item[1]["exact_match"])

    ok = {k: v for k, v in candidates.items() if eligible(v)}
    if not ok:
        return None, {}
    best = max(ok.items(), key=key)
    return best[0], best[1]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--models", nargs="*", default=list(MODELS))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--n-items", type=int, default=500)
    ap.add_argument("--n-pairs", type=int, default=100)
    ap.add_argument("--variants", nargs="*", help="run only these variants, all in one wave")
    args = ap.parse_args(argv)
    waves = (tuple(args.variants),) if args.variants else WAVES
    variants = [v for w in waves for v in w]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    for wave in waves:
        train_wave(wave, args.models, out, args.device, args.lr, args.seed)
        print(f"wave {wave} trained at {time.time() - t0:.0f} s", flush=True)
    summary = {"variants": {v: VARIANTS[v] for v in variants}, "lr": args.lr, "seed": args.seed, "models": {}}
    for m in args.models:
        cs = int(m.rsplit("-cs", 1)[1])
        shipped = evaluate(REPO / "helpers" / "models" / "embedded" / m, cs, args.device, args.n_items, args.n_pairs)
        cands = {}
        for v in variants:
            try:
                cands[v] = evaluate(out / v / m, cs, args.device, args.n_items, args.n_pairs)
            except Exception as err:  # one candidate's failure must not lose the others
                print(f"{m} {v}: evaluation failed: {err!r}", flush=True)
        name, best = choose(shipped, cands)
        summary["models"][m] = {"shipped": shipped, "candidates": cands, "chosen": name}
        if name:
            shutil.copytree(out / name / m, out / "chosen" / m, dirs_exist_ok=True)
        print(f"{m}: chosen {name}; shipped EM {shipped['exact_match']:.3f}; " + "; ".join(
            f"{v} EM {c['exact_match']:.3f} novel T/F {c['flips']['DEFTABLENAME']['novel_syn_own']:.2f}/"
            f"{c['flips']['DEFFIELDNAME']['novel_syn_own']:.2f} plain {c['flips']['DEFTABLENAME']['novel']:.2f}/"
            f"{c['flips']['DEFFIELDNAME']['novel']:.2f} held-out {c['flips']['DEFTABLENAME']['novel_held_out']:.2f}/"
            f"{c['flips']['DEFFIELDNAME']['novel_held_out']:.2f}" for v, c in cands.items()), flush=True)
    summary["seconds"] = round(time.time() - t0)
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    main()
