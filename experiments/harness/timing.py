"""Timing of a backend's `run()`: `triton.testing.do_bench` on a GPU, eagerly or through a CUDA graph;
one wall-clock call on a CPU.

do_bench clears the L2 cache (writes a 256 MB buffer) before every repetition, so small points are
timed cold-cache like a real layer, with no extra input copies. On a CPU (the Triton interpreter) a
time means nothing about a GPU kernel: it is recorded with `timing_meaningful` False.

`timing.cuda_graph=true` times what an engine that captures attention in CUDA graphs pays: `run` is
captured once (after the harness's eager, checked call: compiled and autotuned by then), one replay
into outputs poisoned with NaN is checked against the reference, and do_bench times the replays (same
L2 flush), so a tiny batch measures its kernels and not the host's launch path. Every row records the
mode (`cuda_graph`). CUDA graphs need a CUDA GPU: asked for on a CPU, it is refused.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Mapping

import torch


@dataclasses.dataclass(frozen=True)
class TimingConfig:
    warmup_ms: float = 25.0
    rep_ms: float = 100.0
    cuda_graph: bool = False     # time replays of one CUDA graph of run() instead of eager calls

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None) -> "TimingConfig":
        """The `timing` block of a config; ValueError naming the key for an unknown key or a bad value."""
        cfg = dict(cfg or {})
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(cfg) - set(known))
        if unknown:
            raise ValueError(f"timing.{unknown[0]} is unknown; timing takes {', '.join(known)}")
        for key in ("warmup_ms", "rep_ms"):
            v = cfg.get(key, getattr(cls, key))
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
                raise ValueError(f"timing.{key}={v!r} is invalid: a positive number of milliseconds")
        if not isinstance(cfg.get("cuda_graph", False), bool):
            raise ValueError(f"timing.cuda_graph={cfg['cuda_graph']!r} is invalid: true or false")
        return cls(**cfg)


def capture_graph(run: Callable[[], Any], device: torch.device) -> tuple[torch.cuda.CUDAGraph, Any]:
    """One call of `run` captured in a CUDA graph: (graph, what the captured call returned, i.e. the
    buffers every replay writes). A warm-up call on a side stream comes first (torch's recipe: lazy
    initialisation stays out of the capture). A run that cannot be captured raises RuntimeError saying so."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        run()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            out = run()
    except Exception as e:  # noqa: BLE001 - said as what it is, the harness makes it an error row
        raise RuntimeError(f"CUDA graph capture of run() failed: {type(e).__name__}: {e}") from e
    return graph, out


def replay_poisoned(graph: torch.cuda.CUDAGraph, out: Any, device: torch.device) -> Any:
    """Fill the graph's floating-point outputs with NaN, replay it once, wait: `out` then holds what the
    replay wrote (a row it leaves unwritten stays NaN)."""
    for t in (out if isinstance(out, (tuple, list)) else (out,)):
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            t.fill_(float("nan"))
    graph.replay()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out


def time_run(run: Callable[[], Any], device: torch.device, timing: TimingConfig,
             check: Callable[[Any], None] | None = None) -> tuple[float, float, float, bool]:
    """(median_ms, p20_ms, p80_ms, meaningful). CUDA: do_bench with L2 flush of `run`, or with
    timing.cuda_graph of replays of its graph (`check` gets the outputs of a poisoned replay first);
    else one wall-clock call of `run`."""
    if device.type != "cuda":
        if timing.cuda_graph:
            raise ValueError(f"timing.cuda_graph=true needs a CUDA GPU (device={device})")
        t0 = time.perf_counter()
        run()
        ms = (time.perf_counter() - t0) * 1e3
        return ms, ms, ms, False
    import triton.testing
    timed, graph = run, None
    if timing.cuda_graph:
        graph, out = capture_graph(run, device)
        if check is not None:
            check(replay_poisoned(graph, out, device))
        timed = graph.replay
    med, p20, p80 = triton.testing.do_bench(timed, warmup=timing.warmup_ms, rep=timing.rep_ms,
                                            quantiles=[0.5, 0.2, 0.8])
    del graph                             # its memory pool goes with it
    return float(med), float(p20), float(p80), True
