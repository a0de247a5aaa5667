"""lowmem-rlhf: the whole RLHF pipeline (SFT, reward model, PPO, DPO) on one frozen 4-bit backbone.

Heavy libraries (transformers, peft, bitsandbytes) are imported by the modules that use them, so
``import lowmem_rlhf`` and the ``ops`` package stay light.

CPU kernels: on x86 machines we ask torch for its AVX2 kernels and MKL for its AVX2 code path
(conditional numerical reproducibility) unless you set ``ATEN_CPU_CAPABILITY`` / ``MKL_CBWR``
yourself or ``LOWMEM_RLHF_CPU_KERNELS=native``. torch otherwise picks AVX-512 kernels where the CPU
has them, whose floating-point sums round differently, and a CPU run (the tiny pipeline, the tests)
then gives other numbers on another CPU. This only takes effect when ``lowmem_rlhf`` is imported
before torch runs its first operation (the CLI and the test suite do); GPU kernels are unaffected.
See docs/tiny.md, "Reproducibility".
"""

import os as _os
import platform as _platform


def _pin_cpu_kernels() -> None:
    if _os.environ.get("LOWMEM_RLHF_CPU_KERNELS", "pinned") == "native":
        return
    if _platform.machine().lower() in ("x86_64", "amd64"):
        _os.environ.setdefault("ATEN_CPU_CAPABILITY", "avx2")
        _os.environ.setdefault("MKL_CBWR", "AVX2")


_pin_cpu_kernels()

__version__ = "0.1.0"
