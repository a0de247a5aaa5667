"""Reward-model and DPO benchmark: peak GPU memory and pairs/s of pairwise training on a 4-bit base.

Loads a random-weight checkpoint of a real architecture (benchmarks/shapes.py) through the project's own
4-bit loading path, saves a random-weight `sft` adapter for it, and builds the roles the stage builds from
that adapter: `reward` (LoRA + fresh fp32 score head, trainable) for rm; `policy` (trainable) and its frozen
copy `reference` for dpo. It then runs optimizer steps of the stage's own loss (`rm_loss_sum` or
`dpo_loss_sum`) on random chosen/rejected pairs. Writes one JSON file per run.

    python -m benchmarks.preference_bench --stage dpo --shape llama-3.1-8b --batch 2 --seq 1024 --lora-r 16
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.ppo_bench import LORA_B_STD, make_adapters
from benchmarks.sft_bench import (
    CPU_NOTE,
    CUDA_NOTE,
    GIB,
    _changed,
    _positive,
    _quantized_weights,
    _sync,
    add_common_args,
    timed_steps,
    tracer_record,
    versions,
    write_result,
)
from benchmarks.sft_bench import tracer_argvs as sft_tracer_argvs
from benchmarks.shapes import SPECIAL_TOKENS, build_config, build_random_checkpoint, param_count
from lowmem_rlhf.config import DPOConfig, LoRAConfig, ModelConfig, RewardConfig
from lowmem_rlhf.data.preference import PairExample, collate_pairs
from lowmem_rlhf.model.bank import AdapterBank
from lowmem_rlhf.model.loading import load_base, resolve_device, resolve_dtype
from lowmem_rlhf.stages.dpo import _collate, dpo_loss_sum, reference_logprobs
from lowmem_rlhf.stages.rm import rm_loss_sum
from lowmem_rlhf.tiny.model import cache_root
from lowmem_rlhf.train.runner import build_optimizer

STAGES = ("rm", "dpo")
TRAINED_ROLE = {"rm": "reward", "dpo": "policy"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.preference_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--stage", choices=STAGES, required=True, help="Reward model (rm) or DPO (dpo).")
    p.add_argument("--batch", type=_positive, default=2, help="Preference pairs per optimizer step.")
    p.add_argument(
        "--seq",
        type=_positive,
        default=1024,
        help="Tokens per sequence (chosen and rejected alike); the first half is the shared prompt.",
    )
    p.add_argument("--steps", type=_positive, default=5, help="Timed optimizer steps.")
    p.add_argument(
        "--warmup",
        type=int,
        default=2,
        help="Untimed optimizer steps before the timed ones (allocator and kernel warm-up).",
    )
    p.add_argument("--lr", type=float, default=2e-4, help="Learning rate (constant).")
    p.add_argument(
        "--precompute-ref-logprobs",
        action="store_true",
        help="dpo only: compute the reference log-probs once before training (dpo.precompute_ref_logprobs) "
        "instead of a reference pass in every step.",
    )
    add_common_args(p, "{rm,dpo}", "Seed of the adapters, the score head and the random token ids.")
    args = p.parse_args(argv)
    if args.seq < 2:
        p.error("--seq must be at least 2 (one prompt and one response token)")
    if args.warmup < 0:
        p.error("--warmup must be 0 or more")
    if args.precompute_ref_logprobs and args.stage != "dpo":
        p.error("--precompute-ref-logprobs applies to --stage dpo only")
    return args


def random_pairs(vocab: int, n: int, seq: int, seed: int) -> list[PairExample]:
    """`n` pairs of `seq`-token sequences of random ids, never a special token: chosen and rejected share
    their prompt (the first half) and differ in their response (the second half). Weight 1, margin 0."""
    g = torch.Generator().manual_seed(seed)
    prompt_len = seq // 2
    prompts = torch.randint(len(SPECIAL_TOKENS), vocab, (n, prompt_len), generator=g).tolist()
    responses = torch.randint(len(SPECIAL_TOKENS), vocab, (n, 2, seq - prompt_len), generator=g).tolist()
    return [
        PairExample(p + chosen, p + rejected, prompt_len, prompt_len, 1.0, 0.0)
        for p, (chosen, rejected) in zip(prompts, responses, strict=True)
    ]


def build_bank(stage: str, model: torch.nn.Module, sft_dir: Path, gradient_checkpointing: bool) -> AdapterBank:
    """The roles `stages/rm.py` (rm.init_from: sft) or `stages/dpo.py` puts on the base, from `sft_dir`.

    For dpo, dropout is switched off as `train_dpo` does, so the policy starts equal to the reference.
    """
    bank = AdapterBank(model, gradient_checkpointing=gradient_checkpointing)
    if stage == "rm":
        bank.add_role("reward", from_dir=sft_dir, trainable=True, head=True, fresh_head=True)
    else:
        bank.add_role("policy", from_dir=sft_dir, trainable=True)
        bank.add_role("reference", copy_of="policy")
        bank.disable_dropout()
    return bank


def stage_config(args: argparse.Namespace) -> RewardConfig | DPOConfig:
    """The stage's config section at its defaults, with the benchmark's batch, length and learning rate."""
    common = {
        "learning_rate": args.lr,
        "batch_size": args.batch,
        "gradient_accumulation_steps": 1,
        "lr_scheduler": "constant",
        "warmup_ratio": 0.0,
        "max_length": args.seq,
    }
    if args.stage == "rm":
        return RewardConfig(**common)
    return DPOConfig(**common, precompute_ref_logprobs=args.precompute_ref_logprobs)


def estimate_record(args: argparse.Namespace, peak_gib: float | None) -> dict:
    """`lowmem-rlhf estimate`'s prediction for these settings next to the measured peak (target: within 10%)."""
    from lowmem_rlhf.config import config_from_dict
    from lowmem_rlhf.model.memory import prediction_record

    cfg = config_from_dict(
        {
            "model": {"name_or_path": args.shape, "logprob_chunk_size": args.chunk_size},
            "lora": {"r": args.lora_r, "alpha": 2 * args.lora_r, "dropout": 0.0},
            args.stage: {"batch_size": args.batch, "max_length": args.seq},
        }
    )
    return prediction_record(cfg, args.shape, args.stage, peak_gib)


def _lora_parameters(bank: AdapterBank, role: str) -> list[torch.nn.Parameter]:
    return [p for n, p in bank.named_role_parameters(role).items() if not n.startswith("head.")]


def tracer_argvs(args: argparse.Namespace) -> list[list[str]] | None:
    """`benchmarks.memory`'s arguments for these settings on a GPU (sft_bench's, for rm or dpo), or None for
    settings it does not trace: the tracer runs DPO's reference pass per step, not a precomputed reference."""
    return None if args.precompute_ref_logprobs else sft_tracer_argvs(args, args.stage)


def run(args: argparse.Namespace) -> dict:
    """Build/load the model and the stage's roles, train `warmup + steps` steps, and return the result record."""
    device = resolve_device(args.device)
    on_cuda = device.type == "cuda"
    dtype = resolve_dtype(ModelConfig.compute_dtype, device)
    checkpoint = build_random_checkpoint(args.shape, args.cache_dir or cache_root() / "bench", dtype)
    model_cfg = ModelConfig(
        name_or_path=str(checkpoint),
        quantization="nf4",
        device=str(device),
        attn_implementation=args.attn,
        logprob_chunk_size=args.chunk_size,
    )
    train_cfg = stage_config(args)
    lora = LoRAConfig(r=args.lora_r, alpha=2 * args.lora_r, dropout=0.0)
    role = TRAINED_ROLE[args.stage]

    if on_cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    model, tokenizer = load_base(model_cfg)
    _sync(device)
    load_s = time.perf_counter() - t0
    loaded_gib = torch.cuda.memory_allocated(device) / GIB if on_cuda else None

    with tempfile.TemporaryDirectory(prefix="preference_bench-") as tmp:
        (sft_dir,) = make_adapters(model, lora, Path(tmp), args.seed, roles=("sft",))
        bank = build_bank(args.stage, model, sft_dir, train_cfg.gradient_checkpointing)
    params = bank.trainable_parameters()
    optimizer = build_optimizer(params, train_cfg, device)
    examples = random_pairs(model.config.vocab_size, args.batch, args.seq, args.seed)
    pad_id = tokenizer.pad_token_id

    head, ref, ref_s = None, None, None
    if args.stage == "rm":
        head = bank.head(role)
        batch = {k: v.to(device) for k, v in collate_pairs(examples, pad_id).items()}
    else:
        if train_cfg.precompute_ref_logprobs:
            t0 = time.perf_counter()
            ref = reference_logprobs(bank, examples, pad_id, train_cfg.batch_size, args.chunk_size)
            _sync(device)
            ref_s = time.perf_counter() - t0
        batch = _collate(examples, pad_id, device, ref)
    n_pairs = float(batch["weights"].sum())

    base_weights = _quantized_weights(model)
    base_before = [w.detach().cpu().clone() for w in base_weights]
    lora_params = _lora_parameters(bank, role)
    lora_before = [p.detach().cpu().clone() for p in lora_params]
    frozen = _lora_parameters(bank, "reference") if args.stage == "dpo" else []
    frozen_before = [p.detach().cpu().clone() for p in frozen]
    head_before = [head.linear.weight.detach().cpu().clone()] if head is not None else []

    def step() -> float:
        with bank.use(role, train=True) as m:
            if head is not None:
                loss_sum, _ = rm_loss_sum(m, head, batch, train_cfg.use_margin, train_cfg.center_coef)
            else:
                loss_sum, _ = dpo_loss_sum(bank, m, batch, train_cfg, args.chunk_size)
            loss = loss_sum / n_pairs
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, train_cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    losses, timed_s = timed_steps(step, args.warmup, args.steps, device)

    measurements = {
        "pairs_per_s": args.batch * args.steps / timed_s,
        "tokens_per_s": 2 * args.batch * args.seq * args.steps / timed_s,
        "s_per_step": timed_s / args.steps,
        "timed_s": timed_s,
        "load_s": load_s,
        "reference_precompute_s": ref_s,
        "peak_allocated_gib": torch.cuda.max_memory_allocated(device) / GIB if on_cuda else None,
        "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / GIB if on_cuda else None,
        "model_loaded_allocated_gib": loaded_gib,
        "losses": losses,
        "final_loss": losses[-1],
    }
    checks = {
        "base_weights_unchanged": not any(_changed(base_before, base_weights)),
        "lora_tensors_changed": sum(_changed(lora_before, lora_params)),
        "lora_tensors": len(lora_params),
    }
    if args.stage == "rm":
        checks["head_weight_changed"] = all(_changed(head_before, [head.linear.weight]))
    else:
        checks["reference_unchanged"] = not any(_changed(frozen_before, frozen))
        checks["reference_tensors"] = len(frozen)
    return {
        "benchmark": f"{args.stage}_qlora",
        "stage": args.stage,
        "shape": args.shape,
        "base_params": param_count(build_config(args.shape)),
        "trainable_params": sum(p.numel() for p in params),
        "roles": {name: {"trainable": r.trainable, "head": r.head is not None} for name, r in bank.roles.items()},
        "settings": {
            "batch": args.batch,
            "seq": args.seq,
            "sequences_per_step": 2 * args.batch,
            "steps": args.steps,
            "warmup": args.warmup,
            "pairs": "random ids without special tokens; chosen and rejected share the first half (prompt) "
            "and differ in the second half (response)",
            "adapter_init": f"saved random-weight SFT adapter (LoRA B std {LORA_B_STD})",
            "lora_r": lora.r,
            "lora_alpha": lora.alpha,
            "lora_dropout": lora.dropout,
            "lora_target_modules": lora.target_modules,
            "quantization": model_cfg.quantization,
            "double_quant": model_cfg.double_quant,
            "compute_dtype": str(dtype).removeprefix("torch."),
            "attn_implementation": args.attn,
            "gradient_checkpointing": train_cfg.gradient_checkpointing,
            "optimizer": type(optimizer).__name__,
            "learning_rate": args.lr,
            "max_grad_norm": train_cfg.max_grad_norm,
            "logprob_chunk_size": args.chunk_size,
            "seed": args.seed,
            args.stage: dataclasses.asdict(train_cfg),
        },
        "device": torch.cuda.get_device_name(device) if on_cuda else "cpu",
        "versions": versions(),
        "measurements": measurements,
        "checks": checks,
        "estimate": estimate_record(args, measurements["peak_allocated_gib"]),
        "tracer": tracer_record(tracer_argvs(args), measurements["peak_allocated_gib"]) if on_cuda else None,
        "note": CUDA_NOTE if on_cuda else CPU_NOTE,
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def summary(result: dict, path: Path) -> str:
    """A few human-readable lines about one result."""
    m, s, e = result["measurements"], result["settings"], result["estimate"]

    def gib(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.2f} GiB"

    error = "no measured peak" if e["error"] is None else f"error {e['error']:+.1%}"
    return "\n".join(
        [
            f"{result['benchmark']} {result['shape']} on {result['device']}: {s['batch']} pairs x 2 x "
            f"{s['seq']} tokens, LoRA r={s['lora_r']}, {s['optimizer']}",
            f"  {m['pairs_per_s']:.2f} pairs/s, {m['tokens_per_s']:.1f} tokens/s ({m['s_per_step']:.3f} s/step), "
            f"loss {m['losses'][0]:.4f} -> {m['final_loss']:.4f}",
            f"  peak allocated {gib(m['peak_allocated_gib'])}, peak reserved {gib(m['peak_reserved_gib'])}, "
            f"after loading {gib(m['model_loaded_allocated_gib'])}",
            f"  estimate {gib(e['predicted_allocated_gib'])} ({error})",
            f"  -> {path}",
        ]
    )


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark from command-line arguments, write the JSON and print a summary."""
    args = parse_args(argv)
    result = run(args)
    path = write_result(result, args.out, args.stage, args.shape)
    print(summary(result, path))
    return result


if __name__ == "__main__":
    main()
