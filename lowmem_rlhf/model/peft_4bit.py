"""peft's LoRA layer on a 4-bit linear, computed in the compute dtype and without its defensive copy.

peft 0.21's `peft.tuners.lora.bnb.Linear4bit.forward` (the layer peft puts over every bitsandbytes 4-bit
linear) costs memory that its arithmetic does not need, in every layer recomputed by gradient checkpointing:

- it clones the 4-bit matmul's output ("defensively", for old torch versions): one more (n, out) tensor;
- it casts every LoRA input to the adapter weights' dtype, fp32 (peft keeps adapters in fp32): an fp32
  copy of the (n, in) input that the LoRA A matmul keeps for the backward pass, and the LoRA output
  computed as an fp32 (n, out) tensor before it is cast back and added.

`LeanLoraLinear4bit.forward` runs the LoRA matmuls in the input's dtype, with the fp32 adapter weights cast to
it (r x (in + out) elements: small), adds the result to the 4-bit output out of place (no autograd node
keeps that output, so nothing needs the clone), and leaves the rest (merged or disabled adapters, mixed
adapter batches, DoRA and other variants, autocast) to peft's own forward. Gradients still reach the fp32
adapter weights, where the optimizer steps. With an fp32 compute dtype (the CPU) the operations and their
values are peft's, bit for bit. In bf16 the LoRA product is rounded to bf16 after each of its two matmuls
instead of once at the end (tests/test_bank.py bounds the difference).

This reaches into peft internals (the layer's attributes and its forward's cases), so it applies only to
the peft version it was written for (WRITTEN_FOR); with another one, peft's layers are left as they are:
the same numbers, more memory.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

WRITTEN_FOR = "0.21."
_warned = False


def _peft_layer_class():
    """peft's 4-bit LoRA layer class, or None when this peft version is not the one written for."""
    global _warned
    import peft

    if not peft.__version__.startswith(WRITTEN_FOR):
        if not _warned:
            logger.warning(
                "peft %s: the lean 4-bit LoRA forward was written for peft %sx; using peft's own (more memory)",
                peft.__version__,
                WRITTEN_FOR,
            )
            _warned = True
        return None
    try:
        from peft.tuners.lora.bnb import Linear4bit
    except ImportError:  # bitsandbytes not installed: no 4-bit layers
        return None
    return Linear4bit


_lean_classes: dict[type, type] = {}


def _lean_class(base: type) -> type:
    if base not in _lean_classes:

        def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            if (
                self.disable_adapters
                or self.merged
                or kwargs.get("adapter_names") is not None
                or any(name in self.lora_variant for name in self.active_adapters)
                or torch.is_autocast_enabled()
            ):
                return base.forward(self, x, *args, **kwargs)
            kwargs.pop("alora_offsets", None)  # a variant's argument, never the base layer's
            result = self.base_layer(x, *args, **kwargs)
            for name in self.active_adapters:
                if name not in self.lora_A:
                    continue
                lora_a, lora_b = self.lora_A[name].weight, self.lora_B[name]
                h = self.lora_dropout[name](x)
                if lora_a.dtype == x.dtype:
                    out = lora_b(self.lora_A[name](h)) * self.scaling[name]
                else:
                    bias = None if lora_b.bias is None else lora_b.bias.to(x.dtype)
                    out = (
                        F.linear(F.linear(h, lora_a.to(x.dtype)), lora_b.weight.to(x.dtype), bias) * self.scaling[name]
                    )
                result = result + out.to(result.dtype)
            return result

        _lean_classes[base] = type("LeanLoraLinear4bit", (base,), {"forward": forward, "__module__": __name__})
    return _lean_classes[base]


def use_lean_4bit_lora(model: torch.nn.Module) -> int:
    """Give every peft 4-bit LoRA layer of `model` the lean forward (module docstring); returns how many."""
    layer = _peft_layer_class()
    if layer is None:
        return 0
    lean = _lean_class(layer)
    n = 0
    for module in model.modules():
        if type(module) is layer:
            module.__class__ = lean
            n += 1
    return n
