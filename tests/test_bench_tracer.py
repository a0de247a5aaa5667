"""On a GPU the benchmarks record the memory tracer's peak for their own settings beside the measured one
(`torch.cuda.max_memory_allocated`) and the offset between them; here the settings they hand the tracer and
the figure they record are checked against the tracer run directly (tiny shape, CPU)."""

import pytest

from benchmarks import memory, ppo_bench, preference_bench, sft_bench
from lowmem_rlhf.config import LoRAConfig
from lowmem_rlhf.model.memory import lora_tensors, resolve_shape, rounded

GIB = 2**30


def test_sft_bench_traces_its_own_settings():
    args = sft_bench.parse_args(["--shape", "llama-3.1-8b", "--batch", "1", "--seq", "256", "--chunk-size", "256"])
    (argv,) = sft_bench.tracer_argvs(args)
    t = memory.parse_args(argv)
    assert (t.shape, t.stage, t.batch, t.seq, t.lora_r, t.chunk_size) == ("llama-3.1-8b", "sft", 1, 256, 16, 256)
    assert (t.lora_dropout, t.optimizer, t.embeddings) == (0.0, "adamw_8bit", "auto")  # the bench's CUDA settings
    record = sft_bench.tracer_record([argv], 6.0)
    direct = memory.run(memory.parse_args([*argv, "--extrapolate"]))
    # the tracer's stand-in for loading is not compared (at 1 x 256 tokens it is the larger): the second step's
    # passes are, after the first step made the optimizer state
    step = direct["phase_peaks_bytes"]["step1:forward+backward"]
    assert step == max(n for ph, n in direct["phase_peaks_bytes"].items() if ph != "load")
    # the paged 8-bit AdamW keeps the two uint8 moments of tensors of 100k elements or more in CUDA unified memory,
    # which max_memory_allocated does not see: here LoRA B of gate_proj and up_proj and A of down_proj (14336 x 16)
    tensors = lora_tensors(resolve_shape("llama-3.1-8b")[0], 16, "all-linear")
    paged = [n for n in tensors if n >= 100_000]
    assert len(paged) == 3 * 32 and set(paged) == {14336 * 16}
    left_out = 2 * sum(rounded(n) for n in paged)
    # the other tensors' moments (and every tensor's fp32 block maxima) stay ordinary allocations
    assert 0 < left_out < 2 * sum(rounded(n) for n in tensors)
    assert record["traced_peak_gib"] * GIB == step - left_out
    assert record["traced_phase"] == "sft: step1:forward+backward"
    assert record["offset"] == pytest.approx(6.0 / record["traced_peak_gib"] - 1)
    assert sft_bench.tracer_argvs(sft_bench.parse_args(["--attn", "eager"])) is None


def test_preference_bench_traces_its_own_settings():
    args = preference_bench.parse_args(["--shape", "tiny", "--stage", "dpo", "--batch", "2", "--seq", "48"])
    (argv,) = preference_bench.tracer_argvs(args)
    t = memory.parse_args(argv)
    assert (t.stage, t.batch, t.seq, t.lora_r, t.optimizer) == ("dpo", 2, 48, args.lora_r, "adamw_8bit")
    assert preference_bench.tracer_record([argv], None)["offset"] is None
    # the tracer runs DPO's reference pass per step, not the precomputed reference
    precomputed = ["--shape", "tiny", "--stage", "dpo", "--precompute-ref-logprobs"]
    assert preference_bench.tracer_argvs(preference_bench.parse_args(precomputed)) is None


def test_ppo_bench_traces_its_scoring_update_and_rollout():
    argv = ["--shape", "tiny", "--prompts", "4", "--prompt-len", "16", "--new-tokens", "8", "--micro-batch", "2"]
    args = ppo_bench.parse_args(argv)
    lora = LoRAConfig(r=args.lora_r, alpha=2 * args.lora_r, dropout=0.0)
    argvs = ppo_bench.tracer_argvs(args, lora)
    parsed = [memory.parse_args(a) for a in argvs]
    assert [(t.stage, t.rollout, t.prompt_len, t.new_tokens) for t in parsed] == [
        ("ppo", 4, 16, 8),
        ("rollout", 4, 16, 8),
    ]
    assert parsed[0].micro_batch == 2 and parsed[1].rollout_of == "ppo"
    record = ppo_bench.tracer_record(argvs, 0.05)
    # the tiny shape's LoRA tensors are all under 100k elements: none of the optimizer state is paged
    runs = [memory.run(memory.parse_args([*a, "--extrapolate"]))["phase_peaks_bytes"] for a in argvs]
    assert record["traced_peak_gib"] * GIB == max(n for r in runs for ph, n in r.items() if ph != "load")
    argv += ["--mode", "shared"]  # the critic-free estimators run without the four-model baseline
    grpo = ppo_bench.tracer_argvs(ppo_bench.parse_args([*argv, "--advantage", "grpo"]), lora)
    assert [memory.parse_args(a).stage for a in grpo] == ["grpo", "rollout"]
    for other in (["--advantage", "rloo"], ["--generation-batch-size", "2"], ["--generation-cache", "static"]):
        assert ppo_bench.tracer_argvs(ppo_bench.parse_args([*argv, *other]), lora) is None
