"""Set-up time side by side: our GRPO set-up against TRL's GRPOTrainer set-up, on the same shape, in one process.

Ours: `load_base` (tokenizer, 4-bit NF4 base), `build_rl_bank` (policy loaded from the SFT adapter, a frozen
reference copy of it, the reward role loaded from its adapter + head) and the `PPOTrainer`. TRL's, as a TRL user
writes it: `AutoTokenizer` and `AutoModelForCausalLM.from_pretrained` with the same `BitsAndBytesConfig` (the
policy), the 4-bit sequence-classification reward model with its LoRA (trl_grpo_bench's `load_reward_model`),
and `GRPOTrainer` with a `LoraConfig`. The adapters both sides start from are written once beforehand.

Our set-up also runs with bitsandbytes' own CPU quantization kernel (`ours_library_kernel`), to show what
lowmem_rlhf/model/quantize_cpu.py changes. Each set-up runs once untimed (imports, file cache), then `--repeats`
times in alternating order; each phase's median is reported, with the ratio ours / TRL for the whole set-up and
for TRL's policy alone (a GRPO run scored by reward functions has no reward model). Wall times depend on the
machine and its load: read the ratios. Each set-up also counts its 4-bit quantizations, peft adapter injections
and the weights quantized by our CPU kernel.

    python -m benchmarks.load_bench --shape qwen2.5-0.5b --device cpu --repeats 3
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from importlib.metadata import version
from pathlib import Path
from unittest import mock

import torch

from benchmarks.ppo_bench import bench_trainer, make_adapters, random_prompts
from benchmarks.sft_bench import _positive, versions, write_result
from benchmarks.shapes import SHAPES, build_config, build_random_checkpoint, param_count
from benchmarks.trl_grpo_bench import grpo_config, load_reward_model, prompt_texts
from lowmem_rlhf.config import LoRAConfig, ModelConfig, PPOConfig
from lowmem_rlhf.model import quantize_cpu
from lowmem_rlhf.model.bank import lora_config
from lowmem_rlhf.model.loading import (
    _keep_cpu_4bit_differentiable,
    load_base,
    quantization_config,
    resolve_device,
    resolve_dtype,
)
from lowmem_rlhf.stages.ppo import build_rl_bank
from lowmem_rlhf.tiny.model import cache_root

BENCHMARK = "load_time"
PROMPTS, GROUP, PROMPT_LEN, NEW_TOKENS, MICRO_BATCH = 2, 2, 8, 8, 2  # only the trainers' constructors read them


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.load_bench", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--shape", choices=sorted(SHAPES), default="qwen2.5-0.5b", help="Model architecture, random weights."
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto.")
    p.add_argument("--repeats", type=_positive, default=3, help="Timed set-ups of each side, alternating.")
    p.add_argument("--lora-r", type=_positive, default=16, help="LoRA rank on every linear layer; alpha is 2r.")
    p.add_argument("--seed", type=int, default=0, help="Seed of the adapters and the prompts.")
    p.add_argument("--cache-dir", type=Path, default=None, help="Random-weight checkpoint cache (see sft_bench).")
    p.add_argument("--out", type=Path, default=None, help="JSON output (default benchmarks/results/...).")
    return p.parse_args(argv)


class Phases:
    """Seconds per named phase of one set-up, and what ran in it (counted by wrapping library entry points)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.counts: Counter = Counter()

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        yield
        self.seconds[name] = time.perf_counter() - t0

    @contextlib.contextmanager
    def counting(self) -> Iterator[None]:
        """Count 4-bit quantizations (Params4bit._quantize) and peft injections (BaseTuner.inject_adapter)."""
        import bitsandbytes as bnb
        from peft.tuners.tuners_utils import BaseTuner

        def counted(key: str, fn: Callable) -> Callable:
            def wrapper(*args, **kwargs):
                self.counts[key] += 1
                return fn(*args, **kwargs)

            return wrapper

        fast_before = quantize_cpu.calls
        with (
            mock.patch.object(
                bnb.nn.Params4bit, "_quantize", counted("quantized_weights", bnb.nn.Params4bit._quantize)
            ),
            mock.patch.object(BaseTuner, "inject_adapter", counted("peft_injections", BaseTuner.inject_adapter)),
        ):
            yield
        self.counts["fast_kernel_weights"] = quantize_cpu.calls - fast_before


def ours(s: argparse.Namespace) -> Phases:
    """Our GRPO set-up: load_base, the bank's three roles, PPOTrainer."""
    t = Phases()
    with t.counting():
        with t.phase("base"):
            model, tokenizer = load_base(s.model_cfg)
        with t.phase("roles"):
            bank = build_rl_bank(model, s.sft_dir, s.reward_dir, s.pc, gradient_checkpointing=True)
        with t.phase("trainer"):
            bench_trainer(bank, s.pc, s.tmp / "ppo", s.prompts, tokenizer, s.seed, s.model_cfg.logprob_chunk_size)
    return t


def ours_library_kernel(s: argparse.Namespace) -> Phases:
    """Our set-up with bitsandbytes' own CPU quantization kernel (what load_base did before quantize_cpu)."""
    with mock.patch.object(quantize_cpu, "bitsandbytes_checked", lambda: False):
        return ours(s)


def trl(s: argparse.Namespace) -> Phases:
    """TRL's GRPO set-up as its user writes it: from_pretrained (4-bit), the reward model, GRPOTrainer."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOTrainer

    cfg = s.model_cfg
    t = Phases()
    with t.counting():
        with t.phase("base"):
            tokenizer = AutoTokenizer.from_pretrained(cfg.name_or_path)
            model = AutoModelForCausalLM.from_pretrained(
                cfg.name_or_path,
                quantization_config=quantization_config(cfg, s.dtype),
                dtype=s.dtype,
                device_map={"": cfg.device},
                attn_implementation=cfg.attn_implementation,
            )
            _keep_cpu_4bit_differentiable(model)  # the kernel choice only: no time of its own
        with t.phase("reward_model"):
            reward_model = load_reward_model(cfg, s.lora, s.dtype, s.seed)
        with t.phase("trainer"):
            GRPOTrainer(
                model=model,
                reward_funcs=reward_model,
                args=grpo_config(s.grpo_args, s.device, s.dtype, str(s.tmp / "trl")),
                train_dataset=Dataset.from_dict({"prompt": prompt_texts(s.prompts, tokenizer)}),
                processing_class=tokenizer,
                reward_processing_classes=tokenizer,
                peft_config=lora_config(s.lora),
            )
    return t


def summarize(runs: list[Phases]) -> dict:
    """Median seconds per phase and in total over the timed runs, and the counts (equal in every run)."""
    phases = {k: statistics.median(r.seconds[k] for r in runs) for k in runs[0].seconds}
    return {
        "median_s": phases,
        "median_total_s": statistics.median(sum(r.seconds.values()) for r in runs),
        "runs_s": [r.seconds for r in runs],
        "counts": dict(runs[0].counts),
    }


def setup(args: argparse.Namespace, tmp: Path) -> argparse.Namespace:
    """The checkpoint, configs, prompts and the two adapters both sides start from (written once, untimed)."""
    device = resolve_device(args.device)
    dtype = resolve_dtype(ModelConfig.compute_dtype, device)
    checkpoint = build_random_checkpoint(args.shape, args.cache_dir or cache_root() / "bench", dtype)
    model_cfg = ModelConfig(name_or_path=str(checkpoint), quantization="nf4", device=str(device))
    lora = LoRAConfig(r=args.lora_r, alpha=2 * args.lora_r, dropout=0.0)
    model, _ = load_base(model_cfg)
    sft_dir, reward_dir = make_adapters(model, lora, tmp / "adapters", args.seed)
    del model
    gc.collect()
    pc = PPOConfig(
        rollout_batch_size=PROMPTS,
        mini_batch_size=MICRO_BATCH,
        micro_batch_size=MICRO_BATCH,
        ppo_epochs=1,
        max_new_tokens=NEW_TOKENS,
        max_prompt_length=PROMPT_LEN,
        advantage="grpo",
        group_size=GROUP,
        normalize_reward=False,
        num_steps=1,
    )
    grpo_args = argparse.Namespace(
        prompts=PROMPTS,
        group_size=GROUP,
        micro_batch=MICRO_BATCH,
        warmup=0,
        steps=1,
        new_tokens=NEW_TOKENS,
        kl_coef=pc.kl_coef,
        seed=args.seed,
    )
    prompts = random_prompts(SHAPES[args.shape]["vocab_size"], PROMPTS, PROMPT_LEN, args.seed)
    return argparse.Namespace(
        device=device,
        dtype=dtype,
        model_cfg=model_cfg,
        lora=lora,
        pc=pc,
        grpo_args=grpo_args,
        prompts=prompts,
        sft_dir=sft_dir,
        reward_dir=reward_dir,
        seed=args.seed,
        tmp=tmp,
    )


def run(args: argparse.Namespace, argv: list[str]) -> dict:
    sides = {"ours": ours, "ours_library_kernel": ours_library_kernel, "trl": trl}
    timed: dict[str, list[Phases]] = {name: [] for name in sides}
    with tempfile.TemporaryDirectory(prefix="load_bench-") as tmp:
        s = setup(args, Path(tmp))
        for fn in sides.values():  # untimed: imports and the file cache
            fn(s)
            gc.collect()
        for i in range(args.repeats):
            order = list(sides) if i % 2 == 0 else list(reversed(sides))  # no side always runs first
            for name in order:
                timed[name].append(sides[name](s))
                gc.collect()
    result_ours, result_trl = summarize(timed["ours"]), summarize(timed["trl"])
    result_library = summarize(timed["ours_library_kernel"])
    trl_policy = result_trl["median_s"]["base"] + result_trl["median_s"]["trainer"]
    return {
        "benchmark": BENCHMARK,
        "shape": args.shape,
        "base_params": param_count(build_config(args.shape)),
        "command": "python -m benchmarks.load_bench " + " ".join(argv),
        "settings": {"repeats": args.repeats, "lora_r": args.lora_r, "quantization": "nf4", "seed": args.seed},
        "device": torch.cuda.get_device_name(s.device) if s.device.type == "cuda" else "cpu",
        "versions": {**versions(), **{name: version(name) for name in ("trl", "accelerate")}},
        "ours": result_ours,
        "ours_library_kernel": result_library,
        "trl": result_trl,
        "comparison": {
            "ours_library_kernel_total_s": result_library["median_total_s"],
            "ratio_ours_library_kernel_over_trl": result_library["median_total_s"] / result_trl["median_total_s"],
            "ours_total_s": result_ours["median_total_s"],
            "trl_total_s": result_trl["median_total_s"],
            "ratio_ours_over_trl": result_ours["median_total_s"] / result_trl["median_total_s"],
            "trl_policy_only_s": trl_policy,
            "ratio_ours_over_trl_policy_only": result_ours["median_total_s"] / trl_policy,
        },
        "note": "Medians of the timed set-ups; wall times vary with the machine's load, the ratios less so.",
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    result = run(args, argv)
    path = write_result(result, args.out, BENCHMARK, args.shape)
    c = result["comparison"]
    for side in ("ours", "ours_library_kernel", "trl"):
        r = result[side]
        phases = ", ".join(f"{k} {v:.2f} s" for k, v in r["median_s"].items())
        print(f"{side}: {r['median_total_s']:.2f} s ({phases}); {r['counts']}")
    print(
        f"ours / TRL {c['ratio_ours_over_trl']:.2f} (TRL's policy alone: {c['ratio_ours_over_trl_policy_only']:.2f})"
        f" -> {path}"
    )
    return result


if __name__ == "__main__":
    main()
