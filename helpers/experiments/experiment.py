"""One whole feature experiment: validate the settings, load the model, build clean/corrupt pairs, read the
model's clean prediction, patch every head at every position, and return an :class:`ExperimentResult`.

The feature notebooks, the sweep and the explorer all call :func:`run_experiment`; saving
(:mod:`helpers.experiments.results`) and drawing (:mod:`helpers.experiments.plotting`) take its result. Settings are checked before
anything is loaded, so an unknown feature, model or command set fails at once with a message that lists
the valid choices.
"""
from __future__ import annotations

import ast
import datetime as _dt
import functools
import html
import time
import warnings
from dataclasses import asdict, dataclass, field, replace

import torch

from helpers.tinysql import pairs as P
from helpers.parameter_values import as_bool, as_int
from helpers.models.registry import ModelSpec, resolve_model


@dataclass(frozen=True)
class ExperimentSettings:
    """The notebook parameters that decide a result (``output_dir`` is where, not what).

    A flag left as None takes the feature's default (``helpers.tinysql.pairs.DEFAULT_PAIR_OPTIONS`` where the project
    defines it, else False); :func:`validate` resolves it, so a result always records the value used.
    """

    model_num: int | str | None = "embedded"
    cs_num: int = 1
    feature_name: str = "ENGTABLENAME"
    use_novel_names: bool | None = False
    use_synonyms_table: bool | None = None
    use_synonyms_field: bool | None = None
    vocabulary: str | None = None  # "suite" | "upstream"; None: "suite" for the embedded models, else "upstream"
    novel_words: str = "trained"  # with use_novel_names: "trained" (upstream's novel words) or "held_out" (in no
    # training text of the embedded models: the stricter case)
    batch_size: int = 5
    seed: int = 0
    model_path: str | None = None
    dtype: str = "auto"  # auto: float32 on CPU, bfloat16 on CUDA
    device: str = "cpu"  # "auto": CUDA when available
    semantic: bool = True
    embedded_family: str = "llama"
    keep_incorrect: bool = False
    circuit: bool = True  # the "From heads to a circuit" section (helpers.circuits): faithfulness, attention

    def to_dict(self) -> dict:
        return asdict(self)


FLAGS = ("use_novel_names", "use_synonyms_table", "use_synonyms_field")


NOTEBOOK_ONLY_PARAMETERS = ("output_dir", "devices")  # notebook parameters that are not experiment settings
# (devices: where the head sweep runs, not what it finds: the merged result is the one-device result)


def _papermill_parameters(namespace: dict) -> set[str]:
    """The names papermill's injected cell assigned in this kernel ("# Parameters" then one assignment a name),
    read from IPython's input history ``In``; empty outside IPython or without papermill."""
    for source in reversed(namespace.get("In") or []):
        if isinstance(source, str) and source.lstrip().startswith("# Parameters\n"):
            try:
                tree = ast.parse(source)
            except SyntaxError:
                return set()
            return {t.id for node in tree.body if isinstance(node, ast.Assign)
                    for t in node.targets if isinstance(t, ast.Name)}
    return set()


def notebook_parameters(namespace: dict, feature: str | None = None) -> dict:
    """The :class:`ExperimentSettings` fields found in ``namespace`` (a notebook's ``globals()``), by name.

    The feature notebooks call ``run_experiment(**notebook_parameters(globals(), "DEFTABLENAME"))`` so that their
    parameters cell (papermill's) is the single place the settings are written. Raises ValueError for a name
    papermill passed that is no parameter (``-p cs_nmu 2`` would otherwise run command set 1 with only papermill's
    warning), and, with ``feature``, for a ``feature_name`` other than the notebook's own (its prose and headings
    are that feature's).
    """
    names = ExperimentSettings.__dataclass_fields__
    unknown = sorted(n for n in _papermill_parameters(namespace) - set(names) - set(NOTEBOOK_ONLY_PARAMETERS)
                     if not n.startswith("PAPERMILL_"))  # (papermill's own --inject-paths names)
    if unknown:
        raise ValueError(f"unknown notebook parameter(s) {', '.join(map(repr, unknown))}; the parameters are: "
                         f"{', '.join(list(names) + list(NOTEBOOK_ONLY_PARAMETERS))}")
    params = {k: namespace[k] for k in names if k in namespace}
    if feature is not None:
        own = P.parse_feature(feature)
        given = P.parse_feature(params.get("feature_name", own.value))  # an unknown name: the valid ones listed
        if given is not own:
            raise ValueError(f"this notebook studies {own.value}; feature_name={params['feature_name']!r} was "
                             f"passed: run notebooks/{given.value}.ipynb for that feature")
        params["feature_name"] = own.value
    return params


def _feature_defaults(feature: P.Feature) -> dict:
    """Per-feature default flags from ``helpers.tinysql.pairs.DEFAULT_PAIR_OPTIONS`` (a PairOptions or a dict)."""
    table = getattr(P, "DEFAULT_PAIR_OPTIONS", None) or {}
    opts = table.get(feature, table.get(feature.value)) if hasattr(table, "get") else None
    if opts is None:
        return {}
    opts = opts if isinstance(opts, dict) else asdict(opts)
    return {k: v for k, v in opts.items() if v is not None}


def validate(settings: ExperimentSettings) -> tuple[ExperimentSettings, P.Feature, ModelSpec]:
    """Check every setting without loading anything; raise ValueError naming the valid choices.

    Returns the settings with flags resolved and the feature name canonical, the feature and the model spec.
    """
    feature = P.parse_feature(settings.feature_name)
    spec = resolve_model(settings.model_num, settings.cs_num, settings.semantic, settings.model_path,
                         embedded_family=settings.embedded_family)
    P.check_command_set(feature, spec.cs_num)
    from helpers.tinysql.word_sets import resolve_vocabulary

    vocabulary = resolve_vocabulary(settings.vocabulary, settings.model_num)
    batch_size = as_int("batch_size", settings.batch_size, minimum=1)
    seed = as_int("seed", settings.seed)
    keep_incorrect = as_bool("keep_incorrect", settings.keep_incorrect)
    circuit = as_bool("circuit", settings.circuit)
    from helpers.models.loading import resolve_device, resolve_dtype

    device = str(resolve_device(settings.device))  # "auto" -> cuda if available; cuda without a GPU raises
    dtype = str(resolve_dtype(settings.dtype, device)).replace("torch.", "")  # "auto" -> bf16 on cuda, else fp32
    defaults = _feature_defaults(feature)
    flags = {}
    for name in FLAGS:
        value = as_bool(name, getattr(settings, name), allow_none=True)
        flags[name] = defaults.get(name, False) if value is None else value
    novel_words = str(settings.novel_words).strip().lower()
    if novel_words not in P.NOVEL_WORDS:
        raise ValueError(f"Unknown novel_words {settings.novel_words!r}: choose one of {list(P.NOVEL_WORDS)}")
    if flags["use_novel_names"] and not feature.corrupts_a_name:
        raise ValueError(f"use_novel_names does not apply to {feature.value}: it corrupts a direction or function "
                         "word, not a name")
    model_path = spec.model_id if spec.overridden else None  # ("" and blanks mean no override)
    # recorded as read: "2" from papermill -r or a quoted YAML value is 2, "False" is False
    return (replace(settings, feature_name=feature.value, cs_num=spec.cs_num,
                    semantic=as_bool("semantic", settings.semantic), batch_size=batch_size, seed=seed,
                    keep_incorrect=keep_incorrect, circuit=circuit, model_path=model_path, dtype=dtype, device=device,
                    vocabulary=vocabulary, novel_words=novel_words, **flags),
            feature, spec)


@dataclass
class ExperimentResult:
    """Everything one run produced. ``patching`` is a ``helpers.patching.HeadPatchingResult``."""

    settings: ExperimentSettings
    feature: P.Feature
    spec: ModelSpec
    pairs: list
    patching: object
    predicted_ids: list[int]  # clean argmax at each example's answer position
    tokens: list[list[str]]  # each example's clean tokens, decoded one by one
    generations: dict  # the shown example's greedy SQL on the clean and corrupt prompt
    model_info: dict  # model id, revision, family, geometry, dtype, device
    tokenizer: object
    started_at: str
    finished_at: str
    timings: dict = field(default_factory=dict)
    circuit: object = None  # a helpers.circuits.analysis.CircuitResult when settings.circuit
    usable_words: object = None  # helpers.tinysql.pairs.UsableWords: how many of the word set's lists were drawable

    # ------------------------------------------------------------------------------------------- derived
    def decode(self, token_id: int) -> str:
        return self.tokenizer.decode([int(token_id)])

    @property
    def geometry(self):
        return self.model_info["geometry"]

    @property
    def n_positions(self) -> int:
        return max(len(p.clean_ids) for p in self.pairs)

    @property
    def reference(self) -> int:
        """The example whose tokens label the columns: the first of the longest (its indices are the columns)."""
        lengths = [len(p.clean_ids) for p in self.pairs]
        return lengths.index(max(lengths))

    @property
    def shown(self) -> int:
        """The example displayed by :meth:`example_markdown`: the reference if included, else the first included."""
        included = [bool(x) for x in self.patching.included]
        return self.reference if included[self.reference] or not any(included) else included.index(True)

    def offset(self, i: int) -> int:
        """Column of example ``i``'s first token: examples are aligned at their last token (the answer position)."""
        return self.n_positions - len(self.pairs[i].clean_ids)

    @functools.cached_property
    def aligned(self):
        """``patching`` with every example shifted right so that all end at the last column.

        The prompts end alike (``### Response: SELECT ...``) and the answer is read at the last token, so this
        lines up the positions that matter across examples of different lengths; the first columns (before
        any corruption, exactly 0) hold only the longer examples. NaN pads the left. ``mean()``, ``std()`` and
        ``count()`` of this object are what the heatmaps, the top-heads table and the JSON show.
        """
        p = self.patching
        shifted = torch.full_like(p.patched_logit_diff, float("nan"))
        for i, pair in enumerate(self.pairs):
            n = len(pair.clean_ids)
            shifted[i, ..., self.offset(i):] = p.patched_logit_diff[i, ..., :n]
        return replace(p, patched_logit_diff=shifted)

    def token_labels(self) -> list[str]:
        """``{tok}_{i}`` per aligned column, from the reference example; ``*`` marks a column where the examples
        hold different tokens."""
        ref = self.tokens[self.reference]
        labels = []
        for j, tok in enumerate(ref):
            same = all(t[j - self.offset(i)] == tok for i, t in enumerate(self.tokens) if j >= self.offset(i))
            labels.append(f"{tok.strip() or repr(tok)}{'' if same else '*'}_{j}")
        return labels

    @property
    def clean_correct(self) -> list[bool]:
        return [bool(x) for x in self.patching.clean_correct]

    @property
    def clean_accuracy(self) -> float:
        return sum(self.clean_correct) / len(self.clean_correct)

    def mean(self):
        """Mean normalised score over included examples, [layer, head, aligned pos] (NaN where none has one)."""
        return self.aligned.mean()

    def std(self):
        return self.aligned.std()

    def top_heads(self, k: int = 10):
        """The ``k`` (layer, head, position) cells with the largest |mean| as a pandas DataFrame."""
        import pandas as pd

        mean, std, count = self.mean(), self.std(), self.aligned.count()
        labels = self.token_labels()
        flat = torch.nan_to_num(mean.abs(), nan=-1.0).flatten()
        order = torch.argsort(flat, descending=True)[: max(0, k)]
        rows = []
        n_heads, n_pos = mean.shape[1], mean.shape[2]
        for idx in order.tolist():
            if flat[idx] < 0:
                break
            layer, rest = divmod(idx, n_heads * n_pos)
            head, pos = divmod(rest, n_pos)
            rows.append(dict(head=f"L{layer}_H{head}", layer=layer, head_index=head, position=pos,
                             token=labels[pos] if pos < len(labels) else f"pos_{pos}",
                             mean=float(mean[layer, head, pos]), std=float(std[layer, head, pos]),
                             n=int(count[layer, head, pos])))
        return pd.DataFrame(rows, columns=["head", "layer", "head_index", "position", "token", "mean", "std", "n"])

    def role_table(self, k: int = 10):
        """Heads ranked by their score at two positions aligned by role, not index: each example's corrupted
        token and its last token (the one that predicts the answer). Means over the included examples (full
        precision: the notebooks show it ``.round(4)``); cells at other positions are not in it."""
        import pandas as pd

        p = self.patching
        rows = [i for i in range(len(self.pairs)) if bool(p.included[i])]
        if not rows:
            return pd.DataFrame(columns=["head", "at_corrupted_token", "at_answer_position"])
        norm = p.normalised
        corrupted = torch.stack([norm[i, :, :, self.pairs[i].corrupted_position] for i in rows])
        answer = torch.stack([norm[i, :, :, self.pairs[i].answer_position] for i in rows])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            at_c, at_a = torch.nanmean(corrupted, 0).flatten(), torch.nanmean(answer, 0).flatten()
        n_heads = norm.shape[2]
        table = pd.DataFrame({"head": [f"L{j // n_heads}_H{j % n_heads}" for j in range(at_c.numel())],
                              "at_corrupted_token": at_c.tolist(), "at_answer_position": at_a.tolist()})
        strength = table[["at_corrupted_token", "at_answer_position"]].abs().max(axis=1).fillna(-1)
        return table.loc[strength.sort_values(ascending=False, kind="stable").index[:k]].reset_index(drop=True)

    # ------------------------------------------------------------------------------------------- display
    def example_markdown(self, index: int | None = None) -> str:
        """One example's clean and corrupt prompt with the corrupted token marked, and the clean prediction."""
        i = self.shown if index is None else index
        pair, tokens = self.pairs[i], self.tokens[i]
        pos, n_prompt = pair.corrupted_position, pair.n_prompt_tokens
        corrupt_tok = self.decode(pair.corrupt_ids[pos])

        def marked(tok_at_pos: str) -> str:
            prompt = "".join(tokens[:pos]) + f"[[{tok_at_pos}]]" + "".join(tokens[pos + 1:n_prompt])
            return html.escape(prompt)

        predicted = self.decode(self.predicted_ids[i])
        verdict = "correct" if self.clean_correct[i] else "WRONG"
        answer_prefix = html.escape("".join(tokens[n_prompt:]))
        lines = [
            f"**Example {i}** of {len(self.pairs)} ({self.feature.value}: {P.DESCRIPTIONS[self.feature]}); "
            f"the corrupted token (position {pos}) is marked `[[ ]]`.",
            "",
            f"- Clean prompt: <code>{marked(tokens[pos])}</code>",
            f"- Corrupt prompt: <code>{marked(corrupt_tok)}</code>",
            f"- Answer prefix fed after the prompt: <code>{answer_prefix}</code> → the next token is scored "
            f"(position {pair.answer_position}): clean answer `{pair.clean_answer}`, corrupt answer "
            f"`{pair.corrupt_answer}`",
            f"- Model's clean prediction there: `{predicted.strip()}` ({verdict}); clean prompts predicted "
            f"correctly: {sum(self.clean_correct)}/{len(self.pairs)}",
        ]
        for side in ("clean", "corrupt"):
            if self.generations.get(side) is not None:
                lines.append(f"- Greedy SQL on the {side} prompt: <code>{html.escape(self.generations[side])}</code>")
        return "\n".join(lines)

    def show_example(self, index: int | None = None):
        from IPython.display import Markdown, display

        display(Markdown(self.example_markdown(index)))

    def mean_logit_diffs(self) -> tuple[float | None, float | None]:
        """Clean and corrupt logit differences averaged over the included examples (all when none is)."""
        p = self.patching
        use = p.included if bool(p.included.any()) else torch.ones_like(p.included)
        out = []
        for values in (p.clean_logit_diff, p.corrupt_logit_diff):
            v = values[use].float()
            v = v[torch.isfinite(v)]
            out.append(float(v.mean()) if v.numel() else None)
        return out[0], out[1]

    def flips(self) -> tuple[int, int]:
        """(flipped, counted): of the included examples with finite logit differences (``counted``), those whose
        clean run prefers the clean word and whose corrupt run the corrupt one. Where a corruption does not flip
        the answer, patching shows what restores confidence, not what carries the name."""
        p = self.patching
        clean, corrupt = p.clean_logit_diff, p.corrupt_logit_diff
        use = p.included & torch.isfinite(clean) & torch.isfinite(corrupt)
        return int(((clean > 0) & (corrupt < 0) & use).sum()), int(use.sum())

    def flip_warning(self) -> str | None:
        flipped, n = self.flips()
        if n == 0 or 2 * flipped >= n:
            return None
        why = ""
        if self.settings.use_novel_names and self.feature.in_instruction:
            why = (" Expected with use_novel_names in the Instruction: the schema does not hold the novel word, and a "
                   "model that reads the schema keeps writing the schema's name.")
        elif self.settings.use_novel_names and self.settings.novel_words == "held_out":
            why = (" The held-out novel words occur in no training text of the embedded models; even with the "
                   "novel-names stage they copy them in only 0.20-0.87 of pairs (helpers/models/embedded/README.md).")
        elif self.settings.use_novel_names and self.spec.is_embedded:
            why = (" The embedded models copy novel names in 0.90-1.00 of pairs at the notebooks' default synonyms, "
                   "fewer without them (llama-cs2's novel tables: 0.40; helpers/models/embedded/README.md).")
        return (f"The corruption flips the model's answer in only {flipped} of {n} included examples: in the others "
                "the corrupt run does not prefer the corrupt word over the clean one, so the heatmaps show what "
                "restores the model's confidence rather than what carries the name into the answer." + why)

    def summary(self) -> str:
        p = self.patching
        clean, corrupt = self.mean_logit_diffs()
        text = (f"{self.spec.display_name} | CS{self.settings.cs_num} | {self.feature.value} | "
                f"novel={self.settings.use_novel_names} syn_table={self.settings.use_synonyms_table} "
                f"syn_field={self.settings.use_synonyms_field} | {self.settings.vocabulary} words | "
                f"{len(self.pairs)} examples, "
                f"{sum(self.clean_correct)} clean-correct, {int(p.included.sum())} included | "
                f"mean logit diff clean {clean if clean is None else round(clean, 3)}, corrupt "
                f"{corrupt if corrupt is None else round(corrupt, 3)} | {self.timings.get('total_s', float('nan')):.1f}s")
        if self.usable_words is not None:
            text += "\n" + self.usable_words.summary()
        usable = int((p.included & ~p.guarded).sum())
        if usable == 0:
            text += ("\nNo example has a usable normalised score (none included, or |clean - corrupt| below "
                     f"{p.min_denominator} for all): the heatmaps will be blank.")
        elif (warning := self.flip_warning()) is not None:
            text += "\n" + warning
        return text


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _weights(model_id: str) -> str | None:
    """A content hash of a local folder's weights, config and tokenizer (a sweep's result of a model retrained since
    is not served as finished); None for hub ids."""
    from helpers.experiments.result_json import weights_fingerprint

    return weights_fingerprint(model_id)


def _revision(loaded) -> str | None:
    """The hub commit of the checkpoint, else a short content hash of a local folder's config and weights."""
    from helpers.experiments.result_json import folder_fingerprint

    return loaded.revision or folder_fingerprint(loaded.spec.model_id)


@torch.no_grad()
def clean_predictions(hf_model, pairs) -> list[int]:
    """Argmax token at each example's answer position on its clean ids (one forward per example)."""
    device = next(hf_model.parameters()).device
    out = []
    for pair in pairs:
        logits = hf_model(torch.tensor([pair.clean_ids], device=device)).logits
        out.append(int(logits[0, pair.answer_position].argmax()))
    return out


@torch.no_grad()
def greedy_sql(hf_model, tokenizer, prompt_ids, max_new_tokens: int = 40) -> str:
    """The model's greedy continuation of ``prompt_ids`` (its SQL), decoded, stopped at EOS."""
    device = next(hf_model.parameters()).device
    ids = torch.tensor([list(prompt_ids)], device=device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                            do_sample=False, eos_token_id=tokenizer.eos_token_id, pad_token_id=pad)
    return tokenizer.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True)


def parse_devices(devices) -> list[str]:
    """``"cuda:0,cuda:1"`` / a list -> ["cuda:0", "cuda:1"]; None or "" -> []. Each is checked (an unknown device,
    or CUDA without a GPU, raises)."""
    if devices is None or (isinstance(devices, str) and not devices.strip()):
        return []
    items = devices.split(",") if isinstance(devices, str) else list(devices)
    from helpers.models.loading import resolve_device

    out = [str(resolve_device(str(d).strip())) for d in items if str(d).strip()]
    if not out:
        raise ValueError(f"devices={devices!r} names no device")
    for d in out:
        index = torch.device(d).index
        if torch.device(d).type == "cuda" and index is not None and index >= torch.cuda.device_count():
            raise ValueError(f"devices={devices!r}: {d} does not exist here ({torch.cuda.device_count()} GPUs)")
    return out


def run_experiment(model_num="embedded", cs_num: int = 1, feature_name: str = "ENGTABLENAME", *,
                   use_novel_names: bool | None = False, use_synonyms_table: bool | None = None,
                   use_synonyms_field: bool | None = None, vocabulary: str | None = None,
                   novel_words: str = "trained", batch_size: int = 5,
                   seed: int = 0,
                   model_path: str | None = None, dtype: str = "auto", device: str = "cpu",
                   semantic: bool = True, embedded_family: str = "llama", keep_incorrect: bool = False,
                   circuit: bool = True, loaded=None, progress: bool = True, generate: bool = True,
                   devices: str | list[str] | None = None) -> ExperimentResult:
    """Run one feature experiment end to end.

    ``devices`` (e.g. ``["cuda:0", "cuda:1"]`` or ``"cuda:0,cuda:1"``): the head sweep's examples split across them,
    one worker process per further device holding its own copy of the model (helpers.patching.multi_device); the
    model of this process, and everything but the sweep, runs on the first, which replaces ``device``. The merged
    result is the one-device result (bit for bit on the CPU).

    ``loaded`` reuses an already loaded ``helpers.models.loading.LoadedModel`` (the explorer caches them); it must
    match the settings' model. The settings are validated before the model is loaded.
    """
    device_list = parse_devices(devices)
    if device_list:
        device = device_list[0]
    settings, feature, spec = validate(ExperimentSettings(
        model_num=model_num, cs_num=cs_num, feature_name=feature_name, use_novel_names=use_novel_names,
        use_synonyms_table=use_synonyms_table, use_synonyms_field=use_synonyms_field, vocabulary=vocabulary,
        novel_words=novel_words,
        batch_size=batch_size,
        seed=seed, model_path=model_path, dtype=dtype, device=device, semantic=semantic,
        embedded_family=embedded_family, keep_incorrect=keep_incorrect, circuit=circuit))
    from helpers.models.loading import load_model
    from helpers.patching import patch_heads

    started, t0 = _now(), time.perf_counter()
    timings = {}
    if loaded is None:
        loaded = load_model(spec, dtype=settings.dtype, device=settings.device)
    timings["load_s"] = time.perf_counter() - t0

    t = time.perf_counter()
    pairs = P.make_pairs(feature, loaded.tokenizer, cs_num=settings.cs_num, batch_size=settings.batch_size,
                         seed=settings.seed, use_novel_names=settings.use_novel_names,
                         use_synonyms_table=settings.use_synonyms_table,
                         use_synonyms_field=settings.use_synonyms_field, vocabulary=settings.vocabulary,
                         novel_words=settings.novel_words)
    usable = P.usable_words(loaded.tokenizer, settings.vocabulary, settings.use_synonyms_table,
                            settings.use_synonyms_field, feature)
    timings["pairs_s"] = time.perf_counter() - t

    t = time.perf_counter()
    hf_model, tok = loaded.hf_model, loaded.tokenizer
    predicted = clean_predictions(hf_model, pairs)
    tokens = [[tok.decode([i]) for i in p.clean_ids] for p in pairs]
    timings["predict_s"] = time.perf_counter() - t

    t = time.perf_counter()
    if len(device_list) > 1:
        from helpers.patching.multi_device import patch_heads_across_devices

        patching = patch_heads_across_devices(loaded.hf_model, spec, settings.dtype, device_list, pairs,
                                              keep_incorrect=settings.keep_incorrect, progress=progress)
    else:
        patching = patch_heads(loaded.hf_model, pairs, keep_incorrect=settings.keep_incorrect, progress=progress)
    timings["patch_s"] = time.perf_counter() - t

    result = ExperimentResult(
        settings=settings, feature=feature, spec=spec, pairs=pairs, patching=patching, predicted_ids=predicted,
        tokens=tokens, generations={},
        model_info=dict(model_id=spec.model_id, model_name=spec.name, revision=_revision(loaded),
                        weights=_weights(spec.model_id),
                        family=loaded.family.model_type, geometry=loaded.geometry, dtype=settings.dtype,
                        device=str(next(hf_model.parameters()).device),  # where it ran, not where it was asked
                        sweep_devices=device_list or None),
        tokenizer=tok, started_at=started, finished_at="", timings=timings, usable_words=usable)
    if settings.circuit and result.patching.n_included:
        from helpers.circuits.analysis import analyse_circuit

        t = time.perf_counter()
        result.circuit = analyse_circuit(result, hf_model, progress=progress)
        timings["circuit_s"] = time.perf_counter() - t
    if generate:
        t = time.perf_counter()
        ref = result.pairs[result.shown]
        result.generations = {side: greedy_sql(hf_model, tok, ids[:ref.n_prompt_tokens])
                              for side, ids in (("clean", ref.clean_ids), ("corrupt", ref.corrupt_ids))}
        timings["generate_s"] = time.perf_counter() - t
    result.finished_at = _now()
    timings["total_s"] = time.perf_counter() - t0
    if (warning := result.flip_warning()) is not None:
        warnings.warn(warning, stacklevel=2)
    return result
