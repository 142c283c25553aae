"""Read result files (Parquet / CSV / JSON lines) into tidy pandas DataFrames.

A results folder holds any number of tables, each written by one run of the harness (attention rows),
of the serving simulator (serving rows) or of the ceiling measurement. Files are told apart by their
columns, not their names:
  attention rows: have `point_id` and `backend` (one row per (point, backend))
  serving rows:   have `tokens_per_s` or `ttft_p50_ms`
Both schemas (and the provenance columns they share) are experiments.harness.schema's; contiguous KV
has no page size (NaN; older rows wrote 0).
  ceilings:       a file whose name contains "ceiling", or attention rows with sweep == "ceilings";
                  columns `gpu`, `tflops` (measured dense bf16 matmul TFLOP/s), `gbps` (measured copy GB/s)
Every row gets `source` (the file, relative to the folder read) and `run` (the harness's `run_id` when
the rows carry one, else the source file: one file is one run). Speed-ups only compare rows of one run.

Folders named `figures`, `summary` (our own outputs), `smoke` (CPU interpreter runs, git-ignored),
`versions` (a baseline at another release: analysis.versions) and `logs` (a session's records: partial or
superseded rows kept beside its logs) are skipped below the folder asked for, unless the folder asked for
is (inside) one of them.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from experiments.harness import schema

ATTENTION_COLUMNS = list(schema.ATTENTION_COLUMNS)
SERVING_COLUMNS = list(schema.SERVING_COLUMNS)
CEILING_COLUMNS = ["gpu", "tflops", "gbps"]

_ATTENTION_NUMERIC = schema.numeric_columns(schema.ATTENTION_SCHEMA)
# Text columns read as text: a commit such as 454e176 or a point id of digits and one "e" is a number to
# read_csv's guessing (4.54e178), and the provenance would come back garbled.
_TEXT = {c: str for sch in (schema.ATTENTION_SCHEMA, schema.SERVING_SCHEMA) for c, t in sch.items() if t == schema.STR}
_SERVING_NUMERIC = schema.numeric_columns(schema.SERVING_SCHEMA)
# Other spellings of the ceiling columns a measurement script might write.
_CEILING_ALIASES = {"peak_tflops": "tflops", "matmul_tflops": "tflops", "peak_gbps": "gbps",
                    "copy_gbps": "gbps"}

RESULT_SUFFIXES = (".parquet", ".pq", ".csv", ".jsonl")
SKIP_DIRS = frozenset({"figures", "summary", "smoke", ".ipynb_checkpoints", "wandb", "versions", "logs"})


@dataclass
class Results:
    attention: pd.DataFrame
    serving: pd.DataFrame
    ceilings: pd.DataFrame
    root: Path

    @property
    def empty(self) -> bool:
        return self.attention.empty and self.serving.empty

    def gpus(self) -> list[str]:
        """GPU names found in the provenance columns of every table (for figure titles)."""
        names: set[str] = set()
        for df in (self.attention, self.serving):
            if "gpu" in df:
                names.update(str(g) for g in df["gpu"].dropna().unique() if str(g).strip())
        return sorted(names)


def find_result_files(path: str | Path) -> list[Path]:
    """Result tables under `path` (or `path` itself if it is a file), sorted, own outputs skipped."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        return []
    skip = SKIP_DIRS - set(path.resolve().parts)  # reading results/smoke itself reads its sweeps
    files = []
    for f in sorted(path.rglob("*")):
        rel = f.relative_to(path)
        if f.is_file() and f.suffix in RESULT_SUFFIXES and not (set(rel.parts[:-1]) & skip):
            files.append(f)
    return files


def read_table(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    if path.suffix in (".parquet", ".pq"):
        return pd.read_parquet(path)
    if path.suffix == ".jsonl":
        return pd.read_json(path, lines=True)
    return pd.read_csv(path, dtype=_TEXT)


def kind_of(df: pd.DataFrame, path: Path) -> str | None:
    """'attention' | 'serving' | 'ceilings' | None (not a result table)."""
    cols = set(df.columns)
    if "ceiling" in path.stem.lower():
        return "ceilings"
    if "tokens_per_s" in cols or "ttft_p50_ms" in cols:
        return "serving"
    if {"point_id", "backend"} <= cols:
        return "attention"
    return None


def _as_bool(s: pd.Series) -> pd.Series:
    """CSV round trips turn booleans into strings: map them back; missing -> False."""
    if s.dtype == bool:
        return s
    m = {"true": True, "1": True, "1.0": True, "false": False, "0": False, "0.0": False}
    return s.map(lambda v: v if isinstance(v, bool) else m.get(str(v).strip().lower(), False)).astype(bool)


def _normalise(df: pd.DataFrame, columns: list[str], numeric: list[str]) -> pd.DataFrame:
    df = df.copy()
    for c in columns:
        if c not in df:
            df[c] = pd.NA
    for c in numeric:
        df[c] = pd.to_numeric(df[c], errors="coerce").astype(float)
    for c in ("sweep", "backend", "model", "status", "dtype", "kv_layout", "gpu", "mode"):
        if c in df:
            df[c] = df[c].astype("string").fillna("")
    return df


def normalise_attention(df: pd.DataFrame) -> pd.DataFrame:
    df = _normalise(df, ATTENTION_COLUMNS, _ATTENTION_NUMERIC)
    df["timing_meaningful"] = _as_bool(df["timing_meaningful"])
    df.loc[df["kv_layout"] == "contiguous", "page_size"] = float("nan")
    df["status"] = df["status"].str.lower()
    return df


def normalise_serving(df: pd.DataFrame) -> pd.DataFrame:
    df = _normalise(df, SERVING_COLUMNS, _SERVING_NUMERIC)
    df["timing_meaningful"] = _as_bool(df["timing_meaningful"])
    return df


def normalise_ceilings(df: pd.DataFrame) -> pd.DataFrame:
    df = df.rename(columns={k: v for k, v in _CEILING_ALIASES.items() if k in df and v not in df})
    return _normalise(df, CEILING_COLUMNS, ["tflops", "gbps"])[CEILING_COLUMNS + ["source"]]


def load_results(path: str | Path) -> Results:
    """Every result table under `path`, concatenated per kind. Missing schema columns are added as NA
    so downstream code can rely on them; an empty folder gives empty tables (check `Results.empty`)."""
    root = Path(path)
    parts: dict[str, list[pd.DataFrame]] = {"attention": [], "serving": [], "ceilings": []}
    for f in find_result_files(root):
        df = read_table(f)
        kind = kind_of(df, f)
        if kind is None or df.empty:
            continue
        df = df.copy()
        df["source"] = str(f.relative_to(root)) if root.is_dir() else f.name
        if "run_id" in df:
            df["run"] = df["run_id"].astype("string").fillna(df["source"])
        else:
            df["run"] = df["source"]
        if kind == "attention" and "sweep" in df and (df["sweep"] == "ceilings").any():
            is_ceiling = df["sweep"] == "ceilings"
            parts["ceilings"].append(df[is_ceiling])
            df = df[~is_ceiling]
        parts[kind].append(df)

    def cat(frames, columns):
        frames = [f for f in frames if not f.empty]
        if not frames:
            return pd.DataFrame({c: pd.Series(dtype="object") for c in [*columns, "source", "run"]})
        return pd.concat(frames, ignore_index=True)

    attention = normalise_attention(cat(parts["attention"], ATTENTION_COLUMNS))
    serving = normalise_serving(cat(parts["serving"], SERVING_COLUMNS))
    ceilings = normalise_ceilings(cat(parts["ceilings"], CEILING_COLUMNS))
    return Results(attention=attention, serving=serving, ceilings=ceilings, root=root)
