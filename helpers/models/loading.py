"""Load a registry model (or any local folder / hub id) into transformers + nnsight, one code path for all.

    from helpers.models.registry import resolve_model
    from helpers.models.loading import load_model
    loaded = load_model(resolve_model(1, 1))              # hub id from the registry
    loaded = load_model("helpers/models/embedded/llama-cs1")  # or any local HF folder / hub id
    loaded.lm        # nnsight LanguageModel around loaded.hf_model, tokenizer passed as a keyword
    loaded.geometry  # HeadGeometry (uses config.head_dim)

Everything goes through ``AutoConfig`` / ``AutoTokenizer`` / ``AutoModelForCausalLM.from_pretrained``, for
hub ids and local folders alike.

Hub access token: the ``HF_TOKEN`` environment variable, else the Colab secret ``HF_TOKEN`` (only when
``google.colab`` is importable), else whatever ``huggingface_hub`` finds itself (``hf auth login``). There is
deliberately no token parameter: papermill writes notebook parameters into the executed notebook.

Offline: ``HF_HUB_OFFLINE=1`` (read at call time) loads from the local HF cache only. Otherwise one quick
request checks whether the hub answers; if it does not, the load also uses the local cache only: a cached hub
id loads from its snapshot folder (no network call at all), an uncached one fails in well under a second with
a ``ModelLoadError`` instead of ~25 s of connection retries per file. Nothing is set globally.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from helpers.models.architectures import FamilySpec, HeadGeometry, family_spec, head_geometry
from helpers.models.registry import ModelSpec, resolve_model

BM1_PAD_TOKEN = "<|pad|>"
_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}
_TRUE = {"1", "true", "yes", "on"}


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says which one, why, and how to fix it."""


@dataclass
class LoadedModel:
    hf_model: torch.nn.Module  # the *ForCausalLM, eval mode, on ``device`` in ``dtype``
    tokenizer: object  # shared with ``lm`` (nnsight set padding_side="left" and, if missing, pad=eos in place)
    lm: object  # nnsight LanguageModel(hf_model, tokenizer=tokenizer); None when load_model(wrap=False)
    spec: ModelSpec
    family: FamilySpec
    geometry: HeadGeometry
    revision: str | None  # hub commit hash when known (else the requested revision); None for local folders
    dtype: torch.dtype
    device: torch.device
    attn_implementation: str | None
    pad_resized: bool = False  # True when BM1 pad handling grew the embedding matrix

    @property
    def config(self):
        return self.hf_model.config


# ---------------------------------------------------------------- token, dtype, device
def hf_token() -> str | None:
    """The hub token: ``HF_TOKEN`` env var, else the Colab secret ``HF_TOKEN``; None if neither (never raises)."""
    token = os.environ.get("HF_TOKEN", "").strip()
    if token:
        return token
    try:
        from google.colab import userdata  # type: ignore[import-not-found]
    except Exception:  # not on Colab
        return None
    try:
        token = userdata.get("HF_TOKEN")
    except Exception:  # secret missing, or the notebook was not granted access
        return None
    return (token.strip() or None) if isinstance(token, str) else None


def _token_source() -> str:
    if os.environ.get("HF_TOKEN", "").strip():
        return "HF_TOKEN is set in the environment"
    if hf_token():
        return "HF_TOKEN was found in the Colab secrets"
    return "no HF_TOKEN was found (environment variable unset, no Colab secret)"


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> cuda when available, else cpu. Asking for cuda without a GPU raises ValueError."""
    if isinstance(device, torch.device):
        dev = device
    elif device in (None, "", "auto"):
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise ValueError(f"device={device!r} is not a device: use 'auto', 'cpu', 'cuda' or 'cuda:N'") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but torch sees no CUDA GPU (torch {torch.__version__}); use 'cpu'")
    return dev


def resolve_dtype(dtype: str | torch.dtype = "auto", device: str | torch.device = "auto") -> torch.dtype:
    """``"auto"`` -> bfloat16 on cuda, float32 on cpu; else a name (float32/fp32, bfloat16/bf16, float16/fp16)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    key = (dtype or "auto").strip().lower()
    if key == "auto":
        return torch.bfloat16 if resolve_device(device).type == "cuda" else torch.float32
    if key.startswith("torch."):
        key = key[len("torch."):]
    if key not in _DTYPES:
        raise ValueError(f"dtype={dtype!r} unknown; use 'auto' or one of {sorted(_DTYPES)}")
    return _DTYPES[key]


# ---------------------------------------------------------------- hub reachability and errors
def _offline_env() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def hub_reachable(timeout: float = 3.0) -> bool:
    """One HEAD request to the hub endpoint through huggingface_hub's own session (honours proxies)."""
    try:
        from huggingface_hub import constants
        from huggingface_hub.utils import get_session

        get_session().head(constants.ENDPOINT, timeout=timeout)
        return True  # any HTTP answer, even an error status, means the hub can be reached
    except Exception:
        return False


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _hub_error(model_id: str, exc: BaseException, *, offline_reason: str | None, what: str) -> ModelLoadError:
    """A ModelLoadError that names the id, the cause in words, the token state (never the token) and the fix."""
    names = {type(e).__name__ for e in _chain(exc)}
    text = " ".join(str(e) for e in _chain(exc)).lower()
    if "GatedRepoError" in names or "gated repo" in text:
        why = (f"{model_id!r} is a gated repository: accept its licence on https://huggingface.co/{model_id} "
               "with your account and make that account's token available")
    elif offline_reason is not None or "LocalEntryNotFoundError" in names or "OfflineModeIsEnabled" in names \
            or "couldn't connect" in text:
        why = (f"the Hugging Face hub could not be reached ({offline_reason or 'network error'}) and {model_id!r} "
               "is not in the local Hugging Face cache")
    elif "RevisionNotFoundError" in names:
        why = f"the requested revision of {model_id!r} does not exist"
    elif "RepositoryNotFoundError" in names or "not a valid model identifier" in text or "401" in text:
        why = (f"{model_id!r} was not found on the hub, or it is private and the token gives no access "
               "(a wrong token also gives this)")
    else:
        why = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    local_fix = ("pass model_path= pointing to a local folder with config.json, the weights and the tokenizer "
                 "files (e.g. one written by save_pretrained)")
    if offline_reason is not None:
        fix = ("run where huggingface.co can be reached (unset HF_HUB_OFFLINE if it is set; a model downloaded "
               "once is then found in the cache offline), with HF_TOKEN set if the repository needs one, or "
               + local_fix)
    else:
        fix = "set the HF_TOKEN environment variable (or the Colab secret HF_TOKEN) to a token with access, or " \
              + local_fix
    msg = f"Could not load the {what} of {model_id!r}: {why}. Token: {_token_source()}. Fix: {fix}."
    token = hf_token()
    if token:
        msg = msg.replace(token, "<HF_TOKEN>")
    return ModelLoadError(msg)


# ---------------------------------------------------------------- attention implementation
def _choose_attn(config, requested: str | None) -> str | None:
    """None -> eager for families without SDPA (gpt_neo), else transformers' default (sdpa where supported).

    An explicit request the family cannot run (``"sdpa"`` for gpt_neo) falls back to eager with a warning, so
    one notebook setting works across a sweep of families.
    """
    from transformers import AutoModelForCausalLM

    try:
        cls = AutoModelForCausalLM._model_mapping[type(config)]
        supports_sdpa = bool(getattr(cls, "_supports_sdpa", False))
    except Exception:
        supports_sdpa = config.model_type != "gpt_neo"
    if requested in (None, "", "auto"):
        return None if supports_sdpa else "eager"
    if requested == "sdpa" and not supports_sdpa:
        warnings.warn(f"{config.model_type} does not support sdpa attention; using eager", stacklevel=3)
        return "eager"
    return requested


# ---------------------------------------------------------------- BM1 pad handling
def apply_bm1_pad(hf_model, tokenizer) -> bool:
    """Upstream's TinyStories fine-tune handling: pad token ``<|pad|>``, embeddings grown only if needed.

    Upstream always calls ``resize_token_embeddings(len(tok), mean_resizing=False)``; here the matrix is only
    grown when the tokenizer has more tokens than it has rows (the fine-tuned checkpoints are believed to ship
    the pad row already, 50,258 rows). Sets ``config.pad_token_id`` (and the generation config's). Returns
    whether the embeddings were resized.
    """
    if tokenizer.pad_token != BM1_PAD_TOKEN:
        tokenizer.add_special_tokens({"pad_token": BM1_PAD_TOKEN})
    rows = hf_model.get_input_embeddings().weight.shape[0]
    resized = len(tokenizer) > rows
    if resized:
        hf_model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    hf_model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(hf_model, "generation_config", None) is not None:
        hf_model.generation_config.pad_token_id = tokenizer.pad_token_id
    return resized


# ---------------------------------------------------------------- the loader
def _pin_revision(model_id: str, revision: str | None, **kwargs):
    """``revision`` resolved once to a commit (transformers' ``resolve_revision``, fail-open); else unchanged."""
    try:
        from transformers.utils.hub import resolve_revision

        return resolve_revision(model_id, revision, token=kwargs.get("token"),
                                local_files_only=kwargs.get("local_files_only", False),
                                cache_dir=kwargs.get("cache_dir"))
    except Exception:  # noqa: BLE001 - older transformers 5.x: each from_pretrained resolves on its own
        return revision


def _commit_of(model_id: str, revision, cache_dir: str | None) -> str | None:
    """The commit hash that was loaded: from the pinned revision, else from the cached config.json's snapshot."""
    resolved = getattr(revision, "resolved", None)
    if resolved:
        return str(resolved)
    try:
        from huggingface_hub import try_to_load_from_cache
        from transformers.utils.hub import extract_commit_hash

        path = try_to_load_from_cache(model_id, "config.json", cache_dir=cache_dir,
                                      revision=str(revision) if revision else None)
        return extract_commit_hash(path, None) if isinstance(path, str) else (str(revision) if revision else None)
    except Exception:  # noqa: BLE001 - provenance only, never fatal
        return str(revision) if revision else None


def _cached_snapshot(model_id: str, revision: str | None, cache_dir: str | None) -> str:
    """The local HF-cache snapshot folder of ``model_id`` (LocalEntryNotFoundError when it is not cached)."""
    from huggingface_hub import snapshot_download

    return snapshot_download(model_id, revision=revision, cache_dir=cache_dir, local_files_only=True)


def _snapshot_commit(folder: str) -> str | None:
    parent = Path(folder)
    return parent.name if parent.parent.name == "snapshots" and len(parent.name) == 40 else None


def _looks_like_path(model_id: str) -> bool:
    return (model_id.startswith(("/", "./", "../", "~", "\\")) or os.path.isabs(model_id)
            or model_id.count("/") > 1 or model_id in (".", ".."))


def _as_spec(spec_or_path) -> ModelSpec:
    if isinstance(spec_or_path, ModelSpec):
        return spec_or_path
    if isinstance(spec_or_path, (str, Path)) and str(spec_or_path).strip():
        return resolve_model(None, None, model_path=str(spec_or_path))
    raise TypeError(f"load_model needs a ModelSpec (helpers.models.registry.resolve_model), a folder or a hub id; "
                    f"got {spec_or_path!r}")


def wrap_nnsight(hf_model, tokenizer):
    """``nnsight.LanguageModel(hf_model, tokenizer=tokenizer)`` (keyword: required in nnsight 0.8).

    nnsight sets ``tokenizer.padding_side = "left"`` and, when there is no pad token, ``pad_token = eos_token``,
    in place. LanguageModel is deprecated in nnsight 0.8 in favour of ``TransformersModel(...,
    task="text-generation")``; its deprecation warning is silenced here.

    The model stays where it is: nnsight 0.8 builds a transformers pipeline around it, and a pipeline given no
    ``device`` moves its model to ``cuda:0`` whenever a GPU exists (seen on an H100: a model loaded with
    ``device="cpu"`` ran on the GPU while the result recorded the CPU).
    """
    from nnsight import LanguageModel

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*LanguageModel is deprecated.*")
        return LanguageModel(hf_model, tokenizer=tokenizer, device=next(hf_model.parameters()).device)


def load_model(spec_or_path, *, dtype: str | torch.dtype = "auto", device: str | torch.device = "auto",
               attn_implementation: str | None = None, revision: str | None = None,
               cache_dir: str | None = None, wrap: bool = True) -> LoadedModel:
    """Load a ``ModelSpec`` (``resolve_model(...)``), a local HF folder or a hub id.

    dtype: ``"auto"`` (bfloat16 on cuda, float32 on cpu), ``"float32"``, ``"bfloat16"``, ``"float16"`` or a
    torch.dtype. device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"``. attn_implementation: None (eager for
    gpt_neo, transformers' default — sdpa — elsewhere), ``"eager"``, ``"sdpa"``, ... revision: a hub branch,
    tag or commit (ignored for local folders); it is resolved once to a commit hash, which all three
    downloads use and ``LoadedModel.revision`` reports. cache_dir: a Hugging Face cache folder other than the
    default (e.g. on a mounted drive). wrap=False skips the nnsight wrapper (``lm`` is None).

    Raises ModelLoadError for a missing embedded model or local folder, and for hub failures (unreachable,
    unknown, gated, no token), with the fix in the message; ValueError for a family the suite does not know.
    """
    spec = _as_spec(spec_or_path)
    model_id = spec.model_id
    local = Path(model_id).expanduser()
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)

    if spec.is_embedded and not spec.overridden and not local.is_dir():
        raise ModelLoadError(
            f"embedded model {spec.name} not found at {local}; run `make train FAMILY={spec.family_hint} "
            f"CS={spec.cs_num}` to train it (it writes helpers/models/embedded/<family>-cs<N>/), or pass "
            "model_path= to another folder.")
    is_local = local.is_dir()
    if not is_local and _looks_like_path(model_id):
        raise ModelLoadError(f"model folder {model_id!r} does not exist (it looks like a path, not a hub id "
                             "'org/name'); check model_path.")

    offline_reason, commit = None, None
    if is_local:
        source, kwargs = str(local), {}
    else:
        if _offline_env():
            offline_reason = "HF_HUB_OFFLINE is set"
        elif not hub_reachable():
            offline_reason = "no network connection to the hub"
        if offline_reason is None:
            source = model_id
            kwargs = dict(token=hf_token(), cache_dir=cache_dir)
            kwargs["revision"] = _pin_revision(model_id, revision, **kwargs)
        else:
            # Offline: load the cached snapshot folder, so no library makes a network call (transformers 5.17
            # with peft installed still retries the hub for adapter_config.json under local_files_only).
            try:
                source = _cached_snapshot(model_id, revision, cache_dir)
            except Exception as exc:  # noqa: BLE001
                raise _hub_error(model_id, exc, offline_reason=offline_reason, what="files") from exc
            commit = _snapshot_commit(source) or revision
            kwargs = {}

    def _fail(exc, what):
        if is_local:
            return ModelLoadError(f"Could not load the {what} from local folder {source!r}: "
                                  f"{type(exc).__name__}: {exc}. A model folder needs config.json, the weights "
                                  "(model.safetensors) and the tokenizer files, as written by save_pretrained.")
        return _hub_error(model_id, exc, offline_reason=offline_reason, what=what)

    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(source, **kwargs)
    except Exception as exc:  # noqa: BLE001 - turned into one clear error
        raise _fail(exc, "config") from exc
    family = family_spec(config)  # fail before downloading weights for a family the suite does not know
    attn = _choose_attn(config, attn_implementation)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    except Exception as exc:  # noqa: BLE001
        raise _fail(exc, "tokenizer") from exc
    model_kwargs = dict(kwargs, config=config, dtype=torch_dtype)
    if attn is not None:
        model_kwargs["attn_implementation"] = attn
    try:
        hf_model = AutoModelForCausalLM.from_pretrained(source, **model_kwargs)
    except Exception as exc:  # noqa: BLE001
        raise _fail(exc, "model weights") from exc
    hf_model = hf_model.to(dev).eval()

    pad_resized = apply_bm1_pad(hf_model, tokenizer) if spec.needs_bm1_pad else False
    if not is_local and offline_reason is None:
        commit = _commit_of(model_id, kwargs["revision"], cache_dir)
    lm = wrap_nnsight(hf_model, tokenizer) if wrap else None
    return LoadedModel(
        hf_model=hf_model, tokenizer=tokenizer, lm=lm, spec=spec, family=family,
        geometry=head_geometry(hf_model.config), revision=commit, dtype=torch_dtype, device=dev,
        attn_implementation=getattr(hf_model.config, "_attn_implementation", attn), pad_resized=pad_resized,
    )
