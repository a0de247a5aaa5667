"""Metric sinks: metrics.jsonl always, TensorBoard and W&B when the recipe's `report_to` asks."""

from __future__ import annotations

import json
import math
from pathlib import Path

from lowmem_rlhf.errors import UserError


class MetricsLogger:
    """Appends one JSON object per logged step to `stage_dir/metrics.jsonl` and mirrors it to sinks."""

    def __init__(self, stage_dir: Path, report_to: list[str], run_name: str, config: dict | None = None):
        self.path = Path(stage_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tb = None
        self._wandb = None
        if "tensorboard" in report_to:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UserError(
                    "report_to includes tensorboard but it is not installed; `pip install tensorboard`"
                ) from None
            self._tb = SummaryWriter(log_dir=str(Path(stage_dir) / "tensorboard"))
        if "wandb" in report_to:
            try:
                import wandb
            except ImportError:
                raise UserError("report_to includes wandb but it is not installed; `pip install wandb`") from None
            self._wandb = wandb.init(
                project="lowmem-rlhf", name=run_name, dir=str(stage_dir), config=config, resume="allow"
            )

    def truncate_after(self, step: int) -> None:
        """Drop records past `step`: they came from a run killed after its last checkpoint."""
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        record = {
            "step": step,
            **{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()},
        }
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def read_metrics(path: Path) -> list[dict]:
    if not Path(path).exists():
        return []
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
