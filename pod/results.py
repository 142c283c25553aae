"""Tidy result rows: the schema, an append-only CSV store with resume, a loader, and W&B logging.

One row per (point, backend). Columns (in this order, `COLUMNS`):
  point_id            stable hash of (model name, batch spec) - the same for every backend of a point
  sweep, backend, model
  num_q_heads, num_kv_heads, head_dim, dtype
  kv_layout           "contiguous" | "paged": the layout the backend actually ran (a contiguous-only
                      backend on a paged point runs the contiguous batch of the same spec)
  page_size           tokens per page of that layout; 0 for contiguous
  num_prefill, chunk_len, prefill_context_len   chunk_len/context of the first chunk (0 if none)
  num_decode, decode_context_len                mean decode context, rounded (0 if none)
  batch               BatchSpec.describe() of the spec that ran
  status              "ok" | "skipped" | "error" | "oom";  reason: why, for anything but ok
  median_ms, p20_ms, p80_ms, timing_meaningful  (timing_meaningful is False on CPU/interpreter)
  prefill_err, decode_err   max relative error vs the fp32 reference (NaN: part not computed/absent)
  prefill_flops, decode_bytes, tflops, gbps     tflops = prefill_flops / median time and
                      gbps = decode_bytes / median time, both over the WHOLE run() time (for a
                      prefill-only or decode-only point that is the kernel's own rate)
  backend_config      JSON string of backend knobs ("{}" if none; a backend exposes them by setting
                      `run.backend_config = {...}` on the callable its prepare returns)
  gpu, driver, torch, triton, flashinfer, git_commit, timestamp   (see pod.provenance)

Storage: one CSV file per (sweep, device[, shard]), e.g. results/paper/h100.csv, appended one row
at a time and flushed, so a sweep that dies half-way loses at most the row in flight. Parquet cannot
be appended cheaply, so it is only an export format (`load_results(...).to_parquet(...)`).
`load_results` reads one file or every *.csv / *.parquet under a directory into one DataFrame
with the column types below.
"""
from __future__ import annotations

import csv
import json
import math
import os
import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping

import pandas as pd

from pod.provenance import PROVENANCE_COLUMNS

_INT = "Int64"     # pandas nullable integer: survives a CSV round trip with missing values
_FLOAT = "float64"
_STR = "string"
_BOOL = "boolean"

SCHEMA: dict[str, str] = {
    "point_id": _STR, "sweep": _STR, "backend": _STR, "model": _STR,
    "num_q_heads": _INT, "num_kv_heads": _INT, "head_dim": _INT, "dtype": _STR,
    "kv_layout": _STR, "page_size": _INT,
    "num_prefill": _INT, "chunk_len": _INT, "prefill_context_len": _INT,
    "num_decode": _INT, "decode_context_len": _INT,
    "batch": _STR, "status": _STR, "reason": _STR,
    "median_ms": _FLOAT, "p20_ms": _FLOAT, "p80_ms": _FLOAT, "timing_meaningful": _BOOL,
    "prefill_err": _FLOAT, "decode_err": _FLOAT,
    "prefill_flops": _INT, "decode_bytes": _INT, "tflops": _FLOAT, "gbps": _FLOAT,
    "backend_config": _STR,
    **{c: _STR for c in PROVENANCE_COLUMNS},
}
COLUMNS: tuple[str, ...] = tuple(SCHEMA)
STATUSES = ("ok", "skipped", "error", "oom")
DONE_STATUSES = frozenset({"ok", "skipped"})


def _cell(v: Any) -> Any:
    """A CSV cell: None/NaN -> empty, dicts/lists -> JSON, everything else as is."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, (dict, list, tuple)):
        return json.dumps(v, sort_keys=True)
    return v


class ResultStore:
    """Append-only CSV of result rows with resume: `done()` is what a restarted sweep skips.

    `siblings` are other files whose rows also count as done for resume (the other shards of
    the same sweep and device), so re-sharding a sweep does not re-run finished points.
    """

    def __init__(self, path: str | os.PathLike, siblings: Iterable[str | os.PathLike] = ()):
        self.path = Path(path)
        self.siblings = [Path(p) for p in siblings if Path(p) != self.path]

    def read(self, include_siblings: bool = False) -> pd.DataFrame:
        files = [self.path] + (self.siblings if include_siblings else [])
        frames = [read_table(f) for f in files if f.exists() and f.stat().st_size > 0]
        return _concat(frames)

    def done(self, rerun_errors: bool = False) -> set[tuple[str, str]]:
        """(point_id, backend) pairs already recorded; errors/ooms count only unless rerun_errors."""
        df = self.read(include_siblings=True)
        if df.empty:
            return set()
        keep = df["status"].isin(DONE_STATUSES) if rerun_errors else df["status"].notna()
        return set(zip(df.loc[keep, "point_id"], df.loc[keep, "backend"]))

    def append(self, row: Mapping[str, Any]) -> None:
        unknown = set(row) - set(COLUMNS)
        if unknown:
            raise KeyError(f"row has columns outside the schema: {sorted(unknown)}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = not self.path.exists() or self.path.stat().st_size == 0
        with open(self.path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS)
            if new:
                w.writeheader()
            w.writerow({c: _cell(row.get(c)) for c in COLUMNS})
            f.flush()
            os.fsync(f.fileno())

    def compact(self) -> pd.DataFrame:
        """Rewrite the file keeping the last row of each (point_id, backend) (errors re-run later
        replace their earlier row). Returns the compacted table."""
        df = self.read()
        if df.empty:
            return df
        df = df.drop_duplicates(["point_id", "backend"], keep="last").reset_index(drop=True)
        tmp = self.path.with_suffix(".tmp")
        df.to_csv(tmp, index=False)
        tmp.replace(self.path)
        return df


_BOOL_CELLS = {"True": True, "False": False, "true": True, "false": False, "1": True, "0": False,
               True: True, False: False}


def _typed(df: pd.DataFrame) -> pd.DataFrame:
    for c in COLUMNS:
        if c not in df.columns:
            df[c] = pd.NA
    extra = [c for c in df.columns if c not in SCHEMA]
    df = df[list(COLUMNS) + extra]
    for c, t in SCHEMA.items():
        if t == _BOOL:
            df[c] = df[c].astype("object").map(_BOOL_CELLS)
        if t == _STR:
            df[c] = df[c].astype("object").where(df[c].notna(), "").astype(_STR)
        elif t in (_INT, _FLOAT):
            df[c] = pd.to_numeric(df[c].astype("object"), errors="coerce").astype(t)
        else:
            df[c] = df[c].astype(t)
    return df


def _concat(frames: list[pd.DataFrame]) -> pd.DataFrame:
    frames = [f for f in frames if not f.empty]
    if not frames:
        return _typed(pd.DataFrame(columns=list(COLUMNS)))
    return _typed(pd.concat(frames, ignore_index=True))


def read_table(path: str | os.PathLike) -> pd.DataFrame:
    path = Path(path)
    if path.suffix == ".parquet":
        return _typed(pd.read_parquet(path))
    return _typed(pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""]))


def is_results_file(path: str | os.PathLike) -> bool:
    """A CSV/Parquet file whose header has the key columns of result rows (summary tables and
    figure data that live next to results are not)."""
    path = Path(path)
    try:
        if path.suffix == ".csv":
            with open(path, newline="") as f:
                header = next(csv.reader(f), [])
        elif path.suffix == ".parquet":
            import pyarrow.parquet as pq
            header = pq.read_schema(path).names
        else:
            return False
    except (OSError, ValueError, ImportError):
        return False
    return {"point_id", "backend", "status"} <= set(header)


def load_results(path: str | os.PathLike) -> pd.DataFrame:
    """All rows of a results file, or of every result-row *.csv/*.parquet under a directory
    (recursively; other tables found there, e.g. figure summaries, are ignored)."""
    path = Path(path)
    if path.is_file():
        return read_table(path)
    files = sorted(p for p in path.rglob("*") if p.is_file() and is_results_file(p))
    return _concat([read_table(f) for f in files])


# -- Weights & Biases ---------------------------------------------------------------------------
class WandbLogger:
    """Logs the run config, each row's metrics and the final table to W&B; a no-op when disabled.

    Offline unless the user set WANDB_MODE; wandb missing -> one warning, then a no-op.
    """

    METRICS = ("median_ms", "p20_ms", "p80_ms", "prefill_err", "decode_err", "tflops", "gbps")

    def __init__(self, enabled: bool, project: str = "pod-attention", config: dict | None = None,
                 name: str | None = None, group: str | None = None, tags: Iterable[str] = (),
                 dir: str | None = None, mode: str = "offline"):
        self.run = None
        self._wandb = None
        if not enabled:
            return
        try:
            import wandb
        except ImportError:
            warnings.warn("wandb is not installed: W&B logging is off (pip install wandb)", stacklevel=2)
            return
        os.environ.setdefault("WANDB_MODE", mode)
        self._wandb = wandb
        # A previous run still open in this process (reproduce runs several sweeps) is finished first.
        if getattr(wandb, "run", None) is not None:
            wandb.run.finish()
        kwargs = dict(project=project, config=config or {}, name=name, group=group, tags=list(tags))
        if dir:
            Path(dir).mkdir(parents=True, exist_ok=True)
            kwargs["dir"] = dir
        try:
            self.run = wandb.init(**kwargs)
        except Exception as e:  # a broken W&B setup must never cost a sweep
            warnings.warn(f"wandb.init failed, W&B logging is off: {e}", stacklevel=2)
            self.run = None

    def log_row(self, row: Mapping[str, Any]) -> None:
        if self.run is None:
            return
        data = {"point_id": row["point_id"], "backend": row["backend"], "status": row["status"]}
        for k in self.METRICS:
            v = row.get(k)
            if isinstance(v, (int, float)) and v is not None and math.isfinite(v):
                data[f"{row['backend']}/{k}"] = v
        self.run.log(data)

    def finish(self, table: pd.DataFrame | None = None) -> None:
        if self.run is None:
            return
        if table is not None and not table.empty:
            df = table.astype(object).where(table.notna(), None)
            self.run.log({"results": self._wandb.Table(dataframe=df)})
        self.run.finish()
        self.run = None
