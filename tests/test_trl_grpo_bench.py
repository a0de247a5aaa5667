"""Tests for benchmarks/trl_grpo_bench.py: a CPU smoke run of TRL's GRPO next to ours, and the comparison block."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import trl
from conftest import base_fingerprint

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `benchmarks` is a folder of the repo, not part of the installed package
    sys.path.insert(0, str(REPO))

from benchmarks import trl_grpo_bench  # noqa: E402
from benchmarks.ppo_bench import random_prompts  # noqa: E402
from benchmarks.shapes import SHAPES  # noqa: E402

PROMPTS, GROUP, NEW_TOKENS, MICRO_BATCH, WARMUP, STEPS = 2, 2, 8, 2, 1, 1


def test_cpu_smoke_run_with_ours(tmp_path, monkeypatch):
    """Our GRPO, then TRL's GRPOTrainer on the same 4-bit tiny model: complete JSON, TRL trains only its LoRA."""
    seen: dict = {}

    class RecordingTrainer(trl.GRPOTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            seen["trainer"] = self
            seen["base"] = base_fingerprint(self.model)
            seen["lora"] = {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}

    monkeypatch.setattr(trl, "GRPOTrainer", RecordingTrainer)
    out = tmp_path / "result.json"
    returned = trl_grpo_bench.main(
        [
            "--shape",
            "tiny",
            "--prompts",
            str(PROMPTS),
            "--group-size",
            str(GROUP),
            "--prompt-len",
            "8",
            "--new-tokens",
            str(NEW_TOKENS),
            "--micro-batch",
            str(MICRO_BATCH),
            "--warmup",
            str(WARMUP),
            "--steps",
            str(STEPS),
            "--with-ours",
            "--device",
            "cpu",
            "--cache-dir",
            str(tmp_path / "ckpt"),
            "--out",
            str(out),
        ]
    )

    result = json.loads(out.read_text())
    assert result == returned
    assert set(result) >= {
        "benchmark",
        "shape",
        "settings",
        "device",
        "versions",
        "measurements",
        "checks",
        "note",
        "timestamp",
        "ours",
        "comparison",
    }
    assert result["benchmark"] == "trl_grpo" and result["device"] == "cpu" and result["note"]
    assert set(result["versions"]) >= {"torch", "transformers", "peft", "bitsandbytes", "trl", "accelerate"}
    grpo = result["settings"]["grpo"]
    assert grpo["num_generations"] == GROUP and grpo["per_device_train_batch_size"] == MICRO_BATCH
    assert grpo["gradient_accumulation_steps"] == 1 and grpo["generation_batch_size"] == PROMPTS * GROUP
    assert grpo["beta"] == 0.05 and grpo["num_iterations"] == 1 and grpo["optim"] == "adamw_torch"

    m = result["measurements"]
    for key in ("peak_allocated_gib", "peak_allocated_gb", "peak_reserved_gib", "peak_allocated_gib_by_phase"):
        assert m[key] is None, key
    assert m["model_loaded_allocated_gib"] is None and m["loaded_allocated_gib"] is None

    # One warm-up and one timed iteration; each is prompts x group / micro-batch optimizer steps of TRL.
    per_iteration = PROMPTS * GROUP // MICRO_BATCH
    trainer = seen["trainer"]
    assert trainer.state.global_step == m["global_steps"] == (WARMUP + STEPS) * per_iteration
    assert m["optimizer_steps_per_iteration"] == per_iteration
    assert [s["timed"] for s in m["steps"]] == [False, True]
    assert [s["global_step"] for s in m["steps"]] == [per_iteration, 2 * per_iteration]
    for step in m["steps"]:
        assert 0 < step["generated_tokens"] <= PROMPTS * GROUP * NEW_TOKENS and 0 < step["longest_response"] <= 8
        assert 0 < step["generation_s"] < step["rollout_s"] < step["s"] and step["update_s"] > 0
        assert step["s"] == pytest.approx(step["rollout_s"] + step["update_s"])
        # TRL's own metrics of the iteration: the reward model scored every completion, KL to the reference
        assert all(math.isfinite(step["metrics"][k]) for k in ("reward", "reward_std", "kl", "entropy"))
        assert step["metrics"]["completions/mean_length"] * PROMPTS * GROUP == step["generated_tokens"]
    timed = m["steps"][1]
    assert m["generated_tokens"] == timed["generated_tokens"]
    assert m["s_per_step"] == timed["s"] and m["generation_s"] == timed["generation_s"]
    assert m["decode_tokens_per_s"] == pytest.approx(timed["generated_tokens"] / timed["generation_s"])
    assert m["trainable_params"] > 0 and m["optimizer"] == "AdamW"

    # The 4-bit base (every byte, quantization constants included) is untouched; every LoRA B moved off zero.
    assert base_fingerprint(trainer.model) == seen["base"]
    lora_b = {n: p for n, p in trainer.model.named_parameters() if p.requires_grad and "lora_B" in n}
    assert lora_b and all(not torch.equal(seen["lora"][n], p) for n, p in lora_b.items())
    checks = result["checks"]
    assert checks["base_weights_unchanged"] is True and checks["reward_model_unchanged"] is True
    assert checks["policy_lora_b_changed"] == len(lora_b) and checks["policy_lora_tensors"] == 2 * len(lora_b)
    assert checks["policy_lora_dtype"] == "bfloat16"  # TRL casts LoRA weights on a 4-bit base to bf16

    # Our side ran GRPO with the same settings, shared backbone only.
    ours = result["ours"]
    ppo = ours["settings"]["ppo"]
    assert ppo["advantage"] == "grpo" and ppo["group_size"] == GROUP and ppo["kl_coef"] == grpo["beta"]
    assert ppo["rollout_batch_size"] == PROMPTS and ppo["mini_batch_size"] == ppo["micro_batch_size"] == MICRO_BATCH
    assert set(ours["measurements"]) >= {"shared"} and "separate" not in ours["measurements"]
    shared = ours["measurements"]["shared"]
    assert shared["peak_allocated_gib"] is None and shared["generated_tokens"] > 0

    c = result["comparison"]
    assert c["ours_s_per_step"] == shared["s_per_ppo_step"] and c["trl_s_per_step"] == m["s_per_step"]
    assert c["speedup"] == pytest.approx(m["s_per_step"] / shared["s_per_ppo_step"])
    assert c["memory_ratio"] is None and c["ours_peak_allocated_gib"] is None and c["trl_peak_allocated_gib"] is None
    targets = c["targets"]
    assert targets["faster"]["met"] is (c["speedup"] > 1) and targets["memory"]["met"] is None
    assert targets["met"] is (None if c["speedup"] > 1 else False)


def test_prompt_texts_round_trip(tmp_path):
    """The text prompts TRL gets tokenize back to our random ids, also with a completion appended (reward input)."""
    from benchmarks.shapes import build_random_checkpoint
    from lowmem_rlhf.config import ModelConfig
    from lowmem_rlhf.model.loading import load_tokenizer

    checkpoint = build_random_checkpoint("tiny", tmp_path, torch.float32)
    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(checkpoint)))
    prompts = random_prompts(SHAPES["tiny"]["vocab_size"], 3, 8, seed=0)
    texts = trl_grpo_bench.prompt_texts(prompts, tokenizer)
    assert [tokenizer(t)["input_ids"] for t in texts] == prompts
    completion = tokenizer.decode([9, 10, tokenizer.eos_token_id], skip_special_tokens=True)
    assert tokenizer(texts[0] + completion)["input_ids"] == prompts[0] + [9, 10]


def test_comparison_needs_both_targets():
    def ours(s: float, peak: float | None) -> dict:
        return {"measurements": {"shared": {"s_per_ppo_step": s, "peak_allocated_gib": peak, "generation_s": 1.0}}}

    def trl_side(s: float, peak: float | None) -> dict:
        return {"s_per_step": s, "peak_allocated_gib": peak, "generation_s": 2.0}

    met = trl_grpo_bench.comparison(ours(2.0, 6.0), trl_side(3.0, 8.0))
    assert met["speedup"] == 1.5 and met["memory_ratio"] == 0.75 and met["targets"]["met"] is True
    slower = trl_grpo_bench.comparison(ours(4.0, 6.0), trl_side(3.0, 8.0))
    assert slower["targets"]["faster"]["met"] is False and slower["targets"]["met"] is False
    bigger = trl_grpo_bench.comparison(ours(2.0, 9.0), trl_side(3.0, 8.0))
    assert bigger["targets"]["memory"]["met"] is False and bigger["targets"]["met"] is False
    cpu = trl_grpo_bench.comparison(ours(2.0, None), trl_side(3.0, None))
    assert cpu["memory_ratio"] is None and cpu["targets"]["met"] is None


def test_arguments_are_checked():
    with pytest.raises(SystemExit):
        trl_grpo_bench.parse_args(["--prompts", "3", "--group-size", "2", "--micro-batch", "4"])
    with pytest.raises(SystemExit):
        trl_grpo_bench.parse_args(["--group-size", "1"])
    with pytest.raises(SystemExit):
        trl_grpo_bench.parse_args(["--device", "cuda:1"])
    args = trl_grpo_bench.parse_args(["--group-size", "8", "--kl-coef", "0.1", "--cache-dir", "/c"])
    argv = trl_grpo_bench.ours_argv(args)
    assert argv[argv.index("--advantage") + 1] == "grpo" and argv[argv.index("--group-size") + 1] == "8"
    assert argv[argv.index("--kl-coef") + 1] == "0.1"
    assert argv[argv.index("--mode") + 1] == "shared" and argv[argv.index("--cache-dir") + 1] == "/c"
