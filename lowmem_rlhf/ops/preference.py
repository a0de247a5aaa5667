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


DPO_LOSSES = ("sigmoid", "ipo", "hinge", "robust")


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO losses and implicit rewards from (n,) summed response log-probs.

    h = (log pi(y_w) - log pi(y_l)) - (log ref(y_w) - log ref(y_l)). Losses: `sigmoid` (Rafailov et
    al.; with label_smoothing = conservative DPO), `robust` (Chowdhury et al. 2024, unbiased under
    label noise), `hinge` (SLiC: relu(1 - beta h)), `ipo` (Azar et al.: (h - 1/(2 beta))^2).
    Given (n,) response lengths, h compares per-token log-ratios instead: (log pi - log ref)(y_w) / |y_w|
    - (log pi - log ref)(y_l) / |y_l| (TRL's IPO; length-normalised DPO).
    Returns (losses, chosen_rewards, rejected_rewards), rewards = beta * (log pi - log ref) of the
    summed log-probs whether or not the loss normalises, so they are on one scale for every option.
    When policy == reference, h = 0: the sigmoid loss is log 2 and both rewards are 0.
    """
    if chosen_lengths is None or rejected_lengths is None:
        h = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    else:
        h = (policy_chosen - ref_chosen) / chosen_lengths - (policy_rejected - ref_rejected) / rejected_lengths
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * h) * (1 - label_smoothing) - F.logsigmoid(-beta * h) * label_smoothing
    elif loss_type == "robust":
        losses = (-F.logsigmoid(beta * h) * (1 - label_smoothing) + F.logsigmoid(-beta * h) * label_smoothing) / (
            1 - 2 * label_smoothing
        )
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss {loss_type!r}; use one of {', '.join(DPO_LOSSES)}")
    return losses, beta * (policy_chosen - ref_chosen).detach(), beta * (policy_rejected - ref_rejected).detach()
