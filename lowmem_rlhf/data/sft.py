"""SFT rows -> (prompt messages, completion) -> token ids with the response marked for the loss.

Accepted rows (docs/design.md): chat `{"messages": [...]}` whose last message is the assistant's answer
(the loss covers that final turn), `{"prompt", "completion"}` (prompt as text or messages), and
Alpaca `{"instruction", "input", "output"}`.

Truncation policy for an example longer than `max_length` tokens: the prompt is cut from the LEFT
(the most recent part, ending in the assistant header, is kept) down to what the response leaves
free, but never below half of `max_length`; if it is still too long the response is cut from the
right, and then it has no closing EOS to learn.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowmem_rlhf.data.batching import pad_sequences
from lowmem_rlhf.data.chat import encode_prompt, encode_response, to_messages, to_text
from lowmem_rlhf.errors import UserError


@dataclass
class SFTExample:
    input_ids: list[int]
    prompt_len: int  # tokens [0, prompt_len) are prompt; the rest (response + EOS) are labels


def normalize_sft_row(row: dict, where: str) -> tuple[list[dict[str, str]], str]:
    """One SFT row in any accepted format -> (prompt messages, completion text)."""
    if "messages" in row:
        messages = to_messages(row["messages"], where, "messages")
        if messages[-1]["role"] != "assistant" or len(messages) < 2:
            raise UserError(f"{where}: field `messages` must end with an assistant message after at least one other")
        return messages[:-1], messages[-1]["content"]
    if "prompt" in row or "completion" in row:
        for key in ("prompt", "completion"):
            if key not in row:
                raise UserError(f"{where}: missing field `{key}` (rows with `prompt` need `completion` and back)")
        return to_messages(row["prompt"], where, "prompt"), to_text(row["completion"], where, "completion")
    if "instruction" in row:
        if "output" not in row:
            raise UserError(f"{where}: missing field `output` (Alpaca rows need instruction, input, output)")
        instruction = to_text(row["instruction"], where, "instruction")
        extra = row.get("input") or ""
        if not isinstance(extra, str):
            raise UserError(f"{where}: field `input` must be text")
        prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        return [{"role": "user", "content": prompt}], to_text(row["output"], where, "output")
    raise UserError(
        f"{where}: no SFT fields found (has {sorted(row)}); expected `messages`, `prompt`+`completion`, "
        "or `instruction`+`input`+`output`"
    )


def truncate(prompt: list[int], response: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """Apply the module's truncation policy; returns the kept (prompt, response) ids."""
    if len(prompt) + len(response) <= max_length:
        return prompt, response
    keep = max(max_length - len(response), min(len(prompt), max_length // 2))
    prompt = prompt[len(prompt) - keep :]
    return prompt, response[: max_length - len(prompt)]


def tokenize_sft(rows: list[dict], tokenizer, max_length: int, source: str) -> tuple[list[SFTExample], int]:
    """Tokenise every row; returns the examples and how many were truncated."""
    examples, truncated = [], 0
    for i, row in enumerate(rows, start=1):
        messages, completion = normalize_sft_row(row, f"{source}, row {i}")
        prompt_ids = encode_prompt(tokenizer, messages)
        response_ids = encode_response(tokenizer, completion)
        p, r = truncate(prompt_ids, response_ids, max_length)
        truncated += (len(p), len(r)) != (len(prompt_ids), len(response_ids))
        examples.append(SFTExample(p + r, len(p)))
    return examples, truncated


def collate_sft(examples: list[SFTExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask and response_mask, all (b, t).

    Masks come from lengths, never from `ids == pad_id`, so pad == eos is safe (the closing EOS
    stays a label).
    """
    input_ids, attention_mask = pad_sequences([e.input_ids for e in examples], pad_id)
    response_mask = attention_mask.clone()
    for i, e in enumerate(examples):
        response_mask[i, : e.prompt_len] = False
    return {"input_ids": input_ids, "attention_mask": attention_mask, "response_mask": response_mask}
