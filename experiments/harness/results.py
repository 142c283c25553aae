"""Where result rows go: an append-only CSV store with resume, and Weights & Biases logging.

Rows follow experiments.harness.schema (one schema for attention, kernel and serving rows). One CSV
file per (sweep, device[, shard]), e.g. results/paper/h100.csv, appended one row at a time; tables
are read back for analysis by analysis.load.load_results.
"""
from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping

import pandas as pd

from experiments.harness.schema import ATTENTION_SCHEMA, append_row, empty_rows, read_rows, typed

DONE_STATUSES = frozenset({"ok", "skipped"})


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
        frames = [read_rows(f) for f in files if f.exists() and f.stat().st_size > 0]
        frames = [f for f in frames if not f.empty]
        return typed(pd.concat(frames, ignore_index=True), ATTENTION_SCHEMA) if frames else empty_rows()

    def done(self, rerun_errors: bool = False) -> set[tuple[str, str]]:
        """(point_id, backend) pairs already recorded; errors/ooms count only unless rerun_errors."""
        df = self.read(include_siblings=True)
        if df.empty:
            return set()
        keep = df["status"].isin(DONE_STATUSES) if rerun_errors else df["status"].notna()
        return set(zip(df.loc[keep, "point_id"], df.loc[keep, "backend"]))

    def append(self, row: Mapping[str, Any]) -> None:
        append_row(self.path, row, ATTENTION_SCHEMA)

    def check_writable(self) -> None:
        """Raise a one-line OSError now, before any point runs, if rows cannot be appended here."""
        existed = self.path.exists()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a"):
                pass
            if not existed:
                self.path.unlink()
        except OSError as e:
            raise OSError(f"results file {self.path} is not writable ({e.strerror or e}); "
                          f"choose another folder with results_dir=<folder>") from None

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


# -- Weights & Biases ---------------------------------------------------------------------------
class WandbLogger:
    """Logs the run config, each row's metrics and the final table to W&B; a no-op when disabled.

    Offline unless the user set WANDB_MODE; wandb missing -> one warning, then a no-op.
    """

    METRICS = ("median_ms", "p20_ms", "p80_ms", "prefill_err", "decode_err", "tflops", "gbps")

    def __init__(self, enabled: bool, project: str = "pod-attention", config: dict | None = None,
                 name: str | None = None, group: str | None = None, tags: Iterable[str] = (),
                 dir: str | None = None, mode: str = "offline", quiet: bool = False):
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
        if quiet:                        # W&B's banner and sync hints would bury the harness's summary
            os.environ.setdefault("WANDB_SILENT", "true")
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
