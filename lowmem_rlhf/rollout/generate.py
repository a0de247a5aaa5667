"""Batched generation: left padding, eval mode (dropout off), KV cache on, stop at EOS."""

from __future__ import annotations

from dataclasses import dataclass

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
class Generation:
    """prompt_ids: per-row prompt tokens; response_ids: per-row generated tokens, up to and including EOS."""

    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    ended: list[bool]  # True when the response closed with EOS (not cut at max_new_tokens)


@torch.no_grad()
def generate(
    bank: AdapterBank,
    role: str,
    prompts: list[list[int]],
    sampling: SamplingConfig,
    eos_id: int,
    pad_id: int,
    generator_seed: int | None = None,
) -> Generation:
    """Sample one response per prompt from `role`; tokens after the first EOS are dropped."""
    ids, mask = pad_sequences(prompts, pad_id, padding_side="left")
    ids, mask = ids.to(bank.device), mask.long().to(bank.device)
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
    if generator_seed is not None:
        torch.manual_seed(generator_seed)
    with bank.use(role) as model:
        out = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    new = out[:, ids.shape[1] :].tolist()
    responses, ended = [], []
    for row in new:
        if eos_id in row:
            row = row[: row.index(eos_id) + 1]
        responses.append(row)
        ended.append(bool(row) and row[-1] == eos_id)
    return Generation(prompt_ids=[list(p) for p in prompts], response_ids=responses, ended=ended)
