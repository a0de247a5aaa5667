"""End to end: the tiny pipeline recipe through the CLI (SFT -> RM -> PPO, SFT -> DPO, compare), then gold scores.

The outcome thresholds hold on any machine of CI's kind, not just one. They come from the spread of
`scripts/tiny_spread.py` (tables in docs/tiny.md). SFT and DPO: 18 runs (6 seeds on two CPU kernel
paths with a base pre-trained on AVX-512 kernels, 6 seeds with the base a fresh machine pre-trains on
the one kernel path). The reward model and the RL stages: the 6 seeds on the fresh-machine base since
the reward model trains on whole rankings (`benchmarks/results/tiny_spread_cpu_grouped_rm.json`;
SFT and DPO computed the same numbers as before in those runs). Each threshold is the smallest value
seen minus two standard deviations of the runs (upper bounds: the largest plus two), rounded towards
the safe side. The RL stages' reward gains are asserted positive only: every run gained, their means
3.2 to 4.2 standard deviations above zero. What did not clear that bar is not asserted here and is
reported in docs/tiny.md instead: GRPO's sampled gold gain (+0.11 to +0.94) and DPO's gold gains.
"""

import json
import platform
import shutil
from pathlib import Path

import pytest
import torch

from lowmem_rlhf.cli import main
from lowmem_rlhf.config import ModelConfig
from lowmem_rlhf.model.bank import AdapterBank
from lowmem_rlhf.model.loading import load_base
from lowmem_rlhf.rollout.generate import SamplingConfig
from lowmem_rlhf.tiny.evaluate import gold_report, heldout_prompts
from lowmem_rlhf.train.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]

# min - 2 std over the runs of docs/tiny.md ("Reproducibility and spread"), rounded to the safe side
RM_ACCURACY = 0.7  # grouped reward model, 6 runs: 0.708 .. 0.721, std 0.004
RM_LENGTH_CORR = -0.7  # 6 runs: -0.828 .. -0.755, std 0.024 (the RM prefers concise answers)
SFT_GOLD = 0.8  # greedy, 48 held-out prompts; 18 runs: 1.323 .. 2.167, std 0.238
SFT_OVER_BASE = 0.35  # 18 runs: 1.246 .. 2.665, std 0.426 (the two bases score -0.50 and +0.08 untrained)
RL_MAX_KL = 15.0  # summed over a response, last iteration; 6 runs: PPO 2.22 .. 3.42, GRPO 2.49 .. 6.82, std 1.65
PPO_WIN_RATE_RM = 0.75  # PPO samples preferred by the reward model over SFT's; 6 runs: 0.816 .. 0.910, std 0.032
# the gold score (the task's rule, not the reward model) of held-out PPO/GRPO answers, after minus SFT
# 6 runs: greedy 0.513 .. 0.801, std 0.092; sampled 0.773 .. 1.234, std 0.173
PPO_GOLD_GAIN = {"greedy": 0.3, "sampled": 0.4}
GRPO_GREEDY_GOLD_GAIN = 0.5  # 6 runs: 0.650 .. 0.785, std 0.047 (sampled: 0.112 .. 0.936, not asserted)
DPO_MARGIN = 0.2  # held-out implicit reward margin, chosen - rejected (0 at step 0); runs: 0.476 .. 0.841, std 0.119
DPO_LOSS = 0.67  # held-out DPO loss after training (ln 2 = 0.693 at step 0); runs: 0.594 .. 0.641, std 0.013
DPO_ACCURACY = 0.61  # held-out pairs ordered right by the implicit reward; runs: 0.637 .. 0.693, std 0.013


def check_rl_gain(run: Path, gold_gain: dict[str, float]) -> None:
    """RL raised the reward it optimises on held-out prompts (greedy and sampled) with a bounded KL, and the
    gold score by at least `gold_gain[mode]`."""
    report = json.loads((run / "ppo" / "eval.json").read_text())
    for mode in ("greedy", "sampled"):
        before, after = report["sft"][mode], report["ppo"][mode]
        # every run gained: PPO greedy 0.24 .. 0.47, sampled 0.29 .. 0.56; GRPO 0.24 .. 0.47, 0.20 .. 0.47
        assert after["reward"] > before["reward"], (mode, before, after)
        assert after["eos_rate"] > 0.9, (mode, after)
        if mode in gold_gain:
            assert after["gold"] - before["gold"] > gold_gain[mode], (mode, before, after)
    rows = read_metrics(run / "ppo" / "metrics.jsonl")
    assert rows[0]["kl"] == 0.0 and rows[-1]["kl"] < RL_MAX_KL


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="x86 kernel paths")
def test_cpu_runs_use_one_kernel_path():
    """Importing the toolkit asks torch for its AVX2 kernels and MKL for its AVX2 path, so the tiny pipeline
    computes the same numbers on AVX-512 and AVX2 machines (conftest imports it before torch runs)."""
    import os

    if os.environ.get("LOWMEM_RLHF_CPU_KERNELS") == "native":
        pytest.skip("native kernels asked for")
    assert torch.backends.cpu.get_cpu_capability() == os.environ["ATEN_CPU_CAPABILITY"].upper() == "AVX2"
    assert os.environ["MKL_CBWR"] == "AVX2"


def test_tiny_pipeline_makes_task_shaped_samples(tmp_path, tiny_path, capsys):
    out = tmp_path / "tiny"
    assert main(["run", str(REPO / "recipes" / "tiny" / "pipeline.yaml"), f"output_dir={out}"]) == 0
    assert "run finished" in capsys.readouterr().out
    assert (out / "sft" / "adapter_model.safetensors").is_file()
    # the reward model agrees with the gold ranking on held-out phrasings well above chance (0.5);
    # it learns tone and length almost perfectly and factual correctness only partly (docs/tiny.md)
    diag = json.loads((out / "reward" / "diagnostics.json").read_text())
    assert diag["eval_accuracy"] > RM_ACCURACY and diag["eval_length_corr"] < RM_LENGTH_CORR

    model, tokenizer = load_base(ModelConfig(device="cpu"))
    bank = AdapterBank(model, gradient_checkpointing=False)
    bank.add_role("policy", from_dir=out / "sft")
    prompts = heldout_prompts(48)
    greedy = SamplingConfig(max_new_tokens=32, temperature=0.0)
    base = gold_report(bank, None, tokenizer, prompts, greedy)
    tuned = gold_report(bank, "policy", tokenizer, prompts, greedy)
    # gold scale: +2.5 ideal, +2 plain correct, -1 wrong, -0.5 empty (see lowmem_rlhf/tiny/task.py)
    assert tuned.mean_gold > SFT_GOLD, tuned.samples[:5]
    assert tuned.mean_gold > base.mean_gold + SFT_OVER_BASE
    assert tuned.eos_rate > 0.95

    # PPO on one backbone raises the reward model's score of held-out samples over the SFT policy's,
    # greedy and sampled, with the KL to the reference (summed over a response) bounded, and the gold score too
    check_rl_gain(out, PPO_GOLD_GAIN)

    # the recipe's compare stage: PPO and DPO beside SFT on 128 held-out prompts, sampled at T=1
    report = json.loads((out / "compare" / "report.json").read_text())
    assert report["order"] == ["tiny/sft", "tiny/ppo", "tiny/dpo"] and set(report["policies"]) == set(report["order"])
    sampled = report["policies"]
    assert sampled["tiny/ppo"]["win_rate_reward"] > PPO_WIN_RATE_RM
    assert all("gold" in p and "win_rate_gold" in p for n, p in sampled.items() if n != "tiny/sft")
    assert all((out / "compare" / name).stat().st_size > 5000 for name in ("reward_vs_kl.png", "training.png"))
    # DPO learns the preference on held-out pairs: the implicit reward margin (0 at step 0, where the
    # loss is ln 2) grows and orders most pairs right; its samples' KL is measured during training
    dpo = json.loads((out / "dpo" / "diagnostics.json").read_text())
    assert dpo["eval_margin"] > DPO_MARGIN and dpo["eval_loss"] < DPO_LOSS and dpo["eval_accuracy"] > DPO_ACCURACY
    dpo_rows = read_metrics(out / "dpo" / "metrics.jsonl")
    assert [r["step"] for r in dpo_rows if "sample_kl" in r] == [50, 100, 150]
    # compare at temperature 0 reports every policy too
    assert main(["compare", str(out), "--temperature", "0", "--output", str(tmp_path / "greedy")]) == 0
    at_t0 = json.loads((tmp_path / "greedy" / "report.json").read_text())["policies"]
    assert set(at_t0) == set(report["order"]) and all(p["eos_rate"] > 0.9 for p in at_t0.values())

    # GRPO (no critic) does too, from the same SFT and reward model
    grpo = tmp_path / "tiny-grpo"
    shutil.copytree(out, grpo, ignore=shutil.ignore_patterns("ppo", "dpo", "compare"))
    manifest = json.loads((grpo / "manifest.json").read_text())
    for stage in ("ppo", "dpo", "compare"):
        del manifest["stages"][stage]
    (grpo / "manifest.json").write_text(json.dumps(manifest))
    assert main(["ppo", str(REPO / "recipes" / "tiny" / "grpo.yaml"), f"output_dir={grpo}"]) == 0
    check_rl_gain(grpo, {"greedy": GRPO_GREEDY_GOLD_GAIN})

    capsys.readouterr()
    assert main(["generate", str(out), "--prompt", "What is 2 plus 3?", "--json"]) == 0
    (line,) = capsys.readouterr().out.strip().splitlines()
    assert '"response": ' in line and "5" in line  # "Happy to help. 2 plus 3 is 5." in every run checked

    # re-running skips the finished stage and leaves its adapter alone
    stamp = (out / "sft" / "adapter_model.safetensors").stat().st_mtime_ns
    assert main(["run", str(REPO / "recipes" / "tiny" / "pipeline.yaml"), f"output_dir={out}"]) == 0
    assert (out / "sft" / "adapter_model.safetensors").stat().st_mtime_ns == stamp
