"""Batched generation: left padding, eval mode (dropout off, no checkpointing), KV cache on, stop at end of turn.

A response ends at the first of its stop ids: the caller's (`data.chat.end_of_turn_ids`: the chat
template's end-of-turn token and the tokenizer's EOS) together with the model's own
`generation_config.eos_token_id`, which for Llama-3, Qwen2, Gemma and Phi-3 lists the end-of-turn and
the end-of-text ids.

`DecodeConfig` says how to decode, never what: rows per `generate` call, a dynamic or a preallocated
(static) KV cache, and an opt-in `torch.compile` of the decode step. For greedy decoding every setting
gives the same tokens.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from transformers import CompileConfig, StaticCache

from lowmem_rlhf.data.batching import pad_sequences
from lowmem_rlhf.model.bank import AdapterBank


@dataclass
class SamplingConfig:
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0


@dataclass
class DecodeConfig:
    """How a batch of prompts is decoded.

    batch_size: rows per `generate` call (0 = all at once). Prompts are sorted by length into the calls
        (less padding) and the results put back in the caller's order.
    cache: "dynamic" grows the KV cache token by token; "static" preallocates prompt_width + max_new_tokens
        positions per row, one cache per `generate` of ours, reset and reused by each of its calls (the
        same tensors, so a compiled step keeps its CUDA graph across the calls).
    prompt_width: static only: prompts are left-padded to this many tokens, so the shapes repeat across
        calls and rollouts whatever `max_new_tokens` is (PPO: max_prompt_length). None: the longest prompt.
    compile: torch.compile the decode step (static cache and a prompt_width only). The first call pays the
        compilation; with `batch_size` set, a short last call is filled up with copies of its last prompt
        so that it reuses the compiled shapes (their outputs are dropped).
    """

    batch_size: int = 0
    cache: Literal["dynamic", "static"] = "dynamic"
    prompt_width: int | None = None
    compile: bool = False

    def __post_init__(self) -> None:
        if self.batch_size < 0:
            raise ValueError(f"batch_size must be 0 (all) or positive, got {self.batch_size}")
        if self.cache not in ("dynamic", "static"):
            raise ValueError(f"cache must be 'dynamic' or 'static', got {self.cache!r}")
        if self.compile and (self.cache != "static" or self.prompt_width is None):
            raise ValueError("compile needs the static cache and a prompt_width: the compiled step needs fixed shapes")

    def rows_per_call(self, rows: int) -> float:
        """Mean rows of one `generate` call when decoding `rows` prompts (compiled: short calls are filled up)."""
        if not self.batch_size:
            return float(rows)
        if self.compile:
            return float(self.batch_size)
        return rows / math.ceil(rows / self.batch_size)


@dataclass
class Generation:
    """prompt_ids: per-row prompt tokens; response_ids: per-row generated tokens, up to and including the stop id."""

    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    ended: list[bool]  # True when the response closed with a stop id (not cut at max_new_tokens)


def stop_token_ids(bank: AdapterBank, eos_ids: int | Sequence[int]) -> list[int]:
    """`eos_ids` followed by the model's `generation_config.eos_token_id` (an id, a list, or none), no repeats."""
    ids = [eos_ids] if isinstance(eos_ids, int) else list(eos_ids)
    extra = getattr(getattr(bank.base_model, "generation_config", None), "eos_token_id", None)
    extra = [] if extra is None else [extra] if isinstance(extra, int) else list(extra)
    return list(dict.fromkeys([*ids, *extra]))


@contextlib.contextmanager
def compiled_decoding(model) -> Iterator[None]:
    """Let `generate` compile the decode step of a bitsandbytes-quantized model for the body's calls.

    transformers compiles the decode step of a static-cache `generate` on its own, except for quantizers
    that do not declare themselves compileable: its bitsandbytes 4-bit quantizer keeps the base class's
    `is_compileable = False`. bitsandbytes registers its 4-bit kernels as torch.library ops (with fake
    implementations), which dynamo traces without graph breaks. So transformers' own check runs here with
    the quantizer hidden from it, on this model instance only, and everything is put back on exit.
    """
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    check = getattr(type(inner), "_valid_auto_compile_criteria", None)
    if check is None:  # a transformers without the check would silently never compile
        raise RuntimeError(
            f"this transformers version has no {type(inner).__name__}._valid_auto_compile_criteria; "
            "compiled decoding cannot be enabled"
        )

    def without_quantizer(*args, **kwargs) -> bool:
        quantizer = inner.hf_quantizer
        inner.hf_quantizer = None
        try:
            return check(inner, *args, **kwargs)
        finally:
            inner.hf_quantizer = quantizer

    inner._valid_auto_compile_criteria = without_quantizer
    try:
        yield
    finally:
        del inner._valid_auto_compile_criteria


def _compile_config(device: torch.device) -> CompileConfig:
    """transformers' default compile settings (inductor, CUDA graphs via reduce-overhead); off CUDA its device
    check would refuse, so the config says to compile on every device (CPU tests use that)."""
    config = CompileConfig()
    if device.type != "cuda":
        config._compile_all_devices = True
    return config


def _calls(prompts: list[list[int]], size: int) -> list[list[int]]:
    """Row indices of each generate call: all rows, or `size` rows at a time sorted by length (longest first)."""
    if size == 0 or size >= len(prompts):
        return [list(range(len(prompts)))]
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    return [order[i : i + size] for i in range(0, len(order), size)]


@torch.no_grad()
def generate(
    bank: AdapterBank,
    role: str | None,
    prompts: list[list[int]],
    sampling: SamplingConfig,
    eos_ids: int | Sequence[int],
    pad_id: int,
    generator_seed: int | None = None,
    decode: DecodeConfig | None = None,
) -> Generation:
    """Sample one response per prompt from `role` (None: adapters off), ending at the first stop id.

    eos_ids: the ids that end a response (`data.chat.end_of_turn_ids(tokenizer)`); the model's
    generation-config EOS ids are added (`stop_token_ids`). Tokens after the first stop id are dropped.
    """
    decode = decode or DecodeConfig()
    greedy = sampling.temperature == 0
    stops = stop_token_ids(bank, eos_ids)
    kwargs = dict(
        max_new_tokens=sampling.max_new_tokens,
        do_sample=not greedy,
        eos_token_id=stops,
        pad_token_id=pad_id,
        use_cache=True,
        disable_compile=not decode.compile,  # transformers compiles unquantized static-cache decoding by itself
    )
    if not greedy:
        kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k)
    longest = max(len(p) for p in prompts)
    width = None
    if decode.cache == "static":
        width = decode.prompt_width or longest
        if longest > width:
            raise ValueError(f"a prompt of {longest} tokens is longer than the static cache's prompt_width {width}")
    if generator_seed is not None:
        torch.manual_seed(generator_seed)
    new: list[list[int]] = [[] for _ in prompts]
    caches: dict[int, StaticCache] = {}  # one per call size, reset and reused
    with bank.use(role) as model, compiled_decoding(model) if decode.compile else contextlib.nullcontext():
        if decode.compile:
            kwargs["compile_config"] = _compile_config(bank.device)
        for rows in _calls(prompts, decode.batch_size):
            batch = [prompts[i] for i in rows]
            if decode.compile and decode.batch_size and len(batch) < decode.batch_size:
                batch += [batch[-1]] * (decode.batch_size - len(batch))
            ids, mask = pad_sequences(batch, pad_id, padding_side="left", width=width)
            if width is not None:
                cache = caches.get(len(batch))
                if cache is None:
                    config = model.get_base_model().config.get_text_config(decoder=True)
                    size = width + sampling.max_new_tokens
                    cache = caches[len(batch)] = StaticCache(config=config, max_cache_len=size)
                else:
                    cache.reset()
                kwargs["past_key_values"] = cache
            out = model.generate(input_ids=ids.to(bank.device), attention_mask=mask.long().to(bank.device), **kwargs)
            for i, row in zip(rows, out[:, ids.shape[1] :].tolist(), strict=False):
                new[i] = row
    responses, ended = [], []
    stop_set = set(stops)
    for row in new:
        end = next((i for i, t in enumerate(row) if t in stop_set), None)
        if end is not None:
            row = row[: end + 1]
        responses.append(row)
        ended.append(end is not None)
    return Generation(prompt_ids=[list(p) for p in prompts], response_ids=responses, ended=ended)
