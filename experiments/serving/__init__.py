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
from experiments.serving.engine import Engine, EngineRun
from experiments.serving.kv_cache import PageAllocator, PagedKVCache
from experiments.serving.model import LlamaModel, ModelConfig
from experiments.serving.scheduler import Request, Scheduler, SchedulerConfig
from experiments.serving.workload import LengthDist, RequestSpec, WorkloadConfig, generate

__all__ = ["Engine", "EngineRun", "PageAllocator", "PagedKVCache", "LlamaModel", "ModelConfig", "Request",
           "Scheduler", "SchedulerConfig", "LengthDist", "RequestSpec", "WorkloadConfig", "generate"]
