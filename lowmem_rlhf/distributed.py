"""Data-parallel processes under `accelerate launch` (or torchrun): who am I, and the few collectives we use.

A process started by a launcher (WORLD_SIZE > 1 in its environment) joins the process group through
accelerate's `PartialState` (NCCL between GPUs, gloo on CPU) the first time `state()` is asked; a
plain `python -m lowmem_rlhf ...` never touches torch.distributed, and every helper below is then a
no-op, so one process behaves exactly as without this module.

Each process loads its own 4-bit base on its own device; only the trainable LoRA/head gradients
are summed across processes (`all_reduce_grads`), so every process takes the same optimizer step
and holds the same adapters. Rank 0 alone writes files. How the recipes' global batch sizes are
split is `per_device_config` (docs/distributed.md).
"""

from __future__ import annotations

import datetime
import functools
import os
from dataclasses import dataclass
from typing import Any

import torch

from lowmem_rlhf.errors import UserError

# A collective waits this long for the other processes before it fails (instead of hanging forever
# when one process died without the launcher noticing); LOWMEM_RLHF_DIST_TIMEOUT overrides it (seconds).
DEFAULT_TIMEOUT_S = 1800


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def timeout_s() -> float:
    """How long a collective waits for the other processes: LOWMEM_RLHF_DIST_TIMEOUT (seconds) or the default."""
    raw = os.environ.get("LOWMEM_RLHF_DIST_TIMEOUT")
    if raw is None:
        return float(DEFAULT_TIMEOUT_S)
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise UserError(
            f"LOWMEM_RLHF_DIST_TIMEOUT is {raw!r}; set it to a number of seconds (e.g. 1800), or unset it for the "
            f"default {DEFAULT_TIMEOUT_S}"
        )
    return value


@functools.cache
def state() -> Dist:
    """This process's place in the launch; joins the process group on first use when launched with N > 1."""
    if launched_world_size() <= 1:
        return Dist()
    from accelerate import PartialState

    timeout = datetime.timedelta(seconds=timeout_s())
    cpu = not torch.cuda.is_available()
    ps = PartialState(cpu=cpu, timeout=timeout, **({"backend": "gloo"} if cpu else {}))
    return Dist(rank=ps.process_index, world=ps.num_processes, local_rank=ps.local_process_index)


def is_main() -> bool:
    """True in a single process and in rank 0 of a launch: the one process that writes files."""
    return state().is_main


def barrier() -> None:
    if state().enabled:
        torch.distributed.barrier()


def _collective_device() -> torch.device:
    """Where a tensor for a collective lives: NCCL reduces only CUDA tensors, gloo CPU ones."""
    return torch.device("cuda", state().local_rank) if torch.cuda.is_available() else torch.device("cpu")


def all_reduce_sum(values: list[float]) -> list[float]:
    """Element-wise sums over processes (fp64: a few scalars per step)."""
    if not state().enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    torch.distributed.all_reduce(t)
    return t.tolist()


def all_reduce_max(values: list[float]) -> list[float]:
    if not state().enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return t.tolist()


def all_reduce_grads(params: list[torch.nn.Parameter], extra: list[float] = ()) -> list[float]:
    """Sum the trainable gradients over processes, in one flat buffer (a missing gradient counts as 0).

    The losses are already divided by the global step's weight, so the sum is the gradient of the
    whole global batch, the same on every process. `extra` (small counts, e.g. "my loss was not
    finite") ride in the same buffer; their sums come back.
    """
    if not state().enabled or not params:
        return list(extra)
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat(
        [g.reshape(-1).float() for g in grads] + [torch.tensor(extra, dtype=torch.float32, device=grads[0].device)]
    )
    torch.distributed.all_reduce(flat)
    offset = 0
    for p, g in zip(params, grads, strict=True):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(p).to(p.dtype)
        offset += n
    return flat[offset:].tolist()


class StoppedTogether(UserError):
    """A user error raised in every process at once (see `agree_sum`): all of them leave the step together."""


def agree_sum(values: list[float], error: UserError | None = None) -> list[float]:
    """`all_reduce_sum(values)`, also telling every process whether one of them failed.

    A process whose share of a step raised a user error (a reward function, a data row) still joins
    this collective, passing the error. If any process failed, every one then raises StoppedTogether
    with the first failing process's message, so all leave the loop together and rank 0 can save the
    last finished step, instead of one process dying while the others wait in the next collective.
    In a single process, `error` is simply raised.
    """
    d = state()
    if not d.enabled:
        if error is not None:
            raise error
        return values
    out = all_reduce_sum([*values, *(float(r == d.rank and error is not None) for r in range(d.world))])
    failed = [r for r, flag in enumerate(out[len(values) :]) if flag]
    if failed:
        messages = all_gather_object(None if error is None else str(error))
        first = failed[0]
        prefix = "" if first == d.rank else f"process {first}: "
        raise StoppedTogether(prefix + messages[first]) from error
    return out[: len(values)]


def all_gather_object(obj: Any) -> list[Any]:
    """[obj of rank 0, obj of rank 1, ...] on every process (tensors in `obj` should be on the CPU)."""
    if not state().enabled:
        return [obj]
    out: list[Any] = [None] * state().world
    torch.distributed.all_gather_object(out, obj)
    return out


def share(n: int) -> tuple[int, int]:
    """(start, end) of this process's contiguous share of n items; n must divide evenly."""
    d = state()
    per = n // d.world
    return d.rank * per, (d.rank + 1) * per


def per_device(n: int) -> int:
    """One process's part of a global batch size n (e.g. for evaluation passes): n / N, at least 1."""
    return max(1, n // state().world)


def step_seed(seed: int, step: int) -> None:
    """Under N > 1 processes, reseed torch and Python at every step from (seed, step, rank).

    The random streams then differ between processes (dropout, sampling) and are a pure function of
    the step, so a resumed run draws what the uninterrupted one did without saving every rank's state.
    """
    d = state()
    if not d.enabled:
        return
    import random

    s = (seed * 1_000_003 + step) * 1_009 + d.rank
    random.seed(s)
    torch.manual_seed(s)


def local_device(device: torch.device) -> torch.device:
    """Under a launch on GPUs, each process uses its own card (`cuda:LOCAL_RANK`); a numbered card is refused there."""
    d = state()
    if d.enabled and device.type == "cuda":
        if device.index is not None:
            raise UserError(
                f"model.device is {str(device)!r}, but under a launch of {d.world} processes each one takes its own "
                "card (cuda:LOCAL_RANK); set model.device: cuda (or auto), and choose the cards with "
                "CUDA_VISIBLE_DEVICES"
            )
        return torch.device("cuda", d.local_rank)
    return device


def check_divides(sizes: dict[str, int], world: int) -> None:
    """Refuse global sizes that N processes cannot split evenly (one line naming the key)."""
    for key, value in sizes.items():
        if value % world:
            raise UserError(
                f"recipe: `{key}` ({value}) is a global size that {world} processes must split evenly; make it a "
                f"multiple of {world} (each process takes {key} / {world}), or launch a number of processes that "
                "divides it"
            )


# The global sizes of each stage section that N processes split: every process runs the stage as one
# process would with each of these divided by N.
SPLIT_KEYS = {
    "sft": ("batch_size",),
    "rm": ("batch_size",),
    "dpo": ("batch_size",),
    "ppo": ("rollout_batch_size", "mini_batch_size", "micro_batch_size", "generation_batch_size"),
}


def per_device_section(stage: str, section, world: int):
    """One process's copy of a stage section: its SPLIT_KEYS sizes divided by `world` (refused if they do not divide).

    0 ("all", e.g. generation_batch_size) stays 0. With world 1 the section itself comes back.
    """
    import dataclasses

    if world <= 1 or stage not in SPLIT_KEYS:
        return section
    check_divides({f"{stage}.{k}": getattr(section, k) for k in SPLIT_KEYS[stage]}, world)
    return dataclasses.replace(section, **{k: getattr(section, k) // world for k in SPLIT_KEYS[stage]})


def per_device_config(cfg, world: int, stages: list[str] | tuple[str, ...] | None = None):
    """The recipe one of `world` processes runs: each listed stage's global sizes divided by `world`."""
    import dataclasses

    if world <= 1:
        return cfg
    names = [s for s in (stages or SPLIT_KEYS) if s in SPLIT_KEYS]
    return dataclasses.replace(cfg, **{s: per_device_section(s, getattr(cfg, s), world) for s in names})
