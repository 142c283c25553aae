"""Serving figures and tables from serving rows (experiments/serving; schema SERVING_SCHEMA), drawn
by analysis.figures.build_all (`make figures`, `make reproduce`) wherever serving rows exist:

  serving_throughput[_<gpu>]  offline (the paper's Fig 12): steady requests per minute per backend per
                   model (left) and the throughput of each of ours (pod, pod_sm90) over each OTHER
                   backend of the same model and run (right; never a backend against itself)
  serving_latency_<model>[_<gpu>]   online: TTFT p50/p99, TBT p50/p99 and the share of decode gaps
                   over 200 / 500 ms, per backend (hue) at each offered load (x)
  tables (CSV + Markdown) serving_throughput, serving_latency, serving_speedups (the figure's ratios),
                   serving_layer_cut_check (the all-layers run's measured requests/min beside the
                   cut run's scaled estimate)
Only rows with status ok and timing_meaningful (a GPU run) are drawn; of repeated rows of one
(experiment, backend, load) the latest (timestamp) wins. Rows of a layer-cut run (time_scale != 1)
are drawn with their scaled_* columns, ESTIMATES of the full model, and the figure says so; the
measured values stay in the tables. Files are byte-stable (analysis.output.save: no dates, no versions).
"""
from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

from analysis.load import load_results
from analysis.output import gpu_title, save, slug, write_table
from analysis.speedup import OUR_FUSED_BACKENDS, SERIAL_BACKENDS

BACKEND_ORDER = (*OUR_FUSED_BACKENDS, *SERIAL_BACKENDS)
LATENCY_METRICS = (("ttft_p50_ms", "TTFT p50 (ms)"), ("ttft_p99_ms", "TTFT p99 (ms)"),
                   ("tbt_p50_ms", "TBT p50 (ms)"), ("tbt_p99_ms", "TBT p99 (ms)"),
                   ("stall_frac_200ms", "decode gaps > 200 ms (share)"),
                   ("stall_frac_500ms", "decode gaps > 500 ms (share)"))


def usable(serving: pd.DataFrame) -> pd.DataFrame:
    """ok, GPU-timed rows; the latest of each (gpu, sweep, model, mode, backend, load)."""
    if serving.empty:
        return serving
    s = serving[(serving["status"] == "ok") & serving["timing_meaningful"].astype(bool)].copy()
    if s.empty:
        return s
    s["load_key"] = s["load"].round(6).fillna(-1.0)
    s = s.sort_values("timestamp", kind="stable")
    return s.drop_duplicates(["gpu", "sweep", "model", "mode", "backend", "load_key"], keep="last")


def _scaled(d: pd.DataFrame) -> bool:
    """True when the rows come from a layer cut (their scaled_* columns are estimates)."""
    ts = d["time_scale"].dropna()
    return bool((ts - 1.0).abs().gt(1e-9).any())


def _value(d: pd.DataFrame, col: str) -> pd.Series:
    """`col` as drawn: the scaled_* estimate for rows of a layer cut where it exists, else measured."""
    scaled = f"scaled_{col}"
    if scaled in d and d[scaled].notna().any():
        cut = d["time_scale"].notna() & (d["time_scale"] - 1.0).abs().gt(1e-9)
        return d[col].where(~cut, d[scaled])
    return d[col]


def _backends(present) -> list[str]:
    present = set(present)
    return [b for b in BACKEND_ORDER if b in present] + sorted(present - set(BACKEND_ORDER))


def throughput_table(s: pd.DataFrame) -> pd.DataFrame:
    off = s[s["mode"] == "offline"]
    cols = ["gpu", "sweep", "model", "workload", "backend", "num_requests", "chunk_size", "num_layers",
            "model_num_layers", "requests_per_min", "steady_requests_per_min", "time_scale",
            "scaled_requests_per_min", "scaled_steady_requests_per_min"]
    return off[cols].sort_values(["gpu", "sweep", "model", "backend"]).reset_index(drop=True)


def speedups(off: pd.DataFrame, value: str) -> pd.DataFrame:
    """Per (gpu, sweep, model): each of our fused backends present (OUR_FUSED_BACKENDS: pod, pod_sm90, ...;
    without any, the first backend of BACKEND_ORDER present) over each OTHER backend: rate / other's rate.
    Never a backend over itself, no reciprocal pairs."""
    out = []
    for (gpu, sweep, model), d in off.groupby(["gpu", "sweep", "model"], sort=True):
        rate = dict(zip(d["backend"], d[value]))
        order = _backends(rate)
        ours = [b for b in order if b in OUR_FUSED_BACKENDS] or order[:1]
        for b in ours:
            for other in (o for o in order if o not in ours):
                if pd.notna(rate[b]) and pd.notna(rate[other]) and rate[other] > 0:
                    out.append(dict(gpu=gpu, sweep=sweep, model=model, backend=b, vs=other,
                                    speedup=rate[b] / rate[other]))
    return pd.DataFrame(out, columns=["gpu", "sweep", "model", "backend", "vs", "speedup"])


def _panel(d: pd.DataFrame) -> pd.Series:
    """x label of an offline row: the model, and the layers when the sweep is an all-layers check."""
    check = d["sweep"].str.endswith(ALL_LAYERS_SUFFIX)
    return d["model"] + check.map({True: "\n(all layers, measured)", False: ""})


def fig_throughput(s: pd.DataFrame, out: Path) -> list[Path]:
    off = s[s["mode"] == "offline"]
    paths = []
    gpus = sorted(off["gpu"].unique())
    for gpu in gpus:
        d = off[off["gpu"] == gpu].copy()
        d["panel"] = _panel(d)
        d["value"] = _value(d, "steady_requests_per_min").fillna(_value(d, "requests_per_min"))
        cut = _scaled(d)
        backends = _backends(d["backend"])
        order = sorted(d["panel"].unique())
        fig, axes = plt.subplots(1, 2, figsize=(max(10.0, 3.0 * len(order) + 4), 4.6))
        sns.barplot(data=d, x="panel", y="value", hue="backend", hue_order=backends, order=order,
                    errorbar=None, ax=axes[0])
        axes[0].set_xlabel("model")
        axes[0].legend(title="backend", fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        axes[0].set_ylabel("requests per minute (steady)" + ("\nscaled to all layers (estimate)" if cut else ""))
        axes[0].set_title("throughput", fontsize=10)
        sp = speedups(d, "value")
        if sp.empty:
            axes[1].set_axis_off()
            axes[1].text(0.5, 0.5, "one backend: no comparison", ha="center", transform=axes[1].transAxes)
        else:
            sp["pair"] = sp["backend"] + " / " + sp["vs"]
            sp["panel"] = _panel(sp)
            pairs = list(dict.fromkeys(sp["pair"]))
            sns.barplot(data=sp, x="panel", y="speedup", hue="pair", hue_order=pairs,
                        order=[p for p in order if p in set(sp["panel"])], errorbar=None, ax=axes[1])
            axes[1].axhline(1.0, color="black", lw=1, ls="--")
            axes[1].set_xlabel("model")
            axes[1].set_ylabel("throughput ratio (×)")
            axes[1].set_title("throughput ratio (same model and run)", fontsize=10)
            axes[1].legend(title="backend / vs", fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        fig.suptitle(gpu_title("Offline serving throughput (paper Fig 12)", [gpu])
                     + ("\nlayer-cut runs: scaled to all layers (estimate; see time_scale)" if cut else ""))
        fig.tight_layout()
        paths += save(fig, out, "serving_throughput" + (f"_{slug(gpu)}" if len(gpus) > 1 else ""))
    return paths


def latency_table(s: pd.DataFrame) -> pd.DataFrame:
    on = s[s["mode"] == "online"]
    cols = ["gpu", "sweep", "model", "workload", "backend", "load", "qps", "num_requests", "num_layers",
            "model_num_layers", "ttft_p50_ms", "ttft_p99_ms", "tbt_p50_ms", "tbt_p99_ms",
            "stalls_200ms", "stall_frac_200ms", "stalls_500ms", "stall_frac_500ms", "decode_gaps",
            "time_scale", "scaled_qps", "scaled_ttft_p50_ms", "scaled_ttft_p99_ms", "scaled_tbt_p50_ms",
            "scaled_tbt_p99_ms", "scaled_stall_frac_200ms", "scaled_stall_frac_500ms"]
    return on[cols].sort_values(["gpu", "sweep", "model", "load", "backend"]).reset_index(drop=True)


def fig_latency(s: pd.DataFrame, out: Path) -> list[Path]:
    on = s[(s["mode"] == "online") & s["qps"].notna()]
    paths = []
    gpus = sorted(on["gpu"].unique())
    for gpu in gpus:
        for model, d in on[on["gpu"] == gpu].groupby("model", sort=True):
            d = d.copy()
            cut = _scaled(d)
            # x: the offered load, the same for every backend: the requested rate (qps of the run that was
            # timed), not scaled_qps, which differs per backend with its time_scale and would split the groups.
            d["x"] = [(f"load {l:.2f}\n" if pd.notna(l) else "") + f"{q:.3g} req/s"
                      for q, l in zip(d["qps"], d["load"])]
            order = list(dict.fromkeys(d.sort_values("qps")["x"]))
            backends = _backends(d["backend"])
            fig, axes = plt.subplots(1, len(LATENCY_METRICS), figsize=(3.4 * len(LATENCY_METRICS), 4.0))
            for j, (ax, (col, label)) in enumerate(zip(axes, LATENCY_METRICS)):
                d["value"] = _value(d, col)
                sns.barplot(data=d, x="x", y="value", hue="backend", hue_order=backends, order=order,
                            errorbar=None, ax=ax, legend=(j == len(LATENCY_METRICS) - 1))
                ax.set_xlabel("offered load" + (f" ({int(d['num_layers'].max())}-layer run)" if cut else ""))
                ax.set_ylabel(label)
                if not (d["value"].fillna(0) > 0).any():     # e.g. no decode gap over the threshold
                    ax.set_ylim(0, 1)
                    ax.text(0.5, 0.5, "none at any load", ha="center", va="center", transform=ax.transAxes,
                            fontsize=8, color="0.3")
            axes[-1].legend(title="backend", fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
            fig.suptitle(gpu_title(f"Online serving latency, {model}", [gpu])
                         + ("\nlayer-cut runs: times and rates scaled to all layers (estimate; see time_scale)"
                            if cut else ""))
            fig.tight_layout()
            paths += save(fig, out, f"serving_latency_{slug(model)}" + (f"_{slug(gpu)}" if len(gpus) > 1 else ""))
    return paths


ALL_LAYERS_SUFFIX = "_all_layers"


def layer_cut_check(s: pd.DataFrame) -> pd.DataFrame:
    """The layer-cut check: each `<sweep>_all_layers` offline row (measured with every layer) beside
    the scaled estimate of the `<sweep>` row of the same gpu, model and backend (a cut run);
    estimate_error = estimate / measured - 1."""
    off = s[s["mode"] == "offline"]
    full = off[off["sweep"].str.endswith(ALL_LAYERS_SUFFIX)]
    out = []
    for _, f in full.iterrows():
        base = f["sweep"][: -len(ALL_LAYERS_SUFFIX)]
        cut = off[(off["sweep"] == base) & (off["gpu"] == f["gpu"]) & (off["model"] == f["model"])
                  & (off["backend"] == f["backend"])]
        for _, c in cut.iterrows():
            for what in ("requests_per_min", "steady_requests_per_min"):
                est, meas = c[f"scaled_{what}"], f[what]
                out.append(dict(gpu=f["gpu"], model=f["model"], backend=f["backend"], metric=what,
                                cut_layers=c["num_layers"], all_layers=f["num_layers"],
                                cut_measured=c[what], time_scale=c["time_scale"], scaled_estimate=est,
                                all_layers_measured=meas,
                                estimate_error=est / meas - 1 if pd.notna(est) and meas else float("nan")))
    return pd.DataFrame(out, columns=["gpu", "model", "backend", "metric", "cut_layers", "all_layers",
                                      "cut_measured", "time_scale", "scaled_estimate", "all_layers_measured",
                                      "estimate_error"])


def figures(serving: pd.DataFrame, out: Path) -> dict[str, list[Path]]:
    """{figure: paths} from the serving rows (analysis.load's `serving` table); {} when none is timed."""
    s = usable(serving)
    if s.empty:
        return {}
    written = {"serving_throughput": fig_throughput(s, Path(out)), "serving_latency": fig_latency(s, Path(out))}
    return {k: v for k, v in written.items() if v}


def tables(serving: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """{table: DataFrame} from the serving rows; {} when none is timed."""
    s = usable(serving)
    if s.empty:
        return {}
    off = s[s["mode"] == "offline"]
    ratio = speedups(off.assign(rate=_value(off, "steady_requests_per_min").fillna(_value(off, "requests_per_min"))),
                     "rate")
    out = {"serving_throughput": throughput_table(s), "serving_latency": latency_table(s),
           "serving_speedups": ratio, "serving_layer_cut_check": layer_cut_check(s)}
    return {k: t for k, t in out.items() if not t.empty}


SECTION_TITLES = {
    "serving_throughput": "Serving: offline throughput",
    "serving_speedups": "Serving: throughput ratio (same model and run)",
    "serving_latency": "Serving: online latency per load",
    "serving_layer_cut_check": "Serving: layer-cut estimate vs all layers measured",
}


def build_serving_figures(results: str | Path, out: str | Path) -> dict[str, list[Path]]:
    """The serving figures and tables alone, from the serving rows under `results` (for
    experiments.serving.paper; `make figures` draws them with every other figure); {} when none is timed."""
    serving = load_results(results).serving
    written = figures(serving, Path(out))
    for name, t in tables(serving).items():
        written[f"table:{name}"] = write_table(t, Path(out), name)
    return written
