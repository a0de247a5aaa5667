"""Preference rows -> weighted (prompt, chosen, rejected) pairs -> token ids.

Accepted rows (docs/design.md), prompt as text or messages, responses as text, one assistant message, or
the whole conversation (the prompt's turns, then the assistant's: UltraFeedback's layout):

- pairs    `{"prompt", "chosen", "rejected"}`: one pair, weight 1;
- rankings `{"prompt", "responses": [best, ..., worst]}`: all C(K, 2) pairs, each weighted
  1 / C(K, 2) so a prompt counts once however many responses it has (InstructGPT);
- ratings  `{"prompt", "responses", "scores"}`: a pair for every two responses with strictly
  different scores (ties dropped), each weighted 1 / (number of pairs); the score difference is
  the pair's margin (used when the stage asks for it).

A pair whose chosen and rejected texts are identical teaches nothing (its loss has no gradient) and
skews the averages: it is dropped, counted in a warning, and the row's other pairs share its weight.

The reward model trains on groups (`GroupExample`): one row's distinct responses, each scored once,
and all of its weighted pairs computed from those scores, so a K-way ranking costs K forwards
instead of K(K-1) (InstructGPT). DPO trains on the pairs (`PairExample`).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
from dataclasses import dataclass

import torch

from lowmem_rlhf.data.batching import pad_sequences
from lowmem_rlhf.data.chat import encode_prompt, encode_response, to_messages, to_text
from lowmem_rlhf.data.sft import truncate
from lowmem_rlhf.errors import UserError

logger = logging.getLogger(__name__)


@dataclass
class Pair:
    prompt: list[dict[str, str]]
    chosen: str
    rejected: str
    weight: float = 1.0
    margin: float = 0.0


@dataclass
class PairExample:
    """Token ids of one pair: chosen and rejected are full sequences (prompt + response + EOS)."""

    chosen_ids: list[int]
    rejected_ids: list[int]
    chosen_prompt_len: int
    rejected_prompt_len: int
    weight: float
    margin: float


@dataclass
class GroupExample:
    """One row's distinct responses as full sequences (prompt + response + EOS) and its pairs over them:
    (chosen index, rejected index, weight, margin) into `seqs`."""

    seqs: list[list[int]]
    prompt_lens: list[int]
    pairs: list[tuple[int, int, float, float]]


def _number(value, where: str, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise UserError(f"{where}: field `{field}` must be a number, got {value!r:.40}")
    try:
        out = float(value)
    except ValueError:
        raise UserError(f"{where}: field `{field}` must be a number, got {value!r:.40}") from None
    if not math.isfinite(out):
        raise UserError(f"{where}: field `{field}` must be finite, got {value!r}")
    return out


def normalize_preference_row(row: dict, where: str) -> list[Pair]:
    """One preference row in any accepted format -> its weighted pairs (possibly none: all tied or identical)."""
    return _drop_identical(_row_pairs(row, where))[0]


def _drop_identical(pairs: list[Pair]) -> tuple[list[Pair], int]:
    """Pairs whose chosen and rejected texts differ (weights re-shared so the row keeps its total), and #dropped."""
    kept = [p for p in pairs if p.chosen != p.rejected]
    if len(kept) < len(pairs) and kept:
        share = sum(p.weight for p in pairs) / sum(p.weight for p in kept)
        kept = [dataclasses.replace(p, weight=p.weight * share) for p in kept]
    return kept, len(pairs) - len(kept)


def _row_pairs(row: dict, where: str) -> list[Pair]:
    if "prompt" not in row:
        raise UserError(f"{where}: missing field `prompt`")
    prompt = to_messages(row["prompt"], where, "prompt")
    if "chosen" in row or "rejected" in row:
        for key in ("chosen", "rejected"):
            if key not in row:
                raise UserError(f"{where}: missing field `{key}` (pair rows need both `chosen` and `rejected`)")
        chosen, rejected = (to_text(row[k], where, k, prompt) for k in ("chosen", "rejected"))
        return [Pair(prompt, chosen, rejected)]
    if "responses" not in row:
        raise UserError(
            f"{where}: no preference fields found (has {sorted(row)}); expected `chosen`+`rejected`, "
            "`responses` (best first), or `responses`+`scores`"
        )
    responses = row["responses"]
    if not isinstance(responses, list) or len(responses) < 2:
        raise UserError(f"{where}: field `responses` must be a list of at least 2 responses")
    texts = [to_text(r, where, f"responses[{i}]", prompt) for i, r in enumerate(responses)]
    if "scores" not in row:  # a ranking, best first
        n = len(texts) * (len(texts) - 1) // 2
        return [Pair(prompt, texts[i], texts[j], 1.0 / n) for i, j in itertools.combinations(range(len(texts)), 2)]
    scores = row["scores"]
    if not isinstance(scores, list) or len(scores) != len(texts):
        got = len(scores) if isinstance(scores, list) else type(scores).__name__
        raise UserError(f"{where}: field `scores` must be a list as long as `responses` ({len(texts)}), got {got}")
    values = [_number(s, where, f"scores[{i}]") for i, s in enumerate(scores)]
    pairs = [
        (i, j) if values[i] > values[j] else (j, i)
        for i, j in itertools.combinations(range(len(texts)), 2)
        if values[i] != values[j]
    ]
    return [Pair(prompt, texts[i], texts[j], 1.0 / len(pairs), values[i] - values[j]) for i, j in pairs]


def expand_groups(rows: list[dict], source: str) -> tuple[list[list[Pair]], int, list[int]]:
    """Every row's pairs, one list per row that has any; returns those lists, how many rows gave none because
    all responses were tied, and the (1-based) rows that had pairs with identical chosen and rejected texts
    (dropped)."""
    groups, tied, identical = [], 0, []
    for i, row in enumerate(rows, start=1):
        row_pairs = _row_pairs(row, f"{source}, row {i}")
        tied += not row_pairs
        row_pairs, dropped = _drop_identical(row_pairs)
        if dropped:
            identical.append(i)
        if row_pairs:
            groups.append(row_pairs)
    return groups, tied, identical


def expand_rows(rows: list[dict], source: str) -> tuple[list[Pair], int, list[int]]:
    """`expand_groups` flattened: every row's pairs in row order."""
    groups, tied, identical = expand_groups(rows, source)
    return [p for g in groups for p in g], tied, identical


def tokenize_pairs(pairs: list[Pair], tokenizer, max_length: int) -> tuple[list[PairExample], int]:
    """Token ids of every pair (SFT's truncation policy per sequence); returns examples and #truncated."""
    examples, truncated = [], 0
    prompt_cache: dict[str, list[int]] = {}
    for pair in pairs:
        key = repr(pair.prompt)
        if key not in prompt_cache:
            prompt_cache[key] = encode_prompt(tokenizer, pair.prompt)
        prompt_ids = prompt_cache[key]
        seqs = []
        for text in (pair.chosen, pair.rejected):
            response = encode_response(tokenizer, text)
            p, r = truncate(prompt_ids, response, max_length)
            truncated += (len(p), len(r)) != (len(prompt_ids), len(response))
            seqs.append((p + r, len(p)))
        (c, cp), (r, rp) = seqs
        examples.append(PairExample(c, r, cp, rp, pair.weight, pair.margin))
    return examples, truncated


def tokenize_groups(groups: list[list[Pair]], tokenizer, max_length: int) -> tuple[list[GroupExample], int]:
    """Token ids of every group's distinct responses (SFT's truncation policy per sequence); returns the
    examples and how many sequences were truncated."""
    examples, truncated = [], 0
    for pairs in groups:
        prompt_ids = encode_prompt(tokenizer, pairs[0].prompt)
        index: dict[str, int] = {}
        seqs, prompt_lens = [], []
        for text in (t for p in pairs for t in (p.chosen, p.rejected)):
            if text in index:
                continue
            index[text] = len(seqs)
            response = encode_response(tokenizer, text)
            p, r = truncate(prompt_ids, response, max_length)
            truncated += (len(p), len(r)) != (len(prompt_ids), len(response))
            seqs.append(p + r)
            prompt_lens.append(len(p))
        examples.append(
            GroupExample(seqs, prompt_lens, [(index[p.chosen], index[p.rejected], p.weight, p.margin) for p in pairs])
        )
    return examples, truncated


def _sequence_batch(seqs: list[list[int]], prompt_lens: list[int], pad_id: int) -> dict[str, torch.Tensor]:
    input_ids, attention_mask = pad_sequences(seqs, pad_id)
    response_mask = attention_mask.clone()
    for i, p in enumerate(prompt_lens):
        response_mask[i, :p] = False
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "response_mask": response_mask,
        "response_lengths": torch.tensor([len(s) - p for s, p in zip(seqs, prompt_lens, strict=True)]),
    }


def collate_groups(examples: list[GroupExample], pad_id: int) -> dict[str, torch.Tensor]:
    """One batch of every group's sequences (one forward pass) and the pairs as indices into it:
    `chosen_index`, `rejected_index`, `weights`, `margins` (one entry per pair)."""
    seqs, prompt_lens, chosen, rejected, weights, margins = [], [], [], [], [], []
    for e in examples:
        offset = len(seqs)
        seqs += e.seqs
        prompt_lens += e.prompt_lens
        for c, r, w, m in e.pairs:
            chosen.append(offset + c)
            rejected.append(offset + r)
            weights.append(w)
            margins.append(m)
    return _sequence_batch(seqs, prompt_lens, pad_id) | {
        "chosen_index": torch.tensor(chosen),
        "rejected_index": torch.tensor(rejected),
        "weights": torch.tensor(weights, dtype=torch.float32),
        "margins": torch.tensor(margins, dtype=torch.float32),
    }


def collate_pairs(examples: list[PairExample], pad_id: int) -> dict[str, torch.Tensor]:
    """One batch of 2n sequences: the n chosen first, then the n rejected (one forward pass); the same
    keys as `collate_groups` (pair i is chosen i vs rejected n + i)."""
    n = len(examples)
    seqs = [e.chosen_ids for e in examples] + [e.rejected_ids for e in examples]
    prompt_lens = [e.chosen_prompt_len for e in examples] + [e.rejected_prompt_len for e in examples]
    return _sequence_batch(seqs, prompt_lens, pad_id) | {
        "chosen_index": torch.arange(n),
        "rejected_index": torch.arange(n, 2 * n),
        "weights": torch.tensor([e.weight for e in examples], dtype=torch.float32),
        "margins": torch.tensor([e.margin for e in examples], dtype=torch.float32),
    }


def _read_groups(source: str, split: str, limit: int | None) -> tuple[list[list[Pair]], str]:
    from lowmem_rlhf.data.formats import load_rows

    rows, name = load_rows(source, split)
    if limit is not None:
        rows = rows[:limit]
    groups, tied, identical = expand_groups(rows, name)
    if tied:
        logger.warning("%s: %d rows had all responses tied and gave no pair", name, tied)
    if identical:
        shown = ", ".join(map(str, identical[:5])) + (", ..." if len(identical) > 5 else "")
        logger.warning(
            "%s: %d rows had a chosen response identical to the rejected one (rows %s); those pairs were dropped",
            name,
            len(identical),
            shown,
        )
    if not groups:
        raise UserError(f"{name}: no preference pairs (every row's responses are tied or identical)")
    return groups, name


def _warn_truncated(name: str, truncated: int, key: str, max_length: int) -> None:
    if truncated:
        logger.warning("%s: %d sequences longer than %s.max_length=%d were truncated", name, truncated, key, max_length)


def load_pair_examples(
    source: str, split: str, tokenizer, max_length: int, limit: int | None, key: str
) -> list[PairExample]:
    """Read, expand and tokenise a preference source into pairs; `key` names the recipe section in warnings."""
    groups, name = _read_groups(source, split, limit)
    examples, truncated = tokenize_pairs([p for g in groups for p in g], tokenizer, max_length)
    _warn_truncated(name, truncated, key, max_length)
    return examples


def load_group_examples(
    source: str, split: str, tokenizer, max_length: int, limit: int | None, key: str
) -> list[GroupExample]:
    """Read, expand and tokenise a preference source into one group per row (`key` names the recipe section)."""
    groups, name = _read_groups(source, split, limit)
    examples, truncated = tokenize_groups(groups, tokenizer, max_length)
    _warn_truncated(name, truncated, key, max_length)
    return examples
