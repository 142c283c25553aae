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
from experiments.harness.provenance import device_slug, provenance
from experiments.harness.schema import SERVING_COLUMNS, SERVING_SCHEMA, append_row
from experiments.serving.engine import Engine
from experiments.serving.kv_cache import PagedKVCache
from experiments.serving.metrics import summarize
from experiments.serving.model import LlamaModel, ModelConfig
from experiments.serving.scheduler import SchedulerConfig
from experiments.serving.workload import LengthDist, WorkloadConfig, generate

log = logging.getLogger(__name__)
DTYPES = {**SUPPORTED_DTYPES, "float32": torch.float32}


def _container(x):
    return OmegaConf.to_container(x, resolve=True) if x is not None else None


def full_model_config(cfg: DictConfig) -> ModelConfig:
    """The model as published (all its layers)."""
    return ModelConfig(**OmegaConf.to_container(cfg.serving.model, resolve=True))


def model_config(cfg: DictConfig) -> ModelConfig:
    """The model as built: `num_layers` of it (null: all)."""
    return full_model_config(cfg).with_layers(cfg.num_layers)


def kv_pages(cfg: DictConfig, mcfg: ModelConfig, full_layers: int, dtype: torch.dtype) -> int:
    """KV pages per layer: `num_pages`, else `kv_cache_gb` over the layers' pools. With
    `kv_for_full_model` (default) the budget is that of the FULL model's layers, so a cut model holds
    the tokens the full model would (same admission, same preemptions, same iterations: the cut
    only shortens each iteration) and allocates num_layers/full_layers of the bytes."""
    if cfg.num_pages:
        return int(cfg.num_pages)
    layers = full_layers if cfg.get("kv_for_full_model", True) else mcfg.num_layers
    return PagedKVCache.num_pages_for_bytes(int(float(cfg.kv_cache_gb) * 2**30), layers,
                                            int(cfg.page_size), mcfg.heads, dtype)


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


class ServingRefused(RuntimeError):
    """A serving run that cannot start as configured (said in one line before anything is built)."""


CPU_SMOKE = ("python -m experiments.serving serving/model=tiny_llama serving/workload=tiny serving/scheduler=tiny "
             "device=cpu dtype=float32 backends=[reference] num_layers=2 num_pages=64")


def serve(cfg: DictConfig) -> list[dict[str, Any]]:
    """One row per backend of cfg.backends: the same model weights and workload for each."""
    if str(cfg.device).startswith("cuda") and not torch.cuda.is_available():
        raise ServingRefused(f"device={cfg.device} is GPU-only and there is no CUDA GPU here; on a CPU: {CPU_SMOKE}")
    if cfg.mode not in ("offline", "online"):
        raise ValueError(f"mode={cfg.mode!r} is invalid: 'offline' or 'online'")
    if cfg.mode == "online" and not (cfg.qps and float(cfg.qps) > 0):
        raise ValueError(f"mode=online needs qps > 0 (got {cfg.qps!r}); python -m experiments.serving.paper "
                         "derives it from an offline capacity run")
    if cfg.dtype not in DTYPES:
        raise ValueError(f"dtype={cfg.dtype!r} is invalid: one of {tuple(DTYPES)}")
    device = torch.device(cfg.device)
    dtype = DTYPES[cfg.dtype]
    mcfg = model_config(cfg)
    full_layers = full_model_config(cfg).num_layers
    sched = scheduler_config(cfg)
    wl = workload_config(cfg, mcfg.vocab_size)
    options = BackendOptions.from_config(_container(cfg.get("backend_options")))
    for name in backend_names(cfg):
        get_backend(name)            # an unknown name fails here (UnknownBackend), before anything runs
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
                row.update(_serve(cfg, name, model, sched, wl, options, full_layers))
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


def _serve(cfg, backend: str, model: LlamaModel, sched: SchedulerConfig, wl: WorkloadConfig,
           options: BackendOptions, full_layers: int) -> dict:
    mcfg, device, dtype = model.cfg, model.device, model.dtype
    num_pages = kv_pages(cfg, mcfg, full_layers, dtype)
    cache = PagedKVCache(mcfg.num_layers, num_pages, int(cfg.page_size), mcfg.heads, dtype, device,
                         seed=int(cfg.seed))
    engine = Engine(model, cache, sched, backend=backend, plan_per_layer=bool(cfg.plan_per_layer), options=options)
    attn_err = None
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
