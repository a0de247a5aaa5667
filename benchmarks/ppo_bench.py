"""PPO benchmark: peak GPU memory, decode speed and step time of 4-role PPO on one 4-bit base.

`shared` mode is the project's way: one NF4 base, policy / reference / reward / value as LoRA roles of one
AdapterBank (`build_rl_bank`), driven through PPOTrainer's own rollout and update. `separate` mode is the
baseline it is compared with: the same four models, each on its own 4-bit copy of the base, taken through
the memory-relevant work of one PPO iteration. Weights are random (benchmarks/shapes.py); one JSON per run.

    python -m benchmarks.ppo_bench --shape llama-3.1-8b --prompts 16 --prompt-len 256 --new-tokens 256 \
        --micro-batch 4 --steps 2 --lora-r 16 --mode both
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from unittest import mock

import torch

import lowmem_rlhf.train.ppo as ppo_trainer_module
from benchmarks.sft_bench import (
    GIB,
    _changed,
    _positive,
    _quantized_weights,
    _sync,
    add_common_args,
    tracer_record,
    versions,
    write_result,
)
from benchmarks.shapes import SHAPES, SPECIAL_TOKENS, build_config, build_random_checkpoint, param_count
from lowmem_rlhf.config import LoRAConfig, ModelConfig, PPOConfig
from lowmem_rlhf.data.chat import end_of_turn_ids
from lowmem_rlhf.data.preference import pad_sequences
from lowmem_rlhf.estimators import ESTIMATORS
from lowmem_rlhf.model.bank import AdapterBank, lora_config
from lowmem_rlhf.model.loading import load_base, resolve_device, resolve_dtype
from lowmem_rlhf.model.scoring import sequence_scores
from lowmem_rlhf.ops import (
    gae_advantages,
    kl_penalty,
    masked_whiten,
    per_token_rewards,
    ppo_policy_loss,
    ppo_value_loss,
)
from lowmem_rlhf.rollout.generate import Generation, SamplingConfig, generate
from lowmem_rlhf.stages.ppo import build_rl_bank
from lowmem_rlhf.tiny.model import cache_root
from lowmem_rlhf.train.ppo import PPOTrainer, response_forward
from lowmem_rlhf.train.runner import build_optimizer

BENCHMARK = "ppo_shared_backbone"
MODES = ("shared", "separate", "both")
GB = 1e9
# Standard deviation of the random LoRA B matrices of the saved adapters: fresh LoRA has B = 0, which would
# make every role the same function; small non-zero B makes them differ, as trained adapters do.
LORA_B_STD = 1e-3
BANDWIDTH_COPY_BYTES = GIB
BANDWIDTH_REPEATS = 20
# The separate baseline: (role, saved adapter it starts from, trainable, scalar head), as build_rl_bank does.
SEPARATE_ROLES = (
    ("policy", "sft", True, False),
    ("reference", "sft", False, False),
    ("reward", "reward", False, True),
    ("value", "reward", True, True),
)
# The design's performance targets. The peak is an absolute number for one setting; the other two are ratios.
DESIGN_SETTINGS = {
    "shape": "llama-3.1-8b",
    "prompts": 16,
    "prompt_len": 256,
    "new_tokens": 256,
    "micro_batch": 4,
    "lora_r": 16,
    "advantage": "gae",
    "generation_batch_size": 0,
}
PEAK_MAX_GB = 9.5
MEMORY_RATIO_MAX = 0.4
DECODE_FRACTION_MIN = 0.5
TARGET_SOURCE = "lowmem-rlhf design brief, performance targets"
CPU_NOTE = (
    "CPU smoke test only: torch keeps no peak-memory statistics on CPU and the bandwidth copy is not measured, "
    "so memory, bandwidth and memory-ratio fields are null; CPU times say nothing about GPU times."
)
CUDA_NOTE = (
    "Memory is torch's allocator (max_memory_allocated/reserved per mode, from before loading the base); the "
    "paged 8-bit optimizer state lives in CUDA unified memory, which these counters do not include. "
    "generation_s includes the prefill of the prompts."
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.ppo_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=_positive, default=16, help="Prompts per PPO iteration (rollout_batch_size).")
    p.add_argument("--prompt-len", type=_positive, default=256, help="Tokens per prompt (random ids, no padding).")
    p.add_argument("--new-tokens", type=_positive, default=256, help="Longest response generated (max_new_tokens).")
    p.add_argument(
        "--micro-batch",
        type=_positive,
        default=4,
        help="Sequences per forward/backward; also the PPO minibatch (one optimizer step per micro-batch).",
    )
    p.add_argument("--steps", type=_positive, default=2, help="Timed PPO iterations (rollout + update).")
    p.add_argument(
        "--warmup",
        type=int,
        default=1,
        help="Untimed PPO iterations before the timed ones (allocator and kernel warm-up; still in the peak).",
    )
    p.add_argument(
        "--mode",
        choices=MODES,
        default="both",
        help="shared: all roles on one base; separate: four bases, one per role; both: shared, then separate, "
        "and their memory ratio.",
    )
    p.add_argument(
        "--advantage",
        choices=tuple(ESTIMATORS),
        default="gae",
        help="ppo.advantage: gae is PPO with the value role; the others are critic-free (no value role; "
        "--group-size samples per prompt for the grouped ones).",
    )
    p.add_argument(
        "--group-size",
        type=_positive,
        default=4,
        help="Samples per prompt for " + " and ".join(e.name for e in ESTIMATORS.values() if e.grouped) + ".",
    )
    p.add_argument("--kl-coef", type=float, default=0.05, help="KL penalty coefficient beta.")
    p.add_argument(
        "--generation-batch-size",
        type=int,
        default=0,
        help="Sequences per generate call (ppo.generation_batch_size); 0 = the whole rollout at once.",
    )
    p.add_argument(
        "--generation-cache",
        choices=("dynamic", "static"),
        default="dynamic",
        help="Rollout KV cache (ppo.generation_cache).",
    )
    p.add_argument(
        "--compile-generation",
        action="store_true",
        help="torch.compile the decode step (ppo.compile_generation; needs --generation-cache static). The warm-up "
        "iterations absorb the compilation.",
    )
    add_common_args(p, "ppo", "Seed of the adapters, the prompts and the sampling.")
    args = p.parse_args(argv)
    if args.warmup < 0:
        p.error("--warmup must be 0 or more")
    if args.generation_batch_size < 0:
        p.error("--generation-batch-size must be 0 or more")
    if args.compile_generation and args.generation_cache != "static":
        p.error("--compile-generation needs --generation-cache static")
    estimator = ESTIMATORS[args.advantage]
    if not estimator.critic and args.mode != "shared":
        p.error("the separate baseline is the four-model PPO (--advantage gae); use --mode shared for the others")
    if args.group_size < estimator.min_group_size:
        p.error(f"--advantage {args.advantage} needs --group-size {estimator.min_group_size} or more")
    return args


# ---------------------------------------------------------------------------------------------------- setup


@dataclasses.dataclass
class Setup:
    """What both modes share: the device, the checkpoint to load, the configs and the prompts."""

    device: torch.device
    dtype: torch.dtype
    model_cfg: ModelConfig
    lora: LoRAConfig
    pc: PPOConfig
    prompts: list[list[int]]
    warmup: int
    chunk_size: int
    seed: int
    bandwidth: float | None  # bytes/s from measure_bandwidth; None on CPU


def ppo_config(args: argparse.Namespace) -> PPOConfig:
    """One PPO iteration = rollout of `prompts` sequences, one epoch of micro-batch-sized optimizer steps.

    Only the fields PPOTrainer.rollout/update read matter: the trainer's run() (logging, samples,
    checkpoints, eval) is not used.
    """
    return PPOConfig(
        rollout_batch_size=args.prompts,
        mini_batch_size=args.micro_batch,
        micro_batch_size=args.micro_batch,
        ppo_epochs=1,
        max_new_tokens=args.new_tokens,
        max_prompt_length=args.prompt_len,
        generation_batch_size=args.generation_batch_size,
        generation_cache=args.generation_cache,
        compile_generation=args.compile_generation,
        advantage=args.advantage,
        group_size=args.group_size,
        kl_coef=args.kl_coef,
        critic="separate",
        normalize_reward=False,
        num_steps=args.warmup + args.steps,
    )


def random_prompts(vocab: int, n: int, length: int, seed: int) -> list[list[int]]:
    """`n` prompts of `length` random ids, never a special token (pad, unk, bos, eos come first in the vocab)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(len(SPECIAL_TOKENS), vocab, (n, length), generator=g).tolist()


def bench_trainer(bank, pc, stage_dir: Path, prompts: list[list[int]], tokenizer, seed: int, chunk_size: int):
    """The PPOTrainer a benchmark drives: token prompts only, no reward statistics, no recorded settings."""
    return PPOTrainer(
        bank=bank,
        pc=pc,
        stage_dir=stage_dir,
        prompts=prompts,
        prompt_texts=[""] * len(prompts),
        tokenizer=tokenizer,
        seed=seed,
        settings={},
        reward_stats=None,
        chunk_size=chunk_size,
    )


def make_adapters(
    model: torch.nn.Module, lora: LoRAConfig, out_dir: Path, seed: int, roles: tuple[str, ...] = ("sft", "reward")
) -> tuple[Path, ...]:
    """Save random-weight adapters for `model` under `out_dir` (`sft`; `reward` with a score head); returns
    their folders, in the order of `roles`.

    LoRA B is drawn with std LORA_B_STD so the adapters are not no-ops. They are then taken off again (peft's
    `unload`, nothing merged), so the caller builds its roles on the same loaded base instead of loading it
    a second time.
    """
    torch.manual_seed(seed)
    bank = AdapterBank(model, gradient_checkpointing=False)
    for role in roles:
        bank.add_role(role, lora=lora_config(lora), head=role == "reward")
        with torch.no_grad():
            for name, p in bank.named_role_parameters(role).items():
                if "lora_B" in name:
                    p.normal_(std=LORA_B_STD)
        bank.save_role(role, out_dir / role)
    bank.peft_model.unload()
    return tuple(out_dir / role for role in roles)


def measure_bandwidth(device: torch.device) -> float:
    """Device memory bandwidth in bytes/s: a 1 GiB device-to-device copy reads and writes every byte once.

    Run before any mode, so its 2 GiB of buffers are not in any peak.
    """
    src = torch.empty(BANDWIDTH_COPY_BYTES, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(BANDWIDTH_REPEATS):
        dst.copy_(src)
    _sync(device)
    seconds = time.perf_counter() - t0
    del src, dst
    torch.cuda.empty_cache()
    return 2 * BANDWIDTH_COPY_BYTES * BANDWIDTH_REPEATS / seconds


def decode_step_bytes(bank: AdapterBank, role: str, batch: int, context: int, dtype: torch.dtype) -> dict[str, int]:
    """Bytes one decode step of `batch` rows must read from memory at `context` tokens of KV cache.

    Weights: every base tensor (4-bit packed linear weights with their block scales, norms, lm_head) except
    the input embedding, of which only `batch` rows are read (unless it is tied to lm_head), plus `role`'s
    LoRA. KV cache: keys and values of every layer for every row.
    """
    import bitsandbytes as bnb

    model = bank.base_model
    embedding, lm_head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    weights = sum(
        p.nbytes for n, p in model.named_parameters() if "lora_" not in n and (p is not embedding or p is lm_head)
    )
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            qs = m.weight.quant_state
            weights += qs.absmax.nbytes + (qs.state2.absmax.nbytes if qs.nested else 0)
    lora = sum(p.nbytes for p in bank.role_parameters(role))
    cfg = model.config.get_text_config()
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * dtype.itemsize * batch * context
    return {"base_weights": weights, "lora": lora, "kv_cache": kv, "total": weights + lora + kv}


# ---------------------------------------------------------------------------------------------------- measuring


class MemoryMeter:
    """Peak CUDA allocator memory per named phase and over all of them; every reading is None on CPU.

    Creating one frees what earlier modes left behind and resets torch's peak counters, so a mode's peak
    starts from an empty device. A phase's peak is the highest point since the previous phase ended.
    """

    def __init__(self, device: torch.device):
        self.device, self.on_cuda = device, device.type == "cuda"
        self.allocated: dict[str, int] = {}
        self.reserved = 0
        if self.on_cuda:
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        yield
        if self.on_cuda:
            _sync(self.device)
            self.allocated[name] = max(self.allocated.get(name, 0), torch.cuda.max_memory_allocated(self.device))
            self.reserved = max(self.reserved, torch.cuda.max_memory_reserved(self.device))
            torch.cuda.reset_peak_memory_stats(self.device)

    def allocated_gib(self) -> float | None:
        return torch.cuda.memory_allocated(self.device) / GIB if self.on_cuda else None

    def report(self) -> dict:
        if not self.on_cuda:
            return {
                "peak_allocated_gib": None,
                "peak_allocated_gb": None,
                "peak_reserved_gib": None,
                "peak_allocated_gib_by_phase": None,
            }
        peak = max(self.allocated.values())
        return {
            "peak_allocated_gib": peak / GIB,
            "peak_allocated_gb": peak / GB,
            "peak_reserved_gib": self.reserved / GIB,
            "peak_allocated_gib_by_phase": {k: v / GIB for k, v in self.allocated.items()},
        }


class GenerationTimer:
    """Stands in for the `generate` that PPOTrainer.rollout calls: the real one, timed (CUDA synchronised).

    The trainer has no timing hook, and timing its rollout's own generation (not a second one) keeps the
    decode measurement on exactly the work, memory state and sampling of a PPO iteration.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        """Start a new iteration: ReMax calls `generate` twice per rollout (samples, then its greedy baseline)."""
        self.seconds, self.tokens, self.longest, self.calls = 0.0, 0, 0, 0

    def __call__(self, *args, **kwargs) -> Generation:
        _sync(self.device)
        t0 = time.perf_counter()
        gen = generate(*args, **kwargs)
        _sync(self.device)
        self.seconds += time.perf_counter() - t0
        self.tokens += sum(len(r) for r in gen.response_ids)
        self.longest = max(self.longest, *(len(r) for r in gen.response_ids))
        self.calls += 1
        return gen


def _same(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> bool:
    return before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def _changed_count(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> int:
    return sum(not torch.equal(before[k], after[k]) for k in before)


# ---------------------------------------------------------------------------------------------------- modes


def run_shared(s: Setup) -> tuple[dict, dict]:
    """PPOTrainer on one base with four LoRA roles, `warmup + steps` iterations; returns (measurements, checks).

    The checks say whether the frozen roles (reference, reward) and the sampled 4-bit base weights are
    byte-identical after the updates, and how many tensors of the trained roles changed.
    """
    meter = MemoryMeter(s.device)
    with tempfile.TemporaryDirectory(prefix="ppo_bench-") as tmp, meter.phase("load"):
        t0 = time.perf_counter()
        model, tokenizer = load_base(s.model_cfg, compiled_decoding=s.pc.compile_generation)
        model_loaded_gib = meter.allocated_gib()
        sft_dir, reward_dir = make_adapters(model, s.lora, Path(tmp) / "adapters", s.seed)
        bank = build_rl_bank(model, sft_dir, reward_dir, s.pc, gradient_checkpointing=True)
        trainer = bench_trainer(bank, s.pc, Path(tmp) / "ppo", s.prompts, tokenizer, s.seed, s.chunk_size)
        _sync(s.device)
        load_s = time.perf_counter() - t0
    loaded_gib = meter.allocated_gib()
    frozen_before = {role: bank.state_dict(role) for role in ("reference", "reward")}
    trained_before = {role: bank.state_dict(role) for role in trainer.train_roles}
    base_weights = _quantized_weights(model)
    base_before = [w.detach().cpu().clone() for w in base_weights]

    timer = GenerationTimer(s.device)
    steps = []
    with mock.patch.object(ppo_trainer_module, "generate", timer):
        for step in range(s.pc.num_steps):
            timer.reset()
            with meter.phase("rollout"):
                _sync(s.device)
                t0 = time.perf_counter()
                ro = trainer.rollout(step)
                _sync(s.device)
                rollout_s = time.perf_counter() - t0
            metrics = trainer.rollout_metrics(ro)
            with meter.phase("update"):
                _sync(s.device)
                t0 = time.perf_counter()
                metrics.update(trainer.update(ro, step))
                _sync(s.device)
                update_s = time.perf_counter() - t0
            steps.append(
                {
                    "step": step,
                    "timed": step >= s.warmup,
                    "rollout_s": rollout_s,
                    "generation_s": timer.seconds,
                    "generated_tokens": timer.tokens,
                    "generate_calls": timer.calls,
                    "longest_response": timer.longest,
                    "update_s": update_s,
                    "metrics": metrics,
                }
            )

    timed = [r for r in steps if r["timed"]]

    def mean(key: str) -> float:
        return sum(r[key] for r in timed) / len(timed)

    decode_tokens_per_s = mean("generated_tokens") / mean("generation_s")
    # Mid-generation: the KV cache holds the prompt and half of the new tokens.
    context = len(s.prompts[0]) + s.pc.max_new_tokens // 2
    rows = trainer.decode.rows_per_call(trainer.rollout_size)  # mean rows of one generate call
    read = decode_step_bytes(bank, "policy", rows, context, s.dtype)
    # Each decode step reads `read["total"]` bytes and makes one token per row.
    floor = None if s.bandwidth is None else s.bandwidth / read["total"] * rows
    measurements = {
        **meter.report(),
        "model_loaded_allocated_gib": model_loaded_gib,
        "loaded_allocated_gib": loaded_gib,
        "load_s": load_s,
        "trainable_params": sum(p.numel() for p in trainer.params),
        "optimizer": type(trainer.optimizer).__name__,
        "generated_tokens": sum(r["generated_tokens"] for r in timed),
        "decode_tokens_per_s": decode_tokens_per_s,
        "generation_s": mean("generation_s"),
        "rollout_s": mean("rollout_s"),
        "update_s": mean("update_s"),
        "s_per_ppo_step": mean("rollout_s") + mean("update_s"),
        "decode_bytes_per_step": read,
        "decode_context_tokens": context,
        "decode_rows_per_call": rows,
        "bandwidth_floor_tokens_per_s": floor,
        "decode_fraction_of_floor": None if floor is None else decode_tokens_per_s / floor,
        "steps": steps,
    }
    checks = {
        "frozen_roles_unchanged": {role: _same(b, bank.state_dict(role)) for role, b in frozen_before.items()},
        "base_weights_unchanged": not any(_changed(base_before, base_weights)),
        "trained_roles_changed": {
            role: {"changed": _changed_count(b, bank.state_dict(role)), "tensors": len(b)}
            for role, b in trained_before.items()
        },
    }
    return measurements, checks


def _micro_batched(
    bank: AdapterBank,
    role: str,
    fn: Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor],
    ids: torch.Tensor,
    mask: torch.Tensor,
    size: int,
) -> torch.Tensor:
    """fn(model, ids, mask) on micro-batches of `size` rows with `role` active (eval mode), concatenated."""
    with bank.use(role) as m:
        return torch.cat([fn(m, ids[i : i + size], mask[i : i + size]) for i in range(0, len(ids), size)])


def run_separate(s: Setup) -> dict:
    """The baseline: four 4-bit bases, one role each, through the memory-relevant work of one PPO iteration.

    Phases: load all four; generate the rollout with the policy; one no-grad pass of every model over the
    full sequences in micro-batches (log-probs, reference log-probs, reward, values); one forward + backward
    of policy and value with the PPO losses on one micro-batch and an optimizer step.
    """
    pc, size = s.pc, s.pc.micro_batch_size
    meter = MemoryMeter(s.device)
    banks: dict[str, AdapterBank] = {}
    with tempfile.TemporaryDirectory(prefix="ppo_bench-") as tmp, meter.phase("load"):
        t0 = time.perf_counter()
        model, tokenizer = load_base(s.model_cfg, compiled_decoding=s.pc.compile_generation)
        adapters = dict(zip(("sft", "reward"), make_adapters(model, s.lora, Path(tmp), s.seed), strict=True))
        for role, source, trainable, head in SEPARATE_ROLES:
            if banks:  # the first role takes the base the adapters were made on
                model, _ = load_base(s.model_cfg, compiled_decoding=s.pc.compile_generation)
            banks[role] = AdapterBank(model, gradient_checkpointing=True)
            banks[role].add_role(role, from_dir=adapters[source], trainable=trainable, head=head)
        _sync(s.device)
        load_s = time.perf_counter() - t0
    loaded_gib = meter.allocated_gib()

    with meter.phase("generate"):
        sampling = SamplingConfig(pc.max_new_tokens, pc.temperature, pc.top_p, pc.top_k)
        gen = generate(
            banks["policy"], "policy", s.prompts, sampling, end_of_turn_ids(tokenizer), tokenizer.pad_token_id, s.seed
        )
    p = len(s.prompts[0])  # every prompt has the same length, so right padding keeps them aligned
    ids, mask = pad_sequences([q + r for q, r in zip(s.prompts, gen.response_ids, strict=True)], tokenizer.pad_token_id)
    ids, mask = ids.to(s.device), mask.to(s.device)
    rmask = mask[:, p:]

    def logprobs(m, i, a):
        return response_forward(m, i, a, p, pc.temperature, s.chunk_size)[0]

    def values(m, i, a):
        head = banks["value"].head("value")
        return response_forward(m, i, a, p, pc.temperature, s.chunk_size, head, need_logprobs=False)[1]

    def scores(m, i, a):
        return sequence_scores(m, banks["reward"].head("reward"), i, a)

    with meter.phase("score"), torch.no_grad():
        old_logprobs = _micro_batched(banks["policy"], "policy", logprobs, ids, mask, size)
        ref_logprobs = _micro_batched(banks["reference"], "reference", logprobs, ids, mask, size)
        raw_scores = _micro_batched(banks["reward"], "reward", scores, ids, mask, size).float()
        old_values = _micro_batched(banks["value"], "value", values, ids, mask, size)
        kl = torch.where(rmask, kl_penalty(old_logprobs, ref_logprobs, pc.kl_estimator), 0.0)
        rewards = per_token_rewards(raw_scores, kl, pc.kl_coef, rmask)
        advantages, returns = gae_advantages(rewards, old_values, rmask, pc.gamma, pc.lam)
        advantages = masked_whiten(advantages, rmask)

    params = banks["policy"].trainable_parameters() + banks["value"].trainable_parameters()
    optimizer = build_optimizer(params, pc, s.device)
    b = slice(0, size)
    with meter.phase("train"):
        with banks["policy"].use("policy", train=True) as m:
            new_logprobs = logprobs(m, ids[b], mask[b])
            pg_loss, _ = ppo_policy_loss(new_logprobs, old_logprobs[b], advantages[b], rmask[b], pc.clip_range)
            pg_loss.backward()
        with banks["value"].use("value", train=True) as m:
            new_values = values(m, ids[b], mask[b])
            v_loss, _ = ppo_value_loss(new_values, old_values[b], returns[b], rmask[b], pc.clip_range_value)
            (pc.vf_coef * v_loss).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return {
        **meter.report(),
        "loaded_allocated_gib": loaded_gib,
        "load_s": load_s,
        "trainable_params": sum(p.numel() for p in params),
        "optimizer": type(optimizer).__name__,
        "generated_tokens": sum(len(r) for r in gen.response_ids),
        "pg_loss": pg_loss.item(),
        "value_loss": v_loss.item(),
    }


# ---------------------------------------------------------------------------------------------------- the record


def _met(value: float | None, ok: Callable[[float], bool]) -> bool | None:
    return None if value is None else ok(value)


def target_records(args: argparse.Namespace, measurements: dict) -> dict:
    """The design's three targets with the measured value and whether it was met (None: not measured).

    The peak target is an absolute number for one setting, so it only applies to runs with those settings.
    The design says "GB": it is judged as 1e9 bytes (the stricter reading); `met_if_gib` gives the other one.
    """
    shared = measurements.get("shared", {})
    applies = all(getattr(args, k) == v for k, v in DESIGN_SETTINGS.items())
    peak_gb, peak_gib = shared.get("peak_allocated_gb"), shared.get("peak_allocated_gib")
    ratio, fraction = measurements["memory_ratio"], shared.get("decode_fraction_of_floor")
    return {
        "peak_allocated": {
            "settings": DESIGN_SETTINGS,
            "applies": applies,
            "metric": "shared.peak_allocated_gb",
            "max": PEAK_MAX_GB,
            "unit": "GB (1e9 bytes)",
            "value": peak_gb,
            "met": _met(peak_gb, lambda v: v <= PEAK_MAX_GB) if applies else None,
            "met_if_gib": _met(peak_gib, lambda v: v <= PEAK_MAX_GB) if applies else None,
            "source": TARGET_SOURCE,
        },
        "memory_ratio": {
            "metric": "memory_ratio",
            "max": MEMORY_RATIO_MAX,
            "value": ratio,
            "met": _met(ratio, lambda v: v <= MEMORY_RATIO_MAX),
            "source": TARGET_SOURCE,
        },
        "decode": {
            "metric": "shared.decode_fraction_of_floor",
            "min": DECODE_FRACTION_MIN,
            "value": fraction,
            "met": _met(fraction, lambda v: v >= DECODE_FRACTION_MIN),
            "source": TARGET_SOURCE,
        },
    }


def tracer_argvs(args: argparse.Namespace, lora: LoRAConfig) -> list[list[str]] | None:
    """`benchmarks.memory`'s arguments for the shared-backbone run on a GPU: the scoring passes and update (ppo for
    gae, grpo), and the rollout; None for settings it does not trace (the other advantages, generation in several
    calls or with a static cache, another attention kernel)."""
    stage = {"gae": "ppo", "grpo": "grpo"}.get(args.advantage)
    if stage is None or args.attn != "sdpa" or args.generation_batch_size or args.generation_cache != "dynamic":
        return None
    common = ["--shape", args.shape, "--rollout", str(args.prompts), "--prompt-len", str(args.prompt_len)]
    common += ["--new-tokens", str(args.new_tokens), "--group-size", str(args.group_size), "--lora-r", str(lora.r)]
    common += ["--lora-dropout", str(lora.dropout), "--chunk-size", str(args.chunk_size), "--optimizer", "adamw_8bit"]
    rollout_of = "grpo" if stage == "grpo" else "ppo"
    return [
        ["--stage", stage, "--micro-batch", str(args.micro_batch), *common],
        ["--stage", "rollout", "--rollout-of", rollout_of, *common],
    ]


def estimate_record(args: argparse.Namespace, pc, peak_gib: float | None) -> dict:
    """`lowmem-rlhf estimate`'s prediction of the shared-backbone peak next to the measured one (target: 10%)."""
    from lowmem_rlhf.config import config_from_dict
    from lowmem_rlhf.model.memory import prediction_record

    cfg = config_from_dict(
        {
            "model": {"name_or_path": args.shape, "logprob_chunk_size": args.chunk_size},
            "lora": {"r": args.lora_r, "alpha": 2 * args.lora_r, "dropout": 0.0},
            "ppo": {**dataclasses.asdict(pc), "max_prompt_length": args.prompt_len},
        }
    )
    return prediction_record(cfg, args.shape, "ppo", peak_gib)


def run(args: argparse.Namespace) -> dict:
    """Build/load the checkpoint, run the chosen mode(s) and return the result record."""
    device = resolve_device(args.device)
    on_cuda = device.type == "cuda"
    dtype = resolve_dtype(ModelConfig.compute_dtype, device)
    checkpoint = build_random_checkpoint(args.shape, args.cache_dir or cache_root() / "bench", dtype)
    setup = Setup(
        device=device,
        dtype=dtype,
        model_cfg=ModelConfig(
            name_or_path=str(checkpoint),
            quantization="nf4",
            device=str(device),
            attn_implementation=args.attn,
            logprob_chunk_size=args.chunk_size,
        ),
        lora=LoRAConfig(r=args.lora_r, alpha=2 * args.lora_r, dropout=0.0),
        pc=ppo_config(args),
        prompts=random_prompts(SHAPES[args.shape]["vocab_size"], args.prompts, args.prompt_len, args.seed),
        warmup=args.warmup,
        chunk_size=args.chunk_size,
        seed=args.seed,
        bandwidth=measure_bandwidth(device) if on_cuda else None,
    )
    measurements: dict = {}
    checks = None
    if args.mode in ("shared", "both"):
        measurements["shared"], checks = run_shared(setup)
    if args.mode in ("separate", "both"):
        measurements["separate"] = run_separate(setup)
    measurements["memory_ratio"] = (
        measurements["shared"]["peak_allocated_gib"] / measurements["separate"]["peak_allocated_gib"]
        if on_cuda and args.mode == "both"
        else None
    )
    measurements["bandwidth_gb_per_s"] = None if setup.bandwidth is None else setup.bandwidth / GB
    shared_peak = measurements.get("shared", {}).get("peak_allocated_gib")
    return {
        "benchmark": BENCHMARK,
        "shape": args.shape,
        "base_params": param_count(build_config(args.shape)),
        "settings": {
            "mode": args.mode,
            "prompts": args.prompts,
            "prompt_len": args.prompt_len,
            "new_tokens": args.new_tokens,
            "micro_batch": args.micro_batch,
            "advantage": args.advantage,
            "group_size": ESTIMATORS[args.advantage].samples_per_prompt(args.group_size),
            "generation_batch_size": args.generation_batch_size,
            "generation_cache": args.generation_cache,
            "compile_generation": args.compile_generation,
            "steps": args.steps,
            "warmup": args.warmup,
            "lora_r": setup.lora.r,
            "lora_alpha": setup.lora.alpha,
            "lora_dropout": setup.lora.dropout,
            "lora_target_modules": setup.lora.target_modules,
            "lora_b_init_std": LORA_B_STD,
            "quantization": setup.model_cfg.quantization,
            "double_quant": setup.model_cfg.double_quant,
            "compute_dtype": str(dtype).removeprefix("torch."),
            "attn_implementation": args.attn,
            "gradient_checkpointing": True,
            "logprob_chunk_size": args.chunk_size,
            "seed": args.seed,
            "ppo": dataclasses.asdict(setup.pc),
        },
        "device": torch.cuda.get_device_name(device) if on_cuda else "cpu",
        "versions": versions(),
        "measurements": measurements,
        "checks": checks,
        "targets": target_records(args, measurements),
        "estimate": estimate_record(args, setup.pc, shared_peak),
        "tracer": tracer_record(tracer_argvs(args, setup.lora), shared_peak) if on_cuda and shared_peak else None,
        "note": CUDA_NOTE if on_cuda else CPU_NOTE,
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def summary(result: dict, path: Path) -> str:
    """A few human-readable lines about one result."""
    s, m = result["settings"], result["measurements"]

    def gib(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.2f} GiB"

    lines = [
        f"{result['benchmark']} {result['shape']} on {result['device']}: {s['advantage']}, {s['prompts']} prompts x "
        f"{s['group_size']} x ({s['prompt_len']} + {s['new_tokens']}) tokens, micro-batch {s['micro_batch']}, "
        f"LoRA r={s['lora_r']}, mode {s['mode']}"
    ]
    if "shared" in m:
        sh = m["shared"]
        floor = sh["decode_fraction_of_floor"]
        lines += [
            f"  shared: peak allocated {gib(sh['peak_allocated_gib'])}, peak reserved {gib(sh['peak_reserved_gib'])}, "
            f"base loaded {gib(sh['model_loaded_allocated_gib'])}",
            f"  shared: {sh['s_per_ppo_step']:.2f} s/PPO step (rollout {sh['rollout_s']:.2f} s, of which generation "
            f"{sh['generation_s']:.2f} s; update {sh['update_s']:.2f} s), decode {sh['decode_tokens_per_s']:.1f} "
            f"tokens/s" + ("" if floor is None else f" = {floor:.1%} of the bandwidth floor"),
        ]
    if "separate" in m:
        lines.append(f"  separate: peak allocated {gib(m['separate']['peak_allocated_gib'])}")
    if m["memory_ratio"] is not None:
        lines.append(f"  memory ratio shared / separate: {m['memory_ratio']:.3f}")
    for name, t in result["targets"].items():
        if t.get("applies", True):
            bound = f"<= {t['max']}" if "max" in t else f">= {t['min']}"
            verdict = {True: "MET", False: "MISSED", None: "not measured"}[t["met"]]
            lines.append(f"  target {name}: {t['metric']} {bound}: {verdict}")
    lines.append(f"  -> {path}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark from command-line arguments, write the JSON and print a summary."""
    args = parse_args(argv)
    result = run(args)
    path = write_result(result, args.out, ESTIMATORS[args.advantage].label, args.shape)
    print(summary(result, path))
    return result


if __name__ == "__main__":
    main()
