"""Tests for benchmarks/suite.py: one command runs the benchmarks in their own processes and summarises them."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `benchmarks` is a folder of the repo, not part of the installed package
    sys.path.insert(0, str(REPO))

from benchmarks import suite  # noqa: E402


def test_quick_suite_on_cpu_writes_results_and_summary(tmp_path, monkeypatch):
    # the rm job made to fail (its benchmark refuses the options): the suite records it and goes on
    broken = suite.Job("rm", "sft_bench", ("--seq", "1"), ("--seq", "1"))
    monkeypatch.setattr(suite, "JOBS", (*(j for j in suite.JOBS if j.name != "rm"), broken))
    results = tmp_path / "results"
    results.mkdir()
    (results / "rm_tiny.json").write_text("{}")  # an older rm result: must not survive the failed run
    (results / "ppo_tiny_cpu.json").write_text("{}")  # a standalone benchmark's file: not the suite's
    argv = ["--shapes", "tiny", "--only", "sft", "rm", "ppo", "rollout", "--device", "cpu", "--quick"]
    code = suite.main([*argv, "--results-dir", str(results), "--cache-dir", str(tmp_path / "ckpt")])

    assert code == 1  # one run failed
    summary = json.loads((results / "summary.json").read_text())
    runs = [(r["job"], r["shape"], r["ok"]) for r in summary["runs"]]
    assert runs == [("sft", "tiny", True), ("ppo", "tiny", True), ("rollout", "tiny", True), ("rm", "tiny", False)]
    assert summary["results"] == ["ppo_tiny", "rollout_tiny", "sft_tiny"]
    assert not (results / "rm_tiny.json").exists()
    assert "--seq must be at least 2" in summary["runs"][-1]["output_tail"]

    sft = json.loads((results / "sft_tiny.json").read_text())
    ppo = json.loads((results / "ppo_tiny.json").read_text())
    rollout = json.loads((results / "rollout_tiny.json").read_text())
    assert sft["settings"]["seq"] == 32 and ppo["settings"]["mode"] == "both"
    md = (results / "summary.md").read_text()
    # the tables carry the numbers of the JSON files
    assert f"| tiny | SFT | n/a | {sft['estimate']['predicted_allocated_gib']:.2f} | n/a |" in md
    assert f"{sft['measurements']['tokens_per_s']:.0f} | tokens/s |" in md
    assert f"| tiny | PPO (4 roles) | n/a | {ppo['estimate']['predicted_allocated_gib']:.2f} |" in md
    assert f"{ppo['measurements']['shared']['s_per_ppo_step']:.2f} | s/step |" in md
    assert "## One shared 4-bit backbone against four separately loaded models (PPO)" in md
    for run in rollout["measurements"]["runs"]:
        assert f"| tiny | {run['variant']} | {run['batch_size']} | {run['decode_tokens_per_s']:.0f} | n/a |" in md
    assert "## Runs that failed" in md and "--seq must be at least 2" in md
    assert "GRPOTrainer" not in md  # no grpo run, no grpo table

    # the summary can be rebuilt from the files alone
    (results / "summary.md").unlink()
    assert suite.main(["--summarize-only", "--results-dir", str(results)]) == 0
    assert "| tiny | SFT |" in (results / "summary.md").read_text()


def test_unknown_shape_is_refused(capsys):
    with pytest.raises(SystemExit):
        suite.parse_args(["--shapes", "llama-9"])
    assert "invalid choice: 'llama-9'" in capsys.readouterr().err


def test_empty_results_say_how_to_fill_them():
    assert "No results yet: run `python -m benchmarks.suite`" in suite.render_markdown({}, [])
