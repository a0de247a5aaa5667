"""Peak GPU memory of each stage, predicted from the model's config.json alone (no weights loaded).

A stage's peak is what is alive for the whole stage plus the largest of its phases, each phase counting
the tensors alive in it (in bytes, from shapes, each tensor in the CUDA caching allocator's 512-byte
blocks):

- resident: the frozen base (quantized linear weights: NF4/FP4 half a byte per weight, their
  quantization constants; embeddings, `lm_head` unless tied, norms, biases and rotary buffers in the
  compute dtype; an input-embedding table in host memory, `model.embeddings`, is not counted), the fp32
  LoRA adapters of every role the stage holds, bias-free fp32 scalar heads,
  the trainable roles' optimizer state, and their fp32 gradients when micro-batches accumulate;
- a training pass under gradient checkpointing (`Activations`): a log-prob chunk (every layer's checkpointed
  input, the final norm, one chunk's logits: in bf16 the head's output and an eighth of it in fp32, 2.5
  bytes per logit, 3 with the logged entropy's softmax) or the backward of one recomputed layer (its saved
  tensors and MLP gradients);
- RL: the rollout's prefill (KV cache of the prompts, one layer's forward) and last decode step (the
  full KV cache, one layer's K and V being extended, the last position's logits), the scoring passes.

The phases and their sizes are those `benchmarks/memory.py` traces in the stages' own code on fake
tensors; `tests/test_estimate.py` holds every stage at four real shapes within 5% of the recorded traces.
Sequences are assumed to fill `max_length` (RL: the prompt limit plus `max_new_tokens`), so the
prediction is the peak of a run whose batches are full; shorter data peaks lower. The CUDA context is
added when deciding whether a stage fits.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

from lowmem_rlhf.builtins import is_builtin, model_path, model_shape
from lowmem_rlhf.config import ModelConfig, RecipeConfig
from lowmem_rlhf.errors import UserError
from lowmem_rlhf.estimators import ESTIMATORS
from lowmem_rlhf.model.shapes import HUB_ALIASES, SHAPES

logger = logging.getLogger(__name__)

GiB = 2**30
CUDA_CONTEXT = 0.5 * GiB  # CUDA context + cuBLAS workspace: outside PyTorch's allocator
FRAGMENTATION = 1.05  # allocator slack on top of the allocated peak when deciding "fits"
BLOCK = 64  # bitsandbytes 4-bit block size
NESTED_BLOCK = 256  # blocks per fp32 constant under double quantization
ALLOC_BLOCK = 512  # the CUDA caching allocator's granularity
MIN_8BIT_SIZE = 4096  # bitsandbytes keeps optimizer state of smaller tensors in 32 bits
LOGIT_PIECES = 8  # ops.logprobs._PIECES: a low-precision chunk's logits are made fp32 this fraction of rows at a time
FUSED_MODEL_TYPES = ("phi3",)  # one qkv_proj and one gate_up_proj per layer
GEMMA_MODEL_TYPES = ("gemma2", "gemma3_text")  # RMSNorm before and after attention and MLP; embedding scale


@dataclass(frozen=True)
class Shape:
    """What memory depends on in a Llama/Qwen2/Mistral/Gemma/Phi-3-style decoder.

    fused: q/k/v and gate/up are single linear layers (`qkv_proj`, `gate_up_proj`: Phi-3), which also
    changes how many LoRA modules an adapter has; norms_per_layer: RMSNorm weights per decoder layer
    (2; Gemma-2/3 norm before and after both attention and MLP: 4); embed_scale: Gemma's fp32
    embedding-scale buffer.
    """

    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    fused: bool = False
    norms_per_layer: int = 2
    embed_scale: bool = False

    @classmethod
    def from_config(cls, config: dict) -> Shape:
        missing = [
            k
            for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
            if k not in config
        ]
        if missing:
            raise UserError(
                f"config.json lacks {', '.join(missing)}; `estimate` knows decoder-only models "
                "(Llama, Qwen2, Mistral style)"
            )
        heads = config["num_attention_heads"]
        return cls(
            vocab=config["vocab_size"],
            hidden=config["hidden_size"],
            intermediate=config["intermediate_size"],
            layers=config["num_hidden_layers"],
            heads=heads,
            kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            tied=bool(config.get("tie_word_embeddings", False)),
            qkv_bias=config.get("model_type") == "qwen2" or bool(config.get("attention_bias", False)),
            o_bias=bool(config.get("attention_bias", False)),
            mlp_bias=bool(config.get("mlp_bias", False)),
            fused=config.get("model_type") in FUSED_MODEL_TYPES,
            norms_per_layer=4 if config.get("model_type") in GEMMA_MODEL_TYPES else 2,
            embed_scale=config.get("model_type") in GEMMA_MODEL_TYPES,
        )

    def linears(self) -> list[tuple[str, int, int, bool]]:
        """(name, in_features, out_features, has_bias) of one decoder layer's linear layers."""
        d, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        if self.fused:
            return [
                ("qkv_proj", d, q + 2 * kv, self.qkv_bias),
                ("o_proj", q, d, self.o_bias),
                ("gate_up_proj", d, 2 * i, self.mlp_bias),
                ("down_proj", i, d, self.mlp_bias),
            ]
        return [
            ("q_proj", d, q, self.qkv_bias),
            ("k_proj", d, kv, self.qkv_bias),
            ("v_proj", d, kv, self.qkv_bias),
            ("o_proj", q, d, self.o_bias),
            ("gate_proj", d, i, self.mlp_bias),
            ("up_proj", d, i, self.mlp_bias),
            ("down_proj", i, d, self.mlp_bias),
        ]


def resolve_shape(name_or_path: str) -> tuple[Shape, str]:
    """(shape, where it came from) for a known shape name, a Hub id with a known shape, a `builtin:` model,
    a local folder with config.json, or a Hub id whose config.json is in the local Hub cache. Offline."""
    if name_or_path in SHAPES:
        return Shape.from_config(SHAPES[name_or_path]), f"known shape {name_or_path}"
    if name_or_path in HUB_ALIASES:
        key = HUB_ALIASES[name_or_path]
        return Shape.from_config(SHAPES[key]), f"known shape {key}"
    if is_builtin(name_or_path):
        registered = model_shape(name_or_path)
        if registered is not None:
            return Shape.from_config(registered), f"the bundled model {name_or_path}"
        name_or_path = model_path(name_or_path)  # no registered shape: build it and read its config.json
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"{path} has no config.json; point model.name_or_path at a model folder")
        return Shape.from_config(json.loads((path / "config.json").read_text())), str(path / "config.json")
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name_or_path, "config.json")
    except Exception:  # not a valid repo id
        cached = None
    if isinstance(cached, str):
        return Shape.from_config(json.loads(Path(cached).read_text())), cached
    raise UserError(
        f"no config.json for {name_or_path!r} on this machine; pass --shape with one of {', '.join(SHAPES)}, "
        "a local model folder, or download the model's config.json once "
        f"(`huggingface-cli download {name_or_path} config.json`)"
    )


# ----------------------------------------------------------------------------------------------------
# the terms


def quantized_weight_bytes(shape: Shape, quantization: str, double_quant: bool, compute_bytes: int) -> dict:
    """Bytes of the decoder's linear weights: {"weights": packed data, "constants": quantization state}."""
    weights = constants = 0
    for _, fin, fout, _ in shape.linears():
        n = fin * fout
        if quantization in ("nf4", "fp4"):
            blocks = math.ceil(n / BLOCK)
            weights += math.ceil(n / 2)
            if double_quant:
                # uint8 absmax per block; fp32 absmax per 256 blocks; 256-entry fp32 code; fp32 offset
                constants += blocks + 4 * math.ceil(blocks / NESTED_BLOCK) + 4 * 256 + 4
            else:
                constants += 4 * blocks
            constants += 4 * 16  # the 16-value NF4/FP4 code
        elif quantization == "int8":
            weights += n
            constants += 4 * fout  # one fp32 scale per output row
        else:
            weights += n * compute_bytes
    return {"weights": weights * shape.layers, "constants": constants * shape.layers}


def embeddings_on_host(setting: str, device_type: str, tied: bool, compiled_decoding: bool = False) -> bool:
    """Whether `model.embeddings` puts the input-embedding table in host memory.

    auto: on a CUDA device, when the table is not the tied `lm_head` and the rollout's decode step is not
    compiled (its CUDA graph would be left for a host lookup at every token); device: never; host: always
    (refused when tied).
    """
    if setting == "device":
        return False
    if setting == "host":
        if tied:
            raise UserError(
                "model.embeddings is 'host' but this model's input embeddings are its lm_head (tied weights), which "
                "every forward multiplies by on the device; use model.embeddings: auto or device"
            )
        return True
    return device_type == "cuda" and not tied and not compiled_decoding


def unquantized_bytes(shape: Shape, compute_bytes: int) -> int:
    """Embeddings, lm_head (unless tied), RMSNorm weights and biases: kept in the compute dtype."""
    d = shape.hidden
    embeddings = shape.vocab * d * (1 if shape.tied else 2)
    norms = (shape.norms_per_layer * shape.layers + 1) * d
    biases = shape.layers * sum(fout for _, _, fout, bias in shape.linears() if bias)
    return (embeddings + norms + biases) * compute_bytes


def buffer_bytes(shape: Shape) -> int:
    """The rotary embedding's fp32 inverse frequencies (`inv_freq` and `original_inv_freq`), and Gemma's
    embedding scale (one fp32 scalar)."""
    return 2 * (shape.head_dim // 2) * 4 + 4 * shape.embed_scale


def lora_tensors(shape: Shape, r: int, targets: list[str] | str) -> list[int]:
    """Element counts of one adapter's LoRA A and B matrices."""
    out = []
    for name, fin, fout, _ in shape.linears():
        if targets == "all-linear" or name in targets:
            out += [r * fin, fout * r]
    return out * shape.layers


def rounded(n: int) -> int:
    """Bytes the CUDA caching allocator gives a tensor of n bytes: whole 512-byte blocks."""
    return -(-n // ALLOC_BLOCK) * ALLOC_BLOCK


def tensor_bytes(sizes: list[int]) -> int:
    """Allocated bytes of tensors of these byte sizes."""
    return sum(rounded(n) for n in sizes)


def base_tensors(
    shape: Shape, quantization: str, double_quant: bool, cb: int, host_embeddings: bool = False
) -> dict[str, list[int]]:
    """Byte sizes of the frozen base's device tensors, by kind (one entry per tensor, all layers).
    host_embeddings: the input-embedding table is in host memory (`model.placement`), not on the device."""
    quant, consts, other = [], [], []
    for _, fin, fout, bias in shape.linears():
        n = fin * fout
        if quantization in ("nf4", "fp4"):
            blocks = math.ceil(n / BLOCK)
            quant.append(math.ceil(n / 2))
            if double_quant:  # uint8 absmax, fp32 absmax of its blocks, the 256-entry fp32 code, the fp32 offset
                consts += [blocks, 4 * math.ceil(blocks / NESTED_BLOCK), 4 * 256, 4]
            else:
                consts.append(4 * blocks)
            consts.append(4 * 16)  # the 16-value NF4/FP4 code
        elif quantization == "int8":
            quant.append(n)
            consts.append(4 * fout)
        else:
            quant.append(n * cb)
        if bias:
            other.append(fout * cb)
    other += [shape.hidden * cb] * shape.norms_per_layer
    top = [shape.vocab * shape.hidden * cb] * (1 if shape.tied or host_embeddings else 2) + [shape.hidden * cb]
    buffers = [4 * (shape.head_dim // 2)] * 2 + [4] * shape.embed_scale
    L = shape.layers
    return {"weights": quant * L, "constants": consts * L, "unquantized": other * L + top, "buffers": buffers}


def optimizer_state_bytes(tensors: list[int], optimizer: str) -> int:
    """Allocated bytes of the optimizer state of fp32 parameters with these element counts."""
    if optimizer == "adamw":  # two fp32 moments and a step counter (a 0-d tensor) per parameter
        return sum(2 * rounded(4 * n) + rounded(4) for n in tensors)
    # bitsandbytes 8-bit AdamW: two uint8 moments with an fp32 maximum per 256 elements, two shared 256-entry
    # fp32 maps; tensors under 4096 elements keep two fp32 moments
    state = sum(
        2 * (rounded(n) + rounded(4 * math.ceil(n / 256))) if n >= MIN_8BIT_SIZE else 2 * rounded(4 * n)
        for n in tensors
    )
    return state + 2 * rounded(4 * 256)


@dataclass(frozen=True)
class Activations:
    """What a pass over `seqs` sequences of `length` tokens keeps alive, by phase (module docstring)."""

    shape: Shape
    cb: int
    seqs: int
    length: int
    chunk: int
    lora_r: int
    dropout: bool
    dequantized: int = 0  # bytes of down_proj's weight as a 4-bit layer's backward dequantizes it (else 0)

    @property
    def tokens(self) -> int:
        return self.seqs * self.length

    def unit(self, width: int, nbytes: int | None = None) -> int:
        return rounded(self.tokens * width * (self.cb if nbytes is None else nbytes))

    def common(self) -> list[tuple[str, int]]:
        """The rotary cos/sin of every position (compute dtype)."""
        return [("activations: rotary cos/sin", 2 * self.unit(self.shape.head_dim))]

    def checkpointed(self) -> list[tuple[str, int]]:
        """Gradient checkpointing keeps every decoder layer's input."""
        return [("activations: checkpointed layer inputs", self.shape.layers * self.unit(self.shape.hidden))]

    def chunk_tokens(self, response_only: bool) -> int:
        """Tokens of one log-prob chunk: chunk // seqs positions of every row (at least one), within the rows."""
        positions = max(1, self.chunk // max(self.seqs, 1))
        span = self.length // 2 if response_only else self.length - 1
        return self.seqs * min(positions, span)

    def logprob_chunk(self, response_only: bool, grad: bool, entropy: bool = False) -> list[tuple[str, int]]:
        """A log-prob chunk (ops.logprobs._ChunkLogprobs) at its largest, forward or backward: the head's output
        for the chunk's tokens and, in a low-precision dtype, the fp32 copy of an eighth of its rows (the
        backward writes the gradient into the output's storage): 2.5 bytes per logit in bf16; fp32 logits are
        worked on in place, 4 bytes. `entropy`: the logged entropy's softmax of one such eighth beside it (in
        the forward; PPO's update). The final norm's fp32 input and output."""
        s, d = self.shape, self.shape.hidden
        c = self.chunk_tokens(response_only)
        piece = -(-c // LOGIT_PIECES)  # rows of one eighth (torch.split's size)
        if self.cb == 4:  # fp32 head: one piece, in place; the entropy's softmax an eighth at a time
            logits = [("log-probs: one chunk's logits (fp32)", rounded(c * s.vocab * 4))]
        else:
            logits = [
                ("log-probs: one chunk's logits (compute dtype)", rounded(c * s.vocab * self.cb)),
                ("log-probs: an eighth of them in fp32", rounded(piece * s.vocab * 4)),
            ]
        if entropy:
            logits.append(("log-probs: the logged entropy's softmax of an eighth (fp32)", rounded(piece * s.vocab * 4)))
        items = [
            *logits,
            ("activations: final norm (fp32 input, output)", self.unit(d, 4) + self.unit(d)),
        ]
        if grad:
            items.append(("activations: causal mask", rounded(self.seqs * self.length**2)))
            if not response_only:  # the gradient of the shifted hidden states, (b, t - 1, d)
                items.append(
                    (
                        "activations: gradient of the shifted hidden states",
                        rounded(self.seqs * (self.length - 1) * d * self.cb),
                    )
                )
        return items

    def recomputed_layer(self) -> list[tuple[str, int]]:
        """One decoder layer recomputed in the backward pass, at its MLP's backward: the layer's saved tensors
        (norm outputs, q and rotated q, k and v repeated to every query head, attention output, gate/up and their
        activation, the residual) with its MLP gradients, two fp32 norm inputs, the float and boolean masks.
        Six intermediate-wide tensors are alive at once in the MLP's backward, or five beside `down_proj`'s
        dequantized weight while a 4-bit `down_proj` makes its input's gradient: whichever is larger."""
        s = self.shape
        d, q, i = s.hidden, s.heads * s.head_dim, s.intermediate
        gqa = 2 * q if s.kv_heads < s.heads else 2 * s.kv_heads * s.head_dim
        mlp = 5 * self.unit(i) + max(self.unit(i), rounded(self.dequantized))
        items = [
            ("activations: recomputed layer (compute dtype)", self.unit(3 * d + 2 * q + gqa) + mlp),
            ("activations: recomputed layer's fp32 norm inputs", 2 * self.unit(d, 4)),
            ("activations: attention masks", rounded(3 * self.seqs * self.length**2)),
            ("activations: attention log-sum-exp (fp32)", rounded(4 * self.seqs * s.heads * self.length)),
            ("activations: LoRA A outputs", 8 * self.unit(self.lora_r)),
        ]
        if self.dropout:  # each LoRA input's dropped-out copy and its mask, and two gradients of them
            items.append(("activations: LoRA dropout copies and masks", self.unit(2 * (5 * d + q) + 2 * d)))
        return items

    def prefill_layer(self) -> list[tuple[str, int]]:
        """One decoder layer's forward without gradients (prefill, scoring): four intermediate-wide and four
        hidden-wide tensors at its MLP."""
        return [
            (
                "activations: one layer's forward",
                4 * self.unit(self.shape.intermediate) + 4 * self.unit(self.shape.hidden),
            )
        ]


@dataclass
class StageEstimate:
    """The peak of a stage: `resident` (alive for the whole stage) plus the largest of `phases`."""

    stage: str
    resident: list[tuple[str, int]] = field(default_factory=list)
    phases: dict[str, list[tuple[str, int]]] = field(default_factory=dict)
    batch_key: str = ""
    batch: int = 0
    length_key: str = ""
    length: int = 0

    def phase_total(self, name: str) -> int:
        return sum(b for _, b in self.resident) + sum(b for _, b in self.phases[name])

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phase_total)

    @property
    def items(self) -> list[tuple[str, int]]:
        """(what, bytes) alive at the peak: the resident terms and the peak phase's, summing to `allocated`."""
        return self.resident + self.phases[self.peak_phase]

    @property
    def allocated(self) -> int:
        return self.phase_total(self.peak_phase)

    @property
    def torch_allocated(self) -> int:
        """The part `torch.cuda.max_memory_allocated` sees: paged optimizer state lives in CUDA unified
        memory, outside PyTorch's allocator (it still occupies the card until it is paged out)."""
        return sum(b for k, b in self.items if not k.startswith("optimizer state (paged"))

    @property
    def device_total(self) -> int:
        """What the card must hold: the allocated peak, allocator slack and the CUDA context."""
        return int(self.allocated * FRAGMENTATION) + CUDA_CONTEXT


def compute_bytes_of(cfg: RecipeConfig) -> int:
    return {"auto": 2, "bfloat16": 2, "float16": 2, "float32": 4}[cfg.model.compute_dtype]


def optimizer_name(name: str) -> str:
    return "paged_adamw_8bit" if name == "auto" else name  # auto = paged 8-bit AdamW on CUDA


def estimate_stage(
    cfg: RecipeConfig,
    shape: Shape,
    stage: str,
    *,
    batch: int | None = None,
    length: int | None = None,
    sequences_per_prompt: int = 2,
) -> StageEstimate:
    """The peak of `stage` (sft, rm, ppo, dpo), optionally at another batch size or sequence length.

    rm: `sequences_per_prompt` responses of each of rm.batch_size prompts go through one pass (2: pairs; K: a
    K-way ranking trained as a group). ppo: the peak of its rollout, scoring and update phases.
    """
    mc, lc = cfg.model, cfg.lora
    cb = compute_bytes_of(cfg)
    host = embeddings_on_host(mc.embeddings, "cuda", shape.tied, stage == "ppo" and cfg.ppo.compile_generation)
    base = base_tensors(shape, mc.quantization, mc.double_quant, cb, host)
    resident = [
        (
            "base: quantized linear weights" if mc.quantization != "none" else "base: linear weights",
            tensor_bytes(base["weights"]),
        ),
        ("base: quantization constants", tensor_bytes(base["constants"])),
        (
            "base: lm_head, norms (unquantized; embeddings in host memory)"
            if host
            else "base: embeddings, lm_head, norms (unquantized)",
            tensor_bytes(base["unquantized"]) + tensor_bytes(base["buffers"]),
        ),
    ]
    adapter = lora_tensors(shape, lc.r, lc.target_modules)
    adapter_bytes = tensor_bytes([4 * n for n in adapter])
    head = rounded(4 * shape.hidden)  # a bias-free fp32 Linear(d, 1)

    def trained(trainable: int, n_heads: int, opt: str, accumulating: bool) -> list[tuple[str, int]]:
        """Optimizer state of the trainable adapters and heads (alive for the whole stage), and their fp32
        gradients, alive through the passes when a step accumulates several micro-batches."""
        tensors = adapter * trainable + [shape.hidden] * n_heads
        items = [(f"optimizer state ({optimizer_name(opt)})", optimizer_state_bytes(tensors, optimizer_name(opt)))]
        if accumulating:
            items.append(
                ("gradients of trainable LoRA/head (fp32, accumulated)", tensor_bytes([4 * n for n in tensors]))
            )
        return items

    # a 4-bit linear's backward dequantizes its weight to the compute dtype to make its input's gradient
    dequantized = shape.intermediate * shape.hidden * cb if mc.quantization in ("nf4", "fp4") else 0

    def acts(seqs: int, seq_len: int, dropout: bool) -> Activations:
        return Activations(shape, cb, seqs, seq_len, mc.logprob_chunk_size, lc.r, dropout, dequantized)

    def train_phases(
        a: Activations, logits: bool, response_only: bool = False, entropy: bool = False
    ) -> dict[str, list[tuple[str, int]]]:
        """A training pass with gradient checkpointing: the log-prob chunk's backward, then each layer's."""
        phases = {"backward: recomputed layer": a.checkpointed() + a.common() + a.recomputed_layer()}
        if logits:
            chunk = a.logprob_chunk(response_only, True, entropy)
            phases["backward: log-prob chunk"] = a.checkpointed() + a.common() + chunk
        return phases

    dropout = lc.dropout > 0
    if stage in ("sft", "rm", "dpo"):
        sc = {"sft": cfg.sft, "rm": cfg.rm, "dpo": cfg.dpo}[stage]
        b, s = batch or sc.batch_size, length or sc.max_length
        accumulating = sc.gradient_accumulation_steps > 1
        if stage == "sft":
            resident += [("LoRA adapters (fp32): policy", adapter_bytes)]
            resident += trained(1, 0, sc.optimizer, accumulating)
            phases = train_phases(acts(b, s, dropout), logits=True)
        elif stage == "rm":
            resident += [("LoRA adapters (fp32): reward", adapter_bytes), ("score head", head)]
            resident += trained(1, 1, sc.optimizer, accumulating)
            phases = train_phases(acts(sequences_per_prompt * b, s, dropout), logits=False)
        else:  # chosen and rejected in one pass, through the policy and the reference (dropout off)
            resident += [("LoRA adapters (fp32): policy, reference", 2 * adapter_bytes)]
            resident += trained(1, 0, sc.optimizer, accumulating)
            a = acts(2 * b, s, False)
            phases = train_phases(a, logits=True)
            phases["reference forward"] = a.common() + a.logprob_chunk(False, False)
        return StageEstimate(stage, resident, phases, f"{stage}.batch_size", b, f"{stage}.max_length", s)
    if stage == "ppo":
        pc = cfg.ppo
        mb = batch or pc.micro_batch_size
        new = length or pc.max_new_tokens
        p_len = pc.max_prompt_length
        s = p_len + new
        estimator = ESTIMATORS[pc.advantage]
        critic = estimator.critic and pc.critic == "separate"
        # no reward role (nor its head) when the score comes from reward functions alone
        roles = ["policy", "reference"] + (["reward"] if pc.reward_model else []) + (["value"] if critic else [])
        heads = pc.reward_model + estimator.critic  # reward head, and the value head (separate or shared)
        resident += [
            (f"LoRA adapters (fp32): {', '.join(roles)}", len(roles) * adapter_bytes),
            ("score/value heads", heads * head),
        ]
        resident += trained(1 + critic, int(estimator.critic), pc.optimizer, pc.mini_batch_size > mb)
        n_rollout = pc.rollout_batch_size * estimator.samples_per_prompt(pc.group_size)
        # sequences of the largest generate call; a compiled rollout fills its short calls up to the batch size
        n_gen = min(pc.generation_batch_size or n_rollout, n_rollout)
        if pc.compile_generation and pc.generation_batch_size:
            n_gen = pc.generation_batch_size
        kv_row = 2 * shape.layers * shape.kv_heads * shape.head_dim * cb  # K and V of one position, every layer
        prefill = acts(n_gen, p_len, False)
        static = pc.generation_cache == "static"
        phases = {
            "rollout: prefill": [
                ("rollout: KV cache", n_gen * (s if static else p_len) * kv_row),
                *prefill.common(),
                *prefill.prefill_layer(),
            ],
            # the last step: the cache at its full length (the dynamic one holds every position but the last
            # token's), and either the step's logits being sampled (compute dtype, three fp32 copies) or, in a
            # layer's MLP, the last step's fp32 logits and probabilities beside bitsandbytes' dequantized weight
            "rollout: last decode step": [
                ("rollout: KV cache", n_gen * (s if static else s - 1) * kv_row),
                (
                    "rollout: sampling logits, or the previous step's beside the dequantized largest weight",
                    max(
                        n_gen * shape.vocab * (cb + 12),
                        n_gen * shape.vocab * 8 + max(fi * fo for _, fi, fo, _ in shape.linears()) * cb,
                    ),
                ),
            ],
        }
        update = acts(mb, s, False)
        phases["scoring"] = update.common() + update.logprob_chunk(True, False)
        # the update logs the policy's entropy (no graph) from the chunks' forward
        for name, items in train_phases(update, logits=True, response_only=True, entropy=True).items():
            phases[f"update {name}"] = items
        if critic and pc.mini_batch_size <= mb:  # (accumulated gradients are resident already)
            # a separate critic's pass follows the policy's backward: the policy's gradients are alive in its
            grads = tensor_bytes([4 * n for n in adapter])
            phases["update backward: recomputed layer"].append(("gradients of the policy's LoRA (fp32)", grads))
        buffers = ("rollout buffers (ids, log-probs, values, advantages)", n_rollout * s * (8 + 4 * 6))
        for name in phases:
            if not name.startswith("rollout"):
                phases[name].append(buffers)
        return StageEstimate(stage, resident, phases, "ppo.micro_batch_size", mb, "ppo.max_new_tokens", new)
    raise ValueError(f"no memory model for stage {stage!r}")


def largest_fitting(
    cfg: RecipeConfig, shape: Shape, stage: str, card: int, what: str, sequences_per_prompt: int = 2
) -> int:
    """The largest batch size (what="batch") or sequence length (what="length") whose peak, the largest of the
    stage's phases, fits `card` bytes; 0 when even 1 does not."""

    def fits(n: int) -> bool:
        e = estimate_stage(cfg, shape, stage, sequences_per_prompt=sequences_per_prompt, **{what: n})
        return e.device_total <= card

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi <= 1 << 20 and fits(hi):
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def parse_size(text: str) -> int:
    """'16GB', '16G', '16GiB', '24' (GB) -> bytes (GB = GiB here: card sizes are powers of two)."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    scale = {"G": GiB, "M": 2**20, "T": 2**40}
    try:
        if t and t[-1] in scale:
            return int(float(t[:-1]) * scale[t[-1]])
        return int(float(t) * GiB)
    except ValueError:
        raise UserError(f"--gpu-memory: cannot read {text!r}; write it like 16GB or 24") from None


def gb(n: int) -> str:
    return f"{n / GiB:.2f} GB"


def resolve_model_shape(mc: ModelConfig) -> tuple[Shape, str]:
    """`resolve_shape` for a recipe's base; a GGUF base is sized from its file's header, without converting it."""
    from lowmem_rlhf.model.gguf import gguf_path, names_gguf, require_gguf_reader

    if not names_gguf(mc) or is_builtin(mc.name_or_path):
        return resolve_shape(mc.name_or_path)
    from transformers import AutoConfig

    path = gguf_path(mc)
    require_gguf_reader(str(path))
    config = AutoConfig.from_pretrained(str(path.parent), gguf_file=str(path))
    return Shape.from_config(config.to_dict()), f"{path} (its GGUF header)"


def estimate_recipe(
    cfg: RecipeConfig, stages: list[str], shape_name: str | None = None, sequences_per_prompt: int = 2
) -> tuple[Shape, str, list]:
    shape, source = resolve_shape(shape_name) if shape_name else resolve_model_shape(cfg.model)
    return shape, source, [estimate_stage(cfg, shape, s, sequences_per_prompt=sequences_per_prompt) for s in stages]


def check_fits(cfg: RecipeConfig, stage: str, device) -> None:
    """Before a stage loads the model on a GPU: warn when the estimate says the run will not fit.

    Under N data-parallel processes the estimate is one process's (global batch sizes divided by N),
    and sizes that N does not divide are refused here, before the model loads.
    """
    import torch

    from lowmem_rlhf import distributed

    cfg = distributed.per_device_config(cfg, distributed.state().world, [stage])
    if device.type != "cuda":
        return
    try:
        shape, _ = resolve_model_shape(cfg.model)
    except UserError:
        logger.debug("memory check skipped: no config.json for %s yet", cfg.model.name_or_path)
        return
    e = estimate_stage(cfg, shape, stage)
    _, total = torch.cuda.mem_get_info(device)
    if e.device_total > total:
        fit = largest_fitting(cfg, shape, stage, total, "batch")
        hint = f"largest {e.batch_key} that fits: {fit}" if fit else f"even {e.batch_key}=1 does not fit"
        logger.warning(
            "%s: predicted peak %s (allocated %s + slack + CUDA context) exceeds this GPU's %s; %s "
            "(see `lowmem-rlhf estimate`). Trying anyway.",
            stage,
            gb(e.device_total),
            gb(e.allocated),
            gb(total),
            hint,
        )


def prediction_record(cfg: RecipeConfig, shape_name: str, stage: str, measured_gib: float | None) -> dict:
    """For the benchmarks: the prediction of what `torch.cuda.max_memory_allocated` will see, its
    breakdown and its relative error against a measured peak (the target is within 10%)."""
    e = estimate_stage(cfg, resolve_shape(shape_name)[0], stage)
    predicted = e.torch_allocated / GiB
    return {
        "predicted_allocated_gib": predicted,
        "breakdown_gib": {k: v / GiB for k, v in e.items},
        "error": None if measured_gib is None else predicted / measured_gib - 1,
    }
