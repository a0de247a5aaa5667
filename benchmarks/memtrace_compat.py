"""Every reach into torch / bitsandbytes / peft / transformers internals that the memory tracer needs.

`benchmarks.memory` runs the stages' own code on torch's FakeTensorMode tensors (shapes and dtypes, no
data, no compute). A few library paths cannot run on fake tensors or on a CPU build as they are; each
workaround below says why it is needed and why it changes no allocation the tracer counts. They were
written against the versions in WRITTEN_FOR and `check_versions()` refuses any other major/minor
version: a newer library may allocate differently, so its numbers must be re-checked (run
tests/test_memory.py's validation test) before the pins are moved.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from unittest import mock

import torch

WRITTEN_FOR = {"torch": "2.13", "bitsandbytes": "0.50", "transformers": "5.", "peft": "0.21"}


def check_versions() -> dict[str, str]:
    """The installed versions; raises RuntimeError naming the one that differs from WRITTEN_FOR."""
    import bitsandbytes
    import peft
    import transformers

    found = {
        "torch": torch.__version__,
        "bitsandbytes": bitsandbytes.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
    }
    for name, prefix in WRITTEN_FOR.items():
        if not found[name].startswith(prefix):
            raise RuntimeError(
                f"benchmarks/memtrace_compat.py was written for {name} {prefix}x and {name} {found[name]} is "
                "installed; its workarounds may no longer hold: re-check them and the validation test in "
                "tests/test_memory.py before changing WRITTEN_FOR"
            )
    return found


# In-place random fills: fake tensors have no values, and the CPU generator refuses fake outputs.
RANDOM_FILLS = {
    torch.ops.aten.uniform_.default,
    torch.ops.aten.normal_.default,
    torch.ops.aten.bernoulli_.float,
    torch.ops.aten.exponential_.default,
    torch.ops.aten.random_.default,
    torch.ops.aten.random_.to,
    getattr(torch.ops.aten.random_, "from"),
}
# A value read (.item(), .tolist(), bool(t)): a fake tensor has no value to give.
SCALAR_READ = torch.ops.aten._local_scalar_dense.default


def fake_scalar(dtype: torch.dtype, token: int) -> bool | float | int:
    """The value a fake tensor's read returns: True for bools (every check passes), 1.0 for floats (finite
    losses and norms), `token` for integers (a token id that is neither EOS nor pad, so every response is
    full length: the longest, largest-memory case)."""
    if dtype == torch.bool:
        return True
    return 1.0 if dtype.is_floating_point else token


def _swap_tensors(t1: torch.Tensor, t2: torch.Tensor) -> None:
    """torch.nn.Module._apply swaps each parameter for its converted copy with torch.utils.swap_tensors, which
    refuses FakeTensors (they hold weakrefs). When the conversion was a no-op (same device, dtype and shape,
    as every `.to()` in the traced code is) there is nothing to swap; otherwise the parameter takes the new
    storage, which is what the swap does to memory."""
    if t1.device == t2.device and t1.dtype == t2.dtype and t1.shape == t2.shape:
        return
    with torch.no_grad():
        t1.data = t2.detach()


@contextlib.contextmanager
def fake_mode(max_new_tokens_total: int | None = None) -> Iterator[None]:
    """FakeTensorMode plus the patches fake tensors need; `max_new_tokens_total`: generation stops on length.

    - torch.utils.swap_tensors: see `_swap_tensors`.
    - bitsandbytes.functional.create_dynamic_map builds its quantization map from Python scalars read off
      tensors (`.item()`), which fake tensors cannot give: the two maps (signed, unsigned) are built once with
      real tensors before the fake mode starts and cloned (a 256-entry fp32 tensor, as the real call returns).
    - transformers' generation StopCheck reads `unfinished_sequences.max()` (a value): generation stops on
      length only, as a batch whose every response runs to max_new_tokens does.
    """
    import bitsandbytes.functional as bnbf
    import torch.nn.modules.module as module_mod
    from torch._subclasses.fake_tensor import FakeTensorMode
    from transformers.generation import utils as gen_utils

    maps = {signed: bnbf.create_dynamic_map(signed=signed) for signed in (True, False)}
    bnbf.name2qmap.setdefault("dynamic", maps[True])

    def dynamic_map(signed: bool = True, *args, **kwargs) -> torch.Tensor:
        return maps[signed].clone()

    def stop_on_length(self, unfinished, tokens, length: int) -> bool:
        return max_new_tokens_total is not None and length >= max_new_tokens_total

    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(torch.utils, "swap_tensors", _swap_tensors))
        stack.enter_context(mock.patch.object(module_mod.torch.utils, "swap_tensors", _swap_tensors))
        stack.enter_context(mock.patch.object(bnbf, "create_dynamic_map", dynamic_map))
        stack.enter_context(mock.patch.object(gen_utils.StopCheck, "__call__", stop_on_length))
        stack.enter_context(FakeTensorMode(allow_non_fake_inputs=True))
        yield


def quantize_nf4(module, weight: torch.Tensor) -> torch.nn.Parameter:
    """`weight` quantized to NF4 with double quantization (blocks of 64), as bitsandbytes' Params4bit._quantize
    does when transformers loads a checkpoint, and set on the bnb Linear4bit `module`.

    Params4bit itself is a Parameter subclass made with `_make_subclass`, which cannot wrap a FakeTensor: the
    result is a plain Parameter carrying the same attributes (quant_state, blocksize, quant_type, ...) that
    bitsandbytes' Linear4bit.forward and peft's 4-bit LoRA layer read.
    """
    import bitsandbytes as bnb

    w4, state = bnb.functional.quantize_4bit(
        weight, blocksize=64, compress_statistics=True, quant_type="nf4", quant_storage=torch.uint8
    )
    param = torch.nn.Parameter(w4, requires_grad=False)
    param.quant_state, param.blocksize, param.compress_statistics = state, 64, True
    param.quant_type, param.quant_storage, param.bnb_quantized, param.module = "nf4", torch.uint8, True, module
    module.quant_state = state
    return param


def quant_state_tensors(state) -> list[torch.Tensor]:
    """The tensors of a bitsandbytes QuantState (absmax, code, offset and the nested state's)."""
    out = [getattr(state, k, None) for k in ("absmax", "code", "offset")]
    nested = getattr(state, "state2", None)
    if nested is not None:
        out += [getattr(nested, k, None) for k in ("absmax", "code")]
    return [t for t in out if isinstance(t, torch.Tensor)]


def mark_loaded_in_4bit(model) -> None:
    """What transformers' Bnb4BitHfQuantizer sets on a model it loaded; peft chooses its 4-bit LoRA layer
    (bitsandbytes' Linear4bit LoRA) from these."""
    model.is_loaded_in_4bit = True
    model.is_quantized = True
    model.quantization_method = "bitsandbytes"


# bitsandbytes/backends/cuda/ops.py: gemm_4bit runs its fused kernel for at most _GEMM_4BIT_CUSTOM_FLOOR_M
# rows on every GPU; above that, depending on the GPU and the shape (always above 1536 rows), it
# dequantizes the whole weight to the compute dtype and calls F.linear (_dequant_linear_fallback). The
# tracer assumes the fallback for every call above the floor: the worst case over GPUs.
GEMM_4BIT_FUSED_MAX_ROWS = 4


def is_gemm_4bit(func) -> bool:
    return str(func).startswith("bitsandbytes.gemm_4bit")


def gemm_4bit_transient(args: tuple, kwargs: dict) -> int:
    """Bytes the CUDA dequantize fallback of bitsandbytes::gemm_4bit(A, B, shapeB, absmax, blocksize, ...) holds
    inside the one op (invisible to a dispatch-level tracer): the dequantized (N, K) weight in A's dtype,
    plus, with a nested (8-bit) absmax, its fp32 dequantized copy and that copy plus the offset."""
    a, shape_b, blocksize = args[0], args[2], args[4]
    k = a.shape[-1]
    rows = a.numel() // k
    if rows <= GEMM_4BIT_FUSED_MAX_ROWS:
        return 0
    n = shape_b[0]
    extra = n * k * a.element_size()
    absmax_8bit = kwargs.get("absmax_8bit", args[7] if len(args) > 7 else None)
    if absmax_8bit is not None:
        extra += 2 * 4 * math.ceil(n * k / blocksize)
    return extra
