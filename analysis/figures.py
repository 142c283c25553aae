"""Every figure and summary table, rebuilt from the result tables: the one entry point.

    python -m analysis.figures [--results results/h100] [--out results/figures]

`make figures`, `make reproduce` (experiments/reproduce.py) and the notebook all draw through
`build_all`, which runs every builder of FIGURE_BUILDERS (each draws only where its rows exist) and
writes every table of `build_tables`, then summary.md.

Figures (PNG + PDF each, the GPU name from the provenance columns in every title):
  speedup_serial_<sweep>   speed-up over the fastest serial path (analysis.speedup: the fastest of
                           triton_serial, fi_serial, fa2_serial at the point) per batch composition (x),
                           backend (hue), one panel per model with its own compositions: the paper's
                           attention figures; p20–p80 bars, noisy rows hatched hollow
  speedup_fi_pod_<sweep>   the same against FlashInfer's POD kernel (which is never drawn against itself)
  speedup_heatmap_<sweep>  every backend x batch composition ('ref': the fastest serial path's own cell)
  roofline                 prefill TFLOP/s and decode GB/s per backend against the measured ceilings, and
                           the utilisation plane of hybrid batches (where there are any): a serial
                           schedule cannot pass the line compute share + bandwidth share = 1, overlap can
  kernels                  the kernel benchmark: prefill kernels in TFLOP/s, decode kernels in GB/s
  the paper's evaluation figures (analysis.paper_figures) and the serving figures
  (analysis.serving_figures), where their rows exist
Tables (Markdown + CSV): speedup_summary (per backend, per model, per sweep), speedup_balanced (the
paper sweep's and the paper grid's points that pass the 20% filter, pooled), speedups (per point),
excluded (rows left out of speed-ups and why), status_counts, kernels_prefill_tflops,
kernels_decode_gbps, the paper figures' and the serving figures' tables; summary.md gathers them.
"""
from __future__ import annotations

import argparse
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from analysis import dispatch_evidence, paper_figures, serving_figures
from analysis.load import Results, load_results
from analysis.overlap_bound import overlap_bound
from analysis.output import gpu_title, save, slug, to_markdown, write_table
from analysis.speedup import (KERNEL_SWEEPS, OUR_FUSED_BACKENDS, POD_BASELINE, attention_speedups,
                              kernel_rows, kernel_tables, ordered_compositions, serial_label, status_counts,
                              summarize)
from analysis.versions import load_versions, version_table

__all__ = ["build_all", "build_tables", "FIGURE_BUILDERS", "save", "to_markdown", "write_table"]

# Measured on our H100 SXM (bf16 dense matmul, large square GEMM; device-to-device copy), used when
# the results carry no `ceilings` table of their own.
DEFAULT_CEILINGS = {"tflops": 800.0, "gbps": 3000.0, "source": "H100 measured defaults"}
# Other GPUs' measured defaults, by the provenance `gpu` name (the H200's: `python -m experiments.ceilings`
# on an H200; no results/h200/ceilings.csv is committed yet, which would take precedence).
GPU_CEILINGS = {"NVIDIA H200": {"tflops": 701.0, "gbps": 4272.0, "source": "H200 measured defaults"}}
# Sweeps drawn by analysis.paper_figures' own figures, not as bars per batch composition (the paper grid
# has hundreds of compositions); their rows still enter the summary tables.
OWN_FIGURE_SWEEPS = {"paper_grid", "per_chunk", "policy", "ctas_per_sm", "hopper_split"}
# Backends not drawn in the speed-up figures (the fp32 reference is a checker, not a contender).
HIDDEN_BACKENDS = {"reference"}
# The speed-up bar figures show these (those present), as the paper's figures show FA_Streams,
# FI_Batched and POD against the serial baseline, plus the one-launch paths a Hopper user would pick
# (FlashAttention's varlen forward, vLLM's unified kernel); the heat map beside them shows every backend.
HEADLINE_BACKENDS = ("fa2_streams", "fi_batched", "fi_pod", "fi_batch_pod", "fa_varlen", "vllm_unified",
                     *OUR_FUSED_BACKENDS)
# The balanced-points table pools these sweeps' points that pass the paper's 20% filter.
BALANCED_SWEEPS = ("paper", "paper_grid")
# The kernel benchmark: on a pure prefill (decode) point the serial baselines run only their prefill
# (decode) kernel, so fi_serial is FlashInfer's kernel and fa2_serial FA2's.
KERNEL_BACKENDS = {
    "prefill": {"triton_prefill": "ours (triton_prefill)", "fi_serial": "FlashInfer (fi_serial)",
                "fa2_serial": "FA2 (fa2_serial)"},
    "decode": {"triton_decode": "ours (triton_decode)", "fi_serial": "FlashInfer (fi_serial)",
               "fa2_serial": "FA2 (fa2_serial)"},
}
COMPOSITION_AXIS = "batch composition: prefill chunk@context + decodes×context (tokens)"
ROOT = Path(__file__).resolve().parents[1]


# -- helpers -------------------------------------------------------------------------------------------
def shown_path(path: Path, out: Path) -> str:
    """How a written table names a folder: relative to the repository when inside it (as typed in a
    checkout, e.g. results/h100), else relative to the table's own folder; never absolute, so a
    rebuild from another checkout or working directory writes the same bytes."""
    path = Path(path).resolve()
    try:
        return path.relative_to(ROOT).as_posix()
    except ValueError:
        return Path(os.path.relpath(path, Path(out).resolve())).as_posix()


def ceilings_for(results: Results, gpu: str) -> dict:
    """Measured ceilings of `gpu` from the results' ceilings table (best measurement of that GPU, or of
    rows naming no GPU), else the documented defaults."""
    c = results.ceilings
    rows = c[(c["gpu"] == gpu) | (c["gpu"] == "")] if not c.empty else c
    if not rows.empty:
        tflops, gbps = rows["tflops"].max(), rows["gbps"].max()
        if pd.notna(tflops) or pd.notna(gbps):
            return {"tflops": float(tflops) if pd.notna(tflops) else DEFAULT_CEILINGS["tflops"],
                    "gbps": float(gbps) if pd.notna(gbps) else DEFAULT_CEILINGS["gbps"],
                    "source": "measured (ceilings table)"}
    return dict(GPU_CEILINGS.get(gpu, DEFAULT_CEILINGS))


def hybrid_sweeps(sp: pd.DataFrame) -> pd.DataFrame:
    """The speed-up rows of every sweep but the kernel benchmarks (KERNEL_SWEEPS: pure prefill / pure
    decode points, reported as TFLOP/s and GB/s tables, not as hybrid-batch speed-ups)."""
    return sp[~sp["sweep"].isin(KERNEL_SWEEPS)]


def balanced_rows(sp: pd.DataFrame) -> pd.DataFrame:
    """The speed-up rows of the BALANCED_SWEEPS at the points that pass the paper's 20% filter
    (analysis.paper_figures.balanced_points: our triton_prefill and triton_decode halves each >= 20%
    of their sum), pooled."""
    d = sp[sp["sweep"].isin(BALANCED_SWEEPS)]
    if d.empty:
        return d
    key = ["run", "point_id"]
    bal = paper_figures.balanced_points(d)
    return d.merge(bal.loc[bal["balanced"], key], on=key)


# -- shared drawing ------------------------------------------------------------------------------------
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p")
# A backend with fewer clean points than this gets no box (a box of one or two points says nothing).
MIN_BOX_POINTS = 5


def backend_styles(backends) -> dict[str, tuple[tuple, str]]:
    """{backend: (colour, marker)}: a colour and a marker shape of its own for each backend, so that
    backends with close values (pod, pod_paper, triton_serial) stay apart where their points overlap."""
    backends = list(backends)
    colors = sns.color_palette("tab10" if len(backends) <= 10 else "tab20", n_colors=len(backends))
    return {b: (tuple(colors[i]), MARKERS[i % len(MARKERS)]) for i, b in enumerate(backends)}


def _noisy_bar_handle():
    return plt.Rectangle((0, 0), 1, 1, facecolor=(1, 1, 1, 0), edgecolor="0.3", hatch="///",
                         label=f"hatched hollow: noisy (p80/p20 > {paper_figures.NOISE_SPREAD_LIMIT:g}), "
                               "not a clean number")


def _grouped_bars(ax, rows: pd.DataFrame, x: str, hue: str, value: str, order: list[str],
                  hue_order: list[str], colors: dict) -> None:
    """Bars of `value` per `x` (categories in `order`) and `hue`, the median over runs, error bars from
    the rows' `lo`..`hi` (their p20..p80 bounds); a noisy row (`noisy`) is a hollow hatched bar, never a
    clean one."""
    agg = rows.groupby([x, hue]).agg(v=(value, "median"), lo=("lo", "median"), hi=("hi", "median"),
                                     noisy=("noisy", "any")).reset_index()
    width = min(0.8 / max(1, len(hue_order)), 0.4)
    pos = {lab: i for i, lab in enumerate(order)}
    for k, h in enumerate(hue_order):
        g = agg[agg[hue] == h]
        xs = g[x].map(pos).to_numpy(dtype=float) + (k - (len(hue_order) - 1) / 2) * width
        face = [(1, 1, 1, 0) if n else colors[h] for n in g["noisy"]]
        bars = ax.bar(xs, g["v"], width, color=face, edgecolor=colors[h], label=h, linewidth=1)
        for bar, noisy in zip(bars, g["noisy"]):
            if noisy:
                bar.set_hatch("///")
        ax.errorbar(xs, g["v"], yerr=np.vstack([(g["v"] - g["lo"]).clip(lower=0), (g["hi"] - g["v"]).clip(lower=0)]),
                    fmt="none", ecolor="0.2", capsize=2, lw=0.8)
    ax.set_xticks(range(len(order)), order)
    ax.set_xlim(-0.6, len(order) - 0.4)


def _rotate_xticks(ax, rotation: float) -> None:
    ax.tick_params(axis="x", rotation=rotation)
    for t in ax.get_xticklabels():
        t.set_horizontalalignment("right")
        t.set_rotation_mode("anchor")


# -- speed-up figures (the paper's attention figures) ------------------------------------------------
def speedup_rows(sp: pd.DataFrame, reference: str, keep_reference: bool = False) -> pd.DataFrame:
    """The rows a speed-up figure draws against `reference` ("serial": the fastest serial path at each
    point, else a backend, e.g. fi_pod): usable rows with a speed-up, with `reference_backend`,
    `speedup`, its bounds `lo` .. `hi` from both rows' p20 and p80 (reference p20 / own p80 .. reference
    p80 / own p20), `noisy` (the row or its reference row is noisy) and `is_reference` (the row is its
    point's reference). No row compares a backend with itself: the reference's own rows are left out
    unless keep_reference (the heat map marks them)."""
    col = "speedup_vs_serial" if reference == "serial" else "speedup_vs_fi_pod"
    if reference not in ("serial", POD_BASELINE):
        raise ValueError(f"reference={reference!r}: 'serial' or {POD_BASELINE!r}")
    flagged = paper_figures.flag_noisy(sp)
    key = ["run", "point_id"]
    d = flagged[flagged[col].notna() & ~flagged["backend"].isin(HIDDEN_BACKENDS)]
    d = d.assign(reference_backend=d["best_serial_backend"] if reference == "serial" else POD_BASELINE)
    d = d.assign(is_reference=(d["backend"] == d["reference_backend"]).fillna(False).astype(bool))
    if not keep_reference:
        d = d[~d["is_reference"]]
    ref = (flagged[flagged["usable"]].sort_values("median_ms", kind="stable")
           .drop_duplicates(key + ["backend"])[key + ["backend", "p20_ms", "p80_ms", "noisy"]]
           .rename(columns={"backend": "reference_backend", "p20_ms": "ref_p20_ms", "p80_ms": "ref_p80_ms",
                            "noisy": "ref_noisy"}))
    d = d.merge(ref, on=key + ["reference_backend"], how="left")
    return d.assign(speedup=d[col], lo=d["ref_p20_ms"] / d["p80_ms"], hi=d["ref_p80_ms"] / d["p20_ms"],
                    noisy=d["noisy"] | d["ref_noisy"].fillna(False).astype(bool))


def _panels(d: pd.DataFrame) -> pd.DataFrame:
    """`panel`: the model, and the point's KV layout when the rows have both."""
    two_layouts = d["point_layout"].nunique() > 1
    return d.assign(panel=d["model"] + (", " + d["point_layout"] + " KV" if two_layouts else ""))


def fig_speedups(sp: pd.DataFrame, out: Path, reference: str) -> list[Path]:
    """One figure per (sweep, gpu): bars of the speed-up over `reference` ("serial" | "fi_pod") per batch
    composition, hue backend (HEADLINE_BACKENDS when two or more ran), one panel per model (and KV layout)
    with its own compositions on its own x axis, every bar as wide as in the other panels; p20–p80 bars,
    noisy rows hatched hollow; the reference itself is never drawn."""
    rows = speedup_rows(sp, reference)
    if reference == "serial":
        ylabel = f"speed-up over the fastest serial path (×)\n[{serial_label(sp['backend'])}]"
    else:
        ylabel = f"speed-up over {POD_BASELINE} (×)"
    headline = [b for b in HEADLINE_BACKENDS if b in set(rows["backend"])]
    if len(headline) >= 2:
        rows = rows[rows["backend"].isin(headline)]
    paths = []
    gpu_split = rows["gpu"].nunique() > 1
    for (sweep, gpu), d in rows.groupby(["sweep", "gpu"], sort=True):
        d = _panels(d)
        panels = sorted(d["panel"].unique())
        backends = [b for b in headline if b in set(d["backend"])] or sorted(d["backend"].unique())
        colors = {b: c for b, (c, _) in backend_styles(backends).items()}
        orders = {p: ordered_compositions(d[d["panel"] == p]) for p in panels}
        slots = max(len(o) for o in orders.values())
        fig = plt.figure(figsize=(max(6.0, 0.11 * slots * len(backends) + 2.5), 4.3 * len(panels) + 0.6))
        grid = fig.add_gridspec(len(panels), slots)
        top = float(np.nanmax(d[["speedup", "hi"]].to_numpy(dtype=float)))
        for i, panel in enumerate(panels):
            ax = fig.add_subplot(grid[i, :max(len(orders[panel]), min(slots, 3))])
            _grouped_bars(ax, d[d["panel"] == panel], "composition", "backend", "speedup", orders[panel],
                          backends, colors)
            ax.axhline(1.0, color="black", lw=1, ls="--")
            ax.set_ylim(0, max(top, 1.0) * 1.08)
            ax.set_title(panel, fontsize=10)
            ax.set_ylabel(ylabel)
            ax.set_xlabel("batch composition" if i == len(panels) - 1 else "")
            _rotate_xticks(ax, 60)
        handles = [plt.Rectangle((0, 0), 1, 1, color=colors[b], label=b) for b in backends]
        handles += [_noisy_bar_handle()] if d["noisy"].any() else []
        handles += [plt.Line2D([], [], color="0.2", marker="|", ls="none", ms=10,
                               label="error bar: p20–p80 of both rows"),
                    plt.Line2D([], [], color="black", ls="--", lw=1, label="1× (as fast as the reference)")]
        fig.suptitle(gpu_title(f"Attention speed-up, sweep '{sweep}'", [gpu])
                     + f"\nx: {COMPOSITION_AXIS.split(': ')[1]}")
        fig.tight_layout()
        fig.legend(handles=handles, title="backend", loc="upper left", bbox_to_anchor=(1.0, 0.95), fontsize=8)
        name = f"speedup_{'serial' if reference == 'serial' else slug(POD_BASELINE)}_{slug(sweep)}"
        paths += save(fig, out, name + (f"_{slug(gpu)}" if gpu_split else ""))
    return paths


def _cell_labels(values: pd.DataFrame, noisy: pd.DataFrame) -> np.ndarray:
    """Heat-map cell texts: the value to 2 decimals, '?' after a noisy one, '' where there is none."""
    v, n = values.to_numpy(dtype=float), noisy.to_numpy(dtype=bool)
    return np.array([["" if math.isnan(a) else f"{a:.2f}" + ("?" if b else "") for a, b in zip(ra, rb)]
                     for ra, rb in zip(v, n)], dtype=object)


def fig_speedup_heatmap(sp: pd.DataFrame, out: Path) -> list[Path]:
    """One heat map per (sweep, gpu): every backend (rows) x batch composition (columns), the speed-up
    over the fastest serial path in each cell (red slower, blue faster); one panel per model. The
    fastest serial path's own cell reads 'ref' (never a comparison with itself); the subtitle explains
    only the marks the figure has."""
    rows = speedup_rows(sp, "serial", keep_reference=True)
    paths = []
    gpu_split = rows["gpu"].nunique() > 1
    for (sweep, gpu), d in rows.groupby(["sweep", "gpu"], sort=True):
        order = ordered_compositions(d)
        d = _panels(d).assign(value=lambda x: x["speedup"].where(~x["is_reference"]),
                              noisy_value=lambda x: x["noisy"] & ~x["is_reference"])
        panels = sorted(d["panel"].unique())
        backends = sorted(d["backend"].unique())
        lim = float(np.nanmax(np.abs(np.log2(d["value"])))) if d["value"].notna().any() else 0.0
        lim = lim or 1.0
        marks = set()
        fig, axes = plt.subplots(len(panels), 1, squeeze=False,
                                 figsize=(max(6.0, 0.62 * len(order) + 3), 0.32 * len(backends) * len(panels)
                                          + 1.6 * len(panels) + 1))
        for ax, panel in zip(axes[:, 0], panels):
            g = d[d["panel"] == panel]

            def cells(values, how):
                t = g.pivot_table(index="backend", columns="composition", values=values, aggfunc=how)
                return t.reindex(index=backends, columns=[c for c in order if c in set(g["composition"])])
            t = cells("value", "median")
            ref = cells("is_reference", "min").astype(float).fillna(0).astype(bool)   # every row of it is the reference
            nz = cells("noisy_value", "max").astype(float).fillna(0).astype(bool)
            keep = t.notna().any(axis=1) | ref.any(axis=1)
            t, ref, nz = t[keep], ref[keep], nz[keep]
            marks |= {"ref"} if ref.to_numpy().any() else set()
            marks |= {"blank"} if (t.isna() & ~ref).to_numpy().any() else set()
            marks |= {"?"} if nz.to_numpy().any() else set()
            with warnings.catch_warnings():  # seaborn 0.13 calls matplotlib's deprecated set_bad
                warnings.simplefilter("ignore", PendingDeprecationWarning)
                sns.heatmap(np.log2(t), ax=ax, cmap="RdBu", center=0, vmin=-lim, vmax=lim,
                            annot=_cell_labels(t, nz), fmt="", annot_kws={"fontsize": 7}, linewidths=0.4,
                            cbar_kws={"label": "speed-up (×)"})
            for i, j in zip(*np.nonzero(ref.to_numpy())):   # seaborn writes nothing in an empty cell
                ax.add_patch(plt.Rectangle((j, i), 1, 1, facecolor="0.9", edgecolor="white", lw=0.4))
                ax.text(j + 0.5, i + 0.5, "ref", ha="center", va="center", fontsize=7, color="0.35")
            ax.grid(False)
            ticks = [x for x in (0.25, 0.5, 0.67, 1, 1.5, 2, 4) if abs(np.log2(x)) <= lim]
            ax.collections[0].colorbar.set_ticks(np.log2(ticks), labels=[f"{x:g}×" for x in ticks])
            ax.set_title(panel, fontsize=10)
            ax.set_xlabel(COMPOSITION_AXIS)
            ax.set_ylabel("backend")
            _rotate_xticks(ax, 60)
            ax.tick_params(axis="y", rotation=0)
        notes = {"ref": "'ref': that backend is the fastest serial path at the point (not compared with itself)",
                 "blank": "blank: no usable row",
                 "?": f"'?': noisy (p80/p20 > {paper_figures.NOISE_SPREAD_LIMIT:g}), not a clean number"}
        fig.suptitle(gpu_title(f"Speed-up over the fastest serial path ({serial_label(sp['backend'])}), "
                               f"every backend, sweep '{sweep}'", [gpu])
                     + "".join(f"\n{notes[m]}" for m in notes if m in marks))
        fig.tight_layout(rect=(0, 0, 1, 0.98))
        paths += save(fig, out, f"speedup_heatmap_{slug(sweep)}" + (f"_{slug(gpu)}" if gpu_split else ""))
    return paths


# -- roofline view ---------------------------------------------------------------------------------------
def _rate_bounds(rows: pd.DataFrame, value: str) -> pd.DataFrame:
    """`lo` .. `hi`: the rate (tflops | gbps) at the row's p80 and p20 times (work / p80 .. work / p20),
    and `noisy` (paper_figures.flag_noisy)."""
    work, scale = ("prefill_flops", 1e12) if value == "tflops" else ("decode_bytes", 1e9)
    rows = paper_figures.flag_noisy(rows)
    return rows.assign(lo=rows[work] / (rows["p80_ms"] * 1e-3) / scale,
                       hi=rows[work] / (rows["p20_ms"] * 1e-3) / scale)


def _rate_strips(ax, rows: pd.DataFrame, value: str, order: list[str], styles: dict) -> None:
    """Per backend (x category, in `order`): each point's rate spread evenly across its category with a
    p20–p80 bar, filled when clean, hollow with a dashed bar when noisy (and then not in the box); a box
    of the clean points only where there are MIN_BOX_POINTS or more."""
    rows = _rate_bounds(rows, value)
    for i, b in enumerate(order):
        g = rows[rows["backend"] == b].sort_values(["model", "composition_order", "run"], kind="stable")
        color, marker = styles[b]
        clean = g.loc[~g["noisy"], value].to_numpy(dtype=float)
        if len(clean) >= MIN_BOX_POINTS:
            ax.boxplot(clean, positions=[i], widths=0.7, showfliers=False, patch_artist=True, zorder=1,
                       boxprops=dict(facecolor="0.93", edgecolor="0.55"), medianprops=dict(color="0.4"),
                       whiskerprops=dict(color="0.55"), capprops=dict(color="0.55"))
        xs = i + (np.linspace(-0.28, 0.28, len(g)) if len(g) > 1 else np.zeros(len(g)))
        for noisy in (False, True):
            m = (g["noisy"] == noisy).to_numpy()
            if not m.any():
                continue
            v = g[value].to_numpy(dtype=float)[m]
            yerr = np.vstack([(v - g["lo"].to_numpy(dtype=float)[m]).clip(min=0),
                              (g["hi"].to_numpy(dtype=float)[m] - v).clip(min=0)])
            eb = ax.errorbar(xs[m], v, yerr=yerr, fmt=marker, ms=4.5, color=color, mec=color,
                             mfc="none" if noisy else color, ecolor=color, elinewidth=0.8, capsize=1.5,
                             ls="none", zorder=3, alpha=0.9)
            if noisy:
                for bar in eb[2]:
                    bar.set_linestyle("--")
    ax.set_xticks(range(len(order)), order)
    ax.set_xlim(-0.6, len(order) - 0.4)


def fig_roofline(sp: pd.DataFrame, results: Results, out: Path) -> list[Path]:
    """Left, middle: each backend's prefill TFLOP/s on pure prefill points and decode GB/s on pure
    decode points (the kernels' own rates; every point with that part when the results have no pure
    points) against the measured ceilings. Right: hybrid points in the utilisation plane, x = prefill
    FLOPs / batch time / compute ceiling, y = decode bytes / batch time / bandwidth ceiling. Run one
    after the other, each part at best at its own ceiling, the two shares add up to at most 1 (the
    dashed line); only overlapping prefill and decode passes it. Each backend has its own colour and
    marker in every panel; one legend, outside the panels."""
    ok = sp[sp["usable"] & ~sp["backend"].isin(HIDDEN_BACKENDS)]
    pure_pre, pure_dec = kernel_rows(ok)
    paths = []
    gpus = sorted(ok["gpu"].unique())
    for gpu in gpus:
        d = ok[ok["gpu"] == gpu]
        ceil = ceilings_for(results, gpu)
        pre, dec = pure_pre[pure_pre["gpu"] == gpu], pure_dec[pure_dec["gpu"] == gpu]
        pre_note = dec_note = "pure points"
        if pre.empty:
            pre, pre_note = d[(d["num_prefill"] > 0) & d["tflops"].notna()], "all points"
        if dec.empty:
            dec, dec_note = d[(d["num_decode"] > 0) & d["gbps"].notna()], "all points"
        hyb = d[(d["num_prefill"] > 0) & (d["num_decode"] > 0) & d["tflops"].notna() & d["gbps"].notna()]
        if pre.empty and dec.empty:
            continue
        backends = sorted(set(pre["backend"]) | set(dec["backend"]) | set(hyb["backend"]))
        styles = backend_styles(backends)
        noisy_seen = False
        fig, axes = (plt.subplots(1, 3, figsize=(18, 5.5), gridspec_kw={"width_ratios": [1, 1, 1.15]})
                     if not hyb.empty else plt.subplots(1, 2, figsize=(12, 5.5)))
        for ax, rows, value, ceiling, unit, what, note in (
                (axes[0], pre, "tflops", ceil["tflops"], "TFLOP/s", "prefill", pre_note),
                (axes[1], dec, "gbps", ceil["gbps"], "GB/s", "decode", dec_note)):
            if rows.empty:
                ax.set_axis_off()
                ax.text(0.5, 0.5, f"no {what} rows", ha="center", transform=ax.transAxes)
                continue
            order = [b for b in backends if b in set(rows["backend"])]
            _rate_strips(ax, rows, value, order, styles)
            noisy_seen |= bool(paper_figures.flag_noisy(rows)["noisy"].any())
            ax.axhline(ceiling, color="crimson", ls="--", lw=1.2)
            ax.text(0.01, ceiling, f" ceiling {ceiling:.0f} {unit}: {ceil['source']}", color="crimson",
                    va="bottom", ha="left", fontsize=8, transform=ax.get_yaxis_transform())
            ax.set_ylim(0, max(ceiling, float(_rate_bounds(rows, value)["hi"].max())) * 1.12)
            ax.set_xlabel("backend")
            ax.set_ylabel(f"achieved {what} {unit}\n({what} {'FLOPs' if value == 'tflops' else 'bytes'}"
                          " / batch time; bars p20–p80)")
            n = rows.groupby("backend")["point_id"].nunique()
            ax.set_title(f"{what}, {note} ({n.min()}–{n.max()} per backend)" if n.min() != n.max()
                         else f"{what}, {note} ({n.min()} per backend)", fontsize=10)
            _rotate_xticks(ax, 40)
            ax.secondary_yaxis("right", functions=(lambda y, c=ceiling: 100 * y / c,
                                                   lambda p, c=ceiling: p * c / 100)).set_ylabel("% of ceiling")
        if not hyb.empty:   # (no hybrid rows: no third panel)
            ax = axes[2]
            u = paper_figures.flag_noisy(hyb.assign(compute_share=hyb["tflops"] / ceil["tflops"],
                                                    bandwidth_share=hyb["gbps"] / ceil["gbps"]))
            noisy_seen |= bool(u["noisy"].any())
            for b in [b for b in backends if b in set(u["backend"])]:
                g = u[u["backend"] == b]
                color, marker = styles[b]
                for noisy, part in g.groupby("noisy"):
                    ax.scatter(part["compute_share"], part["bandwidth_share"], s=26, marker=marker,
                               facecolors="none" if noisy else [color], edgecolors=[color], linewidths=0.8,
                               alpha=0.85)
            lim = max(1.05, float(u[["compute_share", "bandwidth_share"]].max().max()) * 1.05)
            ax.plot([0, 1], [1, 0], color="black", ls="--", lw=1)
            ax.set_xlim(0, lim)
            ax.set_ylim(0, lim)
            ax.set_xlabel("prefill TFLOP/s ÷ compute ceiling")
            ax.set_ylabel("decode GB/s ÷ bandwidth ceiling")
            ax.set_title("hybrid points: overlap passes the serial bound", fontsize=10)
        handles = [plt.Line2D([], [], color=styles[b][0], marker=styles[b][1], ls="none", ms=6, label=b)
                   for b in backends]
        if noisy_seen:
            handles.append(plt.Line2D([], [], color="0.3", marker="o", mfc="none", ls="none", ms=6,
                                      label=f"hollow: noisy (p80/p20 > {paper_figures.NOISE_SPREAD_LIMIT:g}), "
                                            "not in the box"))
        handles.append(plt.Line2D([], [], color="crimson", ls="--", lw=1.2, label="measured ceiling"))
        if not hyb.empty:
            handles.append(plt.Line2D([], [], color="black", ls="--", lw=1, label="serial bound (sum = 1)"))
        fig.suptitle(gpu_title("Roofline view: achieved throughput vs measured ceilings", [gpu])
                     + f"\nbox: the clean points of a backend with {MIN_BOX_POINTS} or more")
        fig.tight_layout()
        fig.legend(handles=handles, title="backend", fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 0.92))
        paths += save(fig, out, "roofline" + (f"_{slug(gpu)}" if len(gpus) > 1 else ""))
    return paths


# -- kernel benchmark ----------------------------------------------------------------------------------
def fig_kernels(sp: pd.DataFrame, out: Path) -> list[Path]:
    """Prefill kernels in TFLOP/s and decode kernels in GB/s per pure point (analysis.speedup.kernel_rows),
    ours, FlashInfer's and FA2's side by side, p20–p80 bars, noisy rows hatched hollow."""
    pre, dec = kernel_rows(sp)
    paths = []
    gpus = sorted(set(pre["gpu"]) | set(dec["gpu"]))
    for gpu in gpus:
        p, d = pre[pre["gpu"] == gpu], dec[dec["gpu"] == gpu]
        panels = [(rows, value, unit, what) for rows, value, unit, what in
                  ((p, "tflops", "TFLOP/s", "prefill"), (d, "gbps", "GB/s", "decode")) if not rows.empty]
        xlabels = {"prefill": "prefill batch: model, chunk@context (tokens)",
                   "decode": "decode batch: model, decodes×context (tokens)"}
        if not panels:
            continue
        fig, axes = plt.subplots(len(panels), 1, figsize=(12, 4.2 * len(panels)), squeeze=False)
        for ax, (rows, value, unit, what) in zip(axes[:, 0], panels):
            names = KERNEL_BACKENDS[what]
            if rows["backend"].isin(list(names)).any():
                rows = rows[rows["backend"].isin(list(names))]
            rows = _rate_bounds(rows, value).assign(label=rows["model"].astype(str) + " " + rows["composition"],
                                                    kernel=rows["backend"].map(lambda b: names.get(b, b)))
            hue_order = [names[b] for b in names if b in set(rows["backend"])] or sorted(rows["kernel"].unique())
            order = list(dict.fromkeys(rows.sort_values(["model", "composition_order"])["label"]))
            colors = dict(zip(hue_order, sns.color_palette(n_colors=len(hue_order))))
            _grouped_bars(ax, rows, "label", "kernel", value, order, hue_order, colors)
            sweeps = [s for s in KERNEL_SWEEPS if s in set(rows["sweep"])]
            ax.set_xlabel(xlabels[what])
            ax.set_ylabel(f"{what} {unit} (bars: p20–p80)")
            ax.set_title(f"{what} kernels ({unit})" + (f", sweeps {' + '.join(sweeps)} at the same points"
                                                        if len(sweeps) > 1 else "")
                         + f"; hatched hollow bar: noisy, p80/p20 > {paper_figures.NOISE_SPREAD_LIMIT:g}, "
                         "not a clean number", fontsize=10)
            _rotate_xticks(ax, 45)
            ax.legend(title="kernel", fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        fig.suptitle(gpu_title("Kernel benchmark", [gpu]))
        fig.tight_layout()
        paths += save(fig, out, "kernels" + (f"_{slug(gpu)}" if len(gpus) > 1 else ""))
    return paths


# -- everything ----------------------------------------------------------------------------------------
@dataclass
class Inputs:
    """What the figure builders draw from: the loaded results, their speed-up rows (None without
    attention rows) and the output folder."""
    results: Results
    sp: pd.DataFrame | None
    out: Path

    @property
    def bars(self) -> pd.DataFrame:
        """Speed-up rows drawn per batch composition: hybrid sweeps but those with figures of their own."""
        bars = hybrid_sweeps(self.sp)
        return bars[~bars["sweep"].isin(OWN_FIGURE_SWEEPS)]


def _attention(draw: Callable[[Inputs], dict[str, list[Path]]]) -> Callable[[Inputs], dict[str, list[Path]]]:
    """A builder of attention figures: nothing without attention rows."""
    return lambda i: {} if i.sp is None else draw(i)


# The one list of figure builders, in drawing order: name -> builder(inputs) -> {figure: [PNG, PDF]}.
# Each draws only where its rows exist (the paper's evaluation figures where their sweeps ran, the
# serving figures where GPU-timed serving rows are).
FIGURE_BUILDERS: dict[str, Callable[[Inputs], dict[str, list[Path]]]] = {
    "speedup_serial": _attention(lambda i: {"speedup_serial": fig_speedups(i.bars, i.out, "serial")}),
    "speedup_fi_pod": _attention(lambda i: {"speedup_fi_pod": fig_speedups(i.bars, i.out, POD_BASELINE)}),
    "speedup_heatmap": _attention(lambda i: {"speedup_heatmap": fig_speedup_heatmap(i.bars, i.out)}),
    "roofline": _attention(lambda i: {"roofline": fig_roofline(i.sp, i.results, i.out)}),
    "kernels": _attention(lambda i: {"kernels": fig_kernels(i.sp, i.out)}),
    "paper": _attention(lambda i: paper_figures.figures(i.sp, i.out)),
    "serving": lambda i: serving_figures.figures(i.results.serving, i.out),
}


def build_tables(results: Results, sp: pd.DataFrame | None = None) -> dict[str, pd.DataFrame]:
    """Every summary table from the results (no files written): the attention speed-ups, the paper
    figures' and the serving figures' tables."""
    tables: dict[str, pd.DataFrame] = {}
    if not results.attention.empty:
        sp = attention_speedups(results.attention) if sp is None else sp
        hybrid = hybrid_sweeps(sp)
        tables["speedup_summary"] = summarize(hybrid, ["backend"])
        tables["speedup_by_model"] = summarize(hybrid, ["model", "backend"])
        tables["speedup_by_sweep"] = summarize(hybrid, ["sweep", "backend"])
        balanced = balanced_rows(sp)
        if not balanced.empty:
            tables["speedup_balanced"] = summarize(balanced, ["backend"])
        tables["status_counts"] = status_counts(sp)
        cols = ["run", "sweep", "gpu", "model", "batch", "backend", "status", "median_ms",
                "best_serial_backend", "best_serial_ms", "speedup_vs_serial", "fi_pod_ms",
                "speedup_vs_fi_pod", "prefill_err", "decode_err", "excluded"]
        tables["speedups"] = sp[cols]
        tables["excluded"] = sp.loc[~sp["usable"], ["run", "sweep", "model", "batch", "backend", "status",
                                                    "reason", "prefill_err", "decode_err", "excluded"]]
        pre, dec = kernel_tables(sp)
        tables["kernels_prefill_tflops"] = pre
        tables["kernels_decode_gbps"] = dec
        tables.update(paper_figures.tables(sp))
        tables.update(dispatch_evidence.tables(sp))
        bound = overlap_bound(sp, BALANCED_SWEEPS)
        if not bound.empty:
            tables["overlap_bound"] = bound
    tables.update(serving_figures.tables(results.serving))
    if results.root.is_dir() and not results.attention.empty:
        other = load_versions(results.root)
        if not other.empty:
            tables["baseline_versions"] = version_table(results.attention, other)
    return tables


SECTION_TITLES = {
    "speedup_summary": "Speed-up per backend (geomean / max / min over compared points)",
    "speedup_by_model": "Speed-up per model and backend",
    "speedup_by_sweep": "Speed-up per sweep and backend",
    "speedup_balanced": (f"Speed-up on balanced points (sweeps {' + '.join(BALANCED_SWEEPS)} pooled; our "
                         f"triton_prefill and triton_decode halves each >= "
                         f"{paper_figures.BALANCE_MIN_SHARE:.0%} of their sum)"),
    "status_counts": "Rows per backend and status",
    "kernels_prefill_tflops": "Kernel benchmark: prefill TFLOP/s",
    "kernels_decode_gbps": "Kernel benchmark: decode GB/s",
    **paper_figures.SECTION_TITLES,
    "fused_vs_serial": ("The Hopper rule's evidence: pod_sm90 over triton_serial (same run) by the rule's "
                        "estimated share and decode time (analysis/dispatch_evidence.py)"),
    "dispatch_rule": ("The Hopper rule applied to measured rows (pod_sm90 where it fuses, triton_serial where "
                      "not) over the fastest serial path, beside the better of the two at each point"),
    "overlap_bound": ("How far fusion can go at these points: the fastest serial path over the longer of our two "
                      "halves alone (a perfectly overlapped launch), beside each fused backend's speed-up and its "
                      "share of that bound (analysis/overlap_bound.py)"),
    **serving_figures.SECTION_TITLES,
    "baseline_versions": ("A baseline at another release (results/<gpu>/versions/<label>/) against the pinned "
                          "one, same points: pinned ms / other ms"),
}


def build_all(results_path: str | Path = "results", out: str | Path = "results/figures") -> dict[str, list[Path]]:
    """Rebuild every figure and table from the results under `results_path` into `out`: each builder
    of FIGURE_BUILDERS, each table of build_tables, and summary.md. Returns {name: [paths written]}
    (tables as "table:<name>"); empty when there are no results."""
    results = load_results(results_path)
    out = Path(out)
    if results.empty:
        return {}
    inputs = Inputs(results, attention_speedups(results.attention) if not results.attention.empty else None, out)
    written: dict[str, list[Path]] = {}
    for build in FIGURE_BUILDERS.values():
        written.update(build(inputs))
    tables = build_tables(results, inputs.sp)
    for name, t in tables.items():
        written[f"table:{name}"] = write_table(t, out, name)
    gpus = results.gpus()
    lines = [f"# Results summary — {', '.join(gpus) or 'GPU unknown'}\n",
             f"Built by `python -m analysis.figures` from `{shown_path(results.root, out)}`. Speed-ups compare rows of one run "
             "and point; rows not ok, not meaningfully timed, or with max relative error above the "
             "tolerance are excluded (see excluded.csv) but counted.\n"]
    for name, title in SECTION_TITLES.items():
        if name in tables and not tables[name].empty:
            lines += [f"## {title}\n", to_markdown(tables[name])]
    summary = out / "summary.md"
    summary.write_text("\n".join(lines))
    written["summary"] = [summary]
    return {k: v for k, v in written.items() if v}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", default="results", help="folder (or file) of result tables")
    ap.add_argument("--out", default="results/figures", help="where figures and tables go")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    written = build_all(args.results, args.out)
    if not written:
        print(f"No result tables under {args.results!r}: nothing to plot. "
              "Run `make reproduce` on a GPU machine to produce them.")
        return 0
    n_fig = sum(len(v) for k, v in written.items() if not k.startswith("table:") and k != "summary") // 2
    print(f"Wrote {n_fig} figures (PNG + PDF) and {sum(k.startswith('table:') for k in written)} tables "
          f"(CSV + Markdown) to {args.out}/; summary: {written['summary'][0]}")
    for name, paths in written.items():
        print(f"  {name}: {', '.join(p.name for p in paths)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
