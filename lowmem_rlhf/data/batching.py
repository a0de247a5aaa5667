"""Padding token rows into batches; masks come from lengths, never from `ids == pad_id`."""

from __future__ import annotations

import torch


def pad_sequences(
    rows: list[list[int]], pad_id: int, padding_side: str = "right", width: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of token rows, `width` columns at least; masks come from lengths (pad == eos ok)."""
    width = max(width or 0, *(len(r) for r in rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, r in enumerate(rows):
        sl = slice(0, len(r)) if padding_side == "right" else slice(width - len(r), width)
        ids[i, sl] = torch.tensor(r, dtype=torch.long)
        mask[i, sl] = True
    return ids, mask
