"""Scalar heads (reward score, value) kept in fp32 and saved beside their adapter (pitfall 8)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lowmem_rlhf.errors import UserError

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
    """hidden (..., d) in any dtype -> score (...,) in fp32."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1, dtype=torch.float32)
        # A small init keeps the first rewards/values near 0 and their gradients sane.
        nn.init.normal_(self.linear.weight, std=1.0 / (hidden_size + 1) ** 0.5)
        nn.init.zeros_(self.linear.bias)

    @property
    def hidden_size(self) -> int:
        return self.linear.in_features

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden.float()).squeeze(-1)

    def save(self, directory: Path) -> Path:
        from safetensors.torch import save_file

        path = Path(directory) / HEAD_FILE
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.linear.state_dict().items()}
        check_finite(tensors, f"the scalar head to {path}")
        save_file(tensors, str(path), metadata={"hidden_size": str(self.hidden_size)})
        return path

    @classmethod
    def load(cls, directory: Path, device: torch.device | str = "cpu") -> ScalarHead:
        """Load a saved head; a missing file is an error, never a silent re-initialisation.

        A head file in the transformers layout (a `weight` and no bias) loads with a zero bias.
        """
        from safetensors.torch import load_file

        path = Path(directory) / HEAD_FILE
        if not path.is_file():
            raise UserError(
                f"{path} is missing: the adapter in {directory} needs its scalar head; it was saved without one or "
                "the file was deleted. Re-run the stage that made it (with --force) instead of starting "
                "from a random head"
            )
        state = load_file(str(path))
        head = cls(state["weight"].shape[-1])
        state.setdefault("bias", torch.zeros(1, dtype=torch.float32))
        head.linear.load_state_dict(state)
        return head.to(device)
