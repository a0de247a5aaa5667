"""The registry of RL advantage estimators: the one place that says what each `ppo.advantage` needs.

Each entry says whether the estimator trains a critic (a `value` role or head), how many responses it
samples per prompt (1, or `group_size` for the group baselines), whether it needs the policy's greedy
response as a baseline, and how it turns one rollout into advantages. The trainer, the role builder, the
memory estimator, the recipe check (`ppo.advantage`'s allowed values and their docs) and `compare` read
it, so a new estimator is one entry here plus its math in `lowmem_rlhf.ops.rl`.

The module sits beside `config` (which reads it to check recipes) and imports torch and `ops` only
inside the advantage functions, so checking a recipe does not load torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class AdvantageInputs:
    """One rollout, as every estimator sees it. b sequences; t response tokens (right padded).

    scores: (b,) the scores used (reward model + reward functions, penalised); kl: (b, t) per-token
    KL(policy || reference), 0 at invalid tokens; kl_coef: beta this iteration; mask: (b, t) response
    mask; values: (b, t) critic values, or None without a critic; baseline_scores: (b,) scores of the
    policy's greedy responses to the same prompts, or None unless the estimator asks for them.
    """

    scores: torch.Tensor
    kl: torch.Tensor
    kl_coef: float
    mask: torch.Tensor
    values: torch.Tensor | None = None
    baseline_scores: torch.Tensor | None = None


# settings: the `ppo` section of the recipe (a PPOConfig); returns (advantages (b, t), returns (b, t) or None)
AdvantageFn = Callable[[AdvantageInputs, Any], "tuple[torch.Tensor, torch.Tensor | None]"]


@dataclass(frozen=True)
class Estimator:
    """One advantage estimator. `min_group_size` > 1 means it samples `group_size` responses per prompt."""

    name: str
    label: str  # the method's name in compare's tables and plots
    summary: str  # one line for the docs and the recipe reference
    critic: bool  # trains a value role (or a value head on the policy)
    greedy_baseline: bool  # scores the policy's greedy response to each prompt as its baseline
    min_group_size: int  # 1 = one sample per prompt; k >= 2 = `group_size` samples per prompt, at least k
    advantages: AdvantageFn

    @property
    def grouped(self) -> bool:
        return self.min_group_size > 1

    def samples_per_prompt(self, group_size: int) -> int:
        """Responses sampled per prompt in a rollout."""
        return group_size if self.grouped else 1


def _sequence_rewards(x: AdvantageInputs) -> torch.Tensor:
    """Critic-free estimators' sequence reward s = score - beta * sum_t KL: (b,)."""
    return x.scores - x.kl_coef * x.kl.sum(1)


def _per_token(seq_adv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Every valid token of a response gets its sequence's advantage: (b,) -> (b, t)."""
    return seq_adv[:, None] * mask


def _gae(x: AdvantageInputs, pc) -> tuple[torch.Tensor, torch.Tensor]:
    from lowmem_rlhf.ops.rl import gae_advantages, per_token_rewards
    from lowmem_rlhf.ops.stats import masked_whiten

    rewards = per_token_rewards(x.scores, x.kl, x.kl_coef, x.mask)
    advantages, returns = gae_advantages(rewards, x.values, x.mask, pc.gamma, pc.lam)
    if pc.whiten_advantages:
        advantages = masked_whiten(advantages, x.mask)
    return advantages, returns


def _grpo(x: AdvantageInputs, pc) -> tuple[torch.Tensor, None]:
    from lowmem_rlhf.ops.rl import group_advantages

    return _per_token(group_advantages(_sequence_rewards(x), pc.group_size), x.mask), None


def _rloo(x: AdvantageInputs, pc) -> tuple[torch.Tensor, None]:
    from lowmem_rlhf.ops.rl import rloo_advantages

    return _per_token(rloo_advantages(_sequence_rewards(x), pc.group_size), x.mask), None


def _remax(x: AdvantageInputs, pc) -> tuple[torch.Tensor, None]:
    return _per_token(_sequence_rewards(x) - x.baseline_scores, x.mask), None


def _reinforce_pp(x: AdvantageInputs, pc) -> tuple[torch.Tensor, None]:
    from lowmem_rlhf.ops.rl import per_token_rewards, reinforce_pp_advantages

    rewards = per_token_rewards(x.scores, x.kl, x.kl_coef, x.mask)
    return reinforce_pp_advantages(rewards, x.mask, pc.gamma), None


ESTIMATORS: dict[str, Estimator] = {
    e.name: e
    for e in (
        Estimator(
            "gae",
            "ppo",
            "PPO with a critic: GAE(gamma, lam) on per-token rewards, whitened over the rollout (`whiten_advantages`).",
            critic=True,
            greedy_baseline=False,
            min_group_size=1,
            advantages=_gae,
        ),
        Estimator(
            "grpo",
            "grpo",
            "GRPO: (s - group mean) / (group std + 1e-4) over the `group_size` samples of a prompt.",
            critic=False,
            greedy_baseline=False,
            min_group_size=2,
            advantages=_grpo,
        ),
        Estimator(
            "rloo",
            "rloo",
            "RLOO: s minus the mean of the other `group_size` - 1 samples of the same prompt.",
            critic=False,
            greedy_baseline=False,
            min_group_size=2,
            advantages=_rloo,
        ),
        Estimator(
            "remax",
            "remax",
            "ReMax: s minus the score of the policy's greedy response to the same prompt.",
            critic=False,
            greedy_baseline=True,
            min_group_size=1,
            advantages=_remax,
        ),
        Estimator(
            "reinforce_pp",
            "reinforce++",
            "REINFORCE++: per-token return-to-go (gamma) of the KL-penalised rewards, standardised over the "
            "whole rollout.",
            critic=False,
            greedy_baseline=False,
            min_group_size=1,
            advantages=_reinforce_pp,
        ),
    )
}
ESTIMATOR_NAMES = tuple(ESTIMATORS)


def markdown_table() -> str:
    """The estimators as the Markdown table in docs/ppo.md (a test keeps the two equal)."""
    rows = [
        "| `advantage` | in `compare` | critic | samples per prompt | greedy baseline | advantages |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for e in ESTIMATORS.values():
        samples = f"`group_size` (at least {e.min_group_size})" if e.grouped else "1"
        rows.append(
            f"| `{e.name}` | {e.label} | {'yes' if e.critic else 'no'} | {samples} | "
            f"{'yes' if e.greedy_baseline else 'no'} | {e.summary} |"
        )
    return "\n".join(rows)
