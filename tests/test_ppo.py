"""PPO / GRPO / RLOO / ReMax on the tiny 4-bit model: pitfalls 1, 4, 5, 6, 7, 12, 13 and frozen roles."""

import json
import shutil

import pytest
import torch
from conftest import base_fingerprint, fail_at, tiny_rl_recipe
from safetensors.torch import load_file

from lowmem_rlhf.config import ModelConfig, config_from_dict
from lowmem_rlhf.errors import UserError
from lowmem_rlhf.model.bank import AdapterBank
from lowmem_rlhf.model.loading import load_base
from lowmem_rlhf.ops import gae_advantages, kl_penalty, masked_whiten, per_token_rewards
from lowmem_rlhf.rollout.generate import DecodeConfig, SamplingConfig, generate
from lowmem_rlhf.stages import ppo, rm, sft
from lowmem_rlhf.train.metrics import read_metrics
from lowmem_rlhf.train.ppo import PPOTrainer

recipe = tiny_rl_recipe


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, tiny_path):
    out = tmp_path_factory.mktemp("ppo") / "base"
    cfg = config_from_dict(recipe(out))
    sft.run(cfg)
    rm.run(cfg)
    return out


def fork(base_run, dst, **ppo_keys):
    shutil.copytree(base_run, dst)
    return config_from_dict(recipe(dst, **ppo_keys))


@pytest.fixture
def capture(monkeypatch):
    """Runs PPO normally but keeps the trainer and the role weights from before training."""
    seen = {}
    real_run = PPOTrainer.run

    def run(self):
        b = self.bank
        seen["before"] = {r: b.state_dict(r) for r in b.roles}
        seen["base"] = base_fingerprint(b.peft_model)
        seen["trainer"] = self
        return real_run(self)

    monkeypatch.setattr(PPOTrainer, "run", run)
    return seen


def test_ppo_invariants_and_frozen_roles(base_run, tmp_path, capture):
    cfg = fork(base_run, tmp_path / "run")
    out = ppo.run(cfg)
    rows = read_metrics(out / "metrics.jsonl")
    # pitfall 1: reference = frozen copy of the (non-zero) SFT adapter, so step-0 KL is exactly 0 ...
    assert rows[0]["kl"] == 0.0
    # ... and pitfall 6: each iteration's first minibatch reproduces the rollout log-probs exactly (ratio 1)
    assert all(r["first_minibatch_max_logratio"] == 0.0 for r in rows)
    # pitfall 13: reward-hacking signals are logged
    for key in (
        "response_length",
        "eos_rate",
        "reward_length_corr",
        "kl",
        "entropy",
        "clipfrac",
        "approx_kl",
        "value_loss",
        "explained_variance",
        "reward_raw",
        "reward",
        "gold",
    ):
        assert all(key in r for r in rows), key

    t, before = capture["trainer"], capture["before"]
    bank = t.bank
    sft_b = load_file(str(base_run / "sft" / "adapter_model.safetensors"))
    assert any(v.abs().sum() > 0 for k, v in sft_b.items() if "lora_B" in k)  # the SFT adapter is non-zero
    for role in ("reference", "reward"):
        after = bank.state_dict(role)
        assert all(torch.equal(after[k], v) for k, v in before[role].items()), role
    assert "head.linear.weight" in before["reward"]  # the score head is part of what stayed identical
    assert base_fingerprint(bank.peft_model) == capture["base"]
    for role in ("policy", "value"):
        after = bank.state_dict(role)
        assert any(not torch.equal(after[k], v) for k, v in before[role].items()), role
    held = {id(p) for g in t.optimizer.param_groups for p in g["params"]}
    assert held == {id(p) for r in ("policy", "value") for p in bank.role_parameters(r)}

    # pitfall 7: the KL that is logged is the KL used in the rewards, masked by the response mask
    ro = t.last_rollout
    expected_kl = torch.where(ro.response_mask, kl_penalty(ro.logprobs, ro.ref_logprobs, "k1"), 0.0)
    assert torch.equal(ro.kl, expected_kl)
    assert rows[-1]["kl"] == pytest.approx(float(ro.kl.sum(1).mean()), rel=1e-6)
    beta = rows[-1]["kl_coef"]
    rewards = per_token_rewards(ro.scores, ro.kl, beta, ro.response_mask)
    adv, ret = gae_advantages(rewards, ro.values, ro.response_mask, 1.0, 0.95)
    torch.testing.assert_close(ro.advantages, masked_whiten(adv, ro.response_mask))
    torch.testing.assert_close(ro.returns, ret)

    # pitfall 4: generation stops at EOS and nothing after it is a response token
    eos = t.tok.eos_token_id
    for i, r in enumerate(ro.response_ids):
        assert int(ro.response_mask[i].sum()) == len(r)
        assert eos not in r[:-1]
        assert not ro.response_mask[i, len(r) :].any()
    # outputs: policy adapter, separate critic with its head, samples and the run summary
    assert (out / "adapter_model.safetensors").is_file() and (out / "value" / "head.safetensors").is_file()
    assert json.loads((out / "samples.jsonl").read_text().splitlines()[0])["response"] is not None


def test_greedy_generation_batched_equals_unbatched(base_run):
    model, tok = load_base(ModelConfig(device="cpu"))
    bank = AdapterBank(model, gradient_checkpointing=False)
    bank.add_role("policy", from_dir=base_run / "sft")
    from lowmem_rlhf.data.chat import encode_prompt

    texts = ["What is 2 plus 3?", "Tell me the color of a banana.", "What does a cow say?", "Add 7 and 1."]
    prompts = [encode_prompt(tok, [{"role": "user", "content": t}]) for t in texts]
    assert len({len(p) for p in prompts}) > 1  # different lengths: the batch really is left-padded
    greedy = SamplingConfig(max_new_tokens=16, temperature=0.0)
    batched = generate(bank, "policy", prompts, greedy, tok.eos_token_id, tok.pad_token_id).response_ids
    alone = [generate(bank, "policy", [p], greedy, tok.eos_token_id, tok.pad_token_id).response_ids[0] for p in prompts]
    assert batched == alone
    assert any(len(r) > 2 for r in alone)  # real responses, not an immediate EOS

    # how the rows are decoded never changes greedy tokens: calls of 3 rows (sorted by length, a short last
    # call), a static cache with prompts padded wider than the longest, and the compiled decode step
    inner = bank.peft_model.get_base_model()
    widths, real_generate = [], type(bank.peft_model).generate

    def spy(self, *args, **kwargs):
        widths.append((kwargs["input_ids"].shape, type(kwargs.get("past_key_values")).__name__))
        return real_generate(self, *args, **kwargs)

    width = max(len(p) for p in prompts) + 5
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(type(bank.peft_model), "generate", spy)
        for decode in (
            DecodeConfig(batch_size=3),
            DecodeConfig(cache="static", prompt_width=width),
            DecodeConfig(batch_size=3, cache="static", prompt_width=width, compile=True),
        ):
            got = generate(bank, "policy", prompts, greedy, tok.eos_token_id, tok.pad_token_id, decode=decode)
            assert got.response_ids == alone, decode
        assert "_compiled_call" in vars(inner)  # the decode step really was compiled
        # the static cache pads every call to the prompt width, whatever max_new_tokens is; the compiled
        # run's short call is filled up to 3 rows
        one = SamplingConfig(max_new_tokens=1, temperature=0.0)
        static = DecodeConfig(cache="static", prompt_width=width)
        generate(bank, "policy", prompts, one, tok.eos_token_id, tok.pad_token_id, decode=static)
    longest = max(len(p) for p in prompts)
    assert widths == [
        ((3, longest), "NoneType"),
        ((1, sorted(map(len, prompts))[0]), "NoneType"),
        ((4, width), "StaticCache"),
        ((3, width), "StaticCache"),
        ((3, width), "StaticCache"),
        ((4, width), "StaticCache"),
    ]
    assert "_valid_auto_compile_criteria" not in vars(inner)  # the opt-in is undone ...

    def fail(*args, **kwargs):
        raise RuntimeError("generate failed")

    with pytest.MonkeyPatch.context() as mp, pytest.raises(RuntimeError, match="generate failed"):
        mp.setattr(type(bank.peft_model), "generate", fail)
        generate(bank, "policy", prompts, greedy, tok.eos_token_id, tok.pad_token_id, decode=decode)
    assert "_valid_auto_compile_criteria" not in vars(inner)  # ... also when generate raises
    narrow = DecodeConfig(cache="static", prompt_width=4)
    with pytest.raises(ValueError, match="longer than the static cache's prompt_width 4"):
        generate(bank, "policy", prompts, greedy, tok.eos_token_id, tok.pad_token_id, decode=narrow)
    with pytest.raises(ValueError, match="compile needs the static cache and a prompt_width"):
        DecodeConfig(cache="static", compile=True)


@pytest.mark.parametrize(
    ("keys", "value_role"),
    [
        ({"advantage": "grpo"}, None),
        # rollouts in calls of 4 sequences on a static cache
        ({"advantage": "rloo", "generation_batch_size": 4, "generation_cache": "static"}, None),
        ({"advantage": "remax"}, None),
        ({"advantage": "reinforce_pp"}, None),
        ({"advantage": "gae", "critic": "shared", "ptx_coef": 0.5}, "policy"),
    ],
)
def test_other_estimators(base_run, tmp_path, capture, keys, value_role):
    out = ppo.run(fork(base_run, tmp_path / "run", num_steps=2, **keys))
    t = capture["trainer"]
    assert t.value_role == value_role
    assert ("value" in t.bank.roles) is False
    rows = read_metrics(out / "metrics.jsonl")
    assert rows[0]["kl"] == 0.0 and all(r["first_minibatch_max_logratio"] == 0.0 for r in rows)
    assert all(torch.isfinite(torch.tensor(r["pg_loss"])) for r in rows)
    if "ptx_coef" in keys:
        assert all(r["ptx_loss"] > 0 for r in rows)
        assert (out / "head.safetensors").is_file()  # the shared critic's value head is saved with the policy
    after = t.bank.state_dict("policy")
    assert any(not torch.equal(after[k], v) for k, v in capture["before"]["policy"].items())
    ro = t.last_rollout
    if keys["advantage"] in ("grpo", "rloo"):
        assert len(ro.input_ids) == 8 * 2 and ro.prompt_index[0] == ro.prompt_index[1]  # k samples per prompt
    if keys["advantage"] == "reinforce_pp":
        # one sample per prompt; advantages standardised over every response token of the rollout
        valid = ro.advantages[ro.response_mask].double()
        assert len(ro.input_ids) == 8 and valid.numel() > 8
        assert abs(valid.mean().item()) < 1e-6 and valid.std(correction=0).item() == pytest.approx(1.0, abs=1e-5)
        assert (ro.advantages[~ro.response_mask] == 0).all()


def test_ppo_kill_and_resume_equals_uninterrupted(base_run, tmp_path, monkeypatch):
    full = ppo.run(fork(base_run, tmp_path / "full", num_steps=4, save_steps=2, sample_log_steps=1))
    cfg = fork(base_run, tmp_path / "resumed", num_steps=4, save_steps=2, sample_log_steps=1)
    with monkeypatch.context() as m:
        fail_at(m, PPOTrainer, "update", 3, RuntimeError("killed"))
        with pytest.raises(RuntimeError, match="killed"):
            ppo.run(cfg)
    resumed = ppo.run(cfg)
    for name in ("adapter_model.safetensors", "value/adapter_model.safetensors", "value/head.safetensors"):
        a, b = load_file(str(full / name)), load_file(str(resumed / name))
        assert all(torch.equal(a[k], b[k]) for k in a), name
    fm, rmx = read_metrics(full / "metrics.jsonl"), read_metrics(resumed / "metrics.jsonl")
    assert [r["step"] for r in rmx] == [1, 2, 3, 4]
    assert [r["reward_raw"] for r in fm] == [r["reward_raw"] for r in rmx]
    # the killed run had logged step 3's samples too: they are dropped with its metrics, not duplicated
    fs, rs = read_metrics(full / "samples.jsonl"), read_metrics(resumed / "samples.jsonl")
    assert [r["step"] for r in rs] == [s for s in (1, 2, 3, 4) for _ in range(8)] and fs == rs


def test_ppo_needs_finished_sft_and_rm(tmp_path, tiny_path):
    with pytest.raises(UserError, match="needs the finished sft stage"):
        ppo.run(config_from_dict(recipe(tmp_path / "empty")))


def test_compiled_generation_needs_static_cache(tmp_path):
    with pytest.raises(UserError, match="`ppo.compile_generation: true` needs `generation_cache: static`"):
        config_from_dict(recipe(tmp_path, compile_generation=True))


def test_group_estimators_need_groups(tmp_path):
    with pytest.raises(UserError, match="`ppo.group_size` must be at least 2 for advantage=grpo"):
        config_from_dict(recipe(tmp_path, advantage="grpo", group_size=1))
