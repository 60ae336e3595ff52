"""Train the embedded TinySQL models from scratch: one small model per command set, two families.

The recipe (used by ``scripts/train.py`` / ``make train``):

- Data: an endless, seeded stream of ``generate_items`` items (the generator's synonym and distractor
  settings, see :class:`helpers.tinysql.sql_items.GeneratorConfig`), tokenized as upstream's training did: prompt and
  answer separately, the answer followed by EOS. Loss on the answer tokens only (SQL + EOS).
- Optimiser: AdamW (betas 0.9/0.98, weight decay 0.01), gradient clipping 1.0, linear warmup then cosine
  decay to ``min_lr_ratio``. Progress is ``max(step / steps, elapsed / max_minutes)`` so a time-bounded run
  still finishes its schedule (with ``max_minutes=None`` the run is fully determined by the seed).
- Families: ``llama`` (rotary, grouped-query attention 4 heads / 2 KV heads, tied embeddings; llama-cs3: 8 / 4,
  ``RECIPE_MODEL``) and ``gpt_neo``
  (shaped like upstream BM1, TinyStories-Instruct-2Layers-33M: learned positions, alternating global and
  local attention, no attention scaling; eager attention only).
- The same code runs on CPU and GPU; held-out greedy accuracy is logged every ``eval_every`` steps.
- Novel names (a last stage of five shipped models, not of ``make train``; helpers/models/embedded/README.md,
  "Novel names"): the generator's ``filler_p``, ``nonce_name_p``, ``field_rename_sorted_p`` and ``filler_nonce_p`` and
  ``TrainConfig.filler_loss`` make the novel words familiar English words that are never names, and teach copying
  of any schema token; ``scripts/novel_names_fine_tune.py`` fine-tunes the models with them and picks one candidate
  per model.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass, fields as dc_fields
from pathlib import Path
from typing import Iterator

import torch
from transformers import AutoModelForCausalLM, GPTNeoConfig, LlamaConfig

from helpers.models.checkpoints import EMBEDDED_DIR, load_project_tokenizer, load_trained, save_model
from helpers.models.evaluation import generation_accuracy
from helpers.tinysql.sql_items import COMMAND_SETS, GeneratorConfig, generate_items

FAMILIES = ("llama", "gpt_neo")
TRAIN_SEED_OFFSET = 1_000  # training chunks use seeds >= this; evaluation uses EVAL_SEED
EVAL_SEED = 424_242
MAX_POSITIONS = 256

# Architecture defaults per family (overridable through TrainConfig.model_overrides).
MODEL_DEFAULTS: dict[str, dict] = {
    "llama": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=64, tie_word_embeddings=True, rope_theta=10000.0),
    "gpt_neo": dict(hidden_size=256, intermediate_size=1024, num_layers=2, num_heads=8, window_size=256),
}


def model_config(family: str, tokenizer, **overrides):
    """A transformers config of ``family`` sized for the project tokenizer."""
    if family not in FAMILIES:
        raise ValueError(f"Unknown family {family!r}; choose one of {FAMILIES}")
    kw = {**MODEL_DEFAULTS[family], **overrides}
    eos = tokenizer.eos_token_id
    vocab = len(tokenizer)
    if family == "llama":
        rope_theta = kw.pop("rope_theta")
        return LlamaConfig(vocab_size=vocab, max_position_embeddings=MAX_POSITIONS, bos_token_id=tokenizer.bos_token_id,
                           eos_token_id=eos, pad_token_id=tokenizer.pad_token_id, attention_dropout=0.0,
                           rope_parameters={"rope_type": "default", "rope_theta": rope_theta}, **kw)
    n_layers = kw.pop("num_layers")
    # Upstream BM1 alternates global and local attention layer by layer.
    pattern = (["global", "local"] * n_layers)[:n_layers]
    return GPTNeoConfig(vocab_size=vocab, max_position_embeddings=MAX_POSITIONS, num_layers=n_layers,
                        attention_types=[[pattern, 1]], bos_token_id=eos, eos_token_id=eos,
                        pad_token_id=tokenizer.pad_token_id, embed_dropout=0.0, attention_dropout=0.0,
                        resid_dropout=0.0, **kw)


def build_model(family: str, tokenizer, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    config = model_config(family, tokenizer, **overrides)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager")


def n_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------- data


def encode_items(tokenizer, items, filler_loss: bool = False) -> list[tuple]:
    """(prompt ids, answer ids + EOS) per item, prompt and answer tokenized separately as in training.

    ``filler_loss``: a third element, the prompt positions of the item's English filler (``SqlItem.filler``), which
    are then predicted too: the novel words become words the model writes in English, never in SQL.
    """
    prompts = tokenizer([it.prompt for it in items], return_offsets_mapping=filler_loss)
    answers = tokenizer([it.sql for it in items], add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    out = []
    for k, (it, p, a) in enumerate(zip(items, prompts["input_ids"], answers)):
        if not filler_loss:
            out.append((list(p), list(a) + [eos]))
            continue
        positions = []
        if it.filler:
            start = it.prompt.index(", " + it.filler + " ### Context") + 2
            end = start + len(it.filler)
            # every token overlapping the filler (the first one carries the space before it)
            positions = [j for j, (a0, b0) in enumerate(prompts["offset_mapping"][k]) if a0 < end and b0 > start
                         and j > 0]
        out.append((list(p), list(a) + [eos], positions))
    return out


def collate(examples: list[tuple], pad_id: int):
    """Right-padded input ids, attention mask and labels (-100 on the prompt, except filler positions given as a
    third element, and the padding)."""
    length = max(len(e[0]) + len(e[1]) for e in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    for i, (p, a, *rest) in enumerate(examples):
        seq = p + a
        ids[i, : len(seq)] = torch.tensor(seq)
        labels[i, len(p): len(seq)] = torch.tensor(a)
        for j in (rest[0] if rest else ()):
            labels[i, j] = seq[j]
        mask[i, : len(seq)] = 1
    return ids, mask, labels


def example_stream(tokenizer, cs: int, seed: int, gen: GeneratorConfig, chunk: int = 4096, worker: int = 0,
                   n_workers: int = 1, filler_loss: bool = False) -> Iterator:
    """Endless shuffled stream of encoded training examples.

    Chunk k of worker w draws ``generate_items`` with seed ``TRAIN_SEED_OFFSET + seed * 10_000 + k * n_workers + w``
    (never the evaluation seeds).
    """
    k = 0
    while True:
        chunk_seed = TRAIN_SEED_OFFSET + seed * 10_000 + k * n_workers + worker
        items = generate_items(cs, chunk, chunk_seed, gen)
        encoded = encode_items(tokenizer, items, filler_loss)
        random.Random(chunk_seed).shuffle(encoded)
        yield from encoded
        k += 1


class BatchStream(torch.utils.data.IterableDataset):
    """Collated training batches; with DataLoader workers the (CPU-heavy) generation runs beside training."""

    def __init__(self, tokenizer, cs: int, seed: int, gen: GeneratorConfig, batch_size: int,
                 filler_loss: bool = False):
        self.tokenizer, self.cs, self.seed, self.gen, self.batch_size = tokenizer, cs, seed, gen, batch_size
        self.filler_loss = filler_loss

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, n = (info.id, info.num_workers) if info else (0, 1)
        stream = example_stream(self.tokenizer, self.cs, self.seed, self.gen, worker=worker, n_workers=n,
                                filler_loss=self.filler_loss)
        pad = self.tokenizer.pad_token_id
        while True:
            yield collate([next(stream) for _ in range(self.batch_size)], pad)


def batch_iterator(tokenizer, cs: int, seed: int, gen: GeneratorConfig, batch_size: int, num_workers: int,
                   filler_loss: bool = False):
    data = BatchStream(tokenizer, cs, seed, gen, batch_size, filler_loss)
    if num_workers <= 0:
        return iter(data)
    loader = torch.utils.data.DataLoader(data, batch_size=None, num_workers=num_workers, prefetch_factor=8,
                                         persistent_workers=True)
    return iter(loader)


# ---------------------------------------------------------------------------------------------- training


# Data of the recommended recipe: the Context spells names by synonyms half the time, a lone table's name wins
# over the Instruction's word, and an unmatched column wins over an Instruction word naming no column. Without
# these the models recall names from the Instruction and never read the schema (DEF* features do not flip).
RECIPE_GENERATOR = {"context_spelling_p": 0.5, "table_rename_p": 0.2, "field_rename_p": 0.2}
# field_rename_p of the shipped models (helpers/models/embedded/README.md has the measured DEFFIELDNAME flips):
# llama needs more renamed-field items than gpt_neo before an unmatched Context column beats the Instruction word.
RECIPE_FIELD_RENAME = {("llama", 1): 0.4, ("llama", 2): 0.6, ("llama", 3): 0.6,
                       ("gpt_neo", 1): 0.2, ("gpt_neo", 2): 0.3, ("gpt_neo", 3): 0.3}
# Shipped models made in two stages before the novel-names stage: `make train FAMILY=.. CS=..` (the recipe above,
# from scratch), then a fine-tune of the saved folder: `scripts/train.py --family .. --cs .. --init-from
# helpers/models/embedded/<family>-cs<cs> --lr .. --warmup .. --generator '{..}' --max-minutes ..`, recorded in
# training_meta.json["fine_tune"]. None now: the llama-cs3 that had one (field rename 0.4, then 3,956 steps at 0.6)
# was replaced by a new model (round 9 of scripts/novel_names_fine_tune.py); its meta keeps it under
# "replaced_model".
RECIPE_FINE_TUNE: dict = {}
# Architecture overrides of shipped models (TrainConfig.model_overrides when None). llama-cs3: eight heads of
# head_dim 32 (four key/value heads), the same weight shapes as the default four of 64; the eight-head model is
# the one that learnt to copy novel field names (helpers/models/embedded/README.md, "Novel names").
RECIPE_MODEL = {("llama", 3): {"num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 32}}
FAMILY_LR = {"llama": 2e-3, "gpt_neo": 1e-3}
FAMILY_WARMUP = {"llama": 300, "gpt_neo": 500}


def recipe_model(family: str, cs: int) -> dict:
    """Architecture overrides of the shipped model ``family``-cs``cs`` (RECIPE_MODEL; none for most)."""
    return dict(RECIPE_MODEL.get((family, cs), {}))


def recipe_generator(family: str, cs: int) -> dict:
    """GeneratorConfig overrides of the shipped model ``family``-cs``cs`` (RECIPE_GENERATOR, per-model field rename)."""
    return {**RECIPE_GENERATOR,
            "field_rename_p": RECIPE_FIELD_RENAME.get((family, cs), RECIPE_GENERATOR["field_rename_p"])}


@dataclass
class TrainConfig:
    family: str = "llama"
    cs: int = 1
    steps: int = 2500
    batch_size: int = 256
    lr: float | None = None  # None: FAMILY_LR
    warmup: int | None = None  # None: FAMILY_WARMUP
    min_lr_ratio: float = 0.05
    weight_decay: float = 0.01
    seed: int = 0
    device: str = "cpu"
    out_dir: str | None = None  # default: helpers/models/embedded/<family>-cs<cs>
    max_minutes: float | None = None
    eval_every: int = 500
    eval_items: int = 200
    log_every: int = 50
    progress: bool = True
    generator: dict | None = None  # GeneratorConfig overrides; None: recipe_generator(family, cs)
    model_overrides: dict | None = None  # architecture overrides; None: recipe_model(family, cs)
    tokenizer_dir: str | None = None
    num_workers: int = 0  # DataLoader workers generating data (batches then depend on this number too)
    init_from: str | None = None  # fine-tune a saved model folder instead of starting from random weights
    filler_loss: bool = False  # also predict the English filler's tokens (GeneratorConfig.filler_p)

    def output_folder(self) -> Path:
        return Path(self.out_dir) if self.out_dir else EMBEDDED_DIR / f"{self.family}-cs{self.cs}"


def lr_factor(progress: float, step: int, warmup: int, min_ratio: float) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def train(cfg: TrainConfig, log=print):
    """Train one model as ``cfg`` says; save it (safetensors, config, tokenizer) and return (model, history)."""
    if cfg.cs not in COMMAND_SETS:
        raise ValueError(f"Unknown command set {cfg.cs}; choose one of {COMMAND_SETS}")

    if cfg.lr is None:
        cfg.lr = FAMILY_LR[cfg.family]
    if cfg.warmup is None:
        cfg.warmup = FAMILY_WARMUP[cfg.family]
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    device = torch.device(cfg.device)
    tokenizer = load_project_tokenizer(cfg.tokenizer_dir)
    if cfg.generator is None:
        cfg.generator = recipe_generator(cfg.family, cfg.cs)
    gen = GeneratorConfig(**cfg.generator)
    if cfg.model_overrides is None and not cfg.init_from:  # (a fine-tune keeps its model's architecture)
        cfg.model_overrides = recipe_model(cfg.family, cfg.cs)
    if cfg.init_from:
        model, _ = load_trained(cfg.init_from, device=str(device))
        if model.config.model_type != cfg.family:
            raise ValueError(f"--init-from {cfg.init_from} holds a {model.config.model_type} model, not {cfg.family}")
    else:
        model = build_model(cfg.family, tokenizer, seed=cfg.seed, **cfg.model_overrides).to(device)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98))
    batches = batch_iterator(tokenizer, cfg.cs, cfg.seed, gen, cfg.batch_size, cfg.num_workers, cfg.filler_loss)
    held_out = generate_items(cfg.cs, cfg.eval_items, EVAL_SEED + 1)  # monitoring set (not the final eval set)
    log(f"training {cfg.family} CS{cfg.cs}: {n_parameters(model):,} parameters on {device}, "
        f"steps={cfg.steps} batch={cfg.batch_size} lr={cfg.lr} max_minutes={cfg.max_minutes} "
        f"generator={ {k: v for k, v in asdict(gen).items() if k not in ('tables', 'fields')} }")

    history = {"loss": [], "eval": []}
    start = time.time()
    limit = cfg.max_minutes * 60 if cfg.max_minutes else None
    bar = None
    if cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, desc=f"{cfg.family}-cs{cfg.cs}", mininterval=5)
    running, step = None, 0
    while True:
        elapsed = time.time() - start
        progress = max(step / cfg.steps, elapsed / limit if limit else 0.0)
        if progress >= 1.0:
            break
        for g in opt.param_groups:
            g["lr"] = cfg.lr * lr_factor(progress, step, cfg.warmup, cfg.min_lr_ratio)
        ids, mask, labels = next(batches)
        ids, mask, labels = ids.to(device), mask.to(device), labels.to(device)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        value = loss.item() if step % cfg.log_every == 0 or step == 1 else None
        if value is not None:
            running = value if running is None else 0.5 * running + 0.5 * value
            history["loss"].append((step, value))
            if bar is not None:
                bar.set_postfix(loss=f"{value:.4f}", lr=f"{opt.param_groups[0]['lr']:.2e}")
        if bar is not None:
            bar.update(1)
        if cfg.eval_every and step % cfg.eval_every == 0:
            acc = _monitor(model, tokenizer, held_out, device)
            history["eval"].append((step, acc))
            log(f"step {step} ({(time.time() - start) / 60:.1f} min): loss (smoothed) {running:.4f} "
                f"held-out exact match {acc:.3f}")
    if bar is not None:
        bar.close()
    minutes = (time.time() - start) / 60
    acc = _monitor(model, tokenizer, held_out, device)
    history["eval"].append((step, acc))
    log(f"done: {step} steps in {minutes:.1f} min, held-out exact match {acc:.3f}")
    meta = {"train_config": asdict(cfg), "steps_done": step, "minutes": round(minutes, 2),
            "final_monitor_exact_match": acc, "parameters": n_parameters(model),
            "generator": asdict(gen) | {"tables": "vocabulary", "fields": "vocabulary"}}
    save_model(model, tokenizer, cfg.output_folder(), meta)
    return model, history


def _monitor(model, tokenizer, items, device) -> float:
    model.eval()
    acc = generation_accuracy(model, tokenizer, items, device=device)["exact_match"]
    model.train()
    return acc


def config_from_args(**kwargs) -> TrainConfig:
    names = {f.name for f in dc_fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in kwargs.items() if k in names and v is not None})
