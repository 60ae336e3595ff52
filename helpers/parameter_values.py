"""Settings as notebooks, papermill and YAML deliver them: ``papermill -r NAME VALUE`` and quoted YAML values
arrive as strings, so ``"2"`` must mean 2 and ``"False"`` must mean False (``bool("False")`` is True). Anything
else is refused with the setting's name, never guessed."""
from __future__ import annotations

import re

_TRUE, _FALSE = ("true", "1"), ("false", "0")
_INTEGER = re.compile(r"\s*-?[0-9]+\s*")  # (not str.isdigit: "²".isdigit() is True, int("²") fails)


def as_bool(name: str, value, allow_none: bool = False) -> bool | None:
    """True/False (also 0/1 and the strings "true"/"false"/"1"/"0", any case); None only with ``allow_none``."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    allowed = "True, False or None (the feature's default)" if allow_none else "True or False"
    raise ValueError(f"{name} must be {allowed}, got {value!r}")


def as_int(name: str, value, minimum: int | None = None) -> int:
    """An int (also a string of digits), at least ``minimum``; True/False are not ints here."""
    if isinstance(value, str) and _INTEGER.fullmatch(value):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        kind = "an int" if minimum is None else f"an int >= {minimum}"
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    return value


# Experiment settings that validation reads the same however they are spelt ("2" is 2, "false" is False,
# "Embedded" is "embedded"): a sweep resolves them to that one value, so that a cell's folder, hash and duplicate
# check see one cell (and ``semantic: "false"`` names the non-semantic model's folder, the model it loads). Values
# already so spelt are unchanged (finished cells keep their hashes); a value validation refuses is left as written,
# for it to report.
_BOOLS = ("semantic", "keep_incorrect", "circuit")
_FLAGS = ("use_novel_names", "use_synonyms_table", "use_synonyms_field")  # (None: the feature's default)
_INTS = ("cs_num", "batch_size", "seed")


def spelled_once(settings: dict) -> dict:
    """``settings`` (a sweep cell's, by name) with the typed ones as validation reads them (see above)."""
    out = dict(settings)
    for keys, read in ((_BOOLS, as_bool), (_FLAGS, lambda k, v: as_bool(k, v, allow_none=True)), (_INTS, as_int)):
        for k in keys:
            if k in out:
                try:
                    out[k] = read(k, out[k])
                except ValueError:
                    pass
    m = out.get("model_num")
    if isinstance(m, str) and (m.strip().lower() == "embedded" or _INTEGER.fullmatch(m)):
        out["model_num"] = "embedded" if m.strip().lower() == "embedded" else int(m)
    if isinstance(out.get("novel_words"), str):
        out["novel_words"] = out["novel_words"].strip().lower()
    return out
