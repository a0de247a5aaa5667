"""GGUF files as a base model: converted once into a plain transformers folder, then loaded like any base.

transformers reads a GGUF file (llama.cpp's format) through the `gguf` package and dequantizes it to
ordinary tensors; parsing and dequantizing take tens of seconds even for a 135M model, and every
stage, `export` and `estimate` need the same weights, so the result is saved once into the cache
(`$LOWMEM_RLHF_CACHE/gguf-<key>/`: config.json, safetensors, the tokenizer built from the file's
metadata, generation_config.json and `gguf_source.json` saying where it came from). From there the
4-bit path quantizes it like every base; the merged export merges into these dequantized weights.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import time
from pathlib import Path

from lowmem_rlhf.cache import cache_root, cached_build
from lowmem_rlhf.config import ModelConfig
from lowmem_rlhf.errors import UserError

logger = logging.getLogger(__name__)

SOURCE_FILE = "gguf_source.json"
CONVERT_VERSION = 1  # bump when the conversion below changes what it writes
FP32_LIMIT = 4 * 2**30  # bytes: a dequantized model larger than this in fp32 is saved in bf16


def names_gguf(cfg: ModelConfig) -> bool:
    """Whether the recipe's base is a GGUF file: `model.gguf_file`, or a `name_or_path` ending in .gguf."""
    return cfg.gguf_file is not None or cfg.name_or_path.lower().endswith(".gguf")


def gguf_path(cfg: ModelConfig) -> Path:
    """The local .gguf file the recipe names: a path, a file in a local folder, or one in a Hub repo (downloaded
    once into the Hugging Face cache)."""
    if cfg.gguf_file is None:
        path = Path(cfg.name_or_path).expanduser()
        if not path.is_file():
            raise UserError(f"model.name_or_path {cfg.name_or_path!r}: no such GGUF file")
        return path
    folder = Path(cfg.name_or_path).expanduser()
    if folder.is_dir():
        path = folder / cfg.gguf_file
        if not path.is_file():
            found = ", ".join(sorted(p.name for p in folder.glob("*.gguf"))) or "none"
            raise UserError(f"model.gguf_file {cfg.gguf_file!r}: not in {folder} (its .gguf files: {found})")
        return path
    import huggingface_hub
    from huggingface_hub import constants, hf_hub_download

    try:
        return Path(hf_hub_download(cfg.name_or_path, cfg.gguf_file, revision=cfg.revision))
    except (huggingface_hub.errors.HFValidationError, huggingface_hub.errors.HfHubHTTPError, OSError, ValueError) as e:
        how = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else f"the download failed: {type(e).__name__}"
        raise UserError(
            f"model.gguf_file {cfg.gguf_file!r} of {cfg.name_or_path!r}: not a local folder and not in the Hugging "
            f"Face cache, and {how}; download it first (`hf download {cfg.name_or_path} {cfg.gguf_file}`)"
        ) from None


def require_gguf_reader(what: str) -> None:
    """One line when the `gguf` package, transformers' GGUF reader, is missing."""
    if importlib.util.find_spec("gguf") is None:
        raise UserError(
            f"{what} is a GGUF file, and reading one needs the gguf package; run "
            "`pip install 'lowmem-rlhf[gguf]'` (or `pip install gguf`)"
        )


def parameter_count(path: Path) -> int:
    """Elements in the file's tensors, read from its header (memory-mapped, nothing dequantized)."""
    from gguf import GGUFReader

    return sum(int(t.n_elements) for t in GGUFReader(str(path)).tensors)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def convert_gguf(path: Path, cache_dir: Path | None = None) -> Path:
    """The cached transformers folder of the GGUF file at `path`, converted on first use.

    Keyed by the file's resolved path, size and modification time (hashing a multi-GB file on every load
    would cost seconds; its sha256 is recorded in gguf_source.json instead). A model whose fp32 copy would
    exceed 4 GiB is saved in bf16.
    """
    path = Path(path).expanduser().resolve()
    require_gguf_reader(str(path))
    stat = path.stat()
    recipe = [str(path), stat.st_size, stat.st_mtime_ns, CONVERT_VERSION]

    def build(folder: Path) -> None:
        import torch

        try:
            count = parameter_count(path)
        except (ValueError, OSError) as e:
            raise UserError(f"{path}: not a readable GGUF file ({e})") from None
        dtype = torch.float32 if 4 * count <= FP32_LIMIT else torch.bfloat16
        logger.info(
            "converting %s (%.0fM parameters) to a transformers folder in %s dtype, once; cached in %s",
            path.name,
            count / 1e6,
            str(dtype).removeprefix("torch."),
            folder.parent,
        )
        start = time.monotonic()
        model, tokenizer = _read(path, dtype)
        _save_plain(model, folder)
        tokenizer.save_pretrained(folder)
        source = {"gguf_file": str(path), "size": stat.st_size, "sha256": file_sha256(path)}
        source |= {"parameters": count, "dtype": str(dtype).removeprefix("torch."), "version": CONVERT_VERSION}
        (folder / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n", encoding="utf-8")
        logger.info("converted %s in %.0f s", path.name, time.monotonic() - start)

    return cached_build(Path(cache_dir) if cache_dir is not None else cache_root(), "gguf", recipe, build)


def _read(path: Path, dtype):
    """(model, tokenizer) dequantized from the file by transformers, with its own per-tensor progress bar on."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.enable_progress_bar()  # the dequantization takes tens of seconds: let it show its count
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=str(path))
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=str(path), dtype=dtype)
    except (ValueError, NotImplementedError, KeyError) as e:
        # transformers: "GGUF model with architecture X is not supported yet.", or a quantization type it lacks
        raise UserError(f"{path}: transformers cannot read this GGUF file ({e})") from None
    finally:
        if not shown:
            hf_logging.disable_progress_bar()
    return model, tokenizer


def _save_plain(model, folder: Path) -> None:
    """save_pretrained as an ordinary (unquantized) checkpoint: the GGUF loading marks the config as quantized
    ("gguf"), which would make transformers refuse a bitsandbytes config on the next load."""
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    model.save_pretrained(folder)
    saved = json.loads((folder / "config.json").read_text())
    saved.pop("quantization_config", None)
    saved.pop("_model_name_or_path", None)  # the file's `general.name`, not a path
    (folder / "config.json").write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def source_of(folder: str | Path) -> dict | None:
    """What a converted folder records about its GGUF file, or None for any other folder."""
    path = Path(folder) / SOURCE_FILE
    return json.loads(path.read_text()) if path.is_file() else None
