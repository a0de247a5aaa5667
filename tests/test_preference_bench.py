"""Tests for benchmarks/preference_bench.py: CPU smoke runs of the reward-model and DPO benchmarks."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from conftest import base_fingerprint

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `benchmarks` is a folder of the repo, not part of the installed package
    sys.path.insert(0, str(REPO))

from benchmarks import preference_bench  # noqa: E402
from benchmarks.shapes import SPECIAL_TOKENS  # noqa: E402

BATCH, SEQ = 2, 32


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory) -> Path:
    """One random-weight tiny checkpoint for every run of this module."""
    return tmp_path_factory.mktemp("ckpt")


def test_random_pairs_share_the_prompt_and_avoid_special_ids():
    pairs = preference_bench.random_pairs(vocab=100, n=3, seq=9, seed=0)
    assert len(pairs) == 3
    for e in pairs:
        assert len(e.chosen_ids) == len(e.rejected_ids) == 9
        assert e.chosen_prompt_len == e.rejected_prompt_len == 4
        assert e.chosen_ids[:4] == e.rejected_ids[:4] and e.chosen_ids[4:] != e.rejected_ids[4:]
        assert min(e.chosen_ids + e.rejected_ids) >= len(SPECIAL_TOKENS) and (e.weight, e.margin) == (1.0, 0.0)


@pytest.mark.parametrize(
    ("stage", "extra"),
    [("rm", []), ("dpo", []), ("dpo", ["--precompute-ref-logprobs"])],
    ids=["rm", "dpo", "dpo-precomputed-reference"],
)
def test_cpu_smoke_run(stage, extra, tmp_path, ckpt_dir, monkeypatch):
    """The whole benchmark on CPU: complete JSON, the trained role changes, the base and the reference do not."""
    seen: dict = {}

    def build_bank(*args, **kwargs):
        bank = real_build_bank(*args, **kwargs)
        seen["bank"] = bank
        seen["before"] = {role: bank.state_dict(role) for role in bank.roles}
        seen["base"] = base_fingerprint(bank.peft_model)
        return bank

    real_build_bank = preference_bench.build_bank
    monkeypatch.setattr(preference_bench, "build_bank", build_bank)
    out = tmp_path / "x.json"
    argv = ["--stage", stage, "--shape", "tiny", "--batch", str(BATCH), "--seq", str(SEQ), "--steps", "2"]
    argv += ["--warmup", "1", "--device", "cpu", "--cache-dir", str(ckpt_dir), "--out", str(out), *extra]
    returned = preference_bench.main(argv)

    result = json.loads(out.read_text())
    assert result == returned
    assert set(result) >= {
        "benchmark",
        "stage",
        "shape",
        "roles",
        "settings",
        "device",
        "versions",
        "measurements",
        "checks",
        "estimate",
        "note",
        "timestamp",
    }
    assert result["benchmark"] == f"{stage}_qlora" and result["stage"] == stage
    assert result["settings"]["batch"] == BATCH and result["settings"]["seq"] == SEQ
    assert result["settings"][stage]["batch_size"] == BATCH and result["settings"][stage]["max_length"] == SEQ
    assert set(result["versions"]) >= {"torch", "transformers", "peft", "bitsandbytes"}
    assert result["device"] == "cpu" and result["note"]

    m = result["measurements"]
    assert m["peak_allocated_gib"] is None and m["peak_reserved_gib"] is None
    assert m["model_loaded_allocated_gib"] is None
    assert m["pairs_per_s"] > 0 and m["tokens_per_s"] == pytest.approx(2 * SEQ * m["pairs_per_s"])
    assert m["s_per_step"] > 0
    assert len(m["losses"]) == 3 and all(math.isfinite(x) for x in m["losses"]) and m["final_loss"] == m["losses"][-1]
    assert m["final_loss"] < m["losses"][0]  # three steps on one fixed batch
    if stage == "rm":
        # a fresh score head gives O(1) scores, so the Bradley-Terry loss starts near ln 2
        assert abs(m["losses"][0] - math.log(2)) < 1.0
    else:
        # dropout off and the reference a copy of the policy: the DPO loss is exactly ln 2 at step 0
        assert m["losses"][0] == pytest.approx(math.log(2), abs=1e-6)
    assert (m["reference_precompute_s"] is not None) == bool(extra)

    e = result["estimate"]
    assert e["predicted_allocated_gib"] > 0 and e["error"] is None
    assert sum(e["breakdown_gib"].values()) >= e["predicted_allocated_gib"]

    # the roles the stage builds, and the benchmark's own checks
    checks, bank = result["checks"], seen["bank"]
    assert checks["base_weights_unchanged"] is True
    assert checks["lora_tensors_changed"] == checks["lora_tensors"] == 2 * 2 * 7  # A and B, 7 linears x 2 layers
    if stage == "rm":
        assert result["roles"] == {"reward": {"trainable": True, "head": True}}
        assert checks["head_weight_changed"] is True
        assert "LoRA adapters (fp32): reward" in e["breakdown_gib"]
    else:
        assert result["roles"] == {
            "policy": {"trainable": True, "head": False},
            "reference": {"trainable": False, "head": False},
        }
        assert checks["reference_unchanged"] is True and checks["reference_tensors"] == checks["lora_tensors"]
        assert "LoRA adapters (fp32): policy, reference" in e["breakdown_gib"]
    assert result["trainable_params"] == sum(p.numel() for p in bank.trainable_parameters())

    # the same facts, checked here on the whole base and every role tensor
    assert base_fingerprint(bank.peft_model) == seen["base"]
    trained = preference_bench.TRAINED_ROLE[stage]
    for role, before in seen["before"].items():
        after = bank.state_dict(role)
        changed = {k for k in before if not torch.equal(before[k], after[k])}
        if role == trained:
            assert changed >= {k for k in before if "lora_" in k or k == "head.linear.weight"}
        else:
            assert not changed


def test_precomputed_reference_is_dpo_only():
    with pytest.raises(SystemExit):
        preference_bench.parse_args(["--stage", "rm", "--precompute-ref-logprobs"])
    assert preference_bench.parse_args(["--stage", "dpo", "--precompute-ref-logprobs"]).precompute_ref_logprobs
