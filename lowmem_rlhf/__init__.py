"""lowmem-rlhf: the whole RLHF pipeline (SFT, reward model, PPO, DPO) on one frozen 4-bit backbone.

Heavy libraries (transformers, peft, bitsandbytes) are imported by the modules that use them, so
``import lowmem_rlhf`` and the ``ops`` package stay light.
"""

__version__ = "0.1.0"
