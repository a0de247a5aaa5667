"""Scalar scores (reward, value) from a role's hidden state at the last real token (pitfall 3).

The last real token is found from the attention mask, never from pad ids, so left or right padding
and a pad token equal to EOS all give the same score for the same sequence.
"""

from __future__ import annotations

import torch

from lowmem_rlhf.model.forward import hidden_states
from lowmem_rlhf.model.heads import ScalarHead


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(b,) index of each row's last True in the mask, for any padding side."""
    return attention_mask.long().cumsum(-1).argmax(-1)


def sequence_scores(model, head: ScalarHead, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(b,) fp32 scores: `head` applied to the hidden state of each row's last real token."""
    hidden = hidden_states(model, input_ids, attention_mask)
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    return head(hidden[rows, last_token_index(attention_mask)])


@torch.no_grad()
def score_texts(
    bank,
    role: str,
    tokenizer,
    prompts: list,
    responses: list[str],
    batch_size: int = 16,
    max_length: int | None = None,
) -> list[float]:
    """Score prompt/response pairs with `role`'s adapter and head, in eval mode.

    Sequences are rendered exactly as in training (chat template + response + EOS). Prompts are text
    or message lists.
    """
    from lowmem_rlhf.data.chat import encode_prompt, encode_response, to_messages
    from lowmem_rlhf.data.preference import pad_sequences
    from lowmem_rlhf.data.sft import truncate

    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    seqs = []
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        prompt_ids = encode_prompt(tokenizer, to_messages(p, f"item {i}", "prompt"))
        response_ids = encode_response(tokenizer, r)
        if max_length is not None:
            prompt_ids, response_ids = truncate(prompt_ids, response_ids, max_length)
        seqs.append(prompt_ids + response_ids)
    head = bank.head(role)
    scores: list[float] = []
    with bank.use(role) as model:
        for start in range(0, len(seqs), batch_size):
            ids, mask = pad_sequences(seqs[start : start + batch_size], tokenizer.pad_token_id)
            scores.extend(sequence_scores(model, head, ids.to(bank.device), mask.to(bank.device)).tolist())
    return scores
