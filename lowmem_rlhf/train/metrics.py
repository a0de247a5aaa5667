"""Metric sinks: metrics.jsonl always, TensorBoard and W&B when the recipe's `report_to` asks.

metrics.jsonl is strict JSON (one object per line): a NaN or inf value is written as null and its key
is listed in the record's `nonfinite` field, so a diverging run is visible, never silent.
"""

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
        truncate_jsonl(self.path, step)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        nonfinite = [k for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)]
        record = {"step": step, **{k: (None if k in nonfinite else v) for k, v in metrics.items()}}
        if nonfinite:
            record["nonfinite"] = nonfinite
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record, allow_nan=False) + "\n")
        finite = {k: v for k, v in metrics.items() if k not in nonfinite}
        if self._tb is not None:
            for k, v in finite.items():
                if isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(finite, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def truncate_jsonl(path: Path, step: int) -> None:
    """Keep the records of a `{"step": ...}` JSONL file up to `step` (a line cut short by a kill is dropped too)."""
    path = Path(path)
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            kept.append(line)
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def read_metrics(path: Path) -> list[dict]:
    if not Path(path).exists():
        return []
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
