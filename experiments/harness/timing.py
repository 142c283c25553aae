"""Timing of a backend's `run()`: `triton.testing.do_bench` on a GPU, one wall-clock call on a CPU.

do_bench clears the L2 cache (writes a 256 MB buffer) before every repetition, so small points are
timed cold-cache like a real layer, with no extra input copies. On a CPU (the Triton interpreter) a
time means nothing about a GPU kernel: it is recorded with `timing_meaningful` False.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import torch


@dataclasses.dataclass(frozen=True)
class TimingConfig:
    warmup_ms: float = 25.0
    rep_ms: float = 100.0


def time_run(run: Callable[[], Any], device: torch.device, timing: TimingConfig
             ) -> tuple[float, float, float, bool]:
    """(median_ms, p20_ms, p80_ms, meaningful). CUDA: do_bench with L2 flush; else one wall-clock call."""
    if device.type == "cuda":
        import triton.testing
        med, p20, p80 = triton.testing.do_bench(run, warmup=timing.warmup_ms, rep=timing.rep_ms,
                                                quantiles=[0.5, 0.2, 0.8])
        return float(med), float(p20), float(p80), True
    t0 = time.perf_counter()
    run()
    ms = (time.perf_counter() - t0) * 1e3
    return ms, ms, ms, False
