"""The benchmark harness: sweep points -> batches -> every backend, checked against fp32 and timed.

Library code behind `experiments/attention.py` (the Hydra entry point) and `experiments/reproduce.py`:

  expand_points(sweep, models)  a sweep config (base keys + grids of lists + explicit points) -> Points
  run_point(point, backends)    one point on every backend -> result rows (experiments.harness.schema)
  run_sweep(cfg) -> DataFrame   the whole experiment: expand, shard, resume, run, append, W&B, summary

Per (point, backend), `run_point`:
  1. availability (`Backend.availability()`, then `unavailable_reason(batch)` for layout/part support,
     then `BackendUnavailable` raised by prepare) -> a "skipped" row with the reason, never a crash;
  2. the batch in the layout the backend supports: a paged point on a contiguous-only backend runs
     the contiguous batch of the same spec (and a contiguous point on a paged-only backend runs a
     paged batch with `fallback_page_size`); the row records the layout that ran. Batches and
     their fp32 references are built once per (point, layout) and shared by the backends;
  3. prepare (untimed plan work), one run, BOTH outputs checked against the fp32 reference
     (max_rel_error) on every timed point; a part the backend does not compute gets NaN;
  4. timing of `run` only: on CUDA `triton.testing.do_bench` (median, p20, p80). do_bench clears
     the L2 cache (writes a 256 MB buffer) before every repetition, so small points are timed
     cold-cache like a real layer, no extra input copies needed. On CPU (Triton interpreter) the
     checked call itself is timed with perf_counter and `timing_meaningful` is False;
  5. exceptions -> an "error" row with the exception text; torch.cuda.OutOfMemoryError -> "oom".
Before the first point, `run_sweep` refuses in one line what cannot run: an unknown backend name (the
registered names listed), a GPU sweep or a GPU-sized point on a CPU, an unwritable results file. Ctrl-C stops with
`SweepInterrupted` (rows already appended stay, a restart resumes after them).
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import os
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import pandas as pd
import torch

from pod.batch import BatchSpec, HybridBatch, ModelHeads, make_batch
from baselines.registry import (AttentionOutput, Backend, BackendOptions, BackendUnavailable, UnknownBackend,
                                list_backends)
from experiments.harness.provenance import device_slug, provenance
from experiments.harness.results import ResultStore, WandbLogger
from pod.reference import max_rel_error, reference

# Keys a point (and a sweep's `base`) may set. Any of them may be a list inside a grid.
POINT_KEYS = ("model", "num_prefill", "chunk_len", "prefill_context_len", "num_decode",
              "decode_context_len", "page_size", "dtype")
POINT_DEFAULTS = dict(num_prefill=1, chunk_len=0, prefill_context_len=0, num_decode=0,
                      decode_context_len=0, page_size=None, dtype="bfloat16")


# -- points ----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Point:
    """One benchmark point: a model's name and a batch spec."""

    model: str
    spec: BatchSpec

    @property
    def point_id(self) -> str:
        return point_id(self.model, self.spec)


def point_id(model: str, spec: BatchSpec) -> str:
    """Stable 12-hex-digit id of (model name, batch spec): same across backends, runs and machines."""
    h = spec.heads
    key = dict(model=model, q=h.num_q_heads, kv=h.num_kv_heads, d=h.head_dim, dtype=spec.dtype,
               page_size=spec.page_size,
               prefill=[[c.chunk_len, c.context_len] for c in spec.prefill_chunks],
               decode=list(spec.decode_context_lens))
    return hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


def _to_container(x: Any) -> Any:
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:  # pragma: no cover - hydra is a dependency
        return x
    if isinstance(x, (DictConfig, ListConfig)):
        return OmegaConf.to_container(x, resolve=True)
    return x


def heads_of(model_cfg: Mapping[str, Any]) -> ModelHeads:
    return ModelHeads(int(model_cfg["num_q_heads"]), int(model_cfg["num_kv_heads"]),
                      int(model_cfg["head_dim"]))


def make_point(values: Mapping[str, Any], models: Mapping[str, Mapping[str, Any]]) -> Point:
    """A point from flat keys (POINT_KEYS). chunk_len=0 or num_prefill=0: no prefill;
    num_decode=0: no decode. Validation is BatchSpec's (its ValueError names the field)."""
    unknown = set(values) - set(POINT_KEYS)
    if unknown:
        raise ValueError(f"unknown point keys {sorted(unknown)}; allowed: {POINT_KEYS}")
    v = {**POINT_DEFAULTS, **values}
    if v.get("model") is None:
        raise ValueError("point has no model: set `model` in the sweep's base, grid or point")
    if v["model"] not in models:
        raise ValueError(f"unknown model {v['model']!r}; known: {sorted(models)}")
    counts = {k: v[k] for k in POINT_KEYS if k != "model"}
    spec = BatchSpec.from_counts(heads_of(models[v["model"]]), **counts)
    return Point(str(v["model"]), spec)


def expand_points(sweep: Mapping[str, Any], models: Mapping[str, Mapping[str, Any]]) -> list[Point]:
    """Points of a sweep config, in a deterministic order, duplicates removed (first one kept).

    sweep = {base: {key: value}, grids: [{key: value-or-list}], points: [{key: value}]}:
    every grid is the cross product of its list-valued keys (over `base`); `points` are single
    points (over `base`). Keys are POINT_KEYS, except that a grid axis whose values are dicts of
    POINT_KEYS (any axis name, e.g. `decode: [{num_decode: 16, decode_context_len: 16384}, ...]`)
    sets several keys together: that is how a grid pairs values instead of crossing them.
    A `generate: {kind: <name>, ...}` block adds the points of a generator of
    experiments.harness.paper_grid.GENERATORS (after the grids, before `points`, over `base`); a generator
    may also define models (e.g. heads per GPU under tensor parallelism), added to `models` here.
    """
    sweep = _to_container(sweep)
    models = dict(_to_container(models))
    base = dict(sweep.get("base") or {})
    out: dict[str, Point] = {}
    generated: list[dict[str, Any]] = []
    if sweep.get("generate"):
        from experiments.harness.paper_grid import GENERATORS
        block = dict(sweep["generate"])
        kind = block.pop("kind", None)
        if kind not in GENERATORS:
            raise ValueError(f"sweep {sweep.get('name')!r}: generate.kind={kind!r}; known: {sorted(GENERATORS)}")
        generated, new_models = GENERATORS[kind](block, models)
        models.update(new_models)
    for grid in sweep.get("grids") or []:
        grid = {**base, **grid}
        keys = list(grid)
        axes = [grid[k] if isinstance(grid[k], list) else [grid[k]] for k in keys]
        for combo in itertools.product(*axes):
            values: dict[str, Any] = {}
            for k, v in zip(keys, combo):
                values.update(v if isinstance(v, dict) else {k: v})
            p = make_point(values, models)
            out.setdefault(p.point_id, p)
    for values in generated:
        p = make_point({**base, **values}, models)
        out.setdefault(p.point_id, p)
    for values in sweep.get("points") or []:
        p = make_point({**base, **values}, models)
        out.setdefault(p.point_id, p)
    if not out:
        raise ValueError(f"sweep {sweep.get('name')!r} has no points (give `grids`, `generate` or `points`)")
    return list(out.values())


def shard(points: Sequence[Point], index: int, count: int) -> list[Point]:
    """Points i with i % count == index: shards of a Hydra multirun split the grid evenly."""
    if not 0 <= index < count:
        raise ValueError(f"shard={index} must be in [0, num_shards={count})")
    return [p for i, p in enumerate(points) if i % count == index]


# -- timing ----------------------------------------------------------------------------------------
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


# -- one point ---------------------------------------------------------------------------------------
def _layout(spec: BatchSpec) -> str:
    return "paged" if spec.paged else "contiguous"


def spec_for_backend(spec: BatchSpec, backend: Backend, fallback_page_size: int = 16) -> BatchSpec:
    """The spec in a KV layout `backend` supports (same sequences, dtype and heads)."""
    if _layout(spec) in backend.layouts:
        return spec
    if "contiguous" in backend.layouts:
        return dataclasses.replace(spec, page_size=None)
    return dataclasses.replace(spec, page_size=fallback_page_size)


class _PointBatches:
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
        tflops=math.nan, gbps=math.nan, backend_config="{}", options="{}",
    )


def _check(out: AttentionOutput, ref: tuple[torch.Tensor, torch.Tensor], batch: HybridBatch,
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


def run_backend(point: Point, backend: Backend, batches: _PointBatches, sweep: str,
                timing: TimingConfig, fallback_page_size: int = 16,
                options: BackendOptions = BackendOptions()) -> dict[str, Any]:
    """The result row of one backend on one point (never raises except KeyboardInterrupt/SystemExit)."""
    row = {**base_row(point, sweep, backend.name), "options": _options_json(options)}
    why = backend.availability()
    if why is not None:
        return {**row, "status": "skipped", "reason": why}
    spec = spec_for_backend(point.spec, backend, fallback_page_size)
    row = {**base_row(point, sweep, backend.name, spec), "options": _options_json(options)}
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
        row["prefill_err"], row["decode_err"] = _check(out, batches.reference(spec), batch, backend)
        del out
        if batch.device.type == "cuda":
            med, p20, p80, meaningful = time_run(run, batch.device, timing)
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
    batches = _PointBatches(device, seed)
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


# -- the experiment --------------------------------------------------------------------------------
def resolve_device(name: str, shard_index: int = 0) -> torch.device:
    """"auto": cuda:(shard % gpus) when CUDA is there (one GPU per multirun shard), else cpu."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", shard_index % torch.cuda.device_count())
        return torch.device("cpu")
    return torch.device(name)


def results_path(cfg: Mapping[str, Any], device: torch.device) -> tuple[Path, list[Path]]:
    """(file this run appends to, sibling files whose rows also count for resume).

    Default: <results_dir>/<sweep>/<device>.csv, or <device>.shard<i>of<n>.csv under multirun.
    """
    if cfg.get("results_file"):
        path = Path(cfg["results_file"])
        return path, []
    slug = device_slug(device)
    n = int(cfg.get("num_shards", 1))
    name = f"{slug}.csv" if n == 1 else f"{slug}.shard{int(cfg.get('shard', 0))}of{n}.csv"
    folder = Path(cfg.get("results_dir", "results")) / str(cfg["sweep"]["name"])
    siblings = sorted(folder.glob(f"{slug}.csv")) + sorted(folder.glob(f"{slug}.shard*.csv"))
    return folder / name, siblings


def backends_by_name(names: Iterable[str]) -> list[Backend]:
    """The registered backends in the order asked; an unknown name raises UnknownBackend (listing
    the registered names) before anything runs."""
    registered = list_backends()
    unknown = [n for n in names if n not in registered]
    if unknown:
        raise UnknownBackend(f"unknown backend {', '.join(map(repr, unknown))}; registered: "
                             f"{', '.join(registered)}")
    return [registered[n] for n in names]


class SweepRefused(RuntimeError):
    """A sweep that cannot run as configured (said in one line before the first point)."""


class SweepInterrupted(KeyboardInterrupt):
    """Ctrl-C during a sweep: the rows appended so far stay in `path`; rerunning resumes."""

    def __init__(self, path: Path, rows_kept: int):
        super().__init__(f"{rows_kept} rows kept in {path}")
        self.path, self.rows_kept = path, rows_kept


def kv_tokens(spec: BatchSpec) -> int:
    """KV tokens of the whole batch (prefill context + chunk, decode contexts), every sequence."""
    return sum(c.context_len + c.chunk_len for c in spec.prefill_chunks) + sum(spec.decode_context_lens)


def refuse_on_cpu(sweep: Mapping[str, Any], points: Sequence[Point], device: torch.device, limit: int) -> None:
    """On a CPU the kernels run in Triton's interpreter and the fp32 reference on the CPU: a GPU sweep
    (`gpu_only: true` in its config) or a GPU-sized point would take many minutes or mean nothing.
    Refuse such a sweep in one line (SweepRefused) before it starts."""
    if device.type == "cuda" or not points:
        return
    name = sweep.get("name")
    instead = "run it on a CUDA GPU, or on this CPU: python -m experiments.attention sweep=smoke backend=cpu"
    if sweep.get("gpu_only"):
        raise SweepRefused(f"sweep={name} is GPU-only (its points are sized for a GPU); {instead}")
    big = max(points, key=lambda p: kv_tokens(p.spec))
    if kv_tokens(big.spec) > limit:
        raise SweepRefused(
            f"sweep={name} is GPU-only here: point {big.spec.describe()} holds {kv_tokens(big.spec):,} KV "
            f"tokens, more than cpu_max_kv_tokens={limit:,} that the Triton interpreter runs in reasonable "
            f"time; {instead}")


def _setup_interpreter(cfg: Mapping[str, Any], device: torch.device) -> None:
    """On a CPU device Triton kernels run in the interpreter (CPU tensors): set it before any kernel
    module is imported (the registry imports backend modules lazily, after this)."""
    mode = str(cfg.get("interpret", "auto")).lower()
    if mode == "true" or (mode == "auto" and device.type != "cuda"):
        os.environ.setdefault("TRITON_INTERPRET", "1")


def error_summary(df: pd.DataFrame, threshold: float) -> pd.DataFrame:
    """Rows whose output error exceeds `threshold` (either part)."""
    if df.empty:
        return df
    bad = (df["prefill_err"].astype(float) > threshold) | (df["decode_err"].astype(float) > threshold)
    return df[bad.fillna(False)]


def run_sweep(cfg: Any) -> pd.DataFrame:
    """The whole experiment from a config (a composed Hydra DictConfig or a plain dict).

    Keys: sweep {name, base, grids, points}, models {name: {num_q_heads, num_kv_heads, head_dim}},
    model (optional, added to models under its `name`), backend {names}, backend_options, device,
    seed, timing {warmup_ms, rep_ms}, fallback_page_size, results_dir, results_file, shard, num_shards,
    rerun_errors, error_threshold, progress, interpret, cpu_max_kv_tokens,
    wandb {enabled, project, mode, dir, tags} (conf/attention.yaml documents each). Returns every row
    of this run's results file (earlier runs' rows included).

    Refuses before the first point (UnknownBackend, SweepRefused, OSError): an unknown backend name,
    a GPU sweep (`gpu_only`) or a GPU-sized point on a CPU, an unwritable results file. Raises SweepInterrupted on Ctrl-C and
    CudaContextLost after a backend breaks the CUDA context (its error row is written first); in both
    cases a restart resumes.
    """
    full_cfg = _to_container(cfg)
    c = dict(full_cfg)
    shard_index, num_shards = int(c.get("shard", 0)), int(c.get("num_shards", 1))
    device = resolve_device(str(c.get("device", "auto")), shard_index)
    sweep_name = str(c["sweep"]["name"])
    models = dict(c.get("models") or {})
    if c.get("model"):   # the `model` group's choice is always known by its name
        models[str(c["model"]["name"])] = c["model"]
    points = shard(expand_points(c["sweep"], models), shard_index, num_shards)
    options = BackendOptions.from_config(c.get("backend_options"))
    refuse_on_cpu(c["sweep"], points, device, int(c.get("cpu_max_kv_tokens", 16384)))
    _setup_interpreter(c, device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backends = backends_by_name(list(c["backend"]["names"]))

    path, siblings = results_path(c, device)
    store = ResultStore(path, siblings)
    store.check_writable()
    done = store.done(rerun_errors=bool(c.get("rerun_errors", False)))
    timing = TimingConfig(**(c.get("timing") or {}))
    seed = int(c.get("seed", 0))
    fallback_page = int(c.get("fallback_page_size", 16))

    # Per point: the backends still to run, and those that cannot run here (skipped at once, outside
    # the progress bar, so its rate and ETA count only the runs that take time).
    todo = []
    for p in points:
        run, skip = [], []
        for b in backends:
            if (p.point_id, b.name) in done:
                continue
            why = b.availability() or b.unavailable_for(spec_for_backend(p.spec, b, fallback_page))
            (skip if why else run).append(b)
        todo.append((p, run, skip))
    n_run = sum(len(r) for _, r, _ in todo)
    n_skip = sum(len(s_) for _, _, s_ in todo)
    n_done = sum(1 for p in points for b in backends if (p.point_id, b.name) in done)
    print(f"[harness] sweep={sweep_name} points={len(points)} backends={len(backends)} device={device} "
          f"-> {path} ({n_done} done earlier, {n_run} to run, {n_skip} skipped here)", file=sys.stderr)

    wb_cfg = dict(c.get("wandb") or {})
    wandb = WandbLogger(bool(wb_cfg.get("enabled", False)), project=wb_cfg.get("project", "pod-attention"),
                        config=full_cfg, group=sweep_name, tags=wb_cfg.get("tags") or (),
                        name=f"{sweep_name}-{device_slug(device)}-shard{shard_index}of{num_shards}",
                        dir=wb_cfg.get("dir"), mode=wb_cfg.get("mode", "offline"),
                        quiet=device.type != "cuda")
    written = 0

    def write(row: dict[str, Any], timed: bool = True) -> None:
        nonlocal written
        store.append(row)
        written += 1
        wandb.log_row(row)
        if timed and row["status"] == "skipped":
            bar.total -= 1               # refused at prepare: took no time, so it leaves the ETA's count
            bar.refresh()
        elif timed:
            bar.update(1)

    from tqdm.auto import tqdm
    bar = tqdm(total=n_run, unit="run", desc=sweep_name, disable=not c.get("progress", True), file=sys.stderr)
    try:
        for point, run_backends, skip_backends in todo:
            for b in skip_backends:
                write({**run_backend(point, b, None, sweep_name, timing, fallback_page, options),
                       **provenance(device)}, timed=False)
            if not run_backends:
                continue
            bar.set_postfix_str(point.spec.describe(), refresh=False)
            run_point(point, run_backends, sweep_name, device, timing, seed, fallback_page, on_row=write,
                      options=options)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    except KeyboardInterrupt:
        bar.close()
        wandb.finish()
        raise SweepInterrupted(path, written) from None
    finally:
        bar.close()

    df = store.compact()
    wandb.finish(df)                     # W&B's own lines first: our summary is the last thing printed
    threshold = float(c.get("error_threshold", 1e-2))
    bad = error_summary(df[df["status"] == "ok"] if not df.empty else df, threshold)
    if len(bad):
        lines = "\n".join(f"  {r.backend:<18} {r.batch}  prefill_err={r.prefill_err:.3g} "
                          f"decode_err={r.decode_err:.3g}" for r in bad.itertuples())
        warnings.warn(f"{len(bad)} result rows exceed error_threshold={threshold:g}:\n{lines}",
                      stacklevel=2)
    counts = df["status"].value_counts().to_dict() if not df.empty else {}
    print(f"[harness] {path}: {len(df)} rows {counts}", file=sys.stderr)
    return df


def main(cfg: Any, command: Sequence[str]) -> int:
    """`run_sweep` for a command line: a refusal (unknown backend, GPU-sized point on a CPU, unwritable
    results) or Ctrl-C ends in one line on stderr and an exit status, not a traceback. `command` is how
    the sweep was started (said again as the way to resume)."""
    try:
        run_sweep(cfg)
    except (UnknownBackend, SweepRefused, OSError) as e:
        print(f"[harness] refused: {e}", file=sys.stderr)
        return 2
    except SweepInterrupted as e:
        print(f"[harness] interrupted: {e.rows_kept} rows kept in {e.path}; resume with: "
              f"{' '.join(command)}", file=sys.stderr)
        return 130
    return 0
