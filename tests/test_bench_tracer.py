"""On a GPU the benchmarks record the memory tracer's peak for their own settings beside the measured one
(`torch.cuda.max_memory_allocated`) and the offset between them; here the settings they hand the tracer and
the figure they record are checked against the tracer run directly (tiny shape, CPU)."""

import pytest

from benchmarks import memory, ppo_bench, preference_bench, sft_bench
from lowmem_rlhf.config import LoRAConfig

GIB = 2**30


def _without_paged_state(argv: list[str]) -> int:
    r = memory.run(memory.parse_args([*argv, "--extrapolate"]))
    state = r["alive_at_peak_bytes"].get("optimizer state", 0)
    assert state > 0
    return r["peak_bytes"] - state


def test_sft_bench_traces_its_own_settings():
    args = sft_bench.parse_args(
        ["--shape", "tiny", "--batch", "2", "--seq", "64", "--lora-r", "8", "--chunk-size", "32"]
    )
    (argv,) = sft_bench.tracer_argvs(args)
    t = memory.parse_args(argv)
    assert (t.shape, t.stage, t.batch, t.seq, t.lora_r, t.chunk_size) == ("tiny", "sft", 2, 64, 8, 32)
    assert (t.lora_dropout, t.optimizer, t.embeddings) == (0.0, "adamw_8bit", "auto")  # the bench's CUDA settings
    record = sft_bench.tracer_record([argv], 0.01)
    # the paged 8-bit optimizer's state is in CUDA unified memory, outside max_memory_allocated: left out
    assert record["traced_peak_gib"] * GIB == _without_paged_state(argv)
    assert record["offset"] == pytest.approx(0.01 / record["traced_peak_gib"] - 1)
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
    scoring_update = _without_paged_state(argvs[0])
    rollout = memory.run(memory.parse_args([*argvs[1], "--extrapolate"]))["peak_bytes"]  # no optimizer state yet
    assert record["traced_peak_gib"] * GIB == max(scoring_update, rollout)
    argv += ["--mode", "shared"]  # the critic-free estimators run without the four-model baseline
    grpo = ppo_bench.tracer_argvs(ppo_bench.parse_args([*argv, "--advantage", "grpo"]), lora)
    assert [memory.parse_args(a).stage for a in grpo] == ["grpo", "rollout"]
    for other in (["--advantage", "rloo"], ["--generation-batch-size", "2"], ["--generation-cache", "static"]):
        assert ppo_bench.tracer_argvs(ppo_bench.parse_args([*argv, *other]), lora) is None
