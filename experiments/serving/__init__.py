"""End-to-end serving: a Llama-shaped model served by a Sarathi-Serve-style engine
whose attention goes through the backend registry, to measure POD end to end.

  model.py      Llama decoder (RMSNorm, RoPE, GQA, SwiGLU), random weights, shapes from conf/serving/model
  kv_cache.py   paged KV cache: page pools per layer [pages, page_size, Hkv, D] + page allocator
  scheduler.py  chunked prefills + decodes under a per-iteration token budget, admission by KV pages,
                preemption by recompute
  workload.py   seeded synthetic requests: length distributions, Poisson arrivals
  engine.py     the loop: schedule -> HybridBatch of the iteration -> forward -> greedy sample -> update
  metrics.py    throughput / TTFT / TBT / latency, the tidy serving rows
  experiment.py one configured run per backend
  paper.py      the paper's serving experiments (conf/serving/experiment/), resumable:
                python -m experiments.serving.paper; run_paper_serving() for make reproduce
  __main__.py   the Hydra entry point: python -m experiments.serving (conf/serving.yaml)
"""
import importlib

# Names re-exported from their modules, imported on first use: `python -m experiments.serving[.paper]`
# starts without torch, so a Ctrl-C during start-up ends in one line (experiments.cli.run).
_HOMES = {"Engine": "engine", "EngineRun": "engine", "PageAllocator": "kv_cache", "PagedKVCache": "kv_cache",
          "LlamaModel": "model", "ModelConfig": "model", "Request": "scheduler", "Scheduler": "scheduler",
          "SchedulerConfig": "scheduler", "LengthDist": "workload", "RequestSpec": "workload",
          "WorkloadConfig": "workload", "generate": "workload"}
__all__ = list(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
