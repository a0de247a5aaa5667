"""What our set-up does, counted (never timed): benchmarks/load_bench.py on the tiny shape, and load_base's inits."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from unittest import mock

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `benchmarks` is a folder of the repo, not part of the installed package
    sys.path.insert(0, str(REPO))

from benchmarks import load_bench  # noqa: E402
from benchmarks.shapes import SHAPES  # noqa: E402
from lowmem_rlhf.config import ModelConfig  # noqa: E402
from lowmem_rlhf.model.loading import load_base  # noqa: E402


def test_side_by_side_counts(tmp_path):
    """Ours quantizes every 4-bit weight once, all with our CPU kernel, and injects one adapter per role; TRL
    quantizes the base twice (policy and reward model), with bitsandbytes' kernel."""
    out = tmp_path / "load.json"
    argv = ["--shape", "tiny", "--repeats", "1", "--cache-dir", str(tmp_path / "cache"), "--out", str(out)]
    returned = load_bench.main(argv)
    result = json.loads(out.read_text())
    assert result == json.loads(json.dumps(returned))
    assert result["command"] == "python -m benchmarks.load_bench " + " ".join(argv)
    linears = SHAPES["tiny"]["num_hidden_layers"] * 7  # q k v o gate up down
    assert result["ours"]["counts"] == {
        "quantized_weights": linears,
        "fast_kernel_weights": linears,
        "peft_injections": 3,
    }
    assert result["ours_library_kernel"]["counts"]["fast_kernel_weights"] == 0
    assert result["trl"]["counts"] == {"quantized_weights": 2 * linears, "fast_kernel_weights": 0, "peft_injections": 2}
    for side in ("ours", "ours_library_kernel", "trl"):
        assert len(result[side]["runs_s"]) == 1 and result[side]["median_total_s"] > 0
    c = result["comparison"]
    assert c["ratio_ours_over_trl"] == c["ours_total_s"] / c["trl_total_s"]


def test_load_base_runs_no_weight_init(tiny_path):
    """Every init transformers calls while loading acts on meta tensors: no random numbers are drawn (the RNG state
    is unchanged) and no real weight is initialised before the checkpoint overwrites it."""
    load_base(ModelConfig(device="cpu"))  # imports and the file cache
    devices: list[str] = []
    inits = ("kaiming_uniform_", "uniform_", "normal_", "trunc_normal_", "xavier_uniform_", "zeros_", "ones_")

    def recording(fn):
        def wrapper(*args, **kwargs):
            devices.append(str((args[0] if args else kwargs["tensor"]).device))
            return fn(*args, **kwargs)

        return wrapper

    state = torch.get_rng_state()
    with mock.patch.multiple(torch.nn.init, **{name: recording(getattr(torch.nn.init, name)) for name in inits}):
        load_base(ModelConfig(device="cpu"))
    assert devices and set(devices) == {"meta"}
    assert torch.equal(torch.get_rng_state(), state)
