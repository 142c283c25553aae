"""The paper's evaluation figures (its Fig. 11 grid, per-chunk time, role policy, CTAs per SM, and our Hopper
prefill per KV layout) and the rules that make a figure trustworthy.

Figures (PNG + PDF), each drawn only when its sweep's rows exist (so a results folder without them, e.g.
the committed H100 one, gets nothing new):
  paper_grid_violin     speed-up over fa2_serial (the paper's baseline, not the fastest serial path the
                        other figures use) per backend on the paper grid (sweep `paper_grid`), as the
                        paper's Fig. 11 violins, max and mean written on the figure; two panels: every
                        point, and the points that pass the 20% filter (`balanced_points`)
  per_chunk             attention time of each chunk of a 16K prompt (sweep `per_chunk`), per backend,
                        one panel per decode batch
  policy                50:50 vs proportional role policy (sweep `policy`): time per decode batch, per model
  ctas_per_sm           the 2 vs 4 CTAs-per-SM heat map (sweep `ctas_per_sm`): time(2) / time(4) per cell
  hopper_prefill        prefill TFLOP/s per point and kernel (sweep `hopper_prefill`), one panel per KV
                        layout, each point compared with FlashInfer on the point's own layout
  hopper_split          the Hopper POD kernel's knob, its SM split (sweep `hopper_split`): pod_sm90's time
                        against the decode CTAs it was forced to, the planner's own split marked, the serial
                        paths as lines; one panel per point
Tables (CSV + Markdown): paper_grid_speedup, paper_grid_balance, per_chunk, policy, ctas_per_sm,
hopper_prefill_tflops, hopper_split, and noisy_points (every noisy row of any sweep, also those of analysis.figures'
own figures).

Trust rules, in every figure here:
  * times and rates carry error bars from the row's p20 and p80 (rates: work / p80 .. work / p20);
  * a row whose p80 / p20 exceeds NOISE_SPREAD_LIMIT is *noisy*: drawn hollow (violins: a hollow marker
    beside the violin, which is drawn from clean points only), written with a "?" in heat-map cells, and
    listed in the noisy_points table; it is never drawn as a clean number. Re-measure it (rerun the sweep
    after deleting its row) to get it back;
  * no panel compares a backend with itself: the reference of a speed-up is left out of that panel.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from analysis.output import save
from analysis.speedup import fmt_tokens

# A row whose p80 / p20 time exceeds this is noisy (flagged, never plotted as a clean number).
NOISE_SPREAD_LIMIT = 1.25
# The paper's filter: keep a point when prefill and decode each take at least this share of the serial
# time (our triton_prefill time + our triton_decode time at the point).
BALANCE_MIN_SHARE = 0.20
# The paper grid's violins compare with the paper's own baseline, FA2 serial, not with the fastest serial
# path every other figure and table uses (analysis.speedup.SERIAL_BACKENDS), so they read as the paper's.
PAPER_GRID_REFERENCE = "fa2_serial"
# Backends left out of the violins: the reference itself, the checker, and the halves (one part each).
PAPER_GRID_HIDDEN = {PAPER_GRID_REFERENCE, "reference", "triton_prefill", "triton_decode"}
PREFILL_PART, DECODE_PART = "triton_prefill", "triton_decode"


# -- trust ---------------------------------------------------------------------------------------------
def flag_noisy(df: pd.DataFrame, limit: float = NOISE_SPREAD_LIMIT) -> pd.DataFrame:
    """Adds `spread` (p80_ms / p20_ms) and `noisy` (spread > limit, or a timed row without p20/p80)."""
    df = df.copy()
    p20 = pd.to_numeric(df["p20_ms"], errors="coerce")
    p80 = pd.to_numeric(df["p80_ms"], errors="coerce")
    df["spread"] = p80 / p20
    timed = pd.to_numeric(df["median_ms"], errors="coerce").notna()
    df["noisy"] = (timed & ~(df["spread"] <= limit)).astype(bool)
    return df


def noisy_table(sp: pd.DataFrame) -> pd.DataFrame:
    """Every ok, meaningfully timed row whose p80/p20 exceeds the limit, in any sweep: the rows every
    figure flags (drawn hollow or marked, never as a clean number)."""
    d = flag_noisy(_timed(sp))
    d = with_labels(d[d["noisy"]])
    cols = ["sweep", "gpu", "model", "batch", "label", "median_ms", "p20_ms", "p80_ms", "spread"]
    return d[cols].rename(columns={"label": "backend"}).sort_values(["sweep", "model", "batch", "backend"]) \
        .reset_index(drop=True)


def pod_config_of(options) -> str:
    """The `pod_config` in a row's options JSON ("" when it has none)."""
    try:
        return str(json.loads(options).get("pod_config", ""))
    except (TypeError, ValueError, AttributeError):
        return ""


def prefill_config_of(options) -> str:
    try:
        return str(json.loads(options).get("prefill_config", ""))
    except (TypeError, ValueError, AttributeError):
        return ""


def forced_decode_ctas_of(options) -> int:
    """The pod_sm90_decode_ctas in a row's options JSON (0: the planner's split, or none given)."""
    try:
        return int(json.loads(options).get("pod_sm90_decode_ctas", 0) or 0)
    except (TypeError, ValueError, AttributeError):
        return 0


def label_of(row) -> str:
    """A backend's name in figures: `pod` with a named pod_config says which (pod[policy_5050]), `pod_sm90`
    with a forced SM split how many decode CTAs (pod_sm90[48 decode CTAs])."""
    opts = row["options"] if "options" in row else None
    cfg = pod_config_of(opts) if opts is not None else ""
    if row["backend"] == "pod" and cfg and cfg != "dispatcher":
        return f"pod[{cfg}]"
    if row["backend"] == "pod_sm90" and opts is not None and forced_decode_ctas_of(opts):
        return f"pod_sm90[{forced_decode_ctas_of(opts)} decode CTAs]"
    return str(row["backend"])


def with_labels(df: pd.DataFrame) -> pd.DataFrame:
    df = df.copy()
    df["label"] = [label_of(r) for _, r in df.iterrows()] if len(df) else pd.Series(dtype="object")
    return df


def _errorbar_points(ax, d: pd.DataFrame, x: str, y: str, lo: str, hi: str, hue_order: list[str],
                     palette: dict, x_order: list | None = None, dodge: float = 0.0, line: bool = False):
    """Each hue's points at x (categorical when x_order is given, then dodged), error bars lo..hi, clean
    points filled, noisy points hollow with a dashed bar. Returns the legend handles."""
    handles = []
    n = len(hue_order)
    for k, h in enumerate(hue_order):
        g = d[d["label"] == h]
        if g.empty:
            continue
        if x_order is not None:
            pos = {v: i for i, v in enumerate(x_order)}
            xs = g[x].map(pos).astype(float) + (k - (n - 1) / 2) * dodge
        else:
            xs = g[x].astype(float)
        g = g.assign(_x=xs.to_numpy()).sort_values("_x")
        color = palette[h]
        if line:   # broken at noisy points: no clean line runs through a noisy number
            ax.plot(g["_x"], g[y].where(~g["noisy"]), color=color, lw=1, alpha=0.6)
        for noisy, part in g.groupby("noisy"):
            yerr = np.vstack([(part[y] - part[lo]).clip(lower=0), (part[hi] - part[y]).clip(lower=0)])
            eb = ax.errorbar(part["_x"], part[y], yerr=yerr, fmt="o", ms=4.5, capsize=2, lw=1,
                             color=color, mfc="none" if noisy else color, mec=color,
                             ls="none", label=None)
            if noisy:
                for bar in eb[2]:
                    bar.set_linestyle("--")
        handles.append(plt.Line2D([], [], color=color, marker="o", ls="-" if line else "none", label=h))
    return handles


def _noisy_handle(limit: float = NOISE_SPREAD_LIMIT):
    return plt.Line2D([], [], color="0.3", marker="o", mfc="none", ls="none",
                      label=f"hollow: noisy (p80/p20 > {limit:g})")


def _time_bounds(df: pd.DataFrame) -> pd.DataFrame:
    return df.assign(lo_ms=df["p20_ms"], hi_ms=df["p80_ms"])


def _timed(df: pd.DataFrame) -> pd.DataFrame:
    """Rows usable for a time: ok, meaningfully timed, output right (flag_rows' exclusions but the
    'does not compute' one, which a time of one part does not need)."""
    if df.empty:
        return df
    bad_err = df["err_flagged"] if "err_flagged" in df else False
    ok = ((df["status"] == "ok") & df["timing_meaningful"].astype(bool)
          & (pd.to_numeric(df["median_ms"], errors="coerce") > 0) & ~bad_err)
    return df[ok]


# -- the paper grid (item 2) ----------------------------------------------------------------------------
def balanced_points(sp: pd.DataFrame, min_share: float = BALANCE_MIN_SHARE) -> pd.DataFrame:
    """Per (run, point): our prefill half's and decode half's times (triton_prefill, triton_decode rows),
    the prefill share of their sum (the serial time) and `balanced` = both shares >= min_share. A point
    missing either half (not measured, failed, or noisy) is not balanced, and says why in `why`."""
    key = ["run", "point_id"]
    parts = flag_noisy(_timed(sp[sp["backend"].isin([PREFILL_PART, DECODE_PART])]))
    points = sp[key].drop_duplicates()
    out = points.copy()
    for backend, col in ((PREFILL_PART, "prefill_ms"), (DECODE_PART, "decode_ms")):
        p = parts[parts["backend"] == backend].groupby(key).agg(**{col: ("median_ms", "min"),
                                                                   col + "_noisy": ("noisy", "any")})
        out = out.merge(p.reset_index(), on=key, how="left")
    serial = out["prefill_ms"] + out["decode_ms"]
    out["serial_ms"] = serial
    out["prefill_share"] = out["prefill_ms"] / serial
    share_ok = (out["prefill_share"] >= min_share) & (1 - out["prefill_share"] >= min_share)
    noisy = out["prefill_ms_noisy"].fillna(False).astype(bool) | out["decode_ms_noisy"].fillna(False).astype(bool)
    out["balanced"] = (share_ok & ~noisy).fillna(False).astype(bool)
    why = np.where(out["prefill_ms"].isna(), f"no {PREFILL_PART} time",
                   np.where(out["decode_ms"].isna(), f"no {DECODE_PART} time",
                            np.where(noisy, "a half is noisy",
                                     np.where(share_ok, "", f"a part under {min_share:.0%} of serial"))))
    out["why"] = why
    return out.drop(columns=["prefill_ms_noisy", "decode_ms_noisy"])


def paper_grid_speedups(sp: pd.DataFrame) -> pd.DataFrame:
    """Rows of the paper grid with `speedup_vs_fa2` (fa2_serial time / backend time, one run and point),
    `noisy` (the row or its fa2_serial row) and `balanced` (the point passes the 20% filter)."""
    d = flag_noisy(sp[sp["sweep"] == "paper_grid"])
    if d.empty:
        return d
    key = ["run", "point_id"]
    ref = d[d["usable"] & (d["backend"] == PAPER_GRID_REFERENCE)].groupby(key).agg(
        ref_ms=("median_ms", "min"), ref_noisy=("noisy", "any")).reset_index()
    d = d.merge(ref, on=key, how="left").merge(balanced_points(d)[key + ["balanced"]], on=key, how="left")
    d["speedup_vs_fa2"] = d["ref_ms"] / d["median_ms"].where(d["usable"])
    d["noisy"] = d["noisy"] | d["ref_noisy"].fillna(False).astype(bool)
    d["balanced"] = d["balanced"].fillna(False).astype(bool)
    return with_labels(d)


def paper_grid_table(d: pd.DataFrame) -> pd.DataFrame:
    """Per point set (all / filtered) and backend: points compared, mean / max / min / geomean speed-up
    over fa2_serial over the clean points, and how many were left out as noisy."""
    rows = []
    s = d[d["speedup_vs_fa2"].notna() & ~d["backend"].isin(PAPER_GRID_HIDDEN)]
    for subset, part in (("all points", s), ("filtered (20% rule)", s[s["balanced"]])):
        for label, g in part.groupby("label", sort=True):
            clean = g.loc[~g["noisy"], "speedup_vs_fa2"]
            rows.append(dict(points=subset, backend=label, compared=len(clean), noisy=int(g["noisy"].sum()),
                             mean=clean.mean() if len(clean) else np.nan,
                             max=clean.max() if len(clean) else np.nan,
                             min=clean.min() if len(clean) else np.nan,
                             geomean=float(np.exp(np.log(clean).mean())) if len(clean) else np.nan))
    return pd.DataFrame(rows, columns=["points", "backend", "compared", "noisy", "mean", "max", "min",
                                       "geomean"])


def fig_paper_violin(d: pd.DataFrame, out: Path) -> list[Path]:
    s = d[d["speedup_vs_fa2"].notna() & ~d["backend"].isin(PAPER_GRID_HIDDEN)]
    if s.empty:
        return []
    order = sorted(s["label"].unique())
    gpus = sorted(g for g in s["gpu"].unique() if g)
    fig, axes = plt.subplots(2, 1, figsize=(max(6.0, 1.1 * len(order) + 2), 9), sharey=True)
    subsets = (("all points", s),
               (f"filtered: prefill and decode each >= {BALANCE_MIN_SHARE:.0%} of serial "
                f"({PREFILL_PART} + {DECODE_PART})", s[s["balanced"]]))
    for ax, (title, part) in zip(axes, subsets):
        clean = part[~part["noisy"]]
        n_points = part["point_id"].nunique()
        if clean.empty:
            ax.text(0.5, 0.5, "no clean points", ha="center", transform=ax.transAxes)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", (DeprecationWarning, FutureWarning))
                sns.violinplot(data=clean, x="label", y="speedup_vs_fa2", order=order, ax=ax, cut=0,
                               inner="quartile", color="0.85", density_norm="width")
        for i, label in enumerate(order):
            g = clean[clean["label"] == label]["speedup_vs_fa2"]
            if len(g):
                ax.annotate(f"max {g.max():.2f}×\nmean {g.mean():.2f}×", (i, 1.0), xycoords=("data", "axes fraction"),
                            xytext=(0, 2), textcoords="offset points", ha="center", va="bottom", fontsize=7)
            nz = part[(part["label"] == label) & part["noisy"]]["speedup_vs_fa2"]
            if len(nz):
                ax.plot([i + 0.3] * len(nz), nz, "o", mfc="none", mec="crimson", ms=4)
        ax.axhline(1.0, color="black", lw=1, ls="--")
        ax.set_xlabel("backend")
        ax.set_ylabel(f"speed-up over {PAPER_GRID_REFERENCE} (×)")
        ax.set_title(f"{title} — {n_points} points", fontsize=9, pad=24)
        ax.tick_params(axis="x", rotation=30)
    axes[0].legend(handles=[plt.Line2D([], [], color="crimson", marker="o", mfc="none", ls="none",
                                       label=f"noisy, not in the violin (p80/p20 > {NOISE_SPREAD_LIMIT:g})")],
                   loc="lower right", fontsize=7)
    fig.suptitle(f"Paper grid: attention speed-up over {PAPER_GRID_REFERENCE} — {', '.join(gpus) or 'GPU unknown'}\n"
                 f"{PAPER_GRID_REFERENCE} is the paper's baseline, kept here as the paper drew it; the other "
                 f"figures and tables compare with the fastest serial path", fontsize=10)
    fig.tight_layout()
    return save(fig, out, "paper_grid_violin")


# -- item 3: per chunk, policy, CTAs per SM ------------------------------------------------------------
def _palette(labels) -> dict:
    labels = list(labels)
    return dict(zip(labels, sns.color_palette("tab20" if len(labels) > 10 else "tab10", n_colors=len(labels))))


def _gpu(d: pd.DataFrame) -> str:
    gpus = sorted(g for g in d["gpu"].unique() if g)
    return ", ".join(gpus) or "GPU unknown"


def per_chunk_rows(sp: pd.DataFrame) -> pd.DataFrame:
    d = _timed(sp[sp["sweep"] == "per_chunk"])
    d = d[d["usable"] | d["backend"].isin([PREFILL_PART, DECODE_PART])]
    if d.empty:
        return d
    d = with_labels(_time_bounds(flag_noisy(d)))
    d["chunk_index"] = (d["prefill_context_len"] // d["chunk_len"]).astype(int)
    return d


def fig_per_chunk(d: pd.DataFrame, out: Path) -> list[Path]:
    if d.empty:
        return []
    batches = sorted(d["num_decode"].unique())
    labels = sorted(d["label"].unique())
    pal = _palette(labels)
    fig, axes = plt.subplots(1, len(batches), figsize=(6.5 * len(batches), 4.5), sharey=True, squeeze=False)
    for ax, nd in zip(axes[0], batches):
        g = d[d["num_decode"] == nd]
        handles = _errorbar_points(ax, g, "chunk_index", "median_ms", "lo_ms", "hi_ms", labels, pal, line=True)
        ctx = fmt_tokens(g["decode_context_len"].iloc[0])
        ax.set_title(f"{g['model'].iloc[0]}, {int(nd)} decodes × {ctx}", fontsize=10)
        ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
        ax.set_xlabel(f"chunk index (chunk {int(g['chunk_len'].iloc[0])} over index × chunk of context)")
        # log: the batched baselines run 5-15x the others, which a linear axis would squash into one band
        ax.set_yscale("log")
        ax.set_ylabel("attention time (ms, log), p20–p80 bars")
    axes[0, -1].legend(handles=handles + [_noisy_handle()], fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.suptitle(f"Per-chunk attention time across a prompt — {_gpu(d)}")
    fig.tight_layout()
    return save(fig, out, "per_chunk")


def knob_rows(sp: pd.DataFrame, sweep: str) -> pd.DataFrame:
    """Usable `pod` rows of a knob sweep, labelled by their pod_config, with time bounds and noise."""
    d = _timed(sp[(sp["sweep"] == sweep) & sp["usable"]])
    if d.empty:
        return d
    d = with_labels(_time_bounds(flag_noisy(d)))
    return d


def fig_policy(d: pd.DataFrame, out: Path) -> list[Path]:
    if d.empty:
        return []
    models = sorted(d["model"].unique())
    labels = sorted(d["label"].unique())
    pal = _palette(labels)
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4.2), squeeze=False)
    for ax, model in zip(axes[0], models):
        g = d[d["model"] == model]
        order = sorted(g["num_decode"].unique())
        handles = _errorbar_points(ax, g, "num_decode", "median_ms", "lo_ms", "hi_ms", labels, pal,
                                   x_order=order, dodge=0.15)
        ax.set_xticks(range(len(order)), [str(int(v)) for v in order])
        r = g.iloc[0]
        ax.set_title(f"{model}: {fmt_tokens(r['chunk_len'])}@{fmt_tokens(r['prefill_context_len'])} + "
                     f"decodes × {fmt_tokens(r['decode_context_len'])}", fontsize=10)
        ax.set_xlabel("decode batch")
        ax.set_ylabel("attention time (ms), p20–p80 bars")
    axes[0, -1].legend(handles=handles + [_noisy_handle()], fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.suptitle(f"Role policy: 50:50 vs proportional — {_gpu(d)}")
    fig.tight_layout()
    return save(fig, out, "policy")


def knob_table(d: pd.DataFrame, index: list[str]) -> pd.DataFrame:
    """One row per point, one median_ms column per config, `noisy` naming the noisy configs."""
    if d.empty:
        return pd.DataFrame(columns=index)
    t = d.pivot_table(index=index, columns="label", values="median_ms", aggfunc="min")
    nz = d[d["noisy"]].groupby(index)["label"].agg(lambda s: ", ".join(sorted(s)))
    t = t.join(nz.rename("noisy")).reset_index().rename_axis(columns=None)
    t["noisy"] = t["noisy"].fillna("")
    return t


def ctas_table(d: pd.DataFrame) -> pd.DataFrame:
    """Per (model, context, decode batch): time with 2 and with 4 CTAs per SM, `ratio_2_over_4`
    (> 1: 4 CTAs per SM is faster) and `noisy` (either time noisy). Empty without both configs."""
    if d.empty:
        return pd.DataFrame()
    labels = sorted(d["label"].unique())
    two = next((lab for lab in labels if lab.endswith("ctas_2]")), None)
    four = next((lab for lab in labels if lab.endswith("ctas_4]")), None)
    if two is None or four is None:
        return pd.DataFrame()
    index = ["model", "decode_context_len", "num_decode"]
    a = d[d["label"] == two].groupby(index).agg(ms_2=("median_ms", "min"), noisy_2=("noisy", "any"))
    b = d[d["label"] == four].groupby(index).agg(ms_4=("median_ms", "min"), noisy_4=("noisy", "any"))
    t = a.join(b, how="inner").reset_index()
    t[["decode_context_len", "num_decode"]] = t[["decode_context_len", "num_decode"]].astype(int)
    t["ratio_2_over_4"] = t["ms_2"] / t["ms_4"]
    t["noisy"] = t["noisy_2"] | t["noisy_4"]
    return t


def fig_ctas_heatmap(d: pd.DataFrame, out: Path) -> list[Path]:
    """Cell = time with ctas_2 / time with ctas_4 (> 1: 4 CTAs per SM is faster), per (context, batch)."""
    t = ctas_table(d)
    if t.empty:
        return []
    two = next(lab for lab in sorted(d["label"].unique()) if lab.endswith("ctas_2]"))
    four = next(lab for lab in sorted(d["label"].unique()) if lab.endswith("ctas_4]"))
    models = sorted(t["model"].unique())
    fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 4.8), squeeze=False)
    for ax, model in zip(axes[0], models):
        g = t[t["model"] == model]
        val = g.pivot(index="decode_context_len", columns="num_decode", values="ratio_2_over_4").sort_index()
        nz = g.pivot(index="decode_context_len", columns="num_decode", values="noisy").reindex_like(val)
        annot = val.copy().astype(object)
        for i in val.index:
            for j in val.columns:
                v = val.loc[i, j]
                annot.loc[i, j] = "" if pd.isna(v) else (f"{v:.2f}?" if bool(nz.loc[i, j]) else f"{v:.2f}")
        lim = float(np.nanmax(np.abs(np.log2(val.to_numpy(dtype=float))))) or 0.1
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PendingDeprecationWarning)
            sns.heatmap(np.log2(val.astype(float)), ax=ax, cmap="RdBu", center=0, vmin=-lim, vmax=lim,
                        annot=annot, fmt="", annot_kws={"fontsize": 8}, linewidths=0.4,
                        cbar_kws={"label": "log2(time 2 CTAs/SM ÷ time 4 CTAs/SM)"})
        ax.set_yticklabels([fmt_tokens(v) for v in val.index], rotation=0)
        ax.set_xlabel("decode batch")
        ax.set_ylabel("context (prefill and decode, tokens)")
        ax.set_title(f"{model}: time({two}) ÷ time({four}); > 1: 4 CTAs/SM faster;\n"
                     f"'?': noisy cell (p80/p20 > {NOISE_SPREAD_LIMIT:g}), not a clean number", fontsize=9)
    fig.suptitle(f"CTAs per SM, 2 vs 4 — {_gpu(d)}")
    fig.tight_layout()
    return save(fig, out, "ctas_per_sm")


# -- item 5: the Hopper prefill figure ------------------------------------------------------------------
PREFILL_KERNEL_LABELS = {"fi_serial": "FlashInfer fa3", "fi_prefill_ragged": "FlashInfer fa3",
                         "fa2_serial": "torch FA2 (fa2_serial)"}


def _prefill_label(row) -> str:
    if row["backend"] == "triton_prefill":
        # Which tile ran is in backend_config (prefill_config=auto runs the portable tile on small chunks).
        if "prefill_sm90" in str(row.get("backend_config", "")):
            return "ours, Hopper tile"
        return f"ours, portable tile ({prefill_config_of(row['options']) or 'auto'})"
    return PREFILL_KERNEL_LABELS.get(row["backend"], row["backend"])


def layout_name(kv_layout, page_size) -> str:
    return "contiguous" if kv_layout == "contiguous" else f"paged {int(page_size)}"


def hopper_prefill_rows(sp: pd.DataFrame) -> pd.DataFrame:
    """Usable rows of the hopper_prefill sweep that ran the point's own KV layout (a paged-only backend
    on a contiguous point ran paged 16, a contiguous-only one on a paged point ran contiguous: those are
    dropped, so each point meets FlashInfer on its own layout), with TFLOP/s bounds and noise."""
    d = sp[(sp["sweep"] == "hopper_prefill") & sp["usable"]]
    if d.empty:
        return d
    d = flag_noisy(d)
    d["ran"] = [layout_name(a, b) for a, b in zip(d["kv_layout"], d["page_size"])]
    # The point's own layout: what our triton_prefill rows ran (it runs both layouts); else the
    # layout most of the point's rows ran.
    own = d[d["backend"] == "triton_prefill"].groupby("point_id")["ran"].first()
    fallback = d.groupby("point_id")["ran"].agg(lambda s: s.value_counts().sort_index().idxmax())
    d["layout"] = d["point_id"].map(own).fillna(d["point_id"].map(fallback))
    d = d[d["ran"] == d["layout"]].copy()
    d["label"] = [_prefill_label(r) for _, r in d.iterrows()]
    d["tflops_lo"] = d["prefill_flops"] / (d["p80_ms"] * 1e-3) / 1e12
    d["tflops_hi"] = d["prefill_flops"] / (d["p20_ms"] * 1e-3) / 1e12
    d["point"] = [f"{m} {fmt_tokens(c)}@{fmt_tokens(x)}" for m, c, x in
                  zip(d["model"], d["chunk_len"], d["prefill_context_len"])]
    return d


def fig_hopper_prefill(d: pd.DataFrame, out: Path) -> list[Path]:
    if d.empty:
        return []
    layouts = sorted(d["layout"].unique(), key=lambda s: (s == "contiguous", len(s), s))
    labels = sorted(d["label"].unique())
    pal = _palette(labels)
    fig, axes = plt.subplots(len(layouts), 1, figsize=(13, 4.0 * len(layouts)), squeeze=False)
    handles = []
    for ax, layout in zip(axes[:, 0], layouts):
        g = d[d["layout"] == layout]
        order = list(dict.fromkeys(g.sort_values(["model", "chunk_len", "prefill_context_len"])["point"]))
        present = [lab for lab in labels if lab in set(g["label"])]
        hs = _errorbar_points(ax, g, "point", "tflops", "tflops_lo", "tflops_hi", present, pal,
                              x_order=order, dodge=0.8 / max(1, len(present)))
        handles += [h for h in hs if h.get_label() not in {x.get_label() for x in handles}]
        ax.set_xticks(range(len(order)), order, rotation=45, ha="right")
        ax.set_ylabel("prefill TFLOP/s\n(bars: FLOPs / p80 .. / p20)")
        ax.set_title(f"KV layout: {layout} (every kernel here ran this layout)", fontsize=10)
        ax.set_ylim(bottom=0)
    axes[0, 0].legend(handles=handles + [_noisy_handle()], fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    axes[-1, 0].set_xlabel("prefill-only point: model, chunk@context (tokens)")
    fig.suptitle(f"Prefill kernels per KV layout — {_gpu(d)}")
    fig.tight_layout()
    return save(fig, out, "hopper_prefill")


def hopper_prefill_table(d: pd.DataFrame) -> pd.DataFrame:
    if d.empty:
        return pd.DataFrame()
    cols = ["layout", "point", "label", "tflops", "tflops_lo", "tflops_hi", "spread", "noisy", "source"]
    cols = [c for c in cols if c in d]
    return (d.sort_values(["layout", "model", "chunk_len", "prefill_context_len", "label"])[cols]
            .rename(columns={"label": "kernel"}).reset_index(drop=True))


# -- the Hopper POD kernel's SM split (sweep hopper_split) ----------------------------------------------
SPLIT_SERIAL = ("triton_serial", "fi_serial")


def _planned_decode_ctas(backend_config) -> float:
    try:
        return float(json.loads(backend_config).get("decode_ctas"))
    except (TypeError, ValueError, AttributeError):
        return float("nan")


def hopper_split_rows(sp: pd.DataFrame) -> pd.DataFrame:
    """Usable rows of the hopper_split sweep: pod_sm90 (`decode_ctas`: forced, or the planner's from its
    backend_config; `planned`: the planner chose it) and the serial paths, with time bounds and noise."""
    d = _timed(sp[(sp["sweep"] == "hopper_split") & sp["usable"]])
    d = d[d["backend"].isin(("pod_sm90", *SPLIT_SERIAL))]
    if d.empty:
        return d
    d = with_labels(_time_bounds(flag_noisy(d)))
    forced = d["options"].map(forced_decode_ctas_of)
    d["planned"] = (d["backend"] == "pod_sm90") & (forced == 0)
    d["decode_ctas"] = np.where(forced > 0, forced, d["backend_config"].map(_planned_decode_ctas))
    d.loc[d["backend"] != "pod_sm90", "decode_ctas"] = np.nan
    return d


def hopper_split_table(d: pd.DataFrame) -> pd.DataFrame:
    """Per point: the serial paths' times, the planner's split and time, the best forced split and its
    time, and each against the faster serial path (> 1: one launch beats two)."""
    rows = []
    for (model, batch), g in d.groupby(["model", "batch"], sort=True):
        serial = {b: g.loc[g["backend"] == b, "median_ms"].min() for b in SPLIT_SERIAL}
        fastest = min((v for v in serial.values() if pd.notna(v)), default=float("nan"))
        plan = g[g["planned"]]
        forced = g[(g["backend"] == "pod_sm90") & ~g["planned"]]
        best = forced.loc[forced["median_ms"].idxmin()] if not forced.empty else None
        r = dict(model=model, batch=batch, **{f"{b}_ms": serial[b] for b in SPLIT_SERIAL},
                 planner_ctas=plan["decode_ctas"].iloc[0] if not plan.empty else np.nan,
                 planner_ms=plan["median_ms"].min() if not plan.empty else np.nan,
                 best_ctas=best["decode_ctas"] if best is not None else np.nan,
                 best_ms=best["median_ms"] if best is not None else np.nan,
                 noisy=", ".join(sorted(g.loc[g["noisy"], "label"])))
        r["planner_speedup"] = fastest / r["planner_ms"]
        r["best_speedup"] = fastest / r["best_ms"]
        rows.append(r)
    return pd.DataFrame(rows)


def fig_hopper_split(d: pd.DataFrame, out: Path) -> list[Path]:
    """One panel per point: pod_sm90's time against its decode CTAs (forced splits joined by a line, the
    planner's split a star), p20-p80 bars, noisy points hollow; triton_serial and fi_serial as lines."""
    if d.empty:
        return []
    points = sorted(d.groupby(["model", "batch"]).groups)
    cols = min(3, len(points))
    nrows = -(-len(points) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.2 * cols, 3.9 * nrows), squeeze=False)
    handles = {}
    for ax, (model, batch) in zip(axes.flat, points):
        g = d[(d["model"] == model) & (d["batch"] == batch)]
        forced = g[(g["backend"] == "pod_sm90") & ~g["planned"]].sort_values("decode_ctas")
        for sub, style in ((forced, dict(marker="o", color="C0", ls="-")),
                           (g[g["planned"]], dict(marker="*", color="C3", ls="none", ms=13))):
            if sub.empty:
                continue
            clean = sub[~sub["noisy"]]
            yerr = [sub["median_ms"] - sub["lo_ms"], sub["hi_ms"] - sub["median_ms"]]
            h = ax.errorbar(sub["decode_ctas"], sub["median_ms"], yerr=yerr, capsize=2, mfc="none", **style)
            ax.plot(clean["decode_ctas"], clean["median_ms"], ls="none", marker=style["marker"],
                    color=style["color"], ms=style.get("ms", 6))
            key = "pod_sm90, planner's split" if style["marker"] == "*" else "pod_sm90, forced split"
            handles[key] = h
        for b, ls in zip(SPLIT_SERIAL, ("--", ":")):
            t = g.loc[g["backend"] == b, "median_ms"]
            if not t.empty:
                handles[b] = ax.axhline(t.min(), color="0.35", ls=ls, lw=1.2, label=b)
        ax.set_title(batch if str(batch).startswith(str(model)) else f"{model}: {batch}", fontsize=9)
        ax.set_xlim(0, 132)
        ax.set_xlabel("SMs running the decode role (decode CTAs, of 132)")
        ax.set_ylabel("attention time (ms), p20–p80 bars")
    for ax in list(axes.flat)[len(points):]:
        ax.axis("off")
    labels = list(handles)
    fig.legend([handles[k] for k in labels] + [_noisy_handle()], labels + [_noisy_handle().get_label()],
               fontsize=8, loc="lower center", ncol=len(labels) + 1, bbox_to_anchor=(0.5, -0.02))
    fig.suptitle(f"Hopper POD (pod_sm90): the SM split, forced vs planned — {_gpu(d)}")
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return save(fig, out, "hopper_split")


# -- everything here -----------------------------------------------------------------------------------
def figures(sp: pd.DataFrame, out: Path) -> dict[str, list[Path]]:
    """{figure: paths} of every figure above whose sweep has rows in `sp` (attention_speedups' output)."""
    figs: dict[str, list[Path]] = {}
    grid = paper_grid_speedups(sp)
    if not grid.empty:
        figs["paper_grid_violin"] = fig_paper_violin(grid, out)
    chunk = per_chunk_rows(sp)
    if not chunk.empty:
        figs["per_chunk"] = fig_per_chunk(chunk, out)
    pol = knob_rows(sp, "policy")
    if not pol.empty:
        figs["policy"] = fig_policy(pol, out)
    ctas = knob_rows(sp, "ctas_per_sm")
    if not ctas.empty:
        figs["ctas_per_sm"] = fig_ctas_heatmap(ctas, out)
    pre = hopper_prefill_rows(sp)
    if not pre.empty:
        figs["hopper_prefill"] = fig_hopper_prefill(pre, out)
    split = hopper_split_rows(sp)
    if not split.empty:
        figs["hopper_split"] = fig_hopper_split(split, out)
    return {k: v for k, v in figs.items() if v}


def tables(sp: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """{table: DataFrame} of the figures above whose sweep has rows in `sp`, and noisy_points (every
    noisy row of any sweep)."""
    out: dict[str, pd.DataFrame] = {}
    grid = paper_grid_speedups(sp)
    if not grid.empty:
        out["paper_grid_speedup"] = paper_grid_table(grid)
        bal = balanced_points(grid)
        info = grid.drop_duplicates(["run", "point_id"])[["run", "point_id", "model", "batch"]]
        out["paper_grid_balance"] = info.merge(bal, on=["run", "point_id"]).drop(columns=["run"])
    chunk = per_chunk_rows(sp)
    if not chunk.empty:
        out["per_chunk"] = knob_table(chunk, ["model", "num_decode", "chunk_index"])
    pol = knob_rows(sp, "policy")
    if not pol.empty:
        t = knob_table(pol, ["model", "num_decode"])
        a, b = "pod[policy_5050]", "pod[policy_proportional]"
        if a in t and b in t:   # > 1: the proportional policy is faster
            t["proportional_speedup"] = t[a] / t[b]
        out["policy"] = t
    ctas = ctas_table(knob_rows(sp, "ctas_per_sm"))
    if not ctas.empty:
        out["ctas_per_sm"] = ctas
    pre = hopper_prefill_rows(sp)
    if not pre.empty:
        out["hopper_prefill_tflops"] = hopper_prefill_table(pre)
    split = hopper_split_rows(sp)
    if not split.empty:
        out["hopper_split"] = hopper_split_table(split)
    noisy = noisy_table(sp)
    if not noisy.empty:
        out["noisy_points"] = noisy
    return out


def build(sp: pd.DataFrame, out: Path) -> tuple[dict[str, list[Path]], dict[str, pd.DataFrame]]:
    """(figures(sp, out), tables(sp))."""
    return figures(sp, out), tables(sp)


SECTION_TITLES = {
    "paper_grid_speedup": (f"Paper grid: speed-up over {PAPER_GRID_REFERENCE} (the paper's baseline) per backend "
                           "(all / filtered points)"),
    "policy": "Role policy: time (ms) per config",
    "ctas_per_sm": "CTAs per SM: time with 2 / time with 4",
    "hopper_prefill_tflops": "Prefill kernels per KV layout (TFLOP/s)",
    "hopper_split": "Hopper POD: the planner's SM split against the best forced one (ms; speed-ups over the "
                    "faster serial path)",
    "noisy_points": f"Noisy rows (p80/p20 > {NOISE_SPREAD_LIMIT:g}): flagged, not plotted as clean numbers",
}
