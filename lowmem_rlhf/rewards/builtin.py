"""Built-in rule rewards, plain Python with the reward-function signature (docs/rewards.md).

    answer_match        1 if the completion's final answer equals the row's answer column, else 0
    regex_match         1 if the completion matches a regular expression (a format reward), else 0
    target_length       -|length - target| / target: 0 at the target length, lower either side
    repetition_penalty  -(share of repeated word n-grams): 0 without repeats, towards -1 for loops

Bind their keyword arguments in the recipe, e.g. `"lowmem_rlhf.rewards:target_length(target=12)"`.
"""

from __future__ import annotations

import math
import re

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_BOXED = re.compile(r"\\boxed\{([^{}]*(?:\{[^{}]*\}[^{}]*)*)\}")
_ANSWER_IS = re.compile(r"(?:final answer|answer)\s*(?:is|:)\s*(.+)", re.IGNORECASE)
_ARTICLES = re.compile(r"\b(?:a|an|the)\b")
_WORD = re.compile(r"\w+")


def _number(text: str) -> float | None:
    """The value of a number written with optional thousands commas, `$` or `%`, else None."""
    t = text.strip().replace(",", "").replace("$", "").rstrip("%").rstrip(".").strip()
    try:
        v = float(t)
    except ValueError:
        return None
    return v if math.isfinite(v) else None


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, no articles (a, an, the), single spaces: how strings are compared."""
    text = _ARTICLES.sub(" ", text.lower())
    return " ".join(_WORD.findall(text))


def final_answer(completion: str) -> tuple[str, bool]:
    """(the final-answer text, whether an explicit marker said where it is).

    Markers, the last one wins: `\\boxed{...}`, a GSM8K-style `#### ...` line, or `answer is ...` /
    `answer: ...` (up to the end of the line). Without a marker the whole completion is returned.
    """
    boxed = _BOXED.findall(completion)
    if boxed:
        return boxed[-1], True
    if "####" in completion:
        tail = completion.rsplit("####", 1)[1].strip()
        return (tail.splitlines()[0] if tail else ""), True
    lines = [m.group(1) for line in completion.splitlines() if (m := _ANSWER_IS.search(line))]
    if lines:
        return lines[-1], True
    return completion, False


def answer_matches(completion: str, answer) -> bool:
    """The rule of `answer_match` for one completion (see there)."""
    text, marked = final_answer(completion)
    answer, _ = final_answer(str(answer))  # a worked solution ending in `#### 72` counts as its final answer
    expected = _number(answer)
    if expected is not None:
        numbers = _NUMBER.findall(text)
        if not numbers:
            return False
        got = _number(numbers[-1])
        return got is not None and math.isclose(got, expected, rel_tol=1e-9, abs_tol=1e-9)
    want = normalize_answer(str(answer))
    if not want:
        return False
    got = normalize_answer(text)
    if marked:
        return got == want
    return f" {want} " in f" {got} "


def answer_match(prompts, completions, column: str = "answer", **kwargs) -> list[float | None]:
    """1.0 where the completion's final answer equals the row's `column`, 0.0 where not, None without an answer.

    Numbers are compared numerically (`1,000` == `1000.0`): the last number of the final answer counts; an
    answer column holding a worked solution (GSM8K's `... #### 72`) is read as its final answer.
    Strings are compared after `normalize_answer`; with a marker (`\\boxed{}`, `####`, `answer is`) the
    text after it must equal the answer, without one the answer must appear as whole words.
    """
    if column not in kwargs:
        raise ValueError(f"the prompt rows have no column {column!r} (columns: {', '.join(sorted(kwargs)) or 'none'})")
    return [
        None if a is None else float(answer_matches(c, a)) for c, a in zip(completions, kwargs[column], strict=True)
    ]


def regex_match(prompts, completions, pattern: str, full: bool = False, **kwargs) -> list[float]:
    """1.0 where the completion matches `pattern` (re.search, or re.fullmatch with `full`), else 0.0.

    The pattern runs with DOTALL, so `.` spans lines: `<think>.*</think>\\s*<answer>.*</answer>` is R1's format.
    """
    rx = re.compile(pattern, re.DOTALL)
    match = rx.fullmatch if full else rx.search
    return [float(match(c) is not None) for c in completions]


def _length(completion: str, ids: list[int] | None, unit: str) -> int:
    if unit == "tokens":
        return len(ids)
    if unit == "words":
        return len(completion.split())
    return len(completion)


def target_length(
    prompts, completions, target: float, unit: str = "tokens", completion_ids=None, **kwargs
) -> list[float]:
    """-|length - target| / target, with length in `unit`: tokens (EOS included), words or chars.

    0 at the target, -1 for an empty response or one twice the target.
    """
    if unit not in ("tokens", "words", "chars"):
        raise ValueError(f"unit must be tokens, words or chars, got {unit!r}")
    if target <= 0:
        raise ValueError(f"target must be positive, got {target}")
    ids = completion_ids if completion_ids is not None else [None] * len(completions)
    return [-abs(_length(c, i, unit) - target) / target for c, i in zip(completions, ids, strict=True)]


def repetition_penalty(prompts, completions, ngram: int = 3, **kwargs) -> list[float]:
    """-(1 - distinct word n-grams / all word n-grams): 0 when no n-gram repeats; 0 for fewer than n words."""
    out = []
    for c in completions:
        words = c.lower().split()
        grams = [tuple(words[i : i + ngram]) for i in range(len(words) - ngram + 1)]
        out.append(-(1.0 - len(set(grams)) / len(grams)) if grams else 0.0)
    return out
