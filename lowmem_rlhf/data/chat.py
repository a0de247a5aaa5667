"""One chat rendering for every stage: the tokenizer's own template, else DEFAULT_CHAT_TEMPLATE.

Every stage builds a sequence the same way, so what SFT trains on is what PPO generates from:

    prompt_ids   = tokenize(render(prompt_messages, add_generation_prompt=True))
    response_ids = tokenize(response_text) + closing

`closing` is the template's own end of an assistant turn, up to its end-of-turn token: `<|im_end|>`
(ChatML, Qwen2), `<|eot_id|>` (Llama-3), `<end_of_turn>` (Gemma), `<|end|>` (Phi-3), or the EOS token
where the template closes a turn with it (Mistral, our default). It is part of the response: a label
in SFT, the last scored token in RM/PPO, and one of the ids generation stops at (`end_of_turn_ids`).
"""

from __future__ import annotations

import weakref
from typing import Any

from lowmem_rlhf.errors import UserError

# A stand-in assistant message; what the template writes after it closes an assistant turn.
_MARKER = "\x00lowmem-rlhf-response\x00"

# Used only when the tokenizer has no template of its own (e.g. base models and the tiny model).
DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

ROLES = ("system", "user", "assistant")


def ensure_chat_template(tokenizer) -> None:
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE


def to_messages(value: Any, where: str, field: str) -> list[dict[str, str]]:
    """A prompt given as text or as a list of {role, content} messages -> messages."""
    if isinstance(value, str):
        if not value.strip():
            raise UserError(f"{where}: field `{field}` is empty")
        return [{"role": "user", "content": value}]
    if isinstance(value, list) and value:
        out = []
        for i, m in enumerate(value):
            if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in ROLES:
                raise UserError(
                    f'{where}: field `{field}[{i}]` must be a message {{"role": one of {", ".join(ROLES)}, '
                    f'"content": text}}, got {m!r:.80}'
                )
            out.append({"role": m["role"], "content": m["content"]})
        return out
    raise UserError(f"{where}: field `{field}` must be text or a non-empty list of messages, got {value!r:.80}")


def to_text(value: Any, where: str, field: str, prompt: list[dict[str, str]] | None = None) -> str:
    """A response given as text, as one assistant message, or as the whole conversation -> text.

    The whole-conversation form (`chosen: [user turn, ..., assistant turn]`, as in UltraFeedback and
    TRL's conversational preference data) must repeat `prompt` before its final assistant turn.
    """
    if isinstance(value, list) and len(value) > 1:
        messages = to_messages(value, where, field)
        if messages[-1]["role"] != "assistant":
            raise UserError(f"{where}: field `{field}` is a conversation that does not end with an assistant turn")
        if prompt is not None and messages[:-1] != prompt:
            raise UserError(
                f"{where}: field `{field}` is a conversation whose turns before the last one differ from `prompt`; "
                "give the response alone, or the prompt's turns followed by the response"
            )
        value = [value[-1]]
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict):
        if value[0].get("role") != "assistant":
            raise UserError(f"{where}: field `{field}` must be an assistant message")
        value = value[0].get("content")
    if not isinstance(value, str) or not value.strip():
        raise UserError(f"{where}: field `{field}` must be non-empty text, got {value!r:.80}")
    return value


def render_prompt(tokenizer, messages: list[dict[str, str]]) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode_prompt(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of the rendered prompt, ending with the assistant header that generation continues."""
    return tokenizer(render_prompt(tokenizer, messages), add_special_tokens=False).input_ids


def _special_ids(tokenizer) -> set[int]:
    ids = set(tokenizer.all_special_ids)
    ids.update(i for i, t in tokenizer.added_tokens_decoder.items() if t.special)
    return ids


_CLOSINGS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> ((template, eos), closing)


def response_closing(tokenizer) -> list[int]:
    """The token ids the chat template writes after an assistant message, up to its end-of-turn token.

    Found by rendering a one-turn conversation around a marker and reading what follows the marker up
    to the first special token (`<|im_end|>`, `<|eot_id|>`, `<end_of_turn>`, `<|end|>`, `</s>`). A
    template that closes a turn with no special token gets the tokenizer's EOS, so every response
    still ends with a token generation can stop at.
    """
    key = (tokenizer.chat_template, tokenizer.eos_token_id)
    cached = _CLOSINGS.get(tokenizer)
    if cached is None or cached[0] != key:
        conversation = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _MARKER}]
        text = tokenizer.apply_chat_template(conversation, tokenize=False)
        if not isinstance(text, str) or _MARKER not in text:
            raise UserError(
                "the tokenizer's chat template does not write an assistant message's content; "
                "give the tokenizer a chat template that renders assistant turns"
            )
        after = tokenizer(text.split(_MARKER, 1)[1], add_special_tokens=False).input_ids
        special = _special_ids(tokenizer)
        end = next((i for i, t in enumerate(after) if t in special), None)
        cached = _CLOSINGS[tokenizer] = (key, after[: end + 1] if end is not None else [tokenizer.eos_token_id])
    return list(cached[1])


def end_of_turn_ids(tokenizer, generation_eos: int | list[int] | None = None) -> list[int]:
    """Ids that end a response: the template's end-of-turn token, the tokenizer's EOS, then the model's
    `generation_config.eos_token_id` (one id, a list or None; generation adds it: rollout.generate), no repeats."""
    extra = [] if generation_eos is None else [generation_eos] if isinstance(generation_eos, int) else generation_eos
    return list(dict.fromkeys([response_closing(tokenizer)[-1], tokenizer.eos_token_id, *extra]))


def encode_response(tokenizer, text: str) -> list[int]:
    """Token ids of a response followed by the template's closing (ending with its end-of-turn token)."""
    return tokenizer(text, add_special_tokens=False).input_ids + response_closing(tokenizer)
