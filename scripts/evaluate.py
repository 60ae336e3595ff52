#!/usr/bin/env python
"""Evaluate embedded TinySQL models; print markdown tables and write JSON.

``python scripts/evaluate.py`` evaluates every helpers/models/embedded/<family>-cs<N>/ folder found
(1,000 held-out items per CS, 200 pairs per feature and flag setting, CS1 models also on CS2 prompts).
``--word-sets`` instead prints clean accuracy / flip rate with the suite's and upstream's words (50 pairs per model
and feature at the default flags), the table of helpers/models/embedded/README.md.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from helpers.models.evaluation import evaluate_folder, evaluate_word_sets, markdown_tables, word_set_table  # noqa: E402
from helpers.models.checkpoints import EMBEDDED_DIR  # noqa: E402


def default_pair_settings() -> dict:
    try:
        from helpers.tinysql.pairs import DEFAULT_PAIR_OPTIONS
    except ImportError:
        return {}
    from helpers.models.evaluation import FLAG_SETTINGS, flag_kwargs

    out = {}
    for feat, opts in DEFAULT_PAIR_OPTIONS.items():
        want = {k: v for k, v in vars(opts).items() if v and k not in ("distractor_table", "novel_words")}
        for name in FLAG_SETTINGS:
            if flag_kwargs(feat, name) == want:
                out[feat.value] = name
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("folders", nargs="*", help="model folders (default: all embedded <family>-cs<N>)")
    ap.add_argument("--root", default=str(EMBEDDED_DIR))
    ap.add_argument("--n-items", type=int, default=1000)
    ap.add_argument("--n-pairs", type=int, default=200)
    ap.add_argument("--device", default=None)
    ap.add_argument("--json", default="outputs/embedded_models_eval.json")
    ap.add_argument("--merge", nargs="+", help="merge JSON files written by earlier runs instead of evaluating")
    ap.add_argument("--word-sets", action="store_true", help="only the word-set table (suite and upstream words)")
    args = ap.parse_args(argv)
    if args.merge:
        merged = {}
        for path in args.merge:
            data = json.loads(Path(path).read_text())
            merged.update(data["results"])
            device = data.get("device")
        print(markdown_tables(merged, default_pair_settings()))
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"device": device, "results": merged}, indent=1) + "\n")
        print(f"wrote {args.json}")
        return
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    folders = [Path(f) for f in args.folders] or sorted(p for p in Path(args.root).iterdir()
                                                         if re.fullmatch(r"(llama|gpt_neo)-cs\d", p.name))
    results = {}
    if args.word_sets:
        from helpers.models.checkpoints import load_trained

        for folder in folders:
            cs = int(re.search(r"cs(\d)", folder.name).group(1))
            model, tok = load_trained(folder, device)
            results[folder.name] = evaluate_word_sets(model, tok, cs)
        print(word_set_table(results))
        return
    for folder in folders:
        m = re.search(r"cs(\d)", folder.name)
        cs = int(m.group(1)) if m else 1
        t = time.time()
        results[folder.name] = evaluate_folder(folder, cs, device=device, n_items=args.n_items,
                                               n_pairs=args.n_pairs, transfer_cs=2 if cs == 1 else None)
        results[folder.name]["eval_seconds"] = round(time.time() - t, 1)
        print(f"{folder.name}: exact match {results[folder.name]['generation']['exact_match']:.3f}", flush=True)
    table = markdown_tables(results, default_pair_settings())
    print(table)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"device": device, "results": results}, indent=1) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
