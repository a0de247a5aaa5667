"""The CPU 4-bit kernel load_base uses gives bitsandbytes' own bytes, and load_base takes it."""

import pytest
import torch

from lowmem_rlhf.config import ModelConfig
from lowmem_rlhf.model import quantize_cpu
from lowmem_rlhf.model.loading import load_base

bnb = pytest.importorskip("bitsandbytes")


def library_kernel(A, blocksize, quant_type, storage=torch.uint8):
    return torch.ops.bitsandbytes.quantize_4bit.default(A, blocksize, quant_type, storage)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", [64, 128])
@pytest.mark.parametrize(
    "shape",
    [(1024, 192), (2 * quantize_cpu.CHUNK_BLOCKS + 3, 64), (7, 65), (3, 33), (5,)],  # chunk edges, remainders, odd
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_same_bytes_as_the_library_kernel(quant_type, blocksize, shape, dtype):
    g = torch.Generator().manual_seed(0)
    A = (torch.randn(shape, generator=g) * 0.02).to(dtype)
    flat = A.view(-1)
    # a block whose absmax is 1 holding every midpoint between codes (ties), a zero block, a subnormal
    bounds, _ = quantize_cpu.quantize_bounds(quant_type)
    if flat.numel() > 2 * blocksize:
        flat[: len(bounds) + 1] = torch.tensor([1.0, *bounds]).to(dtype)
        flat[blocksize : 2 * blocksize] = 0.0
    flat[-1] = 1e-40
    packed, absmax = quantize_cpu.fast_quantize_4bit(A, blocksize, quant_type, torch.uint8)
    ref_packed, ref_absmax = library_kernel(A, blocksize, quant_type)
    assert packed.shape == ref_packed.shape and packed.dtype == ref_packed.dtype
    assert torch.equal(packed, ref_packed)
    assert torch.equal(absmax, ref_absmax)


def test_other_storage_dtype():
    A = torch.randn(64, 128, generator=torch.Generator().manual_seed(1))
    packed, _ = quantize_cpu.fast_quantize_4bit(A, 64, "nf4", torch.bfloat16)
    ref = library_kernel(A, 64, "nf4", torch.bfloat16)[0]
    assert packed.dtype == ref.dtype == torch.bfloat16
    assert torch.equal(packed.view(torch.uint8), ref.view(torch.uint8))  # bytes: some read as bf16 NaN


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_non_finite_weights_go_to_the_library_kernel(bad):
    A = torch.randn(64, 128)
    A[3, 5] = bad
    assert quantize_cpu.fast_quantize_4bit(A, 64, "nf4", torch.uint8) is None
    before = quantize_cpu.calls
    with quantize_cpu.cpu_quantization():
        out, state = bnb.functional.quantize_4bit(A, blocksize=64, quant_type="nf4")
    assert quantize_cpu.calls == before
    assert torch.equal(out, library_kernel(A, 64, "nf4")[0])


def test_the_op_is_restored_even_when_the_body_raises():
    packet = torch.ops.bitsandbytes.quantize_4bit
    with pytest.raises(RuntimeError), quantize_cpu.cpu_quantization():
        assert torch.ops.bitsandbytes.quantize_4bit is not packet
        raise RuntimeError("boom")
    assert torch.ops.bitsandbytes.quantize_4bit is packet


def test_load_base_uses_it_and_loads_the_same_model(tiny_path):
    """Every 4-bit weight of the tiny base goes through the fast kernel, and the loaded model equals the one
    bitsandbytes' own kernel gives, tensor for tensor (packed codes, double-quantized absmax, norms, lm_head)."""
    if not quantize_cpu.bitsandbytes_checked():
        pytest.skip("bitsandbytes version not checked; load_base keeps the library kernel")
    cfg = ModelConfig(device="cpu")
    before = quantize_cpu.calls
    fast, _ = load_base(cfg)
    linear4 = [m for m in fast.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert quantize_cpu.calls - before == len(linear4) > 0
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(quantize_cpu, "bitsandbytes_checked", lambda: False)
        slow, _ = load_base(cfg)
    assert quantize_cpu.calls - before == len(linear4)
    fast_state, slow_state = fast.state_dict(), slow.state_dict()
    assert fast_state.keys() == slow_state.keys()
    for name, tensor in fast_state.items():
        assert torch.equal(tensor, slow_state[name]), name
