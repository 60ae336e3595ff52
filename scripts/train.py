#!/usr/bin/env python
"""Train one embedded TinySQL model: ``python scripts/train.py --family llama --cs 1 [--steps ...]``.

Writes safetensors + config + tokenizer + training_meta.json to ``--out`` (default
helpers/models/embedded/<family>-cs<cs>/). Seeded; the same code runs on CPU and GPU.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from helpers.models.training import FAMILIES, config_from_args, train  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=FAMILIES, default="llama")
    ap.add_argument("--cs", type=int, default=1)
    ap.add_argument("--steps", type=int)
    ap.add_argument("--batch-size", type=int, dest="batch_size")
    ap.add_argument("--lr", type=float)
    ap.add_argument("--warmup", type=int)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--device", default=None, help="cpu, cuda, cuda:0 (default: cuda if available)")
    ap.add_argument("--out", dest="out_dir")
    ap.add_argument("--max-minutes", type=float, dest="max_minutes",
                    help="stop (with the schedule completed) after this many minutes")
    ap.add_argument("--eval-every", type=int, dest="eval_every")
    ap.add_argument("--eval-items", type=int, dest="eval_items")
    ap.add_argument("--num-workers", type=int, dest="num_workers",
                    help="DataLoader worker processes generating batches (0: in the training process)")
    ap.add_argument("--init-from", dest="init_from", help="fine-tune this saved model folder")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--filler-loss", action="store_true", dest="filler_loss",
                    help="also predict the tokens of the English filler (with a generator filler_p > 0)")
    ap.add_argument("--generator", type=json.loads, default=None,
                    help='GeneratorConfig overrides as JSON (replaces helpers.models.training.recipe_generator), e.g. '
                         '\'{"context_spelling_p": 0.5, "table_rename_p": 0.2, "field_rename_p": 0.4}\'')
    ap.add_argument("--model", type=json.loads, default=None, dest="model_overrides",
                    help='architecture overrides as JSON, e.g. \'{"num_layers": 4}\'')
    args = ap.parse_args(argv)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = config_from_args(**vars(args), progress=not args.no_progress)
    train(cfg)


if __name__ == "__main__":
    main()
