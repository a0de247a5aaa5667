"""Pairwise preference losses and metrics over (n,) score tensors (n = number of pairs)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry_loss(
    chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None, center_coef: float = 0.0
) -> torch.Tensor:
    """Per-pair loss −log σ(r_chosen − r_rejected − margin) + center_coef · (r_chosen + r_rejected)².

    The margin (e.g. a rating difference) asks for a larger gap on clearer preferences (Llama 2);
    the centring term keeps rewards near 0 so PPO sees a stable scale (Eisenstein et al. 2023).
    Returns (n,) so the caller can weight pairs (a K-way ranking's pairs share one prompt's weight).
    """
    diff = chosen - rejected
    if margin is not None:
        diff = diff - margin
    loss = -F.logsigmoid(diff)
    if center_coef:
        loss = loss + center_coef * (chosen + rejected) ** 2
    return loss


def pairwise_accuracy(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """(n,) 1.0 where the chosen response scores strictly higher, else 0.0 (a tie is not a win)."""
    return (chosen > rejected).float()


def pearson(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of two (n,) tensors; 0 when either is constant (no linear relation to show)."""
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    denom = (x.square().sum() * y.square().sum()).sqrt()
    return (x * y).sum() / denom if denom > 0 else torch.zeros((), dtype=torch.float64)
