"""DPO: loss math by hand, reference = frozen SFT copy (step-0 loss log 2), frozen SFT and base, resume."""

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from conftest import base_fingerprint, fail_at, tiny_recipe
from safetensors.torch import load_file

from lowmem_rlhf.config import config_from_dict
from lowmem_rlhf.data.preference import load_pair_examples
from lowmem_rlhf.errors import UserError
from lowmem_rlhf.model.bank import AdapterBank
from lowmem_rlhf.model.loading import load_base
from lowmem_rlhf.ops import dpo_loss
from lowmem_rlhf.stages import dpo, sft
from lowmem_rlhf.train.loop import TrainLoop
from lowmem_rlhf.train.metrics import read_metrics


def test_dpo_losses_by_hand():
    pc, pr, rc, rr = torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.5])
    # h = (-1 + 3) - (-2 + 2.5) = 1.5; beta = 0.5 -> beta h = 0.75
    sig, r_c, r_r = dpo_loss(pc, pr, rc, rr, 0.5, "sigmoid")
    assert sig.item() == pytest.approx(math.log1p(math.exp(-0.75)))
    assert (r_c.item(), r_r.item()) == pytest.approx((0.5, -0.25))  # beta * (logp - ref)
    smooth, _, _ = dpo_loss(pc, pr, rc, rr, 0.5, "sigmoid", 0.1)
    assert smooth.item() == pytest.approx(0.9 * math.log1p(math.exp(-0.75)) + 0.1 * math.log1p(math.exp(0.75)))
    robust, _, _ = dpo_loss(pc, pr, rc, rr, 0.5, "robust", 0.1)
    assert robust.item() == pytest.approx((0.9 * math.log1p(math.exp(-0.75)) - 0.1 * math.log1p(math.exp(0.75))) / 0.8)
    assert dpo_loss(pc, pr, rc, rr, 0.5, "hinge")[0].item() == pytest.approx(0.25)  # relu(1 - 0.75)
    assert dpo_loss(pc, pr, rc, rr, 0.5, "ipo")[0].item() == pytest.approx((1.5 - 1.0) ** 2)  # (h - 1/(2 beta))^2
    # policy == reference: log 2 and zero rewards
    same, zc, zr = dpo_loss(pc, pr, pc, pr, 0.1, "sigmoid")
    assert same.item() == pytest.approx(math.log(2)) and zc.item() == 0.0 and zr.item() == 0.0
    # plain reference on random data
    g = torch.Generator().manual_seed(0)
    x = [torch.randn(7, generator=g) for _ in range(4)]
    h = (x[0] - x[1]) - (x[2] - x[3])
    torch.testing.assert_close(dpo_loss(*x, 0.2, "sigmoid")[0], -F.logsigmoid(0.2 * h))
    with pytest.raises(ValueError, match="unknown DPO loss"):
        dpo_loss(*x, 0.2, "kto")


def recipe(out, **dpo_keys) -> dict:
    data = tiny_recipe(out, max_steps=6, save_steps=0)
    data["stages"] = ["sft", "dpo"]
    data["dpo"] = {
        "dataset": "builtin:tiny/rankings.jsonl",
        "max_samples": 48,
        "max_steps": 6,
        "batch_size": 4,
        "gradient_accumulation_steps": 2,
        "learning_rate": 2e-3,
        "logging_steps": 1,
        "save_steps": 3,
        "save_total_limit": 5,
        "max_length": 96,
        "kl_samples": 8,
        "max_new_tokens": 12,
        **dpo_keys,
    }
    return data


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, tiny_path):
    out = tmp_path_factory.mktemp("dpo") / "base"
    sft.run(config_from_dict(recipe(out)))
    return out


def fork(src, dst, **keys):
    shutil.copytree(src, dst)
    return config_from_dict(recipe(dst, **keys))


@pytest.mark.parametrize("precompute", [False, True])
def test_dpo_step0_is_log2_and_outputs(sft_run, tmp_path, precompute):
    from lowmem_rlhf.tiny.task import DATA_DIR

    held_out = tmp_path / "eval.jsonl"
    held_out.write_text("".join((DATA_DIR / "rankings_eval.jsonl").read_text().splitlines(keepends=True)[:12]))
    out = dpo.run(fork(sft_run, tmp_path / "run", precompute_ref_logprobs=precompute, eval_dataset=str(held_out)))
    rows = read_metrics(out / "metrics.jsonl")
    # reference = frozen copy of the (non-zero) SFT adapter: the first step sees policy == reference
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    if precompute:  # reference log-probs batched differently: equal up to float reassociation
        assert abs(rows[0]["reward_chosen"]) < 1e-5 and abs(rows[0]["reward_rejected"]) < 1e-5
    else:  # the live reference pass sees the very same batch: exactly 0
        assert rows[0]["reward_chosen"] == 0.0 and rows[0]["reward_rejected"] == 0.0
    assert rows[-1]["margin"] > 0  # the policy moved towards the chosen responses
    diag = json.loads((out / "diagnostics.json").read_text())
    assert {"eval_accuracy", "eval_margin", "eval_loss", "sample_kl"} <= set(diag)
    assert diag["sample_kl"] > 0  # the trained policy's samples are no longer the reference's
    assert (out / "adapter_model.safetensors").is_file()


def test_length_normalized_and_rpo_losses_at_step0(sft_run):
    from dataclasses import replace

    from lowmem_rlhf.data.preference import collate_pairs

    cfg = config_from_dict(recipe(sft_run))
    model, tok = load_base(cfg.model)
    bank = AdapterBank(model, gradient_checkpointing=False)
    bank.add_role("policy", from_dir=sft_run / "sft", trainable=True)
    bank.add_role("reference", copy_of="policy")
    bank.disable_dropout()
    examples = load_pair_examples("builtin:tiny/rankings.jsonl", "train", tok, 96, 2, "dpo")[:4]
    batch = collate_pairs(examples, tok.pad_token_id)
    w = batch["weights"]
    with torch.no_grad(), bank.use("policy") as m:
        normalized, _ = dpo.dpo_loss_sum(bank, m, batch, replace(cfg.dpo, length_normalize=True), 512)
        rpo, metrics = dpo.dpo_loss_sum(bank, m, batch, replace(cfg.dpo, sft_coef=0.5), 512)
        logps = dpo.sequence_logprobs(m, batch, 512)
    # policy == reference: log 2 per pair, also with per-token log-probs
    assert normalized.item() == pytest.approx(math.log(2) * w.sum().item(), rel=1e-6)
    # RPO adds 0.5 x the chosen response's NLL per token (EOS included)
    tokens = batch["response_mask"][:4, 1:].sum(1)
    nll = -logps[:4] / tokens
    assert nll.min() > 0
    assert rpo.item() == pytest.approx(((math.log(2) + 0.5 * nll) * w).sum().item(), rel=1e-5)
    assert metrics["logp_chosen"] == pytest.approx((logps[:4] * w).sum().item(), rel=1e-6)


def test_precomputed_and_live_reference_agree(sft_run, tmp_path):
    a = dpo.run(fork(sft_run, tmp_path / "a", precompute_ref_logprobs=True, max_steps=2))
    b = dpo.run(fork(sft_run, tmp_path / "b", precompute_ref_logprobs=False, max_steps=2))
    la, lb = read_metrics(a / "metrics.jsonl"), read_metrics(b / "metrics.jsonl")
    assert [r["loss"] for r in la] == pytest.approx([r["loss"] for r in lb], abs=1e-5)


def test_sft_adapter_and_base_untouched_by_dpo(sft_run, tmp_path):
    cfg = config_from_dict(recipe(sft_run))
    model, tok = load_base(cfg.model)
    bank = AdapterBank(model)
    bank.add_role("policy", from_dir=sft_run / "sft", trainable=True)
    bank.add_role("reference", copy_of="policy")
    ref_before, base_before, pol_before = (
        bank.state_dict("reference"),
        base_fingerprint(bank.peft_model),
        bank.state_dict("policy"),
    )
    train = load_pair_examples(cfg.dpo.dataset, "train", tok, cfg.dpo.max_length, 16, "dpo")
    assert {id(p) for p in bank.trainable_parameters()} == {id(p) for p in bank.role_parameters("policy")}
    dpo.train_dpo(bank, cfg.dpo, tmp_path / "stage", train, [], tok.pad_token_id, 0, {}, 512)
    assert all(torch.equal(bank.state_dict("reference")[k], v) for k, v in ref_before.items())
    assert base_fingerprint(bank.peft_model) == base_before
    assert any(not torch.equal(bank.state_dict("policy")[k], v) for k, v in pol_before.items())


def test_dpo_kill_and_resume_equals_uninterrupted(sft_run, tmp_path, monkeypatch):
    full = dpo.run(fork(sft_run, tmp_path / "full", kl_samples=0))
    cfg = fork(sft_run, tmp_path / "resumed", kl_samples=0)
    with monkeypatch.context() as m:
        fail_at(m, TrainLoop, "_step", 4, RuntimeError("killed"))
        with pytest.raises(RuntimeError, match="killed"):
            dpo.run(cfg)
    resumed = dpo.run(cfg)
    a, b = load_file(str(full / "adapter_model.safetensors")), load_file(str(resumed / "adapter_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_dpo_needs_sft(tmp_path, tiny_path):
    with pytest.raises(UserError, match="needs the finished sft stage"):
        dpo.run(config_from_dict(recipe(tmp_path / "none")))


def trl_dpo(per_token: torch.Tensor, mask: torch.Tensor, ref: torch.Tensor, beta: float, loss_types, weights=None):
    """TRL 1.x's DPOTrainer loss and logged rewards on hand-made per-token log-probs (its own code, a stub model)."""
    from collections import defaultdict
    from types import SimpleNamespace

    from trl import DPOTrainer

    t = DPOTrainer.__new__(DPOTrainer)
    t.model = SimpleNamespace(training=True)
    t.accelerator = SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x)
    t.beta, t.loss_types, t.loss_weights = beta, loss_types, weights or [1.0] * len(loss_types)
    t.ld_alpha, t.f_divergence_type, t.aux_loss_enabled, t.use_weighting = None, "reverse_kl", False, False
    t.precompute_ref_logps, t._tp_size, t._total_train_tokens = True, 1, 0
    t._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    zeros = torch.zeros_like(per_token)
    outputs = SimpleNamespace(log_probs=per_token, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())
    n = len(ref) // 2
    inputs = {
        "input_ids": torch.zeros_like(mask, dtype=torch.long),
        "attention_mask": torch.ones_like(mask),
        "completion_mask": mask.long(),
        "ref_chosen_logps": ref[:n],
        "ref_rejected_logps": ref[n:],
    }
    loss = t._compute_loss(lambda **kw: outputs, inputs, return_outputs=False)
    return float(loss), t._metrics["train"]["rewards/chosen"][-1], t._metrics["train"]["rewards/margins"][-1]


def test_ipo_and_rpo_match_trl_on_hand_made_logprobs(monkeypatch):
    from dataclasses import replace

    from lowmem_rlhf.config import DPOConfig

    # 3 pairs of different lengths (chosen first, then rejected); position 0 is the prompt
    lengths = torch.tensor([2, 5, 3, 6, 1, 4])
    mask = torch.zeros(6, 7, dtype=torch.bool)
    for i, k in enumerate(lengths):
        mask[i, 1 : 1 + k] = True
    g = torch.Generator().manual_seed(0)
    per_token = torch.where(mask[:, 1:], -torch.rand(6, 6, generator=g) * 3, 0.0)
    ref = per_token.sum(1) + torch.randn(6, generator=g)
    summed = per_token.sum(1)
    monkeypatch.setattr(dpo, "sequence_logprobs", lambda model, batch, chunk: summed)
    batch = {"response_mask": mask, "ref_logps": ref, "weights": torch.ones(3)}

    def ours(**keys) -> tuple[float, float, float]:
        loss, m = dpo.dpo_loss_sum(None, None, batch, replace(DPOConfig(beta=0.1), **keys), 64)
        return float(loss) / 3, m["reward_chosen"] / 3, m["margin"] / 3

    ipo = ours(loss_type="ipo")
    assert ipo == pytest.approx(trl_dpo(per_token, mask, ref, 0.1, ["ipo"]), rel=1e-6)
    # the IPO paper's form on sums is the other option; the logged rewards do not change scale with it
    paper = ours(loss_type="ipo", length_normalize=False)
    h = (summed[:3] - ref[:3]) - (summed[3:] - ref[3:])
    assert paper[0] == pytest.approx(float(((h - 5.0) ** 2).mean()), rel=1e-6)
    assert paper[0] != pytest.approx(ipo[0], rel=0.1) and paper[1:] == ipo[1:]
    # RPO: TRL pools the NLL over the batch's chosen tokens ...
    pooled = ours(sft_coef=0.7, sft_average="tokens")
    assert pooled == pytest.approx(trl_dpo(per_token, mask, ref, 0.1, ["sigmoid", "sft"], [1.0, 0.7]), rel=1e-6)
    # ... the default averages each chosen response's NLL per token (the RPO paper)
    sigmoid = ours()[0]
    per_seq = float((-summed[:3] / lengths[:3]).mean())
    assert ours(sft_coef=0.7)[0] == pytest.approx(sigmoid + 0.7 * per_seq, rel=1e-6)
    assert sigmoid == pytest.approx(trl_dpo(per_token, mask, ref, 0.1, ["sigmoid"])[0], rel=1e-6)
