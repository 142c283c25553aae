"""One serving run from a composed config (conf/serving.yaml): the logic behind `python -m experiments.serving`.

    serve(cfg) -> rows  builds the model and the workload once; for each backend of cfg.backends
                        a fresh paged KV cache, a warm-up (a short workload whose attention is checked
                        against the fp32 reference at every layer: JIT compilation happens here, and
                        `attn_err` lands in the row), the workload's first `warmup_requests` prompts
                        untimed, then the timed run; one tidy row per backend,
                        each appended to {out_dir}/{sweep_name}/{device}.csv unless out_dir is "".
A backend that cannot run (unavailable, not paged, OOM) gives a row with status "skipped"/"oom"/"error"
and the reason, so a sweep over backends records every attempt.
"""
from __future__ import annotations

import dataclasses
import logging
import traceback
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from pod.batch import SUPPORTED_DTYPES
from baselines.registry import BackendOptions, BackendUnavailable, get_backend
from experiments import cli
from experiments.harness.provenance import device_slug, provenance
from experiments.harness.schema import SERVING_COLUMNS, SERVING_SCHEMA, append_row
from experiments.serving.engine import Engine
from experiments.serving.kv_cache import PagedKVCache, free_memory_bytes, pages_to_hold
from experiments.serving.metrics import summarize
from experiments.serving.model import LlamaModel, ModelConfig
from experiments.serving.scheduler import SchedulerConfig
from experiments.serving.workload import LengthDist, WorkloadConfig, generate

log = logging.getLogger(__name__)
DTYPES = {**SUPPORTED_DTYPES, "float32": torch.float32}


class ServingRefused(RuntimeError):
    """A serving run that cannot start as configured (said in one line before anything is built)."""


def _container(x):
    return OmegaConf.to_container(x, resolve=True) if x is not None else None


def full_model_config(cfg: DictConfig) -> ModelConfig:
    """The model as published (all its layers)."""
    return ModelConfig(**OmegaConf.to_container(cfg.serving.model, resolve=True))


def model_config(cfg: DictConfig) -> ModelConfig:
    """The model as built: `num_layers` of it (null: all)."""
    return full_model_config(cfg).with_layers(cfg.num_layers)


def kv_pages(cfg: DictConfig, dtype: torch.dtype, need_pages: int | None = None,
             free_bytes: int | None = None) -> int:
    """KV pages per layer: `num_pages` when set; else the budget `kv_cache_gb` over the layers' pools,
    or, with `kv_cache_gb: null`, `kv_memory_fraction` of `free_bytes` less the weights; either capped
    at `need_pages` (the workload all resident at once: a bigger pool changes no schedule).
    With `kv_for_full_model` (default) the budget is that of the FULL model (its layers, its weights),
    so a cut model holds the tokens the full model would (same admission, same preemptions, same
    iterations: the cut only shortens each iteration) and allocates num_layers/full_layers of the bytes."""
    if cfg.num_pages is not None:
        return int(cfg.num_pages)
    mcfg = full_model_config(cfg) if cfg.get("kv_for_full_model", True) else model_config(cfg)
    if cfg.kv_cache_gb is not None:
        budget = float(cfg.kv_cache_gb) * 2**30
    elif free_bytes is not None:
        budget = float(cfg.kv_memory_fraction) * free_bytes - weight_bytes(mcfg, dtype)
    else:
        budget = None
    pages = None if budget is None else PagedKVCache.num_pages_for_bytes(
        int(max(budget, 0)), mcfg.num_layers, int(cfg.page_size), mcfg.heads, dtype)
    if need_pages is not None:
        pages = need_pages if pages is None else min(pages, need_pages)
    if pages is None:
        raise ValueError("kv_cache_gb=null sizes the KV pool from the device's free memory: give "
                         "kv_cache_gb= or num_pages= where that is not known")
    return pages


def weight_bytes(mcfg: ModelConfig, dtype: torch.dtype) -> int:
    return mcfg.num_parameters() * (torch.finfo(dtype).bits // 8)


class KVCacheTooLarge(ServingRefused):
    """The KV pool (and the weights) asked for do not fit in the device's free memory."""


def size_kv_cache(cfg: DictConfig, dtype: torch.dtype, device: torch.device,
                  workloads: list[list]) -> int:
    """kv_pages for `workloads` (each a list of RequestSpecs the engine serves in turn: the warm-up, the
    timed run) on `device`, or a one-line refusal (KVCacheTooLarge, ServingRefused) before anything is
    allocated: when the built layers' pool and weights exceed `kv_memory_fraction` of the device's free
    memory, or when the pool cannot hold the longest request."""
    page, mcfg = int(cfg.page_size), model_config(cfg)
    watermark = scheduler_config(cfg).watermark
    lengths = [[len(r.prompt) + r.output_len for r in specs] for specs in workloads if specs]
    free, source = free_memory_bytes(device)
    pages = kv_pages(cfg, dtype, need_pages=max(pages_to_hold(n, page, watermark) for n in lengths),
                     free_bytes=free)
    kv = pages * PagedKVCache.page_bytes(mcfg.num_layers, page, mcfg.heads, dtype)
    weights = weight_bytes(mcfg, dtype)
    usable = float(cfg.kv_memory_fraction) * free
    gib = 2.0**30
    if kv + weights > usable:
        asked = (f"num_pages={cfg.num_pages}" if cfg.num_pages is not None else
                 f"kv_cache_gb={cfg.kv_cache_gb}" if cfg.kv_cache_gb is not None else "kv_cache_gb=null")
        raise KVCacheTooLarge(
            f"{asked}: a KV pool of {pages:,} pages x {page} tokens x {mcfg.num_layers} layers "
            f"({kv / gib:.1f} GiB) and {mcfg.name}'s weights ({weights / gib:.1f} GiB) do not fit in "
            f"kv_memory_fraction={cfg.kv_memory_fraction} of the {free / gib:.1f} GiB {source} on {device}; "
            f"give a smaller kv_cache_gb= or num_pages= (kv_cache_gb=null: as much as fits)")
    longest = max(max(n) for n in lengths)
    if pages * page < longest:
        raise ServingRefused(f"{pages:,} KV pages of {page} tokens hold {pages * page:,} tokens, fewer "
                             f"than the longest request's {longest:,}: give more num_pages= or kv_cache_gb=")
    return pages


def workload_config(cfg: DictConfig, vocab_size: int) -> WorkloadConfig:
    w = cfg.serving.workload
    online = cfg.mode == "online"
    return WorkloadConfig(num_requests=int(cfg.num_requests),
                          prompt_len=LengthDist(**OmegaConf.to_container(w.prompt_len, resolve=True)),
                          output_len=LengthDist(**OmegaConf.to_container(w.output_len, resolve=True)),
                          vocab_size=vocab_size, qps=float(cfg.qps) if online else None,
                          seed=int(cfg.seed))


def scheduler_config(cfg: DictConfig) -> SchedulerConfig:
    return SchedulerConfig(**OmegaConf.to_container(cfg.serving.scheduler, resolve=True))


def warmup_workload(chunk_size: int, vocab_size: int, seed: int) -> WorkloadConfig:
    """Four requests whose prompts span 1-2 chunks (chunked prefill with context, several chunks
    per iteration) and a few decodes each, so hybrid, prefill-only and decode-only iterations run."""
    return WorkloadConfig(num_requests=4,
                          prompt_len=LengthDist("uniform", low=max(1, chunk_size // 2), high=2 * chunk_size),
                          output_len=LengthDist("fixed", value=4), vocab_size=vocab_size, seed=seed + 1)


def backend_names(cfg: DictConfig) -> list[str]:
    b = cfg.backends
    return [b] if isinstance(b, str) else [str(x) for x in b]


def cpu_smoke() -> str:
    """The serving smoke on a CPU, as this interpreter runs it."""
    return cli.command("experiments.serving serving/model=tiny_llama serving/workload=tiny serving/scheduler=tiny "
                       "device=cpu dtype=float32 backends=[reference] num_layers=2")


def _is_count(v, least: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= least


def _is_positive(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0


def check_config(cfg: DictConfig) -> None:
    """Every top-level value serve() reads, checked before anything is built: ServingRefused naming
    the key and what it takes. (The model, workload and scheduler groups are checked by their own
    dataclasses; serve() says their ValueError in one line too.)"""
    def bad(key: str, allowed: str):
        return ServingRefused(f"{key}={cfg.get(key)!r} is invalid: {allowed}")
    if cfg.mode not in ("offline", "online"):
        raise bad("mode", "offline or online")
    if cfg.qps is not None and not _is_positive(cfg.qps):
        raise bad("qps", "requests per second > 0 (online mode; null offline)")
    if cfg.mode == "online" and cfg.qps is None:
        raise ServingRefused(f"mode=online needs qps > 0; {cli.command('experiments.serving.paper')} "
                             "derives it from an offline capacity run")
    if cfg.dtype not in DTYPES:
        raise bad("dtype", f"one of {', '.join(DTYPES)}")
    p = cfg.page_size
    if not _is_count(p, 1) or p & (p - 1):
        raise bad("page_size", "a power of two (tokens a KV page)")
    if cfg.num_pages is not None and not _is_count(cfg.num_pages, 1):
        raise bad("num_pages", "a positive number of KV pages, or null to size the pool from "
                               "kv_cache_gb or the device's free memory")
    if cfg.kv_cache_gb is not None and not _is_positive(cfg.kv_cache_gb):
        raise bad("kv_cache_gb", "GiB > 0, or null: as much as the workload uses and free memory holds")
    if not (_is_positive(cfg.kv_memory_fraction) and cfg.kv_memory_fraction <= 1):
        raise bad("kv_memory_fraction", "a fraction in (0, 1]")
    if not _is_count(cfg.num_requests, 1):
        raise bad("num_requests", "a positive number of requests")
    if cfg.num_layers is not None and not _is_count(cfg.num_layers, 1):
        raise bad("num_layers", "a positive number of layers, or null for all of the model's")
    if not _is_count(cfg.warmup_requests, 0):
        raise bad("warmup_requests", "a non-negative number of requests")
    device = str(cfg.device)
    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError):
        kind = None
    if kind not in ("cpu", "cuda"):
        raise bad("device", "cpu, cuda or cuda:<index>")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ServingRefused(f"device={cfg.device} is GPU-only and there is no CUDA GPU here; on a CPU: {cpu_smoke()}")


def serve(cfg: DictConfig) -> list[dict[str, Any]]:
    """One row per backend of cfg.backends: the same model weights and workload for each. What cannot
    run is refused before anything is built (ServingRefused, UnknownBackend), in one line."""
    check_config(cfg)
    device = torch.device(cfg.device)
    dtype = DTYPES[cfg.dtype]
    try:
        mcfg = model_config(cfg)
        full_layers = full_model_config(cfg).num_layers
        sched = scheduler_config(cfg)
        wl = workload_config(cfg, mcfg.vocab_size)
        options = BackendOptions.from_config(_container(cfg.get("backend_options")))
    except (ValueError, TypeError) as e:
        raise ServingRefused(str(e)) from None
    for name in backend_names(cfg):
        get_backend(name)            # an unknown name fails here (UnknownBackend), before anything runs
    warm = generate(warmup_workload(sched.chunk_size, mcfg.vocab_size, int(cfg.seed))) if cfg.warmup else []
    num_pages = size_kv_cache(cfg, dtype, device, [warm, generate(wl)])
    model = None
    rows = []
    for name in backend_names(cfg):
        row: dict[str, Any] = {
            "sweep": cfg.sweep_name, "backend": name, "model": mcfg.name, "mode": cfg.mode,
            "workload": cfg.serving.workload.name, "num_requests": wl.num_requests,
            "qps": wl.qps if wl.online else None,
            "load": float(cfg.load) if wl.online and cfg.get("load") is not None else None,
            "chunk_size": sched.chunk_size, "num_layers": mcfg.num_layers,
            "model_num_layers": full_layers, "page_size": int(cfg.page_size), "dtype": cfg.dtype,
            "timing_meaningful": device.type == "cuda", "options": options.as_dict(),
        }
        try:
            backend = get_backend(name)
            why = backend.availability()
            if why is None and "paged" not in backend.layouts:
                why = f"{name} supports {sorted(backend.layouts)} KV only; the engine serves from paged KV"
            if why is None and backend.computes != {"prefill", "decode"}:
                why = f"{name} computes only {sorted(backend.computes)}; serving needs prefill and decode"
            if why is not None:
                row.update(status="skipped", reason=why)
            else:
                if model is None:
                    model = LlamaModel(mcfg, dtype=dtype, device=device, seed=int(cfg.seed))
                row.update(_serve(cfg, name, model, sched, wl, options, full_layers, num_pages))
                row.update(status="ok", reason="")
        except BackendUnavailable as e:
            row.update(status="skipped", reason=str(e))
        except torch.cuda.OutOfMemoryError as e:
            row.update(status="oom", reason=str(e).splitlines()[0])
        except Exception as e:  # recorded, so the other backends still run; the traceback is logged
            log.error("serving run with %s failed:\n%s", name, traceback.format_exc())
            row.update(status="error", reason=f"{type(e).__name__}: {e}"[:500])
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
        row.update(provenance(device))
        row = {c: row.get(c) for c in SERVING_COLUMNS}
        if cfg.out_dir:
            path = Path(cfg.out_dir) / cfg.sweep_name / f"{device_slug(device)}.csv"
            append_row(path, row, SERVING_SCHEMA)
            log.info("row appended to %s", path)
        rows.append(row)
    return rows


# Backends that run our Triton/Gluon kernels: a serving run warms them with pod.api.warmup (warm_kernels).
KERNEL_WARMUP_BACKENDS = frozenset({"pod", "pod_paper", "pod_sm90", "triton_serial", "triton_decode",
                                    "triton_prefill"})


def _serve(cfg, backend: str, model: LlamaModel, sched: SchedulerConfig, wl: WorkloadConfig,
           options: BackendOptions, full_layers: int, num_pages: int) -> dict:
    mcfg, device, dtype = model.cfg, model.device, model.dtype
    cache = PagedKVCache(mcfg.num_layers, num_pages, int(cfg.page_size), mcfg.heads, dtype, device,
                         seed=int(cfg.seed))
    engine = Engine(model, cache, sched, backend=backend, plan_per_layer=bool(cfg.plan_per_layer), options=options)
    attn_err = None
    if cfg.warm_kernels and backend in KERNEL_WARMUP_BACKENDS and device.type == "cuda":
        # Every kernel our backends may launch for this model, compiled and the decode kernel autotuned for
        # every split-length bucket, before anything is timed (pod.api.warmup): the backends share Triton's
        # caches, so each runs with the same picks, and no timed step pays a 0.5 s autotune.
        from pod.api import warmup
        from pod.batch import BatchSpec
        h = mcfg.heads
        warmup(BatchSpec.build(h.num_q_heads, h.num_kv_heads, h.head_dim, decode=[1],
                               dtype=str(cfg.dtype), page_size=int(cfg.page_size)),
               device, decode_buckets=True)
    if cfg.warmup:
        engine.verify = True
        warm = engine.run(generate(warmup_workload(sched.chunk_size, mcfg.vocab_size, int(cfg.seed))))
        engine.verify = False
        attn_err = warm.attn_err
        log.info("%s warm-up: %d iterations, attention max rel error vs fp32 reference %.3g",
                 backend, len(warm.iterations), attn_err)
    requests = generate(wl)
    if cfg.warmup_requests:
        # The workload's own first prompts, few output tokens, untimed: kernels see the workload's
        # context lengths (autotuner keys, JIT specialisations) before the timed run.
        engine.run([dataclasses.replace(s, arrival_s=0.0, output_len=min(s.output_len, 16))
                    for s in requests[:int(cfg.warmup_requests)]])
    log.info("serving %d requests (%s, %s) with %s: %d KV pages of %d tokens",
             len(requests), cfg.mode, cfg.serving.workload.name, backend, num_pages, cfg.page_size)
    run = engine.run(requests, online=wl.online)
    out = summarize(run, model_num_layers=full_layers, num_layers=mcfg.num_layers, qps=wl.qps)
    out.update(attn_err=attn_err, kv_pages=num_pages)
    log.info("%s: %.3f req/s, %.0f tok/s, TTFT p50 %.1f ms, TBT p50 %.1f ms, attention %.0f%% of "
             "forward, %d iterations (%d hybrid), %d preemptions", backend, out["requests_per_s"],
             out["tokens_per_s"], out["ttft_p50_ms"], out["tbt_p50_ms"], 100 * out["attention_share"],
             out["iterations"], out["hybrid_iterations"], out["preemptions"])
    log.info("%s: %.2f requests/min (steady %.2f), TBT p99 %.1f ms, stalls >200 ms %d, >500 ms %d of %d gaps; "
             "%d of %d layers: time_scale %.3f -> scaled %.2f requests/min (estimate)", backend,
             out["requests_per_min"], out["steady_requests_per_min"], out["tbt_p99_ms"], out["stalls_200ms"],
             out["stalls_500ms"], out["decode_gaps"], mcfg.num_layers, full_layers, out["time_scale"],
             out["scaled_requests_per_min"])
    del engine, cache
    return out
