"""The supervised optimisation loop shared by SFT, the reward model and DPO, on the one loop runner.

We run our own loop instead of TRL's SFTTrainer because every stage must (1) switch roles only through
the AdapterBank and hand the optimizer its explicit parameter list, (2) use the one chat rendering and
prompt masking of `lowmem_rlhf.data`, (3) compute log-probs chunk by chunk (pitfall 11), (4) never run
`prepare_model_for_kbit_training`, which upcasts every unquantized weight to fp32 (pitfall 10), and
(5) share one checkpoint format so that N steps == N/2 + kill + resume + N/2, bit for bit (pitfall 12).

Data order is a pure function of (seed, epoch), and the data cursor is derivable from the step
(micro-batch m = step * accumulation + k), so a checkpoint only needs the step, the weights, the
optimizer, the scheduler and the RNG states. Under N processes each micro-batch of `batch_size` (a
global size) is split between them, batch_size / N examples each, and the step's weight and metric
sums are summed over processes: the step is the one a single process takes, up to float rounding.
Resume, saves, Ctrl-C, skipped steps and the metric sinks are the runner's (lowmem_rlhf/train/runner.py).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from lowmem_rlhf import distributed
from lowmem_rlhf.config import TrainingConfig
from lowmem_rlhf.errors import UserError
from lowmem_rlhf.model.bank import AdapterBank
from lowmem_rlhf.train.runner import LoopRunner
from lowmem_rlhf.train.usage import peak_memory

logger = logging.getLogger(__name__)

# loss_fn(model, batch) -> (loss_sum, metric_sums): the loss summed over the batch's units (tokens for
# SFT, weighted pairs for RM/DPO); weight_fn(batch) -> how many units it holds. A step's loss is
# sum(loss_sum) / sum(weight) over its micro-batches; metric sums are divided by the same weight.
LossFn = Callable[[torch.nn.Module, Any], tuple[torch.Tensor, dict[str, float]]]
WeightFn = Callable[[Any], float]
EvalFn = Callable[[AdapterBank], dict[str, float]]


class TrainLoop(LoopRunner):
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
        self.role, self.desc = role, name
        self.lower = f"{name}.batch_size (raise gradient_accumulation_steps to keep the effective batch) or max_length"
        self.dataset, self.collate, self.loss_fn, self.weight_fn, self.eval_fn = (
            dataset,
            collate,
            loss_fn,
            weight_fn,
            eval_fn,
        )
        self.micro_per_epoch = math.ceil(len(dataset) / cfg.batch_size)
        if cfg.max_steps > 0:
            total_steps = cfg.max_steps
        else:
            total_steps = max(1, math.ceil(cfg.num_epochs * self.micro_per_epoch / cfg.gradient_accumulation_steps))
        super().__init__(
            name=name,
            bank=bank,
            cfg=cfg,
            stage_dir=stage_dir,
            total_steps=total_steps,
            scheduler_steps=total_steps,
            roles=[role],
            settings=settings,
            seed=seed,
        )
        distributed.check_divides({f"{name}.batch_size": cfg.batch_size}, self.dist.world)
        self._order_cache: tuple[int, list[int]] | None = None

    # ------------------------------------------------------------------ data order

    def _epoch_order(self, epoch: int) -> list[int]:
        if self._order_cache is None or self._order_cache[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._order_cache = (epoch, torch.randperm(len(self.dataset), generator=g).tolist())
        return self._order_cache[1]

    def micro_batch(self, m: int) -> Any:
        """The m-th micro-batch of the run (deterministic, so resume needs only the step).

        Under N processes, this process's share of it; None when the share is empty (the short last
        micro-batch of an epoch may leave a process without examples).
        """
        epoch, pos = divmod(m, self.micro_per_epoch)
        order = self._epoch_order(epoch)
        bs = self.cfg.batch_size
        rows = order[pos * bs : (pos + 1) * bs]
        if self.dist.enabled:
            per = math.ceil(len(rows) / self.dist.world)
            rows = rows[self.dist.rank * per : (self.dist.rank + 1) * per]
            if not rows:
                return None
        return self.collate([self.dataset[i] for i in rows])

    # ------------------------------------------------------------------ one step and its hooks

    def _step(self, step: int) -> dict[str, float]:
        """One optimizer step over `gradient_accumulation_steps` micro-batches.

        The step's loss is the mean over all its units (tokens or pairs), so every micro-batch's
        summed loss is divided by the step's total weight before its own backward: one
        micro-batch's graph is alive at a time.
        """
        accum = self.cfg.gradient_accumulation_steps
        error, weight = None, 0.0
        try:  # a data error in one process stops every process in the step's first collective
            batches = [self.micro_batch(step * accum + k) for k in range(accum)]
            weight = sum(self.weight_fn(b) for b in batches if b is not None)
        except UserError as e:
            error = e
        total = max(distributed.agree_sum([weight], error)[0], 1e-8)
        loss_total, sums = 0.0, {}
        with self.bank.use(self.role, train=True) as model:
            for batch in batches:
                if batch is None:
                    continue
                loss_sum, metric_sums = self.loss_fn(model, batch)
                (loss_sum / total).backward()
                loss_total += loss_sum.item()
                for k, v in metric_sums.items():
                    sums[k] = sums.get(k, 0.0) + v
        if self.dist.enabled:  # the step's sums over every process's share
            parts = distributed.all_gather_object((loss_total, sums))
            loss_total, sums = 0.0, {}
            for loss_r, sums_r in parts:
                loss_total += loss_r
                for k, v in sums_r.items():
                    sums[k] = sums.get(k, 0.0) + v
        lr = self.scheduler.get_last_lr()[0]
        grad_norm = self.optimizer_step(math.isfinite(loss_total))
        metrics = {"loss": loss_total / total, "lr": lr, **{k: v / total for k, v in sums.items()}}
        if self.cfg.max_grad_norm > 0:
            metrics["grad_norm"] = grad_norm
        metrics["skipped_steps"] = self.skipped_steps
        return metrics

    def after_step(self, step: int, metrics: dict[str, float], at_end: bool) -> None:
        if self.eval_fn is not None and (at_end or (self.cfg.eval_steps > 0 and step % self.cfg.eval_steps == 0)):
            metrics.update(self.eval_fn(self.bank))

    def wants_log(self, metrics: dict[str, float]) -> bool:
        return any(k.startswith("eval_") for k in metrics)

    def log_fields(self, step: int, metrics: dict[str, float]) -> None:
        metrics["epoch"] = step * self.cfg.gradient_accumulation_steps / self.micro_per_epoch
        metrics["elapsed_s"] = self.clock.elapsed()
        metrics.update(peak_memory(self.bank.device))

    def postfix(self, metrics: dict[str, float]) -> dict[str, Any]:
        return {"loss": f"{metrics['loss']:.4f}", "skipped": self.skipped_steps}

    def summary(self, metrics: dict[str, float]) -> str:
        hidden = ("elapsed_s", "peak_rss_gb", "peak_gpu_memory_gb")
        return ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float) and k not in hidden)
