"""Token log-probabilities without materialising [b, t, v] fp32 logits (pitfall 11).

With a 128k vocabulary the full fp32 logits of a 16 x 512 batch take 4 GiB: more than the 4-bit
weights of an 8B model. We project hidden states to logits one chunk of positions at a time, in fp32,
and keep only the (b, t) log-probs. A chunk holds `chunk_size` tokens counted over the whole batch
(chunk_size // b positions of every row), so its logits take chunk_size x vocab x 4 bytes whatever
the batch size. When gradients are needed each chunk is checkpointed, so the backward pass also
holds one chunk of logits at a time.
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
            out.append(checkpoint(_chunk_logprobs, h, y, head, temperature, use_reentrant=False))
        else:
            out.append(_chunk_logprobs(h, y, head, temperature))
    return torch.cat(out, dim=1)
