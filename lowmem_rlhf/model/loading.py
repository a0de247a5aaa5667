"""Load the frozen base model once (4-bit NF4 by default, on CUDA or CPU) and its tokenizer."""

from __future__ import annotations

import importlib.util
import logging

import torch

from lowmem_rlhf import distributed
from lowmem_rlhf.builtins import is_builtin, model_path
from lowmem_rlhf.config import ModelConfig
from lowmem_rlhf.errors import UserError
from lowmem_rlhf.model.memory import embeddings_on_host
from lowmem_rlhf.model.placement import is_tied, keep_embeddings_on_host

logger = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA when present; asking for CUDA on a machine without it is a user error."""
    if name == "auto":
        return distributed.local_device(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"model.device is {name!r} but no CUDA GPU is visible; use model.device=cpu or auto")
    return distributed.local_device(device)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` = bf16 on CUDA (fp16 on GPUs without bf16), fp32 on CPU."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return getattr(torch, name)


def resolve_path(cfg: ModelConfig) -> str:
    """The folder or Hub id to load; a `builtin:` model (lowmem_rlhf/builtins.py) is built on first use, a GGUF
    file converted on first use (model/gguf.py)."""
    from lowmem_rlhf.model.gguf import convert_gguf, gguf_path, names_gguf

    if is_builtin(cfg.name_or_path):
        if cfg.gguf_file is not None:
            raise UserError(f"model.gguf_file is set, but {cfg.name_or_path!r} is a builtin model; unset gguf_file")
        return model_path(cfg.name_or_path)
    if names_gguf(cfg):
        return str(convert_gguf(gguf_path(cfg)))
    return cfg.name_or_path


def quantization_config(cfg: ModelConfig, compute_dtype: torch.dtype):
    """The bitsandbytes config for `cfg.quantization`, or None for an unquantized base."""
    from transformers import BitsAndBytesConfig

    if cfg.quantization in ("nf4", "fp4"):
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=cfg.quantization,
            bnb_4bit_use_double_quant=cfg.double_quant,
            bnb_4bit_compute_dtype=compute_dtype,
            bnb_4bit_quant_storage=torch.uint8,
        )
    if cfg.quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def _attention(cfg: ModelConfig, device: torch.device, path: str) -> str:
    """The attention kernel to load with: the recipe's, or eager (said in the log) where the architecture
    has no SDPA kernel (Gemma-2: SDPA cannot soft-cap attention logits)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    _check_flash(cfg, device)
    try:
        config = AutoConfig.from_pretrained(path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
        model_class = AutoModelForCausalLM._model_mapping[type(config)]
    except (OSError, ValueError, KeyError):
        return cfg.attn_implementation  # from_pretrained reports it (or the model brings its own code)
    supported = {"sdpa": "_supports_sdpa", "flash_attention_2": "_supports_flash_attn"}
    flag = supported.get(cfg.attn_implementation)
    if flag is None or getattr(model_class, flag, True):
        return cfg.attn_implementation
    if cfg.attn_implementation == "sdpa":
        logger.warning(
            "%s has no SDPA attention; using model.attn_implementation=eager (set it in the recipe to silence this)",
            model_class.__name__,
        )
        return "eager"
    raise UserError(
        f"model.attn_implementation={cfg.attn_implementation}: {model_class.__name__} does not support it; "
        "use model.attn_implementation=eager"
    )


def _check_flash(cfg: ModelConfig, device: torch.device) -> None:
    if cfg.attn_implementation != "flash_attention_2":
        return
    if device.type != "cuda":
        raise UserError("model.attn_implementation=flash_attention_2 needs a CUDA GPU; use sdpa on this machine")
    if importlib.util.find_spec("flash_attn") is None:
        raise UserError(
            "model.attn_implementation=flash_attention_2 but flash-attn is not installed; "
            "run `pip install 'lowmem-rlhf[flash]'` (needs a CUDA toolchain) or use attn_implementation=sdpa"
        )


def load_tokenizer(cfg: ModelConfig, path: str | None = None):
    """The tokenizer with a pad token and a chat template (ours when the model has none)."""
    from transformers import AutoTokenizer

    from lowmem_rlhf.data.chat import ensure_chat_template

    path = path or resolve_path(cfg)
    try:
        tok = AutoTokenizer.from_pretrained(path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"model.name_or_path {cfg.name_or_path!r}: could not load the tokenizer ({e})") from None
    if tok.eos_token_id is None:
        raise UserError(f"model.name_or_path {cfg.name_or_path!r}: the tokenizer defines no EOS token")
    if tok.pad_token_id is None:
        tok.pad_token = _pad_token(tok)
    ensure_chat_template(tok)
    return tok


def _pad_token(tok) -> str:
    """A pad for a tokenizer without one: its own reserved pad token if it has one (Llama-3.1's
    `<|finetune_right_pad_id|>`), else EOS. Either is safe: every mask is built from lengths, never from
    `ids != pad_id`, so a closing EOS or end-of-turn token stays a label (pitfall 4)."""
    for token in tok.added_tokens_decoder.values():
        if token.special and "pad" in token.content.lower():
            return token.content
    return tok.eos_token


def _keep_cpu_4bit_differentiable(model) -> None:
    """Stop bitsandbytes' CPU inference repacking of 4-bit weights.

    On CPUs with AVX512-BF16, bitsandbytes 0.50 repacks a Linear4bit's weight in place the first
    time it runs in eval mode without gradients, and from then on always calls a kernel that has no
    autograd support, even in train mode: gradients stop flowing through the frozen base, so LoRA
    layers below it stop learning (torch warns "gemv_4bit: an autograd kernel was not registered").
    RLHF alternates eval (rollout, scoring) and training on the same weights, so we keep the
    standard, differentiable path.
    """
    try:
        import bitsandbytes as bnb
    except ImportError:
        return
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def load_base(cfg: ModelConfig, compiled_decoding: bool = False):
    """Load the base model once, quantized and frozen; returns (model, tokenizer).

    Embeddings, norms and lm_head stay in the compute dtype: we never run peft's
    `prepare_model_for_kbit_training`, which would upcast them all to fp32 (pitfall 10). The input-embedding
    table then goes to host memory when `cfg.embeddings` says so (`model.placement`; compiled_decoding: the
    rollout compiles its decode step, which keeps it on the device under `auto`).
    """
    from transformers import AutoModelForCausalLM

    from lowmem_rlhf.model.quantize_cpu import cpu_quantization

    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.compute_dtype, device)
    path = resolve_path(cfg)
    attention = _attention(cfg, device, path)
    tokenizer = load_tokenizer(cfg, path)
    try:
        with cpu_quantization():  # the same 4-bit bytes as bitsandbytes' CPU kernel, several times faster
            model = AutoModelForCausalLM.from_pretrained(
                path,
                revision=cfg.revision,
                quantization_config=quantization_config(cfg, dtype),
                dtype=dtype,
                device_map={"": str(device)},
                attn_implementation=attention,
                trust_remote_code=cfg.trust_remote_code,
            )
    except OSError as e:
        raise UserError(f"model.name_or_path {cfg.name_or_path!r}: could not load the model ({e})") from None
    except torch.OutOfMemoryError:
        raise UserError(
            f"model {cfg.name_or_path!r} does not fit in GPU memory even before training; use "
            "model.quantization=nf4, a smaller model, or a card with more memory"
        ) from None
    for p in model.parameters():
        p.requires_grad_(False)
    _keep_cpu_4bit_differentiable(model)
    model.config.use_cache = True  # generation needs the KV cache; training passes use_cache=False per call
    if embeddings_on_host(cfg.embeddings, device.type, is_tied(model), compiled_decoding):
        table = keep_embeddings_on_host(model).weight
        logger.info(
            "input embeddings (%s x %s) kept in host memory: %.2f GiB less allocated on %s",
            *table.shape,
            table.numel() * table.element_size() / 2**30,
            device,
        )
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return model, tokenizer
