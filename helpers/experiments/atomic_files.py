"""Files written atomically (a temporary file beside the target, then ``os.replace``): a reader, or a sweep
killed mid-write, never sees half a file."""
from __future__ import annotations

import json
import os
import secrets
from pathlib import Path


def _create_beside(path: Path) -> tuple[int, Path]:
    """A new file beside ``path`` opened for writing, its mode 0666 less the umask applied by the kernel itself
    (reading the umask in Python means setting it, process-wide: another thread's files made meanwhile got none)."""
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666), tmp
        except FileExistsError:
            continue


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to a temporary file beside ``path`` and ``os.replace`` it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_beside(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, data) -> Path:
    """Strict JSON (``allow_nan=False``): convert NaN to None first (see :func:`to_jsonable`)."""
    return atomic_write_text(path, json.dumps(data, indent=1, allow_nan=False) + "\n")
