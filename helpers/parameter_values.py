"""Settings as notebooks, papermill and YAML deliver them: ``papermill -r NAME VALUE`` and quoted YAML values
arrive as strings, so ``"2"`` must mean 2 and ``"False"`` must mean False (``bool("False")`` is True). Anything
else is refused with the setting's name, never guessed."""
from __future__ import annotations

_TRUE, _FALSE = ("true", "1"), ("false", "0")


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
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        kind = "an int" if minimum is None else f"an int >= {minimum}"
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    return value
