"""One point on each backend: the batch in the backend's layout, prepare, one checked run, the timing.

Per (point, backend), `run_backend`:
  1. availability (`Backend.availability()`, then `unavailable_for(spec)` for layout/part support,
     then `BackendUnavailable` raised by prepare) -> a "skipped" row with the reason, never a crash;
  2. the batch in the layout the backend supports: a paged point on a contiguous-only backend runs
     the contiguous batch of the same spec (and a contiguous point on a paged-only backend runs a
     paged batch with `fallback_page_size`); the row records the layout that ran. Batches and
     their fp32 references are built once per (point, layout) and shared by the backends;
  3. prepare (untimed plan work), one run, BOTH outputs checked against the fp32 reference
     (max_rel_error) on every timed point; a part the backend does not compute gets NaN;
  4. timing of `run` only (experiments.harness.timing), eager or (timing.cuda_graph) replays of its
     CUDA graph, whose first replay is checked too (the row keeps the worse error); on a CPU the
     checked call itself is the (not meaningful) time;
  5. exceptions -> an "error" row with the exception text; torch.cuda.OutOfMemoryError -> "oom".
`run_point` runs a point's backends grouped by layout and stops the sweep (CudaContextLost) when a
backend left the CUDA context broken.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
import traceback
from typing import Any, Callable, Sequence

import torch

from baselines.registry import AttentionOutput, Backend, BackendOptions, BackendUnavailable
from experiments.harness.points import Point
from experiments.harness.provenance import provenance
from experiments.harness.timing import TimingConfig, time_run
from pod.batch import BatchSpec, HybridBatch, make_batch
from pod.reference import max_rel_error, reference


def _layout(spec: BatchSpec) -> str:
    return "paged" if spec.paged else "contiguous"


def spec_for_backend(spec: BatchSpec, backend: Backend, fallback_page_size: int = 16) -> BatchSpec:
    """The spec in a KV layout `backend` supports (same sequences, dtype and heads)."""
    if _layout(spec) in backend.layouts:
        return spec
    if "contiguous" in backend.layouts:
        return dataclasses.replace(spec, page_size=None)
    return dataclasses.replace(spec, page_size=fallback_page_size)


class PointBatches:
    """Batches of one point and their fp32 references, each built lazily once per KV layout."""

    def __init__(self, device: torch.device, seed: int):
        self.device, self.seed = device, seed
        self._batches: dict[BatchSpec, HybridBatch] = {}
        self._refs: dict[BatchSpec, tuple[torch.Tensor, torch.Tensor]] = {}

    def batch(self, spec: BatchSpec) -> HybridBatch:
        if spec not in self._batches:
            self._batches[spec] = make_batch(spec, self.device, self.seed)
        return self._batches[spec]

    def release(self, spec: BatchSpec) -> None:
        self._batches.pop(spec, None)
        self._refs.pop(spec, None)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def reference(self, spec: BatchSpec) -> tuple[torch.Tensor, torch.Tensor]:
        if spec not in self._refs:
            self._refs[spec] = reference(self.batch(spec))
        return self._refs[spec]


def _describe_exception(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip()
    return text if len(text) <= 2000 else text[:2000] + "..."


# Errors after which the CUDA context is unusable: every later launch in the process fails too.
_STICKY_CUDA_ERRORS = ("illegal memory access", "unspecified launch failure", "misaligned address",
                       "device-side assert", "illegal instruction", "cuda_error_illegal")


class CudaContextLost(RuntimeError):
    """A backend left the CUDA context broken: the sweep stops (its row is written); restarting the
    process resumes after it, and `rerun_errors=true` retries the failed row."""


def _is_oom(e: BaseException) -> bool:
    oom = getattr(torch.cuda, "OutOfMemoryError", None)
    return (oom is not None and isinstance(e, oom)) or "out of memory" in str(e).lower()


def _options_json(options: BackendOptions) -> str:
    return json.dumps(options.as_dict(), sort_keys=True)


def base_row(point: Point, sweep: str, backend: str, spec: BatchSpec | None = None) -> dict[str, Any]:
    """Every column that depends only on the point (and the spec that ran), NaN metrics."""
    spec = spec or point.spec
    h = spec.heads
    first = spec.prefill_chunks[0] if spec.prefill_chunks else None
    dec = spec.decode_context_lens
    return dict(
        point_id=point.point_id, sweep=sweep, backend=backend, model=point.model,
        num_q_heads=h.num_q_heads, num_kv_heads=h.num_kv_heads, head_dim=h.head_dim, dtype=spec.dtype,
        kv_layout=_layout(spec), page_size=spec.page_size,
        num_prefill=spec.num_prefill, chunk_len=first.chunk_len if first else 0,
        prefill_context_len=first.context_len if first else 0,
        num_decode=spec.num_decode, decode_context_len=round(sum(dec) / len(dec)) if dec else 0,
        batch=spec.describe(), status="ok", reason="",
        median_ms=math.nan, p20_ms=math.nan, p80_ms=math.nan, timing_meaningful=False,
        prefill_err=math.nan, decode_err=math.nan,
        prefill_flops=spec.prefill_flops(), decode_bytes=spec.decode_bytes(),
        tflops=math.nan, gbps=math.nan, backend_config="{}", options="{}", cuda_graph=False,
    )


def check_outputs(out: AttentionOutput, ref: tuple[torch.Tensor, torch.Tensor], batch: HybridBatch,
                  backend: Backend) -> tuple[float, float]:
    """(prefill_err, decode_err): max rel error of each part the backend computes and the batch has."""
    errs = []
    for part, got, want in (("prefill", out.prefill, ref[0]), ("decode", out.decode, ref[1])):
        if part not in backend.computes or want.shape[0] == 0:
            errs.append(math.nan)
            continue
        if got is None:
            raise RuntimeError(f"{backend.name} computes {part} but returned no {part} output")
        if tuple(got.shape) != tuple(want.shape):
            raise RuntimeError(f"{backend.name} {part} output has shape {tuple(got.shape)}, "
                               f"expected {tuple(want.shape)}")
        errs.append(max_rel_error(got, want))
    return errs[0], errs[1]


def _worse(a: float, b: float) -> float:
    """The larger error (inf: a non-finite output); NaN (the part is not computed) only when both are."""
    if math.isnan(a) or math.isnan(b):
        return b if math.isnan(a) else a
    return max(a, b)


def replay_check(row: dict[str, Any], ref: tuple[torch.Tensor, torch.Tensor], batch: HybridBatch,
                 backend: Backend) -> Callable[[AttentionOutput], None]:
    """check(out) for time_run under timing.cuda_graph: a graph replay's outputs against the reference,
    the worse of its errors and the eager call's kept in `row`."""
    def check(out: AttentionOutput) -> None:
        errs = check_outputs(out, ref, batch, backend)
        row["prefill_err"], row["decode_err"] = _worse(row["prefill_err"], errs[0]), _worse(row["decode_err"], errs[1])
    return check


def run_backend(point: Point, backend: Backend, batches: PointBatches, sweep: str,
                timing: TimingConfig, fallback_page_size: int = 16,
                options: BackendOptions = BackendOptions()) -> dict[str, Any]:
    """The result row of one backend on one point (never raises except KeyboardInterrupt/SystemExit)."""
    recorded = {"options": _options_json(options), "cuda_graph": timing.cuda_graph}
    row = {**base_row(point, sweep, backend.name), **recorded}
    why = backend.availability()
    if why is not None:
        return {**row, "status": "skipped", "reason": why}
    spec = spec_for_backend(point.spec, backend, fallback_page_size)
    row = {**base_row(point, sweep, backend.name, spec), **recorded}
    why = backend.unavailable_for(spec)
    if why is not None:
        return {**row, "status": "skipped", "reason": why}
    try:
        batch = batches.batch(spec)
        try:
            run = backend.setup(batch, options)
        except BackendUnavailable as e:
            return {**row, "status": "skipped", "reason": str(e)}
        row["backend_config"] = json.dumps(getattr(run, "backend_config", {}) or {}, sort_keys=True,
                                           default=str)
        t0 = time.perf_counter()
        out = run()
        if batch.device.type == "cuda":
            torch.cuda.synchronize(batch.device)
        first_ms = (time.perf_counter() - t0) * 1e3
        row["prefill_err"], row["decode_err"] = check_outputs(out, batches.reference(spec), batch, backend)
        del out
        if batch.device.type == "cuda":
            check = replay_check(row, batches.reference(spec), batch, backend)
            med, p20, p80, meaningful = time_run(run, batch.device, timing, check=check)
        else:  # CPU/interpreter: the checked call is the (not meaningful) timing; no second call
            med = p20 = p80 = first_ms
            meaningful = False
    except Exception as e:  # noqa: BLE001 - every failure becomes a row
        status = "oom" if _is_oom(e) else "error"
        if status == "oom" and torch.cuda.is_available():
            torch.cuda.empty_cache()
        if os.environ.get("POD_HARNESS_TRACEBACK"):
            traceback.print_exc()
        return {**row, "status": status, "reason": _describe_exception(e)}
    s = med * 1e-3
    computes_prefill = "prefill" in backend.computes and spec.num_prefill
    computes_decode = "decode" in backend.computes and spec.num_decode
    row.update(median_ms=med, p20_ms=p20, p80_ms=p80, timing_meaningful=meaningful,
               tflops=spec.prefill_flops() / s / 1e12 if computes_prefill and s > 0 else math.nan,
               gbps=spec.decode_bytes() / s / 1e9 if computes_decode and s > 0 else math.nan)
    return row


def run_point(point: Point, backends: Sequence[Backend], sweep: str, device: torch.device,
              timing: TimingConfig = TimingConfig(), seed: int = 0, fallback_page_size: int = 16,
              on_row: Callable[[dict[str, Any]], None] | None = None,
              options: BackendOptions = BackendOptions()) -> list[dict[str, Any]]:
    """Rows of `point` on each backend (provenance included); `on_row` sees each row as soon as it
    exists (the sweep appends it to disk there).

    Backends run grouped by the KV layout they need (the point's own layout first), and a layout's
    batch is freed after its last backend, so at most one copy of the KV cache is alive: a
    Llama-2-7B point with 1M decode tokens holds 17 GB of KV a layout.
    """
    batches = PointBatches(device, seed)
    specs = [spec_for_backend(point.spec, b, fallback_page_size) for b in backends]
    order = sorted(range(len(backends)), key=lambda i: specs[i] != point.spec)   # stable
    last_user = {specs[i]: i for i in order}
    rows = []
    for i in order:
        row = run_backend(point, backends[i], batches, sweep, timing, fallback_page_size, options)
        row.update(provenance(device))
        rows.append(row)
        if last_user[specs[i]] == i:
            batches.release(specs[i])
        if on_row is not None:
            on_row(row)
        if row["status"] == "error" and any(m in row["reason"].lower() for m in _STICKY_CUDA_ERRORS):
            raise CudaContextLost(f"{backends[i].name} on {point.spec.describe()}: {row['reason']}")
    return rows
