"""The evidence behind the dispatcher's Hopper rule (pod/dispatch.py, `sm90_rule`), from measured rows.

At every point where the fused Hopper kernel (`pod_sm90`) and our serial path (`triton_serial`) both ran,
usable, in the same run, the fused launch's speed-up over the serial one (`triton_serial / pod_sm90`), set
against the two features the rule reads, both from the rule's own cost model (`sm90_estimated_ms`): the
smaller role's estimated time as a share of the larger's, and the decode's estimated time alone.

  fused_vs_serial   per (gpu, kind, share bin, decode-time bin): points, geomean / min / max speed-up,
                    share faster, and the sweeps the points came from. kind: "GQA, decode larger",
                    "GQA, prefill larger", "MHA".
  dispatch_rule     per (gpu, sweep): the rule applied to the measured rows (the pod_sm90 row where it
                    fuses, the triton_serial row where not) against the fastest serial path, beside the
                    better of the two at each point (the best any rule on these two paths could do) and
                    the points where the rule took the slower path by more than 3%.
A rule is fitted on the first table and checked on the second; both are rebuilt from committed rows.
"""
from __future__ import annotations

import json

import numpy as np
import pandas as pd

from analysis.speedup import geomean
from pod.dispatch import sm90_estimated_ms, sm90_rule

FUSED, SERIAL = "pod_sm90", "triton_serial"
SHARE_BINS = (0.0, 0.05, 0.1, 0.2, 0.4, 0.7, np.inf)            # share <= 1
SHARE_LABELS = ("[0, 0.05)", "[0.05, 0.1)", "[0.1, 0.2)", "[0.2, 0.4)", "[0.4, 0.7)", "[0.7, 1]")
DECODE_MS_BINS = (0.0, 0.3, 0.6, np.inf)
DECODE_MS_LABELS = ("< 0.3", "[0.3, 0.6)", ">= 0.6")
MISROUTED = 1.03        # the rule's path slower than the other by more than this


def _forced(options) -> bool:
    """Whether a row's backend options (JSON) force pod_sm90's SM split."""
    try:
        return bool(json.loads(options).get("pod_sm90_decode_ctas") or 0)
    except (TypeError, ValueError, AttributeError):
        return False


def paired(sp: pd.DataFrame) -> pd.DataFrame:
    """One row per (run, point) where FUSED and SERIAL both ran usable on a hybrid batch: their times,
    the fastest serial path, the rule's features and choice."""
    key = ["run", "point_id"]
    ok = sp[sp["usable"] & sp["backend"].isin([FUSED, SERIAL])]
    # A knob sweep (hopper_split) forces the fused launch's SM split: not the planned launch the rule
    # chooses, so such rows are left out, and so are points a run timed twice.
    if ok.empty:
        return pd.DataFrame()
    if "options" in ok:
        ok = ok.loc[~ok["options"].map(_forced).astype(bool)]
    ok = ok[ok.groupby(key + ["backend"])["backend"].transform("size") == 1]
    if ok.empty:
        return pd.DataFrame()
    t = ok.pivot_table(index=key, columns="backend", values="median_ms", aggfunc="first")
    if FUSED not in t or SERIAL not in t:
        return pd.DataFrame()
    t = t.dropna(subset=[FUSED, SERIAL])
    meta = ok.drop_duplicates(key).set_index(key)
    cols = ["gpu", "sweep", "model", "batch", "num_q_heads", "num_kv_heads", "num_prefill", "num_decode",
            "prefill_flops", "decode_bytes", "best_serial_ms"]
    d = t.join(meta[cols], how="left").reset_index()
    d = d[(d["num_prefill"] > 0) & (d["num_decode"] > 0)].copy()
    if d.empty:
        return d
    tp, td = sm90_estimated_ms(d["prefill_flops"].astype(float), d["decode_bytes"].astype(float))
    group = (d["num_q_heads"] // d["num_kv_heads"]).astype(int)
    d["est_prefill_ms"], d["est_decode_ms"] = tp, td
    d["share"] = np.minimum(tp, td) / np.maximum(tp, td)
    d["kind"] = np.where(group == 1, "MHA", np.where(td >= tp, "GQA, decode larger", "GQA, prefill larger"))
    d["speedup"] = d[SERIAL] / d[FUSED]
    d["rule_fuses"] = [sm90_rule(a, b, g) for a, b, g in zip(tp, td, group)]
    return d


def fused_vs_serial(d: pd.DataFrame) -> pd.DataFrame:
    if d.empty:
        return pd.DataFrame()
    # [lo, hi) bins: the rule's thresholds are >=, so a point at a threshold falls in the bin it fuses in.
    d = d.assign(share_bin=pd.cut(d["share"], SHARE_BINS, right=False, labels=SHARE_LABELS),
                 decode_ms_bin=pd.cut(d["est_decode_ms"], DECODE_MS_BINS, right=False, labels=DECODE_MS_LABELS))
    rows = []   # categories keep the bins in their order
    groups = d.groupby(["gpu", "kind", "share_bin", "decode_ms_bin"], sort=True, observed=True)
    for (gpu, kind, sb, db), g in groups:
        s = g["speedup"]
        rows.append({"gpu": gpu, "kind": kind, "share": str(sb), "est_decode_ms": str(db), "points": len(g),
                     "geomean": geomean(s), "min": s.min(), "max": s.max(),
                     "share_faster": float((s > 1).mean()),
                     "rule_fuses": int(g["rule_fuses"].sum()),
                     "sweeps": ", ".join(sorted(g["sweep"].unique()))})
    return pd.DataFrame(rows)


def dispatch_rule(d: pd.DataFrame) -> pd.DataFrame:
    if d.empty:
        return pd.DataFrame()
    chosen = d[FUSED].where(d["rule_fuses"], d[SERIAL])
    other = d[SERIAL].where(d["rule_fuses"], d[FUSED])
    d = d.assign(rule=d["best_serial_ms"] / chosen, better=d["best_serial_ms"] / np.minimum(d[FUSED], d[SERIAL]),
                 misrouted=chosen > MISROUTED * other)
    rows = []
    for (gpu, sweep), g in d.groupby(["gpu", "sweep"], sort=True):
        rows.append({"gpu": gpu, "sweep": sweep, "points": len(g), "rule_fuses": int(g["rule_fuses"].sum()),
                     "rule_geomean": geomean(g["rule"]), "rule_min": g["rule"].min(),
                     "better_of_two_geomean": geomean(g["better"]), "misrouted": int(g["misrouted"].sum()),
                     "misrouted_batches": "; ".join(g.loc[g["misrouted"], "batch"].head(6))})
    return pd.DataFrame(rows)


def tables(sp: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """{name: table} from attention_speedups rows; {} where no run has both paths."""
    d = paired(sp)
    if d.empty:
        return {}
    return {"fused_vs_serial": fused_vs_serial(d), "dispatch_rule": dispatch_rule(d)}
