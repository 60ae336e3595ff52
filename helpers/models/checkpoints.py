"""A trained model's folder: the embedded models' location and tokenizer, saving a model with its training
record, and loading one back (offline, eager attention)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer

EMBEDDED_DIR = Path(__file__).resolve().parent / "embedded"  # <family>-cs<N>/ and the shared tokenizer/
TOKENIZER_DIR = EMBEDDED_DIR / "tokenizer"


def load_project_tokenizer(folder: str | Path | None = None):
    """The embedded models' tokenizer (one BPE tokenizer for every model), trained once and committed."""
    folder = Path(folder) if folder else TOKENIZER_DIR
    if not (folder / "tokenizer.json").exists():
        from helpers.models.tokenizer_training import save_tokenizer, train_tokenizer

        save_tokenizer(train_tokenizer(), folder)
    return AutoTokenizer.from_pretrained(str(folder))


def save_model(model, tokenizer, folder: str | Path, meta: dict | None = None) -> Path:
    """safetensors + config (+ generation config) + tokenizer files + training_meta.json in ``folder``."""
    folder = Path(folder)
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    model = model.to("cpu").eval()
    model.config.use_cache = True
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    if meta is not None:
        (folder / "training_meta.json").write_text(json.dumps(meta, indent=1, default=str) + "\n")
    return folder


def load_trained(folder: str | Path, device: str = "cpu"):
    """(model, tokenizer) from a saved folder, offline, eager attention (gpt_neo supports nothing else)."""
    folder = str(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").to(device).eval()
    return model, tokenizer
