"""Model registry: (model_num, cs_num, semantic) -> where the checkpoint lives.

Hub ids follow upstream TinySQL's ``sql_interp_model_location`` (``../shared/docs/upstream-tinysql.md`` §4);
every string was checked against upstream ``TinySQL/load_data/load_constants.py``, including the BM1 cs4 and
cs5 names that the doc abbreviates (cs5 is ``..._cs5_dataset_synonyms_experiment_1.2``). Upstream's
``AVAILABLE_MODELS`` omits the BM2/BM3 semantic repos; they are listed here (as in the doc's table).

``model_num`` is an ``int`` 0..5 (the upstream numbering) or the string ``"embedded"`` for the small models
shipped inside this package (``helpers/models/embedded/<family>-cs<N>/``, trained by ``make train``). Notebooks
can pass either as a plain parameter: ``model_num=1`` or ``model_num="embedded"`` (a digit string such as
``"1"`` is accepted too). For embedded models ``embedded_family`` picks ``"llama"`` or ``"gpt_neo"``.

| model_num | cs0 (base model)                              | semantic cs1/2/3 (cs4, cs5 for BM1)    | non-semantic cs1/2/3 |
|-----------|-----------------------------------------------|----------------------------------------|----------------------|
| 0         | openai-community/gpt2 (any cs_num 0..5)       | -                                      | -                    |
| 1         | roneneldan/TinyStories-Instruct-2Layers-33M   | sql_interp_bm1_cs{1,2,3}_experiment_{1,2,3}.10 | ..._{1,2,3}.8 |
| 2         | Qwen/Qwen2.5-0.5B-Instruct                    | sql_interp_bm2_cs{1,2,3}_experiment_{4,5,6}.3  | ....2         |
| 3         | withmartian/Llama-3.2-1B-Instruct             | sql_interp_bm3_cs{1,2,3}_experiment_{7,8,9}.3  | ....2         |
| 4         | ibm-granite/granite-3.0-1b-a400m-instruct     | -                                      | -                    |
| 5         | HuggingFaceTB/SmolLM-360M-Instruct            | -                                      | -                    |
| embedded  | -                                             | helpers/models/embedded/{llama,gpt_neo}-cs{1,2,3} | -         |

Base models (cs0, and GPT-2 at any cs) do not depend on ``semantic``: their spec records ``semantic=None``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from helpers.models.checkpoints import EMBEDDED_DIR
from helpers.parameter_values import as_bool

EMBEDDED = "embedded"
EMBEDDED_FAMILIES = ("llama", "gpt_neo")
EMBEDDED_CS = (1, 2, 3)

GPT2 = "openai-community/gpt2"
GPT2_CS = (0, 1, 2, 3, 4, 5)  # upstream returns GPT-2 for any cs_num; we accept the command sets that exist

# Base (cs0) checkpoints.
BASE_MODELS: dict[int, str] = {
    1: "roneneldan/TinyStories-Instruct-2Layers-33M",
    2: "Qwen/Qwen2.5-0.5B-Instruct",
    3: "withmartian/Llama-3.2-1B-Instruct",
    4: "ibm-granite/granite-3.0-1b-a400m-instruct",
    5: "HuggingFaceTB/SmolLM-360M-Instruct",
}

# Fine-tuned checkpoints: (model_num, cs_num, semantic) -> hub id.
FINETUNED: dict[tuple[int, int, bool], str] = {
    (1, 1, True): "withmartian/sql_interp_bm1_cs1_experiment_1.10",
    (1, 2, True): "withmartian/sql_interp_bm1_cs2_experiment_2.10",
    (1, 3, True): "withmartian/sql_interp_bm1_cs3_experiment_3.10",
    # cs4/cs5 exist only as synonym ("semantic") datasets upstream (HEAD's load_constants.py).
    (1, 4, True): "withmartian/sql_interp_bm1_cs4_dataset_synonyms_experiment_1.1",
    (1, 5, True): "withmartian/sql_interp_bm1_cs5_dataset_synonyms_experiment_1.2",
    (1, 1, False): "withmartian/sql_interp_bm1_cs1_experiment_1.8",
    (1, 2, False): "withmartian/sql_interp_bm1_cs2_experiment_2.8",
    (1, 3, False): "withmartian/sql_interp_bm1_cs3_experiment_3.8",
    (2, 1, True): "withmartian/sql_interp_bm2_cs1_experiment_4.3",
    (2, 2, True): "withmartian/sql_interp_bm2_cs2_experiment_5.3",
    (2, 3, True): "withmartian/sql_interp_bm2_cs3_experiment_6.3",
    (2, 1, False): "withmartian/sql_interp_bm2_cs1_experiment_4.2",
    (2, 2, False): "withmartian/sql_interp_bm2_cs2_experiment_5.2",
    (2, 3, False): "withmartian/sql_interp_bm2_cs3_experiment_6.2",
    (3, 1, True): "withmartian/sql_interp_bm3_cs1_experiment_7.3",
    (3, 2, True): "withmartian/sql_interp_bm3_cs2_experiment_8.3",
    (3, 3, True): "withmartian/sql_interp_bm3_cs3_experiment_9.3",
    (3, 1, False): "withmartian/sql_interp_bm3_cs1_experiment_7.2",
    (3, 2, False): "withmartian/sql_interp_bm3_cs2_experiment_8.2",
    (3, 3, False): "withmartian/sql_interp_bm3_cs3_experiment_9.2",
}

# Architecture family (config.model_type) expected for each model_num; a hint only, the config decides.
FAMILY_HINTS: dict[int, str] = {0: "gpt2", 1: "gpt_neo", 2: "qwen2", 3: "llama", 4: "granitemoe", 5: "llama"}


@dataclass(frozen=True)
class ModelSpec:
    """What to load and how to name it.

    ``model_id`` is a hub id or a local folder (``is_local``); ``model_num`` is an int, ``"embedded"`` or None
    (an ad-hoc ``model_path`` without a registry slot). ``semantic`` is None where it does not apply (base
    models). ``name`` is safe for file names, e.g. ``"bm1-cs1-sem"``, ``"bm2-cs0-base"``,
    ``"embedded-llama-cs1"``. ``needs_bm1_pad`` asks the loader for upstream's BM1 ``<|pad|>`` handling (the
    fine-tuned TinyStories checkpoints). ``overridden`` is True when ``model_path`` replaced the registry id.
    """

    model_id: str
    model_num: int | str | None
    cs_num: int | None
    semantic: bool | None
    family_hint: str | None
    is_embedded: bool
    name: str
    needs_bm1_pad: bool = False
    overridden: bool = False

    @property
    def display_name(self) -> str:
        """``name``, and where a ``model_path`` override came from (a title must not pass a folder off as the
        registry slot's own checkpoint)."""
        return f"{self.name} (from {self.model_id})" if self.overridden else self.name

    @property
    def is_local(self) -> bool:
        """True when ``model_id`` is an existing local folder (else it is treated as a hub id)."""
        return Path(self.model_id).expanduser().is_dir()


def embedded_model_dir(family: str, cs_num: int) -> Path:
    """Folder of an embedded model (it may not exist yet: ``make train`` creates it)."""
    return EMBEDDED_DIR / f"{family}-cs{cs_num}"


def _normalise_model_num(model_num):
    """int 0..5 stays, ``"embedded"`` (any case) and digit strings are accepted; anything else raises."""
    if isinstance(model_num, str):
        text = model_num.strip().lower()
        if text == EMBEDDED:
            return EMBEDDED
        if text.lstrip("-").isdigit():
            return int(text)
    elif isinstance(model_num, int) and not isinstance(model_num, bool):  # True/False are not model numbers
        return model_num
    raise ValueError(f"model_num must be an int 0..5 or {EMBEDDED!r}, got {model_num!r}.\n{valid_combinations()}")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "model"


def _invalid(model_num, cs_num, semantic, embedded_family=None) -> ValueError:
    what = f"model_num={model_num!r}, cs_num={cs_num!r}, semantic={semantic!r}"
    if model_num == EMBEDDED:
        what += f", embedded_family={embedded_family!r}"
    return ValueError(f"No registered model for {what}.\n{valid_combinations()}")


def valid_combinations() -> str:
    """Human-readable list of every valid (model_num, cs_num, semantic) combination."""
    lines = ["Valid combinations (model_num, cs_num, semantic):",
             f"  model 0 (GPT-2): any cs_num in {list(GPT2_CS)}; semantic ignored -> {GPT2}"]
    for m, base in BASE_MODELS.items():
        lines.append(f"  model {m}, cs 0 (base; semantic ignored) -> {base}")
        for (fm, cs, sem), hub in FINETUNED.items():
            if fm == m:
                lines.append(f"  model {m}, cs {cs}, semantic={sem} -> {hub}")
    for fam in EMBEDDED_FAMILIES:
        lines.append(f"  model {EMBEDDED!r}, embedded_family={fam!r}, cs_num in {list(EMBEDDED_CS)}, semantic=True "
                     f"-> {embedded_model_dir(fam, '{N}')}")
    lines.append("  or pass model_path= (a local folder or a hub id) to load any other checkpoint.")
    return "\n".join(lines)


def resolve_model(model_num, cs_num: int | None = None, semantic: bool = True, model_path: str | None = None,
                  embedded_family: str = "llama") -> ModelSpec:
    """The ``ModelSpec`` for a registry slot; ``model_path`` (local folder or hub id) overrides the location.

    ``model_num``: int 0..5, ``"embedded"``, or None together with ``model_path`` (an ad-hoc checkpoint).
    Raises ValueError listing the valid combinations for anything else. Resolving never touches the disk or
    the network: an embedded folder that does not exist yet still resolves (loading it gives a clear error).
    """
    if model_path is not None and not isinstance(model_path, (str, Path)):
        raise ValueError(f"model_path must be a folder or a hub id string, got {model_path!r}")
    if model_path is not None and str(model_path).strip() == "":
        model_path = None  # papermill/notebook default "" means "no override"
    semantic = as_bool("semantic", semantic)  # papermill -r / a quoted YAML value: "False" is False
    if model_num is not None:
        model_num = _normalise_model_num(model_num)
    if cs_num is not None and (isinstance(cs_num, bool) or not isinstance(cs_num, int)):
        if isinstance(cs_num, str) and cs_num.strip().isdigit():  # "2" is 2
            cs_num = int(cs_num)
        else:
            raise _invalid(model_num, cs_num, semantic, embedded_family)
    if model_num is None:
        if model_path is None:
            raise ValueError(f"Pass model_num or model_path.\n{valid_combinations()}")
        return ModelSpec(model_id=str(model_path), model_num=None, cs_num=cs_num, semantic=semantic,
                         family_hint=None, is_embedded=False, name=f"custom-{_slug(Path(str(model_path)).name)}",
                         overridden=True)

    if model_num == EMBEDDED:
        if embedded_family not in EMBEDDED_FAMILIES:  # (the one thing wrong: say it first, not after the hub list)
            raise ValueError(f"embedded_family must be one of {list(EMBEDDED_FAMILIES)}, got {embedded_family!r}")
        if cs_num not in EMBEDDED_CS or not semantic:
            raise _invalid(model_num, cs_num, semantic, embedded_family)
        folder = embedded_model_dir(embedded_family, cs_num)
        return ModelSpec(model_id=str(model_path) if model_path is not None else str(folder), model_num=EMBEDDED,
                         cs_num=cs_num, semantic=True, family_hint=embedded_family, is_embedded=True,
                         name=f"embedded-{embedded_family}-cs{cs_num}", overridden=model_path is not None)

    if model_num == 0:
        if cs_num not in GPT2_CS:
            raise _invalid(model_num, cs_num, semantic)
        hub, sem, name = GPT2, None, f"bm0-cs{cs_num}-base"
    elif model_num in BASE_MODELS and cs_num == 0:
        hub, sem, name = BASE_MODELS[model_num], None, f"bm{model_num}-cs0-base"
    elif (model_num, cs_num, semantic) in FINETUNED:
        hub, sem = FINETUNED[(model_num, cs_num, semantic)], semantic
        name = f"bm{model_num}-cs{cs_num}-{'sem' if semantic else 'nonsem'}"
    else:
        raise _invalid(model_num, cs_num, semantic)
    return ModelSpec(
        model_id=str(model_path) if model_path is not None else hub, model_num=model_num, cs_num=cs_num,
        semantic=sem, family_hint=FAMILY_HINTS[model_num], is_embedded=False, name=name,
        needs_bm1_pad=(model_num == 1 and cs_num != 0), overridden=model_path is not None,
    )


def list_models(include_hub: bool = True, include_embedded: bool = True) -> list[ModelSpec]:
    """Every distinct registry entry, for the sweep's full grid.

    One entry per checkpoint slot: GPT-2 appears once (cs0) although it resolves for any cs_num; base models
    appear at cs0; each fine-tuned (cs, semantic) pair once; embedded models for each family and cs 1..3.
    """
    specs: list[ModelSpec] = []
    if include_hub:
        specs.append(resolve_model(0, 0))
        for m in BASE_MODELS:
            specs.append(resolve_model(m, 0))
            specs.extend(resolve_model(fm, cs, sem) for (fm, cs, sem) in FINETUNED if fm == m)
    if include_embedded:
        specs.extend(resolve_model(EMBEDDED, cs, True, embedded_family=fam)
                     for fam in EMBEDDED_FAMILIES for cs in EMBEDDED_CS)
    return specs
