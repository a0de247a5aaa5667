"""Pure tensor math (torch only): no config, no I/O, no modules with state.

Dims legend: b batch, t tokens, d hidden size, v vocab. Masks are bool, True = valid, named `*mask`.
"""

from lowmem_rlhf.ops.logprobs import chunked_logprobs, chunked_logprobs_entropy
from lowmem_rlhf.ops.preference import bradley_terry_loss, dpo_loss, pairwise_accuracy, pearson
from lowmem_rlhf.ops.rl import (
    explained_variance,
    gae_advantages,
    group_advantages,
    kl_penalty,
    per_token_rewards,
    ppo_policy_loss,
    ppo_value_loss,
    reinforce_pp_advantages,
    rloo_advantages,
)
from lowmem_rlhf.ops.stats import masked_mean, masked_var, masked_whiten

__all__ = [
    "bradley_terry_loss",
    "chunked_logprobs",
    "chunked_logprobs_entropy",
    "dpo_loss",
    "explained_variance",
    "gae_advantages",
    "group_advantages",
    "kl_penalty",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "pairwise_accuracy",
    "pearson",
    "per_token_rewards",
    "ppo_policy_loss",
    "ppo_value_loss",
    "reinforce_pp_advantages",
    "rloo_advantages",
]
