"""DPO: the policy adapter, started from SFT, against a frozen copy of the SFT adapter on one base.

We reuse our loop rather than TRL's DPOTrainer: the same weighted preference pairs as the reward
model (a K-way ranking's pairs share one prompt's weight), the one chat rendering, chunked log-probs,
and the checkpoints that resume bit for bit. Dropout is off (as TRL does by default), so at step 0
the policy equals the reference exactly: the loss is log 2 and the implicit rewards are 0.

Output `output_dir/dpo/`: the policy adapter, `metrics.jsonl` (loss, preference accuracy, margins,
chosen/rejected log-probs and rewards), `diagnostics.json` (held-out numbers and the KL of samples
to the reference, also logged at every evaluation), checkpoints.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from lowmem_rlhf import distributed
from lowmem_rlhf.config import DPOConfig, RecipeConfig
from lowmem_rlhf.data.chat import end_of_turn_ids
from lowmem_rlhf.data.preference import PairExample, collate_pairs, load_pair_examples
from lowmem_rlhf.errors import UserError
from lowmem_rlhf.model.bank import AdapterBank
from lowmem_rlhf.model.forward import response_logprob_sums, token_logprobs
from lowmem_rlhf.model.loading import load_base, load_tokenizer, resolve_device
from lowmem_rlhf.model.memory import check_fits
from lowmem_rlhf.ops import dpo_loss, pairwise_accuracy
from lowmem_rlhf.progress import Progress
from lowmem_rlhf.rollout.generate import SamplingConfig, generate
from lowmem_rlhf.stages.common import begin_stage, finished_stage_dir, locked_stage, seed_everything, stage_settings
from lowmem_rlhf.train.io import atomic_write_json
from lowmem_rlhf.train.loop import TrainLoop
from lowmem_rlhf.train.runner import LoopResult, fingerprint

logger = logging.getLogger(__name__)


def sequence_logprobs(model, batch: dict, chunk_size: int) -> torch.Tensor:
    """(2n,) summed log-probs of each sequence's response tokens (EOS included)."""
    logprobs = token_logprobs(model, batch["input_ids"], batch["attention_mask"], chunk_size)
    return (logprobs * batch["response_mask"][:, 1:]).sum(1)


def dpo_loss_sum(bank: AdapterBank, model, batch: dict, dc: DPOConfig, chunk: int) -> tuple[torch.Tensor, dict]:
    """Weighted sum of per-pair DPO losses; the reference pass runs on the frozen SFT copy."""
    n = batch["weights"].shape[0]
    policy = sequence_logprobs(model, batch, chunk)
    if "ref_logps" in batch:
        ref = batch["ref_logps"]
    else:
        with torch.no_grad(), bank.use("reference") as ref_model:
            ref = sequence_logprobs(ref_model, batch, chunk)
    lengths = batch["response_mask"][:, 1:].sum(1).clamp(min=1)
    summed = policy
    per_token = dc.loss_type == "ipo" if dc.length_normalize == "auto" else dc.length_normalize
    losses, r_chosen, r_rejected = dpo_loss(
        policy[:n],
        policy[n:],
        ref[:n],
        ref[n:],
        dc.beta,
        dc.loss_type,
        dc.label_smoothing,
        *((lengths[:n], lengths[n:]) if per_token else ()),
    )
    w = batch["weights"]
    if dc.sft_coef > 0:  # RPO: the chosen responses' NLL per token keeps their likelihood from falling
        if dc.sft_average == "sequence":  # each chosen response's mean NLL (the RPO paper)
            nll = -summed[:n] / lengths[:n]
        else:  # "tokens": over every chosen token of the batch, pooled (TRL), each pair's tokens by its weight
            nll = -(summed[:n] * w).sum() / (lengths[:n] * w).sum()
        losses = losses + dc.sft_coef * nll
    metrics = {
        "accuracy": float((pairwise_accuracy(r_chosen, r_rejected) * w).sum()),
        "margin": float(((r_chosen - r_rejected) * w).sum()),
        "reward_chosen": float((r_chosen * w).sum()),
        "reward_rejected": float((r_rejected * w).sum()),
        "logp_chosen": float((summed[:n].detach() * w).sum()),
        "logp_rejected": float((summed[n:].detach() * w).sum()),
    }
    return (losses * w).sum(), metrics


def _collate(examples: list[PairExample], pad_id: int, device, ref: dict[int, torch.Tensor] | None) -> dict:
    batch = {k: v.to(device) for k, v in collate_pairs(examples, pad_id).items()}
    if ref is not None:
        pairs = torch.stack([ref[id(e)] for e in examples]).to(device)  # (n, 2): chosen, rejected
        batch["ref_logps"] = torch.cat([pairs[:, 0], pairs[:, 1]])
    return batch


@torch.no_grad()
def reference_logprobs(bank: AdapterBank, examples: list[PairExample], pad_id: int, bs: int, chunk: int) -> dict:
    """{id(example): tensor([ref logp chosen, ref logp rejected])}, computed once.

    `bs` is one process's batch size; under N processes each computes 1/N of the examples and every
    process gets all of them.
    """
    d = distributed.state()
    per = -(-len(examples) // d.world)
    first = min(d.rank * per, len(examples))
    mine = examples[first : first + per]
    pairs = []
    with bank.use("reference") as m, Progress("dpo: reference log-probs", len(mine), "pairs", logger) as progress:
        for i in range(0, len(mine), bs):
            chunk_ex = mine[i : i + bs]
            lp = sequence_logprobs(m, _collate(chunk_ex, pad_id, bank.device, None), chunk).cpu()
            pairs += [torch.stack([lp[j], lp[len(chunk_ex) + j]]) for j in range(len(chunk_ex))]
            progress.update(len(chunk_ex))
    if d.enabled:
        pairs = [p for part in distributed.all_gather_object(pairs) for p in part]
    return {id(e): p for e, p in zip(examples, pairs, strict=True)}


@torch.no_grad()
def evaluate_dpo(bank: AdapterBank, examples: list[PairExample], pad_id: int, dc: DPOConfig, chunk: int) -> dict:
    sums, total = {}, 0.0
    bs = distributed.per_device(dc.batch_size)  # every process evaluates the whole set, at its own batch size
    with Progress("dpo: held-out evaluation", len(examples), "pairs", logger) as progress:
        for i in range(0, len(examples), bs):
            part = examples[i : i + bs]
            batch = _collate(part, pad_id, bank.device, None)
            with bank.use("policy") as m:
                loss, metrics = dpo_loss_sum(bank, m, batch, dc, chunk)
            total += float(batch["weights"].sum())
            for k, v in {"loss": float(loss), **metrics}.items():
                sums[k] = sums.get(k, 0.0) + v
            progress.update(len(part))
    return {f"eval_{k}": v / total for k, v in sums.items()}


@torch.no_grad()
def sample_kl(bank: AdapterBank, tokenizer, prompts: list[list[int]], dc: DPOConfig, chunk: int, seed: int) -> dict:
    """Mean over sampled responses of sum_t log pi - log ref: the KL of the policy's samples to the reference.

    One sampling call and one log-prob pass per role over all prompts (splitting them would draw other samples),
    so the progress counts those passes.
    """
    roles = ("policy", "reference")
    with Progress(f"dpo: KL of {len(prompts)} samples to the reference", 1 + len(roles), "passes", logger) as progress:
        gen = generate(
            bank,
            "policy",
            prompts,
            SamplingConfig(dc.max_new_tokens, 1.0),
            end_of_turn_ids(tokenizer),
            tokenizer.pad_token_id,
            seed,
        )
        progress.update()
        lp = {}
        for role in roles:
            with bank.use(role) as m:
                lp[role] = response_logprob_sums(m, prompts, gen.response_ids, tokenizer.pad_token_id, chunk)
            progress.update()
    kl = lp["policy"] - lp["reference"]
    return {
        "sample_kl": float(kl.mean()),
        "sample_length": sum(len(r) for r in gen.response_ids) / len(gen.response_ids),
        "sample_eos_rate": sum(gen.ended) / len(gen.ended),
    }


def train_dpo(
    bank: AdapterBank,
    dc: DPOConfig,
    stage_dir: Path,
    train: list[PairExample],
    evals: list[PairExample],
    pad_id: int,
    seed: int,
    settings: dict,
    chunk: int,
    kl_prompts: list[list[int]] | None = None,
    tokenizer=None,
) -> LoopResult:
    """Train the `policy` role against the frozen `reference` role.

    Each evaluation scores the held-out pairs and, given `kl_prompts`, samples them to log the
    policy's KL to the reference (`sample_kl`), so the KL can be followed over training.
    """
    bank.disable_dropout()
    bs = distributed.per_device(dc.batch_size)
    ref = reference_logprobs(bank, train, pad_id, bs, chunk) if dc.precompute_ref_logprobs else None

    def evaluate(bank: AdapterBank) -> dict:
        out = evaluate_dpo(bank, evals, pad_id, dc, chunk) if evals else {}
        if kl_prompts:
            out.update(sample_kl(bank, tokenizer, kl_prompts, dc, chunk, seed))
        return out

    loop = TrainLoop(
        name="dpo",
        bank=bank,
        role="policy",
        cfg=dc,
        stage_dir=stage_dir,
        dataset=train,
        collate=lambda ex: _collate(ex, pad_id, bank.device, ref),
        loss_fn=lambda m, b: dpo_loss_sum(bank, m, b, dc, chunk),
        weight_fn=lambda b: float(b["weights"].sum()),
        seed=seed,
        eval_fn=evaluate if evals or kl_prompts else None,
        settings=settings,
    )
    return loop.run()


@locked_stage
def run(cfg: RecipeConfig, force: bool = False) -> Path:
    """Run (or resume, or skip) the DPO stage; returns `output_dir/dpo`."""
    dc = cfg.dpo
    if dc.dataset is None:
        raise UserError("recipe: `dpo.dataset` is not set; point it at your preference data (see docs/data.md)")
    sft_dir, sft_done = finished_stage_dir(cfg, "sft", "dpo")
    settings = {**stage_settings(cfg, "dpo"), "sft": sft_done.get("settings")}
    stage_dir, manifest, done = begin_stage(cfg, "dpo", force, settings)
    if done:
        return stage_dir
    seed_everything(cfg.seed)
    tokenizer = load_tokenizer(cfg.model)
    train = load_pair_examples(dc.dataset, dc.dataset_split, tokenizer, dc.max_length, dc.max_samples, "dpo")
    evals = (
        load_pair_examples(dc.eval_dataset, dc.eval_split, tokenizer, dc.max_length, None, "dpo")
        if dc.eval_dataset
        else []
    )
    check_fits(cfg, "dpo", resolve_device(cfg.model.device))
    model, tokenizer = load_base(cfg.model)
    bank = AdapterBank(model, gradient_checkpointing=dc.gradient_checkpointing)
    bank.add_role("policy", from_dir=sft_dir, trainable=True)
    bank.add_role("reference", copy_of="policy")
    chunk = cfg.model.logprob_chunk_size
    kl_prompts = None
    if dc.kl_samples > 0:
        source = evals or train
        unique = dict.fromkeys(tuple(e.chosen_ids[: e.chosen_prompt_len]) for e in source)
        kl_prompts = [list(p) for p in unique][: dc.kl_samples]
    result = train_dpo(
        bank, dc, stage_dir, train, evals, tokenizer.pad_token_id, cfg.seed, settings, chunk, kl_prompts, tokenizer
    )
    bank.save_role("policy", stage_dir)
    # Evaluated after the last step: held-out pair metrics and the KL of samples to the reference.
    diagnostics = {k: v for k, v in result.metrics.items() if k.startswith(("eval_", "sample_"))}
    atomic_write_json(stage_dir / "diagnostics.json", diagnostics)
    manifest.mark_finished(
        "dpo",
        {
            "path": "dpo",
            "steps": result.steps,
            "metrics": result.metrics,
            "diagnostics": diagnostics,
            "settings": fingerprint(settings),
        },
    )
    if diagnostics:
        logger.info("dpo: %s", ", ".join(f"{k}={v:.4g}" for k, v in diagnostics.items()))
    logger.info("dpo: policy adapter saved to %s", stage_dir)
    return stage_dir
