"""Masked statistics over (b, t) tensors; mask is bool, True = valid."""

from __future__ import annotations

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `x` over the entries where `mask` is True (over all of them when `dim` is None).

    An all-invalid slice gives 0 rather than NaN, so an empty micro-batch cannot poison a sum.
    """
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)
