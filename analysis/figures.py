"""Every figure and summary table, rebuilt from the result tables: the one entry point.

    python -m analysis.figures [--results results/h100] [--out results/figures]

`make figures`, `make reproduce` (experiments/reproduce.py) and the notebook all draw through
`build_all`, which runs every builder of FIGURE_BUILDERS (each draws only where its rows exist) and
writes every table of `build_tables`, then summary.md.

Figures (PNG + PDF each, the GPU name from the provenance columns in every title):
  speedup_serial_<sweep>   speed-up over the fastest serial path (analysis.speedup: the fastest of
                           triton_serial, fi_serial, fa2_serial at the point) per batch composition (x),
                           backend (hue), model (panels): the paper's attention figures
  speedup_fi_pod_<sweep>   the same against FlashInfer's POD kernel
  speedup_heatmap_<sweep>  every backend x batch composition
  roofline                 prefill TFLOP/s and decode GB/s per backend against the measured ceilings, and
                           the utilisation plane of hybrid batches: a serial schedule cannot pass the
                           line compute share + bandwidth share = 1, overlap can
  kernels                  the kernel benchmark: prefill kernels in TFLOP/s, decode kernels in GB/s
  the paper's evaluation figures (analysis.paper_figures) and the serving figures
  (analysis.serving_figures), where their rows exist
Tables (Markdown + CSV): speedup_summary (per backend, per model, per sweep), speedups (per point),
excluded (rows left out of speed-ups and why), status_counts, kernels_prefill_tflops,
kernels_decode_gbps, the paper figures' and the serving figures' tables; summary.md gathers them.
"""
from __future__ import annotations

import argparse
import contextlib
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

from analysis import paper_figures, serving_figures
from analysis.load import Results, load_results
from analysis.output import gpu_title, save, slug, to_markdown, write_table
from analysis.speedup import (OUR_FUSED_BACKENDS, POD_BASELINE, attention_speedups, kernel_rows,
                              kernel_tables, ordered_compositions, serial_label, status_counts, summarize)

__all__ = ["build_all", "build_tables", "FIGURE_BUILDERS", "save", "to_markdown", "write_table"]

# Measured on our H100 SXM (bf16 dense matmul, large square GEMM; device-to-device copy), used when
# the results carry no `ceilings` table of their own.
DEFAULT_CEILINGS = {"tflops": 800.0, "gbps": 3000.0, "source": "H100 measured defaults"}
# Other GPUs' measured defaults, by the provenance `gpu` name (the H200's: `python -m experiments.ceilings`
# on an H200; no results/h200/ceilings.csv is committed yet, which would take precedence).
GPU_CEILINGS = {"NVIDIA H200": {"tflops": 701.0, "gbps": 4272.0, "source": "H200 measured defaults"}}
# Sweeps whose points are pure prefill / pure decode kernel benchmarks: reported as TFLOP/s and GB/s
# tables, not as hybrid-batch speed-ups.
KERNEL_SWEEPS = {"kernels", "hopper_prefill"}
# Sweeps drawn by analysis.paper_figures' own figures, not as bars per batch composition (the paper grid
# has hundreds of compositions); their rows still enter the summary tables.
OWN_FIGURE_SWEEPS = {"paper_grid", "per_chunk", "policy", "ctas_per_sm"}
# Backends not drawn in the speed-up figures (the fp32 reference is a checker, not a contender).
HIDDEN_BACKENDS = {"reference"}
# The speed-up bar figures show these (those present), as the paper's figures show FA_Streams,
# FI_Batched and POD against the serial baseline; the heat map beside them shows every backend.
HEADLINE_BACKENDS = ("fa2_streams", "fi_batched", "fi_pod", "fi_batch_pod", *OUR_FUSED_BACKENDS)
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
JITTER_SEED = 0   # the roofline's strip plots jitter points: seeded, so a rebuild is the same bytes


# -- helpers -------------------------------------------------------------------------------------------
@contextlib.contextmanager
def seeded_jitter(seed: int = JITTER_SEED):
    """seaborn's strip plots jitter points with numpy's global generator: seed it for the plot, and
    give the caller's generator state back afterwards."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


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
    """The speed-up rows of every sweep but the kernel benchmarks."""
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


# -- speed-up figures (the paper's attention figures) ------------------------------------------------
def _cell_labels(values: pd.DataFrame, noisy: pd.DataFrame) -> np.ndarray:
    """Heat-map cell texts: the value to 2 decimals, '?' after a noisy one, '' where there is none."""
    v, n = values.to_numpy(dtype=float), noisy.to_numpy(dtype=bool)
    return np.array([["" if math.isnan(a) else f"{a:.2f}" + ("?" if b else "") for a, b in zip(ra, rb)]
                     for ra, rb in zip(v, n)], dtype=object)


def _with_speedup_noise(sp: pd.DataFrame, data: pd.DataFrame) -> pd.DataFrame:
    """`speedup_noisy`: the row or its best-serial row is noisy (p80/p20 over the limit)."""
    noisy = paper_figures.flag_noisy(sp)[["run", "point_id", "backend", "noisy"]]
    base = noisy.rename(columns={"backend": "best_serial_backend", "noisy": "_base_noisy"})
    d = data.merge(noisy, on=["run", "point_id", "backend"], how="left", suffixes=("", "_n"))
    d = d.merge(base, on=["run", "point_id", "best_serial_backend"], how="left")
    flag = d["noisy_n" if "noisy_n" in d else "noisy"].fillna(False).astype(bool) | d["_base_noisy"].fillna(False).astype(bool)
    return d.assign(speedup_noisy=flag).drop(columns=[c for c in ("noisy_n", "_base_noisy") if c in d])


def fig_speedups(sp: pd.DataFrame, out: Path, reference: str) -> list[Path]:
    """One figure per (sweep, gpu): bars of the speed-up per batch composition, hue backend, facet model
    (rows: KV layout when a sweep has both)."""
    col = "speedup_vs_serial" if reference == "serial" else "speedup_vs_fi_pod"
    ylabel = (f"speed-up over the fastest serial path (×)\n[{serial_label(sp['backend'])}]" if reference == "serial"
              else f"speed-up over {POD_BASELINE} (×)")
    data = sp[sp[col].notna() & ~sp["backend"].isin(HIDDEN_BACKENDS)]
    headline = [b for b in HEADLINE_BACKENDS if b in set(data["backend"])]
    if len(headline) >= 2:
        data = data[data["backend"].isin(headline)]
    paths = []
    gpu_split = data["gpu"].nunique() > 1
    for (sweep, gpu), d in data.groupby(["sweep", "gpu"], sort=True):
        order = ordered_compositions(d)
        backends = [b for b in headline if b in set(d["backend"])] or sorted(d["backend"].unique())
        layout = "point_layout" if d["point_layout"].nunique() > 1 else None
        width = max(4.0, 0.09 * len(order) * len(backends) + 1.5)
        # Models side by side while that stays readable, else stacked (long sweeps).
        facets = (dict(col="model", row=layout) if width * d["model"].nunique() <= 16
                  else dict(row="model", col=layout))
        g = sns.catplot(data=d, kind="bar", x="composition", y=col, hue="backend", hue_order=backends,
                        order=order, errorbar=None, height=3.6, aspect=width / 3.6, sharex=True,
                        legend_out=True, **facets)
        for ax in g.axes.flat:
            ax.axhline(1.0, color="black", lw=1, ls="--")
            ax.tick_params(axis="x", rotation=60)
            for t in ax.get_xticklabels():
                t.set_horizontalalignment("right")
        g.set_axis_labels("batch composition", ylabel)
        g.set_titles(row_template="{row_name}", col_template="{col_name}")
        g.figure.suptitle(gpu_title(f"Attention speed-up, sweep '{sweep}'", [gpu])
                          + f"\nx: {COMPOSITION_AXIS.split(': ')[1]}", y=1.1)
        name = f"speedup_{'serial' if reference == 'serial' else slug(POD_BASELINE)}_{slug(sweep)}"
        paths += save(g.figure, out, name + (f"_{slug(gpu)}" if gpu_split else ""))
    return paths


def fig_speedup_heatmap(sp: pd.DataFrame, out: Path) -> list[Path]:
    """One heat map per (sweep, gpu): every backend (rows) x batch composition (columns), the speed-up
    over the best serial baseline in each cell (red slower, blue faster); one panel per model."""
    data = sp[sp["speedup_vs_serial"].notna() & ~sp["backend"].isin(HIDDEN_BACKENDS)]
    # No cell compares a backend with itself: the best serial baseline's own cell at a point stays blank.
    data = data.assign(speedup_vs_serial=data["speedup_vs_serial"].where(
        data["backend"] != data["best_serial_backend"]))
    data = _with_speedup_noise(sp, data[data["speedup_vs_serial"].notna()])
    paths = []
    gpu_split = data["gpu"].nunique() > 1
    for (sweep, gpu), d in data.groupby(["sweep", "gpu"], sort=True):
        order = ordered_compositions(d)
        two_layouts = d["point_layout"].nunique() > 1
        d = d.assign(panel=d["model"] + (" " + d["point_layout"] + " KV" if two_layouts else ""))
        panels = sorted(d["panel"].unique())
        backends = sorted(d["backend"].unique())
        lim = float(np.nanmax(np.abs(np.log2(d["speedup_vs_serial"])))) or 1.0
        fig, axes = plt.subplots(len(panels), 1, squeeze=False,
                                 figsize=(max(6.0, 0.62 * len(order) + 3), 0.32 * len(backends) * len(panels)
                                          + 1.6 * len(panels) + 1))
        for ax, panel in zip(axes[:, 0], panels):
            t = d[d["panel"] == panel].pivot_table(index="backend", columns="composition",
                                                    values="speedup_vs_serial", aggfunc="median")
            t = t.reindex(index=backends, columns=[c for c in order if c in t.columns])
            t = t.dropna(how="all")   # a baseline that is the best serial everywhere has no row
            nz = (d[d["panel"] == panel].pivot_table(index="backend", columns="composition",
                                                     values="speedup_noisy", aggfunc="max")
                  .reindex(index=t.index, columns=t.columns).fillna(0).astype(bool))
            with warnings.catch_warnings():  # seaborn 0.13 calls matplotlib's deprecated set_bad
                warnings.simplefilter("ignore", PendingDeprecationWarning)
                sns.heatmap(np.log2(t), ax=ax, cmap="RdBu", center=0, vmin=-lim, vmax=lim,
                            annot=_cell_labels(t, nz), fmt="",
                            annot_kws={"fontsize": 7}, linewidths=0.4,
                            cbar_kws={"label": "speed-up (×)"})
            ax.grid(False)
            ticks = [x for x in (0.25, 0.5, 0.67, 1, 1.5, 2, 4) if abs(np.log2(x)) <= lim]
            ax.collections[0].colorbar.set_ticks(np.log2(ticks), labels=[f"{x:g}×" for x in ticks])
            ax.set_title(panel, fontsize=10)
            ax.set_xlabel(COMPOSITION_AXIS)
            ax.set_ylabel("backend")
            ax.tick_params(axis="x", rotation=60)
            ax.tick_params(axis="y", rotation=0)
            for lab in ax.get_xticklabels():
                lab.set_horizontalalignment("right")
        fig.suptitle(gpu_title(f"Speed-up over the fastest serial path ({serial_label(d['backend'])}), "
                               f"every backend, sweep '{sweep}'", [gpu])
                     + f"\nblank: the best serial baseline itself; '?': noisy (p80/p20 > "
                       f"{paper_figures.NOISE_SPREAD_LIMIT:g}), not a clean number")
        fig.tight_layout(rect=(0, 0, 1, 0.98))
        paths += save(fig, out, f"speedup_heatmap_{slug(sweep)}" + (f"_{slug(gpu)}" if gpu_split else ""))
    return paths


# -- roofline view ---------------------------------------------------------------------------------------
def fig_roofline(sp: pd.DataFrame, results: Results, out: Path) -> list[Path]:
    """Left, middle: each backend's prefill TFLOP/s on pure prefill points and decode GB/s on pure
    decode points (the kernels' own rates; every point with that part when the results have no pure
    points) against the measured ceilings. Right: hybrid points in the utilisation plane, x = prefill
    FLOPs / batch time / compute ceiling, y = decode bytes / batch time / bandwidth ceiling. Run one
    after the other, each part at best at its own ceiling, the two shares add up to at most 1 (the
    dashed line); only overlapping prefill and decode passes it."""
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
        backends = sorted(d["backend"].unique())
        palette = dict(zip(backends, sns.color_palette("tab20" if len(backends) > 10 else None,
                                                       n_colors=len(backends))))
        fig, axes = plt.subplots(1, 3, figsize=(18, 5.5), gridspec_kw={"width_ratios": [1, 1, 1.15]})
        for ax, rows, value, ceiling, unit, what, note in (
                (axes[0], pre, "tflops", ceil["tflops"], "TFLOP/s", "prefill", pre_note),
                (axes[1], dec, "gbps", ceil["gbps"], "GB/s", "decode", dec_note)):
            if rows.empty:
                ax.set_axis_off()
                ax.text(0.5, 0.5, f"no {what} rows", ha="center", transform=ax.transAxes)
                continue
            order = [b for b in backends if b in set(rows["backend"])]
            flagged = paper_figures.flag_noisy(rows)
            clean, noisy = flagged[~flagged["noisy"]], flagged[flagged["noisy"]]
            with warnings.catch_warnings():  # seaborn 0.13 passes matplotlib's deprecated `vert`
                warnings.simplefilter("ignore", DeprecationWarning)
                sns.boxplot(data=clean, x="backend", y=value, order=order, ax=ax, color="0.92",
                            showfliers=False)
            with seeded_jitter():
                sns.stripplot(data=clean, x="backend", y=value, order=order, hue="backend",
                              palette=palette, ax=ax, size=4, alpha=0.8, legend=False)
            if len(noisy):   # noisy rows: hollow, beside their backend's strip, not in the box
                xs = noisy["backend"].map({b: i for i, b in enumerate(order)}).to_numpy(dtype=float) + 0.3
                ax.scatter(xs, noisy[value], s=22, facecolors="none", edgecolors="crimson", linewidths=1,
                           label=f"noisy (p80/p20 > {paper_figures.NOISE_SPREAD_LIMIT:g})")
                ax.legend(fontsize=7, loc="lower right")
            ax.axhline(ceiling, color="crimson", ls="--", lw=1.2)
            ax.text(0.01, ceiling, f" ceiling {ceiling:.0f} {unit} ({ceil['source']})", color="crimson",
                    va="bottom", ha="left", fontsize=8, transform=ax.get_yaxis_transform())
            ax.set_ylim(0, max(ceiling, float(rows[value].max())) * 1.12)
            ax.set_xlabel("backend")
            ax.set_ylabel(f"achieved {what} {unit}\n({what} {'FLOPs' if value == 'tflops' else 'bytes'}"
                          " / batch time)")
            ax.set_title(f"{what}, {note}", fontsize=10)
            ax.tick_params(axis="x", rotation=50)
            for lab in ax.get_xticklabels():
                lab.set_horizontalalignment("right")
            sec = ax.secondary_yaxis("right", functions=(lambda y, c=ceiling: 100 * y / c,
                                                         lambda p, c=ceiling: p * c / 100))
            sec.set_ylabel("% of ceiling")
        ax = axes[2]
        if hyb.empty:
            ax.set_axis_off()
            ax.text(0.5, 0.5, "no hybrid rows", ha="center", transform=ax.transAxes)
        else:
            u = paper_figures.flag_noisy(hyb.assign(compute_share=hyb["tflops"] / ceil["tflops"],
                                                    bandwidth_share=hyb["gbps"] / ceil["gbps"]))
            sns.scatterplot(data=u[~u["noisy"]], x="compute_share", y="bandwidth_share", hue="backend",
                            hue_order=[b for b in backends if b in set(u["backend"])], palette=palette,
                            ax=ax, s=22, alpha=0.8)
            if u["noisy"].any():
                ax.scatter(u.loc[u["noisy"], "compute_share"], u.loc[u["noisy"], "bandwidth_share"], s=22,
                           facecolors="none", edgecolors="crimson",
                           label=f"noisy (p80/p20 > {paper_figures.NOISE_SPREAD_LIMIT:g})")
            lim = max(1.05, float(u[["compute_share", "bandwidth_share"]].max().max()) * 1.05)
            ax.plot([0, 1], [1, 0], color="black", ls="--", lw=1, label="serial bound (sum = 1)")
            ax.set_xlim(0, lim)
            ax.set_ylim(0, lim)
            ax.set_xlabel("prefill TFLOP/s ÷ compute ceiling")
            ax.set_ylabel("decode GB/s ÷ bandwidth ceiling")
            ax.set_title("hybrid points: overlap passes the serial bound", fontsize=10)
            ax.legend(title="backend", fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
        fig.suptitle(gpu_title("Roofline view: achieved throughput vs measured ceilings", [gpu]))
        fig.tight_layout()
        paths += save(fig, out, "roofline" + (f"_{slug(gpu)}" if len(gpus) > 1 else ""))
    return paths


# -- kernel benchmark ----------------------------------------------------------------------------------
def _rate_bars(ax, rows: pd.DataFrame, value: str, order: list[str], hue_order: list[str]) -> None:
    """Grouped bars of a rate (tflops | gbps) per label and kernel, the median over runs; error bars
    from the rows' p80 and p20 times (work / p80 .. work / p20); a noisy row (paper_figures.flag_noisy)
    is a hollow hatched bar, never a clean one."""
    work, scale = ("prefill_flops", 1e12) if value == "tflops" else ("decode_bytes", 1e9)
    rows = paper_figures.flag_noisy(rows)
    rows = rows.assign(lo=rows[work] / (rows["p80_ms"] * 1e-3) / scale,
                       hi=rows[work] / (rows["p20_ms"] * 1e-3) / scale)
    agg = rows.groupby(["label", "kernel"]).agg(v=(value, "median"), lo=("lo", "median"), hi=("hi", "median"),
                                                noisy=("noisy", "any")).reset_index()
    colors = dict(zip(hue_order, sns.color_palette(n_colors=len(hue_order))))
    width = min(0.8 / max(1, len(hue_order)), 0.4)
    pos = {lab: i for i, lab in enumerate(order)}
    for k, kernel in enumerate(hue_order):
        g = agg[agg["kernel"] == kernel]
        x = g["label"].map(pos).to_numpy(dtype=float) + (k - (len(hue_order) - 1) / 2) * width
        face = [(1, 1, 1, 0) if n else colors[kernel] for n in g["noisy"]]
        bars = ax.bar(x, g["v"], width, color=face, edgecolor=colors[kernel], label=kernel, linewidth=1)
        for bar, noisy in zip(bars, g["noisy"]):
            if noisy:
                bar.set_hatch("///")
        ax.errorbar(x, g["v"], yerr=np.vstack([(g["v"] - g["lo"]).clip(lower=0), (g["hi"] - g["v"]).clip(lower=0)]),
                    fmt="none", ecolor="0.2", capsize=2, lw=0.8)
    ax.set_xticks(range(len(order)), order)
    ax.set_xlim(-0.6, len(order) - 0.4)


def fig_kernels(sp: pd.DataFrame, out: Path) -> list[Path]:
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
            rows = rows.assign(label=rows["model"].astype(str) + " " + rows["composition"],
                               kernel=rows["backend"].map(lambda b: names.get(b, b)))
            hue_order = [names[b] for b in names if b in set(rows["backend"])] or sorted(rows["kernel"].unique())
            order = list(dict.fromkeys(rows.sort_values(["model", "composition_order"])["label"]))
            _rate_bars(ax, rows, value, order, hue_order)
            ax.set_xlabel(xlabels[what])
            ax.set_ylabel(f"{what} {unit} (bars: p20–p80)")
            ax.set_title(f"{what} kernels ({unit}); hatched hollow bar: noisy, p80/p20 > "
                         f"{paper_figures.NOISE_SPREAD_LIMIT:g}, not a clean number", fontsize=10)
            ax.tick_params(axis="x", rotation=45)
            for t in ax.get_xticklabels():
                t.set_horizontalalignment("right")
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
    tables.update(serving_figures.tables(results.serving))
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
    **serving_figures.SECTION_TITLES,
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
