"""A faster CPU kernel for bitsandbytes' 4-bit quantization, bit-identical to the library's own.

On CPU, loading a base in 4 bits spends almost all its time in bitsandbytes' `quantize_4bit`: the
library's only CPU implementation (its "default" kernel) scales whole weight matrices at once and
finds each value's code with `torch.bucketize`, about 30-80 ns per weight on one core (97% of
`load_base` for Qwen2.5-0.5B). `fast_quantize_4bit` computes the same bytes: the same absmax, the
same `x * (1 / absmax)` scaling and clamp, and the code as the number of midpoints below the value
(what `bucketize(..., right=False)` returns), counted with 15 comparisons over cache-sized chunks of
blocks. `cpu_quantization()` routes bitsandbytes' `quantize_4bit` op to it for CPU tensors while a
model loads, and only for the bitsandbytes version it was checked against (other versions keep
their own kernel). `tests/test_quantize_cpu.py` compares both kernels byte for byte.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from importlib.metadata import PackageNotFoundError, version

import torch

CHECKED_BITSANDBYTES = ("0.50.",)  # versions whose default CPU kernel this one reproduces
CHUNK_BLOCKS = 4096  # blocks scaled and compared at a time: 1 MB of fp32 at blocksize 64, cache-sized

calls = 0  # weights quantized by fast_quantize_4bit in this process (tests read it)


def bitsandbytes_checked() -> bool:
    """True when the installed bitsandbytes is one this kernel was checked against."""
    try:
        installed = version("bitsandbytes")
    except PackageNotFoundError:
        return False
    return installed.startswith(CHECKED_BITSANDBYTES)


def quantize_bounds(quant_type: str) -> tuple[list[float], torch.Tensor]:
    """The 15 midpoints between sorted 4-bit codes (fp32, as bitsandbytes computes them) and the sort order."""
    from bitsandbytes.functional import get_4bit_type

    code = get_4bit_type(quant_type, device="cpu")
    order = torch.argsort(code)
    midpoints = (code[order[:-1]] + code[order[1:]]) / 2
    return midpoints.tolist(), order


def _codes(scaled: torch.Tensor, bounds: list[float], out: torch.Tensor) -> None:
    """out[i] = how many bounds lie strictly below scaled[i] (uint8), i.e. torch.bucketize(scaled, bounds)."""
    torch.gt(scaled, bounds[0], out=out)
    for b in bounds[1:]:
        out += scaled > b


def fast_quantize_4bit(
    A: torch.Tensor, blocksize: int, quant_type: str, quant_storage: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(packed codes (n/2, 1), fp32 absmax per block): bitsandbytes' default `quantize_4bit`, faster on CPU.

    None when a block holds a NaN or an infinity (its absmax is not finite): how bucketize places a NaN is
    the library's business, so such a weight is left to its kernel.
    """
    bounds, order = quantize_bounds(quant_type)
    flat = A.reshape(-1)
    n = flat.numel()
    rem = n % blocksize
    full = n - rem
    blocks = full // blocksize
    codes = torch.empty(n + n % 2, dtype=torch.uint8)
    absmax = torch.empty(blocks + (1 if rem else 0), dtype=torch.float32)
    grid = flat[:full].view(blocks, blocksize)
    for start in range(0, blocks, CHUNK_BLOCKS):
        stop = min(start + CHUNK_BLOCKS, blocks)
        chunk = grid[start:stop].float()
        amax = chunk.abs().max(dim=-1)[0]
        if not torch.isfinite(amax).all():
            return None
        absmax[start:stop] = amax
        scaled = torch.clamp(chunk * (1.0 / amax.clamp(min=1e-38).view(-1, 1)), -1, 1).reshape(-1)
        _codes(scaled, bounds, codes[start * blocksize : stop * blocksize])
    if rem:
        tail = flat[full:].float()
        amax = tail.abs().max().clamp(min=1e-38)
        if not torch.isfinite(amax):
            return None
        absmax[blocks] = amax
        _codes(torch.clamp(tail / amax, -1, 1), bounds, codes[full:n])
    if n % 2:  # bitsandbytes pads an odd count with a zero
        codes[n] = sum(b < 0.0 for b in bounds)
    if quant_type != "nf4":  # FP4's codes are not sorted: map the rank back to the code's index
        codes = order.to(torch.uint8)[codes.long()]
    packed = ((codes[::2] << 4) | codes[1::2]).unsqueeze(1)
    if quant_storage != torch.uint8:
        packed = packed.squeeze().view(quant_storage).unsqueeze(1)
    return packed, absmax


class _QuantizeOp:
    """Stands in for `torch.ops.bitsandbytes.quantize_4bit` while a model loads: CPU tensors without NaN go
    to fast_quantize_4bit, anything else (CUDA, a NaN or inf weight) to the library's own kernel."""

    def __init__(self, packet):
        self.packet = packet

    def __getattr__(self, name: str):
        return getattr(self.packet, name)

    def default(self, A: torch.Tensor, blocksize: int, quant_type: str, quant_storage: torch.dtype):
        global calls
        out = fast_quantize_4bit(A, blocksize, quant_type, quant_storage) if A.device.type == "cpu" else None
        if out is None:
            return self.packet.default(A, blocksize, quant_type, quant_storage)
        calls += 1
        return out


@contextlib.contextmanager
def cpu_quantization() -> Iterator[None]:
    """While the body runs, bitsandbytes quantizes CPU weights with fast_quantize_4bit (same bytes).

    Does nothing without bitsandbytes or with a version it was not checked against. bitsandbytes'
    `functional.quantize_4bit` looks the op up on `torch.ops.bitsandbytes` at every call, so replacing
    that attribute reaches it; the attribute is restored on exit, also when the body raises.
    """
    if not bitsandbytes_checked():
        yield
        return
    import bitsandbytes  # noqa: F401  (registers torch.ops.bitsandbytes)

    namespace = torch.ops.bitsandbytes
    packet = namespace.quantize_4bit
    namespace.quantize_4bit = _QuantizeOp(packet)
    try:
        yield
    finally:
        namespace.quantize_4bit = packet
