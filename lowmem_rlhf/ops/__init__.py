"""Pure tensor math (torch only): no config, no I/O, no modules with state.

Dims legend: b batch, t tokens, d hidden size, v vocab. Masks are bool, True = valid, named `*mask`.
"""

from lowmem_rlhf.ops.logprobs import chunked_logprobs
from lowmem_rlhf.ops.stats import masked_mean

__all__ = ["chunked_logprobs", "masked_mean"]
