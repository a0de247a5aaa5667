"""The study behind docs/tiny.md's reward-model table: its metric, and a short run of the script."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from lowmem_rlhf.tiny.task import DATA_DIR, gold_score, read_jsonl

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "tiny_rm_study.py"


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("tiny_rm_study", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_agreement_counts_pairs_against_the_gold_ranking(study):
    rows = read_jsonl(DATA_DIR / "rankings_eval.jsonl")[:20]

    def gold(prompt, responses):
        return [gold_score(prompt, r) for r in responses]

    def reversed_gold(prompt, responses):
        return [-s for s in gold(prompt, responses)]

    def constant(prompt, responses):
        return [0.0] * len(responses)

    assert study.agreement(gold, rows) == {"all": 1.0, "correct_vs_wrong": 1.0}
    assert study.agreement(reversed_gold, rows) == {"all": 0.0, "correct_vs_wrong": 0.0}
    assert study.agreement(constant, rows) == {"all": 0.0, "correct_vs_wrong": 0.0}  # ties are not agreement

    # only the first response right: it beats the others, and the rest are tied
    def first_only(prompt, responses):
        return [1.0] + [0.0] * (len(responses) - 1)

    assert study.agreement(first_only, rows)["all"] == pytest.approx(3 / 6)


@pytest.mark.parametrize("fresh", [False, True])
def test_short_run_reports_held_out_agreement(study, tiny_path, fresh, capsys):
    result = study.main(["--steps", "2", "--report-every", "1", "--eval-rows", "5", *(["--fresh"] if fresh else [])])
    assert set(result) == {"all", "correct_vs_wrong"}
    assert capsys.readouterr().out.count("held-out") == 2
