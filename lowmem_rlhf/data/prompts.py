"""RL prompt rows -> prompt token ids: `{"prompt": text or messages}` or `{"messages": [...]}`, and their other columns.

A `messages` row that ends with an assistant turn drops that turn (the policy writes its own).
Prompts longer than `max_prompt_length` are cut from the left, keeping the assistant header.
"""

from __future__ import annotations

from lowmem_rlhf.data.chat import encode_prompt, to_messages
from lowmem_rlhf.errors import UserError


def normalize_prompt_row(row: dict, where: str) -> list[dict[str, str]]:
    if "prompt" in row:
        return to_messages(row["prompt"], where, "prompt")
    if "messages" in row:
        messages = to_messages(row["messages"], where, "messages")
        if messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        if not messages:
            raise UserError(f"{where}: field `messages` has no prompt before the assistant turn")
        return messages
    raise UserError(f"{where}: missing field `prompt` (RL prompt rows are {{prompt}} or {{messages}})")


def prompt_text(messages: list[dict[str, str]]) -> str:
    """The last user turn: what a gold scorer or a sample table shows for a prompt."""
    return next((m["content"] for m in reversed(messages) if m["role"] == "user"), messages[-1]["content"])


def tokenize_prompts(
    rows: list[dict], tokenizer, max_prompt_length: int, source: str
) -> tuple[list[list[int]], list[str], int]:
    """(prompt ids, prompt texts, how many were cut) for every row."""
    ids, texts, cut = [], [], 0
    for i, row in enumerate(rows, start=1):
        messages = normalize_prompt_row(row, f"{source}, row {i}")
        p = encode_prompt(tokenizer, messages)
        if len(p) > max_prompt_length:
            p, cut = p[-max_prompt_length:], cut + 1
        ids.append(p)
        texts.append(prompt_text(messages))
    return ids, texts, cut


def prompt_columns(rows: list[dict]) -> dict[str, list]:
    """Every column of the prompt rows but `prompt`, as lists aligned with the rows (None where a row lacks it).

    Reward functions and judges get these as keyword arguments (a `messages` prompt keeps its `messages`).
    """
    names = dict.fromkeys(k for row in rows for k in row if k != "prompt")
    return {name: [row.get(name) for row in rows] for name in names}
