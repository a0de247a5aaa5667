"""Micro models of the families users train, built in code (nothing downloaded) and cached like the tiny model.

Each is a random-weight model of the real transformers class at micro size, with a byte-level BPE
tokenizer trained in code on the bundled task text carrying that family's special tokens, pad
convention and chat template (written here in each family's turn format), and a
`generation_config.json` whose `eos_token_id` lists the ids the real models list. A short full-parameter
pre-training on the bundled SFT conversations, rendered with the family's template, teaches each base
to close an assistant turn with its end-of-turn token, as real instruction-tuned bases do.

- llama3: LlamaForCausalLM, untied, header turns closed by `<|eot_id|>`, EOS `<|end_of_text|>`, no pad
  token (a reserved pad token in the vocabulary, as Llama-3.1 has), BOS written by the template;
- qwen2: Qwen2ForCausalLM, q/k/v biases, tied embeddings, ChatML (`<|im_end|>`) with a default system
  prompt, EOS and pad `<|endoftext|>`;
- mistral: MistralForCausalLM, `[INST]` turns, one EOS id `</s>` that also closes a turn, no pad;
- gemma2: Gemma2ForCausalLM, tied, soft-capped logits, no SDPA kernel, `<end_of_turn>`, EOS `<eos>`;
- phi3: Phi3ForCausalLM, fused `qkv_proj` and `gate_up_proj`, `<|end|>`, EOS `<|endoftext|>` after the
  last turn.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
CHATML_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}{{ m['content'] }}{{ eos_token }}"
    "{% else %}[INST] {{ m['content'] }} [/INST]{% endif %}{% endfor %}"
)
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "<start_of_turn>{{ 'model' if m['role'] == 'assistant' else 'user' }}\n{{ m['content'] | trim }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
PHI3_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% else %}{{ eos_token }}{% endif %}"
)

MICRO = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}


@dataclass(frozen=True)
class Family:
    name: str
    model_type: str  # transformers config class prefix
    template: str
    special: list[str]  # added special tokens, in id order
    bos: str | None
    eos: str
    pad: str | None
    end_of_turn: str
    generation_eos: list[str]  # generation_config.eos_token_id, in the real models' order
    config: dict = field(default_factory=dict)


FAMILIES = {
    f.name: f
    for f in [
        Family(
            "llama3",
            "Llama",
            LLAMA3_TEMPLATE,
            [
                "<|begin_of_text|>",
                "<|end_of_text|>",
                "<|start_header_id|>",
                "<|end_header_id|>",
                "<|eot_id|>",
                "<|finetune_right_pad_id|>",
            ],
            bos="<|begin_of_text|>",
            eos="<|end_of_text|>",
            pad=None,
            end_of_turn="<|eot_id|>",
            generation_eos=["<|end_of_text|>", "<|eot_id|>"],
            config={"num_key_value_heads": 2, "tie_word_embeddings": False},
        ),
        Family(
            "qwen2",
            "Qwen2",
            CHATML_TEMPLATE,
            ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
            bos=None,
            eos="<|endoftext|>",
            pad="<|endoftext|>",
            end_of_turn="<|im_end|>",
            generation_eos=["<|im_end|>", "<|endoftext|>"],
            config={"num_key_value_heads": 2, "tie_word_embeddings": True},
        ),
        Family(
            "mistral",
            "Mistral",
            MISTRAL_TEMPLATE,
            ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"],
            bos="<s>",
            eos="</s>",
            pad=None,
            end_of_turn="</s>",
            generation_eos=["</s>"],
            config={"num_key_value_heads": 2, "tie_word_embeddings": False, "sliding_window": None},
        ),
        Family(
            "gemma2",
            "Gemma2",
            GEMMA_TEMPLATE,
            ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"],
            bos="<bos>",
            eos="<eos>",
            pad="<pad>",
            end_of_turn="<end_of_turn>",
            generation_eos=["<eos>", "<end_of_turn>"],
            config={
                "num_key_value_heads": 2,
                "head_dim": 16,
                "query_pre_attn_scalar": 16,
                "sliding_window": 32,
                "final_logit_softcapping": 30.0,
                "attn_logit_softcapping": 50.0,
                "tie_word_embeddings": True,
            },
        ),
        Family(
            "phi3",
            "Phi3",
            PHI3_TEMPLATE,
            ["<s>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
            bos="<s>",
            eos="<|endoftext|>",
            pad="<|endoftext|>",
            end_of_turn="<|end|>",
            generation_eos=["<|endoftext|>", "<|assistant|>", "<|end|>"],
            config={"num_key_value_heads": 4, "tie_word_embeddings": False},
        ),
    ]
}

VOCAB_SIZE = 512
PRETRAIN_STEPS = 240
PRETRAIN_BATCH = 32
PRETRAIN_LR = 3e-3
BUILD_VERSION = 2


def _tokenizer(family: Family, text: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=family.special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(text.splitlines(), trainer)
    named = {"bos_token": family.bos, "eos_token": family.eos, "pad_token": family.pad}
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, clean_up_tokenization_spaces=False, **{k: v for k, v in named.items() if v}
    )
    fast.chat_template = family.template
    return fast


def _conversations(tokenizer) -> list[list[int]]:
    """The bundled SFT rows rendered with the family's template: what an instruction-tuned base has seen."""
    from lowmem_rlhf.tiny.task import DATA_DIR, read_jsonl

    out = []
    for row in read_jsonl(DATA_DIR / "sft.jsonl"):
        messages = (
            row["messages"]
            if "messages" in row
            else [
                {"role": "user", "content": row["prompt"]},
                {"role": "assistant", "content": row["completion"]},
            ]
        )
        out.append(tokenizer.apply_chat_template(messages, tokenize=False))
    return [tokenizer(t, add_special_tokens=False).input_ids for t in out]


def build_family(name: str, cache_dir: Path | None = None, seed: int = 0) -> Path:
    """Build (once) and return the folder of family `name`'s micro model, tokenizer and generation config."""
    import torch
    import transformers

    from lowmem_rlhf.tiny.model import cache_root, cached_build, cpu_kernels, train_on_docs
    from lowmem_rlhf.tiny.task import corpus_text

    family = FAMILIES[name]
    text = corpus_text()
    recipe = [family.__dict__, MICRO, VOCAB_SIZE, PRETRAIN_STEPS, PRETRAIN_BATCH, PRETRAIN_LR, BUILD_VERSION, seed]
    recipe += [text, cpu_kernels()]

    def build(folder: Path) -> None:
        tokenizer = _tokenizer(family, text)
        ids = tokenizer.convert_tokens_to_ids
        config_class = getattr(transformers, f"{family.model_type}Config")
        model_class = getattr(transformers, f"{family.model_type}ForCausalLM")
        config = config_class(
            vocab_size=len(tokenizer),
            max_position_embeddings=256,
            bos_token_id=ids(family.bos) if family.bos else None,
            eos_token_id=ids(family.eos),
            pad_token_id=ids(family.pad) if family.pad else None,
            **MICRO,
            **family.config,
        )
        torch.manual_seed(seed)
        model = model_class(config)
        docs = _conversations(tokenizer)
        pad_id = ids(family.pad or family.eos)
        desc = f"building the micro {name} model (once)"
        train_on_docs(model, docs, seed, PRETRAIN_STEPS, PRETRAIN_BATCH, PRETRAIN_LR, pad_id, desc)
        model.generation_config.eos_token_id = [ids(t) for t in family.generation_eos]
        model.generation_config.bos_token_id = config.bos_token_id
        model.generation_config.pad_token_id = config.pad_token_id
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    return cached_build(Path(cache_dir) if cache_dir is not None else cache_root(), f"family-{name}", recipe, build)
