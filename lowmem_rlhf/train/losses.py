"""Losses on the backbone that several stages share."""

from __future__ import annotations

import torch

from lowmem_rlhf.model.forward import token_logprobs


def sft_loss_sum(model, batch: dict[str, torch.Tensor], chunk_size: int) -> tuple[torch.Tensor, dict[str, float]]:
    """Summed negative log-likelihood of the response tokens (prompt tokens are not labels).

    Used by SFT and by PPO-ptx. batch: input_ids, attention_mask, response_mask, all (b, t).
    """
    logprobs = token_logprobs(model, batch["input_ids"], batch["attention_mask"], chunk_size)
    mask = batch["response_mask"][:, 1:]  # position i predicts token i + 1
    return -(logprobs * mask).sum(), {}
