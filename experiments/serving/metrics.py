"""Serving metrics and their tidy result rows (one row per (run config, backend)).

  requests_per_s       finished requests / makespan (first arrival is t = 0; makespan = last finish);
                       requests_per_min the same per minute (the paper's Fig 12 unit)
  steady_requests_per_min   finishes per minute while the pipeline is full, from the first finish
                       to the last first token (the last prefill): without the ramp (no request has
                       finished its decodes yet) and the drain (decode-only tail) of an offline run;
                       NaN when fewer than 3 finishes fall in that window. In steady state about
                       C = D x chunk / (P + D) requests decode at once (P, D: prompt, output tokens;
                       fewer when the KV pool binds), and ~N - C finishes fall in the window: N >= 2C
  tokens_per_s         (prompt + generated tokens) / makespan; output_tokens_per_s: generated only
  ttft_*_ms            time to first token: first output token ready - arrival
  tbt_*_ms             time between tokens: gaps between consecutive output tokens of a request,
                       pooled over all requests (a preempted request's recompute gap included)
  stalls_<T>ms, stall_frac_<T>ms   decode stalls: TBT gaps above T ms (T = 200, 500), as a count and
                       as a fraction of all gaps (decode_gaps)
  e2e_*_ms             end-to-end latency: last output token ready - arrival
  iteration_p50_ms, iteration_max_ms   wall time between iteration ends (a max far above the
                       median flags a JIT compile or autotune inside the timed run)
  forward_ms, attention_ms, plan_ms   device time summed over iterations (CUDA events; perf_counter
                       on CPU): the whole iteration (index build, plan, layers, sampling), the
                       backend's run() calls, its prepare() calls; attention_share = attention_ms / forward_ms
  attn_err             max relative error of the backend's attention vs the fp32 reference over the
                       verified (warm-up) iterations, every layer; empty when not verified

Layer cut (num_layers < model_num_layers): every decoder layer costs the same (same shapes, same
tokens), and the KV pool is sized for the full model (experiment.py), so a cut run schedules exactly
the iterations the full model would; only each iteration's time differs, by the layers left out.
  layer_ms             one layer's device time summed over the iterations (engine: the span between
                       the first and last layer's attention start / (layers - 1))
  time_scale           (busy + (model_num_layers - num_layers) * layer_ms) / busy, busy = the wall time
                       the engine spent in iterations (scheduling, host work, forward): the factor by
                       which the full model's run is slower; 1 when no layer is cut
  scaled_*             ESTIMATES for the full model (not measured): rates divided by time_scale,
                       latencies multiplied by it, stalls counted on the scaled gaps; scaled_qps: the
                       offered load at which the full model sees the same queueing (a time-scaled run:
                       arrivals stretch with service times). Checked against one run with all layers
                       (conf/serving/experiment/fig12_llama2_7b_all_layers.yaml).
Rows (schema: experiments.harness.schema.SERVING_SCHEMA, provenance and options columns included) are
appended to a CSV per (sweep, device).
"""
from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

from experiments.serving.engine import EngineRun

STALL_THRESHOLDS_MS = (200, 500)


def _pct(xs, q: float) -> float:
    return float(np.percentile(xs, q)) if len(xs) else float("nan")


def tbt_gaps_ms(token_times_s: list[list[float]]) -> np.ndarray:
    """Every gap between consecutive output tokens of each request (ms), pooled."""
    return np.array([(b - a) * 1e3 for ts in token_times_s for a, b in zip(ts, ts[1:])], dtype=float)


def stall_metrics(gaps_ms: np.ndarray, thresholds_ms=STALL_THRESHOLDS_MS, prefix: str = "") -> dict[str, Any]:
    """{prefix}stalls_<T>ms (gaps above T ms) and {prefix}stall_frac_<T>ms (their share of all gaps)."""
    out: dict[str, Any] = {}
    for t in thresholds_ms:
        n = int((gaps_ms > t).sum())
        out[f"{prefix}stalls_{t}ms"] = n
        out[f"{prefix}stall_frac_{t}ms"] = n / len(gaps_ms) if len(gaps_ms) else float("nan")
    return out


def steady_rate_per_min(finish_s, first_token_s) -> float:
    """Finishes per minute while the pipeline is full: from the first finish (the first request has
    done all its decodes, so every stage holds work) to the last first token (the last prefill is
    done; after it, only the decode-only drain is left). (m - 1) / (f_m - f_1) over the m finishes in
    that window; NaN when fewer than 3 fall in it (too few requests for a steady state: more
    num_requests)."""
    f = np.sort(np.asarray(finish_s, dtype=float))
    if not len(f):
        return float("nan")
    f = f[f <= max(first_token_s)]
    if len(f) < 3 or f[-1] <= f[0]:
        return float("nan")
    return float(60.0 * (len(f) - 1) / (f[-1] - f[0]))


def time_scale(iterations, num_layers: int, model_num_layers: int) -> tuple[float, float]:
    """(layer_ms, time_scale) of a run (see the module doc); time_scale 1 when no layer is cut."""
    layer_ms = float(sum(i.layer_ms for i in iterations if not math.isnan(i.layer_ms)))
    cut = model_num_layers - num_layers
    if cut <= 0:
        return layer_ms, 1.0
    busy_ms = 1e3 * sum(i.end_s - i.start_s for i in iterations)
    if busy_ms <= 0 or not any(not math.isnan(i.layer_ms) for i in iterations):
        return layer_ms, float("nan")
    return layer_ms, (busy_ms + cut * layer_ms) / busy_ms


def summarize(run: EngineRun, model_num_layers: int | None = None, num_layers: int | None = None,
              qps: float | None = None) -> dict[str, Any]:
    """The metric columns of a finished run. model_num_layers/num_layers: the model's own and the
    built layer count (for the scaled estimates; both None: no cut); qps: the offered load (online)."""
    reqs = run.requests
    ttft = [(r.token_times_s[0] - r.spec.arrival_s) * 1e3 for r in reqs]
    e2e = [(r.finish_s - r.spec.arrival_s) * 1e3 for r in reqs]
    tbt = tbt_gaps_ms([r.token_times_s for r in reqs])
    prompt = sum(len(r.spec.prompt) for r in reqs)
    output = sum(len(r.output) for r in reqs)
    its = run.iterations
    fwd = sum(i.forward_ms for i in its)
    attn = sum(i.attention_ms for i in its)
    span = run.makespan_s
    ends = [i.end_s for i in its]
    walls = [(b - a) * 1e3 for a, b in zip([0.0] + ends, ends)]   # includes online idle gaps
    steady = steady_rate_per_min([r.finish_s for r in reqs], [r.token_times_s[0] for r in reqs])
    out = {
        "num_requests": len(reqs),
        "requests_per_s": len(reqs) / span, "requests_per_min": 60.0 * len(reqs) / span,
        "steady_requests_per_min": steady,
        "tokens_per_s": (prompt + output) / span, "output_tokens_per_s": output / span,
        "ttft_p50_ms": _pct(ttft, 50), "ttft_p99_ms": _pct(ttft, 99),
        "tbt_p50_ms": _pct(tbt, 50), "tbt_p99_ms": _pct(tbt, 99),
        "decode_gaps": len(tbt), **stall_metrics(tbt),
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
    full = model_num_layers if model_num_layers is not None else num_layers
    built = num_layers if num_layers is not None else full
    if full is not None:
        layer_ms, s = time_scale(its, built, full)
        out.update(scaled_metrics(out, tbt, ttft, s, qps))
        out.update(model_num_layers=full, layer_ms=layer_ms, time_scale=s)
    return out


def scaled_metrics(m: dict[str, Any], tbt_ms: np.ndarray, ttft_ms: list[float], s: float,
                   qps: float | None) -> dict[str, Any]:
    """The scaled_* estimates of a run whose times stretch by `s` (see the module doc)."""
    tbt_s = np.asarray(tbt_ms, dtype=float) * s
    ttft_s = np.asarray(ttft_ms, dtype=float) * s
    return {
        "scaled_requests_per_min": m["requests_per_min"] / s,
        "scaled_steady_requests_per_min": m["steady_requests_per_min"] / s,
        "scaled_qps": qps / s if qps else None,
        "scaled_ttft_p50_ms": _pct(ttft_s, 50), "scaled_ttft_p99_ms": _pct(ttft_s, 99),
        "scaled_tbt_p50_ms": _pct(tbt_s, 50), "scaled_tbt_p99_ms": _pct(tbt_s, 99),
        **{k: v for k, v in stall_metrics(tbt_s, prefix="scaled_").items() if "frac" in k},
    }
