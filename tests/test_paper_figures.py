"""analysis/paper_figures.py on synthetic rows: the 20% filter, speed-ups over fa2_serial with max/mean,
noisy rows flagged (never plotted clean), no backend compared with itself, the knob figures, the Hopper
prefill figure on each point's own layout, byte-stable files, and nothing new for results without
these sweeps."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from analysis import paper_figures as pf
from analysis.figures import build_all
from analysis.load import load_results
from analysis.speedup import attention_speedups

GPU = "NVIDIA H200"
OPTS = {"pod_config": "dispatcher", "prefill_config": "auto"}


def _row(sweep, point, backend, ms, *, spread=1.02, model="llama3_8b_tp1", chunk=512, ctx=0, nd=64, dctx=4096,
         layout="paged", page=16, status="ok", options=None, backend_config="{}", computes=("prefill", "decode")):
    pf_flops = 4 * 128 * 32 * (chunk * ctx + chunk * (chunk + 1) // 2) if chunk else 0
    p20 = ms / math.sqrt(spread)
    return dict(point_id=f"{sweep}-{point}", sweep=sweep, backend=backend, model=model, num_q_heads=32,
                num_kv_heads=8, head_dim=128, dtype="bfloat16", kv_layout=layout,
                page_size=page if layout == "paged" else np.nan, num_prefill=1 if chunk else 0, chunk_len=chunk,
                prefill_context_len=ctx, num_decode=nd, decode_context_len=dctx if nd else 0,
                batch=f"{model} {point}", status=status, reason="", median_ms=ms, p20_ms=p20, p80_ms=p20 * spread,
                timing_meaningful=True, prefill_err=1e-3 if chunk and "prefill" in computes else np.nan,
                decode_err=1e-3 if nd and "decode" in computes else np.nan, prefill_flops=pf_flops,
                decode_bytes=1e9 if nd else 0, tflops=pf_flops / (ms * 1e-3) / 1e12 if chunk else np.nan,
                gbps=np.nan, backend_config=backend_config, options=json.dumps({**OPTS, **(options or {})}),
                gpu=GPU, run_id="r1")


def grid_rows() -> list[dict]:
    """Four paper-grid points. fa2_serial 2.0 ms everywhere; pod 1.0 / 1.6 / 1.25 / 2.0 ms.
    Halves (prefill, decode): a (0.6, 1.4) balanced; b (0.1, 1.9) unbalanced; c (1.0, 1.0) balanced but
    pod's row is noisy; d has no decode half."""
    rows = []
    for point, pod, halves, pod_spread in (("a", 1.0, (0.6, 1.4), 1.02), ("b", 1.6, (0.1, 1.9), 1.02),
                                           ("c", 1.25, (1.0, 1.0), 1.6), ("d", 2.0, (0.9, None), 1.02)):
        rows.append(_row("paper_grid", point, "fa2_serial", 2.0, layout="contiguous"))
        rows.append(_row("paper_grid", point, "pod", pod, spread=pod_spread))
        rows.append(_row("paper_grid", point, "fi_serial", 2.5))
        rows.append(_row("paper_grid", point, "triton_prefill", halves[0], computes=("prefill",)))
        if halves[1] is not None:
            rows.append(_row("paper_grid", point, "triton_decode", halves[1], computes=("decode",)))
    return rows


def knob_rows() -> list[dict]:
    rows = []
    for i in range(4):                                           # per chunk: 4 chunks, 2 batches
        for nd in (66, 67):
            rows.append(_row("per_chunk", f"c{i}-{nd}", "pod", 1.0 + 0.1 * i, model="yi_6b", ctx=512 * i, nd=nd,
                             dctx=16384, spread=1.4 if (i, nd) == (2, 67) else 1.02))
            rows.append(_row("per_chunk", f"c{i}-{nd}", "fa2_serial", 2.0, model="yi_6b", ctx=512 * i, nd=nd,
                             dctx=16384, layout="contiguous"))
    for model in ("llama3_8b", "yi_6b"):                         # policy: 2 batches x 2 configs
        for nd in (32, 64):
            for cfg, ms in (("policy_5050", 1.2), ("policy_proportional", 1.0)):
                rows.append(_row("policy", f"{model}-{nd}", "pod", ms * nd / 32, model=model, chunk=1024,
                                 ctx=8192, nd=nd, dctx=8192, options={"pod_config": cfg}))
    for ctx in (1024, 2048):                                     # CTAs per SM: 2 x 2 cells x 2 configs
        for nd in (8, 16):
            for cfg, ms in (("ctas_2", 1.0), ("ctas_4", 0.8 if ctx == 1024 else 1.25)):
                rows.append(_row("ctas_per_sm", f"{ctx}-{nd}", "pod", ms, ctx=ctx, nd=nd, dctx=ctx,
                                 options={"pod_config": cfg}, spread=1.3 if (ctx, nd, cfg) == (2048, 16, "ctas_4") else 1.02))
    return rows


def split_rows() -> list[dict]:
    """hopper_split: two points. p1: serial 1.0 ms (fi 1.1), the planner's 40 decode CTAs 0.9 ms, forced
    16 / 48 / 64 = 1.2 / 0.8 / 0.95 ms (64 noisy); p2: the planner alone (30 CTAs, 1.25 ms) and serial."""
    rows = []
    for point, serial, fi, planned, forced in (("p1", 1.0, 1.1, (40, 0.9), {16: 1.2, 48: 0.8, 64: 0.95}),
                                               ("p2", 1.0, 1.2, (30, 1.25), {})):
        kw = dict(chunk=1024, ctx=12288, nd=64, dctx=8192)
        rows.append(_row("hopper_split", point, "triton_serial", serial, **kw))
        rows.append(_row("hopper_split", point, "fi_serial", fi, **kw))
        rows.append(_row("hopper_split", point, "pod_sm90", planned[1],
                         backend_config=json.dumps({"decode_ctas": planned[0]}), **kw))
        for k, ms in forced.items():
            rows.append(_row("hopper_split", point, "pod_sm90", ms, options={"pod_sm90_decode_ctas": k},
                             backend_config=json.dumps({"decode_ctas": k}), spread=1.5 if k == 64 else 1.02, **kw))
    return rows


def prefill_rows() -> list[dict]:
    """Two prefill-only points: p16 (paged 16) and pc (contiguous). fi_serial on pc ran paged 16 and
    fi_prefill_ragged on p16 ran contiguous: both must be dropped."""
    sm90 = '{"kernel": "prefill_sm90"}'
    rows = []
    for point, layout in (("p16", "paged"), ("pc", "contiguous")):
        kw = dict(nd=0, chunk=1024, ctx=4096)
        rows.append(_row("hopper_prefill", point, "triton_prefill", 1.0, layout=layout, backend_config=sm90, **kw))
        rows.append(_row("hopper_prefill", point, "fi_serial", 1.1 if layout == "paged" else 0.5, layout="paged", **kw))
        rows.append(_row("hopper_prefill", point, "fi_prefill_ragged", 0.9 if layout == "contiguous" else 0.4,
                         layout="contiguous", **kw))
        rows.append(_row("hopper_prefill", point, "fa2_serial", 2.0, layout="contiguous", **kw))
        rows.append(_row("hopper_prefill", point, "triton_prefill", 1.6, layout=layout, spread=2.0,
                         options={"prefill_config": "autotune"}, **kw))
    return rows


@pytest.fixture(scope="module")
def sp():
    rows = pd.DataFrame(grid_rows() + knob_rows() + prefill_rows() + split_rows())
    from analysis.load import normalise_attention
    df = normalise_attention(rows)
    df["run"] = "r1"
    return attention_speedups(df)


def test_flag_noisy_uses_the_one_limit():
    df = pd.DataFrame(dict(median_ms=[1.0, 1.0, 1.0, np.nan], p20_ms=[1.0, 1.0, np.nan, np.nan],
                           p80_ms=[1.2, 1.3, 1.1, np.nan]))
    out = pf.flag_noisy(df)
    assert out["noisy"].tolist() == [False, True, True, False]      # no p20 on a timed row: noisy
    assert pf.flag_noisy(df, limit=1.35)["noisy"].tolist() == [False, False, True, False]
    assert pf.NOISE_SPREAD_LIMIT == 1.25


def test_balanced_points_is_the_20_percent_rule(sp):
    bal = pf.balanced_points(sp[sp["sweep"] == "paper_grid"]).set_index("point_id")
    assert bal.loc["paper_grid-a", "prefill_share"] == pytest.approx(0.3)
    assert bal["balanced"].to_dict() == {"paper_grid-a": True, "paper_grid-b": False, "paper_grid-c": True,
                                         "paper_grid-d": False}
    assert "20%" in bal.loc["paper_grid-b", "why"] and "triton_decode" in bal.loc["paper_grid-d", "why"]
    # A noisy half makes the point not balanced.
    noisy = sp.copy()
    noisy.loc[(noisy["point_id"] == "paper_grid-a") & (noisy["backend"] == "triton_prefill"), "p80_ms"] = 5.0
    assert not pf.balanced_points(noisy).set_index("point_id").loc["paper_grid-a", "balanced"]


def test_paper_grid_speedups_table_max_mean_and_noisy(sp):
    d = pf.paper_grid_speedups(sp)
    t = pf.paper_grid_table(d).set_index(["points", "backend"])
    assert "fa2_serial" not in set(t.index.get_level_values("backend"))          # never vs itself
    assert not set(t.index.get_level_values("backend")) & {"triton_prefill", "triton_decode"}
    allp = t.loc[("all points", "pod")]
    # pod 2.0/1.0, 2.0/1.6, 2.0/2.0 clean; c (2.0/1.25) is noisy: counted, not in the numbers.
    assert allp["compared"] == 3 and allp["noisy"] == 1
    assert allp["max"] == pytest.approx(2.0) and allp["mean"] == pytest.approx((2.0 + 1.25 + 1.0) / 3)
    filt = t.loc[("filtered (20% rule)", "pod")]
    assert filt["compared"] == 1 and filt["noisy"] == 1 and filt["max"] == pytest.approx(2.0)
    assert t.loc[("all points", "fi_serial"), "mean"] == pytest.approx(0.8)


def test_hopper_prefill_compares_each_point_on_its_own_layout(sp):
    d = pf.hopper_prefill_rows(sp)
    got = {(r.point_id.split("-")[1], r.label): r.tflops for r in d.itertuples()}
    assert set(got) == {("p16", "ours, Hopper tile"), ("p16", "FlashInfer fa3"), ("p16", "ours, portable tile (autotune)"),
                        ("pc", "ours, Hopper tile"), ("pc", "FlashInfer fa3"), ("pc", "ours, portable tile (autotune)"),
                        ("pc", "torch FA2 (fa2_serial)")}
    flops = d["prefill_flops"].iloc[0]
    assert got[("p16", "FlashInfer fa3")] == pytest.approx(flops / 1.1e-3 / 1e12)   # fi_serial, paged
    assert got[("pc", "FlashInfer fa3")] == pytest.approx(flops / 0.9e-3 / 1e12)    # ragged, contiguous
    assert (d["tflops_lo"] < d["tflops"]).all() and (d["tflops"] < d["tflops_hi"]).all()
    assert d.loc[d["label"].str.contains("portable"), "noisy"].all()
    assert set(d["layout"]) == {"paged 16", "contiguous"}


def test_build_writes_every_figure_and_table_byte_stable(sp, tmp_path):
    figs, tables = pf.build(sp, tmp_path / "a")
    assert set(figs) == {"paper_grid_violin", "per_chunk", "policy", "ctas_per_sm", "hopper_prefill",
                         "hopper_split"}
    for paths in figs.values():
        assert all(p.stat().st_size > 0 for p in paths)
    # Byte-stable: the violin and the heat map drawn again are the same bytes (PNG and PDF).
    again = pf.fig_paper_violin(pf.paper_grid_speedups(sp), tmp_path / "b")
    again += pf.fig_ctas_heatmap(pf.knob_rows(sp, "ctas_per_sm"), tmp_path / "b")
    for q in again:
        assert (tmp_path / "a" / q.name).read_bytes() == q.read_bytes(), q.name
    noisy = tables["noisy_points"]
    assert set(noisy["sweep"]) == {"paper_grid", "per_chunk", "ctas_per_sm", "hopper_prefill", "hopper_split"}
    assert (noisy["spread"] > pf.NOISE_SPREAD_LIMIT).all() and "pod[ctas_4]" in set(noisy["backend"])
    pol = tables["policy"].set_index(["model", "num_decode"])
    assert pol.loc[("llama3_8b", 32), "pod[policy_5050]"] == pytest.approx(1.2)
    assert pol.loc[("yi_6b", 64), "proportional_speedup"] == pytest.approx(1.2)
    ctas = tables["ctas_per_sm"].set_index(["decode_context_len", "num_decode"])
    assert ctas.loc[(1024, 8), "ratio_2_over_4"] == pytest.approx(1.25)
    assert ctas.loc[(2048, 16), "noisy"] and not ctas.loc[(2048, 8), "noisy"]
    pc = tables["per_chunk"]
    assert "pod" in pc.columns and pc["noisy"].str.contains("pod").sum() == 1


def test_build_all_adds_the_paper_figures_only_where_their_sweeps_are(tmp_path):
    res = tmp_path / "results"
    res.mkdir()
    pd.DataFrame(grid_rows()).to_csv(res / "h200.csv", index=False)
    written = build_all(res, tmp_path / "figs")
    assert "paper_grid_violin" in written and "table:paper_grid_speedup" in written
    assert "speedup_serial" not in written           # the grid is not drawn as bars per composition
    summary = (tmp_path / "figs" / "summary.md").read_text()
    assert "Paper grid" in summary and "Noisy rows" in summary
    assert load_results(res).attention.shape[0] == len(grid_rows())


def test_existing_figures_flag_noisy_rows_and_never_compare_a_baseline_with_itself(sp, tmp_path, monkeypatch):
    """The heat map of every backend never fills the fastest serial path's own cells with a number (they
    read 'ref') and marks noisy cells with '?'; the kernel bars draw a noisy row hollow and hatched."""
    import analysis.figures as figs
    drawn = []
    real = figs.sns.heatmap
    monkeypatch.setattr(figs.sns, "heatmap", lambda data, **kw: drawn.append((data, kw["annot"])) or real(data, **kw))
    figs.fig_speedup_heatmap(sp[sp["sweep"] == "paper_grid"], tmp_path)
    (data, annot), = drawn
    assert data.loc["fa2_serial"].isna().all()                   # the fastest serial everywhere: 'ref', no number
    assert set(annot[list(data.index).index("fa2_serial")]) == {""}
    labels = dict(zip(data.columns, annot[list(data.index).index("pod")]))
    # One composition: the median of pod's four speed-ups (2.0, 1.25, 1.6, 1.0), '?' as point c is noisy.
    assert labels == {"512@0 + 64×4K": "1.43?"}
    bars = []
    real_bar = figs.plt.Axes.bar
    monkeypatch.setattr(figs.plt.Axes, "bar", lambda self, *a, **kw: bars.append(kw["color"]) or real_bar(self, *a, **kw))
    kernels = sp[sp["sweep"] == "hopper_prefill"].assign(sweep="kernels")
    figs.fig_kernels(kernels, tmp_path)
    hollow = [c for colors in bars for c in colors if c == (1, 1, 1, 0)]
    assert len(hollow) == 1            # triton_prefill: its portable-tile rows are noisy (one bar a composition)


def test_hopper_split_table_puts_the_planner_beside_the_best_forced_split(sp):
    d = pf.hopper_split_rows(sp)
    # every pod_sm90 row knows its decode CTAs (forced from the options, planned from backend_config)
    assert d.loc[d["backend"] == "pod_sm90", "decode_ctas"].notna().all()
    assert set(d.loc[d["backend"] == "pod_sm90", "label"]) >= {"pod_sm90", "pod_sm90[48 decode CTAs]"}
    t = pf.hopper_split_table(d).set_index("batch")
    p1, p2 = t.filter(like="p1", axis=0).iloc[0], t.filter(like="p2", axis=0).iloc[0]
    assert (p1["planner_ctas"], p1["best_ctas"]) == (40, 48)
    assert p1["planner_speedup"] == pytest.approx(1.0 / 0.9) and p1["best_speedup"] == pytest.approx(1.25)
    assert "pod_sm90[64 decode CTAs]" in p1["noisy"]
    assert p2["planner_speedup"] == pytest.approx(0.8) and math.isnan(p2["best_ms"])
