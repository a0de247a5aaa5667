"""Registers the bundled tiny task as `builtin:tiny` (the model) and `builtin:tiny/<file>` (its data).

Declared as an entry point of the group `lowmem_rlhf.builtins` in pyproject.toml, the door any
package uses to add `builtin:` names (lowmem_rlhf/builtins.py).
"""

from __future__ import annotations

from pathlib import Path

from lowmem_rlhf.builtins import register_data, register_model


def _build() -> Path:
    from lowmem_rlhf.tiny import model  # looked up per call, so the builder can be replaced in tests

    return model.build_tiny()


def _shape() -> dict:
    from lowmem_rlhf.tiny.model import TINY_LLAMA, VOCAB_SIZE

    return {**TINY_LLAMA, "vocab_size": VOCAB_SIZE}


def register() -> None:
    register_model("tiny", _build, _shape)
    register_data("tiny", lambda: Path(__file__).resolve().parent / "data")
