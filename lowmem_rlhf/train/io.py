"""Atomic file writes: a killed process never leaves a half-written file under its final name.

Under N data-parallel processes only rank 0 writes: the others hold the same results, and two
processes replacing one file would race.

JSON is strict: a NaN or inf is written as null (NaN is not JSON, and a reader such as `jq` rejects it).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from lowmem_rlhf import distributed
from lowmem_rlhf.errors import UserError


def atomic_write_text(path: str | Path, text: str) -> None:
    if not distributed.is_main():
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def finite_or_none(data: Any) -> Any:
    """`data` with every non-finite float replaced by None (JSON null), in nested dicts and lists too."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: finite_or_none(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [finite_or_none(v) for v in data]
    return data


def strict_dumps(data: Any, **kw: Any) -> str:
    """json.dumps that writes NaN/inf as null instead of the non-JSON `NaN`/`Infinity`."""
    return json.dumps(finite_or_none(data), allow_nan=False, **kw)


def atomic_write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, strict_dumps(data, indent=2, sort_keys=True) + "\n")


def ensure_writable_dir(path: str | Path, what: str) -> Path:
    """Create folder `path` (with its parents) and check a file can be written in it; one clear error if not.

    Run before a model loads, so a typo'd or read-only output path fails at once, not after the first stage.
    """
    path = Path(path).expanduser()
    for parent in (path, *path.parents):
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"{what} {path}: {parent} is a file, not a folder; choose another path")
            break
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise UserError(
            f"{what} {path} is not writable ({e.strerror or e}); choose a folder you can write to"
        ) from None
    return path
