"""The toolkit's on-disk cache: models it builds or converts once (the tiny base, GGUF conversions).

At the bottom layer: it imports nothing else of the package, so every layer can place files here.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def cache_root() -> Path:
    """`$LOWMEM_RLHF_CACHE`, else `~/.cache/lowmem_rlhf`."""
    return Path(os.environ.get("LOWMEM_RLHF_CACHE", Path.home() / ".cache" / "lowmem_rlhf"))


def cached_build(root: Path, name: str, recipe: list, build: Callable[[Path], None]) -> Path:
    """`root/<name>-<hash of recipe>`, made once by `build(tmp_folder)` and renamed into place atomically
    (a killed build leaves no half-written model; two processes building at once both end with one)."""
    key = hashlib.sha256(json.dumps(recipe, default=str).encode()).hexdigest()[:12]
    final = root / f"{name}-{key}"
    if (final / "config.json").is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".building-"))
    try:
        build(tmp)
        try:
            tmp.rename(final)
        except OSError:  # another process finished the same build first
            if not (final / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
