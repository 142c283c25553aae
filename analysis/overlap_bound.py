"""How much faster than the serial path a fused launch could be at the measured points: the overlap bound.

A launch that overlapped the two roles perfectly would take as long as the longer role alone. With each
role no faster inside it than our standalone kernel alone on the whole GPU (`triton_prefill`,
`triton_decode`: the halves the balance filter reads, timed in the same run; on Hopper the fastest we
have, within a few % of the tensor-core and HBM ceilings), a point's fused launch is at most

    bound = fastest serial path / max(prefill alone, decode alone)

faster than the fastest serial path (a bound only while the roles run no faster inside the fused launch
than our halves alone; where FlashInfer's or FA2's serial path beats our halves' sum it is below 1, and a
fused backend that beats its bound at a point is counted in `<backend>_over_bound`). Where one role dominates (a 5% prefill beside a saturating decode)
the bound is ~1.05x whatever the kernel does, so a sweep's geomean target is only as reachable as its
mix of points allows. This table says, per sweep and pooled, over all hybrid points and the balanced
ones (analysis.paper_figures.balanced_points): the bound's geomean and max, and for each fused backend the
points it ran usably, its geomean speed-up over the fastest serial path, the geomean share of the bound it
reaches (speed-up / bound, point by point) and the points where it beat the bound. `n` counts (run, point)
pairs: two runs of one sweep in the folder read would count a point twice.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from analysis.paper_figures import balanced_points
from analysis.speedup import geomean

FUSED_BACKENDS = ("pod", "pod_sm90", "fi_pod")
POOLED = "pooled"


def point_bounds(sp: pd.DataFrame, sweeps) -> pd.DataFrame:
    """Per (run, point) of `sweeps` with both roles and both halves timed: sweep, balanced, the fastest
    serial path, each half's time and the bound."""
    key = ["run", "point_id"]
    d = sp[sp["sweep"].isin(sweeps) & (sp["num_prefill"] > 0) & (sp["num_decode"] > 0)]
    if d.empty:
        return pd.DataFrame()
    halves = balanced_points(d)[key + ["prefill_ms", "decode_ms", "balanced"]]
    meta = d.groupby(key).agg(sweep=("sweep", "first"), gpu=("gpu", "first"),
                              best_serial_ms=("best_serial_ms", "min")).reset_index()
    b = meta.merge(halves, on=key).dropna(subset=["prefill_ms", "decode_ms", "best_serial_ms"])
    b["bound"] = b["best_serial_ms"] / np.maximum(b["prefill_ms"], b["decode_ms"])
    return b


def overlap_bound(sp: pd.DataFrame, sweeps=("paper", "paper_grid"), backends=FUSED_BACKENDS) -> pd.DataFrame:
    """Per (gpu, sweep or "pooled", points "all" / "balanced"): points, the bound's geomean and max, and per
    backend in `backends` that ran there: its geomean speed-up over the fastest serial path and the
    geomean of speed-up / bound over the points it ran."""
    b = point_bounds(sp, sweeps)
    if b.empty:
        return pd.DataFrame()
    key = ["run", "point_id"]
    ran = sp[sp["backend"].isin(backends) & sp["usable"]][key + ["backend", "speedup_vs_serial"]]
    ran = ran.dropna(subset=["speedup_vs_serial"]).groupby(key + ["backend"])["speedup_vs_serial"].min()
    wide = ran.unstack("backend").reset_index()
    b = b.merge(wide, on=key, how="left")
    rows = []
    for gpu, g in b.groupby("gpu", sort=True):
        scopes = [(s, g[g["sweep"] == s]) for s in sorted(g["sweep"].unique())]
        if len(scopes) > 1:
            scopes.append((POOLED, g))
        for scope, s in scopes:
            for subset, pts in (("all", s), ("balanced", s[s["balanced"]])):
                if pts.empty:
                    continue
                row = {"gpu": gpu, "sweep": scope, "points": subset, "n": len(pts),
                       "bound_geomean": geomean(pts["bound"]), "bound_max": pts["bound"].max()}
                for be in backends:
                    if be in pts and pts[be].notna().any():
                        have = pts.dropna(subset=[be])
                        row[f"{be}_n"] = len(have)
                        row[f"{be}_geomean"] = geomean(have[be])
                        row[f"{be}_of_bound"] = geomean(have[be] / have["bound"])
                        row[f"{be}_over_bound"] = int((have[be] > have["bound"]).sum())
                rows.append(row)
    return pd.DataFrame(rows)
