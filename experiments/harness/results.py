"""Where result rows go: an append-only CSV store with resume.

Rows follow experiments.harness.schema (one schema for attention, kernel and serving rows). One CSV
file per (sweep, device[, shard]), e.g. results/paper/h100.csv, appended one row at a time; tables
are read back for analysis by analysis.load.load_results.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import pandas as pd

from experiments.harness.schema import ATTENTION_SCHEMA, append_row, drop_cut_row, empty_rows, read_rows, typed

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

    def drop_cut_row(self) -> int:
        """Before appending: drop a row a killed run left cut at the end of this file (it was not done;
        the sweep runs it again). Returns the bytes dropped."""
        return drop_cut_row(self.path)

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
