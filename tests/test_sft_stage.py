"""The SFT stage on the tiny 4-bit model: learning, outputs, skip/force, and kill-and-resume."""

import json

import pytest
import torch
from conftest import fail_at
from safetensors.torch import load_file

from lowmem_rlhf.errors import UserError
from lowmem_rlhf.stages import sft
from lowmem_rlhf.train.loop import TrainLoop
from lowmem_rlhf.train.metrics import read_metrics


def adapter(stage_dir):
    return load_file(str(stage_dir / "adapter_model.safetensors"))


def test_sft_learns_and_writes_a_standard_adapter(make_cfg):
    cfg = make_cfg(
        max_steps=30,
        gradient_accumulation_steps=1,
        save_steps=0,
        lr_scheduler="constant",
        eval_dataset="builtin:tiny/sft_eval.jsonl",
        eval_steps=10,
    )
    out = sft.run(cfg)
    losses = [m["loss"] for m in read_metrics(out / "metrics.jsonl")]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5, losses
    evals = [m["eval_loss"] for m in read_metrics(out / "metrics.jsonl") if "eval_loss" in m]
    assert len(evals) == 3 and evals[-1] < evals[0]
    weights = adapter(out)
    lora_b = [v for k, v in weights.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)  # B starts at zero: every one was trained
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 8
    manifest = json.loads((out.parent / "manifest.json").read_text())
    assert manifest["stages"]["sft"]["steps"] == 30
    assert (out.parent / "config.yaml").is_file()


def test_finished_stage_is_skipped_and_force_reruns(make_cfg):
    cfg = make_cfg(max_steps=2, save_steps=0)
    out = sft.run(cfg)
    stamp = (out / "adapter_model.safetensors").stat().st_mtime_ns
    sft.run(cfg)
    assert (out / "adapter_model.safetensors").stat().st_mtime_ns == stamp
    sft.run(cfg, force=True)
    assert (out / "adapter_model.safetensors").stat().st_mtime_ns != stamp
    assert len(read_metrics(out / "metrics.jsonl")) == 2  # force starts the stage over


@pytest.mark.parametrize("kill", ["crash", "ctrl-c"])
def test_kill_and_resume_equals_uninterrupted(make_cfg, monkeypatch, kill):
    # dropout > 0 and several epochs' worth of shuffling: RNG and data cursor must both resume exactly
    full = sft.run(make_cfg("full", max_samples=40))
    cfg = make_cfg("resumed", max_samples=40)
    with monkeypatch.context() as m:
        if kill == "crash":  # like SIGKILL: only the periodic checkpoint at step 3 survives
            fail_at(m, TrainLoop, "_step", 4, RuntimeError("killed"))
            with pytest.raises(RuntimeError, match="killed"):
                sft.run(cfg)
        else:  # Ctrl-C: the loop saves the last finished step (4) and says how to resume
            fail_at(m, TrainLoop, "_step", 4, KeyboardInterrupt())
            with pytest.raises(UserError, match="interrupted at step 4/6.*re-run the same command to resume"):
                sft.run(cfg)
    stage = full.parent.parent / "resumed" / "sft"
    assert not (stage / "adapter_model.safetensors").exists()
    resumed = sft.run(cfg)
    a, b = adapter(full), adapter(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [m["step"] for m in read_metrics(resumed / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]


def test_resume_under_changed_settings_is_refused(make_cfg, monkeypatch):
    cfg = make_cfg("changed")
    with monkeypatch.context() as m:
        fail_at(m, TrainLoop, "_step", 4, RuntimeError("killed"))
        with pytest.raises(RuntimeError):
            sft.run(cfg)
    with pytest.raises(UserError, match="different sft settings.*--force"):
        sft.run(make_cfg("changed", learning_rate=1e-3))


def test_missing_dataset_key(make_cfg):
    with pytest.raises(UserError, match="`sft.dataset` is not set"):
        sft.run(make_cfg(dataset=None))


def test_first_run_on_a_fresh_machine_equals_later_runs(make_cfg, monkeypatch):
    """Building the tiny model (the first run on a machine) draws random numbers; the stage seeds after it,
    so that run trains exactly like every later one with the same seed."""
    import random

    import lowmem_rlhf.tiny.model as tiny_model

    real_build, built = tiny_model.build_tiny, []

    def fresh_build(*args, **kwargs):
        if not built:  # what the in-process pre-training of a real first build does to the RNG, once
            built.append(torch.randn(1000).sum() + random.random())
        return real_build(*args, **kwargs)

    later = sft.run(make_cfg("later", max_steps=2, save_steps=0))
    monkeypatch.setattr(tiny_model, "build_tiny", fresh_build)
    first = sft.run(make_cfg("first", max_steps=2, save_steps=0))
    a, b = adapter(first), adapter(later)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
