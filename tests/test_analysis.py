"""analysis/: speed-up math on a hand-built results table, figures written, the notebook runs, and
experiments/reproduce.py takes the right branch (GPU: paper sweeps; CPU: smoke + committed results)."""
from __future__ import annotations

import hashlib
import math
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis.figures import build_all, to_markdown
from analysis.load import ATTENTION_COLUMNS, load_results
from analysis.speedup import attention_speedups, composition_label, geomean, summarize

ROOT = Path(__file__).resolve().parents[1]
GPU = "NVIDIA H100 80GB HBM3"
PROV = dict(gpu=GPU, driver="570.00", torch="2.11.0+cu130", triton="3.6.0", flashinfer="0.6.6",
            git_commit="abc1234", timestamp="2026-11-25T12:00:00")
MODELS = {"llama-3-8b": (32, 8), "llama-2-7b": (32, 32)}


def _row(point, backend, ms, *, model="llama-3-8b", sweep="paper", status="ok", prefill_err=1e-3,
         decode_err=1e-3, chunk=1024, ctx=4096, nd=32, dctx=8192, meaningful=True, layout="paged", **extra):
    # As the harness records it: the layout that ran (FA2 has no paged KV, fi_pod only paged KV).
    ran = "contiguous" if backend.startswith("fa2") else "paged" if backend == "fi_pod" else layout
    hq, hkv = MODELS[model]
    np_ = 1 if chunk else 0
    pid = hashlib.sha1(f"{model}{point}".encode()).hexdigest()[:12]
    pf = 4 * 128 * hq * (chunk * ctx + chunk * (chunk + 1) // 2) if chunk else 0
    db = 2 * nd * dctx * hkv * 128 * 2 + 2 * nd * hq * 128 * 2
    t = ms if status == "ok" else float("nan")
    row = dict(point_id=pid, sweep=sweep, backend=backend, model=model, num_q_heads=hq, num_kv_heads=hkv,
               head_dim=128, dtype="bfloat16", kv_layout=ran, page_size=16 if ran == "paged" else 0, num_prefill=np_,
               chunk_len=chunk, prefill_context_len=ctx if chunk else 0, num_decode=nd,
               decode_context_len=dctx if nd else 0, batch=f"{model} {point}", status=status,
               reason="" if status == "ok" else "synthetic", median_ms=t, p20_ms=t * 0.99, p80_ms=t * 1.01,
               timing_meaningful=meaningful, prefill_err=prefill_err if chunk else float("nan"),
               decode_err=decode_err if nd else float("nan"), prefill_flops=pf, decode_bytes=db,
               tflops=pf / (t * 1e-3) / 1e12 if chunk else float("nan"),
               gbps=db / (t * 1e-3) / 1e9 if nd else float("nan"), backend_config="{}", **PROV)
    row.update(extra)
    return row


def _points(rows, point, times, **kw):
    for backend, ms in times.items():
        rows.append(_row(point, backend, ms, **kw))


def synthetic_results(root: Path, serving: bool = True) -> Path:
    """Two attention runs (Parquet + CSV), a kernels sweep, a CPU run, serving rows. Expected speed-ups
    of pod vs best serial (computed by hand below): run1 p1 1.6, p2 0.5, p3 2.0, p5 2.0, p6 2.0,
    p7 (llama-2-7b) 1.25, p8 2.0; run2 p1 0.5."""
    root.mkdir(parents=True, exist_ok=True)
    r1: list[dict] = []
    # p1: best serial is fi_serial (1.6); vs fi_pod 1.8/1.0.
    _points(r1, "p1", dict(fa2_serial=2.0, fi_serial=1.6, fi_pod=1.8, pod=1.0), chunk=512, ctx=0)
    # p2: best serial fa2 (1.0): pod is slower (0.5x).
    _points(r1, "p2", dict(fa2_serial=1.0, fi_serial=1.2, fi_pod=1.25, pod=2.0), chunk=1024, ctx=4096)
    _points(r1, "p3", dict(fa2_serial=3.0, fi_serial=3.5, fi_pod=2.0, pod=1.5), chunk=2048, ctx=12288)
    # p4: pod's prefill output is wrong: its 10x must not count anywhere.
    _points(r1, "p4", dict(fa2_serial=1.0, fi_serial=1.0, fi_pod=1.0), chunk=1024, ctx=8192, nd=64)
    r1.append(_row("p4", "pod", 0.1, chunk=1024, ctx=8192, nd=64, prefill_err=0.05))
    # p5: fa2_serial errored, fi_pod skipped: best serial is fi_serial; no fi_pod speed-up.
    _points(r1, "p5", dict(fi_serial=2.0, pod=1.0), chunk=1024, ctx=0, nd=128, dctx=2048)
    r1.append(_row("p5", "fa2_serial", 0.2, chunk=1024, ctx=0, nd=128, dctx=2048, status="error"))
    r1.append(_row("p5", "fi_pod", 0.2, chunk=1024, ctx=0, nd=128, dctx=2048, status="skipped"))
    # p6: fi_serial is fastest but its decode output is wrong: best serial must be fa2_serial (2.0).
    _points(r1, "p6", dict(fa2_serial=2.0, pod=1.0), chunk=512, ctx=2048, nd=16, dctx=16384)
    r1.append(_row("p6", "fi_serial", 0.5, chunk=512, ctx=2048, nd=16, dctx=16384, decode_err=0.5))
    # p6: a prefill-only backend on the hybrid point: its time is not the batch's (no speed-up), not wrong.
    r1.append(_row("p6", "triton_prefill", 0.1, chunk=512, ctx=2048, nd=16, dctx=16384,
                   decode_err=float("nan")))
    # p7: another model.
    _points(r1, "p7", dict(fa2_serial=1.0, fi_serial=2.0, fi_pod=1.5, pod=0.8), model="llama-2-7b")
    # p8: a contiguous-KV point (fi_pod ran it paged); FA2 ran p1..p7 contiguous: layouts by point.
    _points(r1, "p8", dict(fa2_serial=1.0, fi_serial=1.1, fi_pod=0.9, pod=0.5), layout="contiguous")
    # kernels sweep: pure prefill (TFLOP/s) and pure decode (GB/s) points.
    _points(r1, "k1", dict(fa2_serial=1.1, fi_serial=0.9, triton_prefill=1.0), sweep="kernels", nd=0)
    _points(r1, "k2", dict(fa2_serial=1.5, fi_serial=1.2, triton_decode=1.0), sweep="kernels", chunk=0)
    pd.DataFrame(r1).to_parquet(root / "run1.parquet")

    # run2 repeats p1 with other timings; mixing runs would give pod 0.4x at run1's p1.
    r2: list[dict] = []
    _points(r2, "p1", dict(fa2_serial=0.4, fi_serial=0.5, pod=0.8), chunk=512, ctx=0)
    (root / "sub").mkdir(exist_ok=True)
    pd.DataFrame(r2).to_csv(root / "sub" / "run2.csv", index=False)

    # A CPU run: timings not meaningful, never a speed-up.
    r3: list[dict] = []
    _points(r3, "p1", dict(fa2_serial=100.0, pod=1.0), chunk=512, ctx=0, meaningful=False)
    pd.DataFrame(r3).to_parquet(root / "cpu_run.parquet")

    # Our own outputs in figures/ must not be read back as results.
    (root / "figures").mkdir(exist_ok=True)
    pd.DataFrame([_row("p1", "pod", 0.001)]).to_csv(root / "figures" / "speedups.csv", index=False)
    (root / "logs").mkdir()          # a session's records (partial or superseded rows): never results
    pd.DataFrame([_row("p1", "pod", 0.002)]).to_csv(root / "logs" / "partial_run.csv", index=False)

    if serving:
        srows = []
        ok = dict(status="ok", timing_meaningful=True, time_scale=1.0)
        for backend, tput in (("fa2_serial", 1000.0), ("pod", 1200.0)):
            srows.append(dict(sweep="serving", backend=backend, model="llama-3-8b", mode="offline",
                              requests_per_s=tput / 500, requests_per_min=tput * 60 / 500,
                              steady_requests_per_min=tput * 60 / 500, tokens_per_s=tput, qps=np.nan,
                              ttft_p50_ms=np.nan, ttft_p99_ms=np.nan, tbt_p50_ms=np.nan, tbt_p99_ms=np.nan,
                              e2e_p50_ms=np.nan, **ok, **PROV))
            for qps in (0.5, 1.0, 2.0):
                srows.append(dict(sweep="serving", backend=backend, model="llama-3-8b", mode="online",
                                  requests_per_s=qps, tokens_per_s=qps * 500, qps=qps, load=qps / 2,
                                  ttft_p50_ms=100 * qps, ttft_p99_ms=300 * qps, tbt_p50_ms=20 * qps,
                                  tbt_p99_ms=50 * qps, e2e_p50_ms=5000 * qps, **ok, **PROV))
        pd.DataFrame(srows).to_parquet(root / "serving.parquet")
    return root


@pytest.fixture
def results_dir(tmp_path):
    return synthetic_results(tmp_path / "results")


# -- loading -----------------------------------------------------------------------------------------
def test_load_separates_kinds_and_runs(results_dir):
    r = load_results(results_dir)
    assert set(ATTENTION_COLUMNS) <= set(r.attention.columns)
    assert len(r.attention) == 38 + 3 + 2 and len(r.serving) == 8
    assert sorted(r.attention["run"].unique()) == ["cpu_run.parquet", "run1.parquet", "sub/run2.csv"]
    assert not (r.attention["median_ms"] == 0.001).any(), "figures/ outputs were read as results"
    assert not (r.attention["median_ms"] == 0.002).any(), "logs/ rows were read as results"
    # CSV booleans come back as booleans.
    assert r.attention["timing_meaningful"].dtype == bool
    assert r.gpus() == [GPU]
    assert load_results(results_dir.parent / "nothing").empty


def test_csv_provenance_stays_text_when_it_looks_like_a_number(tmp_path):
    """A short commit of digits and one "e" (454e176) or a point id of digits reads back as the text written,
    not as a float or an int (read_csv would guess 4.54e178)."""
    d = tmp_path / "results" / "paper"
    d.mkdir(parents=True)
    row = {c: "" for c in ATTENTION_COLUMNS}
    row.update(point_id="123456e78901", sweep="paper", backend="pod", status="ok", median_ms="1.0",
               git_commit="454e176", driver="580", torch="2", triton="3", timing_meaningful="True")
    pd.DataFrame([row]).to_csv(d / "h200.csv", index=False)
    a = load_results(tmp_path / "results").attention
    assert a.loc[0, "git_commit"] == "454e176" and a.loc[0, "point_id"] == "123456e78901"
    assert a.loc[0, "driver"] == "580" and a.loc[0, "median_ms"] == 1.0


# -- speed-up math -----------------------------------------------------------------------------------
def _sp(results_dir):
    sp = attention_speedups(load_results(results_dir).attention)
    return sp.set_index(["run", "batch", "backend"]).sort_index()


def test_best_serial_per_point_and_run(results_dir):
    sp = _sp(results_dir)
    pod = lambda run, p, m="llama-3-8b": sp.loc[(run, f"{m} {p}", "pod")]  # noqa: E731
    r1, r2 = "run1.parquet", "sub/run2.csv"
    assert pod(r1, "p1")["best_serial_backend"] == "fi_serial"
    assert pod(r1, "p1")["speedup_vs_serial"] == pytest.approx(1.6)
    assert pod(r1, "p1")["speedup_vs_fi_pod"] == pytest.approx(1.8)
    assert pod(r1, "p2")["speedup_vs_serial"] == pytest.approx(0.5)
    assert pod(r1, "p3")["speedup_vs_fi_pod"] == pytest.approx(2.0 / 1.5)
    # errored fa2_serial is no baseline; skipped fi_pod gives no fi_pod speed-up
    assert pod(r1, "p5")["best_serial_backend"] == "fi_serial"
    assert pod(r1, "p5")["speedup_vs_serial"] == pytest.approx(2.0)
    assert math.isnan(pod(r1, "p5")["speedup_vs_fi_pod"])
    # a wrong (error-flagged) serial output is no baseline either
    assert pod(r1, "p6")["best_serial_backend"] == "fa2_serial"
    assert pod(r1, "p6")["speedup_vs_serial"] == pytest.approx(2.0)
    # runs are never mixed
    assert pod(r2, "p1")["speedup_vs_serial"] == pytest.approx(0.4 / 0.8)
    # the baselines themselves: fi_serial is the best at p1 -> 1.0, fa2_serial 1.6/2.0
    assert sp.loc[(r1, "llama-3-8b p1", "fi_serial"), "speedup_vs_serial"] == pytest.approx(1.0)
    assert sp.loc[(r1, "llama-3-8b p1", "fa2_serial"), "speedup_vs_serial"] == pytest.approx(0.8)
    # a point's layout is its own, whatever layout a backend had to run it in
    assert set(sp.loc[(r1, "llama-3-8b p1"), "point_layout"]) == {"paged"}
    assert set(sp.loc[(r1, "llama-3-8b p8"), "point_layout"]) == {"contiguous"}
    assert sp.loc[(r1, "llama-3-8b p8", "pod"), "speedup_vs_serial"] == pytest.approx(2.0)


def test_wrong_or_untimed_rows_are_excluded(results_dir):
    sp = _sp(results_dir)
    bad = sp.loc[("run1.parquet", "llama-3-8b p4", "pod")]
    assert not bad["usable"] and bad["err_flagged"] and "prefill_err" in bad["excluded"]
    assert math.isnan(bad["speedup_vs_serial"]) and math.isnan(bad["speedup_vs_fi_pod"])
    cpu = sp.loc[("cpu_run.parquet", "llama-3-8b p1", "pod")]
    assert not cpu["usable"] and "timing not meaningful" in cpu["excluded"]
    assert math.isnan(cpu["speedup_vs_serial"])
    part = sp.loc[("run1.parquet", "llama-3-8b p6", "triton_prefill")]
    assert not part["usable"] and not part["err_flagged"] and "does not compute decode" in part["excluded"]
    assert math.isnan(part["speedup_vs_serial"])
    assert "status=error" in sp.loc[("run1.parquet", "llama-3-8b p5", "fa2_serial"), "excluded"]
    assert sp["speedup_vs_serial"].max() < 10  # the wrong 0.1 ms kernel's 10x never shows


def test_summary_geomean_max_min_share(results_dir):
    sp = attention_speedups(load_results(results_dir).attention)
    s = summarize(sp, ["backend"]).set_index(["backend", "vs"])
    pod = s.loc[("pod", "best serial")]
    hand = [1.6, 0.5, 2.0, 2.0, 2.0, 1.25, 2.0, 0.5]  # run1 p1 p2 p3 p5 p6 p7 p8, run2 p1
    assert pod["compared"] == 8
    assert pod["geomean"] == pytest.approx((1.6 * 0.5 * 2 * 2 * 2 * 1.25 * 2 * 0.5) ** (1 / 8))
    assert pod["max"] == pytest.approx(2.0) and pod["min"] == pytest.approx(0.5)
    assert pod["share_faster"] == pytest.approx(6 / 8)
    assert geomean(hand) == pytest.approx(pod["geomean"])
    # counts include excluded rows: p1..p8 in run1 (8) + run2 + cpu run
    assert pod["rows"] == 10 and pod["err_flagged"] == 1 and pod["usable"] == 8
    fp = s.loc[("pod", "fi_pod")]
    # vs fi_pod: p1 1.8, p2 0.625, p3 4/3, p7 1.875, p8 1.8
    assert fp["compared"] == 5
    assert fp["geomean"] == pytest.approx((1.8 * 0.625 * (4 / 3) * 1.875 * 1.8) ** 0.2)
    assert fp["share_faster"] == pytest.approx(0.8)
    fa2 = s.loc[("fa2_serial", "best serial")]
    assert fa2["not_ok"] == 1 and fa2["max"] == pytest.approx(1.0)
    # No row compares a backend with itself: fi_pod has none against fi_pod, and fi_serial is compared
    # only where another serial backend was faster (run1 p2 p3 p7 p8, run2 p1; p4's tie goes to fi_serial).
    assert ("fi_pod", "fi_pod") not in s.index
    fi = s.loc[("fi_serial", "best serial")]
    assert fi["compared"] == 5 and fi["max"] == pytest.approx(1.0 / 1.1) and fi["share_faster"] == 0
    by_model = summarize(sp, ["model", "backend"]).set_index(["model", "backend", "vs"])
    assert by_model.loc[("llama-2-7b", "pod", "best serial"), "geomean"] == pytest.approx(1.25)
    assert by_model.loc[("llama-3-8b", "pod", "best serial"), "compared"] == 7


H200 = "NVIDIA H200"


def h200_paper_rows() -> pd.DataFrame:
    """The H200 `paper` sweep as it will come, and one paper-grid point: our Hopper fused kernel pod_sm90
    beside pod, triton_serial, its halves triton_prefill / triton_decode, fi_serial and fi_pod (no
    fa2_serial on the paper sweep). Times (ms):
        point  triton_serial fi_serial fa2_serial  halves (prefill, decode)  pod_sm90  pod
        q1     1.0           1.2       -           0.4, 0.6  balanced       0.8       0.9
        q2     1.5           1.0       -           0.1, 1.4  unbalanced     2.0       0.95
        q3     2.0           1.8       -           1.0, 1.0  balanced       1.2       1.7
        q4*    2.2           2.4       3.0         0.8, 1.2  balanced       2.0       2.1     (*paper_grid)
    The fastest serial path: q1 triton_serial, q2 q3 fi_serial, q4 triton_serial; pod_sm90 over it
    1.25, 0.5, 1.5, 1.1."""
    rows: list[dict] = []
    kw = dict(gpu=H200, run_id="h200-run")
    for point, sweep, serial, halves, ours in (
            ("q1", "paper", dict(triton_serial=1.0, fi_serial=1.2), (0.4, 0.6), dict(pod_sm90=0.8, pod=0.9)),
            ("q2", "paper", dict(triton_serial=1.5, fi_serial=1.0), (0.1, 1.4), dict(pod_sm90=2.0, pod=0.95)),
            ("q3", "paper", dict(triton_serial=2.0, fi_serial=1.8), (1.0, 1.0), dict(pod_sm90=1.2, pod=1.7)),
            ("q4", "paper_grid", dict(triton_serial=2.2, fi_serial=2.4, fa2_serial=3.0), (0.8, 1.2),
             dict(pod_sm90=2.0, pod=2.1))):
        chunk = dict(q1=512, q2=1024, q3=2048, q4=1024)[point]
        _points(rows, point, {**serial, **ours, "fi_pod": 1.1}, sweep=sweep, chunk=chunk, **kw)
        rows.append(_row(point, "triton_prefill", halves[0], sweep=sweep, chunk=chunk, decode_err=float("nan"), **kw))
        rows.append(_row(point, "triton_decode", halves[1], sweep=sweep, chunk=chunk, prefill_err=float("nan"), **kw))
    from analysis.load import normalise_attention
    return normalise_attention(pd.DataFrame(rows)).assign(run="h200-run")


def test_overlap_bound_per_sweep_and_pooled():
    """The bound = fastest serial path / the longer of our two halves, per point (h200_paper_rows: q1 1/0.6,
    q2 1.0/1.4 (fi_serial beats our halves: below 1), q3 1.8/1.0, q4 2.2/1.2); a backend's share of it and
    the points where it beat it (pod at q2: 1/0.95 over 0.714)."""
    from analysis.overlap_bound import overlap_bound, point_bounds
    sp = attention_speedups(h200_paper_rows())
    b = point_bounds(sp, ("paper", "paper_grid"))
    assert sorted(b["bound"]) == pytest.approx(sorted([1 / 0.6, 1.0 / 1.4, 1.8, 2.2 / 1.2]))
    assert b.loc[b["sweep"] == "paper_grid", "bound"].tolist() == pytest.approx([2.2 / 1.2])
    t = overlap_bound(sp).set_index(["sweep", "points"])
    assert t["n"].to_dict() == {("paper", "all"): 3, ("paper", "balanced"): 2, ("paper_grid", "all"): 1,
                                ("paper_grid", "balanced"): 1, ("pooled", "all"): 4, ("pooled", "balanced"): 3}
    g = lambda *x: float(np.exp(np.log(x).mean()))       # noqa: E731
    assert t.loc[("paper", "all"), "bound_geomean"] == pytest.approx(g(1 / 0.6, 1 / 1.4, 1.8))
    assert t.loc[("pooled", "balanced"), "pod_sm90_geomean"] == pytest.approx(g(1.25, 1.5, 1.1))
    assert t.loc[("paper", "balanced"), "pod_sm90_of_bound"] == pytest.approx(g(1.25 * 0.6, 1.5 / 1.8))
    assert t.loc[("paper", "all"), "pod_over_bound"] == 1 and t.loc[("paper", "all"), "pod_sm90_over_bound"] == 0
    assert t.loc[("pooled", "all"), "fi_pod_n"] == 4
    assert overlap_bound(sp, sweeps=("kernels",)).empty


@pytest.fixture
def drawn(monkeypatch):
    """Every figure the figure modules would save, kept open instead: {file name: matplotlib figure}."""
    import matplotlib.pyplot as plt

    import analysis.figures
    import analysis.paper_figures
    figs = {}

    def keep(fig, out, name):
        figs[name] = fig
        return [Path(out) / f"{name}.png", Path(out) / f"{name}.pdf"]
    for module in (analysis.figures, analysis.paper_figures):
        monkeypatch.setattr(module, "save", keep, raising=False)
    yield figs
    for fig in figs.values():
        plt.close(fig)


def legend_texts(fig) -> list[str]:
    legends = list(fig.legends) + [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
    return [t.get_text() for leg in legends for t in leg.get_texts()]


def test_pod_sm90_is_ours_against_the_fastest_serial_path(drawn, tmp_path):
    """The fastest serial path is the fastest of triton_serial, fi_serial, fa2_serial present at a point
    (it was fa2_serial / fi_serial only: q1 would have read 1.5x over fi_serial, not 1.25x over
    triton_serial); pod_sm90 is one of ours in the tables, the bars and the heat map; the balanced-points
    table pools the paper sweep and the paper grid's points that pass the 20% filter; the paper-grid
    violin keeps the paper's fa2_serial."""
    from analysis import figures, paper_figures
    from analysis.load import Results
    from analysis.speedup import SERIAL_BACKENDS
    assert SERIAL_BACKENDS == ("triton_serial", "fi_serial", "fa2_serial")
    sp = attention_speedups(h200_paper_rows())
    ours = sp[sp["backend"] == "pod_sm90"].set_index("batch")
    assert ours["best_serial_backend"].to_dict() == {"llama-3-8b q1": "triton_serial", "llama-3-8b q2": "fi_serial",
                                                    "llama-3-8b q3": "fi_serial", "llama-3-8b q4": "triton_serial"}
    assert ours["speedup_vs_serial"].tolist() == pytest.approx([1.25, 0.5, 1.5, 1.1])

    bal = paper_figures.balanced_points(sp[sp["sweep"] == "paper"]).set_index("point_id")
    assert bal["balanced"].tolist() == [True, False, True]
    tables = figures.build_tables(Results(sp, pd.DataFrame(), pd.DataFrame(), tmp_path), sp)
    summary = tables["speedup_summary"].set_index(["backend", "vs"])
    assert summary.loc[("pod_sm90", "best serial"), "compared"] == 4
    balanced = tables["speedup_balanced"].set_index(["backend", "vs"]).loc[("pod_sm90", "best serial")]
    assert balanced["compared"] == 3 and balanced["geomean"] == pytest.approx((1.25 * 1.5 * 1.1) ** (1 / 3))
    assert (balanced["min"], balanced["max"]) == pytest.approx((1.1, 1.5))
    grid = tables["paper_grid_speedup"].set_index(["points", "backend"])
    assert grid.loc[("all points", "pod_sm90"), "mean"] == pytest.approx(3.0 / 2.0)   # vs fa2_serial, the paper's

    bars = sp[sp["sweep"] == "paper"]
    figures.fig_speedups(bars, tmp_path, "serial")
    figures.fig_speedup_heatmap(bars, tmp_path)
    assert {"pod_sm90", "pod"} <= set(legend_texts(drawn["speedup_serial_paper"]))
    heat = drawn["speedup_heatmap_paper"]
    assert "pod_sm90" in [t.get_text() for t in heat.axes[0].get_yticklabels()]
    assert "fastest of triton_serial, fi_serial" in heat._suptitle.get_text()
    paper_figures.fig_paper_violin(paper_figures.paper_grid_speedups(sp), tmp_path)
    assert "fa2_serial is the paper's baseline" in drawn["paper_grid_violin"]._suptitle.get_text()


def _speedups(rows: list[dict]) -> pd.DataFrame:
    from analysis.load import normalise_attention
    return attention_speedups(normalise_attention(pd.DataFrame(rows)).assign(run="r"))


def _bars(ax) -> list:
    from matplotlib.container import BarContainer
    return [bar for c in ax.containers if isinstance(c, BarContainer) for bar in c]


def test_speedup_bars_never_draw_the_reference_and_give_each_model_its_own_axis(results_dir, drawn, tmp_path):
    """speedup_fi_pod drew fi_pod over itself (1.0 everywhere); the models shared one x axis (a panel of
    one point spread over every composition of the sweep); no p20-p80 bars, no noisy marks. Now: never
    the reference, each panel its own compositions, error bars on every bar, a noisy row hatched hollow."""
    from matplotlib.container import ErrorbarContainer

    from analysis import figures
    sp = attention_speedups(load_results(results_dir).attention)
    sp = sp[sp["run"] == "run1.parquet"]
    p3 = (sp["batch"] == "llama-3-8b p3") & (sp["backend"] == "pod")
    sp.loc[p3, "p80_ms"] = sp.loc[p3, "p20_ms"] * 1.5                      # pod's row at p3 is noisy
    figures.fig_speedups(sp, tmp_path, "fi_pod")
    figures.fig_speedups(sp, tmp_path, "serial")
    fig = drawn["speedup_fi_pod_paper"]
    assert "fi_pod" not in legend_texts(fig)
    assert not [bar for ax in fig.axes for bar in _bars(ax) if bar.get_label() == "fi_pod"]
    assert not [c for ax in fig.axes for c in ax.containers if c.get_label() == "fi_pod"]
    for fig in (drawn["speedup_fi_pod_paper"], drawn["speedup_serial_paper"]):
        panels = {ax.get_title(): ax for ax in fig.axes}
        assert set(panels) == {"llama-2-7b, paged KV", "llama-3-8b, paged KV", "llama-3-8b, contiguous KV"}
        for title, ax in panels.items():
            model, layout = title.split(", ")[0], title.split(", ")[1].split()[0]
            rows = sp[(sp["model"] == model) & (sp["point_layout"] == layout)]
            ticks = [t.get_text() for t in ax.get_xticklabels()]
            assert set(ticks) <= set(rows["composition"]), title      # its own compositions only
            assert any(isinstance(c, ErrorbarContainer) for c in ax.containers), title
        assert [t.get_text() for t in panels["llama-2-7b, paged KV"].get_xticklabels()] == ["1K@4K + 32×8K"]
    hatched = [bar for ax in drawn["speedup_serial_paper"].axes for bar in _bars(ax) if bar.get_hatch()]
    assert len(hatched) == 1 and hatched[0].get_facecolor()[3] == 0      # pod at p3: hollow, hatched
    assert any("noisy" in t for t in legend_texts(drawn["speedup_serial_paper"]))


def test_heatmap_subtitle_explains_only_the_marks_it_has(drawn, tmp_path):
    """The subtitle promised blank cells ('the best serial baseline itself') where none was blank. Now
    the fastest serial path's own cell reads 'ref', a cell without a usable row is blank, and the
    subtitle explains only the marks the figure has."""
    from analysis import figures
    rows = h200_paper_rows()
    sp = attention_speedups(rows[rows["sweep"] == "paper"])
    figures.fig_speedup_heatmap(sp, tmp_path)
    fig = drawn.pop("speedup_heatmap_paper")
    title = fig._suptitle.get_text()
    assert "'ref'" in title and "blank" not in title and "'?'" not in title and "noisy" not in title
    ax = fig.axes[0]
    ys = [t.get_text() for t in ax.get_yticklabels()]
    xs = [t.get_text() for t in ax.get_xticklabels()]
    refs = {(ys[int(t.get_position()[1])], xs[int(t.get_position()[0])]) for t in ax.texts if t.get_text() == "ref"}
    assert refs == {("triton_serial", "512@4K + 32×8K"), ("fi_serial", "1K@4K + 32×8K"), ("fi_serial", "2K@4K + 32×8K")}

    failed = rows[rows["sweep"] == "paper"].copy()                        # pod failed at q2; pod_sm90 noisy at q3
    failed.loc[(failed["batch"] == "llama-3-8b q2") & (failed["backend"] == "pod"), "status"] = "error"
    q3 = (failed["batch"] == "llama-3-8b q3") & (failed["backend"] == "pod_sm90")
    failed.loc[q3, "p80_ms"] = failed.loc[q3, "p20_ms"] * 1.5
    figures.fig_speedup_heatmap(attention_speedups(failed), tmp_path)
    title = drawn["speedup_heatmap_paper"]._suptitle.get_text()
    assert "'ref'" in title and "blank: no usable row" in title and "'?': noisy" in title


def roofline_rows() -> list[dict]:
    """Six pure prefill points (kernels sweep: triton_prefill, fi_serial, fa2_serial; triton_prefill's
    last two rows noisy), one pure decode point (fi_serial only), three hybrid points (pod, pod_paper,
    triton_serial, with close times)."""
    rows: list[dict] = []
    for i, (chunk, ctx) in enumerate(((512, 0), (512, 4096), (1024, 0), (1024, 4096), (2048, 0), (2048, 4096))):
        for backend, ms in (("triton_prefill", 1.0 + 0.1 * i), ("fi_serial", 0.8 + 0.1 * i), ("fa2_serial", 1.5)):
            noisy = dict(p80_ms=(1.0 + 0.1 * i) * 2) if backend == "triton_prefill" and i >= 4 else {}
            rows.append(_row(f"k{i}", backend, ms, sweep="kernels", chunk=chunk, ctx=ctx, nd=0, **noisy))
    rows.append(_row("d0", "fi_serial", 0.5, sweep="kernels", chunk=0, nd=64))
    for i in range(3):
        for backend, ms in (("pod", 1.0), ("pod_paper", 1.01), ("triton_serial", 1.02), ("fi_serial", 1.1)):
            rows.append(_row(f"h{i}", backend, ms + 0.1 * i, chunk=1024, ctx=4096 * i))
    return rows


def test_roofline_boxes_only_many_points_noisy_marks_in_their_category_backends_apart(drawn, tmp_path):
    """The decode panel was a box plot of one point; noisy markers sat between two categories (one under
    the panel's legend); pod / pod_paper / triton_serial looked alike. Now: a box only over 5+ clean
    points, a noisy point hollow inside its own backend's category, one legend outside the panels, and a
    colour and a marker of its own for every backend."""
    from matplotlib.lines import Line2D

    from analysis import figures
    from analysis.load import Results
    sp = _speedups(roofline_rows())
    figures.fig_roofline(sp, Results(sp, pd.DataFrame(), pd.DataFrame(), tmp_path), tmp_path)
    fig = drawn["roofline"]
    prefill, decode, hybrid = fig.axes[:3]
    assert len(decode.patches) == 0                                        # one point: no box
    assert len(prefill.patches) == 2      # fa2_serial and fi_serial: 6 clean points; triton_prefill: 4 + 2 noisy
    ticks = [t.get_text() for t in prefill.get_xticklabels()]
    hollow = [(x, line) for line in prefill.lines if isinstance(line, Line2D) and line.get_marker() not in (None, "None", "")
              and str(line.get_markerfacecolor()) == "none" for x in line.get_xdata()]
    assert len(hollow) == 2
    for x, _ in hollow:
        assert abs(x - round(x)) <= 0.3 and ticks[round(x)] == "triton_prefill"
    assert all(ax.get_legend() is None for ax in fig.axes) and len(fig.legends) == 1
    styles = {h.get_label(): (h.get_color(), h.get_marker()) for h in fig.legends[0].legend_handles}
    ours = [styles[b] for b in ("pod", "pod_paper", "triton_serial")]
    assert len({c for c, _ in ours}) == 3 and len({m for _, m in ours}) == 3
    assert len(hybrid.collections) == 4                                     # one per hybrid backend


def test_kernel_figure_takes_a_kernel_the_kernels_sweep_lacks_from_another_kernel_sweep(drawn, tmp_path):
    """The H200's kernels run had no triton_prefill: its prefill panel showed FlashInfer alone, though the
    hopper_prefill sweep measured ours (and FA2) at the same points. Now a kernel the kernels sweep did
    not run at a point comes from another kernel sweep at the same point and backend options (the
    default-config run, not the autotuned portable tile). The table has one row a point (FA2, which ran
    the point contiguous, had a row of its own)."""
    from analysis import figures
    from analysis.speedup import kernel_tables
    default, autotune = '{"prefill_config": "auto"}', '{"prefill_config": "autotune"}'
    rows = []
    for point, chunk in (("k1", 1024), ("k2", 2048)):
        kw = dict(chunk=chunk, ctx=4096, nd=0, gpu=H200)
        rows.append(_row(point, "fi_serial", 1.0, sweep="kernels", options=default, run_id="kern", **kw))
        rows.append(_row(point, "triton_decode", 1.0, sweep="kernels", options=default, run_id="kern",
                         status="skipped", **kw))
        for backend, ms, options in (("triton_prefill", 0.8, default), ("fi_serial", 5.0, default),
                                     ("fa2_serial", 1.6, default), ("triton_prefill", 3.0, autotune)):
            ran = dict(batch=f"llama-3-8b {point} contig") if backend == "fa2_serial" else {}   # as it ran
            rows.append(_row(point, backend, ms, sweep="hopper_prefill", options=options,
                             run_id="hp" + options[-10:-2], **kw, **ran))
    rows.append(_row("only_hp", "triton_prefill", 0.5, sweep="hopper_prefill", options=default, run_id="hpauto",
                     chunk=512, ctx=0, nd=0, gpu=H200))
    from analysis.load import normalise_attention
    df = normalise_attention(pd.DataFrame(rows))
    sp = attention_speedups(df.assign(run=df["run_id"]))
    pre, _ = kernel_tables(sp)
    assert list(pre.columns[:6]) == ["gpu", "model", "batch", "triton_prefill", "fi_serial", "fa2_serial"]
    assert len(pre) == 2 and pre["fa2_serial"].notna().all()   # one row a point (FA2 ran it contiguous)
    assert pre["batch"].tolist() == ["llama-3-8b k1", "llama-3-8b k2"]   # the kernels sweep's points only
    flops = sp.loc[(sp["backend"] == "fi_serial") & (sp["sweep"] == "kernels"), "prefill_flops"].to_numpy()
    assert pre["fi_serial"].to_numpy() == pytest.approx(flops / 1.0e-3 / 1e12)      # the kernels sweep's own
    assert pre["triton_prefill"].to_numpy() == pytest.approx(flops / 0.8e-3 / 1e12)  # not the autotuned run
    figures.fig_kernels(sp, tmp_path)
    legend = drawn["kernels"].axes[0].get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["ours (triton_prefill)", "FlashInfer (fi_serial)",
                                                          "FA2 (fa2_serial)"]


def test_composition_label():
    assert composition_label(1, 1024, 12288, 64, 4096) == "1K@12K + 64×4K"
    assert composition_label(2, 512, 0, 0, 0) == "2×512@0"
    assert composition_label(0, 0, 0, 8, 1536) == "8×1.5K"


# -- figures and tables ------------------------------------------------------------------------------
def _nonempty(p: Path) -> bool:
    return p.is_file() and p.stat().st_size > 1000


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The synthetic results and every figure and table built from them, once for this module:
    (folder holding results/ and figs/, {name: paths written})."""
    root = tmp_path_factory.mktemp("built")
    return root, build_all(synthetic_results(root / "results"), root / "figs")


def test_build_all_writes_figures_and_tables(built):
    out, written = built[0] / "figs", built[1]
    for name in ("speedup_serial_paper", "speedup_fi_pod_paper", "speedup_heatmap_paper", "roofline", "kernels",
                 "serving_throughput", "serving_latency_llama_3_8b"):
        for ext in ("png", "pdf"):
            assert _nonempty(out / f"{name}.{ext}"), f"{name}.{ext} missing or empty"
    for name in ("speedup_summary", "speedup_by_model", "speedups", "excluded", "status_counts",
                 "kernels_prefill_tflops", "kernels_decode_gbps", "serving_throughput", "serving_latency",
                 "serving_speedups"):
        assert (out / f"{name}.csv").is_file() and (out / f"{name}.md").read_text().startswith("|")
    assert "summary" in written and GPU in (out / "summary.md").read_text()
    summ = pd.read_csv(out / "speedup_summary.csv").set_index(["backend", "vs"])
    assert summ.loc[("pod", "best serial"), "compared"] == 8
    kp = pd.read_csv(out / "kernels_prefill_tflops.csv")
    assert list(kp.columns) == ["gpu", "model", "batch", "triton_prefill", "fi_serial", "fa2_serial"]
    assert len(kp) == 1 and kp.loc[0, "fi_serial"] == pytest.approx(kp.loc[0, "triton_prefill"] / 0.9)
    kd = pd.read_csv(out / "kernels_decode_gbps.csv")
    assert kd.loc[0, "fi_serial"] < kd.loc[0, "triton_decode"]  # 1.2 ms vs 1.0 ms for the same bytes
    excluded = pd.read_csv(out / "excluded.csv")
    assert len(excluded) == 7  # p4 pod, p5 fa2 + fi_pod, p6 fi_serial + triton_prefill, cpu run x2


def test_make_figures_and_make_reproduce_draw_through_one_list_of_builders(built, tmp_path, capsys):
    """`make figures` (python -m analysis.figures) skipped the serving figures `make reproduce` drew, and
    analysis.figures and analysis.serving_figures both drew serving figures (two sets): now one list of
    builders (FIGURE_BUILDERS) behind one entry point (build_all) serves both, the serving figures
    drawn wherever serving rows exist."""
    import analysis.figures as figures
    import analysis.serving_figures as serving_figures
    import experiments.reproduce as rp
    assert "serving" in figures.FIGURE_BUILDERS and not hasattr(serving_figures, "main")
    assert not hasattr(figures, "fig_serving")
    make_figures = built[0] / "figs"                            # what build_all (make figures) wrote
    assert "$(PY) -m analysis.figures --results results/h100" in (ROOT / "Makefile").read_text()
    rp.rebuild_figures(built[0] / "results", tmp_path / "reproduce")
    names = sorted(p.name for p in make_figures.iterdir())
    assert names == sorted(p.name for p in (tmp_path / "reproduce").iterdir())
    assert {"serving_throughput.png", "serving_latency_llama_3_8b.pdf", "serving_speedups.csv"} <= set(names)
    assert not {"serving_offline.png", "serving_online.png", "serving.csv"} & set(names)
    assert "## Serving: offline throughput" in (make_figures / "summary.md").read_text()
    ratio = pd.read_csv(make_figures / "serving_speedups.csv")
    assert ratio[["backend", "vs"]].values.tolist() == [["pod", "fa2_serial"]]
    assert ratio["speedup"].tolist() == pytest.approx([1.2])


def _differing(a: Path, b: Path) -> list[str]:
    """Names of the files that differ between two figure folders (or exist in one only)."""
    names = {p.name for p in a.iterdir()} | {p.name for p in b.iterdir()}
    return sorted(n for n in names if not ((a / n).is_file() and (b / n).is_file()
                                           and (a / n).read_bytes() == (b / n).read_bytes()))


def test_figures_from_committed_rows_are_byte_stable(tmp_path):
    """`make figures` / `make reproduce` on the committed rows leave the tree unchanged: two builds, in
    two processes from two working directories, give the same bytes (nothing random drawn, no dates or
    versions in PNG/PDF metadata), and no table holds an absolute path."""
    import subprocess
    committed = ROOT / "results" / "h100"
    if not load_results(committed).attention.shape[0]:
        pytest.skip("no committed H100 rows")
    a, b = tmp_path / "a", tmp_path / "b"
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from analysis.figures import build_all; "
            "build_all(sys.argv[2], sys.argv[3])")
    other = subprocess.Popen([sys.executable, "-c", code, str(ROOT), str(committed), str(b)], cwd=tmp_path,
                             env={**os.environ, "PYTHONHASHSEED": "random"})   # builds alongside this one
    written = build_all(committed, a)
    assert other.wait(timeout=300) == 0
    assert any(p.suffix == ".pdf" for ps in written.values() for p in ps)
    assert _differing(a, b) == []
    for f in list(a.glob("*.md")) + list(a.glob("*.csv")):
        text = f.read_text()
        assert str(ROOT) not in text and str(tmp_path) not in text, f"{f.name} holds an absolute path"
    assert "from `results/h100`" in (a / "summary.md").read_text()


def test_build_all_without_results(tmp_path):
    # (results without serving rows: see test_reproduce_cpu_runs_smoke_then_committed_figures)
    assert build_all(tmp_path / "empty", tmp_path / "figs2") == {}
    assert not (tmp_path / "figs2").exists()


def test_markdown_table():
    md = to_markdown(pd.DataFrame({"a": ["x|y"], "b": [1.23456], "c": [float("nan")]}))
    assert md.splitlines() == ["| a | b | c |", "|---|---|---|", "| x\\|y | 1.235 |  |"]


# -- the notebook ------------------------------------------------------------------------------------
def _run_notebook(monkeypatch, results: Path | str, figures: Path | None):
    """Execute the notebook as `jupyter execute` does (the kernel in notebooks/); figures=None: POD_FIGURES unset."""
    import nbclient
    import nbformat
    monkeypatch.setenv("POD_RESULTS", str(results))
    if figures is None:
        monkeypatch.delenv("POD_FIGURES", raising=False)
    else:
        monkeypatch.setenv("POD_FIGURES", str(figures))
    nb = nbformat.read(ROOT / "notebooks" / "analysis.ipynb", as_version=4)
    # kernel "python3" resolves to this interpreter (jupyter_client swaps `python` for sys.executable)
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=120,
                                     resources={"metadata": {"path": str(ROOT / "notebooks")}})
    client.execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    return outputs, text


def test_notebook_runs_on_results_and_on_none(built, tmp_path, monkeypatch):
    results_dir, figs = built[0] / "results", built[0] / "nbfigs"
    outputs, text = _run_notebook(monkeypatch, results_dir, figs)
    assert "43 attention rows" in text and GPU in text
    images = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.get("data", {})]
    assert len(images) >= 6 and _nonempty(figs / "roofline.png")
    # The notebook writes the very bytes `python -m analysis.figures` writes: running it changes nothing.
    assert _differing(figs, built[0] / "figs") == []
    markdown = "".join(o["data"].get("text/markdown", "") for o in outputs if o.output_type == "display_data")
    assert "speedup_summary" in markdown and "| pod |" in markdown

    _, text = _run_notebook(monkeypatch, tmp_path / "no_results", tmp_path / "nbfigs2")
    assert "No results yet" in text and not (tmp_path / "nbfigs2").exists()


def test_notebook_paths_are_the_repositorys_and_committed_figures_stay_as_they_are(built, monkeypatch):
    """`POD_RESULTS=<relative folder> jupyter execute notebooks/analysis.ipynb` found nothing (the path
    resolved from notebooks/) and, by default, rewrote the committed results/figures/: now a relative
    path is the repository's, and without POD_FIGURES the figures go to outputs/notebook/ (git-ignored)."""
    import os
    import shutil
    committed = ROOT / "results" / "figures"
    before = {p: p.stat().st_mtime_ns for p in committed.rglob("*")}
    scratch = ROOT / "outputs" / "notebook"
    existed = scratch.exists()
    try:
        relative = os.path.relpath(built[0] / "results", ROOT)
        outputs, text = _run_notebook(monkeypatch, relative, None)
        assert "43 attention rows" in text and f"figures -> {scratch / 'figures'}" in text
        assert _nonempty(scratch / "figures" / "roofline.png")
        assert {p: p.stat().st_mtime_ns for p in committed.rglob("*")} == before
    finally:
        if not existed:
            shutil.rmtree(scratch, ignore_errors=True)


# -- experiments/reproduce.py ------------------------------------------------------------------------
class FakeSweeps:
    """Stands in for experiments.harness.sweep.run_sweep: records each composed config, writes rows where the harness
    would (<results_dir>/<sweep>/<device>.csv)."""

    def __init__(self, device: str, meaningful: bool):
        self.device, self.meaningful, self.cfgs = device, meaningful, []

    def __call__(self, cfg):
        self.cfgs.append(cfg)
        rows: list[dict] = []
        _points(rows, f"{cfg.sweep.name}-p", dict(fa2_serial=2.0, fi_serial=1.5, fi_pod=1.4, pod=1.0),
                sweep=cfg.sweep.name, meaningful=self.meaningful)
        folder = Path(cfg.results_dir) / cfg.sweep.name
        path = Path(cfg.results_file) if cfg.get("results_file") else folder / f"{self.device}.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        df = pd.DataFrame(rows)
        df["options"] = f'{{"pod_config": "{cfg.backend_options.pod_config}"}}'
        df.to_csv(path, index=False)
        return df


class FakeWandb:
    """Records what reproduce logs (the real wandb is not touched in tests)."""

    def __init__(self):
        self.logged: dict = {}
        self.inits = 0

    def init(self, **kw):
        self.inits += 1
        return self

    def log(self, data):
        self.logged.update(data)

    def finish(self):
        pass

    @staticmethod
    def Settings(**kw):
        return kw

    @staticmethod
    def Image(path):
        return ("image", path)

    @staticmethod
    def Table(dataframe):
        return ("table", len(dataframe))


@pytest.fixture
def reproduce(monkeypatch):
    import experiments.reproduce as rp
    import experiments.harness.sweep
    fake_wandb = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake_wandb)
    return rp, experiments.harness.sweep, fake_wandb


def test_reproduce_gpu_runs_paper_sweeps_then_figures(reproduce, tmp_path, monkeypatch, capsys):
    rp, harness, fake_wandb = reproduce
    fake = FakeSweeps("h100", meaningful=True)
    monkeypatch.setattr(harness, "run_sweep", fake)
    monkeypatch.setattr(rp, "has_gpu", lambda: True)
    out, figs = tmp_path / "h100", tmp_path / "figures"
    # Every sweep of the paper's evaluation is in `make reproduce`; the knob sweeps run `pod` once per config.
    plan = rp.load_plan()
    assert plan.gpu_sweeps == ("paper", "serving_shapes", "balance", "kernels", "paper_grid", "per_chunk", "policy", "ctas_per_sm",
                               "hopper_split")
    assert [r.pod_config for r in plan.gpu_runs if r.sweep == "ctas_per_sm"] == ["ctas_2", "ctas_4"]
    # the Hopper POD's split: the planner's run, then pod_sm90 forced to each split, each into its own file
    split = [r for r in plan.gpu_runs if r.sweep == "hopper_split"]
    assert split[0].knob is None and [r.options["pod_sm90_decode_ctas"] for r in split[1:]] == list(range(16, 113, 16))
    assert rp.run_overrides(split[1], out, "h200") == [
        "backend_options.pod_sm90_decode_ctas=16", f"results_file='{out / 'hopper_split' / 'h200.decode_16.csv'}'"]
    argv = ["--results-root", str(tmp_path), "--out", str(out), "--figures", str(figs)]
    assert rp.main(argv + ["--sweeps", "paper", "balance", "kernels", "policy"]) == 0
    assert [c.sweep.name for c in fake.cfgs] == ["paper", "balance", "kernels", "policy", "policy"]
    for c in fake.cfgs[:3]:
        assert Path(c.results_dir) == out and "fi_pod" in c.backend.names and "pod" in c.backend.names
        assert c.wandb.enabled and c.wandb.mode == "offline" and not c.results_file
    for c, name in zip(fake.cfgs[3:], ("policy_5050", "policy_proportional")):
        assert list(c.backend.names) == ["pod"] and c.backend_options.pod_config == name
        assert Path(c.results_file).parent == out / "policy" and Path(c.results_file).name.endswith(f".{name}.csv")
    assert _nonempty(figs / "policy.png")
    assert _nonempty(figs / "speedup_serial_paper.png") and _nonempty(figs / "speedup_serial_balance.pdf")
    summ = pd.read_csv(figs / "speedup_summary.csv").set_index(["backend", "vs"])
    assert summ.loc[("pod", "best serial"), "geomean"] == pytest.approx(1.5)  # 1.5 ms / 1.0 ms, 2 sweeps
    assert "figures/speedup_serial_paper" in fake_wandb.logged
    assert "tables/speedup_summary" in fake_wandb.logged
    assert "measured sweeps paper" in capsys.readouterr().out


def test_reproduce_cpu_runs_smoke_then_committed_figures(reproduce, tmp_path, monkeypatch, capsys):
    rp, harness, fake_wandb = reproduce
    fake = FakeSweeps("cpu", meaningful=False)
    monkeypatch.setattr(harness, "run_sweep", fake)
    monkeypatch.setattr(rp, "has_gpu", lambda: False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    # No committed results yet: smoke only, and a clear message.
    assert rp.main(["--results-root", str(tmp_path), "--no-wandb"]) == 0
    assert [(c.sweep.name, Path(c.results_dir)) for c in fake.cfgs] == [("smoke", tmp_path)]
    assert "triton_decode" in fake.cfgs[0].backend.names and not fake.cfgs[0].wandb.enabled
    assert (tmp_path / "smoke" / "figures" / "status_counts.csv").is_file()
    assert not (tmp_path / "smoke" / "figures" / "speedup_serial_smoke.png").exists()  # CPU: no speed-ups
    out = capsys.readouterr().out
    assert "no committed H100 results" in out and not (tmp_path / "figures").exists()
    assert "no committed H200 results" in out
    assert fake_wandb.inits == 0

    # Committed H100 results (no serving rows): figures rebuilt from them into <root>/figures.
    synthetic_results(tmp_path / "h100", serving=False)
    assert rp.main(["--results-root", str(tmp_path)]) == 0
    assert _nonempty(tmp_path / "figures" / "speedup_serial_paper.png")
    assert not list((tmp_path / "figures").glob("serving*"))  # no serving results: no serving figures
    assert "rebuilt figures and tables from the committed H100 results" in capsys.readouterr().out
    assert "figures/roofline" in fake_wandb.logged
    assert not (tmp_path / "figures" / "h200").exists()
    # Each committed GPU's figures: the H100's into <root>/figures, the H200's into <root>/figures/h200.
    built = []
    monkeypatch.setattr(rp, "rebuild_figures", lambda res, out: built.append((res, out)) or {})
    assert rp.main(["--results-root", str(tmp_path), "--figures-only", "--no-wandb"]) == 0
    assert built == [(tmp_path / "h100", tmp_path / "figures"), (tmp_path / "h200", tmp_path / "figures" / "h200")]


def test_reproduce_runs_the_sweeps_conf_reproduce_yaml_lists(reproduce, tmp_path, monkeypatch):
    """Which sweeps `make reproduce` runs is a config (conf/reproduce.yaml), not Python: a plan with two
    runs and no serving runs those two, in its order."""
    rp, harness, _ = reproduce
    assert not hasattr(rp, "GPU_RUNS") and rp.PLAN_FILE == ROOT / "conf" / "reproduce.yaml"
    plan = tmp_path / "reproduce.yaml"
    plan.write_text("gpu:\n  runs:\n    - {sweep: kernels}\n"
                    "    - {sweep: policy, backend: pod, pod_config: policy_5050}\n  serving: false\n"
                    "cpu: {sweep: smoke, backend: reference}\nfigures: {h100: figs}\n")
    monkeypatch.setattr(rp, "PLAN_FILE", plan)
    fake = FakeSweeps("h100", meaningful=True)
    monkeypatch.setattr(harness, "run_sweep", fake)
    monkeypatch.setattr(rp, "has_gpu", lambda: True)
    monkeypatch.setattr(rp, "rebuild_figures", lambda res, out: {})
    assert rp.main(["--results-root", str(tmp_path), "--no-wandb"]) == 0
    assert [(c.sweep.name, c.backend_options.pod_config) for c in fake.cfgs] == [
        ("kernels", "dispatcher"), ("policy", "policy_5050")]
    monkeypatch.setattr(rp, "has_gpu", lambda: False)
    fake.cfgs.clear()
    assert rp.main(["--results-root", str(tmp_path), "--no-wandb"]) == 0
    assert [(c.sweep.name, list(c.backend.names)) for c in fake.cfgs] == [("smoke", ["reference"])]


def _one_line(capsys) -> str:
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in captured.out + captured.err, captured
    return err[0]


def test_reproduce_sweeps_on_a_cpu_is_refused_not_ignored(reproduce, tmp_path, monkeypatch, capsys):
    rp, harness, _ = reproduce
    fake = FakeSweeps("cpu", meaningful=False)
    monkeypatch.setattr(harness, "run_sweep", fake)
    monkeypatch.setattr(rp, "has_gpu", lambda: False)
    assert rp.main(["--results-root", str(tmp_path), "--sweeps", "paper", "--no-wandb"]) == 2
    line = _one_line(capsys)
    assert line.startswith("[reproduce] refused: --sweeps paper") and "no CUDA GPU here" in line
    assert f"{rp.cli.interpreter()} -m experiments.attention sweep=<name> backend=cpu" in line
    assert fake.cfgs == []
    monkeypatch.setattr(rp, "has_gpu", lambda: True)      # a GPU: a sweep conf/sweep/ lacks is named
    assert rp.main(["--results-root", str(tmp_path), "--sweeps", "papr", "--no-wandb"]) == 2
    assert "--sweeps papr: no such sweep in conf/sweep/" in _one_line(capsys) and fake.cfgs == []


def test_reproduce_ctrl_c_and_refusals_end_in_one_line(reproduce, tmp_path, monkeypatch, capsys):
    """Ctrl-C in a sweep (rows kept, how to go on), Ctrl-C while figures are drawn, a sweep the harness
    refuses: one line each on stderr and an exit status, never a traceback."""
    rp, harness, _ = reproduce
    monkeypatch.setattr(rp, "has_gpu", lambda: False)
    argv = ["--results-root", str(tmp_path), "--no-wandb"]

    def interrupted(cfg):
        raise harness.SweepInterrupted(tmp_path / "smoke" / "cpu.csv", 3)
    monkeypatch.setattr(harness, "run_sweep", interrupted)
    assert rp.cli.run("reproduce", lambda: rp.main(argv)) == 130
    line = _one_line(capsys)
    assert line.startswith("[reproduce] interrupted: 3 new rows kept in") and "make reproduce" in line

    def refused(cfg):
        raise harness.SweepRefused("sweep=smoke: page_size=0 is invalid")
    monkeypatch.setattr(harness, "run_sweep", refused)
    assert rp.cli.run("reproduce", lambda: rp.main(argv)) == 2
    assert _one_line(capsys) == "[reproduce] refused: sweep=smoke: page_size=0 is invalid"

    import analysis.figures

    def ctrl_c(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(analysis.figures, "build_all", ctrl_c)
    assert rp.cli.run("reproduce", lambda: rp.main(argv + ["--figures-only"])) == 130
    line = _one_line(capsys)
    assert line.startswith("[reproduce] interrupted while drawing figures into") and "--figures-only" in line

    def ctrl_c_at_start():
        raise KeyboardInterrupt
    monkeypatch.setattr(rp, "has_gpu", ctrl_c_at_start)    # `import torch` is where start-up waits
    assert rp.cli.run("reproduce", lambda: rp.main(argv)) == 130
    assert _one_line(capsys) == "[reproduce] interrupted (Ctrl-C)"


def test_reproduce_logs_figures_to_wandb_in_one_line_of_its_own(tmp_path, monkeypatch, capfd):
    """--figures-only printed W&B's banner, history and sync hints for each run (15 lines) and a
    deprecation warning for reinit=True: now W&B is silent and one line says where the run went."""
    import warnings

    import experiments.reproduce as rp
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_SILENT", raising=False)
    table = tmp_path / "t.csv"
    pd.DataFrame({"a": [1, 2]}).to_csv(table, index=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for name in ("figures-h100", "figures-h200"):
            rp.log_to_wandb({"table:t": [table]}, name, {"results": "x"}, "offline")
    out, err = capfd.readouterr()
    lines = [line for line in (out + err).splitlines() if line.strip()]
    assert len(lines) == 2 and all(line.startswith("[reproduce] W&B (offline): figures and tables of figures-h")
                                   for line in lines), lines
    assert "sync" in lines[0] and not [w for w in caught if "reinit" in str(w.message)]
    assert len(list(tmp_path.glob("wandb/offline-run-*"))) == 2


def test_reproduce_without_wandb_installed_warns(reproduce, tmp_path, monkeypatch):
    rp, *_ = reproduce
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    figs = synthetic_results(tmp_path / "h100")
    with pytest.warns(UserWarning, match="wandb is not installed"):
        rp.log_to_wandb({"roofline": [figs / "run1.parquet"]}, "x", {}, "offline")


def test_reproduce_fresh_clears_only_this_gpus_rows(reproduce, tmp_path, capsys, monkeypatch):
    rp, *_ = reproduce
    folder = tmp_path / "h100" / "paper"
    folder.mkdir(parents=True)
    for name in ("h100.csv", "h100.shard0of2.csv", "a100.csv"):
        (folder / name).write_text("x\n1\n2\n")
    said_before = []   # what had been printed when each file was removed
    unlink = Path.unlink
    monkeypatch.setattr(Path, "unlink", lambda self, *a, **k: (said_before.append(
        (self.name, capsys.readouterr().out)), unlink(self, *a, **k))[-1])
    removed = rp.clear_sweeps(tmp_path / "h100", ["paper", "balance"], "h100", "smoke rows are scratch")
    assert sorted(p.name for p in folder.iterdir()) == ["a100.csv"]
    assert sorted(p.name for p in removed) == ["h100.csv", "h100.shard0of2.csv"]
    # `make reproduce` says what it removes, and why, before it removes anything.
    first_name, message = said_before[0]
    assert "removing earlier rows (smoke rows are scratch)" in message
    assert f"{folder / 'h100.csv'} (2 rows)" in message and "h100.shard0of2.csv (2 rows)" in message
    assert "a100" not in message
    assert rp.clear_sweeps(tmp_path / "h100", ["paper"], "h100") == []   # nothing there: says nothing
    assert capsys.readouterr().out == ""


def test_ceilings_from_results_else_documented_defaults(results_dir):
    from analysis.figures import DEFAULT_CEILINGS, ceilings_for
    assert ceilings_for(load_results(results_dir), GPU) == DEFAULT_CEILINGS
    pd.DataFrame([dict(gpu=GPU, peak_tflops=712.5, copy_gbps=2890.0),
                  dict(gpu="NVIDIA A100-SXM4-80GB", peak_tflops=280.0, copy_gbps=1700.0)]
                 ).to_csv(results_dir / "ceilings.csv", index=False)
    r = load_results(results_dir)
    assert len(r.attention) == 43  # the ceilings file is not read as attention rows
    c = ceilings_for(r, GPU)
    assert (c["tflops"], c["gbps"]) == (712.5, 2890.0) and "measured" in c["source"]
    assert ceilings_for(r, "NVIDIA B200") == DEFAULT_CEILINGS  # never another GPU's measured ceilings
    from analysis.figures import GPU_CEILINGS   # a GPU with documented defaults of its own gets them
    assert ceilings_for(r, "NVIDIA H200") == GPU_CEILINGS["NVIDIA H200"] != DEFAULT_CEILINGS


def test_a_baseline_at_another_release_is_compared_point_by_point_not_mixed_in(tmp_path):
    """Rows under versions/<label>/ (FlashInfer 0.7.2 beside the pinned 0.6.6) stay out of the main tables
    and give one table: pinned ms / other ms per backend over the points both ran usably."""
    from analysis.figures import build_tables
    root = tmp_path / "h200"
    (root / "paper").mkdir(parents=True)
    main, other = [], []
    for p, (fi, fpod) in {"p1": (1.0, 0.9), "p2": (2.0, 1.6), "p3": (1.5, 1.5)}.items():
        _points(main, p, dict(triton_serial=1.2, fi_serial=fi, fi_pod=fpod, pod=1.0))
    _points(other, "p1", dict(fi_serial=0.8, fi_pod=0.9), flashinfer="0.7.2")        # 1.25x, 1.0x
    _points(other, "p2", dict(fi_serial=2.5, fi_pod=1.0), flashinfer="0.7.2")        # 0.8x, 1.6x
    other.append(_row("p3", "fi_serial", 0.1, flashinfer="0.7.2", decode_err=0.5))  # wrong output: left out
    pd.DataFrame(main).to_csv(root / "paper" / "h200.csv", index=False)
    # An older run of p1 in another file of the main tree: the newest row of a key is the one compared.
    stale = [_row("p1", "fi_serial", 3.0, timestamp="2026-11-01T00:00:00")]
    pd.DataFrame(stale).to_csv(root / "paper" / "h200.old.csv", index=False)
    (root / "versions" / "flashinfer_0.7.2" / "paper").mkdir(parents=True)
    pd.DataFrame(other).to_csv(root / "versions" / "flashinfer_0.7.2" / "paper" / "h200.csv", index=False)

    results = load_results(root)
    assert len(results.attention) == len(main) + 1                   # the other release is not mixed in
    t = build_tables(results)["baseline_versions"].set_index("backend")
    assert t.loc["fi_serial", "points"] == 2 and t.loc["fi_pod", "points"] == 2
    assert t.loc["fi_serial", "speedup_geomean"] == pytest.approx(1.0, abs=1e-3)    # sqrt(1.25 * 0.8)
    assert (t.loc["fi_serial", "speedup_min"], t.loc["fi_serial", "speedup_max"]) == (0.8, 1.25)
    assert t.loc["fi_pod", "speedup_geomean"] == pytest.approx(math.sqrt(1.6), abs=1e-3)
    assert t.loc["fi_serial", "pinned"] == "0.6.6" and t.loc["fi_serial", "other"] == "0.7.2"
    assert set(t["label"]) == {"flashinfer_0.7.2"}
    # Rows that recorded no FlashInfer version (a blank provenance cell) still pair; their version is "".
    for f in (root / "paper" / "h200.csv", root / "versions" / "flashinfer_0.7.2" / "paper" / "h200.csv"):
        pd.read_csv(f).assign(flashinfer=float("nan")).to_csv(f, index=False)
    t = build_tables(load_results(root))["baseline_versions"].set_index("backend")
    assert t.loc["fi_serial", "points"] == 2 and t.loc["fi_serial", "other"] == ""


def test_dispatch_evidence_applies_the_rule_to_measured_rows():
    """analysis.dispatch_evidence pairs pod_sm90 with triton_serial per (run, point), reads the rule's own
    features, and scores the rule on the measured rows: the rule's path, the better of the two, and the
    points where the rule took the slower one."""
    from analysis import dispatch_evidence as E
    from pod.dispatch import sm90_estimated_ms
    base = dict(run="r", gpu="G", sweep="s", model="m", num_prefill=1, num_decode=8, usable=True)
    # p1: GQA, 1.0 ms of decode, tiny prefill -> the rule fuses; fused 0.8 vs serial 1.0
    # p2: MHA, small share -> serial; fused 0.9 vs serial 1.0 (misrouted); p3 has no pod_sm90 row
    pts = {"p1": dict(num_q_heads=32, num_kv_heads=8, prefill_flops=1e9, decode_bytes=4.3e9),
           "p2": dict(num_q_heads=32, num_kv_heads=32, prefill_flops=1e9, decode_bytes=4.3e9),
           "p3": dict(num_q_heads=32, num_kv_heads=8, prefill_flops=1e9, decode_bytes=4.3e9)}
    times = {("p1", "pod_sm90"): 0.8, ("p1", "triton_serial"): 1.0, ("p2", "pod_sm90"): 0.9,
             ("p2", "triton_serial"): 1.0, ("p3", "triton_serial"): 1.0}
    best = {"p1": 0.95, "p2": 1.0, "p3": 1.0}
    sp = pd.DataFrame([{**base, **pts[p], "point_id": p, "batch": p, "backend": b, "median_ms": ms,
                        "best_serial_ms": best[p], "options": '{"pod_sm90_decode_ctas": 0}'}
                       for (p, b), ms in times.items()])
    # a knob run forcing the SM split (hopper_split) is not the rule's launch, even beside a serial row
    forced = sp[sp["point_id"] == "p1"].assign(run="r2", options='{"pod_sm90_decode_ctas": 16}', median_ms=0.5)
    sp = pd.concat([sp, forced], ignore_index=True)
    assert sm90_estimated_ms(1e9, 4.3e9)[1] == pytest.approx(1.0)
    t = E.tables(sp)
    rule = t["dispatch_rule"].iloc[0]
    assert (rule["points"], rule["rule_fuses"], rule["misrouted"]) == (2, 1, 1)
    assert rule["rule_geomean"] == pytest.approx((0.95 / 0.8 * 1.0) ** 0.5)
    assert rule["better_of_two_geomean"] == pytest.approx((0.95 / 0.8 / 0.9) ** 0.5)
    assert rule["misrouted_batches"] == "p2"
    ev = t["fused_vs_serial"].set_index("kind")
    assert ev.loc["MHA", "geomean"] == pytest.approx(1.0 / 0.9) and ev.loc["MHA", "rule_fuses"] == 0
    assert ev.loc["GQA, decode larger", "rule_fuses"] == 1 and ev.loc["GQA, decode larger", "points"] == 1
    # bins are [lo, hi): 1.0 ms of decode sits in the rule's ">= 0.6" bin, share 1e9/4.3e9 * 4.3/5.68 < 0.05
    assert ev.loc["GQA, decode larger", "est_decode_ms"] == ">= 0.6"
    assert ev.loc["GQA, decode larger", "share"] == "[0, 0.05)"
    assert E.tables(sp[sp["backend"] != "pod_sm90"]) == {}
