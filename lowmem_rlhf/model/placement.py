"""The frozen input-embedding table in host memory (`model.embeddings: host`).

A forward only reads the rows of its own tokens from the input-embedding table, so the table itself
(vocab × hidden in the compute dtype: 0.98 GiB for Llama-3.1-8B, 1.02 GiB for Qwen2.5-7B) need not take
GPU memory: `HostEmbedding` keeps the model's own embedding module in CPU memory, looks the token ids up
there and copies the (tokens × hidden) rows to the GPU. The rows are the same values (a lookup is a
copy), so nothing the stages compute changes. The cost is a device-to-host copy of the token ids and a
host-to-device copy of the rows per forward (32 MiB for 2 × 2048 tokens at hidden 4096; a decode step
copies a few KiB). A model whose `lm_head` is its input-embedding table (tied) keeps it on the device:
every forward multiplies by the whole table there.
"""

from __future__ import annotations

import torch
from torch import nn

HOST = torch.device("cpu")
# whether a run keeps the table in host memory: lowmem_rlhf.model.memory.embeddings_on_host (torch-free, for `estimate`)


def is_tied(model: nn.Module) -> bool:
    """Whether the input-embedding table is also the output head's weight."""
    out = model.get_output_embeddings()
    return out is not None and out.weight is model.get_input_embeddings().weight  # transformers ties the Parameter


class HostEmbedding(nn.Module):
    """Wraps a frozen embedding module kept in host memory; forward returns its rows on the ids' device.

    The wrapped module is not a submodule, so its table is in neither `parameters()` nor `state_dict()`
    (nothing moves it back to the device). transformers' `PreTrainedModel.device` and `.dtype` read the first
    parameter, which was the table: a zero-size `anchor` in its place keeps both (the compute device and
    dtype), so generation and the attention masks see what they saw before.
    """

    def __init__(self, inner: nn.Module, device: torch.device):
        super().__init__()
        weight = inner.weight
        self.anchor = nn.Parameter(torch.empty(0, dtype=weight.dtype, device=device), requires_grad=False)
        inner.requires_grad_(False)
        object.__setattr__(self, "inner", inner.to(HOST))
        self.num_embeddings, self.embedding_dim = weight.shape
        self.padding_idx = getattr(inner, "padding_idx", None)

    @property
    def weight(self) -> torch.Tensor:
        """The table, in host memory (readers such as `get_input_embeddings().weight.shape` keep working)."""
        return self.inner.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = self.inner(input_ids.to(HOST))
        return rows.to(input_ids.device)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, in host memory, wrapping {type(self.inner).__name__}"


def keep_embeddings_on_host(model: nn.Module) -> HostEmbedding:
    """Move `model`'s input-embedding module into host memory behind a `HostEmbedding` (in place)."""
    inner = model.get_input_embeddings()
    if isinstance(inner, HostEmbedding):
        return inner
    if is_tied(model):
        raise ValueError("the input embeddings are tied to lm_head; they cannot leave the device")
    device = inner.weight.device
    wrapper = HostEmbedding(inner, device)
    model.set_input_embeddings(wrapper)
    if model.get_input_embeddings() is not wrapper:
        raise RuntimeError(f"{type(model).__name__}.set_input_embeddings did not install the host embedding")
    return wrapper
