"""Forward passes on the shared backbone: hidden states and chunked token log-probs.

Position ids are always derived from the attention mask, so left- and right-padded batches give the
same numbers for the same tokens (pitfall 5).
"""

from __future__ import annotations

import torch

from lowmem_rlhf.ops import chunked_logprobs


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(b, t) positions counting only real tokens; pads get 0 (they are masked anyway)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def causal_lm(model):
    """The transformers causal-LM module under a PeftModel (LoRA layers are injected inside it)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class _SoftCapped(torch.nn.Module):
    """lm_head followed by the model's final-logit soft-capping (Gemma-2/3): cap * tanh(logits / cap)."""

    def __init__(self, head: torch.nn.Module, cap: float):
        super().__init__()
        self.head, self.cap = head, cap

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.head(hidden).float() / self.cap) * self.cap


def output_head(model) -> torch.nn.Module:
    """The module that maps hidden states to the logits the model samples from (lm_head, soft-capped if the
    architecture caps its logits), so our log-probs are those of the distribution `generate` draws from."""
    lm = causal_lm(model)
    head = lm.get_output_embeddings()
    cap = getattr(lm.config.get_text_config(), "final_logit_softcapping", None)
    return _SoftCapped(head, cap) if cap else head


def hidden_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Last-layer hidden states (b, t, d), without running lm_head over the whole sequence."""
    decoder = causal_lm(model).get_decoder()
    out = decoder(
        input_ids=input_ids,
        attention_mask=attention_mask.long(),
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
    )
    return out.last_hidden_state


def token_logprobs(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    chunk_size: int = 512,
    temperature: float = 1.0,
) -> torch.Tensor:
    """log p(input_ids[:, 1:] | prefix): (b, t - 1) fp32, computed chunk by chunk (pitfall 11)."""
    hidden = hidden_states(model, input_ids, attention_mask)
    head = output_head(model)
    return chunked_logprobs(hidden[:, :-1], head, input_ids[:, 1:], chunk_size, temperature)


def response_logprob_sums(
    model,
    prompts: list[list[int]],
    responses: list[list[int]],
    pad_id: int,
    chunk_size: int = 512,
    temperature: float = 1.0,
) -> torch.Tensor:
    """(n,) Σ_t log p(response token t | prompt, earlier tokens) for each prompt/response pair."""
    from lowmem_rlhf.data.batching import pad_sequences

    device = next(model.parameters()).device
    ids, mask = pad_sequences([p + r for p, r in zip(prompts, responses, strict=True)], pad_id)
    ids, mask = ids.to(device), mask.to(device)
    response_mask = mask.clone()
    for i, p in enumerate(prompts):
        response_mask[i, : len(p)] = False
    logprobs = token_logprobs(model, ids, mask, chunk_size, temperature)
    return (logprobs * response_mask[:, 1:]).sum(1)
