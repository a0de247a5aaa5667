"""Batched generation: left padding, eval mode (dropout off, no checkpointing), KV cache on, stop at EOS.

`DecodeConfig` says how to decode, never what: rows per `generate` call, a dynamic or a preallocated
(static) KV cache, and an opt-in `torch.compile` of the decode step. For greedy decoding every setting
gives the same tokens.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch

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
    cache: "dynamic" grows the KV cache token by token; "static" preallocates `max_cache_len` positions
        per row once, so every call has the same tensor shapes.
    max_cache_len: static only: positions the cache holds (longest prompt + max_new_tokens). Prompts are
        left-padded to `max_cache_len - max_new_tokens` so that prefill and decode shapes repeat across
        calls. None: the longest prompt of each call.
    compile: torch.compile the decode step (static cache only). The first call pays the compilation;
        with `batch_size` set, a short last call is filled up with copies of its last prompt so that it
        reuses the compiled shapes (their outputs are dropped).
    """

    batch_size: int = 0
    cache: Literal["dynamic", "static"] = "dynamic"
    max_cache_len: int | None = None
    compile: bool = False

    def __post_init__(self) -> None:
        if self.batch_size < 0:
            raise ValueError(f"batch_size must be 0 (all) or positive, got {self.batch_size}")
        if self.cache not in ("dynamic", "static"):
            raise ValueError(f"cache must be 'dynamic' or 'static', got {self.cache!r}")
        if self.compile and self.cache != "static":
            raise ValueError("compile needs the static cache: fixed shapes are what makes the compiled step reusable")


@dataclass
class Generation:
    """prompt_ids: per-row prompt tokens; response_ids: per-row generated tokens, up to and including EOS."""

    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    ended: list[bool]  # True when the response closed with EOS (not cut at max_new_tokens)


@contextlib.contextmanager
def compiled_decoding(model) -> Iterator[None]:
    """Let `generate` compile the decode step of a bitsandbytes-quantized model for the body's calls.

    transformers compiles the decode step of a static-cache `generate` on its own, except for quantizers
    that do not declare themselves compileable: its bitsandbytes 4-bit quantizer keeps the base class's
    `is_compileable = False`. bitsandbytes registers its 4-bit kernels as torch.library ops, which dynamo
    traces without graph breaks, so the check is lifted here, on this model instance only, and put back.
    """
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner._valid_auto_compile_criteria = lambda *args, **kwargs: True
    try:
        yield
    finally:
        del inner._valid_auto_compile_criteria


def _calls(prompts: list[list[int]], size: int) -> list[list[int]]:
    """Row indices of each generate call: all rows, or `size` rows at a time sorted by length (longest first)."""
    if size == 0 or size >= len(prompts):
        return [list(range(len(prompts)))]
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    return [order[i : i + size] for i in range(0, len(order), size)]


@torch.no_grad()
def generate(
    bank: AdapterBank,
    role: str,
    prompts: list[list[int]],
    sampling: SamplingConfig,
    eos_id: int,
    pad_id: int,
    generator_seed: int | None = None,
    decode: DecodeConfig | None = None,
) -> Generation:
    """Sample one response per prompt from `role`; tokens after the first EOS are dropped."""
    decode = decode or DecodeConfig()
    greedy = sampling.temperature == 0
    kwargs = dict(
        max_new_tokens=sampling.max_new_tokens,
        do_sample=not greedy,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        use_cache=True,
    )
    if not greedy:
        kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k)
    width = None
    if decode.cache == "static":
        kwargs["cache_implementation"] = "static"
        if decode.max_cache_len is not None:
            width = decode.max_cache_len - sampling.max_new_tokens
            longest = max(len(p) for p in prompts)
            if longest > width:
                raise ValueError(
                    f"a prompt of {longest} tokens does not fit a static cache of {decode.max_cache_len} positions "
                    f"with {sampling.max_new_tokens} new tokens"
                )
            kwargs["max_cache_len"] = decode.max_cache_len
    if generator_seed is not None:
        torch.manual_seed(generator_seed)
    new: list[list[int]] = [[] for _ in prompts]
    with bank.use(role) as model, compiled_decoding(model) if decode.compile else contextlib.nullcontext():
        for rows in _calls(prompts, decode.batch_size):
            batch = [prompts[i] for i in rows]
            if decode.compile and decode.batch_size and len(batch) < decode.batch_size:
                batch += [batch[-1]] * (decode.batch_size - len(batch))
            ids, mask = pad_sequences(batch, pad_id, padding_side="left", width=width)
            out = model.generate(input_ids=ids.to(bank.device), attention_mask=mask.long().to(bank.device), **kwargs)
            for i, row in zip(rows, out[:, ids.shape[1] :].tolist(), strict=False):
                new[i] = row
    responses, ended = [], []
    for row in new:
        if eos_id in row:
            row = row[: row.index(eos_id) + 1]
        responses.append(row)
        ended.append(bool(row) and row[-1] == eos_id)
    return Generation(prompt_ids=[list(p) for p in prompts], response_ids=responses, ended=ended)
