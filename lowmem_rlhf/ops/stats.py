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


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of `x` over all valid entries (0-dim); `unbiased` divides by n - 1 instead of n.

    x, mask: any matching shape, e.g. (b, t). Invalid entries never reach the result, whatever they hold.
    With fewer valid entries than the divisor needs (n < 2 unbiased, n < 1 biased) the variance is 0
    rather than NaN, like `masked_mean` on an empty slice.
    """
    x = torch.where(mask, x, 0)
    centered = torch.where(mask, x - masked_mean(x, mask), 0)
    n = mask.sum()
    return centered.square().sum() / (n - 1 if unbiased else n).clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / sqrt(var + 1e-8) over the valid entries (unbiased variance), to normalise advantages.

    x, mask: (b, t). With `shift_mean` False the mean is added back, so `x` is only rescaled.
    Returns (b, t); invalid entries are 0.
    """
    x = torch.where(mask, x, 0)
    mean = masked_mean(x, mask)
    whitened = (x - mean) * torch.rsqrt(masked_var(x, mask) + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask, whitened, 0)
