"""Non-finite training: skipped and counted steps, a stop after N in a row, nothing non-finite saved or logged."""

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_recipe, tiny_rl_recipe

from lowmem_rlhf.cli import main
from lowmem_rlhf.config import ModelConfig, PPOConfig, config_from_dict
from lowmem_rlhf.errors import UserError
from lowmem_rlhf.model.bank import AdapterBank, lora_config
from lowmem_rlhf.model.heads import ScalarHead
from lowmem_rlhf.model.loading import load_base
from lowmem_rlhf.stages import ppo, rm, sft
from lowmem_rlhf.train import ppo as ppo_train
from lowmem_rlhf.train.io import atomic_write_json, strict_dumps
from lowmem_rlhf.train.metrics import MetricsLogger


def strict_lines(path: Path) -> list[dict]:
    """Parse a JSONL file as strict JSON: NaN / Infinity are errors."""

    def refuse(name):
        raise ValueError(f"{path} holds {name}")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def no_nonfinite_tensors(folder: Path) -> None:
    from safetensors.torch import load_file

    for f in folder.rglob("*.safetensors"):
        for k, t in load_file(str(f)).items():
            assert torch.isfinite(t).all(), (f, k)


def test_metrics_and_json_files_are_strict(tmp_path):
    log = MetricsLogger(tmp_path, [], "run")
    log.log(1, {"loss": float("nan"), "grad_norm": float("inf"), "lr": 0.1, "skipped_steps": 1})
    (record,) = strict_lines(tmp_path / "metrics.jsonl")
    assert record == {
        "step": 1,
        "loss": None,
        "grad_norm": None,
        "lr": 0.1,
        "skipped_steps": 1,
        "nonfinite": ["loss", "grad_norm"],
    }
    atomic_write_json(tmp_path / "m.json", {"metrics": {"loss": float("nan"), "x": [1.0, float("-inf")]}})
    assert json.loads((tmp_path / "m.json").read_text(), parse_constant=lambda c: 1 / 0) == {
        "metrics": {"loss": None, "x": [1.0, None]}
    }
    assert strict_dumps({"reward": float("nan")}) == '{"reward": null}'  # samples.jsonl rows, score output


def test_nonfinite_weights_are_never_saved(tmp_path, tiny_path):
    model, _ = load_base(ModelConfig(device="cpu"))
    bank = AdapterBank(model, gradient_checkpointing=False)
    bank.add_role("policy", lora=lora_config(config_from_dict(tiny_recipe(tmp_path)).lora), trainable=True, head=True)
    name, p = next(iter(bank.named_role_parameters("policy").items()))
    with torch.no_grad():
        p.view(-1)[0] = float("nan")
    with pytest.raises(UserError, match=f"refusing to save role 'policy' to .*: tensor {name} holds NaN or inf"):
        bank.save_role("policy", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    head = ScalarHead(8)
    with torch.no_grad():
        head.linear.weight[0, 0] = float("inf")
    with pytest.raises(UserError, match="refusing to save the scalar head .*tensor weight holds NaN or inf"):
        head.save(tmp_path)
    assert not (tmp_path / "head.safetensors").exists()


def test_a_diverging_sft_run_exits_nonzero_and_leaves_no_nan_and_no_finished_mark(tmp_path, tiny_path, capsys):
    # a learning rate of 1e6: step 1 is warm-up (lr 0), step 2 is a finite but huge update, then the gradients are inf
    data = tiny_recipe(tmp_path / "run", learning_rate=1e6, max_steps=30, save_steps=1, max_consecutive_skips=3)
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(data))
    assert main(["sft", str(tmp_path / "recipe.yaml")]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error")]
    assert "Traceback" not in err and len(errors) == 1, err
    stage = tmp_path / "run" / "sft"
    assert errors[0] == (
        f"error: sft stopped at step 5/30: the loss or gradient norm was NaN or inf in 3 steps in a row (each was "
        f"skipped); the last checkpoint {stage / 'checkpoints' / 'step-0000002'} is kept and the stage is not marked "
        "finished. Lower sft.learning_rate (now 1e+06) or lower sft.max_grad_norm (now 1.0), then re-run with --force"
    )
    records = strict_lines(stage / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert [r["skipped_steps"] for r in records] == [0, 0, 1, 2, 3]
    assert all("nonfinite" not in r and r["grad_norm"] > 0 for r in records[:2])
    assert all(r["grad_norm"] is None and r["nonfinite"] == ["grad_norm"] for r in records[2:])
    assert not (stage / "adapter_model.safetensors").exists()
    # no checkpoint of a skipped step
    assert sorted(p.name for p in (stage / "checkpoints").iterdir()) == ["step-0000001", "step-0000002"]
    no_nonfinite_tensors(stage)
    assert not (tmp_path / "run" / "manifest.json").exists()


def test_one_nonfinite_step_is_skipped_counted_and_training_goes_on(make_cfg, monkeypatch):
    from lowmem_rlhf.stages import sft as sft_stage

    real = sft_stage.sft_loss_sum
    calls = {"n": 0}

    def loss_nan_once(model, batch, chunk):
        loss, m = real(model, batch, chunk)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] == 3 else loss), m  # step 2's first micro-batch

    monkeypatch.setattr(sft_stage, "sft_loss_sum", loss_nan_once)
    out = sft.run(make_cfg(save_steps=0))
    records = strict_lines(out / "metrics.jsonl")
    assert [r["skipped_steps"] for r in records] == [0, 1, 1, 1, 1, 1]
    assert records[1]["loss"] is None and records[1]["nonfinite"] == ["loss", "grad_norm"]
    assert records[2]["lr"] < records[1]["lr"]  # the schedule moved on
    no_nonfinite_tensors(out)
    manifest = json.loads((out.parent / "manifest.json").read_text())
    assert manifest["stages"]["sft"]["metrics"]["skipped_steps"] == 1


@pytest.fixture(scope="module")
def rl_base(tmp_path_factory, tiny_path):
    out = tmp_path_factory.mktemp("nonfinite") / "base"
    cfg = config_from_dict(tiny_rl_recipe(out))
    sft.run(cfg)
    rm.run(cfg)
    return out


def test_a_diverging_ppo_run_stops_and_leaves_no_nan_and_no_finished_mark(rl_base, monkeypatch):
    real = ppo_train.ppo_policy_loss

    def nan_loss(*args, **kw):
        loss, stats = real(*args, **kw)
        return loss * float("nan"), stats

    monkeypatch.setattr(ppo_train, "ppo_policy_loss", nan_loss)
    cfg = config_from_dict(tiny_rl_recipe(rl_base, max_consecutive_skips=3))
    with pytest.raises(UserError) as e:
        ppo.run(cfg)
    assert str(e.value).startswith(
        "ppo stopped at step 1/3: the loss or gradient norm was NaN or inf in 3 steps in a row (each was skipped); "
        "no checkpoint was saved before it and the stage is not marked finished. Lower ppo.learning_rate (now 0.001)"
    )
    stage = rl_base / "ppo"
    (record,) = strict_lines(stage / "metrics.jsonl")
    assert record["skipped_steps"] == 3 and "pg_loss" in record["nonfinite"]
    assert not (stage / "adapter_model.safetensors").exists()
    assert "ppo" not in json.loads((rl_base / "manifest.json").read_text())["stages"]


def test_rl_divergence_signals_are_warned_once():
    pc = PPOConfig(target_kl=6.0)
    watch = ppo_train.DivergenceWatch(pc)
    seen = []
    for step, (kl, eos) in enumerate([(1.0, 0.9), (10.0, 0.8), (19.0, 0.5), (30.0, 0.4), (40.0, 0.1)], start=1):
        seen += [(step, line) for line in watch.check(step, {"kl": kl, "kl_coef": 0.05, "eos_rate": eos})]
    assert [s for s, _ in seen] == [3, 4]  # KL > 18 first at 3; EOS < 45% first at 4; each once
    assert seen[0][1].startswith("ppo iteration 3: the KL to the reference is 19.0 nats per response, over 3x")
    assert seen[1][1].startswith("ppo iteration 4: only 40% of responses end with EOS (90% at the start)")
    assert math.isclose(watch.eos_rate_start, 0.9)


def test_rl_at_a_huge_learning_rate_warns_of_kl_and_eos_once_and_stops(rl_base, tmp_path, caplog):
    import logging
    import shutil

    run = tmp_path / "run"
    shutil.copytree(rl_base, run)
    shutil.rmtree(run / "ppo", ignore_errors=True)
    cfg = config_from_dict(tiny_rl_recipe(run, learning_rate=1e6, num_steps=20))
    with caplog.at_level(logging.WARNING), pytest.raises(UserError, match=r"^ppo stopped at step \d+/20: the loss"):
        ppo.run(cfg)
    warned = [r.getMessage() for r in caplog.records if r.getMessage().startswith("ppo iteration")]
    assert len(warned) == 2, warned
    assert "the KL to the reference is" in warned[0] and "over 3x ppo.target_kl (6)" in warned[0]
    assert "of responses end with EOS" in warned[1]
    records = strict_lines(run / "ppo" / "metrics.jsonl")
    assert records[-1]["skipped_steps"] >= 10
    assert not (run / "ppo" / "adapter_model.safetensors").exists()
    assert "ppo" not in json.loads((run / "manifest.json").read_text())["stages"]
