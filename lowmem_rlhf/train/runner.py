"""The one loop runner every training stage shares: resume, progress bar, Ctrl-C, saves, metric sinks.

`LoopRunner` owns what does not depend on the algorithm: the optimizer and its schedule, the
checkpoints (resume from the newest good one, periodic saves, a save on Ctrl-C or out-of-memory),
the metrics.jsonl writer and its sinks, the progress bar, and the counting of skipped steps. A
subclass says what one step is (`_step`) and what it adds around it through a few hooks:
`TrainLoop` (SFT, reward model, DPO: accumulated micro-batches) and `PPOTrainer` (an RL iteration:
rollout, then PPO epochs).

A step whose loss or gradient norm is NaN/inf is skipped (its gradients dropped, the weights and the
optimizer state untouched; the schedule and the data cursor still advance) and counted in
`skipped_steps`; `max_consecutive_skips` skips in a row stop the stage with an error, without a new
checkpoint and without marking the stage finished.

Under `accelerate launch` with N processes (lowmem_rlhf/distributed.py) the runner adds the
data-parallel plumbing once: the trainable gradients are summed over processes before each
optimizer step, every process reseeds at each step from (seed, step, rank), and rank 0 alone writes
metrics, samples and checkpoints. A checkpoint records N; resuming it with another N (or processes
that would resume different steps) is refused. A user error in one process's share of a step
(`distributed.agree_sum`) and a launcher's SIGTERM stop every process at that step, and rank 0 saves
the last finished one; a non-finite loss in any process skips the step in all of them.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import signal
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from lowmem_rlhf import distributed
from lowmem_rlhf.errors import UserError
from lowmem_rlhf.model.bank import AdapterBank
from lowmem_rlhf.train.checkpoint import Checkpointer
from lowmem_rlhf.train.metrics import MetricsLogger, truncate_jsonl
from lowmem_rlhf.train.usage import StageClock

logger = logging.getLogger(__name__)


@dataclass
class LoopResult:
    steps: int
    metrics: dict[str, float] = field(default_factory=dict)
    resumed_from: int = 0


def build_optimizer(params: list[torch.nn.Parameter], cfg, device: torch.device):
    name = cfg.optimizer
    if name == "auto":
        name = "paged_adamw_8bit" if device.type == "cuda" else "adamw"
    if name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    if device.type != "cuda":
        raise UserError(f"optimizer {name} needs a CUDA GPU; set optimizer: adamw (or auto) on this machine")
    import bitsandbytes as bnb

    cls = bnb.optim.PagedAdamW8bit if name == "paged_adamw_8bit" else bnb.optim.AdamW8bit
    return cls(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)


def build_scheduler(optimizer, cfg, total_steps: int):
    from transformers import get_scheduler

    name = {"constant": "constant_with_warmup"}.get(cfg.lr_scheduler, cfg.lr_scheduler)
    warmup = math.ceil(cfg.warmup_ratio * total_steps)
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


def interrupted(
    exc: BaseException, name: str, step: int, total: int, saved: Path | str | None, lower: str
) -> UserError:
    """The one-line error for Ctrl-C or out-of-memory, after the last finished step was saved.

    `saved` is the checkpoint, None when no step had finished, or a sentence saying where it goes.
    """
    where = (f"progress is saved in {saved}" if isinstance(saved, Path) else saved) or "no step had finished yet"
    if isinstance(exc, KeyboardInterrupt):
        return UserError(f"{name} interrupted at step {step}/{total}; {where}; re-run the same command to resume")
    return UserError(f"{name} ran out of GPU memory at step {step + 1}; {where}. Lower {lower}, then re-run to resume")


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt (the Ctrl-C save path) while the loop runs, in the main thread.

    On Ctrl-C a launcher (torchrun, accelerate launch) sends its workers SIGTERM, whose default ends a
    process at once; this way rank 0 saves the last finished step first, unless the signal finds it
    waiting in a collective for a process that already left (docs/distributed.md).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def grad_norm_(params: list[torch.nn.Parameter], max_norm: float) -> float:
    """The total gradient norm before clipping; clips to `max_norm` when it is > 0."""
    if max_norm > 0:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    grads = [p.grad for p in params if p.grad is not None]
    return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0


def step_or_skip(optimizer, scheduler, finite: bool) -> None:
    """optimizer.step() only when the loss and gradients are finite; the schedule advances either way."""
    if finite:
        optimizer.step()
    with warnings.catch_warnings():  # torch warns when the very first optimizer step was the one skipped
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def diverged(name: str, step: int, total: int, skips: int, saved: Path | None, cfg) -> UserError:
    """The one-line error when `skips` optimizer steps in a row had a non-finite loss or gradient norm."""
    kept = f"the last checkpoint {saved} is kept" if saved else "no checkpoint was saved before it"
    clip = (
        f"lower {name}.max_grad_norm (now {cfg.max_grad_norm})"
        if cfg.max_grad_norm > 0
        else f"set {name}.max_grad_norm (e.g. 1.0)"
    )
    return UserError(
        f"{name} stopped at step {step}/{total}: the loss or gradient norm was NaN or inf in {skips} steps in a row "
        f"(each was skipped); {kept} and the stage is not marked finished. Lower {name}.learning_rate (now "
        f"{cfg.learning_rate:g}) or {clip}, then re-run with --force"
    )


def fingerprint(data: Any) -> str:
    """A short hash of the settings a checkpoint depends on; resuming under other settings is refused."""
    return hashlib.sha256(repr(data).encode()).hexdigest()[:16]


class LoopRunner:
    """Steps 0..total_steps-1 of a stage, resumable; subclasses define `_step` and the hooks below.

    cfg: the stage's section (TrainingConfig or PPOConfig: optimizer, schedule, logging_steps, save_steps,
    save_total_limit, max_consecutive_skips, report_to). `roles` are the bank roles the checkpoints hold;
    `scheduler_steps` how many optimizer steps the learning-rate schedule spans; `lower` what the
    out-of-memory message tells the user to lower; `seed` seeds each step's random streams under N > 1
    processes.
    """

    desc: str  # progress bar label
    unit = "step"
    lower = "the batch size"
    # JSONL files beside metrics.jsonl whose records past a resumed step are dropped, like metrics.jsonl's
    step_files: tuple[str, ...] = ()

    def __init__(
        self,
        *,
        name: str,
        bank: AdapterBank,
        cfg,
        stage_dir: Path,
        total_steps: int,
        scheduler_steps: int,
        roles: list[str],
        settings: Any,
        seed: int,
    ):
        self.dist = distributed.state()
        self.name, self.bank, self.cfg, self.stage_dir = name, bank, cfg, Path(stage_dir)
        self.seed = seed
        self.total_steps, self.roles = total_steps, roles
        self.params = bank.trainable_parameters()
        self.optimizer = build_optimizer(self.params, cfg, bank.device)
        self.scheduler = build_scheduler(self.optimizer, cfg, scheduler_steps)
        self.ckpt = Checkpointer(self.stage_dir / "checkpoints", cfg.save_total_limit, fingerprint(settings), name)
        self.skipped_steps = 0  # optimizer steps skipped for a non-finite loss or gradient norm
        self.skips_in_a_row = 0
        self.clock = StageClock()

    # ------------------------------------------------------------------ what a subclass defines

    def _step(self, step: int) -> dict[str, float]:
        """One step (`step` counts from 0); returns its metrics."""
        raise NotImplementedError

    def after_step(self, step: int, metrics: dict[str, float], at_end: bool) -> None:
        """After step `step` (counted from 1) finished, before the logging decision: add to `metrics`."""

    def wants_log(self, metrics: dict[str, float]) -> bool:
        """Log this step even off the `logging_steps` grid."""
        return False

    def log_fields(self, step: int, metrics: dict[str, float]) -> None:
        """Fields added only to logged records."""

    def postfix(self, metrics: dict[str, float]) -> dict[str, Any]:
        return {"skipped": self.skipped_steps}

    def summary(self, metrics: dict[str, float]) -> str:
        """The metrics part of the line the progress bar prints for each logged step."""
        return ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float))

    def after_log(self, step: int, at_end: bool) -> None:
        """After the logging decision of step `step` (e.g. sample tables)."""

    def extra_state(self) -> dict[str, Any]:
        """The subclass's loop state saved with each checkpoint."""
        return {}

    def load_extra_state(self, extra: dict[str, Any]) -> None:
        """Restore what `extra_state` saved."""

    # ------------------------------------------------------------------ shared pieces

    def optimizer_step(self, losses_finite: bool) -> float:
        """Clip, then step the optimizer unless the losses or the gradient norm are not finite; count skips.

        Returns the gradient norm before clipping.
        """
        # under N processes every one must skip or step together: a local non-finite loss counts everywhere
        (not_finite,) = distributed.all_reduce_grads(self.params, [float(not losses_finite)])
        norm = grad_norm_(self.params, self.cfg.max_grad_norm)
        finite = not not_finite and math.isfinite(norm)
        step_or_skip(self.optimizer, self.scheduler, finite)
        self.skipped_steps += not finite
        self.skips_in_a_row = 0 if finite else self.skips_in_a_row + 1
        return norm

    def save_checkpoint(self, step: int) -> Path | None:
        """Rank 0 saves (every process holds the same weights and optimizer state); the others return None."""
        if not self.dist.is_main:
            return None
        world = {"world_size": self.dist.world} if self.dist.enabled else {}
        return self.ckpt.save(
            step,
            bank=self.bank,
            roles=self.roles,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            extra={
                **self.extra_state(),
                **self.clock.state(),
                "skipped_steps": self.skipped_steps,
                "skips_in_a_row": self.skips_in_a_row,
                **world,
            },
        )

    def resume(self) -> int:
        """Load the newest usable checkpoint, if any; returns the step to continue from.

        Under N processes every one must resume the same step: each reads the checkpoints itself, so
        they must see the same folder (one node, or a shared filesystem across nodes).
        """
        error, start = None, 0
        try:
            start = self._resume()
        except UserError as e:
            error = e
        distributed.agree_sum([], error)
        starts = distributed.all_gather_object(start)
        if len(set(starts)) > 1:
            raise UserError(
                f"{self.name}: the processes would resume from different steps ({', '.join(map(str, starts))}, by "
                f"rank): they do not see the same {self.ckpt.root}; run every process on one node or put output_dir "
                "on a filesystem all nodes share"
            )
        return start

    def _resume(self) -> int:
        latest = self.ckpt.latest()
        if latest is None:
            return 0
        start, extra = self.ckpt.load(
            latest, bank=self.bank, roles=self.roles, optimizer=self.optimizer, scheduler=self.scheduler
        )
        saved_world = extra.get("world_size", 1)
        if saved_world != self.dist.world:
            raise UserError(
                f"{latest} was saved by {saved_world} process(es) but this run has {self.dist.world}; resume with "
                f"{saved_world} (accelerate launch --num_processes {saved_world} ...), or re-run with --force to start "
                f"the {self.name} stage over"
            )
        self.load_extra_state(extra)
        self.clock.resume(extra)
        self.skipped_steps, self.skips_in_a_row = extra.get("skipped_steps", 0), extra.get("skips_in_a_row", 0)
        logger.info("%s: resuming from %s (step %d of %d)", self.name, latest, start, self.total_steps)
        return start

    def _save_on_exit(self, step: int, start: int, together: bool = False) -> Path | str | None:
        """The checkpoint of the last finished step when the run stops early (the newest one if none finished).

        Rank 0 saves; when every process stopped `together` (StoppedTogether), the others wait for that
        save and name the checkpoint it wrote. Otherwise they cannot know whether rank 0 saved, and say so.
        """
        self.optimizer.zero_grad(set_to_none=True)
        saved = self.save_checkpoint(step) if step > start and self.dist.is_main else None
        if together:
            distributed.barrier()
        elif not self.dist.is_main and step > start:
            return "process 0 saves the last finished step"
        return saved or self.ckpt.latest()

    # ------------------------------------------------------------------ the loop

    def run(self) -> LoopResult:
        cfg, total = self.cfg, self.total_steps
        main = self.dist.is_main
        run_name = f"{self.stage_dir.parent.name}/{self.name}"
        log = MetricsLogger(self.stage_dir, cfg.report_to, run_name=run_name) if main else None
        self.clock = StageClock()
        start = self.resume()
        if main:  # records of a run killed after its last checkpoint (or before the first): they are redone
            log.truncate_after(start)
            for name in self.step_files:
                truncate_jsonl(self.stage_dir / name, start)
        step, last = start, {}
        stopped = False
        stack = contextlib.ExitStack()
        quiet = None if main else True  # None: tqdm decides (off when not a terminal); only rank 0 shows one
        bar = tqdm(total=total, initial=start, desc=self.desc, unit=self.unit, dynamic_ncols=True, disable=quiet)
        try:
            if self.dist.enabled:
                stack.enter_context(sigterm_as_interrupt())
            while step < total:
                distributed.step_seed(self.seed, step)
                metrics = self._step(step)
                step += 1
                at_end = step == total
                self.after_step(step, metrics, at_end)
                last = metrics
                bar.update(1)
                bar.set_postfix(**self.postfix(metrics))
                stopped = self.skips_in_a_row >= cfg.max_consecutive_skips
                if stopped or at_end or step % cfg.logging_steps == 0 or self.wants_log(metrics):
                    self.log_fields(step, metrics)
                    if main:
                        log.log(step, metrics)
                        bar.write(f"{self.name} step {step}/{total}: {self.summary(metrics)}")
                self.after_log(step, at_end)
                if stopped:
                    break
                # a periodic checkpoint is never taken inside a run of skipped steps: the last good one stays
                periodic = cfg.save_steps > 0 and step % cfg.save_steps == 0 and not self.skips_in_a_row
                if at_end or periodic:
                    self.save_checkpoint(step)
        except (KeyboardInterrupt, torch.OutOfMemoryError) as e:
            saved = self._save_on_exit(step, start)
            raise interrupted(e, self.name, step, total, saved, self.lower) from None
        except UserError as e:  # e.g. a reward function or judge failed: keep what finished, say how to go on
            saved = self._save_on_exit(step, start, together=isinstance(e, distributed.StoppedTogether))
            where = f"progress up to step {step} is saved in {saved}" if isinstance(saved, Path) else saved
            where = where or "no step had finished yet"
            raise UserError(
                f"{e} [{self.name} step {step + 1}/{total}: {where}; fix it, then re-run the same command to resume]"
            ) from None
        finally:
            stack.close()
            bar.close()
            if log is not None:
                log.close()
        if stopped:
            raise diverged(self.name, step, total, self.skips_in_a_row, self.ckpt.latest(), cfg)
        return LoopResult(steps=step, metrics=last, resumed_from=start)
