"""Evaluate TinySQL models: greedy generation accuracy and, per patching feature, clean/corrupt logit differences.

- Generation: batched greedy decoding with a KV cache, left padding and explicit ``position_ids`` (so a
  padded prompt sees the same positions as an unpadded one), stopping at EOS. Exact match and the mean
  partial score (``helpers.tinysql.scoring``) on held-out items of a seed never used in training.
- Features: for each feature of ``helpers.tinysql.pairs.FEATURES`` and each flag setting of :data:`FLAG_SETTINGS`,
  the clean run's top-1 accuracy at the answer position, the clean logit difference
  ``logit[clean_token_id] - logit[corrupt_token_id]`` (median, min, quantiles) and the flip rate: the share
  of pairs whose *corrupt* run has a negative logit difference.
"""
from __future__ import annotations

import statistics
from pathlib import Path

import torch

from helpers.tinysql.pairs import FEATURES, Feature, make_pairs
from helpers.tinysql.sql_items import generate_items

EVAL_SEED = 424_242  # the final held-out set; training streams use other seeds (see helpers.models.training)
PAIR_SEED = 7

FLAG_SETTINGS: dict[str, dict] = {
    "off": dict(),
    "syn_table": dict(use_synonyms_table=True),
    "syn_field": dict(use_synonyms_field=True),
    "syn_both": dict(use_synonyms_table=True, use_synonyms_field=True),
    "novel": dict(use_novel_names=True),
    "novel_syn_own": None,  # novel names + synonyms of the feature's own kind (filled per feature)
    "novel_held_out": None,  # the stricter case: held-out novel words (never in training) + synonyms of its kind
}


def flag_kwargs(feature: Feature, setting: str) -> dict:
    own = "use_synonyms_table" if feature.is_table else "use_synonyms_field"
    if setting == "novel_syn_own":
        return {"use_novel_names": True, own: True}
    if setting == "novel_held_out":
        return {"use_novel_names": True, own: True, "novel_words": "held_out"}
    return dict(FLAG_SETTINGS[setting])


def applies(feature: Feature, setting: str) -> bool:
    """Novel names apply to features that corrupt a name written with a leading space (not to a direction or a
    function word, nor to the field right after ``SUM(``, which the embedded tokenizer's novel words cannot be)."""
    return not flag_kwargs(feature, setting).get("use_novel_names") or (
        feature.corrupts_a_name and feature.answer_after_space)


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


def _left_pad(seqs: list[list[int]], pad_id: int, device):
    length = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, length - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, length - len(s):] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), pos.to(device)


@torch.no_grad()
def last_logits(model, seqs: list[list[int]], pad_id: int, batch_size: int = 256) -> torch.Tensor:
    """Logits [n, vocab] (float32, CPU) at the last position of each sequence (left padding, explicit positions)."""
    device = _device_of(model)
    out = []
    for i in range(0, len(seqs), batch_size):
        ids, mask, pos = _left_pad(seqs[i: i + batch_size], pad_id, device)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
        out.append(logits[:, -1].float().cpu())
    return torch.cat(out)


@torch.no_grad()
def greedy_generate(model, prompts: list[list[int]], eos_id: int, pad_id: int, max_new_tokens: int = 64,
                    batch_size: int = 256) -> list[list[int]]:
    """Greedy continuation ids (EOS excluded) of each prompt, batched with a KV cache."""
    device = _device_of(model)
    results: list[list[int]] = []
    for i in range(0, len(prompts), batch_size):
        ids, mask, pos = _left_pad(prompts[i: i + batch_size], pad_id, device)
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
        past = out.past_key_values
        next_tok = out.logits[:, -1].argmax(-1)
        next_pos = pos[:, -1] + 1
        gen = [next_tok]
        done = next_tok == eos_id
        for _ in range(max_new_tokens - 1):
            if bool(done.all()):
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            out = model(input_ids=next_tok[:, None], attention_mask=mask, position_ids=next_pos[:, None],
                        past_key_values=past, use_cache=True)
            past = out.past_key_values
            next_tok = out.logits[:, -1].argmax(-1)
            next_tok = torch.where(done, torch.full_like(next_tok, eos_id), next_tok)
            next_pos = next_pos + 1
            gen.append(next_tok)
            done = done | (next_tok == eos_id)
        rows = torch.stack(gen, dim=1).tolist()
        for row in rows:
            results.append(row[: row.index(eos_id)] if eos_id in row else row)
    return results


def _scoring():
    try:
        from helpers.tinysql import scoring
    except ImportError:
        return None
    return scoring


def generation_accuracy(model, tokenizer, items, device=None, batch_size: int = 256,
                        with_partial: bool = False, n_examples: int = 5) -> dict:
    """Exact match (and mean partial score) of greedy answers to ``items``; a few wrong answers as examples."""
    prompts = [list(p) for p in tokenizer([it.prompt for it in items])["input_ids"]]
    max_new = max(len(tokenizer(it.sql, add_special_tokens=False)["input_ids"]) for it in items) + 8
    outs = greedy_generate(model, prompts, tokenizer.eos_token_id, tokenizer.pad_token_id, max_new, batch_size)
    preds = [tokenizer.decode(o, skip_special_tokens=True).strip() for o in outs]
    truths = [it.sql for it in items]
    exact = [p == t for p, t in zip(preds, truths)]
    res = {"n": len(items), "exact_match": sum(exact) / len(items)}
    if with_partial:
        scoring = _scoring()
        if scoring is not None:
            res["exact_match_scoring"] = sum(scoring.exact_match(p, t) for p, t in zip(preds, truths)) / len(items)
            res["partial_score"] = sum(scoring.partial_score(p, t) for p, t in zip(preds, truths)) / len(items)
        else:
            res["partial_score"] = None
    res["errors"] = [{"prompt": it.prompt, "truth": t, "pred": p}
                     for it, p, t, e in zip(items, preds, truths, exact) if not e][:n_examples]
    return res


def _quantiles(values: list[float]) -> dict:
    s = sorted(values)
    q = lambda f: s[min(len(s) - 1, int(round(f * (len(s) - 1))))]  # noqa: E731
    return {"min": s[0], "q05": q(0.05), "q25": q(0.25), "median": statistics.median(s), "q75": q(0.75),
            "max": s[-1]}


def feature_metrics(model, tokenizer, pairs) -> dict:
    """Clean accuracy, clean logit-difference distribution and flip rate over clean/corrupt ``pairs``."""
    pad = tokenizer.pad_token_id
    clean = last_logits(model, [list(p.clean_ids) for p in pairs], pad)
    corrupt = last_logits(model, [list(p.corrupt_ids) for p in pairs], pad)
    c_id = torch.tensor([p.clean_token_id for p in pairs])
    x_id = torch.tensor([p.corrupt_token_id for p in pairs])
    rows = torch.arange(len(pairs))
    clean_ld = (clean[rows, c_id] - clean[rows, x_id]).tolist()
    corrupt_ld = (corrupt[rows, c_id] - corrupt[rows, x_id]).tolist()
    return {
        "n": len(pairs),
        "clean_accuracy": float((clean.argmax(-1) == c_id).float().mean()),
        "corrupt_top1_is_corrupt_answer": float((corrupt.argmax(-1) == x_id).float().mean()),
        "flip_rate": sum(v < 0 for v in corrupt_ld) / len(pairs),
        "clean_logit_diff": _quantiles(clean_ld),
        "corrupt_logit_diff": _quantiles(corrupt_ld),
    }


_PAIR_CACHE: dict = {}


def _tokenizer_key(tokenizer) -> int:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return hash(backend.to_str()) if backend is not None else id(tokenizer)


PAIRS_PER_BATCH = 10  # the pairs of one make_pairs batch share a skeleton: many small batches cover many


def cached_pairs(feature: Feature, tokenizer, cs: int, setting: str, n: int, seed: int = PAIR_SEED):
    """``n`` pairs drawn as batches of ``PAIRS_PER_BATCH`` with distinct seeds (templates, schemas, types)."""
    key = (feature, _tokenizer_key(tokenizer), cs, setting, n, seed)
    if key not in _PAIR_CACHE:
        _PAIR_CACHE[key] = [
            pair for b, start in enumerate(range(0, n, PAIRS_PER_BATCH))
            for pair in make_pairs(feature, tokenizer, cs_num=cs, batch_size=min(PAIRS_PER_BATCH, n - start),
                                   seed=seed * 1000 + b, **flag_kwargs(feature, setting))
        ]
    return _PAIR_CACHE[key]


def evaluate_features(model, tokenizer, cs: int, n_pairs: int = 200, settings=tuple(FLAG_SETTINGS),
                      features=FEATURES) -> dict:
    """Metrics per feature (those command set ``cs`` can express) and flag setting (None where it does not apply)."""
    out: dict = {}
    for feature in features:
        if cs not in feature.command_sets:
            continue
        out[feature.value] = {}
        for setting in settings:
            if not applies(feature, setting):
                out[feature.value][setting] = None
                continue
            pairs = cached_pairs(feature, tokenizer, cs, setting, n_pairs)
            out[feature.value][setting] = feature_metrics(model, tokenizer, pairs)
    return out


WORD_SET_SEEDS = tuple(range(900, 905))  # one make_pairs batch of PAIRS_PER_BATCH per seed


def evaluate_word_sets(model, tokenizer, cs: int, vocabularies=("suite", "upstream"), seeds=WORD_SET_SEEDS,
                       features=FEATURES) -> dict:
    """Clean accuracy and flip rate (every pair counted) per feature that ``cs`` can express and word set, at the
    feature's default flags (helpers.tinysql.pairs.DEFAULT_PAIR_OPTIONS): what the notebooks' "Word sets, measured"
    and helpers/models/embedded/README.md quote."""
    from dataclasses import asdict

    from helpers.tinysql.pairs import DEFAULT_PAIR_OPTIONS

    out: dict = {}
    for feature in features:
        if cs not in feature.command_sets:
            continue
        opts = asdict(DEFAULT_PAIR_OPTIONS[feature])
        for vocabulary in vocabularies:
            pairs = [p for seed in seeds for p in make_pairs(feature, tokenizer, cs_num=cs, batch_size=PAIRS_PER_BATCH,
                                                             seed=seed, vocabulary=vocabulary, **opts)]
            m = feature_metrics(model, tokenizer, pairs)
            out.setdefault(feature.value, {})[vocabulary] = {k: m[k] for k in ("n", "clean_accuracy", "flip_rate")}
    return out


def word_set_table(results: dict, vocabularies=("suite", "upstream")) -> str:
    """Markdown: per feature, the range over the models (``results``: model -> evaluate_word_sets) of clean
    accuracy / flip rate with each word set."""
    def span(xs):
        lo, hi = f"{min(xs):.2f}", f"{max(xs):.2f}"
        return lo if lo == hi else f"{lo}–{hi}"

    lines = ["| feature | " + " | ".join(f"{v} words" for v in vocabularies) + " |",
             "|---" * (len(vocabularies) + 1) + "|"]
    for feature in FEATURES:
        per = [r[feature.value] for r in results.values() if feature.value in r]
        if per:
            lines.append(f"| {feature.value} | " + " | ".join(
                f"{span([x[v]['clean_accuracy'] for x in per])} / {span([x[v]['flip_rate'] for x in per])}"
                for v in vocabularies) + " |")
    return "\n".join(lines)


def evaluate_model(model, tokenizer, cs: int, n_items: int = 1000, n_pairs: int = 200, transfer_cs=None,
                   seed: int = EVAL_SEED, settings=tuple(FLAG_SETTINGS)) -> dict:
    """Everything for one model: generation on its own CS (and ``transfer_cs``) and the feature table."""
    model.eval()
    items = generate_items(cs, n_items, seed)
    res = {"cs": cs, "generation": generation_accuracy(model, tokenizer, items, with_partial=True),
           "features": evaluate_features(model, tokenizer, cs, n_pairs, settings)}
    if transfer_cs:
        res["transfer"] = {f"cs{transfer_cs}": generation_accuracy(
            model, tokenizer, generate_items(transfer_cs, n_items, seed), with_partial=True)}
    return res


def evaluate_folder(folder: str | Path, cs: int, device: str = "cpu", **kw) -> dict:
    from helpers.models.checkpoints import load_trained

    model, tokenizer = load_trained(folder, device)
    res = evaluate_model(model, tokenizer, cs, **kw)
    res["folder"] = str(folder)
    res["model_type"] = model.config.model_type
    res["parameters"] = sum(p.numel() for p in model.parameters())
    return res


# ---------------------------------------------------------------------------------------------- bars & tables

BARS = {"exact_match": 0.95, "flip_rate": 0.90, "clean_accuracy": 0.99, "median_clean_logit_diff": 5.0}


def feature_passes(m: dict) -> bool:
    return (m["flip_rate"] >= BARS["flip_rate"] and m["clean_accuracy"] >= BARS["clean_accuracy"]
            and m["clean_logit_diff"]["median"] >= BARS["median_clean_logit_diff"])


def markdown_tables(results: dict[str, dict], defaults: dict | None = None) -> str:
    """``results``: name (e.g. ``llama-cs1``) -> evaluate_folder output. Generation table + feature table."""
    lines = ["| model | CS | exact match | partial score | transfer |", "|---|---|---|---|---|"]
    for name, r in results.items():
        g = r["generation"]
        tr = "; ".join(f"{k}: EM {v['exact_match']:.3f}, partial {v.get('partial_score') or float('nan'):.3f}"
                       for k, v in r.get("transfer", {}).items())
        ps = g.get("partial_score")
        lines.append(f"| {name} | {r['cs']} | {g['exact_match']:.3f} | {ps if ps is None else f'{ps:.3f}'} | {tr} |")
    lines += ["", "| model | feature | flags | flip rate | clean acc | median clean LD | min clean LD | q05 clean LD |"
              " passes |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        for feat, per in r["features"].items():
            for setting, m in per.items():
                if m is None:
                    continue
                star = " (default)" if defaults and defaults.get(feat) == setting else ""
                ld = m["clean_logit_diff"]
                lines.append(f"| {name} | {feat} | {setting}{star} | {m['flip_rate']:.3f} | {m['clean_accuracy']:.3f} "
                             f"| {ld['median']:.2f} | {ld['min']:.2f} | {ld['q05']:.2f} | "
                             f"{'yes' if feature_passes(m) else 'no'} |")
    return "\n".join(lines)


def compact_feature_table(results: dict[str, dict], defaults: dict | None = None) -> str:
    """One row per model x feature: flip rate under every flag setting, then clean accuracy and clean logit
    difference (median / min) under the default setting (``defaults``: feature -> setting name)."""
    settings = list(dict.fromkeys(s for r in results.values() for per in r["features"].values() for s in per))
    head = "| model | feature | " + " | ".join(f"flip {s}" for s in settings) + \
        " | default | clean acc | median LD | min LD | bars |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, r in results.items():
        for feat, per in r["features"].items():
            d = (defaults or {}).get(feat, settings[0])
            m = per[d]
            lines.append(f"| {name} | {feat} | " + " | ".join("–" if per.get(s) is None else f"{per[s]['flip_rate']:.2f}" for s in settings) +
                         f" | {d} | {m['clean_accuracy']:.3f} | {m['clean_logit_diff']['median']:.1f} | "
                         f"{m['clean_logit_diff']['min']:.1f} | {'pass' if feature_passes(m) else 'MISS'} |")
    return "\n".join(lines)
