"""TRL GRPO benchmark: peak GPU memory and seconds per GRPO iteration of TRL's GRPOTrainer with QLoRA.

The same random-weight model (benchmarks/shapes.py), prompts and settings as our GRPO run
(`python -m benchmarks.ppo_bench --advantage grpo --group-size G --mode shared`), trained the way a TRL user
would on one GPU: the policy is the 4-bit NF4 base (loaded by our `load_base`, so both sides load it
identically) with a fresh LoRA that `GRPOTrainer` adds from a peft `LoraConfig`; the reward model is a
second, separately loaded 4-bit `AutoModelForSequenceClassification` (num_labels=1) with its own LoRA,
passed as `reward_funcs`; generation is plain `transformers` generate (no vLLM). One GRPO iteration is
`--prompts` x `--group-size` sampled completions, then one optimizer step per `--micro-batch` of them
(`steps_per_generation` steps, no gradient accumulation), as our mini-batch = micro-batch. `--with-ours`
runs our side first and writes both, with a `comparison` block. On CUDA exactly one GPU must be visible
(CUDA_VISIBLE_DEVICES): TRL's Trainer works on GPU 0 and GRPOTrainer refuses nn.DataParallel.

What differs from our run, by construction of the two libraries:

- reference: TRL takes the base with the policy's adapter disabled; ours is the frozen SFT adapter. Same
  passes over the same base, different weights (ours also runs the LoRA matmuls).
- reward: TRL's reward model holds a second copy of the 4-bit base and scores all prompts x group-size
  sequences in one forward, from text (completions decoded, prompt + completion re-tokenized); ours is a
  LoRA role + head on the one base, scored from ids in micro-batches.
- KL: TRL adds beta * per-token k3 KL to the loss; ours folds beta * summed k1 KL into the sequence reward
  before the group normalisation. Both compute reference log-probs once per iteration.
- old log-probs: TRL computes them in a no-grad pass only when an iteration has more than one optimizer
  step (`--prompts` x `--group-size` > `--micro-batch`), otherwise it reuses the detached new ones; ours
  always runs that pass.
- TRL's loss pass also computes the per-token entropy; TRL keeps the policy's LoRA weights in bf16 on a
  4-bit base (and so on CPU too); on CUDA the Trainer runs under bf16 autocast; the policy starts from a
  fresh LoRA (B = 0), ours from the SFT adapter.
- log-probs: TRL's fused LM head picks its own tiles; `--chunk-size` only reaches our side.

    python -m benchmarks.trl_grpo_bench --shape llama-3.1-8b --prompts 16 --group-size 4 --prompt-len 256 \
        --new-tokens 256 --micro-batch 4 --steps 2 --lora-r 16 --with-ours
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import tempfile
import time
from collections.abc import Callable, Iterator
from importlib.metadata import version
from pathlib import Path
from unittest import mock

import torch
from transformers import TrainerCallback

from benchmarks import ppo_bench
from benchmarks.ppo_bench import LORA_B_STD, MemoryMeter, random_prompts
from benchmarks.sft_bench import (
    _changed,
    _positive,
    _quantized_weights,
    _sync,
    add_common_args,
    versions,
    write_result,
)
from benchmarks.shapes import SHAPES, build_config, build_random_checkpoint, param_count
from lowmem_rlhf.config import LoRAConfig, ModelConfig, PPOConfig
from lowmem_rlhf.model.bank import lora_config
from lowmem_rlhf.model.loading import (
    _keep_cpu_4bit_differentiable,
    load_base,
    quantization_config,
    resolve_device,
    resolve_dtype,
)
from lowmem_rlhf.tiny.model import cache_root

BENCHMARK = "trl_grpo"
CPU_NOTE = (
    "CPU smoke test only: torch keeps no peak-memory statistics on CPU, so the memory fields and the memory "
    "ratio are null; CPU times say nothing about GPU times."
)
CUDA_NOTE = (
    "Memory is torch's allocator (max_memory_allocated/reserved from before loading the policy base to the end "
    "of the last step); the paged 8-bit optimizer state lives in CUDA unified memory, which these counters do not "
    "include. generation_s includes the prefill of the prompts."
)
REWARD_NOTE = (
    "The reward model is the 4-bit sequence-classification model with a LoRA adapter (random B, std "
    f"{LORA_B_STD}) wrapped as a peft PeftModel, as a QLoRA-trained reward model is loaded. GRPOTrainer only "
    "sets up the tokenizer of reward models that are transformers PreTrainedModels, so the tokenizer is passed "
    "in reward_processing_classes."
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.trl_grpo_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=_positive, default=16, help="Prompts per GRPO iteration.")
    p.add_argument(
        "--group-size",
        type=_positive,
        default=PPOConfig.group_size,
        help="Completions sampled per prompt (TRL's num_generations, our ppo.group_size); at least 2.",
    )
    p.add_argument("--prompt-len", type=_positive, default=256, help="Tokens per prompt (random ids, no padding).")
    p.add_argument(
        "--new-tokens", type=_positive, default=256, help="Longest completion generated (max_completion_length)."
    )
    p.add_argument(
        "--micro-batch",
        type=_positive,
        default=4,
        help="Sequences per forward/backward and per optimizer step (TRL's per_device_train_batch_size, no "
        "gradient accumulation); must divide prompts x group-size.",
    )
    p.add_argument("--steps", type=_positive, default=2, help="Timed GRPO iterations (generation + updates).")
    p.add_argument(
        "--warmup",
        type=int,
        default=1,
        help="Untimed GRPO iterations before the timed ones (allocator and kernel warm-up; still in the peak).",
    )
    p.add_argument(
        "--kl-coef",
        type=float,
        default=PPOConfig.kl_coef,
        help="KL coefficient beta (TRL's beta, our ppo.kl_coef); non-zero makes TRL compute reference log-probs, as "
        "ours always does.",
    )
    p.add_argument(
        "--with-ours",
        action="store_true",
        help="First run our GRPO (benchmarks.ppo_bench --advantage grpo --mode shared) with the same settings, "
        "free it, then run TRL, and write both with a comparison.",
    )
    add_common_args(p, "trl_grpo", "Seed of the prompts, the LoRA initialisations and the sampling.")
    args = p.parse_args(argv)
    if args.warmup < 0:
        p.error("--warmup must be 0 or more")
    if args.group_size < 2:
        p.error("--group-size must be at least 2 (GRPO normalises rewards within each group)")
    if args.prompts * args.group_size % args.micro_batch:
        p.error("--micro-batch must divide --prompts x --group-size (TRL splits each generation batch evenly)")
    if args.kl_coef < 0:
        p.error("--kl-coef must be 0 or more")
    if args.device not in ("auto", "cpu", "cuda", "cuda:0") or (args.device != "cpu" and torch.cuda.device_count() > 1):
        p.error(
            "--device: TRL's Trainer puts its inputs on GPU 0 and GRPOTrainer refuses several visible GPUs; make one "
            "visible with CUDA_VISIBLE_DEVICES=N and use --device cuda (or auto, or cpu)"
        )
    return args


# ---------------------------------------------------------------------------------------------------- measuring


class IterationProbe(TrainerCallback):
    """Times each GRPO iteration of a GRPOTrainer and reads its peak memory per phase.

    One iteration is `steps_per_generation` optimizer steps: the first one's `training_step` generates and scores
    the whole batch (TRL's `_generate_and_score_completions`: generate, old and reference log-probs, reward,
    advantages), every step then trains on its slice. Phases: `load` (models, trainer, train()'s setup), `rollout`
    (generate and score), `update` (the rest of the iteration). The policy's `generate` is timed on its own.
    """

    def __init__(self, trainer, meter: MemoryMeter, device: torch.device, warmup: int):
        self.trainer, self.meter, self.device, self.warmup = trainer, meter, device, warmup
        self.per_iteration = trainer.args.steps_per_generation
        self.steps: list[dict] = []
        self.t0 = self.rollout_s = self.generation_s = 0.0
        self.tokens = self.longest = 0
        self.metric_counts: dict[str, int] = {}

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """The probe as the trainer's callback, with the trainer's rollout and the policy's `generate` timed."""
        self.trainer.add_callback(self)
        rollout, generate = self.trainer._generate_and_score_completions, self.trainer.model.generate
        with (
            mock.patch.object(self.trainer, "_generate_and_score_completions", self._timed_rollout(rollout)),
            mock.patch.object(self.trainer.model, "generate", self._timed_generate(generate)),
        ):
            yield

    def _timed_rollout(self, rollout: Callable[[list], dict]) -> Callable[[list], dict]:
        def timed(inputs: list) -> dict:
            _sync(self.device)
            t0 = time.perf_counter()
            with self.meter.phase("rollout"):
                out = rollout(inputs)
                _sync(self.device)
            self.rollout_s = time.perf_counter() - t0
            lengths = out["completion_mask"].sum(1)  # generated tokens up to and including EOS
            self.tokens, self.longest = int(lengths.sum()), int(lengths.max())
            return out

        return timed

    def _timed_generate(self, generate: Callable) -> Callable:
        def timed(*args, **kwargs):
            _sync(self.device)
            t0 = time.perf_counter()
            out = generate(*args, **kwargs)
            _sync(self.device)
            self.generation_s += time.perf_counter() - t0
            return out

        return timed

    def on_train_begin(self, args, state, control, **kwargs) -> None:
        with self.meter.phase("load"):  # train()'s own setup (dataloader, optimizer) counts as loading
            pass

    def on_step_begin(self, args, state, control, **kwargs) -> None:
        if state.global_step % self.per_iteration:
            return
        self.metric_counts = {k: len(v) for k, v in self.trainer._metrics["train"].items()}
        self.generation_s = 0.0
        _sync(self.device)
        self.t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs) -> None:
        if state.global_step % self.per_iteration:
            return
        _sync(self.device)
        seconds = time.perf_counter() - self.t0
        with self.meter.phase("update"):  # the peak since the rollout ended: the optimizer steps
            pass
        metrics = {}
        for k, v in self.trainer._metrics["train"].items():
            new = v[self.metric_counts.get(k, 0) :]
            if new:
                metrics[k] = sum(new) / len(new)
        iteration = len(self.steps)
        self.steps.append(
            {
                "step": iteration,
                "timed": iteration >= self.warmup,
                "global_step": state.global_step,
                "s": seconds,
                "rollout_s": self.rollout_s,
                "generation_s": self.generation_s,
                "update_s": seconds - self.rollout_s,
                "generated_tokens": self.tokens,
                "longest_response": self.longest,
                "metrics": metrics,
            }
        )


# ---------------------------------------------------------------------------------------------------- the TRL run


def prompt_texts(prompts: list[list[int]], tokenizer) -> list[str]:
    """Prompts as text that the checkpoint's word-level tokenizer turns back into exactly these ids.

    Each ends with a space: TRL scores `prompt + completion` text, and the space keeps the last prompt word and
    the first completion word apart.
    """
    return [" ".join(tokenizer.convert_ids_to_tokens(ids)) + " " for ids in prompts]


def load_reward_model(model_cfg: ModelConfig, lora: LoRAConfig, dtype: torch.dtype, seed: int):
    """The reward model as a TRL user loads a QLoRA-trained one: 4-bit sequence classifier + LoRA, frozen.

    The 4-bit layers take the same kernels as the policy's base from `load_base` (on CPU, bitsandbytes would
    otherwise repack them for a faster inference-only kernel that our reward role does not get).
    """
    from peft import get_peft_model
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(
        model_cfg.name_or_path,
        num_labels=1,
        quantization_config=quantization_config(model_cfg, dtype),
        dtype=dtype,
        device_map={"": model_cfg.device},
        attn_implementation=model_cfg.attn_implementation,
    )
    _keep_cpu_4bit_differentiable(model)
    torch.manual_seed(seed)
    model = get_peft_model(model, lora_config(lora, task_type="SEQ_CLS"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=LORA_B_STD)
    model.requires_grad_(False)
    return model.eval()


def grpo_config(args: argparse.Namespace, device: torch.device, dtype: torch.dtype, output_dir: str):
    """GRPOConfig for one GRPO iteration per `prompts * group_size` completions, one optimizer step per micro-batch."""
    from trl import GRPOConfig

    on_cuda = device.type == "cuda"
    steps_per_iteration = args.prompts * args.group_size // args.micro_batch
    return GRPOConfig(
        output_dir=output_dir,
        num_generations=args.group_size,
        per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=1,
        steps_per_generation=steps_per_iteration,
        num_iterations=1,
        max_steps=(args.warmup + args.steps) * steps_per_iteration,
        max_completion_length=args.new_tokens,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        beta=args.kl_coef,
        learning_rate=PPOConfig.learning_rate,
        lr_scheduler_type="constant",
        max_grad_norm=PPOConfig.max_grad_norm,
        weight_decay=PPOConfig.weight_decay,
        optim="paged_adamw_8bit" if on_cuda else "adamw_torch",
        gradient_checkpointing=True,
        disable_dropout=True,
        bf16=on_cuda and dtype == torch.bfloat16,
        fp16=on_cuda and dtype == torch.float16,
        use_cpu=not on_cuda,
        seed=args.seed,
        report_to="none",
        logging_strategy="no",
        save_strategy="no",
        eval_strategy="no",
        disable_tqdm=True,
    )


def run_trl(args: argparse.Namespace, model_cfg: ModelConfig, lora: LoRAConfig, dtype: torch.dtype) -> tuple:
    """GRPOTrainer for `warmup + steps` iterations; returns (measurements, checks, settings of the GRPOConfig)."""
    from datasets import Dataset
    from trl import GRPOTrainer

    device = torch.device(model_cfg.device)
    meter = MemoryMeter(device)
    with tempfile.TemporaryDirectory(prefix="trl_grpo_bench-") as tmp:
        with meter.phase("load"):
            t0 = time.perf_counter()
            model, tokenizer = load_base(model_cfg)
            model_loaded_gib = meter.allocated_gib()
            reward_model = load_reward_model(model_cfg, lora, dtype, args.seed)
            prompts = random_prompts(SHAPES[args.shape]["vocab_size"], args.prompts, args.prompt_len, args.seed)
            texts = prompt_texts(prompts, tokenizer)
            config = grpo_config(args, device, dtype, tmp)
            trainer = GRPOTrainer(
                model=model,
                reward_funcs=reward_model,
                args=config,
                train_dataset=Dataset.from_dict({"prompt": texts}),
                processing_class=tokenizer,
                reward_processing_classes=tokenizer,
                peft_config=lora_config(lora),
            )
            _sync(device)
            load_s = time.perf_counter() - t0
        loaded_gib = meter.allocated_gib()
        policy = {n: p for n, p in trainer.model.named_parameters() if p.requires_grad}
        policy_before = [p.detach().cpu().clone() for p in policy.values()]
        base_weights = _quantized_weights(model)
        base_before = [w.detach().cpu().clone() for w in base_weights]
        # A few of its 4-bit weights, its LoRA and its score head
        reward_weights = _quantized_weights(reward_model) + [
            p for n, p in reward_model.named_parameters() if "lora_" in n or "score" in n
        ]
        reward_before = [w.detach().cpu().clone() for w in reward_weights]

        probe = IterationProbe(trainer, meter, device, args.warmup)
        with probe.installed():
            trainer.train()

    timed = [r for r in probe.steps if r["timed"]]

    def mean(key: str) -> float:
        return sum(r[key] for r in timed) / len(timed)

    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate wraps it
    measurements = {
        **meter.report(),
        "model_loaded_allocated_gib": model_loaded_gib,
        "loaded_allocated_gib": loaded_gib,
        "load_s": load_s,
        "trainable_params": sum(p.numel() for p in policy.values()),
        "optimizer": type(optimizer).__name__,
        "optimizer_steps_per_iteration": config.steps_per_generation,
        "global_steps": trainer.state.global_step,
        "generated_tokens": sum(r["generated_tokens"] for r in timed),
        "decode_tokens_per_s": mean("generated_tokens") / mean("generation_s"),
        "generation_s": mean("generation_s"),
        "rollout_s": mean("rollout_s"),
        "update_s": mean("update_s"),
        "s_per_step": mean("s"),
        "steps": probe.steps,
    }
    policy_changed = _changed(policy_before, list(policy.values()))
    checks = {
        "base_weights_unchanged": not any(_changed(base_before, base_weights)),
        "reward_model_unchanged": not any(_changed(reward_before, reward_weights)),
        "policy_lora_changed": sum(policy_changed),
        "policy_lora_b_changed": sum(c for n, c in zip(policy, policy_changed, strict=True) if "lora_B" in n),
        "policy_lora_tensors": len(policy),
        "policy_lora_dtype": str(next(iter(policy.values())).dtype).removeprefix("torch."),
    }
    keys = (
        "num_generations",
        "per_device_train_batch_size",
        "gradient_accumulation_steps",
        "steps_per_generation",
        "generation_batch_size",
        "num_iterations",
        "max_steps",
        "max_completion_length",
        "temperature",
        "top_p",
        "top_k",
        "beta",
        "loss_type",
        "scale_rewards",
        "epsilon",
        "learning_rate",
        "lr_scheduler_type",
        "max_grad_norm",
        "weight_decay",
        "optim",
        "gradient_checkpointing",
        "disable_dropout",
        "bf16",
        "fp16",
        "use_vllm",
    )
    grpo = {k: getattr(config, k) for k in keys}
    grpo["lr_scheduler_type"] = str(config.lr_scheduler_type.value)
    grpo["optim"] = str(config.optim.value)
    return measurements, checks, grpo


# ---------------------------------------------------------------------------------------------------- the record


def ours_argv(args: argparse.Namespace) -> list[str]:
    """ppo_bench's command line for our GRPO with the same settings (shared backbone only)."""
    argv = [
        "--shape", args.shape,
        "--prompts", str(args.prompts),
        "--prompt-len", str(args.prompt_len),
        "--new-tokens", str(args.new_tokens),
        "--micro-batch", str(args.micro_batch),
        "--steps", str(args.steps),
        "--warmup", str(args.warmup),
        "--lora-r", str(args.lora_r),
        "--device", args.device,
        "--attn", args.attn,
        "--chunk-size", str(args.chunk_size),
        "--seed", str(args.seed),
        "--advantage", "grpo",
        "--group-size", str(args.group_size),
        "--kl-coef", str(args.kl_coef),
        "--mode", "shared",
    ]  # fmt: skip
    return argv + (["--cache-dir", str(args.cache_dir)] if args.cache_dir else [])


def _all(values: list[bool | None]) -> bool | None:
    """Three-valued AND: False if any is False, else None if any is unknown, else True."""
    if any(v is False for v in values):
        return False
    return None if any(v is None for v in values) else True


def comparison(ours: dict, trl: dict) -> dict:
    """Our GRPO against TRL's: speedup = TRL s/step / ours, memory_ratio = our peak / TRL's (None on CPU)."""
    shared = ours["measurements"]["shared"]
    ours_s, trl_s = shared["s_per_ppo_step"], trl["s_per_step"]
    ours_peak, trl_peak = shared["peak_allocated_gib"], trl["peak_allocated_gib"]
    speedup = trl_s / ours_s
    ratio = None if ours_peak is None or trl_peak is None else ours_peak / trl_peak
    faster = speedup > 1.0
    smaller = None if ratio is None else ratio <= 1.0
    return {
        "ours_s_per_step": ours_s,
        "trl_s_per_step": trl_s,
        "speedup": speedup,
        "ours_generation_s": shared["generation_s"],
        "trl_generation_s": trl["generation_s"],
        "ours_peak_allocated_gib": ours_peak,
        "trl_peak_allocated_gib": trl_peak,
        "memory_ratio": ratio,
        "targets": {
            "faster": {"metric": "speedup", "above": 1.0, "value": speedup, "met": faster},
            "memory": {"metric": "memory_ratio", "max": 1.0, "value": ratio, "met": smaller},
            "met": _all([faster, smaller]),
        },
    }


def run(args: argparse.Namespace) -> dict:
    """Optionally run our GRPO, then TRL's, and return the result record."""
    device = resolve_device(args.device)
    on_cuda = device.type == "cuda"
    if on_cuda:
        device = torch.device("cuda", 0)  # the one visible GPU (parse_args), named as TRL's Trainer names it
    dtype = resolve_dtype(ModelConfig.compute_dtype, device)
    ours = None
    if args.with_ours:
        ours = ppo_bench.run(ppo_bench.parse_args(ours_argv(args)))  # run_trl's MemoryMeter then frees what it left
    checkpoint = build_random_checkpoint(args.shape, args.cache_dir or cache_root() / "bench", dtype)
    model_cfg = ModelConfig(
        name_or_path=str(checkpoint),
        quantization="nf4",
        device=str(device),
        attn_implementation=args.attn,
        logprob_chunk_size=args.chunk_size,
    )
    lora = LoRAConfig(r=args.lora_r, alpha=2 * args.lora_r, dropout=0.0)
    # TRL's policy as a TRL user has it: the input-embedding table on the device (host placement is ours)
    model_cfg = dataclasses.replace(model_cfg, embeddings="device")
    measurements, checks, grpo = run_trl(args, model_cfg, lora, dtype)
    result = {
        "benchmark": BENCHMARK,
        "shape": args.shape,
        "base_params": param_count(build_config(args.shape)),
        "settings": {
            "prompts": args.prompts,
            "group_size": args.group_size,
            "sequences_per_step": args.prompts * args.group_size,
            "prompt_len": args.prompt_len,
            "new_tokens": args.new_tokens,
            "micro_batch": args.micro_batch,
            "steps": args.steps,
            "warmup": args.warmup,
            "kl_coef": args.kl_coef,
            "lora_r": lora.r,
            "lora_alpha": lora.alpha,
            "lora_dropout": lora.dropout,
            "lora_target_modules": lora.target_modules,
            "quantization": model_cfg.quantization,
            "double_quant": model_cfg.double_quant,
            "compute_dtype": str(dtype).removeprefix("torch."),
            "attn_implementation": args.attn,
            "gradient_checkpointing": True,
            "seed": args.seed,
            "with_ours": args.with_ours,
            "grpo": grpo,
        },
        "device": torch.cuda.get_device_name(device) if on_cuda else "cpu",
        "versions": {**versions(), **{name: version(name) for name in ("trl", "accelerate")}},
        "measurements": measurements,
        "checks": checks,
        "note": f"{CUDA_NOTE if on_cuda else CPU_NOTE} {REWARD_NOTE}",
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if ours is not None:
        result["ours_command"] = "python -m benchmarks.ppo_bench " + " ".join(ours_argv(args))
        result["ours"] = ours
        result["comparison"] = comparison(ours, measurements)
    return result


def summary(result: dict, path: Path) -> str:
    """A few human-readable lines about one result."""
    s, m = result["settings"], result["measurements"]

    def gib(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.2f} GiB"

    lines = [
        f"{result['benchmark']} {result['shape']} on {result['device']}: {s['prompts']} prompts x {s['group_size']} "
        f"completions x ({s['prompt_len']} + {s['new_tokens']}) tokens, micro-batch {s['micro_batch']}, "
        f"LoRA r={s['lora_r']}, beta {s['kl_coef']}",
        f"  TRL: peak allocated {gib(m['peak_allocated_gib'])}, peak reserved {gib(m['peak_reserved_gib'])}, "
        f"policy base loaded {gib(m['model_loaded_allocated_gib'])}",
        f"  TRL: {m['s_per_step']:.2f} s/GRPO step (rollout {m['rollout_s']:.2f} s, of which generation "
        f"{m['generation_s']:.2f} s; update {m['update_s']:.2f} s), decode {m['decode_tokens_per_s']:.1f} tokens/s",
    ]
    if "comparison" in result:
        c = result["comparison"]
        ratio = "n/a" if c["memory_ratio"] is None else f"{c['memory_ratio']:.3f}"
        verdict = {True: "MET", False: "MISSED", None: "not measured"}[c["targets"]["met"]]
        lines += [
            f"  ours: peak allocated {gib(c['ours_peak_allocated_gib'])}, {c['ours_s_per_step']:.2f} s/GRPO step",
            f"  speedup TRL/ours {c['speedup']:.2f}x, memory ours/TRL {ratio}: target (faster, memory <= TRL) "
            f"{verdict}",
        ]
    lines.append(f"  -> {path}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark from command-line arguments, write the JSON and print a summary."""
    args = parse_args(argv)
    result = run(args)
    path = write_result(result, args.out, BENCHMARK, args.shape)
    print(summary(result, path))
    return result


if __name__ == "__main__":
    main()
