"""PPO-family RL math: GAE, clipped policy/value losses, KL penalties, GRPO/RLOO/REINFORCE++ advantages.

Dims legend: b batch, t response tokens. Masks are bool, True = valid. Losses are means over all valid
tokens of the batch. Functions that take a mask zero the invalid entries of their inputs first, so whatever
those hold (pad garbage, huge values) reaches neither the outputs nor the gradients.
"""

from __future__ import annotations

import torch

from lowmem_rlhf.ops.stats import masked_mean, masked_var

KL_KINDS = ("k1", "k2", "k3")


def gae_advantages(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimates and value targets, by a reversed loop over t (vectorised over b).

    rewards, values, mask: (b, t) per-token rewards, value estimates, response mask. Returns
    (advantages, returns), both (b, t), with returns = advantages + values; both are 0 at invalid tokens.
    The value after the last valid token is 0, so the final valid step's delta is r - V. Assumes each
    row's valid tokens are one contiguous run (a right-padded prefix is the usual case); an invalid token
    inside a row would end the episode there. Advantages are not whitened: the caller does that.
    """
    valid = mask.to(values.dtype)
    rewards = torch.where(mask, rewards, 0)
    values = torch.where(mask, values, 0)
    zeros = values.new_zeros(values.shape[0])
    next_value, last_gae = zeros, zeros
    out = []
    for i in reversed(range(values.shape[1])):
        # Both carries are 0 after an invalid token, which makes the step before it terminal.
        delta = rewards[:, i] + gamma * next_value - values[:, i]
        last_gae = (delta + gamma * lam * last_gae) * valid[:, i]
        next_value = values[:, i]
        out.append(last_gae)
    advantages = torch.stack(out[::-1], dim=1) if out else torch.zeros_like(values)
    return advantages, advantages + values


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate: masked mean of max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)).

    logprobs (current policy), old_logprobs (rollout policy), advantages, mask: (b, t). Returns the 0-dim
    loss and detached 0-dim stats: `clipfrac` (share of valid tokens where the clipped term is the larger),
    `approx_kl` (mean k3 estimator (ratio - 1) - log ratio of KL(old || new), as cleanrl/TRL log it),
    `ratio_mean`, `ratio_max` (0 when no token is valid).
    """
    # Zero the log-ratio, not just the loss, at invalid tokens: exp(garbage) = inf would turn the
    # masked-out gradient 0 * inf into NaN.
    log_ratio = torch.where(mask, logprobs - old_logprobs, 0)
    advantages = torch.where(mask, advantages, 0)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).to(ratio.dtype), mask),
            "approx_kl": masked_mean((ratio - 1) - log_ratio, mask),
            "ratio_mean": masked_mean(ratio, mask),
            "ratio_max": torch.where(mask, ratio, 0).max() if ratio.numel() else ratio.new_zeros(()),
        }
    return loss, stats


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range_value: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss: 0.5 * masked mean of max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2).

    values (current), old_values (rollout), returns, mask: (b, t). Returns the 0-dim loss and detached
    0-dim stats: `value_clipfrac` (share of valid tokens where the clipped term is the larger) and
    `value_error` (masked mean of (V - R)^2).
    """
    values = torch.where(mask, values, 0)
    old_values = torch.where(mask, old_values, 0)
    returns = torch.where(mask, returns, 0)
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
    unclipped = (values - returns).square()
    clipped = (clipped_values - returns).square()
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "value_clipfrac": masked_mean((clipped > unclipped).to(values.dtype), mask),
            "value_error": masked_mean(unclipped, mask),
        }
    return loss, stats


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from sampled-token log-probs.

    logprobs, ref_logprobs: (b, t); returns (b, t). "k1": logp - ref (unbiased, can be negative);
    "k2": 0.5 * (logp - ref)^2; "k3": exp(ref - logp) - 1 - (ref - logp) (unbiased and >= 0).
    Any other kind raises ValueError.
    """
    if kind == "k1":
        return logprobs - ref_logprobs
    if kind == "k2":
        return 0.5 * (logprobs - ref_logprobs).square()
    if kind == "k3":
        log_ratio = ref_logprobs - logprobs
        # expm1 keeps small differences exact: exp(x) - 1 rounds to 0 for |x| < 6e-8 in fp32, leaving -x < 0.
        return torch.expm1(log_ratio) - log_ratio
    raise ValueError(f"unknown KL penalty kind {kind!r}; valid kinds: {', '.join(KL_KINDS)}")


def _grouped(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    if scores.dim() != 1:
        raise ValueError(f"scores must be 1-D (n * group_size,), got shape {tuple(scores.shape)}")
    if group_size < 1 or scores.numel() % group_size:
        raise ValueError(f"len(scores) = {scores.numel()} is not a whole number of groups of size {group_size}")
    return scores.view(-1, group_size)


def group_advantages(scores: torch.Tensor, group_size: int, normalize_std: bool = True) -> torch.Tensor:
    """GRPO advantages: each score minus its group's mean, divided by (group std + 1e-4) if `normalize_std`.

    scores: (n * group_size,), consecutive runs of `group_size` completions of the same prompt; returns the
    same shape. The std is torch's default unbiased one, which one element leaves undefined, so
    `normalize_std` with group_size < 2 raises ValueError (GRPO needs group_size >= 2).
    """
    groups = _grouped(scores, group_size)
    if normalize_std and group_size < 2:
        raise ValueError(f"GRPO needs group_size >= 2 to normalise by the group std, got {group_size}")
    centered = groups - groups.mean(dim=1, keepdim=True)
    if normalize_std:
        centered = centered / (groups.std(dim=1, keepdim=True) + 1e-4)
    return centered.reshape(scores.shape)


def rloo_advantages(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO advantages: each score minus the mean of the other group_size - 1 scores of its group.

    scores: (n * group_size,), consecutive groups as in `group_advantages`; returns the same shape.
    Raises ValueError for group_size < 2 (there is no other score to form the baseline).
    """
    if group_size < 2:
        raise ValueError(f"RLOO needs group_size >= 2, got {group_size}")
    groups = _grouped(scores, group_size)
    baseline = (groups.sum(dim=1, keepdim=True) - groups) / (group_size - 1)
    return (groups - baseline).reshape(scores.shape)


def reinforce_pp_advantages(rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """REINFORCE++ advantages (Hu 2025; OpenRLHF's `reinforce`): returns-to-go standardised over the batch.

    rewards, mask: (b, t) per-token rewards (-beta * KL, plus the score at the last valid token) and the
    response mask. G_t = r_t + gamma * G_{t+1} within each row, then (G - mean) / sqrt(max(var, 1e-8)) with
    the mean and the population variance taken over every valid token of the batch (no critic, no group:
    the global normalisation is the baseline). Returns (b, t), 0 at invalid tokens. Assumes each row's
    valid tokens are one contiguous run, like `gae_advantages`.
    """
    rewards = torch.where(mask, rewards, 0)
    running = rewards.new_zeros(rewards.shape[0])
    out = []
    for i in reversed(range(rewards.shape[1])):
        running = (rewards[:, i] + gamma * running) * mask[:, i]
        out.append(running)
    returns = torch.stack(out[::-1], dim=1) if out else torch.zeros_like(rewards)
    mean = masked_mean(returns, mask)
    var = masked_var(returns, mask, unbiased=False)
    return torch.where(mask, (returns - mean) * torch.rsqrt(var.clamp(min=1e-8)), 0)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - var(returns - values) / var(returns) over the valid entries: how much of the return the critic predicts.

    values, returns, mask: (b, t). Returns a detached 0-dim float tensor for logging: 1 is perfect, 0 no
    better than a constant; NaN when the valid returns have no variance.
    """
    with torch.no_grad():
        values = torch.where(mask, values, 0)
        returns = torch.where(mask, returns, 0)
        var_returns = masked_var(returns, mask)
        ev = 1 - masked_var(returns - values, mask) / var_returns
        return torch.where(var_returns > 0, ev, torch.nan)


def per_token_rewards(scores: torch.Tensor, kl: torch.Tensor, kl_coef: float, mask: torch.Tensor) -> torch.Tensor:
    """Dense PPO rewards: -kl_coef * kl at each valid token, plus the sequence score at the last valid token.

    scores: (b,) reward-model scores; kl, mask: (b, t). Returns (b, t), 0 at invalid tokens. A row with no
    valid token has nowhere to put its score, so the score is dropped.
    """
    rewards = torch.where(mask, -kl_coef * kl, 0)
    if mask.shape[1] == 0:
        return rewards
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last_pos, last_idx = torch.where(mask, positions, -1).max(dim=1)
    score = torch.where(last_pos >= 0, scores.to(rewards.dtype), 0)
    return rewards.scatter_add(1, last_idx.unsqueeze(1), score.unsqueeze(1))
