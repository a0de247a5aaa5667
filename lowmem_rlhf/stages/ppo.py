"""RL stage: PPO (critic, GAE) or GRPO / RLOO / ReMax, all roles on one frozen 4-bit backbone.

Output `output_dir/ppo/`: the policy adapter (standard PEFT layout; with `critic: shared` its value
head is saved beside it), `value/` (the critic, for `critic: separate`), `metrics.jsonl`,
`samples.jsonl` (prompt/response/reward tables), `eval.json` (held-out reward, judges' scores, length
and EOS rate of the SFT policy before and the RL policy after) and checkpoints.

Rewards: the reward model of the run's rm stage (unless `ppo.reward_model: false`, which needs no rm
stage) plus `ppo.reward_funcs`; `ppo.judges` only score. Functions are loaded by lowmem_rlhf.rewards
and checked against the prompt rows' columns before the model is loaded.
"""

from __future__ import annotations

import logging
import statistics
from pathlib import Path

import torch

from lowmem_rlhf import distributed
from lowmem_rlhf.config import PPOConfig, RecipeConfig
from lowmem_rlhf.data.chat import end_of_turn_ids
from lowmem_rlhf.data.formats import load_rows
from lowmem_rlhf.data.preference import pad_sequences
from lowmem_rlhf.data.prompts import prompt_columns, tokenize_prompts
from lowmem_rlhf.data.sft import collate_sft
from lowmem_rlhf.errors import UserError
from lowmem_rlhf.estimators import ESTIMATORS
from lowmem_rlhf.model.bank import AdapterBank, lora_config
from lowmem_rlhf.model.loading import load_base, load_tokenizer, resolve_device
from lowmem_rlhf.model.memory import check_fits
from lowmem_rlhf.model.scoring import sequence_scores
from lowmem_rlhf.rewards import RewardFunction, load_reward_fns, score_samples
from lowmem_rlhf.rollout.generate import SamplingConfig, generate
from lowmem_rlhf.stages.common import begin_stage, finished_stage_dir, locked_stage, seed_everything, stage_settings
from lowmem_rlhf.train.io import atomic_write_json
from lowmem_rlhf.train.ppo import PPOTrainer
from lowmem_rlhf.train.runner import fingerprint

logger = logging.getLogger(__name__)


def build_rl_bank(
    model, sft_dir: Path, reward_dir: Path | None, pc: PPOConfig, gradient_checkpointing: bool, lora=None
) -> AdapterBank:
    """policy = trainable copy of SFT; reference = frozen SFT; reward = frozen RM + head; value (critic only).

    Without a reward model (`reward_dir` None) there is no reward role, and a separate critic is a fresh
    LoRA (`lora`, a LoRAConfig) with a fresh value head; a shared critic's head starts fresh too.
    """
    bank = AdapterBank(model, gradient_checkpointing=gradient_checkpointing)
    critic = ESTIMATORS[pc.advantage].critic
    shared = critic and pc.critic == "shared"
    bank.add_role("policy", from_dir=sft_dir, trainable=True, head=shared, fresh_head=shared)
    bank.add_role("reference", copy_of="policy", head=False)
    if reward_dir is not None:
        bank.add_role("reward", from_dir=reward_dir, head=True)
    if critic and pc.critic == "separate":
        if reward_dir is not None:
            bank.add_role("value", copy_of="reward", trainable=True, head=True)
        else:
            bank.add_role("value", lora=lora_config(lora), trainable=True, head=True)
    if shared and reward_dir is not None:  # the value head starts from the reward model's score head
        with torch.no_grad():
            bank.head("policy").load_state_dict(bank.head("reward").state_dict())
    return bank


@torch.no_grad()
def sample_report(
    bank: AdapterBank,
    role: str,
    tokenizer,
    prompts: list[list[int]],
    texts: list[str],
    sampling: SamplingConfig,
    seed: int,
    judges: list[RewardFunction],
    columns: dict[str, list],
    source: str,
    batch_size: int = 64,
) -> dict:
    """Mean RM reward (raw, with a reward role), each judge's mean, length and EOS rate of one sample per prompt."""
    rewards, judged, lengths, ended = [], {j.name: [] for j in judges}, [], []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i : i + batch_size]
        gen = generate(bank, role, chunk, sampling, end_of_turn_ids(tokenizer), tokenizer.pad_token_id, seed + i)
        if "reward" in bank.roles:
            ids, mask = pad_sequences(
                [p + r for p, r in zip(chunk, gen.response_ids, strict=True)], tokenizer.pad_token_id
            )
            with bank.use("reward") as m:
                scores = sequence_scores(m, bank.head("reward"), ids.to(bank.device), mask.to(bank.device))
                rewards.extend(scores.tolist())
        responses = [tokenizer.decode(r, skip_special_tokens=True).strip() for r in gen.response_ids]
        index = list(range(i, i + len(chunk)))
        for name, scores in score_samples(judges, texts, columns, index, responses, gen.response_ids, source).items():
            judged[name].extend(s for s in scores if s is not None)
        lengths.extend(len(r) for r in gen.response_ids)
        ended.extend(gen.ended)
    out = {
        "length": statistics.fmean(lengths),
        "eos_rate": sum(ended) / len(ended),
    }
    if rewards:
        out = {"reward": statistics.fmean(rewards), **out}
    out.update({name: statistics.fmean(scores) for name, scores in judged.items() if scores})
    return out


def evaluate_roles(
    bank, tokenizer, prompts, texts, pc: PPOConfig, seed: int, judges, columns, source, roles: dict[str, str]
) -> dict:
    """{label: {greedy: ..., sampled: ...}} for each role, on the same prompts and seeds."""
    greedy = SamplingConfig(pc.max_new_tokens, 0.0)
    sampled = SamplingConfig(pc.max_new_tokens, pc.temperature, pc.top_p, pc.top_k)
    args = (judges, columns, source)
    return {
        label: {
            "greedy": sample_report(bank, role, tokenizer, prompts, texts, greedy, seed, *args),
            "sampled": sample_report(bank, role, tokenizer, prompts, texts, sampled, seed, *args),
        }
        for label, role in roles.items()
    }


@locked_stage
def run(cfg: RecipeConfig, force: bool = False) -> Path:
    """Run (or resume, or skip) the RL stage; returns `output_dir/ppo`."""
    pc = cfg.ppo
    if pc.dataset is None:
        raise UserError("recipe: `ppo.dataset` is not set; point it at a file of RL prompts (see docs/data.md)")
    sft_dir, sft_done = finished_stage_dir(cfg, "sft", "ppo")
    reward_dir, rm_done = finished_stage_dir(cfg, "rm", "ppo") if pc.reward_model else (None, {})
    settings = {**stage_settings(cfg, "ppo"), "sft": sft_done.get("settings"), "rm": rm_done.get("settings")}
    reward_fns = load_reward_fns(pc.reward_funcs)
    judges = load_reward_fns(pc.judges, "judge")
    stage_dir, manifest, done = begin_stage(cfg, "ppo", force, settings)
    if done:
        return stage_dir
    seed_everything(cfg.seed)
    tokenizer = load_tokenizer(cfg.model)
    rows, name = load_rows(pc.dataset, pc.dataset_split)
    prompts, texts, cut = tokenize_prompts(rows, tokenizer, pc.max_prompt_length, name)
    columns = prompt_columns(rows)
    if cut:
        logger.warning("%s: %d prompts were longer than ppo.max_prompt_length and were cut from the left", name, cut)
    for f in reward_fns + judges:
        f.check_call(list(columns))
    eval_prompts, eval_texts, eval_columns, ename = [], [], {}, ""
    if pc.eval_dataset and pc.eval_samples > 0:
        erows, ename = load_rows(pc.eval_dataset, pc.eval_split)
        eval_prompts, eval_texts, _ = tokenize_prompts(erows[: pc.eval_samples], tokenizer, pc.max_prompt_length, ename)
        eval_columns = prompt_columns(erows[: pc.eval_samples])
        for f in judges:
            f.check_call(list(eval_columns))
    ptx = None
    if pc.ptx_coef > 0:
        ptx = _ptx_source(cfg, tokenizer)

    check_fits(cfg, "ppo", resolve_device(cfg.model.device))
    model, tokenizer = load_base(cfg.model, compiled_decoding=pc.compile_generation)
    bank = build_rl_bank(model, sft_dir, reward_dir, pc, pc.gradient_checkpointing, cfg.lora)
    stats = rm_done.get("reward_stats")
    report: dict = {}
    eval_args = (judges, eval_columns, ename)
    if eval_prompts:
        report["sft"] = evaluate_roles(
            bank, tokenizer, eval_prompts, eval_texts, pc, cfg.seed, *eval_args, {"sft": "reference"}
        )["sft"]
        seed_everything(cfg.seed)
    trainer = PPOTrainer(
        bank=bank,
        pc=pc,
        stage_dir=stage_dir,
        prompts=prompts,
        prompt_texts=texts,
        tokenizer=tokenizer,
        seed=cfg.seed,
        settings=settings,
        reward_stats=stats,
        chunk_size=cfg.model.logprob_chunk_size,
        judges=judges,
        ptx_batches=ptx,
        reward_fns=reward_fns,
        prompt_columns=columns,
        prompt_source=name,
    )
    result = trainer.run()
    bank.save_role("policy", stage_dir)
    if trainer.value_role == "value":
        bank.save_role("value", stage_dir / "value")
    if eval_prompts:
        report["ppo"] = evaluate_roles(
            bank, tokenizer, eval_prompts, eval_texts, pc, cfg.seed, *eval_args, {"ppo": "policy"}
        )["ppo"]
        atomic_write_json(stage_dir / "eval.json", report)
        for mode in ("greedy", "sampled"):
            before, after = report["sft"][mode], report["ppo"][mode]
            shown = [k for k in ("reward", *(j.name for j in judges)) if k in before and k in after]
            logger.info(
                "ppo: held-out %s samples (SFT -> %s): %s, length %.1f -> %.1f tokens",
                mode,
                pc.advantage,
                ", ".join(f"{k} {before[k]:+.3f} -> {after[k]:+.3f}" for k in shown) or "no reward model or judge",
                before["length"],
                after["length"],
            )
    manifest.mark_finished(
        "ppo",
        {
            "path": "ppo",
            "steps": result.steps,
            "metrics": result.metrics,
            "eval": report,
            "settings": fingerprint(settings),
        },
    )
    logger.info("ppo: policy adapter saved to %s", stage_dir)
    return stage_dir


def _ptx_source(cfg: RecipeConfig, tokenizer):
    """k -> the k-th SFT batch (deterministic, so PPO-ptx resumes exactly)."""
    from lowmem_rlhf.data.sft import tokenize_sft

    source = cfg.ppo.ptx_dataset or cfg.sft.dataset
    if source is None:
        raise UserError("ppo.ptx_coef > 0 needs SFT data: set ppo.ptx_dataset (or sft.dataset)")
    rows, name = load_rows(source, cfg.sft.dataset_split)
    examples, _ = tokenize_sft(rows, tokenizer, cfg.sft.max_length, name)
    bs = cfg.ppo.micro_batch_size  # global: under N processes each one takes its 1/N of the rows
    first, end = distributed.share(bs)

    def batch(k: int) -> dict:
        g = torch.Generator().manual_seed(cfg.seed * 7919 + k)
        idx = torch.randint(len(examples), (bs,), generator=g).tolist()[first:end]
        return collate_sft([examples[i] for i in idx], tokenizer.pad_token_id)

    return batch
