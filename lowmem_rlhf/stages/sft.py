"""SFT: train the policy LoRA on the 4-bit base with the loss on response tokens only."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from lowmem_rlhf import distributed
from lowmem_rlhf.config import RecipeConfig
from lowmem_rlhf.data.formats import load_rows
from lowmem_rlhf.data.sft import collate_sft, tokenize_sft
from lowmem_rlhf.errors import UserError
from lowmem_rlhf.model.bank import AdapterBank, lora_config
from lowmem_rlhf.model.loading import load_base, load_tokenizer, resolve_device
from lowmem_rlhf.model.memory import check_fits
from lowmem_rlhf.stages.common import begin_stage, locked_stage, seed_everything, stage_settings
from lowmem_rlhf.train.loop import TrainLoop
from lowmem_rlhf.train.losses import sft_loss_sum
from lowmem_rlhf.train.runner import fingerprint

logger = logging.getLogger(__name__)

ROLE = "policy"


def _load_examples(source: str, split: str, tokenizer, cfg: RecipeConfig, limit: int | None):
    rows, name = load_rows(source, split)
    if limit is not None:
        rows = rows[:limit]
    examples, truncated = tokenize_sft(rows, tokenizer, cfg.sft.max_length, name)
    if truncated:
        logger.warning(
            "%s: %d of %d examples were longer than sft.max_length=%d and were truncated (see docs/data.md)",
            name,
            truncated,
            len(examples),
            cfg.sft.max_length,
        )
    return examples


@locked_stage
def run(cfg: RecipeConfig, force: bool = False) -> Path:
    """Run (or resume, or skip) the SFT stage; returns `output_dir/sft`, a standard PEFT adapter folder."""
    sc = cfg.sft
    if sc.dataset is None:
        raise UserError("recipe: `sft.dataset` is not set; point it at your SFT data (see docs/data.md)")
    stage_dir, manifest, done = begin_stage(cfg, "sft", force)
    if done:
        return stage_dir
    seed_everything(cfg.seed)
    # Read and check every data row before spending minutes loading the model.
    tokenizer = load_tokenizer(cfg.model)
    train = _load_examples(sc.dataset, sc.dataset_split, tokenizer, cfg, sc.max_samples)
    evals = _load_examples(sc.eval_dataset, sc.eval_split, tokenizer, cfg, None) if sc.eval_dataset else []

    check_fits(cfg, "sft", resolve_device(cfg.model.device))
    model, tokenizer = load_base(cfg.model)
    bank = AdapterBank(model, gradient_checkpointing=sc.gradient_checkpointing)
    bank.add_role(ROLE, lora=lora_config(cfg.lora), trainable=True)
    device, pad, chunk = bank.device, tokenizer.pad_token_id, cfg.model.logprob_chunk_size

    def collate(examples):
        return {k: v.to(device) for k, v in collate_sft(examples, pad).items()}

    eval_bs = distributed.per_device(sc.batch_size)  # every process evaluates the whole set, at its own batch size

    def eval_fn(bank: AdapterBank) -> dict[str, float]:
        total, count = 0.0, 0
        with torch.no_grad(), bank.use(ROLE) as m:
            for i in range(0, len(evals), eval_bs):
                batch = collate(evals[i : i + eval_bs])
                loss, _ = sft_loss_sum(m, batch, chunk)
                total += float(loss)
                count += int(batch["response_mask"][:, 1:].sum())
        return {"eval_loss": total / max(count, 1)}

    settings = stage_settings(cfg, "sft")
    loop = TrainLoop(
        name="sft",
        bank=bank,
        role=ROLE,
        cfg=sc,
        stage_dir=stage_dir,
        dataset=train,
        collate=collate,
        loss_fn=lambda m, b: sft_loss_sum(m, b, chunk),
        weight_fn=lambda b: float(b["response_mask"][:, 1:].sum()),
        seed=cfg.seed,
        eval_fn=eval_fn if evals else None,
        settings=settings,
    )
    result = loop.run()
    bank.save_role(ROLE, stage_dir)
    manifest.mark_finished(
        "sft", {"path": "sft", "steps": result.steps, "metrics": result.metrics, "settings": fingerprint(settings)}
    )
    logger.info("sft: adapter saved to %s", stage_dir)
    return stage_dir
