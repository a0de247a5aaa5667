"""Rollout decode benchmark: tokens/s of the policy's `generate` against the memory-bandwidth floor.

One 4-bit base and one LoRA policy role are loaded once; prompts are then decoded with every combination
of `--variants` (how the KV cache is kept and whether the decode step is compiled) and `--batch-sizes`
(rows per generate call), `--calls` calls each, through the project's own `generate`. Each run is timed
twice: with `--new-tokens` and with one new token (the prefill alone), so decode speed excludes the
prefill. Weights are random (benchmarks/shapes.py); one JSON per run.

    python -m benchmarks.rollout_bench --shape llama-3.1-8b --calls 2 --prompt-len 256 --new-tokens 256 \
        --batch-sizes 1 16 64 --variants dynamic static compiled
"""

from __future__ import annotations

import argparse
import datetime
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.ppo_bench import GB, MemoryMeter, decode_step_bytes, make_adapters, measure_bandwidth, random_prompts
from benchmarks.sft_bench import GIB, _positive, _sync, add_common_args, versions, write_result
from benchmarks.shapes import SHAPES, build_config, build_random_checkpoint, param_count
from lowmem_rlhf.config import LoRAConfig, ModelConfig
from lowmem_rlhf.data.chat import end_of_turn_ids
from lowmem_rlhf.model.bank import AdapterBank
from lowmem_rlhf.model.loading import load_base, resolve_device, resolve_dtype
from lowmem_rlhf.rollout.generate import DecodeConfig, SamplingConfig, generate
from lowmem_rlhf.tiny.model import cache_root

BENCHMARK = "rollout_decode"
# name -> (cache, compile, role): how a variant decodes; "base" decodes with the adapters disabled, which
# shows what the LoRA layers cost per token.
# The compiled variant comes last: its CUDA-graph memory pool stays allocated after it.
VARIANTS = {
    "dynamic": ("dynamic", False, "policy"),
    "static": ("static", False, "policy"),
    "base": ("dynamic", False, None),
    "compiled": ("static", True, "policy"),
}
DECODE_FRACTION_MIN = 0.5
CPU_NOTE = (
    "CPU smoke test only: no bandwidth copy and no peak-memory statistics on CPU, so the floor, the fraction "
    "and the memory fields are null; CPU speeds say nothing about GPU speeds."
)
CUDA_NOTE = (
    "decode_tokens_per_s = (generated tokens - one per row) / (time of the full generate - time of a one-token "
    "generate with the same rows): the prefill is left out. The floor is the measured copy bandwidth divided by "
    "the bytes one decode step reads (4-bit weights with their constants, lm_head, norms, the LoRA policy, and "
    "the KV cache at mid-generation), times the rows per call."
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.rollout_bench", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--calls", type=_positive, default=2, help="Generate calls per measurement: batch size x calls prompts."
    )
    p.add_argument("--prompt-len", type=_positive, default=256, help="Tokens per prompt (random ids).")
    p.add_argument("--new-tokens", type=_positive, default=256, help="Tokens generated per prompt (max_new_tokens).")
    p.add_argument(
        "--batch-sizes",
        type=_positive,
        nargs="+",
        default=[1, 16, 64],
        help="Rows per generate call (ppo.generation_batch_size); each is measured on its own.",
    )
    p.add_argument(
        "--variants",
        nargs="+",
        choices=list(VARIANTS),
        default=list(VARIANTS),
        help="dynamic: growing KV cache; static: preallocated cache; compiled: static cache + torch.compile of "
        "the decode step; base: dynamic cache with the adapters disabled (the cost of the LoRA layers).",
    )
    p.add_argument(
        "--temperature",
        type=float,
        default=1.0,
        help="Sampling temperature (0 = greedy). Random weights almost never sample EOS, so rows run to full length.",
    )
    p.add_argument("--repeats", type=_positive, default=1, help="Timed repeats per measurement (the mean is kept).")
    add_common_args(p, "rollout", "Seed of the adapter, the prompts and the sampling.")
    return p.parse_args(argv)


def _timed_generate(bank: AdapterBank, role, prompts, sampling, tok, decode: DecodeConfig, seed: int, device):
    _sync(device)
    t0 = time.perf_counter()
    gen = generate(bank, role, prompts, sampling, end_of_turn_ids(tok), tok.pad_token_id, seed, decode=decode)
    _sync(device)
    return time.perf_counter() - t0, gen


def measure(
    bank: AdapterBank, tok, prompts: list[list[int]], variant: str, rows: int, args, bandwidth: float | None, dtype
) -> dict:
    """One variant at one batch size on the first `rows x calls` prompts: a warm-up generate (compilation,
    allocator), then `repeats` timed pairs of (one-token generate, full generate)."""
    device = bank.device
    cache, compiled, role = VARIANTS[variant]
    prompts = prompts[: rows * args.calls]
    decode = DecodeConfig(
        batch_size=rows,
        cache=cache,
        prompt_width=args.prompt_len if cache == "static" else None,
        compile=compiled,
    )
    if compiled:  # a fresh compilation for these shapes, not a dynamic-shape recompile of the previous size's
        torch._dynamo.reset()
        vars(bank.peft_model.get_base_model()).pop("_compiled_call", None)
    full = SamplingConfig(args.new_tokens, args.temperature)
    first = SamplingConfig(1, args.temperature)
    meter = MemoryMeter(device)
    with meter.phase("decode"):
        warmup_s, _ = _timed_generate(bank, role, prompts, full, tok, decode, args.seed, device)
        prefill_s = total_s = 0.0
        tokens = 0
        for r in range(args.repeats):
            prefill_s += _timed_generate(bank, role, prompts, first, tok, decode, args.seed + r, device)[0]
            seconds, gen = _timed_generate(bank, role, prompts, full, tok, decode, args.seed + r, device)
            total_s += seconds
            tokens += sum(len(x) for x in gen.response_ids)
    prefill_s, total_s, tokens = prefill_s / args.repeats, total_s / args.repeats, tokens / args.repeats
    decode_tokens = tokens - len(prompts)  # the first token of every row comes out of the prefill
    decode_s = max(total_s - prefill_s, 1e-9)
    read = decode_step_bytes(bank, role or "policy", rows, args.prompt_len + args.new_tokens // 2, dtype)
    if role is None:
        read = {**read, "total": read["total"] - read["lora"], "lora": 0}
    floor = None if bandwidth is None else bandwidth / read["total"] * rows
    speed = decode_tokens / decode_s
    memory = meter.report()
    return {
        "variant": variant,
        "cache": cache,
        "compiled": compiled,
        "adapters": role is not None,
        "batch_size": rows,
        "warmup_s": warmup_s,
        "prefill_s": prefill_s,
        "total_s": total_s,
        "generated_tokens": tokens,
        "decode_tokens_per_s": speed,
        "tokens_per_s_with_prefill": tokens / total_s,
        "decode_bytes_per_step": read,
        "bandwidth_floor_tokens_per_s": floor,
        "decode_fraction_of_floor": None if floor is None else speed / floor,
        "peak_allocated_gib": memory["peak_allocated_gib"],
    }


def run(args: argparse.Namespace) -> dict:
    """Load the base and a policy role once, measure every variant x batch size, and return the record."""
    device = resolve_device(args.device)
    on_cuda = device.type == "cuda"
    dtype = resolve_dtype(ModelConfig.compute_dtype, device)
    checkpoint = build_random_checkpoint(args.shape, args.cache_dir or cache_root() / "bench", dtype)
    bandwidth = measure_bandwidth(device) if on_cuda else None
    model_cfg = ModelConfig(
        name_or_path=str(checkpoint), quantization="nf4", device=str(device), attn_implementation=args.attn
    )
    lora = LoRAConfig(r=args.lora_r, alpha=2 * args.lora_r, dropout=0.0)
    # a compiled decode step keeps the table on the device, as the RL stage does (model.embeddings: auto)
    model, tok = load_base(model_cfg, compiled_decoding="compiled" in args.variants)
    with tempfile.TemporaryDirectory(prefix="rollout_bench-") as tmp:
        sft_dir, _ = make_adapters(model, lora, Path(tmp), args.seed)
        bank = AdapterBank(model, gradient_checkpointing=True)  # as in training: generate must not checkpoint
        bank.add_role("policy", from_dir=sft_dir)
    n = max(args.batch_sizes) * args.calls
    prompts = random_prompts(SHAPES[args.shape]["vocab_size"], n, args.prompt_len, args.seed)
    rows = []
    for variant in args.variants:
        for size in args.batch_sizes:
            rows.append(measure(bank, tok, prompts, variant, size, args, bandwidth, dtype))
            print(_row_line(rows[-1]), flush=True)
    # the target is about rollouts, which decode with the policy's adapter
    best = max([r for r in rows if r["adapters"]] or rows, key=lambda r: r["decode_tokens_per_s"])
    return {
        "benchmark": BENCHMARK,
        "shape": args.shape,
        "base_params": param_count(build_config(args.shape)),
        "settings": {
            "calls": args.calls,
            "prompt_len": args.prompt_len,
            "new_tokens": args.new_tokens,
            "batch_sizes": args.batch_sizes,
            "variants": args.variants,
            "temperature": args.temperature,
            "repeats": args.repeats,
            "lora_r": lora.r,
            "lora_alpha": lora.alpha,
            "quantization": model_cfg.quantization,
            "double_quant": model_cfg.double_quant,
            "compute_dtype": str(dtype).removeprefix("torch."),
            "attn_implementation": args.attn,
            "seed": args.seed,
        },
        "device": torch.cuda.get_device_name(device) if on_cuda else "cpu",
        "versions": versions(),
        "measurements": {
            "bandwidth_gb_per_s": None if bandwidth is None else bandwidth / GB,
            "model_loaded_allocated_gib": torch.cuda.memory_allocated(device) / GIB if on_cuda else None,
            "runs": rows,
            "best": {k: best[k] for k in ("variant", "batch_size", "decode_tokens_per_s", "decode_fraction_of_floor")},
        },
        "targets": {
            "decode": {
                "metric": "best.decode_fraction_of_floor",
                "min": DECODE_FRACTION_MIN,
                "value": best["decode_fraction_of_floor"],
                "met": None
                if best["decode_fraction_of_floor"] is None
                else best["decode_fraction_of_floor"] >= DECODE_FRACTION_MIN,
                "source": "lowmem-rlhf design brief, performance targets",
            }
        },
        "note": CUDA_NOTE if on_cuda else CPU_NOTE,
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _row_line(r: dict) -> str:
    floor = r["decode_fraction_of_floor"]
    return (
        f"  {r['variant']:>8} x {r['batch_size']:>3} rows/call: {r['decode_tokens_per_s']:9.1f} decode tokens/s"
        + ("" if floor is None else f" = {floor:6.1%} of the floor")
        + f" (prefill {r['prefill_s']:.2f} s, total {r['total_s']:.2f} s, warm-up {r['warmup_s']:.2f} s)"
    )


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark from command-line arguments, write the JSON and print where it went."""
    args = parse_args(argv)
    result = run(args)
    path = write_result(result, args.out, "rollout", args.shape)
    best = result["measurements"]["best"]
    print(f"{BENCHMARK} {args.shape} on {result['device']}: best {best['variant']} x {best['batch_size']} -> {path}")
    return result


if __name__ == "__main__":
    main()
