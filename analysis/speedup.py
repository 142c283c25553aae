"""Speed-ups of every backend per hybrid-batch point, and the summary tables made from them.

Speed-up of backend b at point p (both of one run):
    vs best serial:  the fastest serial path at p / median_ms of b at p, where the fastest serial path is
                     the least median_ms of the SERIAL_BACKENDS usable at p (triton_serial, fi_serial,
                     fa2_serial: prefill then decode, two launches, each family's kernels)
    vs fi_pod:       median_ms of fi_pod at p / median_ms of b at p
This is the one place the fastest serial path is computed: every figure and table that compares
against "serial" reads `best_serial_backend` / `best_serial_ms` / `speedup_vs_serial` from here (the
paper-grid violin alone keeps the paper's fa2_serial, analysis.paper_figures.PAPER_GRID_REFERENCE).
Only *usable* rows enter a speed-up, as candidate or as baseline. A row is excluded (and says why in
`excluded`) when its status is not "ok", when its timing is not meaningful (CPU / interpreter runs), when
it has no positive timing, or when its output was wrong: prefill_err / decode_err (max relative error
vs the fp32 reference) above the dtype's tolerance (`err_flagged`), or when the backend does not
compute a part the batch has (its error is NaN: the harness checks every part a backend computes). A speed-up
from a kernel whose output was wrong is not a result. Excluded rows are still counted in the summaries.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

# The serial paths a fused kernel must beat; the fastest of those usable at a point is its reference.
SERIAL_BACKENDS = ("triton_serial", "fi_serial", "fa2_serial")
# Our fused backends ("ours"): each is compared with the fastest serial path and with fi_pod.
OUR_FUSED_BACKENDS = ("pod", "pod_sm90", "pod_paper")
POD_BASELINE = "fi_pod"
# Max relative error vs the fp32 reference above which an output counts as wrong.
ERROR_TOLERANCE = {"bfloat16": 1e-2, "float16": 1e-2}
DEFAULT_TOLERANCE = 1e-2
REFERENCES = {"best serial": "speedup_vs_serial", POD_BASELINE: "speedup_vs_fi_pod"}


# -- exclusion flags ---------------------------------------------------------------------------------
def flag_rows(df: pd.DataFrame, tolerance: dict[str, float] | None = None) -> pd.DataFrame:
    """Adds `excluded` (the reasons, "" when usable), `err_flagged` (status ok but output wrong)
    and `usable` (bool)."""
    tolerance = {**ERROR_TOLERANCE, **(tolerance or {})}
    df = df.copy()
    n = len(df)
    tol = df["dtype"].map(lambda d: tolerance.get(str(d), DEFAULT_TOLERANCE)).astype(float).to_numpy()
    status = df["status"].astype("string").fillna("").to_numpy(dtype=object)
    median = pd.to_numeric(df["median_ms"], errors="coerce").to_numpy(dtype=float)
    has_prefill = (df["num_prefill"].fillna(0) > 0) | (df["chunk_len"].fillna(0) > 0)
    has_decode = df["num_decode"].fillna(0) > 0

    reasons: list[list[str]] = [[] for _ in range(n)]
    err_flagged = np.zeros(n, dtype=bool)
    for i in range(n):
        if status[i] != "ok":
            reasons[i].append(f"status={status[i] or 'missing'}")
            continue
        if not bool(df["timing_meaningful"].iloc[i]):
            reasons[i].append("timing not meaningful (CPU/interpreter)")
        if not (np.isfinite(median[i]) and median[i] > 0):
            reasons[i].append("no timing")
    for part, present in (("prefill", has_prefill.to_numpy()), ("decode", has_decode.to_numpy())):
        err = pd.to_numeric(df[f"{part}_err"], errors="coerce").to_numpy(dtype=float)
        for i in np.flatnonzero(present & (status == "ok")):
            if not np.isfinite(err[i]):
                # The harness checks every part a backend computes: NaN means it does not compute
                # this part, so its time is not the whole batch's (excluded, but not a wrong output).
                reasons[i].append(f"does not compute {part}")
            elif err[i] > tol[i]:
                reasons[i].append(f"{part}_err={err[i]:.2g} > {tol[i]:g}")
                err_flagged[i] = True
    df["excluded"] = ["; ".join(r) for r in reasons]
    df["err_flagged"] = err_flagged
    df["usable"] = df["excluded"] == ""
    return df


# -- speed-ups -----------------------------------------------------------------------------------------
def attention_speedups(df: pd.DataFrame, tolerance: dict[str, float] | None = None) -> pd.DataFrame:
    """One row per input row, with `best_serial_backend`, `best_serial_ms` (the fastest serial path of
    the row's run and point), `speedup_vs_serial`, `fi_pod_ms`, `speedup_vs_fi_pod` (NaN where the row
    or its baseline is not usable)."""
    df = flag_rows(df, tolerance)
    if "run" not in df:
        df["run"] = "run"
    key = ["run", "point_id"]
    ok = df[df["usable"]]

    serial = ok[ok["backend"].isin(SERIAL_BACKENDS)]
    serial = serial.assign(_rank=serial["backend"].map(SERIAL_BACKENDS.index))   # ties: the list's order
    best = (serial.sort_values(["median_ms", "_rank"], kind="stable").groupby(key, sort=False).head(1)
            [key + ["backend", "median_ms"]]
            .rename(columns={"backend": "best_serial_backend", "median_ms": "best_serial_ms"}))
    pod = (ok[ok["backend"] == POD_BASELINE].groupby(key)["median_ms"].min()
           .rename("fi_pod_ms").reset_index())

    # The point's KV layout: a backend that lacks it runs the other layout (the row says which ran),
    # so the point's own is the one most of its rows ran (ties: paged).
    layout = (df.assign(_paged=df["kv_layout"] == "paged").groupby(key)["_paged"].mean()
              .map(lambda share: "paged" if share >= 0.5 else "contiguous").rename("point_layout")
              .reset_index())
    out = (df.merge(best, on=key, how="left").merge(pod, on=key, how="left")
           .merge(layout, on=key, how="left"))
    own = out["median_ms"].where(out["usable"])
    out["speedup_vs_serial"] = out["best_serial_ms"] / own
    out["speedup_vs_fi_pod"] = out["fi_pod_ms"] / own
    return add_composition(out)


def serial_label(backends) -> str:
    """How a figure names its serial reference: 'fastest of triton_serial, fi_serial' (the
    SERIAL_BACKENDS among `backends`, in the list's order)."""
    present = [b for b in SERIAL_BACKENDS if b in set(backends)] or list(SERIAL_BACKENDS)
    return f"fastest of {', '.join(present)}" if len(present) > 1 else present[0]


def geomean(x) -> float:
    x = np.asarray(pd.Series(x).dropna(), dtype=float)
    return float(np.exp(np.log(x).mean())) if len(x) else float("nan")


def summarize(sp: pd.DataFrame, by: list[str] | tuple[str, ...] = ("backend",)) -> pd.DataFrame:
    """Per group of `by` and per reference ("best serial", "fi_pod"): row counts (all, ok, excluded for
    a wrong output, compared), and over the compared points the geomean / max / min speed-up and the
    share of points where the backend is faster (speed-up > 1). A backend is never compared with itself:
    a serial backend's points where it is the fastest serial path are not compared, and fi_pod has no
    row against fi_pod."""
    by = list(by)
    rows = []
    for keys, g in sp.groupby(by, sort=True, dropna=False):
        keys = keys if isinstance(keys, tuple) else (keys,)
        counts = {"rows": len(g), "ok": int((g["status"] == "ok").sum()),
                  "not_ok": int((g["status"] != "ok").sum()), "err_flagged": int(g["err_flagged"].sum()),
                  "usable": int(g["usable"].sum())}
        for ref, col in REFERENCES.items():
            itself = g["backend"] == (g["best_serial_backend"] if col == "speedup_vs_serial" else ref)
            if itself.fillna(False).all():
                continue
            s = g.loc[~itself.fillna(False).astype(bool), col].dropna()
            rows.append({**dict(zip(by, keys)), "vs": ref, **counts, "compared": len(s),
                         "geomean": geomean(s), "max": s.max() if len(s) else np.nan,
                         "min": s.min() if len(s) else np.nan,
                         "share_faster": float((s > 1).mean()) if len(s) else np.nan})
    cols = [*by, "vs", "rows", "ok", "not_ok", "err_flagged", "usable", "compared", "geomean", "max",
            "min", "share_faster"]
    return pd.DataFrame(rows, columns=cols)


def status_counts(df: pd.DataFrame) -> pd.DataFrame:
    """Rows per backend and status (ok / skipped / error / oom), for the record."""
    if df.empty:
        return pd.DataFrame(columns=["backend"])
    return (df.groupby(["backend", "status"]).size().unstack(fill_value=0).reset_index()
            .rename_axis(columns=None))


# -- batch composition labels (the x axis of the paper's attention figures) -------------------------
def fmt_tokens(n) -> str:
    """512 -> '512', 1024 -> '1K', 12288 -> '12K', 1536 -> '1.5K'."""
    if n is None or pd.isna(n):
        return "?"
    n = int(n)
    if n >= 1024 and n % 512 == 0:
        k = n / 1024
        return f"{k:g}K"
    return str(n)


def composition_label(num_prefill, chunk_len, prefill_context_len, num_decode, decode_context_len) -> str:
    """'1K@12K + 64×4K': prefill chunk@its context, plus decode batch×decode context (tokens)."""
    parts = []
    if num_prefill and num_prefill > 0:
        lead = f"{int(num_prefill)}×" if num_prefill > 1 else ""
        parts.append(f"{lead}{fmt_tokens(chunk_len)}@{fmt_tokens(prefill_context_len)}")
    if num_decode and num_decode > 0:
        parts.append(f"{int(num_decode)}×{fmt_tokens(decode_context_len)}")
    return " + ".join(parts) or "empty"


def add_composition(df: pd.DataFrame) -> pd.DataFrame:
    df = df.copy()
    cols = ["num_prefill", "chunk_len", "prefill_context_len", "num_decode", "decode_context_len"]
    df["composition"] = [composition_label(*(None if pd.isna(v) else v for v in vals))
                         for vals in df[cols].itertuples(index=False)]
    # Sort key so figures order points like the paper: by chunk, prefill context, decodes, decode context.
    df["composition_order"] = (df[cols].fillna(0).astype(float)
                               .apply(lambda r: tuple(r[c] for c in cols[1:] + cols[:1]), axis=1))
    return df


def ordered_compositions(df: pd.DataFrame) -> list[str]:
    return list(df.sort_values("composition_order")["composition"].drop_duplicates())


# -- kernel benchmark tables --------------------------------------------------------------------------
# Kernel table columns that come first: ours, FlashInfer's kernel, FA2's kernel (on a pure point the
# serial baselines run only that part's kernel).
KERNEL_COLUMNS = {"tflops": ("triton_prefill", "fi_serial", "fa2_serial"),
                  "gbps": ("triton_decode", "fi_serial", "fa2_serial")}
# Sweeps of pure prefill / pure decode points: the kernel benchmark `kernels` first, then the sweeps
# that measure one part's kernels on some of its points (hopper_prefill: the prefill tiles).
KERNEL_SWEEPS = ("kernels", "hopper_prefill")


def kernel_rows(sp: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Usable rows of pure prefill points and of pure decode points: the kernel benchmark compares
    prefill kernels in TFLOP/s, decode kernels in GB/s. With a `kernels` sweep, its points: each
    backend's rows from that sweep, and a backend it did not run at a point (e.g. the H200's kernels run
    had no triton_prefill) from another kernel sweep at the same point, GPU and backend options (the
    Hopper prefill sweep's default-config rows, not its autotuned portable-tile run). Without one, every
    pure point of every sweep."""
    ok = sp[sp["usable"]]
    if (ok["sweep"] == "kernels").any():
        ok = ok.assign(options=ok["options"].astype("string").fillna(""))
        own = ok[ok["sweep"] == "kernels"]
        others = ok[ok["sweep"].isin(KERNEL_SWEEPS[1:])]
        ran = set(zip(own["gpu"], own["point_id"], own["backend"]))
        options = own.groupby(["gpu", "point_id"])["options"].agg(set).to_dict()
        borrowed = [(g, p, b) not in ran and o in options.get((g, p), ())
                    for g, p, b, o in zip(others["gpu"], others["point_id"], others["backend"], others["options"])]
        ok = pd.concat([own, others[borrowed]], ignore_index=True)
    pre = ok[(ok["num_decode"].fillna(0) == 0) & (ok["num_prefill"].fillna(0) > 0)]
    dec = ok[(ok["num_prefill"].fillna(0) == 0) & (ok["num_decode"].fillna(0) > 0)]
    return pre, dec


def kernel_tables(sp: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(prefill TFLOP/s table, decode GB/s table): one row per point (gpu, model, batch), one column per
    backend, the median over runs. `batch` names the point as its own rows ran it: a backend that ran
    the other KV layout there (FA2 contiguous on a paged point) is in the point's row, not in a row of
    its own."""
    pre, dec = kernel_rows(sp)

    def pivot(rows, value):
        if rows.empty:
            return pd.DataFrame(columns=["gpu", "model", "batch"])
        rows = rows.sort_values("composition_order", kind="stable")
        own = rows[rows["kv_layout"] == rows["point_layout"]].groupby(["gpu", "point_id"])["batch"].first()
        rows = rows.assign(batch=[own.get((g, p), b) for g, p, b in zip(rows["gpu"], rows["point_id"], rows["batch"])])
        index = ["gpu", "model", "batch"]
        order = list(dict.fromkeys(zip(*(rows[c] for c in index))))
        t = rows.pivot_table(index=index, columns="backend", values=value, aggfunc="median")
        first = [b for b in KERNEL_COLUMNS[value] if b in t.columns]  # ours, FlashInfer, FA2 first
        t = t[first + [b for b in t.columns if b not in first]]
        return t.reindex(order).reset_index().rename_axis(columns=None)

    return pivot(pre, "tflops"), pivot(dec, "gbps")
