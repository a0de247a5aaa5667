"""Real model architectures as transformers config kwargs, and random-weight checkpoints built from them.

Memory and speed depend on the shapes, not on the weights' values, so a checkpoint with random
weights measures a real model without downloading it. The kwargs are copied from the public
`config.json` of each model; `tiny` is for CPU smoke tests.
"""

from __future__ import annotations

import gc
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from lowmem_rlhf.model.memory import Shape, unquantized_bytes
from lowmem_rlhf.model.shapes import SHAPES

SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>")


def build_config(shape: str, **overrides: Any):
    """The transformers config of `shape` (a key of SHAPES); `overrides` replace or add kwargs."""
    from transformers import AutoConfig

    if shape not in SHAPES:
        raise KeyError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    kwargs = {**SHAPES[shape], **overrides}
    return AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)


def param_count(config) -> int:
    """Parameters of a Llama/Qwen2-style causal LM, from the config alone (nothing is allocated).

    The same shape arithmetic as `lowmem-rlhf estimate`: linear weights, plus embeddings, norms and
    biases (their byte count at one byte per element).
    """
    shape = Shape.from_config(config.to_dict())
    return shape.layers * sum(fin * fout for _, fin, fout, _ in shape.linears()) + unquantized_bytes(shape, 1)


def build_tokenizer(vocab_size: int):
    """A word-level tokenizer with exactly `vocab_size` tokens (`<pad> <unk> <s> </s> t0 t1 ...`).

    The benchmark feeds random token ids; the tokenizer only has to load through `load_base`.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [*SPECIAL_TOKENS, *(f"t{i}" for i in range(vocab_size - len(SPECIAL_TOKENS)))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def build_random_checkpoint(shape: str, out_dir: Path, dtype: torch.dtype) -> Path:
    """Build (once) a random-weight checkpoint of `shape` in `dtype` under `out_dir`; returns its folder.

    Weights are initialised on the GPU when there is one (seconds instead of minutes for 8B) with seed 0,
    saved as safetensors with a tokenizer, and cached by shape and dtype: a finished folder is reused.
    The folder appears under its final name only once complete, so an interrupted build is redone.
    """
    from transformers import AutoModelForCausalLM

    final = Path(out_dir) / f"{shape}-{str(dtype).removeprefix('torch.')}"
    if (final / "config.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(SHAPES[shape]["vocab_size"])
    config = build_config(
        shape,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".building-{shape}-"))
    try:
        torch.manual_seed(0)
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        del model
        gc.collect()  # free the full-precision weights before the benchmark measures memory
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        tmp.rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
