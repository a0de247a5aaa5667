"""Reward model: a LoRA adapter + fp32 score head on the shared 4-bit base, Bradley-Terry loss.

We reuse our own loop rather than TRL's RewardTrainer: it must weight a K-way ranking's C(K,2) pairs
so each prompt counts once, train on a ranking as one group (its K responses scored once, all
C(K,2) Bradley-Terry terms from those K scores: K forwards instead of K(K-1), as InstructGPT does),
read the score at the last real token whatever the padding (pitfall 3), save the fp32 head beside a
standard PEFT adapter (pitfall 8), and resume exactly like every stage.

Output `output_dir/reward/`: the adapter, `head.safetensors`, `reward_stats.json` (mean/std of
training-set rewards, for PPO's reward normalisation), `diagnostics.json` and `metrics.jsonl`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from lowmem_rlhf import distributed
from lowmem_rlhf.config import RecipeConfig, RewardConfig
from lowmem_rlhf.data.preference import GroupExample, collate_groups, load_group_examples, pad_sequences
from lowmem_rlhf.errors import UserError
from lowmem_rlhf.model.bank import AdapterBank, lora_config
from lowmem_rlhf.model.loading import load_base, load_tokenizer, resolve_device
from lowmem_rlhf.model.memory import check_fits
from lowmem_rlhf.model.scoring import sequence_scores
from lowmem_rlhf.ops.preference import bradley_terry_loss, pairwise_accuracy, pearson
from lowmem_rlhf.progress import Progress
from lowmem_rlhf.stages.common import begin_stage, finished_stage_dir, locked_stage, seed_everything, stage_settings
from lowmem_rlhf.train.io import atomic_write_json
from lowmem_rlhf.train.loop import TrainLoop
from lowmem_rlhf.train.runner import LoopResult, fingerprint

logger = logging.getLogger(__name__)

ROLE = "reward"
STATS_FILE = "reward_stats.json"


def pair_scores(model, head, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Every sequence of the batch scored once, then read out per pair: (chosen, rejected), each (pairs,)."""
    scores = sequence_scores(model, head, batch["input_ids"], batch["attention_mask"])
    return scores[batch["chosen_index"]], scores[batch["rejected_index"]]


def rm_loss_sum(model, head, batch: dict, use_margin: bool, center_coef: float) -> tuple[torch.Tensor, dict]:
    """Weighted sum of per-pair Bradley-Terry losses over a `collate_groups` (or `collate_pairs`) batch."""
    chosen, rejected = pair_scores(model, head, batch)
    w = batch["weights"]
    loss = bradley_terry_loss(chosen, rejected, batch["margins"] if use_margin else None, center_coef)
    metrics = {
        "accuracy": float((pairwise_accuracy(chosen, rejected) * w).sum()),
        "margin": float(((chosen - rejected).detach() * w).sum()),
    }
    return (loss * w).sum(), metrics


@torch.no_grad()
def evaluate_pairs(bank: AdapterBank, role: str, examples: list[GroupExample], pad_id: int, batch_size: int) -> dict:
    """Held-out diagnostics: pairwise accuracy, mean margin (both weighted like the loss), score spread, length bias."""
    head = bank.head(role)
    chosen, rejected, all_scores, all_lengths, losses, weights = [], [], [], [], [], []
    with bank.use(role) as model, Progress("rm: held-out evaluation", len(examples), "prompts", logger) as progress:
        for i in range(0, len(examples), batch_size):
            group = examples[i : i + batch_size]
            batch = {k: v.to(bank.device) for k, v in collate_groups(group, pad_id).items()}
            scores = sequence_scores(model, head, batch["input_ids"], batch["attention_mask"]).cpu()
            c, r = scores[batch["chosen_index"].cpu()], scores[batch["rejected_index"].cpu()]
            chosen.append(c)
            rejected.append(r)
            all_scores.append(scores)
            all_lengths.append(batch["response_lengths"].cpu())
            losses.append(bradley_terry_loss(c, r))
            weights.append(batch["weights"].cpu())
            progress.update(len(group))
    c, r, w = torch.cat(chosen), torch.cat(rejected), torch.cat(weights)
    scores, lengths = torch.cat(all_scores), torch.cat(all_lengths)
    # loss, accuracy and margin are all weighted like training: a ranking's C(K, 2) pairs share one prompt's weight;
    # the score spread and the length correlation are over the distinct responses
    return {
        "eval_loss": float((torch.cat(losses) * w).sum() / w.sum()),
        "eval_accuracy": float((pairwise_accuracy(c, r) * w).sum() / w.sum()),
        "eval_margin": float(((c - r) * w).sum() / w.sum()),
        "eval_score_mean": float(scores.mean()),
        "eval_score_std": float(scores.std()),
        "eval_length_corr": float(pearson(scores, lengths.float())),
        "eval_pairs": len(c),
    }


@torch.no_grad()
def reward_stats(
    bank: AdapterBank, role: str, examples: list[GroupExample], pad_id: int, batch_size: int, n: int
) -> dict:
    """Mean/std of the trained reward over (up to n) distinct training responses, for PPO's normalisation."""
    seqs = list(dict.fromkeys(tuple(s) for e in examples for s in e.seqs))[:n]
    head = bank.head(role)
    scores = []
    with bank.use(role) as model, Progress("rm: reward statistics", len(seqs), "responses", logger) as progress:
        for i in range(0, len(seqs), batch_size):
            ids, mask = pad_sequences([list(s) for s in seqs[i : i + batch_size]], pad_id)
            scores.append(sequence_scores(model, head, ids.to(bank.device), mask.to(bank.device)).cpu())
            progress.update(len(ids))
    s = torch.cat(scores)
    return {"mean": float(s.mean()), "std": float(s.std()) if len(s) > 1 else 1.0, "n": len(s)}


def train_reward(
    bank: AdapterBank,
    rc: RewardConfig,
    stage_dir: Path,
    train: list[GroupExample],
    evals: list[GroupExample],
    pad_id: int,
    seed: int,
    settings: dict,
    role: str = ROLE,
) -> tuple[LoopResult, dict]:
    """Train `role` (adapter + head) on groups of weighted pairs (`rc.batch_size` groups, i.e. prompts, per
    micro-batch); returns the loop result and the final diagnostics."""
    device, head = bank.device, bank.head(role)

    def collate(examples):
        return {k: v.to(device) for k, v in collate_groups(examples, pad_id).items()}

    def eval_fn(bank: AdapterBank) -> dict:
        return evaluate_pairs(bank, role, evals, pad_id, distributed.per_device(rc.batch_size))

    loop = TrainLoop(
        name="rm",
        bank=bank,
        role=role,
        cfg=rc,
        stage_dir=stage_dir,
        dataset=train,
        collate=collate,
        loss_fn=lambda m, b: rm_loss_sum(m, head, b, rc.use_margin, rc.center_coef),
        weight_fn=lambda b: float(b["weights"].sum()),
        seed=seed,
        eval_fn=eval_fn if evals else None,
        settings=settings,
    )
    result = loop.run()
    # the loop evaluates after its last step; those are the final diagnostics
    diagnostics = {k: v for k, v in result.metrics.items() if k.startswith("eval_")}
    return result, diagnostics


@locked_stage
def run(cfg: RecipeConfig, force: bool = False) -> Path:
    """Run (or resume, or skip) the reward-model stage; returns `output_dir/reward`."""
    rc = cfg.rm
    if rc.dataset is None:
        raise UserError("recipe: `rm.dataset` is not set; point it at your preference data (see docs/data.md)")
    settings = stage_settings(cfg, "rm")
    sft_dir = None
    if rc.init_from == "sft":
        sft_dir, sft_done = finished_stage_dir(cfg, "sft", "rm")
        settings["sft"] = sft_done.get("settings")
    stage_dir, manifest, done = begin_stage(cfg, "rm", force, settings)
    if done:
        return stage_dir
    seed_everything(cfg.seed)
    tokenizer = load_tokenizer(cfg.model)
    train = load_group_examples(rc.dataset, rc.dataset_split, tokenizer, rc.max_length, rc.max_samples, "rm")
    evals = (
        load_group_examples(rc.eval_dataset, rc.eval_split, tokenizer, rc.max_length, None, "rm")
        if rc.eval_dataset
        else []
    )
    logger.info(
        "rm: %d training prompts (%d pairs, %d responses), %d held-out prompts",
        len(train),
        sum(len(e.pairs) for e in train),
        sum(len(e.seqs) for e in train),
        len(evals),
    )

    check_fits(cfg, "rm", resolve_device(cfg.model.device))
    model, tokenizer = load_base(cfg.model)
    bank = AdapterBank(model, gradient_checkpointing=rc.gradient_checkpointing)
    if sft_dir is not None:
        bank.add_role(ROLE, from_dir=sft_dir, trainable=True, head=True, fresh_head=True)
    else:
        bank.add_role(ROLE, lora=lora_config(cfg.lora), trainable=True, head=True)

    result, diagnostics = train_reward(bank, rc, stage_dir, train, evals, tokenizer.pad_token_id, cfg.seed, settings)
    bank.save_role(ROLE, stage_dir)
    stats = reward_stats(
        bank, ROLE, train, tokenizer.pad_token_id, distributed.per_device(rc.batch_size), rc.stats_samples
    )
    atomic_write_json(stage_dir / STATS_FILE, stats)
    atomic_write_json(stage_dir / "diagnostics.json", diagnostics)
    manifest.mark_finished(
        "rm",
        {
            "path": "reward",
            "steps": result.steps,
            "metrics": result.metrics,
            "diagnostics": diagnostics,
            "reward_stats": stats,
            "settings": fingerprint(settings),
        },
    )
    if diagnostics:
        logger.info(
            "rm: held-out accuracy %.1f%% on %d pairs, mean margin %.3f, score std %.3f, "
            "reward-length correlation %+.3f",
            100 * diagnostics["eval_accuracy"],
            diagnostics["eval_pairs"],
            diagnostics["eval_margin"],
            diagnostics["eval_score_std"],
            diagnostics["eval_length_corr"],
        )
    logger.info(
        "rm: adapter and score head saved to %s (reward mean %.3f, std %.3f)", stage_dir, stats["mean"], stats["std"]
    )
    return stage_dir
