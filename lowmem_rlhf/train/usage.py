"""Wall time and peak memory of a training stage, logged with its metrics and kept across resumes."""

from __future__ import annotations

import sys
import time

import torch


def peak_memory(device: torch.device) -> dict[str, float]:
    """{"peak_gpu_memory_gb": max allocated} on CUDA; {"peak_rss_gb": the process's peak RSS} elsewhere.

    The RSS is the whole process's high-water mark (earlier stages of the same `run` included); the
    CUDA number counts tensors only, as `torch.cuda.max_memory_allocated` does.
    """
    if device.type == "cuda":
        return {"peak_gpu_memory_gb": torch.cuda.max_memory_allocated(device) / 2**30}
    try:
        import resource
    except ImportError:  # Windows
        return {}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_rss_gb": rss / 2**30 if sys.platform == "darwin" else rss / 2**20}


class StageClock:
    """Training wall time that survives a resume: the seconds saved with the last checkpoint plus this run's."""

    def __init__(self) -> None:
        self.base = 0.0
        self.t0 = time.perf_counter()

    def resume(self, saved: dict) -> None:
        self.base = float(saved.get("elapsed_s", 0.0))
        self.t0 = time.perf_counter()

    def elapsed(self) -> float:
        return self.base + time.perf_counter() - self.t0

    def state(self) -> dict:
        return {"elapsed_s": self.elapsed()}
