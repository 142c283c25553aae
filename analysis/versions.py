"""A baseline at another release than the pinned one, point by point against the pinned release's rows.

Rows of the same sweeps run with another release of a baseline package installed (FlashInfer 0.7.2 beside
the pinned 0.6.6: `SITE_PREFIX=/tmp/site_fi072 RESULTS_DIR=.gpu_results/versions/flashinfer_0.7.2 bash
scripts/gpu_session.sh sweep:paper:all:fi_serial,fi_pod,fi_batched` on the GPU machine) live under
`results/<gpu>/versions/<label>/<sweep>/`, out of the main tables (analysis.load skips `versions/`).
`version_table` pairs each such row with the main row of the same sweep, point and backend (both usable:
status ok, output within tolerance) and reports, per label and backend, the other release's speed-up over
the pinned one: pinned ms / other ms (> 1: the other release is faster). The two releases ran in separate
processes, so the ratios carry run-to-run noise (a few %), unlike the speed-ups within one run.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from analysis.load import load_results
from analysis.speedup import flag_rows, geomean

VERSIONS_DIR = "versions"
KEY = ["sweep", "point_id", "backend"]


def load_versions(root: str | Path) -> pd.DataFrame:
    """Attention rows under root/versions/<label>/ with a `label` column; empty if there are none."""
    base = Path(root) / VERSIONS_DIR
    frames = []
    if base.is_dir():
        for d in sorted(p for p in base.iterdir() if p.is_dir()):
            rows = load_results(d).attention
            if not rows.empty:
                frames.append(rows.assign(label=d.name))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _latest_usable(rows: pd.DataFrame, key: list[str]) -> pd.DataFrame:
    """The usable rows, one per (sweep, point, backend): the newest where a key has several (a re-run, a
    knob sweep's extra files), so a point is compared once; FlashInfer's version "" where not recorded."""
    ok = flag_rows(rows).query("usable").copy()
    ok["flashinfer"] = ok["flashinfer"].astype("string").fillna("") if "flashinfer" in ok else ""
    ok["_when"] = ok["timestamp"].astype("string").fillna("") if "timestamp" in ok else ""
    return ok.sort_values("_when", kind="stable").groupby(key, sort=False).tail(1)


def version_table(main: pd.DataFrame, other: pd.DataFrame) -> pd.DataFrame:
    """Per (label, backend): points compared, the packages' versions as recorded (FlashInfer's column),
    and the geomean / min / max of pinned ms / other ms over those points."""
    cols = ["label", "backend", "points", "pinned", "other", "speedup_geomean", "speedup_min", "speedup_max"]
    if main.empty or other.empty:
        return pd.DataFrame(columns=cols)
    ok_main, ok_other = _latest_usable(main, KEY), _latest_usable(other, ["label", *KEY])
    pairs = ok_other.merge(ok_main[KEY + ["median_ms", "flashinfer"]], on=KEY, suffixes=("", "_pinned"))
    rows = []
    for (label, backend), g in pairs.groupby(["label", "backend"], sort=True):
        ratio = (g["median_ms_pinned"] / g["median_ms"]).astype(float)
        rows.append(dict(label=label, backend=backend, points=len(g),
                         pinned=", ".join(sorted(set(g["flashinfer_pinned"]))),
                         other=", ".join(sorted(set(g["flashinfer"]))),
                         speedup_geomean=round(geomean(ratio), 3), speedup_min=round(float(np.min(ratio)), 3),
                         speedup_max=round(float(np.max(ratio)), 3)))
    return pd.DataFrame(rows, columns=cols)
