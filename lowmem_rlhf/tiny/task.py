"""A synthetic "assistant" task with a deterministic gold scorer.

Prompts ask one fact of four kinds (the colour of a thing, the sound of an
animal, the opposite of a word, a sum of two digits) through fixed templates.
`gold_score` rates any response to such a prompt the way a labeller would:
correct, concise and polite beats wrong, rambling or rude.  The language is
small and regular so that a model of a few hundred thousand parameters can
learn it on a CPU in minutes.

Templates are split into TRAIN and HELD-OUT phrasings; every fact is seen in
training, held-out prompts are new phrasings of known facts.  Running
``python -m lowmem_rlhf.tiny.task`` regenerates the bundled JSONL files in
`DATA_DIR` (deterministic, byte-identical on re-run).
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

DATA_DIR = Path(__file__).resolve().parent / "data"
"""Folder holding the bundled data files."""

SEED = 20240601
KINDS = ("color", "sound", "opposite", "add")
KIND_WEIGHTS = {"color": 0.2, "sound": 0.2, "opposite": 0.2, "add": 0.4}
"""Share of each kind in generated files (additions have the most facts)."""

TRAIN = "train"
HELDOUT = "heldout"

# --- knowledge -------------------------------------------------------------

COLOR_FACTS = (
    ("a banana", "yellow"),
    ("a lemon", "yellow"),
    ("corn", "yellow"),
    ("the sun", "yellow"),
    ("an apple", "red"),
    ("a tomato", "red"),
    ("a strawberry", "red"),
    ("a cherry", "red"),
    ("grass", "green"),
    ("a frog", "green"),
    ("a leaf", "green"),
    ("a lime", "green"),
    ("the sky", "blue"),
    ("the ocean", "blue"),
    ("a blueberry", "blue"),
    ("snow", "white"),
    ("milk", "white"),
    ("a cloud", "white"),
    ("coal", "black"),
    ("a crow", "black"),
    ("a carrot", "orange"),
    ("a pumpkin", "orange"),
    ("chocolate", "brown"),
    ("a grape", "purple"),
    ("an elephant", "gray"),
)
SOUND_FACTS = (
    ("a cow", "moo"),
    ("a dog", "woof"),
    ("a cat", "meow"),
    ("a duck", "quack"),
    ("a sheep", "baa"),
    ("a pig", "oink"),
    ("a horse", "neigh"),
    ("a lion", "roar"),
    ("an owl", "hoot"),
    ("a snake", "hiss"),
    ("a bee", "buzz"),
    ("a frog", "ribbit"),
    ("a mouse", "squeak"),
    ("a wolf", "howl"),
    ("a chick", "cheep"),
)
OPPOSITE_PAIRS = (
    ("hot", "cold"),
    ("big", "small"),
    ("up", "down"),
    ("fast", "slow"),
    ("day", "night"),
    ("wet", "dry"),
    ("loud", "quiet"),
    ("hard", "soft"),
    ("tall", "short"),
    ("full", "empty"),
)
"""Each pair is asked both ways round, giving 20 opposite facts."""

# --- response building blocks ----------------------------------------------
# None of these may contain a candidate answer of any kind (checked by tests).

OPENERS = ("Sure!", "Happy to help.", "Good question.", "Of course.", "Great question!")
NON_ANSWERS = ("I do not know.", "I have no idea.", "I cannot answer that.")
RUDE_PHRASES = (
    "Ugh, obviously.",
    "That is a dumb question.",
    "Duh, everyone knows that.",
    "Stop asking me stupid things.",
    "Whatever.",
)
RUDE_WORDS = frozenset({"ugh", "obviously", "dumb", "duh", "stupid", "whatever"})
FILLERS = (
    "Well, let me think about that.",
    "Okay, so, let me see here.",
    "Hmm, let me work this out.",
    "Alright, I can answer this one.",
)
"""Six-word clauses put before an answer: mildly wordy."""
CLOSERS = ("I hope that answers your question.", "Let me know if that helps.")
"""Six-word clauses put after an answer: mildly wordy."""
RAMBLES = (
    "Well, let me think about that for a moment, hmm, you know.",
    "So, this is something I have thought about many times before.",
    "Let me take a little while to explain this to you properly.",
)
"""Long clauses for rambling responses."""

# --- gold score weights ----------------------------------------------------

CORRECT_BONUS = 2.0
WRONG_PENALTY = -1.0
POLITE_BONUS = 0.5
RUDE_PENALTY = -1.0
FREE_WORDS = 8
LENGTH_PENALTY = 0.15
EMPTY_SCORE = -0.5


class Template(NamedTuple):
    """A prompt phrasing: ``{x}`` is the thing asked about, ``{a}``/``{b}`` the addends."""

    kind: str
    text: str
    split: str


TEMPLATES = (
    Template("color", "What color is {x}?", TRAIN),
    Template("color", "Tell me the color of {x}.", TRAIN),
    Template("color", "Which color is {x}?", TRAIN),
    Template("color", "What is the color of {x}?", HELDOUT),
    Template("color", "Do you know what color {x} is?", HELDOUT),
    Template("sound", "What sound does {x} make?", TRAIN),
    Template("sound", "What does {x} say?", TRAIN),
    Template("sound", "Tell me the sound of {x}.", TRAIN),
    Template("sound", "What noise does {x} make?", HELDOUT),
    Template("sound", "Which sound does {x} make?", HELDOUT),
    Template("opposite", "What is the opposite of {x}?", TRAIN),
    Template("opposite", "Tell me the opposite of {x}.", TRAIN),
    Template("opposite", "Which word is the opposite of {x}?", TRAIN),
    Template("opposite", "Give me the opposite of {x}.", HELDOUT),
    Template("opposite", "What is the reverse of {x}?", HELDOUT),
    Template("add", "What is {a} plus {b}?", TRAIN),
    Template("add", "Add {a} and {b}.", TRAIN),
    Template("add", "What do you get if you add {a} and {b}?", TRAIN),
    Template("add", "How much is {a} plus {b}?", HELDOUT),
    Template("add", "Tell me the sum of {a} and {b}.", HELDOUT),
)


class _Fact(NamedTuple):
    """One question's content; ``phrase`` fills ``{x}`` (``"a plus b"`` for additions)."""

    kind: str
    phrase: str
    answer: str
    a: int = 0
    b: int = 0

    @property
    def subject(self) -> str:
        """The thing asked about: a bare noun, a word, or ``"a plus b"``."""
        return self.phrase.split()[-1] if self.kind in ("color", "sound") else self.phrase


def _add_fact(a: int, b: int) -> _Fact:
    return _Fact("add", f"{a} plus {b}", str(a + b), a, b)


_FACTS: dict[str, list[_Fact]] = {
    "color": [_Fact("color", p, v) for p, v in COLOR_FACTS],
    "sound": [_Fact("sound", p, v) for p, v in SOUND_FACTS],
    "opposite": [_Fact("opposite", w, o) for pair in OPPOSITE_PAIRS for w, o in (pair, pair[::-1])],
    "add": [_add_fact(a, b) for a in range(10) for b in range(10)],
}
_LOOKUP = {kind: {f.phrase: f for f in _FACTS[kind]} for kind in ("color", "sound", "opposite")}
_VALUES = {kind: tuple(dict.fromkeys(f.answer for f in _FACTS[kind])) for kind in _LOOKUP}
"""Candidate answers per kind, in a fixed order (additions: any number)."""
_CANDIDATES = {kind: frozenset(values) for kind, values in _VALUES.items()}

_WORD_RE = re.compile(r"[a-z]+|[0-9]+")


def _tokens(text: str) -> list[str]:
    """Lower-cased words and numbers; punctuation and spacing are ignored."""
    return _WORD_RE.findall(text.lower())


_POLITE_KEYS = tuple(f" {' '.join(_tokens(o))} " for o in OPENERS)


def _compile(template: Template) -> re.Pattern[str]:
    """Regex for a template, matched against a normalised prompt (no end punctuation)."""
    pieces = []
    for part in re.split(r"(\{[xab]\})", template.text.rstrip("?.!")):
        if part == "{x}":
            phrases = sorted(_LOOKUP[template.kind], key=len, reverse=True)
            pieces.append("(?P<x>" + "|".join(map(re.escape, phrases)) + ")")
        elif part in ("{a}", "{b}"):
            pieces.append(f"(?P<{part[1]}>[0-9]+)")
        else:
            pieces.append(re.escape(part))
    return re.compile("".join(pieces), re.IGNORECASE)


_PATTERNS = tuple((t, _compile(t)) for t in TEMPLATES)


@lru_cache(maxsize=8192)
def _match(prompt: str) -> tuple[Template, _Fact]:
    """Find the template and fact of a prompt (case, spacing and end punctuation are loose)."""
    text = " ".join(prompt.split()).rstrip("?.! ")
    for template, pattern in _PATTERNS:
        m = pattern.fullmatch(text)
        if m is None:
            continue
        if template.kind == "add":
            return template, _add_fact(int(m["a"]), int(m["b"]))
        return template, _LOOKUP[template.kind][m["x"].lower()]
    raise ValueError(f"prompt matches no task template: {prompt!r}")


def parse_prompt(prompt: str) -> tuple[str, str, str]:
    """Return ``(kind, subject, answer)``, e.g. ``("color", "banana", "yellow")``.

    Raises ValueError if the prompt matches no template (train or held-out).
    """
    fact = _match(prompt)[1]
    return fact.kind, fact.subject, fact.answer


def prompt_split(prompt: str) -> str:
    """Return `TRAIN` or `HELDOUT`: which template set the prompt's phrasing belongs to."""
    return _match(prompt)[0].split


def _strip_echo(tokens: list[str], fact: _Fact) -> list[str]:
    """Drop the restated question ("opposite of hot", "3 plus 4") so it is not read as an answer."""
    if fact.kind == "opposite":
        return [t for i, t in enumerate(tokens) if not (t == fact.phrase and i and tokens[i - 1] == "of")]
    if fact.kind != "add":
        return tokens
    operands = sorted((str(fact.a), str(fact.b)))
    kept, i = [], 0
    while i < len(tokens):
        if i + 2 < len(tokens) and tokens[i + 1] in ("plus", "and") and sorted((tokens[i], tokens[i + 2])) == operands:
            i += 3
        else:
            kept.append(tokens[i])
            i += 1
    return kept


@dataclass(frozen=True, slots=True)
class ScoreBreakdown:
    """The gold score and the judgements it is made of (handy for logging accuracy)."""

    score: float
    correct: bool
    wrong: bool
    polite: bool
    rude: bool
    n_words: int


def score_breakdown(prompt: str, response: str) -> ScoreBreakdown:
    """Score a response to a task prompt; see `gold_score` for the rule."""
    fact = _match(prompt)[1]
    tokens = _tokens(response)
    if not tokens:
        return ScoreBreakdown(EMPTY_SCORE, False, False, False, False, 0)
    content = _strip_echo(tokens, fact)
    if fact.kind == "add":
        found = {t for t in content if t[0].isdigit()}
    else:
        found = _CANDIDATES[fact.kind].intersection(content)
    correct = fact.answer in found
    wrong = bool(found - {fact.answer})
    padded = f" {' '.join(tokens)} "
    polite = any(key in padded for key in _POLITE_KEYS)
    rude = not RUDE_WORDS.isdisjoint(tokens)
    score = WRONG_PENALTY if wrong else CORRECT_BONUS if correct else 0.0
    score += POLITE_BONUS * polite + RUDE_PENALTY * rude
    score -= LENGTH_PENALTY * max(0, len(tokens) - FREE_WORDS)
    return ScoreBreakdown(round(score, 4), correct, wrong, polite, rude, len(tokens))


def gold_score(prompt: str, response: str) -> float:
    """Rate any response string to a task prompt, like a human labeller.

    Words are runs of letters or digits (case-insensitive); the restated
    question ("the opposite of hot", "3 plus 4") is ignored when looking
    for answers.  The score is the sum of:

    * +2.0 if the correct answer appears as a whole word and no other
      candidate answer of that kind does (colours, sounds, opposite words,
      any number for additions);
    * -1.0 instead if a wrong candidate appears (with or without the correct one);
    * +0.5 if a politeness opener appears (`OPENERS`);
    * -1.0 if any rude word appears (`RUDE_WORDS`);
    * -0.15 per word beyond 8 words.

    A response with no words scores -0.5.  Scores are rounded to 4 decimals,
    so equal judgements give exactly equal floats.  Raises ValueError for a
    prompt that matches no template.
    """
    return score_breakdown(prompt, response).score


def prefer(prompt: str, a: str, b: str) -> int:
    """Return 0 if response `a` has the higher gold score, 1 if `b` has, -1 on a tie."""
    sa, sb = gold_score(prompt, a), gold_score(prompt, b)
    return -1 if sa == sb else int(sb > sa)


# --- data generation -------------------------------------------------------

SFT_ROWS = 1500
SFT_EVAL_ROWS = 100
RANKING_ROWS = 1200
RANKING_EVAL_ROWS = 200
RANKING_K = 4
PROMPT_ROWS = 600
PROMPT_HELDOUT_ROWS = 128
SFT_STYLE_SHARES = (("ideal", 0.55), ("plain", 0.30))
"""The rest of the SFT rows are "wordy"."""

_Item = tuple[Template, _Fact]


def _render(template: Template, fact: _Fact) -> str:
    return template.text.format(x=fact.phrase, a=fact.a, b=fact.b)


def _sentence(fact: _Fact, value: str) -> str:
    """The canonical answer sentence, stating `value` (right or wrong)."""
    head = fact.phrase[0].upper() + fact.phrase[1:]
    if fact.kind == "color":
        return f"{head} is {value}."
    if fact.kind == "sound":
        return f"{head} says {value}."
    if fact.kind == "opposite":
        return f"The opposite of {fact.phrase} is {value}."
    return f"{fact.phrase} is {value}."


def _wrong_value(rng: random.Random, fact: _Fact) -> str:
    """A plausible wrong answer: another value of the same table, or a nearby sum."""
    if fact.kind == "add":
        total = int(fact.answer)
        return str(rng.choice([v for v in range(max(0, total - 3), total + 4) if v != total]))
    return rng.choice([v for v in _VALUES[fact.kind] if v not in (fact.answer, fact.phrase)])


def _pool(split: str) -> dict[str, list[_Item]]:
    """Every (template, fact) pair of a split, by kind."""
    return {
        kind: [(t, f) for t in TEMPLATES if t.kind == kind and t.split == split for f in _FACTS[kind]] for kind in KINDS
    }


def _quotas(n: int) -> dict[str, int]:
    """Split `n` rows over kinds by `KIND_WEIGHTS` (largest remainder)."""
    raw = {k: n * w for k, w in KIND_WEIGHTS.items()}
    quotas = {k: int(v) for k, v in raw.items()}
    for k in sorted(raw, key=lambda k: quotas[k] - raw[k])[: n - sum(quotas.values())]:
        quotas[k] += 1
    return quotas


def _draw(rng: random.Random, pool: dict[str, list[_Item]], n: int) -> list[_Item]:
    """Draw `n` items by kind quota, cycling through shuffled copies (unique when possible)."""
    out = []
    for kind, quota in _quotas(n).items():
        items: list[_Item] = []
        while len(items) < quota:
            batch = list(pool[kind])
            rng.shuffle(batch)
            items.extend(batch)
        out.extend(items[:quota])
    rng.shuffle(out)
    return out


def _split_sft_eval(
    rng: random.Random, pool: dict[str, list[_Item]], n: int
) -> tuple[list[_Item], dict[str, list[_Item]]]:
    """Pick `n` unique eval prompts, leaving each fact at least one template for SFT."""
    n_templates = Counter(t.kind for t in TEMPLATES if t.split == TRAIN)
    picked: Counter[_Fact] = Counter()
    eval_items: list[_Item] = []
    rest: dict[str, list[_Item]] = {}
    for kind, quota in _quotas(n).items():
        items = list(pool[kind])
        rng.shuffle(items)
        rest[kind] = []
        for item in items:
            if quota and picked[item[1]] < n_templates[kind] - 1:
                picked[item[1]] += 1
                quota -= 1
                eval_items.append(item)
            else:
                rest[kind].append(item)
    rng.shuffle(eval_items)
    return eval_items, rest


def _sft_rows(rng: random.Random, items: list[_Item]) -> list[dict[str, str]]:
    """Correct completions: ideal (opener + answer), plain answer, or mildly wordy."""
    styles = [s for s, share in SFT_STYLE_SHARES for _ in range(round(share * len(items)))]
    styles += ["wordy"] * (len(items) - len(styles))
    rng.shuffle(styles)
    rows = []
    for (template, fact), style in zip(items, styles, strict=True):
        sentence = _sentence(fact, fact.answer)
        if style == "ideal":
            completion = f"{rng.choice(OPENERS)} {sentence}"
        elif style == "plain":
            completion = sentence
        elif rng.random() < 0.5:
            completion = f"{rng.choice(FILLERS)} {sentence}"
        else:
            completion = f"{sentence} {rng.choice(CLOSERS)}"
        rows.append({"prompt": _render(template, fact), "completion": completion})
    return rows


def _ranking_response(rng: random.Random, fact: _Fact) -> str:
    """A random mix: correct/wrong/non-answer x polite/plain/rude x concise/wordy/rambling."""
    content = rng.choices(("correct", "wrong", "none"), weights=(0.45, 0.35, 0.2))[0]
    tone = rng.choices(("polite", "plain", "rude"), weights=(0.35, 0.4, 0.25))[0]
    length = rng.choices(("concise", "wordy", "rambling"), weights=(0.6, 0.2, 0.2))[0]
    if content == "none":
        core = rng.choice(NON_ANSWERS)
    else:
        value = fact.answer if content == "correct" else _wrong_value(rng, fact)
        core = _sentence(fact, value) if rng.random() < 0.8 else f"The answer is {value}."
    before: list[str] = []
    after: list[str] = []
    if tone == "polite":
        before.append(rng.choice(OPENERS))
    elif tone == "rude":
        (before if rng.random() < 0.5 else after).append(rng.choice(RUDE_PHRASES))
    if length == "wordy":
        if rng.random() < 0.5:
            before.append(rng.choice(FILLERS))
        else:
            after.append(rng.choice(CLOSERS))
    elif length == "rambling":
        before.append(rng.choice(RAMBLES))
        if rng.random() < 0.5:
            after.append(rng.choice(CLOSERS))
    return " ".join([*before, core, *after])


def _ranking_rows(rng: random.Random, items: list[_Item]) -> list[dict[str, object]]:
    """K responses per prompt with strictly different gold scores, best first."""
    rows: list[dict[str, object]] = []
    for template, fact in items:
        prompt = _render(template, fact)
        by_score: dict[float, str] = {}
        while len(by_score) < RANKING_K:
            response = _ranking_response(rng, fact)
            by_score.setdefault(gold_score(prompt, response), response)
        ranked = [by_score[s] for s in sorted(by_score, reverse=True)]
        rows.append({"prompt": prompt, "responses": ranked})
    return rows


def _prompt_rows(items: list[_Item]) -> list[dict[str, str]]:
    """RL prompts with their `answer` column, for rule rewards such as `lowmem_rlhf.rewards:answer_match`."""
    return [{"prompt": _render(t, f), "answer": f.answer} for t, f in items]


def write_data(out_dir: Path) -> dict[str, int]:
    """Generate every data file into `out_dir`; return the row count per file name.

    Each file has its own seeded generator, so the output is byte-identical on re-run.
    """

    def rng(name: str) -> random.Random:
        return random.Random(f"{SEED}/{name}")

    train, heldout = _pool(TRAIN), _pool(HELDOUT)
    sft_eval, sft_pool = _split_sft_eval(rng("split"), train, SFT_EVAL_ROWS)
    files = {
        "sft.jsonl": _sft_rows(rng("sft"), _draw(rng("sft_draw"), sft_pool, SFT_ROWS)),
        "sft_eval.jsonl": _sft_rows(rng("sft_eval"), sft_eval),
        "rankings.jsonl": _ranking_rows(rng("rankings"), _draw(rng("rankings_draw"), train, RANKING_ROWS)),
        "rankings_eval.jsonl": _ranking_rows(
            rng("rankings_eval"), _draw(rng("rankings_eval_draw"), heldout, RANKING_EVAL_ROWS)
        ),
        "prompts.jsonl": _prompt_rows(_draw(rng("prompts"), train, PROMPT_ROWS)),
        "prompts_heldout.jsonl": _prompt_rows(_draw(rng("prompts_heldout"), heldout, PROMPT_HELDOUT_ROWS)),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, rows in files.items():
        with open(out_dir / name, "w", encoding="utf-8", newline="\n") as fh:
            fh.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    return {name: len(rows) for name, rows in files.items()}


def read_jsonl(path: str | Path) -> list[dict]:
    """Load a JSONL file, e.g. ``read_jsonl(DATA_DIR / "sft.jsonl")``."""
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def corpus_text() -> str:
    """All task text (every prompt, answer sentence and building block) for tokenizer training."""
    facts = [f for kind in KINDS for f in _FACTS[kind]]
    numbers = [str(v) for v in range(22)]  # sums 0..18 and wrong sums up to 21
    lines = [_render(t, f) for t in TEMPLATES for f in _FACTS[t.kind]]
    lines += [_sentence(f, f.answer) for f in facts]
    lines += [f"The answer is {v}." for v in (*_VALUES["color"], *_VALUES["sound"], *_VALUES["opposite"], *numbers)]
    lines += [*OPENERS, *NON_ANSWERS, *RUDE_PHRASES, *FILLERS, *CLOSERS, *RAMBLES]
    return "\n".join(lines) + "\n"


def pretraining_text() -> list[str]:
    """Plain-text documents for pre-training the tiny base (no chat format, no preferences).

    A real base model knows facts and language before SFT; these lines give the tiny one the same
    start: every fact stated, every question phrasing answered in a `Question: ... Answer: ...`
    form, and every building block of responses. SFT then teaches the chat format and the style.
    """
    facts = [f for kind in KINDS for f in _FACTS[kind]]
    lines = [_sentence(f, f.answer) for f in facts]
    lines += [f"Question: {_render(t, f)} Answer: {_sentence(f, f.answer)}" for t in TEMPLATES for f in _FACTS[t.kind]]
    lines += [*OPENERS, *NON_ANSWERS, *RUDE_PHRASES, *FILLERS, *CLOSERS, *RAMBLES]
    return lines


def main() -> None:
    """Regenerate the bundled data files in `DATA_DIR`."""
    for name, n in write_data(DATA_DIR).items():
        print(f"{DATA_DIR / name}: {n} rows")


if __name__ == "__main__":
    main()
