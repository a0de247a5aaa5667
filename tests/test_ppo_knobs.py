"""PPO knobs change what they say, on PPOTrainer internals with fresh LoRA roles on the tiny model (seconds each).

Each test fails if its knob is ignored: the entropy bonus, the adaptive KL controller (and its exact
resume), missing_eos_penalty, length_penalty, kl_estimator k2/k3, normalize_reward and critic: shared.
"""

from __future__ import annotations

import pytest
import torch
from conftest import fail_at

from lowmem_rlhf.config import LoRAConfig, ModelConfig, PPOConfig
from lowmem_rlhf.data.formats import load_rows
from lowmem_rlhf.data.prompts import tokenize_prompts
from lowmem_rlhf.model.bank import AdapterBank, lora_config
from lowmem_rlhf.model.forward import causal_lm, hidden_states
from lowmem_rlhf.model.loading import load_base
from lowmem_rlhf.ops import gae_advantages, group_advantages, kl_penalty, masked_mean, per_token_rewards
from lowmem_rlhf.train.metrics import read_metrics
from lowmem_rlhf.train.ppo import AdaptiveKLController, PPOTrainer

STATS = {"mean": 0.5, "std": 2.0}


def perturb(bank: AdapterBank, role: str, seed: int, scale: float = 0.3) -> None:
    """Non-zero LoRA B matrices (a fresh adapter is the identity), so roles really differ."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in bank.named_role_parameters(role).items():
            if "lora_B" in name:
                p.copy_(scale * torch.randn(p.shape, generator=g))


def make_trainer(tmp_path, critic: str | None = "separate", stats: dict | None = STATS, **keys) -> PPOTrainer:
    """A PPOTrainer on fresh roles: policy (perturbed, so it differs from the reference), reward, value."""
    model, tok = load_base(ModelConfig(device="cpu"))
    bank = AdapterBank(model, gradient_checkpointing=False)
    lc = lora_config(LoRAConfig(r=4, alpha=8, dropout=0.0))
    bank.add_role("reference", lc)
    perturb(bank, "reference", 0)
    bank.add_role("policy", copy_of="reference", trainable=True, head=critic == "shared", fresh_head=True)
    perturb(bank, "policy", 1, scale=0.1)
    bank.add_role("reward", lc, head=True)
    perturb(bank, "reward", 2)
    if critic == "separate":
        bank.add_role("value", copy_of="reward", trainable=True, head=True)
    settings = {
        "dataset": "builtin:tiny/prompts.jsonl",
        "num_steps": 2,
        "rollout_batch_size": 4,
        "mini_batch_size": 4,
        "micro_batch_size": 2,
        "ppo_epochs": 1,
        "max_new_tokens": 5,
        "save_steps": 0,
        "advantage": "gae" if critic else "grpo",
        "group_size": 2,
        "critic": critic or "separate",
        **keys,
    }
    pc = PPOConfig(**settings)
    rows, name = load_rows(pc.dataset)
    prompts, texts, _ = tokenize_prompts(rows[:16], tok, 64, name)
    torch.manual_seed(0)
    return PPOTrainer(
        bank=bank,
        pc=pc,
        stage_dir=tmp_path / "ppo",
        prompts=prompts,
        prompt_texts=texts,
        tokenizer=tok,
        seed=3,
        settings=settings,
        reward_stats=stats,
        chunk_size=64,
    )


def ended(trainer: PPOTrainer, ro) -> torch.Tensor:
    return torch.tensor([bool(r) and r[-1] == trainer.tok.eos_token_id for r in ro.response_ids])


def test_entropy_bonus_is_the_full_distribution_entropy_in_value_and_gradient(tmp_path):
    t = make_trainer(tmp_path, critic=None, entropy_coef=0.5)
    ro = t.rollout(0)
    idx = torch.arange(2)
    ro = ro._replace(advantages=torch.zeros_like(ro.advantages))  # only the bonus moves the policy
    stats = t._micro_step(ro, idx, 1.0)
    got = {n: p.grad.clone() for n, p in t.bank.named_role_parameters("policy").items() if p.grad is not None}
    t.optimizer.zero_grad(set_to_none=True)

    # the same quantity from full logits: mean over response tokens of -sum_v p_v log p_v
    ids, mask, rmask, p = ro.input_ids[idx], ro.attention_mask[idx], ro.response_mask[idx], ro.prompt_width
    with t.bank.use("policy", train=True) as m:
        h = hidden_states(m, ids, mask)[:, p - 1 : ids.shape[1] - 1]
        logp = torch.log_softmax(causal_lm(m).get_output_embeddings()(h).float() / t.pc.temperature, -1)
        entropy = masked_mean(-(logp.exp() * logp).sum(-1), rmask)
        (-0.5 * entropy).backward()
    # two fp32 computations in different orders (per chunk, lse - sum p*z, against log_softmax): where the
    # entropy is small they cancel differently; seen up to 6e-5 nats apart over a few LoRA initialisations
    assert stats["entropy"] == pytest.approx(float(entropy.detach()), rel=1e-3, abs=2e-4)
    sampled = float(masked_mean(-logp.detach().gather(-1, ids[:, p:, None]).squeeze(-1), rmask))
    assert abs(stats["entropy"] - sampled) > 1e-3  # not the sampled tokens' -log p
    want = {n: p.grad for n, p in t.bank.named_role_parameters("policy").items() if p.grad is not None}
    assert got.keys() == want.keys() and got
    scale = max(float(g.abs().max()) for g in want.values())
    for n in got:  # fp32 rounding of the two orders again: a thousandth of the largest gradient
        torch.testing.assert_close(got[n], want[n], atol=1e-3 * scale, rtol=1e-3)


def test_adaptive_kl_controller_by_hand():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=100)
    ctl.update(12.0, 16)  # KL twice the target: error clipped to +0.2
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 16 / 100))
    ctl.update(5.4, 16)  # 10% under the target
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 0.16) * (1 - 0.1 * 0.16))
    fixed = AdaptiveKLController(0.1, target=None, horizon=100)
    fixed.update(12.0, 16)
    assert fixed.value == 0.1


def test_adaptive_kl_moves_beta_in_a_stage_and_resumes_exactly(tmp_path, monkeypatch):
    keys = {"adaptive_kl": True, "target_kl": 0.01, "kl_horizon": 20, "kl_coef": 0.2, "num_steps": 3, "save_steps": 1}
    full = make_trainer(tmp_path / "full", **keys)
    full.run()
    rows = read_metrics(full.stage_dir / "metrics.jsonl")
    # each iteration's beta is the previous one moved by the controller with that iteration's KL
    beta = 0.2
    for row in rows:
        assert row["kl_coef"] == pytest.approx(beta, rel=1e-12)
        beta *= 1 + min(max(row["kl"] / 0.01 - 1, -0.2), 0.2) * 4 / 20
    assert rows[-1]["kl_coef"] != 0.2

    killed = make_trainer(tmp_path / "resumed", **keys)
    with monkeypatch.context() as m:
        fail_at(m, PPOTrainer, "update", 2, RuntimeError("killed"))
        with pytest.raises(RuntimeError, match="killed"):
            killed.run()
    resumed = make_trainer(tmp_path / "resumed", **keys)
    resumed.run()
    again = read_metrics(resumed.stage_dir / "metrics.jsonl")
    assert [r["kl_coef"] for r in again] == [r["kl_coef"] for r in rows]
    assert resumed.kl_ctl.value == full.kl_ctl.value


def test_missing_eos_and_length_penalties_and_reward_normalisation(tmp_path):
    t = make_trainer(tmp_path, missing_eos_penalty=1.5, length_penalty=0.25)
    ro = t.rollout(0)
    lengths = ro.response_mask.sum(1).float()
    done = ended(t, ro)
    assert (~done).any()  # 5 new tokens: some responses are cut before their EOS
    want = (ro.raw_scores - 0.5) / 2.0 - 1.5 * (~done).float() - 0.25 * lengths
    torch.testing.assert_close(ro.scores, want)
    # the penalties reach the rewards the advantages are computed from
    rewards = per_token_rewards(ro.scores, ro.kl, t.kl_ctl.value, ro.response_mask)
    _, returns = gae_advantages(rewards, ro.values, ro.response_mask, 1.0, 0.95)
    torch.testing.assert_close(ro.returns, returns)

    raw = make_trainer(tmp_path / "raw", normalize_reward=False)
    ro = raw.rollout(0)
    assert raw.reward_stats is None and torch.equal(ro.scores, ro.raw_scores)


@pytest.mark.parametrize("estimator", ["k2", "k3"])
def test_kl_estimator_is_the_one_in_the_rewards(tmp_path, estimator):
    t = make_trainer(tmp_path, critic=None, kl_estimator=estimator, kl_coef=0.3)
    ro = t.rollout(0)
    want = torch.where(ro.response_mask, kl_penalty(ro.logprobs, ro.ref_logprobs, estimator), 0.0)
    k1 = torch.where(ro.response_mask, kl_penalty(ro.logprobs, ro.ref_logprobs, "k1"), 0.0)
    assert not torch.allclose(want, k1, atol=1e-4)  # the policy differs from the reference
    torch.testing.assert_close(ro.kl, want)
    seq_adv = group_advantages(ro.scores - 0.3 * want.sum(1), 2)
    torch.testing.assert_close(ro.advantages, seq_adv[:, None] * ro.response_mask)
    assert t.rollout_metrics(ro)["kl"] == pytest.approx(float(want.sum(1).mean()), rel=1e-6)


def test_shared_critic_is_a_value_head_on_the_policy(tmp_path):
    t = make_trainer(tmp_path, critic="shared")
    assert t.value_role == "policy" and "value" not in t.bank.roles
    head = t.bank.head("policy")
    held = {id(p) for g in t.optimizer.param_groups for p in g["params"]}
    assert {id(p) for p in head.parameters()} <= held
    ro = t.rollout(0)
    # the rollout's values are the policy head read on the policy adapter's hidden states
    ids, mask, p = ro.input_ids, ro.attention_mask, ro.prompt_width
    with torch.no_grad(), t.bank.use("policy") as m:
        values = head(hidden_states(m, ids, mask)[:, p - 1 : ids.shape[1] - 1])
    torch.testing.assert_close(ro.values, values)
    before = {k: v.clone() for k, v in head.state_dict().items()}
    metrics = t.update(ro, 0)
    assert metrics["value_loss"] > 0
    assert any(not torch.equal(before[k], v) for k, v in head.state_dict().items())  # the value loss trains it
