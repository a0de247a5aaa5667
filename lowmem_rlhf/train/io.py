"""Atomic file writes: a killed process never leaves a half-written file under its final name.

JSON is strict: a NaN or inf is written as null (NaN is not JSON, and a reader such as `jq` rejects it).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any


def atomic_write_text(path: str | Path, text: str) -> None:
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
