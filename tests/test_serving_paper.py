"""The paper's serving experiments on the CPU (experiments/serving/paper.py, conf/serving/experiment/,
analysis/serving_figures.py): presets compose to the paper's settings, workloads have the paper's
ratios and length mix, metrics are right on synthetic timelines, the whole plan runs (and resumes) with
the tiny model, GPU-sized runs are refused without a GPU, figures are byte-stable and never compare a
backend with itself."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from experiments.harness.schema import SERVING_SCHEMA, append_row, read_rows
from experiments.serving import paper
from experiments.serving.engine import EngineRun, IterationStats
from experiments.serving.experiment import (ServingRefused, full_model_config, kv_pages, model_config, serve,
                                             workload_config)
from experiments.serving.metrics import stall_metrics, steady_rate_per_min, summarize, tbt_gaps_ms, time_scale
from experiments.serving.scheduler import Request
from experiments.serving.workload import LengthDist, RequestSpec, WorkloadConfig, generate


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# -- presets and workloads ------------------------------------------------------------------------------
@pytest.mark.parametrize("name,model,chunk,ratio", [("fig12_yi_6b", "yi_6b", 512, 8),
                                                    ("fig12_llama3_8b", "llama3_8b", 1024, 17),
                                                    ("fig12_llama2_7b", "llama2_7b", 1024, 64)])
def test_fig12_presets_are_the_papers(name, model, chunk, ratio):
    cfg = paper.compose_experiment(name)
    wl = workload_config(cfg, 1000)
    reqs = generate(WorkloadConfig(3, wl.prompt_len, wl.output_len, vocab_size=2, seed=0))
    assert cfg.mode == "offline" and cfg.sweep_name == name and cfg.device == "cuda"
    assert cfg.serving.model.name == model and cfg.serving.scheduler.chunk_size == chunk
    assert sorted(cfg.backends) == ["fi_serial", "pod", "triton_serial"]
    assert all(r.arrival_s == 0.0 and len(r.prompt) == 16384 for r in reqs)
    assert abs(16384 / reqs[0].output_len - ratio) / ratio < 0.005          # the prefill:decode ratio
    assert 16384 + reqs[0].output_len <= cfg.serving.model.max_position
    assert cfg.num_layers == 8 and full_model_config(cfg).num_layers == 32 and cfg.num_requests >= 64


def test_layer_cut_keeps_the_full_models_kv_capacity():
    cut, full = (paper.compose_experiment(n) for n in ("fig12_llama2_7b", "fig12_llama2_7b_all_layers"))
    assert model_config(cut).num_layers == 8 and model_config(full).num_layers == 32
    assert full.sweep_name == "fig12_llama2_7b_all_layers" and full.num_requests == cut.num_requests
    assert full.serving.workload.name == cut.serving.workload.name == "fig12_pd64"
    pages = [kv_pages(c, torch.bfloat16) for c in (cut, full)]
    assert pages[0] == pages[1] > 0                     # same tokens in the pool: the same schedule
    tokens, per_token = pages[0] * cut.page_size, 32 * 2 * 32 * 128 * 2    # Llama-2: 512 KiB a token
    assert tokens * per_token <= 90 * 2**30 < (tokens + cut.page_size) * per_token


def test_schedule_plan_has_a_steady_window():
    """The Fig 12 request counts leave a steady state to measure: Llama-2-7B (the KV pool binds at 11
    decoding requests, 256 output tokens) has most of its 64 finishes between the first finish and
    the last prefill; besides 16+ prefill iterations per request and the 256-iteration drain, the
    full KV pool leaves decode-only iterations while requests wait for pages."""
    plan = paper.schedule_plan("fig12_llama2_7b")
    assert plan["max_decodes"] == 11 and plan["preemptions"] == 0
    assert plan["steady_window_finishes"] >= 48
    assert plan["hybrid_iterations"] >= 64 * 16 - 16 and plan["decode_only_iterations"] > 256
    assert plan["iterations"] >= 64 * 16 + 256


def test_arxiv_mix_bounds_and_shape():
    cfg = paper.compose_experiment("arxiv_online_llama3_8b", ["qps=1.0"])
    wl = workload_config(cfg, 1000)
    rng = np.random.default_rng(0)
    prompt, output = np.array(wl.prompt_len.sample(20000, rng)), np.array(wl.output_len.sample(20000, rng))
    assert prompt.min() >= 2048 and prompt.max() <= 31744 and (prompt + output).max() <= 32768
    assert 6700 < np.median(prompt) < 7300 and 12000 < np.percentile(prompt, 90) < 13800
    assert 180 < np.median(output) < 220 and 16 <= output.min() and output.max() <= 1024
    assert (prompt == 2048).mean() < 0.02                # the clip holds little mass
    assert cfg.mode == "online" and cfg.serving.scheduler.chunk_size == 1024
    assert list(cfg.online.loads) == [0.85, 0.95] and cfg.online.capacity_sweep == "arxiv_capacity_llama3_8b"


def test_poisson_arrivals_are_seeded_and_exponential():
    def arrivals(seed, qps=4.0):
        return [r.arrival_s for r in generate(WorkloadConfig(3000, LengthDist("fixed", value=1),
                                                             LengthDist("fixed", value=1), 2, qps, seed))]
    a = arrivals(7)
    assert a == arrivals(7) and a != arrivals(8)
    gaps = np.diff([0.0] + a)
    assert abs(gaps.mean() - 0.25) < 0.02 and abs(gaps.std() / gaps.mean() - 1) < 0.08   # CV 1
    assert abs(np.median(gaps) - 0.25 * math.log(2)) < 0.02


# -- metrics on synthetic timelines ----------------------------------------------------------------
def _request(i, arrival, times):
    r = Request.from_spec(RequestSpec(i, arrival, (1, 2, 3), len(times)))
    r.output, r.token_times_s, r.finish_s = [0] * len(times), list(times), times[-1]
    return r


def test_metrics_on_a_synthetic_timeline():
    reqs = [_request(0, 0.0, [0.1, 0.26, 0.96, 1.0]),      # gaps 160, 700, 40 ms
            _request(1, 0.5, [0.8, 1.1, 1.2]),             # gaps 300, 100
            _request(2, 1.0, [1.05, 1.1, 1.15, 2.0]),      # gaps 50, 50, 850
            _request(3, 1.2, [1.5])]                       # no gap
    gaps = tbt_gaps_ms([r.token_times_s for r in reqs])
    assert sorted(np.round(gaps)) == [40, 50, 50, 100, 160, 300, 700, 850]
    st = stall_metrics(gaps)
    assert (st["stalls_200ms"], st["stalls_500ms"]) == (3, 2)
    assert st["stall_frac_200ms"] == 3 / 8 and st["stall_frac_500ms"] == 2 / 8
    # Iterations: 4 of them, busy 0.2 s each; one layer 10 ms each, 2 of 8 layers built.
    its = [IterationStats(1, 10, 1, 50.0, 20.0, 1.0, end_s=e, layer_ms=10.0, start_s=e - 0.2)
           for e in (0.5, 1.0, 1.5, 2.0)]
    run = EngineRun(requests=reqs, iterations=its, makespan_s=2.0, num_preemptions=0)
    m = summarize(run, model_num_layers=8, num_layers=2, qps=2.0)
    ttft = [100, 300, 50, 300]
    assert m["ttft_p50_ms"] == pytest.approx(np.percentile(ttft, 50))
    assert m["ttft_p99_ms"] == pytest.approx(np.percentile(ttft, 99))
    assert m["tbt_p50_ms"] == pytest.approx(np.median(gaps)) and m["tbt_p99_ms"] == pytest.approx(np.percentile(gaps, 99))
    assert m["decode_gaps"] == 8 and m["stalls_500ms"] == 2
    assert m["requests_per_min"] == pytest.approx(120.0)
    # busy 800 ms + 6 cut layers x 40 ms = 1040 ms: time_scale 1.3
    assert m["layer_ms"] == 40.0 and m["time_scale"] == pytest.approx(1.3)
    assert m["scaled_requests_per_min"] == pytest.approx(120 / 1.3)
    assert m["scaled_qps"] == pytest.approx(2.0 / 1.3)
    assert m["scaled_ttft_p50_ms"] == pytest.approx(1.3 * m["ttft_p50_ms"])
    # scaled gaps x1.3: 160 -> 208 crosses 200 ms; 300 -> 390 stays under 500 ms
    assert m["scaled_stall_frac_200ms"] == 4 / 8 and m["scaled_stall_frac_500ms"] == 2 / 8
    assert m["model_num_layers"] == 8
    assert time_scale(its, 8, 8) == (40.0, 1.0)          # no cut: measured = scaled
    assert summarize(run, 8, 8)["scaled_requests_per_min"] == m["requests_per_min"]


def test_steady_rate_leaves_out_ramp_and_drain():
    # The last prefill ends (last first token) at t = 14. Finishes: first at 10, then every 0.5 s up to
    # 14 (steady: 120 per minute), then the drain, fast (decode-only iterations), from 14.1 on.
    finish = [10 + 0.5 * i for i in range(9)] + [14.1 + 0.01 * i for i in range(20)]
    first_token = [0.2 * i for i in range(29)] + [14.0]
    assert steady_rate_per_min(finish, first_token) == pytest.approx(120.0)
    assert math.isnan(steady_rate_per_min([10.0, 11.0, 20.0], [5.0, 9.0, 10.5]))   # 2 finishes in the window
    assert math.isnan(steady_rate_per_min([], []))


def test_online_rates_from_an_offline_row():
    rows = [dict(backend="fi_serial", status="ok", mode="offline", steady_requests_per_min=120.0,
                 requests_per_s=1.5),
            dict(backend="pod", status="ok", mode="offline", steady_requests_per_min=150.0, requests_per_s=2.0),
            dict(backend="fi_serial", status="error", mode="offline", steady_requests_per_min=999.0,
                 requests_per_s=9.0)]
    assert paper.capacity_rps(rows, "fi_serial") == pytest.approx(2.0)
    assert paper.capacity_rps(rows, "pod") == pytest.approx(2.5)
    rows[0]["steady_requests_per_min"] = float("nan")                 # too few requests: whole-run rate
    assert paper.capacity_rps(rows, "fi_serial") == pytest.approx(1.5)
    assert paper.online_rates(2.0, [0.85, 0.95]) == [(0.85, pytest.approx(1.7)), (0.95, pytest.approx(1.9))]
    with pytest.raises(ValueError, match="no ok offline row"):
        paper.capacity_rps(rows, "triton_serial")
    df = pd.DataFrame(rows)
    assert paper.capacity_with_fallback(df, "fi_serial") == (pytest.approx(1.5), "fi_serial")
    assert paper.capacity_with_fallback(df, "triton_serial") == (pytest.approx(1.5), "fi_serial")  # the slowest
    with pytest.raises(ValueError, match="load"):
        paper.online_rates(2.0, [0.0])


# -- the plan on the CPU; refusal without a GPU ------------------------------------------------------------
def test_gpu_sized_experiments_are_refused_without_a_gpu(tmp_path, monkeypatch):
    import experiments.serving.experiment as experiment
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(experiment, "LlamaModel", lambda *a, **k: pytest.fail("nothing may be built"))
    with pytest.raises(ServingRefused, match="GPU-sized.*device=cpu"):
        paper.run_paper_serving(tmp_path)
    for name in paper.PAPER_EXPERIMENTS:
        with pytest.raises(ServingRefused, match="GPU-only"):
            serve(paper.compose_experiment(name, ["qps=1.0", "out_dir="]))
    assert not any(tmp_path.rglob("*.csv"))
    assert paper.main(["--only", "fig12_yi_6b", "--results", str(tmp_path)]) == 2


def test_plan_runs_and_resumes_on_the_cpu(tmp_path):
    names = ["arxiv_online_llama3_8b"]                 # runs its capacity experiment (offline) first
    overrides = [*paper.CPU_OVERRIDES, "warmup=false"]
    lines = paper.run_paper_serving(tmp_path, names, overrides, figures_dir=tmp_path / "figures")
    off = cap = read_rows(tmp_path / "serving" / "arxiv_capacity_llama3_8b" / "cpu.csv", SERVING_SCHEMA)
    on = read_rows(tmp_path / "serving" / "arxiv_online_llama3_8b" / "cpu.csv", SERVING_SCHEMA)
    assert list(off["status"]) == ["ok"] and list(cap["status"]) == ["ok"] and list(on["status"]) == ["ok"] * 2
    assert (off["num_layers"] == 2).all() and (off["model_num_layers"] == 4).all()
    assert (off["time_scale"] > 1).all() and (off["scaled_requests_per_min"] < off["requests_per_min"]).all()
    capacity = paper.capacity_rps(cap, "reference")
    assert list(on["load"]) == [0.85, 0.95]
    assert np.allclose(on["qps"], [0.85 * capacity, 0.95 * capacity])
    assert on["stall_frac_200ms"].notna().all() and (on["decode_gaps"] > 0).all()
    assert "no serving figures" in lines[-1]           # CPU rows are not timed: nothing is drawn
    # Run again: every row is there, nothing runs.
    again = paper.run_paper_serving(tmp_path, names, overrides, figures=False)
    assert all(": 0 new rows" in line for line in again)
    assert len(read_rows(tmp_path / "serving" / "arxiv_online_llama3_8b" / "cpu.csv", SERVING_SCHEMA)) == 2


# -- figures from (synthetic) rows ----------------------------------------------------------------------
def _rows() -> list[dict]:
    base = dict(status="ok", reason="", timing_meaningful=True, gpu="NVIDIA H200", num_requests=64,
                page_size=16, dtype="bfloat16", timestamp="2026-01-01T00:00:00")
    rows = []
    speed = {"pod": 1.2, "triton_serial": 1.0, "fi_serial": 1.05}
    for model, sweep, wl, rate in (("yi_6b", "fig12_yi_6b", "fig12_pd8", 30.0),
                                   ("llama3_8b", "fig12_llama3_8b", "fig12_pd17", 20.0),
                                   ("llama2_7b", "fig12_llama2_7b", "fig12_pd64", 25.0)):
        for b, k in speed.items():
            rows.append(dict(base, sweep=sweep, model=model, workload=wl, mode="offline", backend=b,
                             num_layers=8, model_num_layers=32, requests_per_min=4 * rate * k,
                             steady_requests_per_min=4.2 * rate * k, time_scale=4.0,
                             scaled_requests_per_min=rate * k, scaled_steady_requests_per_min=1.05 * rate * k))
            if sweep == "fig12_llama3_8b":
                rows.append(dict(rows[-1], sweep="fig12_llama3_8b_all_layers", num_layers=32, time_scale=1.0,
                                 requests_per_min=0.98 * rate * k, steady_requests_per_min=1.0 * rate * k,
                                 scaled_requests_per_min=0.98 * rate * k,
                                 scaled_steady_requests_per_min=1.0 * rate * k))
    for load in (0.85, 0.95):
        for b, k in speed.items():
            rows.append(dict(base, sweep="arxiv_online_llama3_8b", model="llama3_8b", workload="arxiv",
                             mode="online", backend=b, qps=load * 4, load=load, num_layers=8,
                             model_num_layers=32, time_scale=4.0, scaled_qps=load,
                             ttft_p50_ms=100 * load / k, ttft_p99_ms=900 * load / k, tbt_p50_ms=20 / k,
                             tbt_p99_ms=120 / k, stall_frac_200ms=0.01 / k, stall_frac_500ms=0.001 / k,
                             **{f"scaled_{c}": 4 * v for c, v in (("ttft_p50_ms", 100 * load / k),
                                                                  ("ttft_p99_ms", 900 * load / k),
                                                                  ("tbt_p50_ms", 20 / k), ("tbt_p99_ms", 120 / k))},
                             scaled_stall_frac_200ms=0.05 / k, scaled_stall_frac_500ms=0.01 / k))
    rows.append(dict(rows[-1], timing_meaningful=False, ttft_p50_ms=1e9))     # a CPU row: never drawn
    rows.append(dict(rows[-2], status="error", ttft_p50_ms=1e9))              # not ok: never drawn
    return rows


def test_serving_figures_from_rows_are_byte_stable_and_never_self_compared(tmp_path):
    from analysis.serving_figures import (build_serving_figures, fig_throughput, layer_cut_check,
                                         speedups, usable)
    from analysis.load import load_results
    res = tmp_path / "results"
    for r in _rows():
        append_row(res / r["sweep"] / "h200.csv", r, SERVING_SCHEMA)
    a = build_serving_figures(res, tmp_path / "a")
    names = sorted(p.name for v in a.values() for p in v)
    assert {"serving_throughput.png", "serving_throughput.pdf", "serving_latency_llama3_8b.png",
            "serving_throughput.csv", "serving_latency.csv", "serving_layer_cut_check.csv",
            "serving_speedups.csv"} <= set(names)
    s = usable(load_results(res).serving)
    again = [p.name for p in fig_throughput(s, tmp_path / "b")]      # a rebuild: the same bytes
    for n in again:
        assert (tmp_path / "a" / n).read_bytes() == (tmp_path / "b" / n).read_bytes(), n
    assert len(s) == 9 + 3 + 6 and (s["ttft_p50_ms"].fillna(0) < 1e9).all()
    sp = speedups(s[s["mode"] == "offline"], "scaled_requests_per_min")
    assert not (sp["backend"] == sp["vs"]).any() and len(sp) == 4 * 2 and set(sp["backend"]) == {"pod"}
    pod = sp[(sp["backend"] == "pod") & (sp["vs"] == "triton_serial")]
    assert np.allclose(pod["speedup"], 1.2)
    lat = pd.read_csv(tmp_path / "a" / "serving_latency.csv")
    assert len(lat) == 6 and set(lat["load"]) == {0.85, 0.95}
    check = layer_cut_check(s)
    rpm = check[check["metric"] == "requests_per_min"]
    assert len(rpm) == 3 and np.allclose(rpm["estimate_error"], 1 / 0.98 - 1)
    assert build_serving_figures(tmp_path / "nothing", tmp_path / "c") == {}


def test_make_reproduce_on_a_gpu_runs_the_serving_experiments(tmp_path, monkeypatch):
    """`make reproduce` (no --sweeps) on a GPU calls run_paper_serving into results/<gpu>/; an explicit
    --sweeps list does not."""
    import experiments.harness.provenance as provenance
    import experiments.reproduce as rp
    calls = []
    monkeypatch.setattr(rp, "has_gpu", lambda: True)
    monkeypatch.setattr(provenance, "device_slug", lambda d: "h200")
    monkeypatch.setattr(rp, "run_sweeps", lambda *a, **k: {})
    monkeypatch.setattr(rp, "rebuild_figures", lambda *a, **k: {})
    monkeypatch.setattr(paper, "run_paper_serving", lambda results, **k: calls.append((results, k)) or ["ok"])
    assert rp.main(["--results-root", str(tmp_path), "--no-wandb"]) == 0
    assert calls == [(tmp_path / "h200", {"fresh": False, "figures": False})]
    assert rp.main(["--results-root", str(tmp_path), "--no-wandb", "--sweeps", "paper"]) == 0
    assert len(calls) == 1


def test_a_preset_too_big_for_this_device_is_skipped_with_a_line(tmp_path, monkeypatch, capsys):
    """make reproduce on a smaller card: a preset whose KV pool does not fit is refused in one line and
    the other presets still run (it used to give an "oom" row, after allocating)."""
    import experiments.serving.experiment as experiment
    monkeypatch.setattr(experiment, "free_memory_bytes", lambda device: (2**20, "free GPU memory"))
    lines = paper.run_paper_serving(tmp_path, ["fig12_llama2_7b"], [*paper.CPU_OVERRIDES, "num_pages=null"],
                                    figures=False)
    assert lines == [l for l in lines if l.startswith("serving fig12_llama2_7b: refused, ")] and len(lines) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("[serving] fig12_llama2_7b refused: kv_cache_gb=90: a KV pool")
    assert not any(tmp_path.rglob("*.csv"))
