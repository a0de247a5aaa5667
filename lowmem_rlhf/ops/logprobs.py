"""Token log-probabilities without materialising [b, t, v] fp32 logits (pitfall 11).

With a 128k vocabulary the full fp32 logits of a 16 x 512 batch take 4 GiB: more than the 4-bit
weights of an 8B model. We project hidden states to logits one chunk of positions at a time, in fp32,
and keep only the (b, t) log-probs. A chunk holds `chunk_size` tokens counted over the whole batch
(chunk_size // b positions of every row), so its logits take chunk_size x vocab x 4 bytes whatever
the batch size. When gradients are needed each chunk is checkpointed, so the backward pass also
holds one chunk of logits at a time. The same chunks give the entropy of the whole next-token
distribution (PPO's entropy bonus) for the price of one softmax per chunk.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint


def _chunk_logprobs(hidden: torch.Tensor, targets: torch.Tensor, head: Callable, temperature: float) -> torch.Tensor:
    logits = head(hidden).float()
    if temperature != 1.0:
        logits = logits / temperature
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def _chunk_logprobs_entropy(
    hidden: torch.Tensor, targets: torch.Tensor, head: Callable, temperature: float, entropy_grad: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    logits = head(hidden).float()
    if temperature != 1.0:
        logits = logits / temperature
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    lse = torch.logsumexp(logits, dim=-1)
    # H = logsumexp(z) - sum_v softmax(z)_v z_v; without a graph when only logged, so that the backward
    # pass keeps no extra (c, v) tensor
    with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
        probs = torch.softmax(logits, dim=-1)
        entropy = lse - (probs.unsqueeze(-2) @ logits.unsqueeze(-1)).squeeze(-1).squeeze(-1)
    return picked - lse, entropy


def _over_chunks(fn: Callable, hidden: torch.Tensor, head: Callable, targets: torch.Tensor, chunk_size: int, *args):
    """fn(hidden chunk, targets chunk, head, *args) over chunks of positions, checkpointed when gradients flow."""
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    needs_grad = torch.is_grad_enabled() and (
        hidden.requires_grad or any(p.requires_grad for p in getattr(head, "parameters", lambda: [])())
    )
    out = []
    positions = max(1, chunk_size // max(hidden.shape[0], 1))
    for start in range(0, hidden.shape[1], positions):
        h = hidden[:, start : start + positions]
        y = targets[:, start : start + positions]
        if needs_grad:
            out.append(checkpoint(fn, h, y, head, *args, use_reentrant=False))
        else:
            out.append(fn(h, y, head, *args))
    return out


def chunked_logprobs(
    hidden: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor],
    targets: torch.Tensor,
    chunk_size: int = 512,
    temperature: float = 1.0,
) -> torch.Tensor:
    """log p(targets) under softmax(head(hidden) / temperature), computed chunk by chunk.

    hidden: (b, t, d) states whose next token is `targets`; targets: (b, t) token ids;
    head: maps (b, c, d) -> (b, c, v) (the model's lm_head); chunk_size: tokens per chunk over the
    whole batch (at least one position per chunk). Returns (b, t) fp32 log-probs.
    """
    return torch.cat(_over_chunks(_chunk_logprobs, hidden, head, targets, chunk_size, temperature), dim=1)


def chunked_logprobs_entropy(
    hidden: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor],
    targets: torch.Tensor,
    chunk_size: int = 512,
    temperature: float = 1.0,
    entropy_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(targets), entropy of the whole next-token distribution), both (b, t) fp32, chunk by chunk.

    Arguments as in `chunked_logprobs`; the log-probs are bit-identical to its. The entropy is
    -sum_v p_v log p_v of softmax(head(hidden) / temperature) at every position: the exact value whose
    gradient an entropy bonus needs (the sampled token's -log p has zero expected gradient on-policy).
    `entropy_grad=False` returns it without a graph (for logging), at no extra backward memory.
    """
    chunks = _over_chunks(_chunk_logprobs_entropy, hidden, head, targets, chunk_size, temperature, entropy_grad)
    return torch.cat([lp for lp, _ in chunks], dim=1), torch.cat([h for _, h in chunks], dim=1)
