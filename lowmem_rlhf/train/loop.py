"""The supervised optimisation loop shared by SFT, the reward model and DPO.

We run our own loop instead of TRL's SFTTrainer because every stage must (1) switch roles only through
the AdapterBank and hand the optimizer its explicit parameter list, (2) use the one chat rendering and
prompt masking of `lowmem_rlhf.data`, (3) compute log-probs chunk by chunk (pitfall 11), (4) never run
`prepare_model_for_kbit_training`, which upcasts every unquantized weight to fp32 (pitfall 10), and
(5) share one checkpoint format so that N steps == N/2 + kill + resume + N/2, bit for bit (pitfall 12).

Data order is a pure function of (seed, epoch), and the data cursor is derivable from the step
(micro-batch m = step * accumulation + k), so a checkpoint only needs the step, the weights, the
optimizer, the scheduler and the RNG states.

A step whose loss or gradient norm is NaN/inf is skipped (its gradients dropped, the weights and the
optimizer state untouched; the schedule and the data cursor still advance) and counted in
`skipped_steps`; `max_consecutive_skips` skips in a row stop the stage with an error, without a new
checkpoint and without marking the stage finished.
"""

from __future__ import annotations

import hashlib
import logging
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from lowmem_rlhf.config import TrainingConfig
from lowmem_rlhf.errors import UserError
from lowmem_rlhf.model.bank import AdapterBank
from lowmem_rlhf.train.checkpoint import Checkpointer
from lowmem_rlhf.train.metrics import MetricsLogger
from lowmem_rlhf.train.usage import StageClock, peak_memory

logger = logging.getLogger(__name__)

# loss_fn(model, batch) -> (loss_sum, metric_sums): the loss summed over the batch's units (tokens for
# SFT, weighted pairs for RM/DPO); weight_fn(batch) -> how many units it holds. A step's loss is
# sum(loss_sum) / sum(weight) over its micro-batches; metric sums are divided by the same weight.
LossFn = Callable[[torch.nn.Module, Any], tuple[torch.Tensor, dict[str, float]]]
WeightFn = Callable[[Any], float]
EvalFn = Callable[[AdapterBank], dict[str, float]]


@dataclass
class LoopResult:
    steps: int
    metrics: dict[str, float] = field(default_factory=dict)
    resumed_from: int = 0


def build_optimizer(params: list[torch.nn.Parameter], cfg: TrainingConfig, device: torch.device):
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


def build_scheduler(optimizer, cfg: TrainingConfig, total_steps: int):
    from transformers import get_scheduler

    name = {"constant": "constant_with_warmup"}.get(cfg.lr_scheduler, cfg.lr_scheduler)
    warmup = math.ceil(cfg.warmup_ratio * total_steps)
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


def interrupted(exc: BaseException, name: str, step: int, total: int, saved: Path | None, lower: str) -> UserError:
    """The one-line error for Ctrl-C or out-of-memory, after the last finished step was saved."""
    where = f"progress is saved in {saved}" if saved else "no step had finished yet"
    if isinstance(exc, KeyboardInterrupt):
        return UserError(f"{name} interrupted at step {step}/{total}; {where}; re-run the same command to resume")
    return UserError(f"{name} ran out of GPU memory at step {step + 1}; {where}. Lower {lower}, then re-run to resume")


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


class TrainLoop:
    """Micro-batches -> accumulated optimizer steps, with logging, eval and resumable checkpoints."""

    def __init__(
        self,
        *,
        name: str,
        bank: AdapterBank,
        role: str,
        cfg: TrainingConfig,
        stage_dir: Path,
        dataset: Sequence[Any],
        collate: Callable[[list[Any]], Any],
        loss_fn: LossFn,
        weight_fn: WeightFn,
        seed: int,
        eval_fn: EvalFn | None = None,
        settings: Any = None,
    ):
        self.name, self.bank, self.role, self.cfg = name, bank, role, cfg
        self.stage_dir = Path(stage_dir)
        self.dataset, self.collate, self.loss_fn, self.weight_fn, self.eval_fn = (
            dataset,
            collate,
            loss_fn,
            weight_fn,
            eval_fn,
        )
        self.seed = seed
        self.micro_per_epoch = math.ceil(len(dataset) / cfg.batch_size)
        if cfg.max_steps > 0:
            self.total_steps = cfg.max_steps
        else:
            self.total_steps = max(
                1, math.ceil(cfg.num_epochs * self.micro_per_epoch / cfg.gradient_accumulation_steps)
            )
        self.params = bank.trainable_parameters()
        self.optimizer = build_optimizer(self.params, cfg, bank.device)
        self.scheduler = build_scheduler(self.optimizer, cfg, self.total_steps)
        self.ckpt = Checkpointer(self.stage_dir / "checkpoints", cfg.save_total_limit, fingerprint(settings), name)
        self._order_cache: tuple[int, list[int]] | None = None
        self.skipped_steps = 0  # optimizer steps skipped for a non-finite loss or gradient norm
        self.skips_in_a_row = 0

    # ------------------------------------------------------------------ data order

    def _epoch_order(self, epoch: int) -> list[int]:
        if self._order_cache is None or self._order_cache[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._order_cache = (epoch, torch.randperm(len(self.dataset), generator=g).tolist())
        return self._order_cache[1]

    def micro_batch(self, m: int) -> Any:
        """The m-th micro-batch of the run (deterministic, so resume needs only the step)."""
        epoch, pos = divmod(m, self.micro_per_epoch)
        order = self._epoch_order(epoch)
        bs = self.cfg.batch_size
        return self.collate([self.dataset[i] for i in order[pos * bs : (pos + 1) * bs]])

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self, step: int) -> Path:
        return self.ckpt.save(
            step,
            bank=self.bank,
            roles=[self.role],
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            extra={**self.clock.state(), "skipped_steps": self.skipped_steps, "skips_in_a_row": self.skips_in_a_row},
        )

    # ------------------------------------------------------------------ the loop

    def _step(self, step: int) -> dict[str, float]:
        """One optimizer step over `gradient_accumulation_steps` micro-batches.

        The step's loss is the mean over all its units (tokens or pairs), so every micro-batch's
        summed loss is divided by the step's total weight before its own backward: one
        micro-batch's graph is alive at a time.
        """
        accum = self.cfg.gradient_accumulation_steps
        batches = [self.micro_batch(step * accum + k) for k in range(accum)]
        total = max(sum(self.weight_fn(b) for b in batches), 1e-8)
        loss_total, sums = 0.0, {}
        with self.bank.use(self.role, train=True) as model:
            for batch in batches:
                loss_sum, metric_sums = self.loss_fn(model, batch)
                (loss_sum / total).backward()
                loss_total += loss_sum.item()
                for k, v in metric_sums.items():
                    sums[k] = sums.get(k, 0.0) + v
        grad_norm = grad_norm_(self.params, self.cfg.max_grad_norm)
        lr = self.scheduler.get_last_lr()[0]
        finite = math.isfinite(loss_total) and math.isfinite(grad_norm)
        step_or_skip(self.optimizer, self.scheduler, finite)
        self.skipped_steps += not finite
        self.skips_in_a_row = 0 if finite else self.skips_in_a_row + 1
        metrics = {"loss": loss_total / total, "lr": lr, **{k: v / total for k, v in sums.items()}}
        if self.cfg.max_grad_norm > 0:
            metrics["grad_norm"] = grad_norm
        metrics["skipped_steps"] = self.skipped_steps
        return metrics

    def run(self) -> LoopResult:
        log = MetricsLogger(self.stage_dir, self.cfg.report_to, run_name=f"{self.stage_dir.parent.name}/{self.name}")
        start = 0
        self.clock = StageClock()
        latest = self.ckpt.latest()
        if latest is not None:
            start, extra = self.ckpt.load(
                latest, bank=self.bank, roles=[self.role], optimizer=self.optimizer, scheduler=self.scheduler
            )
            self.clock.resume(extra)
            self.skipped_steps, self.skips_in_a_row = extra.get("skipped_steps", 0), extra.get("skips_in_a_row", 0)
            logger.info("%s: resuming from %s (step %d of %d)", self.name, latest, start, self.total_steps)
        log.truncate_after(start)  # records of a run killed after its last checkpoint (or before the first)
        step = start
        last: dict[str, float] = {}
        bar = tqdm(total=self.total_steps, initial=start, desc=self.name, unit="step", dynamic_ncols=True, disable=None)
        try:
            while step < self.total_steps:
                metrics = self._step(step)
                step += 1
                last = metrics
                bar.update(1)
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", skipped=self.skipped_steps)
                at_end = step == self.total_steps
                stop = self.skips_in_a_row >= self.cfg.max_consecutive_skips
                if self.eval_fn is not None and (
                    at_end or (self.cfg.eval_steps > 0 and step % self.cfg.eval_steps == 0)
                ):
                    metrics.update(self.eval_fn(self.bank))
                if stop or at_end or step % self.cfg.logging_steps == 0 or any(k.startswith("eval_") for k in metrics):
                    metrics["epoch"] = step * self.cfg.gradient_accumulation_steps / self.micro_per_epoch
                    metrics["elapsed_s"] = self.clock.elapsed()
                    metrics.update(peak_memory(self.bank.device))
                    log.log(step, metrics)
                    bar.write(
                        f"{self.name} step {step}/{self.total_steps}: "
                        + ", ".join(
                            f"{k}={v:.4g}"
                            for k, v in metrics.items()
                            if isinstance(v, float) and k not in ("elapsed_s", "peak_rss_gb", "peak_gpu_memory_gb")
                        )
                    )
                if stop:
                    raise diverged(self.name, step, self.total_steps, self.skips_in_a_row, self.ckpt.latest(), self.cfg)
                # a periodic checkpoint is never taken inside a run of skipped steps: the last good one stays
                periodic = self.cfg.save_steps > 0 and step % self.cfg.save_steps == 0 and not self.skips_in_a_row
                if at_end or periodic:
                    self.save_checkpoint(step)
        except (KeyboardInterrupt, torch.OutOfMemoryError) as e:
            self.optimizer.zero_grad(set_to_none=True)
            saved = self.save_checkpoint(step) if step > start else self.ckpt.latest()
            raise interrupted(
                e,
                self.name,
                step,
                self.total_steps,
                saved,
                f"{self.name}.batch_size (raise gradient_accumulation_steps to keep the effective batch) or max_length",
            ) from None
        finally:
            bar.close()
            log.close()
        return LoopResult(steps=step, metrics=last, resumed_from=start)
