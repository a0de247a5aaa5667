"""Scalar heads (reward score, value) kept in fp32 and saved beside their adapter (pitfall 8)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from lowmem_rlhf.errors import UserError

logger = logging.getLogger(__name__)

HEAD_FILE = "head.safetensors"


def check_finite(tensors: dict[str, torch.Tensor], what: str) -> None:
    """Refuse to write NaN/inf weights: a diverged model must never look like a result."""
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise UserError(
                f"refusing to save {what}: tensor {name} holds NaN or inf values, so training diverged; lower the "
                "learning_rate or set max_grad_norm, then re-run with --force"
            )


class ScalarHead(nn.Module):
    """hidden (..., d) in any dtype -> score (...,) in fp32: a bias-free fp32 `Linear(d, 1)`.

    The transformers layout (`score` of a `*ForSequenceClassification`, `v_head`-style value heads): a
    Bradley-Terry reward is defined up to a constant, so a bias gets no gradient there, and a value
    head learns its offset through the adapter. A head saved with a `bias` (older run folders) loads
    with that bias as a fixed `offset`, so its scores are unchanged; docs/export.md says how to drop it.
    """

    def __init__(self, hidden_size: int, offset: float = 0.0):
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1, bias=False, dtype=torch.float32)
        # A small init keeps the first rewards/values near 0 and their gradients sane.
        nn.init.normal_(self.linear.weight, std=1.0 / (hidden_size + 1) ** 0.5)
        self.offset = float(offset)  # not a parameter: never trained, only carried from a legacy head file

    @property
    def hidden_size(self) -> int:
        return self.linear.in_features

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        score = self.linear(hidden.float()).squeeze(-1)
        return score + self.offset if self.offset else score

    def save(self, directory: Path) -> Path:
        from safetensors.torch import save_file

        path = Path(directory) / HEAD_FILE
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.linear.state_dict().items()}
        if self.offset:
            tensors["bias"] = torch.tensor([self.offset], dtype=torch.float32)
        check_finite(tensors, f"the scalar head to {path}")
        save_file(tensors, str(path), metadata={"hidden_size": str(self.hidden_size)})
        return path

    @classmethod
    def load(cls, directory: Path, device: torch.device | str = "cpu") -> ScalarHead:
        """Load a saved head; a missing file is an error, never a silent re-initialisation."""
        from safetensors.torch import load_file

        path = Path(directory) / HEAD_FILE
        if not path.is_file():
            raise UserError(
                f"{path} is missing: the adapter in {directory} needs its scalar head; it was saved without one or "
                "the file was deleted. Re-run the stage that made it (with --force) instead of starting "
                "from a random head"
            )
        state = load_file(str(path))
        if "weight" not in state or set(state) - {"weight", "bias"}:
            raise UserError(
                f"{path}: expected a `weight` tensor (hidden_size,) or (1, hidden_size) and at most a `bias`, "
                f"found {sorted(state)}"
            )
        weight = state["weight"].reshape(1, -1).float()
        offset = float(state["bias"].reshape(())) if "bias" in state else 0.0
        if offset:
            logger.info("%s holds a score bias %+.6g (older layout): kept as a fixed offset", path, offset)
        head = cls(weight.shape[-1], offset=offset)
        head.linear.load_state_dict({"weight": weight})
        return head.to(device)
