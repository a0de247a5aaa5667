"""The bundled tiny model: a small Llama built from a config in code, with a tokenizer trained in code
on the bundled task text. Nothing is downloaded. Built once and cached on disk (atomically), then
loaded through the same 4-bit path as any Hub model.
"""

from __future__ import annotations

from pathlib import Path

from lowmem_rlhf.cache import cache_root, cached_build  # noqa: F401 (re-exported: benchmarks and tests import them here)

# Llama architecture, ~0.9M parameters: small enough to train in a minute on 2 CPU cores, big enough
# to learn the bundled task. Hidden sizes are multiples of 64 as bitsandbytes' 4-bit blocks need.
TINY_LLAMA = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "initializer_range": 0.05,
}
VOCAB_SIZE = 640
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
PRETRAIN_STEPS = 600
PRETRAIN_BATCH = 64
PRETRAIN_LR = 3e-3
BUILD_VERSION = 2


def cpu_kernels() -> str:
    """The CPU kernel path the pre-training runs on (torch's vector ISA, MKL's code path): builds on other
    kernels round differently, so they are other models and get other folders."""
    import os

    import torch

    return f"{torch.backends.cpu.get_cpu_capability()}/{os.environ.get('MKL_CBWR', 'auto')}"


def train_tokenizer(text: str):
    """A byte-level BPE tokenizer trained on `text`, with our chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from lowmem_rlhf.data.chat import DEFAULT_CHAT_TEMPLATE

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(text.splitlines(), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", clean_up_tokenization_spaces=False
    )
    fast.chat_template = DEFAULT_CHAT_TEMPLATE
    return fast


def pretrain(model, tokenizer, lines: list[str], seed: int) -> None:
    """Full-parameter fp32 pre-training on plain text, so the base knows the task's facts and words.

    Like a real base model it has never seen the chat format; SFT teaches that.
    """
    docs = [
        [tokenizer.bos_token_id, *tokenizer(line, add_special_tokens=False).input_ids, tokenizer.eos_token_id]
        for line in lines
    ]
    train_on_docs(model, docs, seed, PRETRAIN_STEPS, PRETRAIN_BATCH, PRETRAIN_LR, pad_id=0)


def train_on_docs(
    model, docs: list[list[int]], seed: int, steps: int, batch_size: int, lr: float, pad_id: int, desc: str = ""
) -> None:
    """Full-parameter training of `model` on random batches of token rows (next-token loss, one-cycle lr)."""
    import torch
    from tqdm.auto import tqdm

    from lowmem_rlhf.ops import masked_mean

    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    for _ in tqdm(range(steps), desc=desc or "building the tiny base model (once)", unit="step", disable=None):
        batch = [docs[i] for i in torch.randint(len(docs), (batch_size,), generator=g).tolist()]
        width = max(map(len, batch))
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.bool)
        for i, d in enumerate(batch):
            ids[i, : len(d)] = torch.tensor(d)
            mask[i, : len(d)] = True
        logits = model(input_ids=ids, attention_mask=mask.long()).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        loss = masked_mean(nll, mask[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    model.eval()


def build_tiny(cache_dir: Path | None = None, seed: int = 0) -> Path:
    """Build (once) and return the folder of the tiny model + tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lowmem_rlhf.tiny.task import corpus_text, pretraining_text

    text = corpus_text()
    # everything the weights depend on, so a change to any of it builds a new model beside the old one
    recipe = [TINY_LLAMA, VOCAB_SIZE, PRETRAIN_STEPS, PRETRAIN_BATCH, PRETRAIN_LR, BUILD_VERSION, seed, text]
    recipe += [pretraining_text(), cpu_kernels()]

    def build(folder: Path) -> None:
        tokenizer = train_tokenizer(text)
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **TINY_LLAMA,
        )
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
        pretrain(model, tokenizer, pretraining_text(), seed)
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    return cached_build(Path(cache_dir) if cache_dir is not None else cache_root(), "tiny-llama", recipe, build)
