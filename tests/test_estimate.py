"""`estimate`: hand-computed breakdowns for two real shapes; byte counts equal the tiny 4-bit model's."""

import json
from dataclasses import replace

import pytest
import yaml
from conftest import REPO, loaded_bytes

from lowmem_rlhf.cli import main
from lowmem_rlhf.config import LoRAConfig, ModelConfig, config_from_dict
from lowmem_rlhf.errors import UserError
from lowmem_rlhf.model.bank import AdapterBank, lora_config
from lowmem_rlhf.model.loading import load_base
from lowmem_rlhf.model.memory import (
    GiB,
    buffer_bytes,
    estimate_stage,
    largest_fitting,
    lora_tensors,
    parse_size,
    quantized_weight_bytes,
    resolve_shape,
    unquantized_bytes,
)


def cfg(**sections):
    data = {"model": {"name_or_path": "llama-3.1-8b"}, "lora": {"r": 16, "dropout": 0.0}}
    for key, value in sections.items():
        data.setdefault(key, {}).update(value)
    return config_from_dict(data)


def test_llama_3_1_8b_by_hand():
    shape, source = resolve_shape("meta-llama/Llama-3.1-8B-Instruct")
    assert source == "known shape llama-3.1-8b" and not shape.tied and shape.kv_heads == 8
    # per layer: q, o 4096x4096; k, v 4096x1024; gate, up, down 4096x14336 -> 218,103,808 weights
    weights = 32 * (2 * 16_777_216 + 2 * 4_194_304 + 3 * 58_720_256)
    assert weights == 6_979_321_856
    # double quant, per tensor: one uint8 absmax per 64 weights, one fp32 per 256 blocks, a 256-entry
    # fp32 code, an fp32 offset and the 16-entry fp32 NF4 code: q 262144 + 4096 + 1092 = 267332 bytes
    per_layer_constants = 2 * 267_332 + 2 * 67_652 + 3 * 932_932
    q = quantized_weight_bytes(shape, "nf4", True, 2)
    assert q == {"weights": weights // 2, "constants": 32 * per_layer_constants}
    # without double quant: an fp32 absmax per 64 weights (+ the NF4 code)
    assert quantized_weight_bytes(shape, "nf4", False, 2)["constants"] == 4 * weights // 64 + 32 * 7 * 64
    assert quantized_weight_bytes(shape, "int8", False, 2) == {
        "weights": weights,
        "constants": 32 * 4 * (4096 + 1024 + 1024 + 4096 + 14336 + 14336 + 4096),  # fp32 scale per output row
    }
    # untied embeddings and lm_head, 65 RMSNorms, bf16
    assert unquantized_bytes(shape, 2) == 2 * (2 * 128_256 * 4096 + 65 * 4096)
    # LoRA r=16 on all seven linears: 16 x (in + out) each -> 1,310,720 per layer, 41.9M in all
    assert sum(lora_tensors(shape, 16, "all-linear")) == 32 * 1_310_720 == 41_943_040
    assert sum(lora_tensors(shape, 16, ["q_proj", "v_proj"])) == 32 * 16 * (8192 + 5120)

    # SFT with 32-bit AdamW, batch 1 x 1024 tokens, log-probs in 1024-token chunks, no LoRA dropout, one
    # micro-batch per step (no gradients alive through the passes)
    e = estimate_stage(
        cfg(
            sft={"batch_size": 1, "max_length": 1024, "optimizer": "adamw", "gradient_accumulation_steps": 1},
            model={"logprob_chunk_size": 1024},
        ),
        shape,
        "sft",
    )
    lora = 41_943_040
    resident = dict(e.resident)
    assert resident["LoRA adapters (fp32): policy"] == 4 * lora
    # two fp32 moments per element and a 0-d step counter (one 512-byte block) per tensor (32 layers x 14)
    assert resident["optimizer state (adamw)"] == 8 * lora + 32 * 14 * 512
    assert not any(k.startswith("gradients") for k in resident)
    # the unquantized tensors in 512-byte blocks: lm_head, 65 norms (8192 B each), two rotary buffers; on a GPU
    # (model.embeddings auto) the untied input-embedding table is in host memory
    host = "base: lm_head, norms (unquantized; embeddings in host memory)"
    assert resident[host] == 128_256 * 4096 * 2 + 65 * 8192 + 2 * 512
    on_device = estimate_stage(
        cfg(
            sft={"batch_size": 1, "max_length": 1024, "optimizer": "adamw", "gradient_accumulation_steps": 1},
            model={"logprob_chunk_size": 1024, "embeddings": "device"},
        ),
        shape,
        "sft",
    )
    both = "base: embeddings, lm_head, norms (unquantized)"
    assert dict(on_device.resident)[both] == 2 * 128_256 * 4096 * 2 + 65 * 8192 + 2 * 512
    assert on_device.allocated - e.allocated == 128_256 * 4096 * 2
    t, d, i = 1024, 4096, 14336
    layer_phase, recomputed = "backward: recomputed layer", "activations: recomputed layer (compute dtype)"
    layer = dict(e.phases[layer_phase])
    assert layer["activations: checkpointed layer inputs"] == 32 * t * d * 2
    # 3 hidden-wide, q and rotated q, k and v repeated to the 32 query heads, 5 intermediate-wide (bf16) beside
    # down_proj's weight, which its 4-bit backward dequantizes (4096 x 14336 bf16: more than a sixth 1024 x 14336)
    assert layer["activations: recomputed layer (compute dtype)"] == (
        2 * t * (3 * d + 2 * d + 2 * d) + 5 * 2 * t * i + 2 * d * i
    )
    assert layer["activations: recomputed layer's fp32 norm inputs"] == 2 * 4 * t * d
    assert layer["activations: attention masks"] == 3 * 1024 * 1024
    chunk = dict(e.phases["backward: log-prob chunk"])
    # 1023 positions x 128256 logits in bf16 (the head's output, which the backward makes the gradient), and the
    # fp32 copy of an eighth of the rows (128 of 1023) at a time: 2.5 bytes per logit, in 512-byte blocks
    assert chunk["log-probs: one chunk's logits (compute dtype)"] == 1023 * 128_256 * 2
    assert chunk["log-probs: an eighth of them in fp32"] == 128 * 128_256 * 4
    assert "log-probs: the logged entropy's softmax of an eighth (fp32)" not in chunk
    assert chunk["activations: final norm (fp32 input, output)"] == t * d * (4 + 2)
    assert e.peak_phase == "backward: log-prob chunk"
    assert e.allocated == sum(resident.values()) + sum(chunk.values()) == sum(dict(e.items).values())
    # with the recipe's 2 x 2048 tokens the recomputed layer outweighs the chunk, and accumulating micro-batches
    # keeps the fp32 gradients alive
    recipe = estimate_stage(
        cfg(sft={"batch_size": 2, "max_length": 2048, "gradient_accumulation_steps": 8}), shape, "sft"
    )
    assert recipe.peak_phase == "backward: recomputed layer"
    assert dict(recipe.resident)["gradients of trainable LoRA/head (fp32, accumulated)"] == 4 * lora
    # LoRA dropout keeps each LoRA input's dropped-out copy and its mask
    dropped = estimate_stage(cfg(sft={"batch_size": 2, "max_length": 2048}, lora={"dropout": 0.05}), shape, "sft")
    extra = dict(dropped.phases["backward: recomputed layer"])["activations: LoRA dropout copies and masks"]
    assert extra == (2 * 2048) * 14 * d * 2
    # a reward model on K-way rankings: K sequences per prompt in one pass
    rm = cfg(rm={"batch_size": 2, "max_length": 1024})
    pairs, fours = (estimate_stage(rm, shape, "rm", sequences_per_prompt=k) for k in (2, 4))
    assert pairs.phases["backward: recomputed layer"][0][1] == 32 * 4 * 1024 * d * 2
    assert fours.phases["backward: recomputed layer"][0][1] == 32 * 8 * 1024 * d * 2
    assert dict(pairs.resident)["score head"] == 4 * d  # a bias-free fp32 Linear(d, 1)
    # 2 x 4096 tokens: a sixth intermediate-wide tensor (8192 x 14336) outweighs the dequantized weight; so does
    # any one without 4-bit weights (no dequantized weight)
    long = dict(estimate_stage(cfg(sft={"batch_size": 2, "max_length": 4096}), shape, "sft").phases[layer_phase])
    t = 8192
    assert long[recomputed] == 2 * t * (3 * d + 2 * d + 2 * d) + 6 * 2 * t * i
    plain = cfg(sft={"batch_size": 1, "max_length": 1024}, model={"quantization": "none"})
    t = 1024
    assert dict(estimate_stage(plain, shape, "sft").phases[layer_phase])[recomputed] == (
        2 * t * (3 * d + 2 * d + 2 * d) + 6 * 2 * t * i
    )
    # PPO with a separate critic: the value's pass follows the policy's backward, whose fp32 LoRA gradients are
    # alive in it; accumulated over micro-batches, they are resident instead; GRPO has no critic's pass
    rl = {"micro_batch_size": 4, "mini_batch_size": 4}
    ppo = estimate_stage(cfg(ppo=rl), shape, "ppo").phases["update backward: recomputed layer"]
    assert dict(ppo)["gradients of the policy's LoRA (fp32)"] == 4 * lora
    for other in ({**rl, "mini_batch_size": 8}, {**rl, "advantage": "grpo"}):
        e = estimate_stage(cfg(ppo=other), shape, "ppo")
        assert "gradients of the policy's LoRA (fp32)" not in dict(e.phases["update backward: recomputed layer"])


def test_qwen2_5_0_5b_by_hand():
    shape, _ = resolve_shape("qwen2.5-0.5b")
    assert shape.tied and shape.qkv_bias and shape.head_dim == 64 and shape.kv_heads == 2
    # per layer: q, o 896x896; k, v 896x128; gate, up, down 896x4864 -> 14,909,440 weights
    weights = 24 * (2 * 802_816 + 2 * 114_688 + 3 * 4_358_144)
    assert weights == 357_826_560
    # no double quant: fp32 absmax per 64-weight block (rounded up) + 64-byte NF4 code, per tensor
    per_layer = 2 * (4 * 12_544 + 64) + 2 * (4 * 1_792 + 64) + 3 * (4 * 68_096 + 64)
    assert quantized_weight_bytes(shape, "fp4", False, 2) == {"weights": weights // 2, "constants": 24 * per_layer}
    # tied embeddings counted once; 49 norms; q, k, v biases (896 + 128 + 128) per layer
    assert unquantized_bytes(shape, 2) == 2 * (151_936 * 896 + 49 * 896 + 24 * 1152)

    # PPO with a separate critic: four adapters, policy + value trained with 8-bit AdamW
    c = cfg(
        model={"name_or_path": "qwen2.5-0.5b"},
        ppo={
            "rollout_batch_size": 8,
            "max_prompt_length": 128,
            "max_new_tokens": 128,
            "micro_batch_size": 2,
            "mini_batch_size": 2,
            "optimizer": "adamw_8bit",
        },
    )
    e = estimate_stage(c, shape, "ppo")
    resident = dict(e.resident)
    lora = sum(lora_tensors(shape, 16, "all-linear"))
    assert lora == 24 * 16 * (2 * 1792 + 2 * 1024 + 3 * 5760) == 8_798_208
    assert resident["LoRA adapters (fp32): policy, reference, reward, value"] == 4 * 4 * lora
    # 8-bit AdamW: 2 bytes per element + two fp32 block maxima per 256 elements (each in a 512-byte block), for
    # tensors of at least 4096 elements; smaller ones (k/v LoRA B: 128 x 16 = 2048; the 896-element value head)
    # stay 32-bit; two shared 256-entry maps. Per layer: nine 14336-element tensors (2 x (14336 + 512) B each),
    # three 77824 (2 x (77824 + 1536)), two 2048 (2 x 8192)
    per_layer = 9 * 29_696 + 3 * 158_720 + 2 * 16_384
    assert resident["optimizer state (adamw_8bit)"] == 2 * 24 * per_layer + 2 * 3584 + 2048
    # update phase: 2 x 256 tokens; its log-prob chunk (2 x 128 response positions x 151936 logits: bf16, and an
    # eighth's fp32 copy beside the logged entropy's softmax of it, 3 bytes per logit) outweighs the rollout's KV
    # cache (8 x 128 prompt tokens x 2 x 24 layers x 128 x 2 B = 12.6 MB), so an update phase peaks
    update = dict(e.phases["update backward: log-prob chunk"])
    assert update["log-probs: one chunk's logits (compute dtype)"] == 256 * 151_936 * 2
    assert update["log-probs: an eighth of them in fp32"] == 32 * 151_936 * 4
    assert update["log-probs: the logged entropy's softmax of an eighth (fp32)"] == 32 * 151_936 * 4
    # the scoring passes log no entropy: 2.5 bytes per logit
    scoring = dict(e.phases["scoring"])
    assert "log-probs: the logged entropy's softmax of an eighth (fp32)" not in scoring
    assert scoring["log-probs: an eighth of them in fp32"] == 32 * 151_936 * 4
    assert dict(e.phases["rollout: prefill"])["rollout: KV cache"] == 8 * 128 * 2 * 24 * 128 * 2
    assert e.peak_phase == "update backward: log-prob chunk"
    big = estimate_stage(replace(c, ppo=replace(c.ppo, rollout_batch_size=256)), shape, "ppo")
    # 256 rows: the prefill's one-layer activations (4 x 896 + 4 x 4864 per prompt token) are the peak; the dynamic
    # cache at the last step holds every position but the last token's, beside the step's logits (2 + 3 x 4 bytes)
    assert big.peak_phase == "rollout: prefill"
    assert dict(big.items)["activations: one layer's forward"] == 256 * 128 * 2 * (4 * 896 + 4 * 4864)
    last = dict(big.phases["rollout: last decode step"])
    assert last["rollout: KV cache"] == 256 * 255 * 2 * 24 * 128 * 2
    assert last["rollout: sampling logits, or the previous step's beside the dequantized largest weight"] == (
        256 * 151_936 * 14
    )
    # generating 16 sequences per call bounds the cache at 16 rows, and the update phase is the peak again
    chunked_cfg = replace(c, ppo=replace(c.ppo, rollout_batch_size=256, generation_batch_size=16))
    chunked = estimate_stage(chunked_cfg, shape, "ppo")
    assert chunked.peak_phase == "update backward: log-prob chunk"
    assert dict(chunked.phases["rollout: prefill"])["rollout: KV cache"] == 16 * 128 * 2 * 24 * 128 * 2
    # calls of 128 of 1024 rollout rows (GRPO, 4 per prompt): the rollout is the peak again, with 128 rows
    grpo = replace(c.ppo, rollout_batch_size=256, advantage="grpo", group_size=4, generation_batch_size=128)
    calls = estimate_stage(replace(c, ppo=grpo), shape, "ppo")
    assert dict(calls.phases["rollout: last decode step"])["rollout: KV cache"] == 128 * 255 * 2 * 24 * 128 * 2
    # a batch size above the rollout's rows is the rollout's rows, unless compiled calls are filled up to it
    wide = replace(c.ppo, rollout_batch_size=256, generation_batch_size=4096)
    assert estimate_stage(replace(c, ppo=wide), shape, "ppo").items == big.items
    compiled = replace(wide, generation_cache="static", compile_generation=True)
    static = estimate_stage(replace(c, ppo=compiled), shape, "ppo").phases["rollout: prefill"]
    assert dict(static)["rollout: KV cache"] == 4096 * 256 * 2 * 24 * 128 * 2  # preallocated to the full length
    assert e.batch == 2 and e.length == 128


def test_logit_pieces_are_the_chunks():
    """The estimator counts the fp32 copy of the same fraction of a chunk's rows as ops.logprobs makes."""
    from lowmem_rlhf.model.memory import LOGIT_PIECES
    from lowmem_rlhf.ops.logprobs import _PIECES

    assert LOGIT_PIECES == _PIECES


RECORD = REPO / "benchmarks" / "results" / "memory_traced.json"


def _traced():
    return json.loads(RECORD.read_text())["traces"]


def test_every_stage_and_shape_is_traced():
    from benchmarks import memory

    assert sorted(_traced()) == sorted(f"{s}/{e}" for s in memory.ALL_SHAPES for e in memory.ALL_ENTRIES)


@pytest.mark.parametrize("key", sorted(_traced()))
def test_estimate_within_5_percent_of_the_traced_peak(key):
    """The estimator against benchmarks/results/memory_traced.json (python -m benchmarks.memory --all): every stage
    at every shape with its recipe's settings, within 5% of the traced peak."""
    from benchmarks import memory

    traced = _traced()[key]
    e = memory.estimate(memory.parse_args(traced["argv"]))
    assert abs(e["allocated_bytes"] / traced["peak_bytes"] - 1) < 0.05, (key, e["peak_phase"], traced["peak_phase"])


def test_counts_equal_the_tiny_4bit_model(tiny_path):
    model, _ = load_base(ModelConfig(device="cpu"))
    shape, _ = resolve_shape("builtin:tiny")
    q = quantized_weight_bytes(shape, "nf4", True, 4)  # CPU computes in fp32
    counted = {**q, "unquantized": unquantized_bytes(shape, 4), "buffers": buffer_bytes(shape)}
    assert counted == loaded_bytes(model)

    bank = AdapterBank(model, gradient_checkpointing=False)
    bank.add_role("policy", lora=lora_config(LoRAConfig(r=8)))
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert lora == sum(lora_tensors(shape, 8, "all-linear"))


def test_largest_fitting_and_sizes():
    c = cfg(sft={"batch_size": 2, "max_length": 2048})
    shape, _ = resolve_shape("llama-3.1-8b")
    card = 16 * GiB
    best = largest_fitting(c, shape, "sft", card, "batch")
    assert estimate_stage(c, shape, "sft", batch=best).device_total <= card
    assert estimate_stage(c, shape, "sft", batch=best + 1).device_total > card
    assert largest_fitting(c, shape, "sft", 4 * GiB, "batch") == 0  # the weights alone do not fit
    assert parse_size("16GB") == parse_size("16") == parse_size("16GiB") == 16 * GiB
    assert parse_size("512MB") == 512 * 2**20
    with pytest.raises(UserError, match="cannot read"):
        parse_size("lots")


def test_estimate_cli(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "stages": ["sft", "ppo", "compare"],
                "model": {"name_or_path": "meta-llama/Llama-3.1-8B-Instruct"},
                "sft": {"dataset": "x.jsonl", "batch_size": 2, "max_length": 2048},
                "ppo": {"dataset": "x.jsonl", "micro_batch_size": 4, "mini_batch_size": 4},
            }
        )
    )
    assert main(["estimate", str(recipe), "--gpu-memory", "24GB"]) == 0
    out = capsys.readouterr().out
    assert "stage sft (sft.batch_size=2, sft.max_length=2048)" in out and "stage ppo" in out
    assert "-> fits in 24.00 GB" in out
    assert main(["estimate", str(recipe), "--gpu-memory", "6GB", "--json", "--stage", "sft"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert list(report["stages"]) == ["sft"] and report["stages"]["sft"]["fits"] is False
    # a reward model on 4-way rankings puts 4 sequences of each prompt through one pass: a higher peak
    peaks = []
    for k in ("2", "4"):
        assert main(["estimate", str(recipe), "--stage", "rm", "--json", "--responses-per-prompt", k]) == 0
        peaks.append(json.loads(capsys.readouterr().out)["stages"]["rm"]["allocated_bytes"])
    assert peaks[1] > peaks[0]
    assert main(["estimate", str(recipe), "--stage", "rm", "--responses-per-prompt", "1"]) == 2
    assert "--responses-per-prompt 1: a ranking has at least 2 responses" in capsys.readouterr().err
    assert main(["estimate", str(recipe), "model.name_or_path=org/unknown-model"]) == 2
    assert "no config.json for 'org/unknown-model'" in capsys.readouterr().err
    assert main(["estimate", str(recipe), "model.name_or_path=org/unknown-model", "--shape", "qwen2.5-7b"]) == 0
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "mistral", "hidden_size": 64}))
    assert main(["estimate", str(recipe), f"model.name_or_path={folder}"]) == 2
    assert "lacks vocab_size" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("recipe", "card"),
    [
        ("llama-3.1-8b/sft.yaml", "16GB"),
        ("llama-3.1-8b/pipeline.yaml", "16GB"),
        ("llama-3.1-8b/grpo.yaml", "16GB"),
        ("qwen2.5-7b/pipeline.yaml", "24GB"),
        ("qwen2.5-7b/grpo.yaml", "24GB"),
    ],
)
def test_real_model_recipes_fit_the_card_they_name(recipe, card, capsys):
    path = REPO / "recipes" / recipe
    assert f"--gpu-memory {card}" in path.read_text() or "16 GB" in path.read_text()
    assert main(["estimate", str(path), "--gpu-memory", card]) == 0, capsys.readouterr().out


def test_stage_check_warns_before_loading_when_the_card_is_too_small(monkeypatch, caplog):
    import torch

    from lowmem_rlhf.model.memory import check_fits

    c = cfg(sft={"batch_size": 8, "max_length": 4096})
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (0, 12 * GiB))
    with caplog.at_level("WARNING"):
        check_fits(c, "sft", torch.device("cuda"))
        assert "exceeds this GPU's 12.00 GB" in caplog.text
        # 3 x 4096 tokens: 11.92 GiB on the card (the input-embedding table in host memory; 4: 14.07 GiB)
        assert "largest sft.batch_size that fits: 3" in caplog.text
        caplog.clear()
        check_fits(cfg(sft={"batch_size": 1, "max_length": 512}), "sft", torch.device("cuda"))
        check_fits(c, "sft", torch.device("cpu"))  # nothing to check without a GPU
    assert caplog.text == ""
