"""Tests for the synthetic tiny task: gold scorer, prompt parsing and bundled data."""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path

import pytest

from lowmem_rlhf.tiny import task
from lowmem_rlhf.tiny.task import (
    DATA_DIR,
    HELDOUT,
    TEMPLATES,
    TRAIN,
    gold_score,
    parse_prompt,
    prefer,
    prompt_split,
    read_jsonl,
    score_breakdown,
    write_data,
)

FILES = (
    "sft.jsonl",
    "sft_eval.jsonl",
    "rankings.jsonl",
    "rankings_eval.jsonl",
    "prompts.jsonl",
    "prompts_heldout.jsonl",
)
BANANA = "What color is a banana?"
PLAIN_LEVEL = gold_score(BANANA, "A banana is yellow.")


@pytest.fixture(scope="module")
def data() -> dict[str, list[dict]]:
    return {name: read_jsonl(DATA_DIR / name) for name in FILES}


@pytest.mark.parametrize(
    ("prompt", "ideal", "plain", "wordy", "wrong"),
    [
        (
            BANANA,
            "Sure! A banana is yellow.",
            "A banana is yellow.",
            "Well, let me think about that. A banana is yellow.",
            "A banana is red.",
        ),
        (
            "What is 3 plus 4?",
            "Happy to help. 3 plus 4 is 7.",
            "3 plus 4 is 7.",
            "3 plus 4 is 7. I hope that answers your question.",
            "3 plus 4 is 9.",
        ),
        (
            "What sound does a cow make?",
            "Good question. A cow says moo.",
            "A cow says moo.",
            "Okay, so, let me see here. A cow says moo.",
            "A cow says woof.",
        ),
        (
            "What is the opposite of hot?",
            "Of course. The opposite of hot is cold.",
            "The opposite of hot is cold.",
            "Hmm, let me work this out. The opposite of hot is cold.",
            "The opposite of hot is hot.",
        ),
    ],
)
def test_gold_score_orders_response_styles(prompt, ideal, plain, wordy, wrong):
    scores = [gold_score(prompt, r) for r in (ideal, plain, wordy, wrong)]
    assert scores == sorted(scores, reverse=True)
    assert len(set(scores)) == 4
    assert scores[1] == 2.0
    assert scores[3] < 0


def test_gold_score_components():
    assert gold_score(BANANA, "Sure! A banana is yellow.") == 2.5
    assert gold_score(BANANA, "Ugh, obviously. A banana is yellow.") == 1.0
    assert gold_score(BANANA, "A banana is yellow. That is a dumb question.") == 0.85  # 9 words
    assert gold_score(BANANA, "A banana is yellow or red.") == -1.0  # hedging counts as wrong
    assert gold_score(BANANA, "I do not know.") == 0.0
    assert gold_score(BANANA, "Sure! I do not know.") == 0.5
    assert gold_score(BANANA, "yellow") == 2.0
    assert gold_score(BANANA, "yellowish") == 0.0  # whole words only
    # length: 13 words is 5 beyond the free 8
    rambling = "Well, let me think about it for a while. A banana is yellow."
    assert gold_score(BANANA, rambling) == 1.25


@pytest.mark.parametrize("response", ["", "   ", "?!...", "\n"])
def test_empty_response(response):
    assert gold_score(BANANA, response) == -0.5


@pytest.mark.parametrize(
    "response",
    [
        "yellow yellow yellow yellow yellow yellow yellow yellow yellow yellow",
        "asdf qwer 3 plus 4",
        "A banana is",
        "\x00\ufffd<unk></s>",
        "🍌" * 50,
        "x" * 10_000,
    ],
)
def test_garbage_does_not_crash(response):
    assert isinstance(gold_score(BANANA, response), float)


def test_echoed_question_is_not_an_answer():
    # the restated operands / subject are not read as (wrong) answers
    assert gold_score("Add 3 and 4.", "3 and 4 make 7.") == 2.0
    assert gold_score("What is 4 plus 3?", "3 plus 4 is 7.") == 2.0
    assert gold_score("What is 3 plus 0?", "3 plus 0 is 3.") == 2.0
    assert gold_score("What is 3 plus 4?", "3 plus 4 is 4.") == -1.0
    assert gold_score("What is 3 plus 4?", "3 plus 4 is 77.") == -1.0
    assert gold_score("Give me the opposite of hot.", "Cold is the opposite of hot.") == 2.0


def test_score_breakdown_flags():
    b = score_breakdown(BANANA, "Sure! Ugh, obviously. A banana is red.")
    assert (b.correct, b.wrong, b.polite, b.rude, b.n_words) == (False, True, True, True, 7)
    assert b.score == -1.5


def test_prefer():
    assert prefer(BANANA, "A banana is yellow.", "A banana is red.") == 0
    assert prefer(BANANA, "A banana is red.", "Sure! A banana is yellow.") == 1
    assert prefer(BANANA, "A banana is yellow.", "yellow") == -1


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("What color is a banana?", ("color", "banana", "yellow")),
        ("Do you know what color the sky is?", ("color", "sky", "blue")),
        ("what   color is GRASS", ("color", "grass", "green")),
        ("What noise does an owl make?", ("sound", "owl", "hoot")),
        ("What does a frog say?", ("sound", "frog", "ribbit")),
        ("What color is a frog?", ("color", "frog", "green")),
        ("Which word is the opposite of cold?", ("opposite", "cold", "hot")),
        ("What is the reverse of empty?", ("opposite", "empty", "full")),
        ("Add 9 and 9.", ("add", "9 plus 9", "18")),
        ("Tell me the sum of 0 and 5.", ("add", "0 plus 5", "5")),
    ],
)
def test_parse_prompt(prompt, expected):
    assert parse_prompt(prompt) == expected


@pytest.mark.parametrize("prompt", ["What color is a spaceship?", "Hello there", "", "What is 3 minus 4?"])
def test_unknown_prompt_raises(prompt):
    with pytest.raises(ValueError, match="matches no task template") as err:
        parse_prompt(prompt)
    assert repr(prompt) in str(err.value)
    with pytest.raises(ValueError):
        gold_score(prompt, "A banana is yellow.")


def test_every_template_and_fact_parses_back_uniquely():
    for template in TEMPLATES:
        for fact in task._FACTS[template.kind]:
            prompt = task._render(template, fact)
            hits = [t for t, p in task._PATTERNS if p.fullmatch(prompt.rstrip("?.!"))]
            assert hits == [template], prompt
            assert parse_prompt(prompt) == (fact.kind, fact.subject, fact.answer)
            assert gold_score(prompt, task._sentence(fact, fact.answer)) == 2.0


def test_each_kind_has_train_and_heldout_templates():
    for kind in task.KINDS:
        splits = {t.split for t in TEMPLATES if t.kind == kind}
        assert splits == {TRAIN, HELDOUT}


def test_building_blocks_are_neutral():
    """Openers, fillers etc. hold no candidate answers, nor rude or polite words by accident."""
    candidates = set().union(*task._CANDIDATES.values())
    blocks = (*task.OPENERS, *task.NON_ANSWERS, *task.RUDE_PHRASES, *task.FILLERS, *task.CLOSERS, *task.RAMBLES)
    for block in blocks:
        tokens = set(task._tokens(block))
        assert not tokens & candidates, block
        assert not any(t.isdigit() for t in tokens), block
        assert bool(tokens & task.RUDE_WORDS) == (block in task.RUDE_PHRASES), block
        assert score_breakdown(BANANA, block).polite == (block in task.OPENERS), block
    assert all(len(task._tokens(f)) == 6 for f in (*task.FILLERS, *task.CLOSERS))


def test_rankings_strictly_sorted(data):
    for name in ("rankings.jsonl", "rankings_eval.jsonl"):
        for row in data[name]:
            scores = [gold_score(row["prompt"], r) for r in row["responses"]]
            assert len(scores) == task.RANKING_K
            assert all(a > b for a, b in pairwise(scores)), row


def test_sft_completions_are_correct_and_clean(data):
    styles = {"ideal": 0, "plain": 0, "wordy": 0}
    for name in ("sft.jsonl", "sft_eval.jsonl"):
        for row in data[name]:
            b = score_breakdown(row["prompt"], row["completion"])
            assert b.correct and not b.wrong and not b.rude, row
            assert b.n_words <= 12, row
            # every completion beats any wrong or rude answer; wordy ones sit just below plain
            assert b.score >= PLAIN_LEVEL - 0.6, row
            style = "ideal" if b.polite else "plain" if b.score == PLAIN_LEVEL else "wordy"
            styles[style] += 1
    total = sum(styles.values())
    assert 0.5 < styles["ideal"] / total < 0.6
    assert 0.25 < styles["plain"] / total < 0.35
    assert 0.1 < styles["wordy"] / total < 0.2


def test_sft_eval_prompts_are_new_but_facts_are_known(data):
    sft_prompts = {r["prompt"] for r in data["sft.jsonl"]}
    eval_prompts = [r["prompt"] for r in data["sft_eval.jsonl"]]
    assert len(set(eval_prompts)) == len(eval_prompts)
    assert not sft_prompts & set(eval_prompts)
    sft_facts = {parse_prompt(p) for p in sft_prompts}
    assert {parse_prompt(p) for p in eval_prompts} <= sft_facts


def test_splits_use_the_right_templates(data):
    for name, split in [
        ("sft.jsonl", TRAIN),
        ("sft_eval.jsonl", TRAIN),
        ("rankings.jsonl", TRAIN),
        ("prompts.jsonl", TRAIN),
        ("rankings_eval.jsonl", HELDOUT),
        ("prompts_heldout.jsonl", HELDOUT),
    ]:
        assert {prompt_split(r["prompt"]) for r in data[name]} == {split}, name
        assert {parse_prompt(r["prompt"])[0] for r in data[name]} == set(task.KINDS), name


def test_every_fact_is_trained(data):
    all_facts = {(f.kind, f.subject, f.answer) for kind in task.KINDS for f in task._FACTS[kind]}
    assert {parse_prompt(r["prompt"]) for r in data["sft.jsonl"]} == all_facts
    assert {parse_prompt(r["prompt"]) for r in data["prompts_heldout.jsonl"]} <= all_facts


def test_row_counts_and_size(data):
    counts = {name: len(rows) for name, rows in data.items()}
    assert counts == {
        "sft.jsonl": task.SFT_ROWS,
        "sft_eval.jsonl": task.SFT_EVAL_ROWS,
        "rankings.jsonl": task.RANKING_ROWS,
        "rankings_eval.jsonl": task.RANKING_EVAL_ROWS,
        "prompts.jsonl": task.PROMPT_ROWS,
        "prompts_heldout.jsonl": task.PROMPT_HELDOUT_ROWS,
    }
    assert len({r["prompt"] for r in data["prompts_heldout.jsonl"]}) == task.PROMPT_HELDOUT_ROWS
    assert sum((DATA_DIR / name).stat().st_size for name in FILES) < 1_000_000


def test_corpus_covers_every_word_in_the_data(data):
    vocab = set(task.corpus_text().split())
    for rows in data.values():
        for row in rows:
            texts = [row["prompt"], row.get("completion", ""), *row.get("responses", [])]
            for text in texts:
                assert set(text.split()) <= vocab, text


def test_regeneration_is_byte_identical(tmp_path: Path):
    counts = write_data(tmp_path)
    assert set(counts) == set(FILES)
    for name in FILES:
        assert (tmp_path / name).read_bytes() == (DATA_DIR / name).read_bytes(), name
    assert sorted(p.name for p in DATA_DIR.iterdir()) == sorted(FILES)


def test_tiny_build_key_follows_the_pretraining_text(tmp_path: Path, monkeypatch):
    """Editing the pre-training text must build a new model, not reuse weights cached for the old text."""
    import lowmem_rlhf.tiny.model as tiny_model
    import lowmem_rlhf.tiny.task as tiny_task

    monkeypatch.setattr(tiny_model, "pretrain", lambda *args, **kwargs: None)  # the key is the point, not the weights
    first = tiny_model.build_tiny(tmp_path)
    assert tiny_model.build_tiny(tmp_path) == first  # cached: same inputs, same folder
    original = tiny_task.pretraining_text
    monkeypatch.setattr(tiny_task, "pretraining_text", lambda: [*original(), "A banana is yellow."])
    second = tiny_model.build_tiny(tmp_path)
    assert second != first
    assert (first / "config.json").is_file() and (second / "config.json").is_file()
