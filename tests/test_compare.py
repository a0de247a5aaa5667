"""`compare`: report numbers (reward model and judges) recomputed from the saved samples, same seed -> same
numbers, PNGs, errors."""

import json
import shutil
import statistics

import pytest
from conftest import tiny_rl_recipe

from lowmem_rlhf.cli import main
from lowmem_rlhf.config import CompareConfig, config_from_dict
from lowmem_rlhf.data.formats import load_rows
from lowmem_rlhf.errors import UserError
from lowmem_rlhf.rewards.builtin import answer_matches
from lowmem_rlhf.stages import compare, dpo, ppo, rm, sft
from lowmem_rlhf.tiny.task import gold_score

PROMPTS = "builtin:tiny/prompts_heldout.jsonl"


def recipe(out) -> dict:
    data = tiny_rl_recipe(out)
    data["stages"] = ["sft", "rm", "ppo", "dpo", "compare"]
    data["dpo"] = {
        "dataset": "builtin:tiny/rankings.jsonl",
        "max_samples": 32,
        "max_steps": 4,
        "batch_size": 4,
        "learning_rate": 2e-3,
        "save_steps": 0,
        "max_length": 96,
        "kl_samples": 4,
        "eval_steps": 2,
        "max_new_tokens": 12,
    }
    data["compare"] = {
        "prompts": PROMPTS,
        "num_prompts": 10,
        "max_new_tokens": 12,
        "batch_size": 4,
        # the task's gold scorer and a built-in rule against the prompt rows' `answer` column
        "judge": ["lowmem_rlhf.tiny.judge:gold", "lowmem_rlhf.rewards:answer_match"],
    }
    return data


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_path):
    out = tmp_path_factory.mktemp("compare") / "tiny"
    cfg = config_from_dict(recipe(out))
    for stage in (sft, rm, ppo, dpo):
        stage.run(cfg)
    return out


def read_samples(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


JUDGES = ("gold", "answer_match")


def recompute(samples: list[dict]) -> dict:
    """The report's numbers straight from the sample rows, written independently of `summarize`."""
    out = {}
    for label in dict.fromkeys(r["policy"] for r in samples):
        rows = [r for r in samples if r["policy"] == label]
        entry = {
            "reward": statistics.fmean(r["reward"] for r in rows),
            **{judge: statistics.fmean(r[judge] for r in rows) for judge in JUDGES},
            "kl": statistics.fmean(r["kl"] for r in rows),
            "length": statistics.fmean(r["length"] for r in rows),
            "eos_rate": sum(r["eos"] for r in rows) / len(rows),
        }
        if rows[0]["baseline"]:
            base = {r["prompt_index"]: r for r in samples if r["policy"] == rows[0]["baseline"]}
            for key in ("reward", *JUDGES):
                wins = [
                    (r[key] > base[r["prompt_index"]][key]) + 0.5 * (r[key] == base[r["prompt_index"]][key])
                    for r in rows
                ]
                entry[f"win_rate_{key}"] = sum(wins) / len(wins)
        out[label] = entry
    return out


def numbers(report: dict) -> dict:
    return {label: {k: v for k, v in p.items() if k != "baseline"} for label, p in report["policies"].items()}


def test_compare_stage_report_matches_samples(run_dir, capsys):
    cfg = config_from_dict(recipe(run_dir))
    out = compare.run(cfg)
    assert out == run_dir / "compare"
    report = json.loads((out / "report.json").read_text())
    samples = read_samples(out / "samples.jsonl")

    assert report["order"] == ["tiny/sft", "tiny/ppo", "tiny/dpo"] and set(report["policies"]) == set(report["order"])
    assert len(samples) == 3 * 10
    # the same prompts, in the same order, for every policy
    for label in report["policies"]:
        assert [r["prompt_index"] for r in samples if r["policy"] == label] == list(range(10))
    for label, expected in recompute(samples).items():
        got = report["policies"][label]
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, abs=1e-12), (label, key)
        assert got["samples"] == 10
        assert {"win_rate_gold", "win_rate_answer_match"} <= set(got)
    assert report["settings"]["judges"] == ["lowmem_rlhf.tiny.judge:gold", "lowmem_rlhf.rewards:answer_match"]
    answers = [r["answer"] for r in load_rows(PROMPTS)[0]]
    for r in samples:
        assert r["gold"] == gold_score(r["prompt"], r["response"])
        assert r["answer_match"] == float(answer_matches(r["response"], answers[r["prompt_index"]]))
        assert r["logp"] < 0 and r["ref_logp"] < 0  # summed log-probs of at least one token
        if r["policy"] == "tiny/sft":  # SFT is its own reference
            assert r["kl"] == 0.0 and r["baseline"] is None
        else:
            assert r["baseline"] == "tiny/sft"
    assert report["policies"]["tiny/sft"]["win_rate_reward"] is None
    # the policies moved away from SFT: their samples are no longer SFT's
    assert any(r["kl"] != 0.0 for r in samples if r["policy"] == "tiny/ppo")
    assert any(r["kl"] != 0.0 for r in samples if r["policy"] == "tiny/dpo")

    # training wall time and peak memory come from the runs' metrics
    for label in ("tiny/ppo", "tiny/dpo"):
        usage = report["training"][label]
        assert usage["train_time_s"] > 0 and usage["pipeline_time_s"] > usage["train_time_s"]
        assert usage["peak_rss_gb"] > 0
        assert usage["train_steps"] == {"tiny/ppo": 3, "tiny/dpo": 4}[label]

    for name in compare.PLOTS:
        data = (out / name).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5000, name
    md = (out / "report.md").read_text()
    assert "| tiny/dpo |" in md and "reward_vs_kl.png" in md
    printed = capsys.readouterr().out
    assert "tiny/ppo" in printed and "win vs SFT (gold)" in printed and "win vs SFT (answer_match)" in printed

    # the manifest records the finished stage; a re-run skips it
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["stages"]["compare"]["policies"]["tiny/dpo"] == report["policies"]["tiny/dpo"]
    stamp = (out / "report.json").stat().st_mtime_ns
    compare.run(cfg)
    assert (out / "report.json").stat().st_mtime_ns == stamp


def test_same_seed_same_numbers_in_any_run_order(run_dir, tmp_path):
    copy = tmp_path / "again"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("compare"))
    cc = CompareConfig(prompts=PROMPTS, num_prompts=6, max_new_tokens=10, batch_size=4)
    first = compare.compare_runs([run_dir], cc, 11, tmp_path / "one")
    both = compare.compare_runs([copy, run_dir], cc, 11, tmp_path / "two")
    assert both["order"] == ["again/sft", "again/ppo", "again/dpo", "tiny/sft", "tiny/ppo", "tiny/dpo"]
    for method in ("sft", "ppo", "dpo"):
        assert numbers(both)["again/" + method] == numbers(first)["tiny/" + method]
        assert numbers(both)["tiny/" + method] == numbers(first)["tiny/" + method]
    other_seed = compare.compare_runs([run_dir], cc, 12, tmp_path / "three")
    assert numbers(other_seed) != numbers(first)


def test_compare_cli_and_errors(run_dir, tmp_path, capsys):
    out = tmp_path / "report"
    args = ["compare", str(run_dir), "--prompts", PROMPTS, "--num-prompts", "3", "--temperature", "0"]
    assert main([*args, "--max-new-tokens", "8", "--output", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["temperature"] == 0.0 and report["settings"]["num_prompts"] == 3
    printed = capsys.readouterr().out
    assert str(out / "report.md") in printed and "gold" in printed  # the run's compare.judge
    # --judge replaces the recipe's judges; a broken judge is a one-line error before any model loads
    judge_file = tmp_path / "judges.py"
    judge_file.write_text("def short(prompts, completions, **kw):\n    return [-len(c) for c in completions]\n")
    assert (
        main([*args, "--max-new-tokens", "8", "--output", str(tmp_path / "j"), "--judge", f"{judge_file}:short"]) == 0
    )
    report = json.loads((tmp_path / "j" / "report.json").read_text())
    samples = read_samples(tmp_path / "j" / "samples.jsonl")
    assert all(r["short"] == -len(r["response"]) and "gold" not in r for r in samples)
    assert report["policies"]["tiny/sft"]["short"] == statistics.fmean(r["short"] for r in samples[:3])
    assert "win vs SFT (short)" in capsys.readouterr().out
    assert main([*args, "--judge", f"{judge_file}:long"]) == 2
    assert "judges.py:long" in capsys.readouterr().err

    sft_only = tmp_path / "sft-only"
    shutil.copytree(run_dir, sft_only, ignore=shutil.ignore_patterns("compare"))
    manifest = json.loads((sft_only / "manifest.json").read_text())
    manifest["stages"] = {"sft": manifest["stages"]["sft"]}
    (sft_only / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="no finished ppo or dpo stage"):
        compare.compare_runs([sft_only], CompareConfig(prompts=PROMPTS), 0, tmp_path / "x")
    with pytest.raises(UserError, match="no finished rm stage"):
        compare.compare_runs([run_dir], CompareConfig(prompts=PROMPTS, reward_from=str(sft_only)), 0, tmp_path / "x")
    with pytest.raises(UserError, match="not a run folder"):
        compare.compare_runs([tmp_path], CompareConfig(prompts=PROMPTS), 0, tmp_path / "x")
    with pytest.raises(UserError, match="listed twice"):
        compare.compare_runs([run_dir, run_dir], CompareConfig(prompts=PROMPTS), 0, tmp_path / "x")
    assert main(["compare", str(tmp_path / "missing")]) == 2
    assert "not a run folder" in capsys.readouterr().err
