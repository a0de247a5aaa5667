"""QLoRA SFT benchmark: peak GPU memory and tokens/s of policy training on a 4-bit base.

Loads a random-weight checkpoint of a real architecture (benchmarks/shapes.py) through the project's own
4-bit loading path, adds a trainable `policy` LoRA role on every linear layer, and runs SFT steps on
random token ids with the project's loss and optimizer. Writes one JSON file per run.

    python -m benchmarks.sft_bench --shape llama-3.1-8b --batch 2 --seq 2048 --steps 5 --warmup 2 --lora-r 16
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import re
import time
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

import torch

from benchmarks.shapes import SHAPES, build_config, build_random_checkpoint, param_count
from lowmem_rlhf.config import LoRAConfig, ModelConfig, SFTConfig
from lowmem_rlhf.model.bank import AdapterBank, lora_config
from lowmem_rlhf.model.loading import load_base, resolve_device, resolve_dtype
from lowmem_rlhf.tiny.model import cache_root
from lowmem_rlhf.train.losses import sft_loss_sum
from lowmem_rlhf.train.runner import build_optimizer

BENCHMARK = "sft_qlora"
RESULTS_DIR = Path(__file__).resolve().parent / "results"
ROLE = "policy"
GIB = 2**30
# torchtune's published QLoRA figure for Llama-3.1-8B on an RTX 4090 (batch 2 x 2048 tokens, LoRA r=16, all linear).
TARGET = {
    "shape": "llama-3.1-8b",
    "batch": 2,
    "seq": 2048,
    "lora_r": 16,
    "metric": "peak_allocated_gib",
    "max": 7.4,
    "source": "torchtune QLoRA Llama-3.1-8B, RTX 4090",
}
CPU_NOTE = (
    "CPU smoke test only: torch keeps no peak-memory statistics on CPU, so the memory fields are null, "
    "and CPU throughput says nothing about GPU throughput."
)
CUDA_NOTE = (
    "Memory is torch's allocator (max_memory_allocated/reserved since before loading); the paged 8-bit "
    "optimizer state lives in CUDA unified memory, which these counters do not include."
)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def versions() -> dict[str, str | None]:
    """Python, torch, CUDA and the versions of the libraries the measured code paths run through."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        **{name: version(name) for name in ("transformers", "peft", "bitsandbytes")},
    }


def timed_steps(step: Callable[[], float], warmup: int, steps: int, device: torch.device) -> tuple[list[float], float]:
    """`warmup` untimed then `steps` timed calls of `step` (each returns its loss); (all losses, timed seconds)."""
    losses = [step() for _ in range(warmup)]
    _sync(device)
    t0 = time.perf_counter()
    losses += [step() for _ in range(steps)]
    _sync(device)
    return losses, time.perf_counter() - t0


def write_result(result: dict, out: Path | None, name: str, shape: str) -> Path:
    """Write `result` as JSON to `out`, else to benchmarks/results/<name>_<shape>_<device>.json; returns the path."""
    path = out or RESULTS_DIR / f"{name}_{shape}_{slug(result['device'])}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


def add_common_args(p: argparse.ArgumentParser, name: str, seed_help: str) -> None:
    """The options every benchmark shares: shape, LoRA rank, device, attention, chunk, seed, cache, output."""
    p.add_argument(
        "--shape",
        choices=sorted(SHAPES),
        default="llama-3.1-8b",
        help="Model architecture, with random weights (see benchmarks/shapes.py).",
    )
    p.add_argument("--lora-r", type=_positive, default=16, help="LoRA rank on every linear layer; alpha is 2r.")
    p.add_argument("--device", default="auto", help="auto, cuda, cuda:N or cpu (cpu is a smoke test only).")
    p.add_argument(
        "--attn",
        choices=["sdpa", "eager", "flash_attention_2"],
        default="sdpa",
        help="Attention kernel (model.attn_implementation).",
    )
    p.add_argument(
        "--chunk-size",
        type=_positive,
        default=ModelConfig.logprob_chunk_size,
        help="Tokens (over the batch) per chunk of the log-prob computation (model.logprob_chunk_size).",
    )
    p.add_argument("--seed", type=int, default=0, help=seed_help)
    p.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="Where random-weight checkpoints are built and reused "
        "(default: bench/ under $LOWMEM_RLHF_CACHE, else ~/.cache/lowmem_rlhf).",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"Output JSON path (default: benchmarks/results/{name}_<shape>_<device>.json).",
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.sft_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=_positive, default=2, help="Sequences per optimizer step.")
    p.add_argument("--seq", type=_positive, default=2048, help="Tokens per sequence; the second half is the response.")
    p.add_argument("--steps", type=_positive, default=5, help="Timed optimizer steps.")
    p.add_argument(
        "--warmup",
        type=int,
        default=2,
        help="Untimed optimizer steps before the timed ones (allocator and kernel warm-up).",
    )
    p.add_argument("--lr", type=float, default=2e-4, help="Learning rate (constant).")
    add_common_args(p, "sft", "Seed of LoRA init and of the random token ids.")
    args = p.parse_args(argv)
    if args.seq < 2:
        p.error("--seq must be at least 2 (one prompt and one response token)")
    if args.warmup < 0:
        p.error("--warmup must be 0 or more")
    return args


def slug(text: str) -> str:
    """`NVIDIA GeForce RTX 4090` -> `nvidia-geforce-rtx-4090`, for file names."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def random_batch(vocab: int, batch: int, seq: int, device: torch.device, seed: int) -> dict[str, torch.Tensor]:
    """Random ids, no padding, response = second half of each sequence (what SFT's collate produces)."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(vocab, (batch, seq), generator=g)
    response_mask = torch.zeros((batch, seq), dtype=torch.bool)
    response_mask[:, seq // 2 :] = True
    return {
        "input_ids": input_ids.to(device),
        "attention_mask": torch.ones_like(input_ids, device=device),
        "response_mask": response_mask.to(device),
    }


def _quantized_weights(model: torch.nn.Module, n: int = 4) -> list[torch.Tensor]:
    """A few 4-bit weights spread over the depth, as in-place handles for a before/after comparison."""
    import bitsandbytes as bnb

    weights = [m.weight for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    return [weights[i * (len(weights) - 1) // max(n - 1, 1)] for i in range(min(n, len(weights)))]


def _changed(before: list[torch.Tensor], now: list[torch.Tensor]) -> list[bool]:
    return [not torch.equal(b, t.detach().cpu()) for b, t in zip(before, now, strict=True)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def target_record(args: argparse.Namespace, peak_gib: float | None) -> dict | None:
    """TARGET plus whether `peak_gib` met it, when the run used the target's settings (else None)."""
    if any(getattr(args, k) != TARGET[k] for k in ("shape", "batch", "seq", "lora_r")):
        return None
    return {**TARGET, "met": None if peak_gib is None else peak_gib <= TARGET["max"]}


def estimate_record(args: argparse.Namespace, peak_gib: float | None) -> dict:
    """`lowmem-rlhf estimate`'s prediction for these settings next to the measured peak (target: within 10%)."""
    from lowmem_rlhf.config import config_from_dict
    from lowmem_rlhf.model.memory import prediction_record

    cfg = config_from_dict(
        {
            "model": {"name_or_path": args.shape, "logprob_chunk_size": args.chunk_size},
            "lora": {"r": args.lora_r, "alpha": 2 * args.lora_r, "dropout": 0.0},
            "sft": {"batch_size": args.batch, "max_length": args.seq},
        }
    )
    return prediction_record(cfg, args.shape, "sft", peak_gib)


def tracer_record(argvs: list[list[str]] | None, peak_gib: float | None) -> dict | None:
    """On a GPU: the memory tracer's peak for the same settings beside the measured one, and their offset
    (`benchmarks.memory.beside_measurement`; the paged optimizer's state, outside the CUDA counters, left out);
    None for settings the tracer does not cover."""
    if argvs is None:
        return None
    from benchmarks.memory import beside_measurement

    return beside_measurement(argvs, peak_gib, paged_optimizer=True)


def tracer_argvs(args: argparse.Namespace, stage: str = "sft") -> list[list[str]] | None:
    """`benchmarks.memory`'s arguments for a supervised benchmark's settings on a GPU (`stage` sft, rm or dpo; paged
    8-bit AdamW, no LoRA dropout), or None for an attention kernel it does not trace."""
    if args.attn != "sdpa":
        return None
    argv = ["--shape", args.shape, "--stage", stage, "--batch", str(args.batch), "--seq", str(args.seq)]
    argv += ["--lora-r", str(args.lora_r), "--lora-dropout", "0.0", "--chunk-size", str(args.chunk_size)]
    return [[*argv, "--optimizer", "adamw_8bit"]]


def run(args: argparse.Namespace) -> dict:
    """Build/load the model, train `warmup + steps` steps, and return the result record."""
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
    train_cfg = SFTConfig(learning_rate=args.lr, batch_size=args.batch, gradient_accumulation_steps=1)
    lora = LoRAConfig(r=args.lora_r, alpha=2 * args.lora_r, dropout=0.0)

    if on_cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    model, _ = load_base(model_cfg)
    _sync(device)
    load_s = time.perf_counter() - t0
    loaded_gib = torch.cuda.memory_allocated(device) / GIB if on_cuda else None

    torch.manual_seed(args.seed)
    bank = AdapterBank(model, gradient_checkpointing=train_cfg.gradient_checkpointing)
    bank.add_role(ROLE, lora=lora_config(lora), trainable=True)
    params = bank.trainable_parameters()
    optimizer = build_optimizer(params, train_cfg, device)
    batch = random_batch(model.config.vocab_size, args.batch, args.seq, device, args.seed)
    n_tokens = float(batch["response_mask"][:, 1:].sum())
    base_weights = _quantized_weights(model)
    base_before = [w.detach().cpu().clone() for w in base_weights]
    lora_before = [p.detach().cpu().clone() for p in params]

    def step() -> float:
        with bank.use(ROLE, train=True) as m:
            loss_sum, _ = sft_loss_sum(m, batch, args.chunk_size)
            loss = loss_sum / n_tokens
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, train_cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    losses, timed_s = timed_steps(step, args.warmup, args.steps, device)

    measurements = {
        "tokens_per_s": args.batch * args.seq * args.steps / timed_s,
        "s_per_step": timed_s / args.steps,
        "timed_s": timed_s,
        "load_s": load_s,
        "peak_allocated_gib": torch.cuda.max_memory_allocated(device) / GIB if on_cuda else None,
        "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / GIB if on_cuda else None,
        "model_loaded_allocated_gib": loaded_gib,
        "losses": losses,
        "final_loss": losses[-1],
    }
    return {
        "benchmark": BENCHMARK,
        "shape": args.shape,
        "base_params": param_count(build_config(args.shape)),
        "trainable_params": sum(p.numel() for p in params),
        "settings": {
            "batch": args.batch,
            "seq": args.seq,
            "steps": args.steps,
            "warmup": args.warmup,
            "response_tokens": "second half of each sequence",
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
        },
        "device": torch.cuda.get_device_name(device) if on_cuda else "cpu",
        "versions": versions(),
        "measurements": measurements,
        "checks": {
            "base_weights_unchanged": not any(_changed(base_before, base_weights)),
            "lora_tensors_changed": sum(_changed(lora_before, params)),
            "lora_tensors": len(params),
        },
        "target": target_record(args, measurements["peak_allocated_gib"]),
        "estimate": estimate_record(args, measurements["peak_allocated_gib"]),
        "tracer": tracer_record(tracer_argvs(args), measurements["peak_allocated_gib"]) if on_cuda else None,
        "note": CUDA_NOTE if on_cuda else CPU_NOTE,
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def summary(result: dict, path: Path) -> str:
    """A few human-readable lines about one result."""
    m, s = result["measurements"], result["settings"]

    def gib(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.2f} GiB"

    lines = [
        f"{result['benchmark']} {result['shape']} on {result['device']}: batch {s['batch']} x {s['seq']} tokens, "
        f"LoRA r={s['lora_r']}, {s['optimizer']}",
        f"  {m['tokens_per_s']:.1f} tokens/s ({m['s_per_step']:.3f} s/step), loss {m['final_loss']:.3f}",
        f"  peak allocated {gib(m['peak_allocated_gib'])}, peak reserved {gib(m['peak_reserved_gib'])}, "
        f"after loading {gib(m['model_loaded_allocated_gib'])}",
    ]
    if result["target"] is not None:
        t = result["target"]
        verdict = {True: "MET", False: "MISSED", None: "not measured"}[t["met"]]
        lines.append(f"  target {t['metric']} <= {t['max']} GiB ({t['source']}): {verdict}")
    lines.append(f"  -> {path}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark from command-line arguments, write the JSON and print a summary."""
    args = parse_args(argv)
    result = run(args)
    path = write_result(result, args.out, "sft", args.shape)
    print(summary(result, path))
    return result


if __name__ == "__main__":
    main()
