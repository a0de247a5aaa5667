"""Peak device memory of a stage at a real shape, traced on a CPU without a GPU.

    python -m benchmarks.memory --shape llama-3.1-8b --stage sft --batch 2 --seq 2048 --json
    python -m benchmarks.memory --shape llama-3.1-8b --stage ppo --rollout 16 --prompt-len 256 --new-tokens 256
    python -m benchmarks.memory --shape llama-3.1-8b --stage rollout --rollout 16 --prompt-len 256 --new-tokens 2

The stage's own code runs (the SFT loss step, PPOTrainer's scoring passes and update, rollout.generate) on
torch's FakeTensorMode tensors: real shapes and dtypes, no data, no arithmetic. A TorchDispatchMode sees
every tensor each op returns, counts its storage until the storage is freed, and records the peak of the
live bytes and what is alive at that moment. As on a GPU, every storage is rounded up to the CUDA
caching allocator's 512-byte blocks, and bitsandbytes' CUDA dequantize transient (a 4-bit linear over
more than a few rows dequantizes its weight inside the op, invisible to the dispatcher) is added while its
op runs. The peak is what `torch.cuda.max_memory_allocated()` would report for the same step, less what
ops allocate inside themselves and never return (workspaces, kernel temporaries).

`--layers N` traces N decoder layers instead of all of them; `--extrapolate` traces 2 and 3 layers and
extends each phase's per-layer difference to the model's depth, the largest phase being the peak (every
per-layer term, from weights to checkpointed inputs and the KV cache, is linear in the depth; checked in
docs/performance.md against a full trace). `--all` traces every stage at four shapes with their recipes'
settings at 2, 3 and 4 layers, checking each phase's line, into benchmarks/results/memory_traced.json.
Library internals the tracer needs are in
`benchmarks.memtrace_compat`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import tempfile
import time
import types
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from benchmarks import memtrace_compat as compat

GIB = 2**30
TOKEN, EOS, PAD = 5, 3, 0  # fake token ids: every sampled token is TOKEN (never EOS nor pad)
STAGES = ("sft", "rm", "dpo", "ppo", "grpo", "rollout")


class MemoryTracer(TorchDispatchMode):
    """Live bytes of every storage an op returns, their peak, and what is alive at the peak.

    round_to: allocation granularity (512 on CUDA, 1 to compare with a CPU allocator's counts);
    gemm_transient: add bitsandbytes' CUDA dequantize transient; fake: answer value reads of fake tensors.
    """

    def __init__(self, round_to: int = 512, gemm_transient: bool = True, fake: bool = True):
        super().__init__()
        self.round_to, self.gemm_transient, self.fake = round_to, gemm_transient, fake
        self.live: dict[int, tuple[weakref.ref, int, tuple]] = {}  # id(storage) -> (ref, bytes, (phase, shape))
        self.current = self.peak = 0
        self.phase = "load"
        self.peak_phase = "load"
        self.peak_transient = 0
        self.snapshot: dict[int, tuple[weakref.ref, int, tuple]] = {}
        self.snapshot_grads: set[int] = set()
        self.params: list[torch.nn.Parameter] = []  # trainable parameters, whose .grad is told apart at the peak
        self.host: set[int] = set()  # id(storage) of tensors in host memory (not device memory): never counted
        self.phase_peaks: dict[str, int] = {}
        self.phase_snapshots: dict[str, tuple[dict, set, int]] = {}  # phase -> (live, grads, transient) at its peak
        self.transient_calls = 0

    def set_phase(self, phase: str) -> None:
        self.phase = phase

    def _nbytes(self, storage) -> int:
        n = storage.nbytes()
        return math.ceil(n / self.round_to) * self.round_to if self.round_to > 1 else n

    def _free(self, key: int) -> None:
        entry = self.live.pop(key, None)
        if entry is not None:
            self.current -= entry[1]

    def in_host_memory(self, tensors) -> None:
        """These tensors live in host memory (model.embeddings: host): stop counting them, now and later."""
        for t in tensors:
            key = id(t.untyped_storage())
            self._free(key)
            self.host.add(key)

    def _register(self, t) -> None:
        if not isinstance(t, torch.Tensor):
            return
        storage = t.untyped_storage()
        key = id(storage)
        if key in self.host:
            return
        entry = self.live.get(key)
        if entry is not None and entry[0]() is storage:
            return
        n = self._nbytes(storage)
        ref = weakref.ref(storage, lambda _r, k=key: self._free(k))
        self.live[key] = (ref, n, (self.phase, tuple(t.shape)))
        self.current += n

    def _bump(self, transient: int) -> None:
        now = self.current + transient
        if now > self.phase_peaks.get(self.phase, 0):
            self.phase_peaks[self.phase] = now
            grads = {id(p.grad.untyped_storage()) for p in self.params if p.grad is not None}
            self.phase_snapshots[self.phase] = (dict(self.live), grads, transient)
        if now > self.peak:
            self.peak, self.peak_phase, self.peak_transient = now, self.phase, transient
            self.snapshot, self.snapshot_grads = self.phase_snapshots[self.phase][:2]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.fake and func in compat.RANDOM_FILLS:
            return args[0]
        if self.fake and func is compat.SCALAR_READ:
            return compat.fake_scalar(args[0].dtype, TOKEN)
        transient = 0
        if self.gemm_transient and compat.is_gemm_4bit(func):
            transient = compat.gemm_4bit_transient(args, kwargs)
            self.transient_calls += transient > 0
        out = func(*args, **kwargs)
        for t in tree_flatten(out)[0]:
            self._register(t)
        self._bump(transient)  # the dequantized weight is alive while the op writes its output
        return out

    def breakdown(
        self, named: dict[int, str], vocab: int, kv_shape: tuple[int, int] | None, at: str | None = None
    ) -> dict[str, int]:
        """Bytes alive at the peak (of phase `at`) by category. named: id(storage) -> category of tensors alive
        at the end (weights, LoRA, optimizer state); the rest is told apart by when and what it was allocated."""
        at = at or self.peak_phase
        snapshot, grads, transient = self.phase_snapshots[at]
        out: dict[str, int] = {}
        for key, (ref, n, (phase, shape)) in snapshot.items():
            storage = ref()
            if key in grads:
                cat = "gradients (LoRA, heads)"
            elif storage is not None and key in named:
                cat = named[key]
            elif shape and shape[-1] == vocab:
                cat = "logits chunk (and its gradient)"
            elif (
                kv_shape and len(shape) == 4 and (shape[1], shape[3]) == kv_shape and phase.split(":")[0] == "generate"
            ):
                cat = "KV cache"
            elif phase != at and phase.split(":")[0] != at.split(":")[0]:
                cat = f"kept from {phase.split(':')[0]}"
            else:
                cat = "activations"
            out[cat] = out.get(cat, 0) + n
        if transient:
            out["bitsandbytes dequantize transient"] = transient
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))


# ---------------------------------------------------------------------------------------- the model


def build_skeleton(shape: str, layers: int | None, dtype: torch.dtype):
    """The transformers architecture of `shape` on the meta device with bitsandbytes' Linear4bit swapped in by
    transformers' own replace_with_bnb_linear (NF4, double quantization: load_base's quantization_config).
    Built outside any tensor mode: bitsandbytes' Params4bit cannot wrap a fake tensor."""
    from transformers import AutoModelForCausalLM
    from transformers.integrations.bitsandbytes import replace_with_bnb_linear

    from benchmarks.shapes import build_config
    from lowmem_rlhf.config import ModelConfig
    from lowmem_rlhf.model.loading import quantization_config

    overrides = {"bos_token_id": 2, "eos_token_id": EOS, "pad_token_id": PAD}
    if layers is not None:
        overrides["num_hidden_layers"] = layers
    config = build_config(shape, **overrides)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    replace_with_bnb_linear(
        model, modules_to_not_convert=["lm_head"], quantization_config=quantization_config(ModelConfig(), dtype)
    )
    return model


def build_model(model, dtype: torch.dtype, real: bool):
    """The end state of `lowmem_rlhf.model.loading.load_base` (NF4, frozen) from a `build_skeleton` model,
    without a checkpoint: each linear weight quantized from the compute dtype, the rest in the compute dtype.
    Runs under the caller's mode (fake or real tensors); `real` fills weights with random values."""
    import bitsandbytes as bnb

    from lowmem_rlhf.model.loading import _keep_cpu_4bit_differentiable

    done: dict[int, torch.nn.Parameter] = {}  # tied weights stay tied
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is None:
                continue
            if id(p) not in done:
                w = torch.empty(p.shape, dtype=dtype)
                if real:
                    w.normal_(0, 0.02) if w.dim() > 1 else w.fill_(1.0)
                if isinstance(module, bnb.nn.Linear4bit) and name == "weight":
                    done[id(p)] = compat.quantize_nf4(module, w)
                    del w
                else:
                    done[id(p)] = torch.nn.Parameter(w, requires_grad=False)
            module._parameters[name] = done[id(p)]
    model.model.rotary_emb = type(model.model.rotary_emb)(config=model.config)  # buffers off meta
    _keep_cpu_4bit_differentiable(model)
    model.config.use_cache = True
    compat.mark_loaded_in_4bit(model)
    return model


def named_storages(model, bank, optimizer) -> dict[int, str]:
    """id(storage) -> category for the tensors that live through the whole stage."""
    import bitsandbytes as bnb

    named: dict[int, str] = {}

    def put(t, cat: str) -> None:
        if isinstance(t, torch.Tensor):
            named.setdefault(id(t.untyped_storage()), cat)

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            put(module.weight, "base weights (NF4)")
            for t in compat.quant_state_tensors(module.weight.quant_state):
                put(t, "quantization constants")
    for role in bank.roles:
        for p in bank.role_parameters(role):
            put(p, "LoRA adapters and heads")
    for name, p in bank.peft_model.named_parameters():
        put(p, "LoRA adapters and heads" if ".lora_" in name else "base weights (bf16)")
    for state in optimizer.state.values() if optimizer is not None else ():
        for v in state.values():
            put(v, "optimizer state")
    for b in model.buffers():
        put(b, "base weights (bf16)")
    return named


# ---------------------------------------------------------------------------------------- the stages


def _optimizer(params, name: str, lr: float):
    """build_optimizer's CUDA choice for `name` (adamw or adamw_8bit); the traced device is the CPU."""
    import bitsandbytes as bnb

    if name == "adamw_8bit":
        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=0.0)
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)


def _train_steps(args, tracer: MemoryTracer, bank, role: str, cfg, batch: dict, loss_fn: Callable, total: float):
    """TrainLoop's step (loss_fn's weighted sum, backward, clip, optimizer step) on `batch`, `args.steps` times."""
    from lowmem_rlhf.train.runner import build_scheduler, grad_norm_, step_or_skip

    params = bank.trainable_parameters()
    tracer.params = params
    optimizer = _optimizer(params, args.optimizer, cfg.learning_rate)
    scheduler = build_scheduler(optimizer, cfg, args.steps)
    for step in range(args.steps):
        tracer.set_phase(f"step{step}:forward+backward")
        with bank.use(role, train=True) as m:
            loss_sum, _ = loss_fn(m, batch)
            (loss_sum / total).backward()
        del loss_sum
        tracer.set_phase(f"step{step}:optimizer")
        grad_norm_(params, cfg.max_grad_norm)
        step_or_skip(optimizer, scheduler, True)
    return optimizer


def _lora(args):
    from lowmem_rlhf.config import LoRAConfig
    from lowmem_rlhf.model.bank import lora_config

    return lora_config(LoRAConfig(r=args.lora_r, alpha=2 * args.lora_r, dropout=args.lora_dropout))


def _sequences(n: int, length: int) -> dict:
    """n full-length sequences whose second half is the response."""
    ids = torch.full((n, length), TOKEN, dtype=torch.long)
    response = torch.zeros_like(ids, dtype=torch.bool)
    response[:, length // 2 :] = True
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "response_mask": response}


def run_sft(args, model, tracer: MemoryTracer):
    """The SFT step of TrainLoop with sft_loss_sum, `args.steps` times."""
    from lowmem_rlhf.config import SFTConfig
    from lowmem_rlhf.model.bank import AdapterBank
    from lowmem_rlhf.train.losses import sft_loss_sum

    cfg = SFTConfig(batch_size=args.batch, gradient_accumulation_steps=1, max_length=args.seq)
    bank = AdapterBank(model, gradient_checkpointing=True)
    bank.add_role("policy", lora=_lora(args), trainable=True)
    batch = _sequences(args.batch, args.seq)
    total = float(args.batch * (args.seq - args.seq // 2))
    optimizer = _train_steps(
        args, tracer, bank, "policy", cfg, batch, lambda m, b: sft_loss_sum(m, b, args.chunk_size), total
    )
    return bank, optimizer


def run_rm(args, model, tracer: MemoryTracer):
    """The reward stage's step (TrainLoop with rm_loss_sum) on `batch` prompts of `responses` sequences each, as
    collate_groups makes them: every sequence scored once, all C(responses, 2) pairs of a prompt from its scores."""
    from lowmem_rlhf.config import RewardConfig
    from lowmem_rlhf.model.bank import AdapterBank
    from lowmem_rlhf.stages.rm import rm_loss_sum

    cfg = RewardConfig(batch_size=args.batch, gradient_accumulation_steps=1, max_length=args.seq)
    bank = AdapterBank(model, gradient_checkpointing=True)
    bank.add_role("reward", lora=_lora(args), trainable=True, head=True)
    k = args.responses
    batch = _sequences(k * args.batch, args.seq)  # each prompt's k responses, best first
    pairs = [(g * k + i, g * k + j) for g in range(args.batch) for i in range(k) for j in range(i + 1, k)]
    batch["chosen_index"] = torch.tensor([c for c, _ in pairs])
    batch["rejected_index"] = torch.tensor([r for _, r in pairs])
    batch["weights"] = torch.full((len(pairs),), 1.0 / math.comb(k, 2))
    batch["margins"] = torch.zeros(len(pairs))
    head = bank.head("reward")
    loss_fn = lambda m, b: rm_loss_sum(m, head, b, cfg.use_margin, cfg.center_coef)  # noqa: E731
    return bank, _train_steps(args, tracer, bank, "reward", cfg, batch, loss_fn, float(args.batch))


def run_dpo(args, model, tracer: MemoryTracer):
    """The DPO stage's step (TrainLoop with dpo_loss_sum): `batch` pairs through the policy with gradients and
    through the frozen reference without (the default, no precomputed reference log-probs)."""
    from lowmem_rlhf.config import DPOConfig
    from lowmem_rlhf.model.bank import AdapterBank
    from lowmem_rlhf.stages.dpo import dpo_loss_sum

    cfg = DPOConfig(batch_size=args.batch, gradient_accumulation_steps=1, max_length=args.seq)
    bank = AdapterBank(model, gradient_checkpointing=True)
    bank.add_role("policy", lora=_lora(args), trainable=True)
    bank.add_role("reference", copy_of="policy")
    bank.disable_dropout()
    batch = _sequences(2 * args.batch, args.seq)
    batch["weights"] = torch.ones(args.batch)
    loss_fn = lambda m, b: dpo_loss_sum(bank, m, b, cfg, args.chunk_size)  # noqa: E731
    return bank, _train_steps(args, tracer, bank, "policy", cfg, batch, loss_fn, float(args.batch))


def _rl_bank(args, model):
    """The RL stage's roles as build_rl_bank makes them: policy, reference copy, reward + head, and for PPO a
    value role (a trainable copy of the reward role: critic "separate"); GRPO (and a GRPO rollout) has no critic."""
    from lowmem_rlhf.model.bank import AdapterBank

    bank = AdapterBank(model, gradient_checkpointing=True)
    lora = _lora(args)
    bank.add_role("policy", lora=lora, trainable=True)
    bank.add_role("reference", copy_of="policy", head=False)
    bank.add_role("reward", lora=lora, head=True)
    if args.stage != "grpo" and not (args.stage == "rollout" and args.rollout_of == "grpo"):
        bank.add_role("value", copy_of="reward", trainable=True, head=True)
    return bank


def ppo_config(args):
    from lowmem_rlhf.config import PPOConfig

    return PPOConfig(
        advantage="grpo" if args.stage == "grpo" else "gae",
        group_size=args.group_size,
        rollout_batch_size=args.rollout,
        mini_batch_size=args.micro_batch,
        micro_batch_size=args.micro_batch,
        ppo_epochs=1,
        max_new_tokens=args.new_tokens,
        max_prompt_length=args.prompt_len,
        critic="separate",
        normalize_reward=False,
        num_steps=1,
        optimizer="adamw",
    )


def run_ppo(args, model, tracer: MemoryTracer):
    """One PPO (or GRPO) iteration: PPOTrainer.rollout's scoring passes (reward, policy, reference, and value
    for PPO) on full-length responses, then PPOTrainer.update. Generation is traced on its own (--stage
    rollout): here it returns max_new_tokens tokens per prompt without running."""
    import lowmem_rlhf.train.ppo as ppo_mod
    from lowmem_rlhf.rollout.generate import Generation
    from lowmem_rlhf.train.runner import build_scheduler

    bank = _rl_bank(args, model)
    pc = ppo_config(args)
    # the trainer draws rollout_batch_size of them; a fake index read gives TOKEN, so there are more than TOKEN
    prompts = [[TOKEN] * args.prompt_len for _ in range(max(args.rollout, TOKEN + 1))]

    def full_length(bank, role, prompts, sampling, *a, **k):
        return Generation(
            [list(p) for p in prompts], [[TOKEN] * sampling.max_new_tokens for _ in prompts], [False] * len(prompts)
        )

    # the trainer reads only ids from its tokenizer, and decodes responses for reward functions and logs
    tok = types.SimpleNamespace(eos_token_id=EOS, pad_token_id=PAD, decode=lambda ids, **kw: "")
    with (
        mock.patch.object(ppo_mod, "generate", full_length),
        mock.patch.object(ppo_mod, "end_of_turn_ids", lambda tokenizer: [EOS]),
        tempfile.TemporaryDirectory() as tmp,
    ):
        tracer.set_phase("setup")
        trainer = ppo_mod.PPOTrainer(
            bank=bank,
            pc=pc,
            stage_dir=Path(tmp),
            prompts=prompts,
            prompt_texts=[""] * len(prompts),
            tokenizer=tok,
            seed=0,
            settings={},
            reward_stats=None,
            chunk_size=args.chunk_size,
        )
        if args.optimizer != "adamw":
            trainer.optimizer = _optimizer(trainer.params, args.optimizer, pc.learning_rate)
            trainer.scheduler = build_scheduler(trainer.optimizer, pc, math.ceil(args.rollout / args.micro_batch))
        tracer.params = trainer.params
        tracer.set_phase("rollout-scoring")
        ro = trainer.rollout(0)
        tracer.set_phase("update")
        trainer.update(ro, 0)
        del ro
    return bank, trainer.optimizer


def run_rollout(args, model, tracer: MemoryTracer):
    """rollout.generate from the policy of the PPO bank (or the GRPO bank, `--rollout-of grpo`: `group-size`
    samples of each prompt, as PPOTrainer.rollout repeats them): prefill of every sequence, then decoding."""
    from lowmem_rlhf.rollout.generate import DecodeConfig, SamplingConfig, generate

    bank = _rl_bank(args, model)
    n = args.rollout * (args.group_size if args.rollout_of == "grpo" else 1)
    prompts = [[TOKEN] * args.prompt_len for _ in range(n)]
    calls = []

    def phase(module, inputs):  # the first forward is the prefill, every later one a decode step
        tracer.set_phase("generate:decode" if calls else "generate:prefill")
        calls.append(1)

    model.register_forward_pre_hook(phase)
    tracer.set_phase("generate:prefill")
    generate(
        bank,
        "policy",
        prompts,
        SamplingConfig(max_new_tokens=args.new_tokens, temperature=1.0),
        EOS,
        PAD,
        generator_seed=0,
        decode=DecodeConfig(batch_size=0),
    )
    return bank, None


RUNNERS: dict[str, Callable] = {
    "sft": run_sft,
    "rm": run_rm,
    "dpo": run_dpo,
    "ppo": run_ppo,
    "grpo": run_ppo,
    "rollout": run_rollout,
}


@contextlib.contextmanager
def _mode(real: bool, max_length: int | None) -> Iterator[None]:
    if real:
        yield
    else:
        with compat.fake_mode(max_length):
            yield


PAGED_MIN_NUMEL = 100_000  # bitsandbytes' paged optimizers page the state of tensors this large (get_state_buffer)


def paged_state_storages(optimizer) -> set[int]:
    """id(storage) of the 8-bit optimizer state bitsandbytes' paged optimizers would keep in CUDA unified memory
    (outside torch's CUDA counters): the two uint8 moments of tensors of at least PAGED_MIN_NUMEL elements; their
    fp32 block maxima and smaller tensors' state stay ordinary allocations."""
    out: set[int] = set()
    for state in optimizer.state.values() if optimizer is not None else ():
        for key in ("state1", "state2"):
            t = state.get(key)
            if isinstance(t, torch.Tensor) and t.dtype == torch.uint8 and t.numel() >= PAGED_MIN_NUMEL:
                out.add(id(t.untyped_storage()))
    return out


def trace(args, layers: int | None = None, real: bool = False, cuda: bool = True) -> dict:
    """Trace `args.stage` with `layers` decoder layers (None: the shape's own); real: real CPU tensors;
    cuda: 512-byte blocks and the CUDA dequantize transient (always off with real tensors, to compare with a
    CPU allocator). Returns peak, breakdown and phases."""
    from benchmarks.shapes import SHAPES
    from lowmem_rlhf.model.memory import embeddings_on_host
    from lowmem_rlhf.model.placement import is_tied, keep_embeddings_on_host

    compat.check_versions()
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    cuda = cuda and not real
    tracer = MemoryTracer(round_to=512 if cuda else 1, gemm_transient=cuda, fake=not real)
    spec = SHAPES[args.shape]
    heads = spec["num_attention_heads"]
    kv_shape = (spec["num_key_value_heads"], spec.get("head_dim") or spec["hidden_size"] // heads)
    t0 = time.perf_counter()
    skeleton = build_skeleton(args.shape, layers, dtype)
    with _mode(real, args.prompt_len + args.new_tokens if args.stage == "rollout" else None), tracer:
        model = build_model(skeleton, dtype, real)
        if cuda and embeddings_on_host(args.embeddings, "cuda", is_tied(model)):
            # load_base's placement on a CUDA device: the table moves to host memory (here: stops being counted)
            inner = keep_embeddings_on_host(model).inner
            tracer.in_host_memory([*inner.parameters(), *inner.buffers()])
        tracer.set_phase("setup")
        bank, optimizer = RUNNERS[args.stage](args, model, tracer)
        named = named_storages(model, bank, optimizer)
        paged = paged_state_storages(optimizer)
        kv = kv_shape if args.stage == "rollout" else None
        parts = tracer.breakdown(named, spec["vocab_size"], kv)
        phase_parts = {ph: tracer.breakdown(named, spec["vocab_size"], kv, ph) for ph in tracer.phase_snapshots}
    return {
        "layers": layers or spec["num_hidden_layers"],
        "peak_bytes": tracer.peak,
        "peak_phase": tracer.peak_phase,
        "alive_at_peak_bytes": parts,
        "phase_peaks_bytes": tracer.phase_peaks,
        "phase_alive_bytes": phase_parts,
        # per phase, the 8-bit optimizer state that a paged optimizer would keep in CUDA unified memory
        "phase_pageable_bytes": {
            ph: sum(live[k][1] for k in paged if k in live) for ph, (live, _, _) in tracer.phase_snapshots.items()
        },
        "wall_s": time.perf_counter() - t0,
    }


def extrapolate(args, layers: tuple[int, ...] = (2, 3)) -> dict:
    """Trace `layers` decoder layers (consecutive counts) and extend each phase's per-layer difference to the
    shape's depth (see the module docstring); the peak is the largest phase at that depth (phases grow at different
    rates: the rollout's decode step holds a KV cache per layer twice its prefill's). With three or more counts the
    rule is checked first: every phase's peak and what is alive at it must lie on one line, to the byte; otherwise
    RuntimeError."""
    from benchmarks.shapes import SHAPES

    depth = SHAPES[args.shape]["num_hidden_layers"]
    runs = [trace(args, n) for n in layers]
    first, second = runs[0], runs[1]
    phases = [ph for ph in first["phase_peaks_bytes"] if ph in second["phase_peaks_bytes"]]

    def peak(ph: str, k: int) -> int:
        a, b = first["phase_peaks_bytes"][ph], second["phase_peaks_bytes"][ph]
        return a + k * (b - a)

    def alive(ph: str, k: int) -> dict[str, int]:
        a, b = first["phase_alive_bytes"][ph], second["phase_alive_bytes"][ph]
        line = {c: a.get(c, 0) + k * (b.get(c, 0) - a.get(c, 0)) for c in dict.fromkeys([*a, *b])}
        return {c: v for c, v in line.items() if v}

    for n, r in zip(layers[2:], runs[2:], strict=True):
        k = n - layers[0]
        for ph in phases:
            if r["phase_peaks_bytes"].get(ph) != peak(ph, k) or alive(ph, k) != {
                c: v for c, v in r["phase_alive_bytes"][ph].items() if v
            }:
                raise RuntimeError(f"{args.shape} {args.stage}: phase {ph}'s peak at {n} layers is off the line")
    k = depth - layers[0]
    top = max(phases, key=lambda ph: peak(ph, k))
    return {
        "layers": depth,
        "extrapolated_from_layers": list(layers),
        "affine_check": "exact" if len(layers) > 2 else "not checked",
        "peak_bytes": peak(top, k),
        "peak_phase": top,
        "alive_at_peak_bytes": dict(sorted(alive(top, k).items(), key=lambda kv: -kv[1])),
        "phase_peaks_bytes": {ph: peak(ph, k) for ph in phases},
        "phase_pageable_bytes": {
            ph: first["phase_pageable_bytes"][ph]
            + k * (second["phase_pageable_bytes"][ph] - first["phase_pageable_bytes"][ph])
            for ph in phases
        },
        "per_layer_bytes": second["phase_peaks_bytes"][top] - first["phase_peaks_bytes"][top],
        "wall_s": sum(r["wall_s"] for r in runs),
    }


def estimate(args) -> dict:
    """`lowmem-rlhf estimate`'s prediction (lowmem_rlhf.model.memory.estimate_stage) for the traced settings: the
    largest of the phases the trace covers (ppo/grpo: scoring and update, generation mocked; rollout: generation)."""
    import dataclasses

    from lowmem_rlhf.config import config_from_dict
    from lowmem_rlhf.model.memory import estimate_stage, resolve_shape

    raw = {
        "model": {
            "name_or_path": args.shape,
            "logprob_chunk_size": args.chunk_size,
            "compute_dtype": args.dtype,
            "embeddings": args.embeddings,
        },
        "lora": {"r": args.lora_r, "alpha": 2 * args.lora_r, "dropout": args.lora_dropout},
    }
    if args.stage in ("sft", "rm", "dpo"):
        raw[args.stage] = {
            "batch_size": args.batch,
            "max_length": args.seq,
            "optimizer": args.optimizer,
            "gradient_accumulation_steps": 1,
        }
    else:
        pc = ppo_config(args)
        if args.stage == "rollout":
            pc = dataclasses.replace(pc, advantage="grpo" if args.rollout_of == "grpo" else "gae")
        raw["ppo"] = {**dataclasses.asdict(pc), "optimizer": args.optimizer}
    kwargs = {"sequences_per_prompt": args.responses} if args.stage == "rm" else {}
    stage = args.stage if args.stage in ("sft", "rm", "dpo") else "ppo"
    e = estimate_stage(config_from_dict(raw), resolve_shape(args.shape)[0], stage, **kwargs)
    if stage == "ppo":
        traced = (
            [p for p in e.phases if p.startswith("rollout")]
            if args.stage == "rollout"
            else [p for p in e.phases if not p.startswith("rollout")]
        )
        e.phases = {p: e.phases[p] for p in traced}
        if args.stage == "rollout":  # traced before the first update: no optimizer state yet
            e.resident = [(k, b) for k, b in e.resident if not k.startswith("optimizer state")]
    return {
        "allocated_bytes": e.allocated,
        "peak_phase": e.peak_phase,
        "phases_bytes": {p: e.phase_total(p) for p in e.phases},
        "terms_bytes": dict(e.items),
    }


def run(args) -> dict:
    result = extrapolate(args) if args.extrapolate else trace(args, args.layers)
    est = estimate(args) if result["layers"] == _depth(args.shape) else None
    out = {
        "shape": args.shape,
        "stage": args.stage,
        "settings": {k: v for k, v in vars(args).items() if k not in ("json", "extrapolate", "layers")},
        **result,
        "peak_gib": result["peak_bytes"] / GIB,
        "versions": compat.check_versions(),
    }
    if est is not None:
        out["estimate"] = {
            **est,
            "allocated_gib": est["allocated_bytes"] / GIB,
            "error": est["allocated_bytes"] / result["peak_bytes"] - 1,
        }
    return out


def beside_measurement(argvs: list[list[str]], measured_gib: float | None, paged_optimizer: bool) -> dict:
    """For a benchmark on a GPU: the traced peak of the same settings, to record beside its
    `torch.cuda.max_memory_allocated` (docs/performance.md). Each argv (a stage; PPO: its scoring and update, and
    its rollout) is traced at 2 and 3 layers and extended to the depth; the largest phase is the peak. With a paged
    optimizer the state it keeps in CUDA unified memory (which the CUDA counters do not see; `paged_state_storages`)
    is left out of every phase first. offset = measured / traced - 1 (what ops allocate inside themselves:
    workspaces, kernel temporaries; less what sampled responses shorter than the traced full length leave out).
    The tracer's `load` phase (its stand-in for loading, which quantizes on the CPU) is not compared: loading on a
    GPU is transformers' (a benchmark's measured peak covers it too; at small settings it can be the larger)."""
    best = None
    for argv in argvs:
        r = run(parse_args([*argv, "--extrapolate"]))
        pageable = r["phase_pageable_bytes"] if paged_optimizer else {}
        for phase, n in r["phase_peaks_bytes"].items():
            if phase == "load":
                continue
            n -= pageable.get(phase, 0)
            if best is None or n > best[0]:
                best = (n, f"{argv[argv.index('--stage') + 1]}: {phase}")
    traced = best[0] / GIB
    return {
        "traced_peak_gib": traced,
        "traced_phase": best[1],
        "paged_optimizer_state_left_out": paged_optimizer,
        "offset": None if measured_gib is None else measured_gib / traced - 1,
        "argvs": argvs,
    }


# ------------------------------------------------------------------------------ every stage at every shape

ALL_SHAPES = ("qwen2.5-0.5b", "llama-3.2-3b", "llama-3.1-8b", "qwen2.5-7b")
ALL_ENTRIES = ("sft", "rm", "dpo", "ppo", "grpo", "rollout-ppo", "rollout-grpo")
FALLBACK_RECIPES = "llama-3.1-8b"  # a shape without recipes/<shape>/ takes the 8B recipes' settings
RECORD = Path(__file__).parent / "results" / "memory_traced.json"
CHECK_LAYERS = (2, 3, 4)  # traced depths: the third checks that the peak is affine in the depth


def recipe_argv(shape: str, entry: str) -> tuple[list[str], str]:
    """The tracer's arguments for `entry` (a stage; rollout-ppo / rollout-grpo: the generation of the PPO or GRPO
    recipe's rollout) with the settings of recipes/<shape>/ (pipeline.yaml; grpo.yaml for GRPO), and that recipe."""
    from lowmem_rlhf.config import load_config

    root = Path(__file__).resolve().parents[1] / "recipes"
    folder = root / (shape if (root / shape).is_dir() else FALLBACK_RECIPES)
    recipe = folder / ("grpo.yaml" if entry in ("grpo", "rollout-grpo") else "pipeline.yaml")
    cfg = load_config(recipe)
    stage = {"rollout-ppo": "rollout", "rollout-grpo": "rollout"}.get(entry, entry)
    argv = ["--shape", shape, "--stage", stage, "--lora-r", str(cfg.lora.r), "--dtype", "bfloat16"]
    argv += ["--chunk-size", str(cfg.model.logprob_chunk_size), "--lora-dropout", str(cfg.lora.dropout)]
    argv += ["--embeddings", cfg.model.embeddings]
    if cfg.model.compute_dtype not in ("auto", "bfloat16") or cfg.model.quantization != "nf4":
        raise ValueError(f"{recipe}: the tracer builds NF4 models in bf16 (the CUDA default)")
    if cfg.lora.target_modules != "all-linear":
        raise ValueError(f"{recipe}: the tracer puts LoRA on all linear layers")
    section = {"sft": cfg.sft, "rm": cfg.rm, "dpo": cfg.dpo}.get(stage, cfg.ppo)
    # auto = paged 8-bit AdamW on CUDA: the same bytes as 8-bit AdamW (paging only moves them out when short)
    argv += ["--optimizer", "adamw" if section.optimizer == "adamw" else "adamw_8bit"]
    if stage in ("sft", "rm", "dpo"):
        argv += ["--batch", str(section.batch_size), "--seq", str(section.max_length)]
    else:
        pc = cfg.ppo
        argv += ["--rollout", str(pc.rollout_batch_size), "--prompt-len", str(pc.max_prompt_length)]
        argv += ["--new-tokens", str(pc.max_new_tokens), "--micro-batch", str(pc.micro_batch_size)]
        argv += ["--group-size", str(pc.group_size)]
        if stage == "rollout":
            argv += ["--rollout-of", "grpo" if entry == "rollout-grpo" else "ppo"]
    return argv, str(recipe.relative_to(root.parent))


def run_all(out: Path, shapes: list[str], entries: list[str]) -> dict:
    """Trace every entry at every shape with its recipe's settings (CHECK_LAYERS layers, extended to the depth
    after checking the rule) and write `out` after each one (entries of other shapes/stages already in `out` kept)."""
    record = json.loads(out.read_text()) if out.is_file() else {}
    record.setdefault("traces", {})
    record["how"] = (
        f"python -m benchmarks.memory --all: each stage traced with {CHECK_LAYERS[0]}, {CHECK_LAYERS[1]} and "
        f"{CHECK_LAYERS[2]} decoder layers; each phase's peak and what is alive at it were checked to lie on one "
        "line in the layer count to the byte; each phase is extended on its line to the model's depth and the "
        "largest is the peak. Settings: the recipes named; "
        f"a shape without recipes takes recipes/{FALLBACK_RECIPES}/'s. CUDA allocator's 512-byte blocks and "
        "bitsandbytes' CUDA dequantize transient modelled."
    )
    record["versions"] = compat.check_versions()
    for shape in shapes:
        for entry in entries:
            argv, recipe = recipe_argv(shape, entry)
            args = parse_args(argv)
            t0 = time.perf_counter()
            result = extrapolate(args, CHECK_LAYERS)
            record["traces"][f"{shape}/{entry}"] = {
                "shape": shape,
                "entry": entry,
                "recipe": recipe,
                "argv": argv,
                "settings": {k: v for k, v in vars(args).items() if k not in ("json", "extrapolate", "layers", "all")},
                **result,
                "peak_gib": result["peak_bytes"] / GIB,
            }
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(record, indent=1, sort_keys=False) + "\n")
            print(
                f"{shape}/{entry}: {result['peak_bytes'] / GIB:.3f} GiB in {result['peak_phase']} "
                f"({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
    return record


def error_table(record: dict) -> str:
    """docs/performance.md's table: each traced entry's peak, the estimator's and its error (estimate / traced - 1)."""
    rows = [
        "| shape | stage | recipe | traced peak (GiB) | where | estimate (GiB) | its phase | error |",
        "|" + " --- |" * 8,
    ]

    def order(r: dict) -> tuple:
        known = r["shape"] in ALL_SHAPES and r["entry"] in ALL_ENTRIES
        return (ALL_SHAPES.index(r["shape"]), ALL_ENTRIES.index(r["entry"])) if known else (len(ALL_SHAPES), 0)

    for r in sorted(record["traces"].values(), key=order):
        e = estimate(parse_args(r["argv"]))
        err = e["allocated_bytes"] / r["peak_bytes"] - 1
        rows.append(
            f"| {r['shape']} | {r['entry']} | {r['recipe']} | {r['peak_bytes'] / GIB:.3f} | {r['peak_phase']} | "
            f"{e['allocated_bytes'] / GIB:.3f} | {e['peak_phase']} | {err:+.2%} |"
        )
    return "\n".join(rows)


DOCS_BEGIN = "<!-- error table: python -m benchmarks.memory --table benchmarks/results/memory_traced.json"
DOCS_END = "<!-- end of error table -->"


def write_docs_table(docs: Path, table: str) -> None:
    """Replace the error table between DOCS_BEGIN's line and DOCS_END in `docs` (docs/performance.md)."""
    text = docs.read_text()
    start = text.index(DOCS_BEGIN)
    start = text.index("\n", start) + 1
    end = text.index(DOCS_END)
    docs.write_text(text[:start] + table + "\n" + text[end:])


def _depth(shape: str) -> int:
    from benchmarks.shapes import SHAPES

    return SHAPES[shape]["num_hidden_layers"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from benchmarks.shapes import SHAPES
    from lowmem_rlhf.config import ModelConfig

    p = argparse.ArgumentParser(prog="python -m benchmarks.memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="llama-3.1-8b", choices=list(SHAPES))
    p.add_argument("--stage", default="sft", choices=STAGES)
    p.add_argument("--batch", type=int, default=2, help="sft: sequences per step; rm/dpo: pairs per step")
    p.add_argument(
        "--seq", type=int, default=2048, help="sft/rm/dpo: tokens per sequence (the second half is response)"
    )
    p.add_argument("--steps", type=int, default=2, help="sft/rm/dpo: optimizer steps (the second has optimizer state)")
    p.add_argument("--rollout", type=int, default=16, help="ppo/grpo/rollout: prompts per iteration")
    p.add_argument("--group-size", type=int, default=4, help="grpo: samples per prompt")
    p.add_argument(
        "--rollout-of",
        default="ppo",
        choices=["ppo", "grpo"],
        help="rollout: the bank and sequences of a PPO or GRPO run",
    )
    p.add_argument("--responses", type=int, default=2, help="rm: sequences per prompt (2: pairs; K: a K-way ranking)")
    p.add_argument("--prompt-len", type=int, default=256, help="ppo/grpo/rollout: prompt tokens")
    p.add_argument("--new-tokens", type=int, default=256, help="ppo/grpo/rollout: response tokens")
    p.add_argument("--micro-batch", type=int, default=4, help="ppo/grpo: micro- and mini-batch size")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-dropout", type=float, default=0.0, help="lora.dropout (PPO, GRPO and DPO turn it off)")
    p.add_argument("--chunk-size", type=int, default=ModelConfig.logprob_chunk_size, help="model.logprob_chunk_size")
    p.add_argument(
        "--optimizer", default=None, choices=["adamw", "adamw_8bit"], help="default: adamw_8bit for sft, adamw for ppo"
    )
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument(
        "--embeddings",
        default=ModelConfig.embeddings,
        choices=["auto", "host", "device"],
        help="model.embeddings on a CUDA device (auto: host unless tied to lm_head)",
    )
    p.add_argument("--layers", type=int, default=None, help="trace this many decoder layers")
    p.add_argument("--extrapolate", action="store_true", help="trace 2 and 3 layers and extend to the full depth")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument(
        "--all",
        nargs="?",
        const=str(RECORD),
        default=None,
        metavar="OUT",
        help="trace every stage at every shape with its recipe's settings into OUT "
        "(default benchmarks/results/memory_traced.json)",
    )
    p.add_argument("--table", metavar="RECORD", help="print the estimator's error against a --all record, and exit")
    p.add_argument("--docs", metavar="MD", help="with --table: write the table into MD (docs/performance.md)")
    p.add_argument("--only", default=None, help="with --all: comma-separated shapes and/or entries to (re)trace")
    args = p.parse_args(argv)
    if args.optimizer is None:
        args.optimizer = "adamw_8bit" if args.stage in ("sft", "rm", "dpo") else "adamw"
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.all:
        only = set(args.only.split(",")) if args.only else set()
        shapes = [s for s in ALL_SHAPES if not only & set(ALL_SHAPES) or s in only]
        entries = [e for e in ALL_ENTRIES if not only & set(ALL_ENTRIES) or e in only]
        record = run_all(Path(args.all), shapes, entries)
        print(error_table(record))
        return record
    if args.table:
        table = error_table(json.loads(Path(args.table).read_text()))
        print(table)
        if args.docs:
            write_docs_table(Path(args.docs), table)
        return {}
    result = run(args)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(
            f"{args.stage} {args.shape} ({result['layers']} layers): traced peak {result['peak_gib']:.3f} GiB "
            f"in {result['peak_phase']} ({result['wall_s']:.0f} s)"
        )
        for cat, n in result["alive_at_peak_bytes"].items():
            print(f"  {n / GIB:8.3f} GiB  {cat}")
        if "estimate" in result:
            e = result["estimate"]
            print(f"  estimate {e['allocated_gib']:.3f} GiB ({e['error']:+.1%})")
    return result


if __name__ == "__main__":
    main()
