"""Serving metrics and their tidy result rows (one row per (run config, backend)).

  requests_per_s       finished requests / makespan (first arrival is t = 0; makespan = last finish)
  tokens_per_s         (prompt + generated tokens) / makespan; output_tokens_per_s: generated only
  ttft_*_ms            time to first token: first output token ready - arrival
  tbt_*_ms             time between tokens: gaps between consecutive output tokens of a request,
                       pooled over all requests (a preempted request's recompute gap included)
  e2e_*_ms             end-to-end latency: last output token ready - arrival
  iteration_p50_ms, iteration_max_ms   wall time between iteration ends (a max far above the
                       median flags a JIT compile or autotune inside the timed run)
  forward_ms, attention_ms, plan_ms   device time summed over iterations (CUDA events; perf_counter
                       on CPU): the whole iteration (index build, plan, layers, sampling), the
                       backend's run() calls, its prepare() calls; attention_share = attention_ms / forward_ms
  attn_err             max relative error of the backend's attention vs the fp32 reference over the
                       verified (warm-up) iterations, every layer; empty when not verified
Rows (schema: experiments.harness.schema.SERVING_SCHEMA, provenance and options columns included) are
appended to a CSV per (sweep, device) under results/serving/.
"""
from __future__ import annotations

import json
from typing import Any

import numpy as np

from experiments.serving.engine import EngineRun

def _pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) if xs else float("nan")


def summarize(run: EngineRun) -> dict[str, Any]:
    """The metric columns of a finished run."""
    reqs = run.requests
    ttft = [(r.token_times_s[0] - r.spec.arrival_s) * 1e3 for r in reqs]
    e2e = [(r.finish_s - r.spec.arrival_s) * 1e3 for r in reqs]
    tbt = [(b - a) * 1e3 for r in reqs for a, b in zip(r.token_times_s, r.token_times_s[1:])]
    prompt = sum(len(r.spec.prompt) for r in reqs)
    output = sum(len(r.output) for r in reqs)
    its = run.iterations
    fwd = sum(i.forward_ms for i in its)
    attn = sum(i.attention_ms for i in its)
    span = run.makespan_s
    ends = [i.end_s for i in its]
    walls = [(b - a) * 1e3 for a, b in zip([0.0] + ends, ends)]   # includes online idle gaps
    return {
        "num_requests": len(reqs),
        "requests_per_s": len(reqs) / span, "tokens_per_s": (prompt + output) / span,
        "output_tokens_per_s": output / span,
        "ttft_p50_ms": _pct(ttft, 50), "ttft_p99_ms": _pct(ttft, 99),
        "tbt_p50_ms": _pct(tbt, 50), "tbt_p99_ms": _pct(tbt, 99),
        "e2e_p50_ms": _pct(e2e, 50), "e2e_p99_ms": _pct(e2e, 99),
        "iterations": len(its),
        "hybrid_iterations": sum(1 for i in its if i.num_prefill and i.num_decode),
        "mean_decodes_per_iteration": (sum(i.num_decode for i in its) / len(its)) if its else 0.0,
        "preemptions": run.num_preemptions, "makespan_s": span,
        "iteration_p50_ms": _pct(walls, 50), "iteration_max_ms": max(walls) if walls else float("nan"),
        "forward_ms": fwd, "attention_ms": attn, "plan_ms": sum(i.plan_ms for i in its),
        "attention_share": attn / fwd if fwd else float("nan"),
        "attn_err": run.attn_err,
        "mean_prompt_len": prompt / len(reqs), "mean_output_len": output / len(reqs),
        "backend_config": json.dumps(run.backend_config, sort_keys=True),
    }
