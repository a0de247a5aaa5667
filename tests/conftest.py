"""Shared fixtures: the tiny 4-bit model (built once per machine, cached) and small recipes."""

from __future__ import annotations

import lowmem_rlhf  # noqa: F401  first: pins torch's CPU kernels before torch runs an operation

# isort: split
import hashlib
import os
import tempfile
from pathlib import Path

import pytest
import torch

from lowmem_rlhf.config import config_from_dict

REPO = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_path() -> Path:
    from lowmem_rlhf.tiny.model import build_tiny

    return build_tiny()


def tiny_recipe(output_dir: Path, **sft) -> dict:
    """A small SFT recipe on the tiny model (CPU, NF4); keyword args override `sft` keys."""
    return {
        "output_dir": str(output_dir),
        "seed": 7,
        "stages": ["sft"],
        "model": {"name_or_path": "builtin:tiny", "device": "cpu", "quantization": "nf4"},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.1},
        "sft": {
            "dataset": "builtin:tiny/sft.jsonl",
            "max_samples": 256,
            "max_steps": 6,
            "batch_size": 8,
            "gradient_accumulation_steps": 2,
            "learning_rate": 3e-3,
            "logging_steps": 1,
            "save_steps": 3,
            "save_total_limit": 5,
            "max_length": 96,
            **sft,
        },
    }


def tiny_rl_recipe(out, **ppo_keys) -> dict:
    """tiny_recipe plus small rm and ppo sections (SFT -> RM -> PPO); keyword args override `ppo` keys."""
    data = tiny_recipe(out, max_steps=6, save_steps=0)
    data["stages"] = ["sft", "rm", "ppo"]
    data["rm"] = {
        "dataset": "builtin:tiny/rankings.jsonl",
        "max_samples": 64,
        "max_steps": 4,
        "batch_size": 4,
        "gradient_accumulation_steps": 1,
        "learning_rate": 3e-3,
        "save_steps": 0,
        "max_length": 96,
        "stats_samples": 32,
    }
    data["ppo"] = {
        "dataset": "builtin:tiny/prompts.jsonl",
        "num_steps": 3,
        "rollout_batch_size": 8,
        "mini_batch_size": 4,
        "micro_batch_size": 2,
        "ppo_epochs": 2,
        "learning_rate": 1e-3,
        "max_new_tokens": 12,
        "save_steps": 0,
        "group_size": 2,
        "judges": ["lowmem_rlhf.tiny.judge:gold"],
        **ppo_keys,
    }
    return data


@pytest.fixture
def make_cfg(tmp_path, tiny_path):
    def make(name: str = "run", **sft):
        return config_from_dict(tiny_recipe(tmp_path / name, **sft))

    return make


def base_fingerprint(model) -> str:
    """Hash of every non-LoRA tensor of the (4-bit) base, including quantization constants."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        if "lora_" in name:
            continue
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def loaded_bytes(model) -> dict[str, int]:
    """Bytes of a loaded 4-bit model as the estimator counts them: packed 4-bit weights, their quantization
    constants, the unquantized parameters (a tied lm_head once) and the buffers."""
    import bitsandbytes as bnb

    out = {"weights": 0, "constants": 0, "unquantized": 0}
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            qs = module.weight.quant_state
            out["weights"] += module.weight.numel() * module.weight.element_size()
            tensors = [qs.absmax, qs.code, qs.offset, qs.state2.absmax, qs.state2.code]
            out["constants"] += sum(t.numel() * t.element_size() for t in tensors)
    for p in model.parameters():
        if not isinstance(p, bnb.nn.Params4bit):
            out["unquantized"] += p.numel() * p.element_size()
    out["buffers"] = sum(b.numel() * b.element_size() for b in model.buffers())
    return out


def fail_at(monkeypatch, cls, method: str, step: int, exc: BaseException) -> None:
    """Make `cls.method(self, ..., step)` raise `exc` at `step`: a kill after the last checkpoint."""
    real = getattr(cls, method)

    def wrapped(self, *args):
        if args[-1] == step:
            raise exc
        return real(self, *args)

    monkeypatch.setattr(cls, method, wrapped)


@pytest.fixture(autouse=True)
def _quiet_env(monkeypatch):
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    yield


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# torch.compile's kernels in a cache of this test session's own: another process compiling into the shared
# default cache at the same moment, or a stale entry from other settings, cannot hand the suite a broken kernel
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="lowmem-rlhf-inductor-"))
