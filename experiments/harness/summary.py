"""What a finished sweep says: rows over the error threshold (a warning listing them) and the status
counts of its results file (the last line the harness prints)."""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pandas as pd


def error_summary(df: pd.DataFrame, threshold: float) -> pd.DataFrame:
    """Rows whose output error exceeds `threshold` (either part)."""
    if df.empty:
        return df
    bad = (df["prefill_err"].astype(float) > threshold) | (df["decode_err"].astype(float) > threshold)
    return df[bad.fillna(False)]


def report(df: pd.DataFrame, path: Path, threshold: float) -> None:
    """Warn about ok rows above `threshold`, then print the file's row count per status."""
    bad = error_summary(df[df["status"] == "ok"] if not df.empty else df, threshold)
    if len(bad):
        lines = "\n".join(f"  {r.backend:<18} {r.batch}  prefill_err={r.prefill_err:.3g} "
                          f"decode_err={r.decode_err:.3g}" for r in bad.itertuples())
        warnings.warn(f"{len(bad)} result rows exceed error_threshold={threshold:g}:\n{lines}",
                      stacklevel=3)
    counts = df["status"].value_counts().to_dict() if not df.empty else {}
    print(f"[harness] {path}: {len(df)} rows {counts}", file=sys.stderr)
