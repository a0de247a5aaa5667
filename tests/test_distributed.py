"""Data-parallel training with 2 CPU processes (gloo) on the tiny model, launched as `torchrun` launches them.

The 2-process runs must train the adapters a 1-process run with the same global batch and seed trains.
They cannot be bit-identical: the trainable gradients are summed across processes by an fp32 all-reduce,
in another order than one process sums its micro-batch (relative error ~1e-7 per element). Adam passes
that on as it is, except for elements whose gradient is near 0, where m / sqrt(v) ~ sign(g) can move by
up to the learning rate: a small score head (a few dozen weights) shows it most. Measured: adapters
differ by 2e-7..7e-7 of their norm, the reward head by 2.3e-4; the bounds below are 1e-5 and 2e-3 (a
different seed gives differences of order 1). LoRA dropout is 0: its masks are per-process random draws.
RL sampling draws from each process's own random stream, so the RL comparison samples every response
from its own seed (tests/dist_worker.py), which a split of the prompts cannot change.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lowmem_rlhf.config import config_from_dict
from lowmem_rlhf.distributed import per_device_config
from lowmem_rlhf.errors import UserError

REPO = Path(__file__).resolve().parents[1]
WORKER = str(REPO / "tests" / "dist_worker.py")


def recipe(out: Path, stages=("sft", "rm", "dpo", "ppo")) -> Path:
    data = {
        "output_dir": str(out),
        "seed": 7,
        "stages": list(stages),
        "model": {"name_or_path": "builtin:tiny", "device": "cpu", "quantization": "nf4"},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "sft": {
            "dataset": "builtin:tiny/sft.jsonl",
            "max_samples": 64,
            "max_steps": 3,
            "batch_size": 4,
            "gradient_accumulation_steps": 2,
            "learning_rate": 3e-3,
            "logging_steps": 1,
            "save_steps": 1,
            "max_length": 96,
        },
        "rm": {
            "dataset": "builtin:tiny/rankings.jsonl",
            "max_samples": 32,
            "max_steps": 2,
            "batch_size": 4,
            "gradient_accumulation_steps": 1,
            "learning_rate": 3e-3,
            "save_steps": 0,
            "max_length": 96,
            "stats_samples": 8,
        },
        "dpo": {
            "dataset": "builtin:tiny/rankings.jsonl",
            "max_samples": 32,
            "max_steps": 2,
            "batch_size": 4,
            "gradient_accumulation_steps": 1,
            "max_length": 96,
            "logging_steps": 1,
            "save_steps": 0,
            "precompute_ref_logprobs": True,
        },
        "ppo": {
            "dataset": "builtin:tiny/prompts.jsonl",
            "advantage": "grpo",
            "group_size": 2,
            "reward_model": False,
            "reward_funcs": ["lowmem_rlhf.tiny.judge:gold"],
            "num_steps": 2,
            "rollout_batch_size": 4,
            "mini_batch_size": 8,
            "micro_batch_size": 4,
            "ppo_epochs": 1,
            "learning_rate": 1e-3,
            "max_new_tokens": 8,
            "save_steps": 0,
            "eval_samples": 0,
            "sample_log_steps": 1,
            "ptx_coef": 0.5,
        },
    }
    path = out.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(data))
    return path


def launch(nproc: int, *args: str, timeout: float = 240, **env: str) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node nproc tests/dist_worker.py ARGS` (a plain process for nproc 1)."""
    environ = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(REPO),
        "DIST_TEST_SAMPLER": "1",
        "LOWMEM_RLHF_DIST_TIMEOUT": "60",
        **env,
    }
    environ.pop("WORLD_SIZE", None)
    head = [sys.executable, WORKER] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), WORKER,
    ]  # fmt: skip
    return subprocess.run(head + list(args), env=environ, capture_output=True, text=True, timeout=timeout)


def weights(run: Path, stage: str) -> dict[str, torch.Tensor]:
    out = load_file(str(run / stage / "adapter_model.safetensors"))
    if (run / stage / "head.safetensors").exists():
        out.update({f"head/{k}": v for k, v in load_file(str(run / stage / "head.safetensors")).items()})
    return out


def relative_difference(a: dict, b: dict, prefix: str = "") -> float:
    keys = [k for k in a if k.startswith(prefix)] if prefix else [k for k in a if not k.startswith("head/")]
    diff = sum(float((a[k] - b[k]).square().sum()) for k in keys) ** 0.5
    return diff / sum(float(a[k].square().sum()) for k in keys) ** 0.5


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_path):
    root = tmp_path_factory.mktemp("dist")
    for name, n in (("one", 1), ("two", 2)):
        # a NaN policy loss in one process only (the last one) at the second PPO iteration: every process skips it
        proc = launch(n, "run", str(recipe(root / name)), DIST_TEST_NAN_PPO=f"{n - 1}:1")
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stdout.count("run finished:") == 1 and proc.stdout.count("sft: done ->") == 1  # rank 0 reports
    return root


def test_two_processes_train_the_adapters_one_process_trains(runs):
    one, two = runs / "one", runs / "two"
    for stage in ("sft", "reward", "dpo", "ppo"):
        a, b = weights(one, stage), weights(two, stage)
        assert not all(torch.equal(a[k], b[k]) for k in a)  # summed in another order, so not bit-identical
        assert relative_difference(a, b) < 1e-5, stage
        if any(k.startswith("head/") for k in a):
            assert relative_difference(a, b, "head/") < 2e-3, stage
    # the same global batches: per-step losses agree; rank 0 alone wrote (one record per step)
    for stage, steps in (("sft", 3), ("dpo", 2), ("ppo", 2)):
        ra = [json.loads(x) for x in (one / stage / "metrics.jsonl").read_text().splitlines()]
        rb = [json.loads(x) for x in (two / stage / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rb] == list(range(1, steps + 1))
        keys = ("reward", "ptx_loss") if stage == "ppo" else ("loss",)
        for key in keys:
            assert [r[key] for r in rb] == pytest.approx([r[key] for r in ra], rel=1e-5, abs=1e-6)
    # PPO-ptx: each process ran its half of the SFT rows; the logged loss is the whole batch's
    assert all(r["ptx_loss"] > 0 for r in rb)
    # the step with a NaN loss in one process was skipped by every process, as by the one process
    assert [r["skipped_steps"] for r in rb] == [r["skipped_steps"] for r in ra] == [0, 1]
    # RL: every process's rollout is gathered for the metrics and the sample table
    assert (two / "ppo" / "samples.jsonl").read_text() == (one / "ppo" / "samples.jsonl").read_text()
    assert len((two / "ppo" / "samples.jsonl").read_text().splitlines()) == 2 * 8


def test_two_processes_resume_bit_exactly_and_refuse_another_process_count(runs, tmp_path):
    out = tmp_path / "run"
    path = str(recipe(out, stages=("sft",)))
    killed = launch(2, "sft", path, DIST_TEST_INTERRUPT_AT="2")  # SIGTERM, as a launcher sends on Ctrl-C
    assert killed.returncode != 0
    saved = out / "sft" / "checkpoints" / "step-0000002"
    assert f"error: sft interrupted at step 2/3; progress is saved in {saved}" in killed.stderr
    # a process that does not see the checkpoints (another node without the shared filesystem) is refused
    apart = launch(2, "sft", path, DIST_TEST_HIDE_CHECKPOINTS="1")
    assert apart.returncode != 0
    assert "sft: the processes would resume from different steps (2, 0, by rank)" in apart.stderr
    refused = launch(1, "sft", path)
    assert refused.returncode == 2
    assert "was saved by 2 process(es) but this run has 1; resume with 2" in refused.stderr
    resumed = launch(2, "sft", path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr
    a, b = weights(out, "sft"), weights(runs / "two", "sft")
    assert all(torch.equal(a[k], b[k]) for k in a)  # N/2 + kill + resume + N/2 == N, bit for bit


def test_a_failing_process_stops_every_process_and_rank_0_saves_the_last_step(tmp_path):
    path = recipe(tmp_path / "run", stages=("sft",))
    path.write_text(path.read_text().replace("save_steps: 1", "save_steps: 0"))
    proc = launch(2, "sft", str(path), timeout=150, DIST_TEST_FAIL="1:1")  # a data error in process 1 at step 2
    assert proc.returncode != 0
    saved = tmp_path / "run" / "sft" / "checkpoints" / "step-0000001"
    assert saved.is_dir()
    tail = f"[sft step 2/3: progress up to step 1 is saved in {saved}; fix it, then re-run the same command to resume]"
    lines = proc.stderr.splitlines()
    assert f"error: process 1: a data row failed in process 1 (test) {tail}" in lines  # rank 0
    assert f"error: a data row failed in process 1 (test) {tail}" in lines  # rank 1 names the same folder


def test_global_sizes_must_split_evenly_and_are_divided_per_device(tmp_path):
    cfg = config_from_dict(yaml.safe_load(recipe(tmp_path / "run").read_text()))
    local = per_device_config(cfg, 2)
    assert (local.sft.batch_size, local.ppo.rollout_batch_size, local.ppo.mini_batch_size) == (2, 2, 4)
    assert (local.ppo.micro_batch_size, local.ppo.generation_batch_size) == (2, 0)
    assert per_device_config(cfg, 1) is cfg
    with pytest.raises(UserError, match=r"^recipe: `sft.batch_size` \(4\) is a global size that 3 processes must"):
        per_device_config(cfg, 3)


def test_estimate_reports_per_device_memory_for_n_processes(tmp_path, capsys):
    from lowmem_rlhf.cli import main

    path = str(recipe(tmp_path / "run", stages=("sft",)))
    reports = {}
    for n in (1, 2):
        assert main(["estimate", path, "--shape", "llama-3.1-8b", "--json", "--num-processes", str(n)]) == 0
        reports[n] = json.loads(capsys.readouterr().out)
    one, two = reports[1]["stages"]["sft"], reports[2]["stages"]["sft"]
    key = next(k for k in one if k.endswith("batch_size"))
    assert (one[key], two[key], reports[2]["num_processes"]) == (4, 2, 2)
    assert two["allocated_bytes"] < one["allocated_bytes"]


def test_a_launch_is_checked_before_anything_is_written(tmp_path, monkeypatch, capsys):
    from lowmem_rlhf.cli import main

    path = recipe(tmp_path / "run")
    path.write_text(path.read_text().replace("micro_batch_size: 4", "micro_batch_size: 1"))
    monkeypatch.setenv("WORLD_SIZE", "2")  # as under a launcher; the check needs no process group
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: recipe: `ppo.micro_batch_size` (1) is a global size that 2 processes must split")
    assert not (tmp_path / "run").exists()  # refused before SFT (the first stage) wrote or trained anything


def test_a_numbered_card_is_refused_under_a_launch(monkeypatch):
    from lowmem_rlhf import distributed

    monkeypatch.setattr(distributed, "state", lambda: distributed.Dist(rank=1, world=2, local_rank=1))
    assert distributed.local_device(torch.device("cuda")) == torch.device("cuda", 1)
    assert distributed.local_device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(UserError, match=r"^model.device is 'cuda:0', but under a launch of 2 processes each one"):
        distributed.local_device(torch.device("cuda", 0))


def test_a_bad_collective_timeout_is_one_line(monkeypatch):
    from lowmem_rlhf import distributed

    monkeypatch.setenv("LOWMEM_RLHF_DIST_TIMEOUT", "30m")
    with pytest.raises(UserError, match=r"^LOWMEM_RLHF_DIST_TIMEOUT is '30m'; set it to a number of seconds"):
        distributed.timeout_s()
    monkeypatch.setenv("LOWMEM_RLHF_DIST_TIMEOUT", "90")
    assert distributed.timeout_s() == 90.0


def test_ptx_rows_are_split_between_processes(tmp_path, monkeypatch):
    from lowmem_rlhf import distributed
    from lowmem_rlhf.model.loading import load_tokenizer
    from lowmem_rlhf.stages.ppo import _ptx_source

    cfg = config_from_dict(yaml.safe_load(recipe(tmp_path / "run").read_text()))
    tokenizer = load_tokenizer(cfg.model)
    whole = _ptx_source(cfg, tokenizer)(5)
    monkeypatch.setattr(distributed, "state", lambda: distributed.Dist(rank=1, world=2, local_rank=1))
    half = _ptx_source(cfg, tokenizer)(5)
    assert whole["input_ids"].shape[0] == 4 and half["input_ids"].shape[0] == 2
    width = int(half["attention_mask"].sum(1).max())  # the same rows, padded to their own longest
    assert torch.equal(half["input_ids"][:, :width], whole["input_ids"][2:, :width])
