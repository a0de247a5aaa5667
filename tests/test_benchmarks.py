"""Tests for benchmarks/: the architecture table and a CPU smoke run of the QLoRA SFT benchmark."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `benchmarks` is a folder of the repo, not part of the installed package
    sys.path.insert(0, str(REPO))

from benchmarks import sft_bench  # noqa: E402
from benchmarks.shapes import SHAPES, build_config, param_count  # noqa: E402

# Published sizes (model cards), in parameters.
PUBLISHED = {"llama-3.1-8b": 8.03e9, "llama-3.2-3b": 3.21e9, "qwen2.5-0.5b": 0.494e9, "qwen2.5-7b": 7.62e9}


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_every_shape_is_a_valid_config(shape):
    config = build_config(shape)
    spec = SHAPES[shape]
    assert config.model_type == spec["model_type"]
    for key in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "tie_word_embeddings",
    ):
        assert getattr(config, key) == spec[key], key
    assert config.hidden_size % config.num_attention_heads == 0
    assert config.num_attention_heads % config.num_key_value_heads == 0


def test_llama_8b_param_count_from_config_arithmetic():
    assert 7.9e9 < param_count(build_config("llama-3.1-8b")) < 8.2e9


@pytest.mark.parametrize("shape", sorted(PUBLISHED))
def test_param_counts_match_published_sizes(shape):
    assert param_count(build_config(shape)) == pytest.approx(PUBLISHED[shape], rel=0.01)


@pytest.mark.parametrize(
    ("shape", "shrink"),
    [
        ("tiny", {}),
        # Qwen2's q/k/v biases and tied embeddings, at a size that is cheap to instantiate.
        (
            "qwen2.5-0.5b",
            {
                "vocab_size": 256,
                "hidden_size": 64,
                "intermediate_size": 96,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
            },
        ),
    ],
)
def test_param_count_matches_instantiated_model(shape, shrink):
    from transformers import AutoModelForCausalLM

    config = build_config(shape, **shrink)
    model = AutoModelForCausalLM.from_config(config)
    assert param_count(config) == sum(p.numel() for p in model.parameters())


def test_cpu_smoke_run(tmp_path, monkeypatch):
    """The whole benchmark on CPU: the JSON is complete, LoRA trains, the 4-bit base stays bit-identical."""
    import bitsandbytes as bnb

    seen: dict[str, list] = {}

    def load_base(cfg):
        model, tokenizer = real_load_base(cfg)
        seen["base"] = [m.weight for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
        seen["base_before"] = [w.detach().clone() for w in seen["base"]]
        return model, tokenizer

    def build_optimizer(params, cfg, device):
        seen["lora"] = list(params)
        seen["lora_before"] = [p.detach().clone() for p in params]
        return real_build_optimizer(params, cfg, device)

    real_load_base, real_build_optimizer = sft_bench.load_base, sft_bench.build_optimizer
    monkeypatch.setattr(sft_bench, "load_base", load_base)
    monkeypatch.setattr(sft_bench, "build_optimizer", build_optimizer)
    out = tmp_path / "result.json"
    returned = sft_bench.main(
        [
            "--shape",
            "tiny",
            "--batch",
            "2",
            "--seq",
            "32",
            "--steps",
            "2",
            "--warmup",
            "1",
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
        "target",
        "estimate",
        "note",
        "timestamp",
    }
    # the estimator's prediction for the same settings; no error without a measured (CUDA) peak
    assert result["estimate"]["predicted_allocated_gib"] > 0 and result["estimate"]["error"] is None
    assert sum(result["estimate"]["breakdown_gib"].values()) >= result["estimate"]["predicted_allocated_gib"]
    assert set(result["versions"]) >= {"torch", "transformers", "peft", "bitsandbytes"}
    m = result["measurements"]
    assert set(m) >= {
        "tokens_per_s",
        "peak_allocated_gib",
        "peak_reserved_gib",
        "model_loaded_allocated_gib",
        "losses",
        "final_loss",
    }
    assert result["device"] == "cpu" and result["note"]
    assert m["peak_allocated_gib"] is None and m["peak_reserved_gib"] is None
    assert m["tokens_per_s"] > 0
    assert len(m["losses"]) == 3 and all(math.isfinite(x) for x in m["losses"])
    assert abs(m["final_loss"] - math.log(SHAPES["tiny"]["vocab_size"])) < 1.0  # random ids: ~ln(vocab)
    assert result["target"] is None
    assert result["checks"]["base_weights_unchanged"] is True
    assert result["checks"]["lora_tensors_changed"] == result["checks"]["lora_tensors"] > 0

    assert len(seen["base"]) == 2 * 7  # every linear layer of the 2 blocks is 4-bit
    for before, weight in zip(seen["base_before"], seen["base"], strict=True):
        assert weight.dtype == torch.uint8 and torch.equal(before, weight)
    changed = [not torch.equal(b, p) for b, p in zip(seen["lora_before"], seen["lora"], strict=True)]
    assert all(changed)
    assert (tmp_path / "ckpt" / "tiny-float32" / "config.json").is_file()


def test_target_applies_to_the_issue_settings_only():
    args = sft_bench.parse_args([])  # the defaults are the issue's: Llama-3.1-8B, 2 x 2048 tokens, r=16
    assert sft_bench.target_record(args, 7.0)["met"] is True
    assert sft_bench.target_record(args, 7.5)["met"] is False
    assert sft_bench.target_record(args, None)["met"] is None  # CPU: nothing measured
    assert sft_bench.target_record(sft_bench.parse_args(["--lora-r", "8"]), 7.0) is None
    assert sft_bench.target_record(sft_bench.parse_args(["--shape", "tiny"]), 7.0) is None


def test_slug():
    assert sft_bench.slug("NVIDIA GeForce RTX 4090") == "nvidia-geforce-rtx-4090"
