"""Reward model: loss math, pair expansion, last-token scoring, saving, frozen SFT/base, resume."""

import json
import math

import pytest
import torch
from conftest import base_fingerprint, fail_at, tiny_recipe
from safetensors.torch import load_file

from lowmem_rlhf.cli import main
from lowmem_rlhf.config import ModelConfig, config_from_dict
from lowmem_rlhf.data.preference import (
    expand_rows,
    load_group_examples,
    load_pair_examples,
    normalize_preference_row,
    pad_sequences,
)
from lowmem_rlhf.errors import UserError
from lowmem_rlhf.model.bank import AdapterBank
from lowmem_rlhf.model.heads import HEAD_FILE
from lowmem_rlhf.model.loading import load_base
from lowmem_rlhf.model.scoring import last_token_index, score_texts, sequence_scores
from lowmem_rlhf.ops.preference import bradley_terry_loss, pairwise_accuracy, pearson
from lowmem_rlhf.stages import rm, sft
from lowmem_rlhf.train.loop import TrainLoop
from lowmem_rlhf.train.metrics import read_metrics

# ---------------------------------------------------------------- math


def test_bradley_terry_by_hand():
    c, r = torch.tensor([2.0, 0.0, -1.0]), torch.tensor([0.0, 0.0, 1.0])
    # -log sigmoid(d) = log(1 + exp(-d)) for d = 2, 0, -2
    expected = [math.log1p(math.exp(-2)), math.log(2), math.log1p(math.exp(2))]
    torch.testing.assert_close(bradley_terry_loss(c, r), torch.tensor(expected))
    # margin 1 on the first pair: d = 2 - 1 = 1
    got = bradley_terry_loss(c, r, margin=torch.tensor([1.0, 0.0, 0.0]))
    assert got[0].item() == pytest.approx(math.log1p(math.exp(-1)))
    # centring: + 0.5 * (c + r)^2 = 0.5 * [4, 0, 0]
    got = bradley_terry_loss(c, r, center_coef=0.5)
    assert got[0].item() == pytest.approx(math.log1p(math.exp(-2)) + 2.0)
    assert got[2].item() == pytest.approx(math.log1p(math.exp(2)))
    torch.testing.assert_close(pairwise_accuracy(c, r), torch.tensor([1.0, 0.0, 0.0]))  # a tie is no win


def test_pearson_by_hand():
    assert pearson(torch.tensor([1.0, 2, 3]), torch.tensor([2.0, 4, 6])).item() == pytest.approx(1.0)
    assert pearson(torch.tensor([1.0, 2, 3]), torch.tensor([3.0, 2, 1])).item() == pytest.approx(-1.0)
    assert pearson(torch.tensor([1.0, 2, 3]), torch.tensor([5.0, 5, 5])).item() == 0.0
    # reference: statistics.correlation
    import statistics

    x, y = [1.0, 4.0, 2.0, 8.0, 5.0], [2.0, 3.0, 1.0, 9.0, 4.0]
    assert pearson(torch.tensor(x), torch.tensor(y)).item() == pytest.approx(statistics.correlation(x, y))


# ---------------------------------------------------------------- data


def test_ranking_expands_to_all_pairs_weighted_once_per_prompt():
    row = {"prompt": "p", "responses": ["a", "b", "c", "d"]}
    pairs = normalize_preference_row(row, "f, row 1")
    assert [(p.chosen, p.rejected) for p in pairs] == [
        ("a", "b"), ("a", "c"), ("a", "d"), ("b", "c"), ("b", "d"), ("c", "d")
    ]  # fmt: skip
    assert sum(p.weight for p in pairs) == pytest.approx(1.0)
    pairs, tied, _ = expand_rows(
        [row, {"prompt": "q", "responses": ["x", "y"]}, {"prompt": "r", "chosen": "1", "rejected": "2"}], "f"
    )
    assert len(pairs) == 6 + 1 + 1 and tied == 0
    assert sum(p.weight for p in pairs) == pytest.approx(3.0)  # three prompts, each counts once


def test_ratings_drop_ties_and_carry_margins():
    row = {"prompt": "p", "responses": ["a", "b", "c", "d"], "scores": [3, 5, 3, 1]}
    pairs = normalize_preference_row(row, "f, row 1")
    got = sorted((p.chosen, p.rejected, p.margin) for p in pairs)
    # a-c tie dropped; 5 of 6 pairs remain, best first by score
    assert got == sorted([("b", "a", 2.0), ("a", "d", 2.0), ("b", "c", 2.0), ("b", "d", 4.0), ("c", "d", 2.0)])
    assert sum(p.weight for p in pairs) == pytest.approx(1.0)
    assert normalize_preference_row({"prompt": "p", "responses": ["a", "b"], "scores": [2, 2]}, "f") == []
    _, tied, _ = expand_rows([{"prompt": "p", "responses": ["a", "b"], "scores": [2, 2]}], "f")
    assert tied == 1


def test_conversation_responses_like_ultrafeedback():
    user = {"role": "user", "content": "p"}
    row = {
        "prompt": "p",
        "chosen": [user, {"role": "assistant", "content": "good"}],
        "rejected": [user, {"role": "assistant", "content": "bad"}],
    }
    (pair,) = normalize_preference_row(row, "f, row 1")
    assert (pair.prompt, pair.chosen, pair.rejected) == ([user], "good", "bad")


@pytest.mark.parametrize(
    ("row", "needle"),
    [
        ({"prompt": "p", "responses": ["only one"]}, "at least 2 responses"),
        ({"prompt": "p", "responses": ["a", "b"], "scores": [1]}, "as long as `responses` (2), got 1"),
        ({"prompt": "p", "responses": ["a", ""]}, "`responses[1]` must be non-empty"),
        ({"prompt": "p", "responses": ["a", "b"], "scores": [1, "x"]}, "`scores[1]` must be a number"),
        ({"prompt": "p", "chosen": "a"}, "missing field `rejected`"),
        ({"chosen": "a", "rejected": "b"}, "missing field `prompt`"),
        ({"prompt": "", "chosen": "a", "rejected": "b"}, "`prompt` is empty"),
        ({"prompt": "p", "text": "a"}, "no preference fields found"),
        (
            {
                "prompt": "p",
                "chosen": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "a"}],
                "rejected": "b",
            },
            "`chosen` is a conversation whose turns before the last one differ from `prompt`",
        ),
        (
            {"prompt": "p", "chosen": "a", "rejected": [{"role": "user", "content": "p"}] * 2},
            "`rejected` is a conversation that does not end with an assistant turn",
        ),
    ],
)
def test_bad_preference_rows(row, needle):
    with pytest.raises(UserError) as e:
        normalize_preference_row(row, "prefs.jsonl, row 4")
    assert "prefs.jsonl, row 4" in str(e.value) and needle in str(e.value)


# ---------------------------------------------------------------- scoring (pitfall 3)


@pytest.fixture(scope="module")
def reward_bank(tiny_path):
    model, tok = load_base(ModelConfig(device="cpu"))
    bank = AdapterBank(model, gradient_checkpointing=False)
    from lowmem_rlhf.config import LoRAConfig
    from lowmem_rlhf.model.bank import lora_config

    torch.manual_seed(0)
    bank.add_role("reward", lora=lora_config(LoRAConfig(r=4, dropout=0.0)), head=True)
    with torch.no_grad():
        for p in bank.role_parameters("reward"):
            p.normal_(0, 0.1)
    return bank, tok


def test_last_token_index_any_padding():
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 1, 1, 0, 0]], dtype=torch.bool)
    assert last_token_index(mask).tolist() == [2, 4, 4, 2]


@pytest.mark.parametrize("pad_is_eos", [False, True])
def test_scores_batched_equal_unbatched_for_any_padding_side(reward_bank, pad_is_eos):
    bank, tok = reward_bank
    rows = [
        tok("<|user|>\nWhat is 2 plus 3?\n<|assistant|>\n2 plus 3 is 5.</s>").input_ids,
        tok(
            "<|user|>\nWhat color is a banana?\n<|assistant|>\nSure! A banana is yellow, I hope that helps.</s>"
        ).input_ids,
        tok("<|user|>\nHi\n<|assistant|>\nNo.</s>").input_ids,
    ]
    pad = tok.eos_token_id if pad_is_eos else tok.pad_token_id
    head = bank.head("reward")
    with torch.no_grad(), bank.use("reward") as m:
        alone = torch.cat(
            [sequence_scores(m, head, torch.tensor([r]), torch.ones(1, len(r), dtype=torch.bool)) for r in rows]
        )
        for side in ("left", "right"):
            ids, mask = pad_sequences(rows, pad, padding_side=side)
            batched = sequence_scores(m, head, ids, mask)
            # equal up to float reassociation of the CPU 4-bit matmul across batch shapes
            torch.testing.assert_close(batched, alone, atol=1e-4, rtol=1e-4)
    assert len(set(alone.tolist())) == 3  # the three sequences really score differently


# ---------------------------------------------------------------- the stage


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, tiny_path):
    out = tmp_path_factory.mktemp("rm") / "run"
    sft.run(config_from_dict(tiny_recipe(out, max_steps=4, save_steps=0)))
    return out


def rm_cfg(out, **rm_keys):
    data = tiny_recipe(out, max_steps=4, save_steps=0)
    data["stages"] = ["sft", "rm"]
    data["rm"] = {
        "dataset": "builtin:tiny/rankings.jsonl",
        "eval_dataset": "builtin:tiny/rankings_eval.jsonl",
        "max_samples": 64,
        "max_steps": 6,
        "batch_size": 4,
        "gradient_accumulation_steps": 2,
        "learning_rate": 3e-3,
        "logging_steps": 1,
        "save_steps": 3,
        "save_total_limit": 5,
        "max_length": 96,
        "stats_samples": 64,
        **rm_keys,
    }
    return config_from_dict(data)


def copy_run(src, dst):
    import shutil

    shutil.copytree(src, dst)
    cfg = (dst / "config.yaml").read_text().replace(str(src), str(dst))
    (dst / "config.yaml").write_text(cfg)
    return dst


def test_rm_stage_outputs_and_diagnostics(sft_run, tmp_path):
    run = copy_run(sft_run, tmp_path / "run")
    out = rm.run(rm_cfg(run, max_steps=20, eval_steps=10, max_samples=200))
    assert (out / "adapter_model.safetensors").is_file() and (out / HEAD_FILE).is_file()
    stats = json.loads((out / rm.STATS_FILE).read_text())
    assert stats["n"] > 50 and stats["std"] > 0
    diag = json.loads((out / "diagnostics.json").read_text())
    assert set(diag) >= {"eval_accuracy", "eval_margin", "eval_score_std", "eval_length_corr", "eval_pairs"}
    assert diag["eval_pairs"] == 200 * 6  # 200 held-out rankings of K = 4
    assert 0.5 < diag["eval_accuracy"] <= 1.0  # even 20 steps beat chance against the gold ranking
    losses = [m["loss"] for m in read_metrics(out / "metrics.jsonl")]
    assert sum(losses[-5:]) < sum(losses[:5])
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["stages"]["rm"]["reward_stats"] == stats


def test_saved_reward_model_reloads_to_identical_scores(sft_run, tmp_path):
    run = copy_run(sft_run, tmp_path / "run")
    out = rm.run(rm_cfg(run))
    prompts = ["What is 2 plus 3?", "What color is a banana?"]
    responses = ["2 plus 3 is 5.", "Ugh. A banana is blue."]
    scores = []
    for _ in range(2):
        model, tok = load_base(ModelConfig(device="cpu"))
        bank = AdapterBank(model, gradient_checkpointing=False)
        bank.add_role("reward", from_dir=out, head=True)
        scores.append(score_texts(bank, "reward", tok, prompts, responses))
    assert scores[0] == scores[1]

    # the CLI scorer gives the same numbers
    (tmp_path / "in.jsonl").write_text(
        "".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in zip(prompts, responses, strict=True))
    )
    assert (
        main(["score", str(run), "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl")]) == 0
    )
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["reward"] for r in rows] == pytest.approx(scores[0], abs=1e-5)
    stats = json.loads((out / rm.STATS_FILE).read_text())
    assert rows[0]["reward_normalized"] == pytest.approx((rows[0]["reward"] - stats["mean"]) / stats["std"])

    (out / HEAD_FILE).unlink()
    bank = AdapterBank(load_base(ModelConfig(device="cpu"))[0])
    with pytest.raises(UserError, match="head.safetensors is missing"):
        bank.add_role("reward", from_dir=out, head=True)


def test_grouped_rankings_score_each_response_once_and_equal_the_pairwise_loss(tiny_path):
    """A K=4 ranking is 4 forwards (not 12), and its C(4,2) Bradley-Terry terms -- with weights, margins and
    the centring term -- equal the pairwise form's, value and gradient."""
    from lowmem_rlhf.data.preference import collate_groups, collate_pairs
    from lowmem_rlhf.model.bank import lora_config

    cfg = config_from_dict(tiny_recipe("unused"))
    model, tok = load_base(cfg.model)
    bank = AdapterBank(model, gradient_checkpointing=False)
    bank.add_role("reward", lora=lora_config(cfg.lora), trainable=True, head=True)
    with torch.no_grad():  # a LoRA starts as the identity: move it so the adapter matters
        for name, p in bank.named_role_parameters("reward").items():
            if "lora_B" in name:
                p.normal_(std=0.05)
    rows = "builtin:tiny/rankings.jsonl"
    groups = load_group_examples(rows, "train", tok, 96, 3, "rm")
    pairs = load_pair_examples(rows, "train", tok, 96, 3, "rm")
    assert [len(g.seqs) for g in groups] == [4, 4, 4] and len(pairs) == 18
    for g in groups:
        g.pairs = [(c, r, w, 0.1 * (c + 2 * r)) for c, r, w, _ in g.pairs]  # distinct margins per pair
    for i, p in enumerate(pairs):
        p.margin = 0.1 * (groups[0].pairs[i % 6][0] + 2 * groups[0].pairs[i % 6][1])
    grouped, pairwise = collate_groups(groups, tok.pad_token_id), collate_pairs(pairs, tok.pad_token_id)
    assert grouped["input_ids"].shape[0] == 12 and pairwise["input_ids"].shape[0] == 36  # forwards: 4 vs 12 a prompt

    head, params = bank.head("reward"), bank.role_parameters("reward")
    out = {}
    for name, batch in (("grouped", grouped), ("pairwise", pairwise)):
        with bank.use("reward") as m:
            loss, metrics = rm.rm_loss_sum(m, head, batch, use_margin=True, center_coef=0.01)
            grads = torch.autograd.grad(loss, params)
        out[name] = loss.detach(), metrics, grads
    (lg, mg, gg), (lp, mp, gp) = out["grouped"], out["pairwise"]
    torch.testing.assert_close(lg, lp, rtol=1e-6, atol=1e-6)
    assert mg == pytest.approx(mp, rel=1e-5)
    assert float(grouped["weights"].sum()) == pytest.approx(3.0)  # each prompt counts once, as in the pairwise form
    for a, b in zip(gg, gp, strict=True):  # fp32: the pairwise form sums each response's gradient over its K-1 copies
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()))
    assert any(bool(g.abs().sum() > 0) for g in gg)


def test_sft_adapter_and_base_untouched_by_rm_training(sft_run, tmp_path):
    cfg = rm_cfg(sft_run)
    model, tok = load_base(cfg.model)
    bank = AdapterBank(model)
    bank.add_role("sft", from_dir=sft_run / "sft")
    bank.add_role("reward", copy_of="sft", trainable=True, head=True, fresh_head=True)
    sft_before, base_before = bank.state_dict("sft"), base_fingerprint(bank.peft_model)
    reward_before = bank.state_dict("reward")
    file_before = (sft_run / "sft" / "adapter_model.safetensors").read_bytes()
    train = load_group_examples(cfg.rm.dataset, "train", tok, cfg.rm.max_length, 32, "rm")
    loop_params = {id(p) for p in bank.trainable_parameters()}
    assert loop_params == {id(p) for p in bank.role_parameters("reward")}  # the optimizer never sees sft
    rm.train_reward(bank, cfg.rm, tmp_path / "stage", train, [], tok.pad_token_id, 0, {})
    assert all(torch.equal(bank.state_dict("sft")[k], v) for k, v in sft_before.items())
    assert base_fingerprint(bank.peft_model) == base_before
    after = bank.state_dict("reward")
    assert all(not torch.equal(after[k], v) for k, v in reward_before.items() if "lora_B" in k or k.startswith("head."))
    assert (sft_run / "sft" / "adapter_model.safetensors").read_bytes() == file_before


def test_rm_kill_and_resume_equals_uninterrupted(sft_run, tmp_path, monkeypatch):
    full = rm.run(rm_cfg(copy_run(sft_run, tmp_path / "full")))
    cfg = rm_cfg(copy_run(sft_run, tmp_path / "resumed"))
    with monkeypatch.context() as m:
        fail_at(m, TrainLoop, "_step", 4, RuntimeError("killed"))
        with pytest.raises(RuntimeError, match="killed"):
            rm.run(cfg)
    resumed = rm.run(cfg)
    for name in ("adapter_model.safetensors", HEAD_FILE):
        a, b = load_file(str(full / name)), load_file(str(resumed / name))
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_rm_from_sft_needs_a_finished_sft(tmp_path, tiny_path):
    with pytest.raises(UserError, match="needs the finished sft stage"):
        rm.run(rm_cfg(tmp_path / "empty"))


def test_rm_init_from_fresh_starts_a_new_adapter_and_needs_no_sft(sft_run, tmp_path, monkeypatch):
    start = {}
    real = rm.train_reward

    def spy(bank, *args, **kwargs):
        start[len(start)] = bank.state_dict(rm.ROLE)
        return real(bank, *args, **kwargs)

    monkeypatch.setattr(rm, "train_reward", spy)
    quick = {"max_steps": 1, "eval_dataset": None, "stats_samples": 4, "max_samples": 8}
    rm.run(rm_cfg(copy_run(sft_run, tmp_path / "from_sft"), **quick))
    rm.run(rm_cfg(tmp_path / "fresh", init_from="fresh", **quick))  # no sft stage in this folder
    sft_weights = load_file(str(sft_run / "sft" / "adapter_model.safetensors"))
    from_sft, fresh = start[0], start[1]
    b_keys = [k for k in from_sft if "lora_B" in k]
    assert b_keys and from_sft.keys() == fresh.keys()
    assert all(fresh[k].abs().sum() == 0 for k in b_keys)  # a new LoRA starts as the identity ...
    assert all(from_sft[k].abs().sum() > 0 for k in b_keys)  # ... the default starts from the SFT adapter
    assert sorted(v.abs().sum().item() for k, v in from_sft.items() if "lora_B" in k) == pytest.approx(
        sorted(v.abs().sum().item() for k, v in sft_weights.items() if "lora_B" in k)
    )


def test_eval_accuracy_and_margin_are_weighted_like_the_loss(monkeypatch):
    from contextlib import nullcontext
    from types import SimpleNamespace

    from lowmem_rlhf.data.preference import GroupExample

    # each sequence is [1, score]: the stub reward model reads the score off the second token
    monkeypatch.setattr(rm, "sequence_scores", lambda model, head, ids, mask: ids[:, 1].float())
    bank = SimpleNamespace(head=lambda role: None, use=lambda role: nullcontext(), device=torch.device("cpu"))
    third = 1 / 3
    pairs = [(0, 1, third, 0.0), (0, 2, third, 0.0), (1, 2, third, 0.0)]
    ranking = GroupExample([[1, 9], [1, 5], [1, 2]], [1, 1, 1], pairs)
    pair = GroupExample([[1, 3], [1, 7]], [1, 1], [(0, 1, 1.0, 0.0)])  # wrong by 4
    diag = rm.evaluate_pairs(bank, "reward", [ranking, pair], 0, 1)
    # two prompts, each counting once: the ranking's three right pairs weigh as much as the one wrong pair
    assert diag["eval_accuracy"] == pytest.approx(0.5)  # unweighted it would be 3/4
    assert diag["eval_margin"] == pytest.approx((1 / 3 * (4 + 7 + 3) - 4) / 2)
    losses = [-math.log(1 / (1 + math.exp(-d))) for d in (4, 7, 3)]
    assert diag["eval_loss"] == pytest.approx((sum(losses) / 3 - math.log(1 / (1 + math.exp(4)))) / 2, rel=1e-6)
    assert diag["eval_pairs"] == 4
