"""The result-row schemas, defined once: attention/kernel rows (the harness) and serving rows (the
serving engine) share the provenance and options columns. analysis/load.py reads both with these.

Attention (and kernel) rows, one per (point, backend), columns in this order (`ATTENTION_COLUMNS`):
  point_id            stable hash of (model name, batch spec) - the same for every backend of a point
  sweep, backend, model
  num_q_heads, num_kv_heads, head_dim, dtype
  kv_layout           "contiguous" | "paged": the layout the backend actually ran (a contiguous-only
                      backend on a paged point runs the contiguous batch of the same spec)
  page_size           tokens per page of that layout; empty for contiguous KV
  num_prefill, chunk_len, prefill_context_len   chunk_len/context of the first chunk (0 if none)
  num_decode, decode_context_len                mean decode context, rounded (0 if none)
  batch               BatchSpec.describe() of the spec that ran
  status              "ok" | "skipped" | "error" | "oom";  reason: why, for anything but ok
  median_ms, p20_ms, p80_ms, timing_meaningful  (timing_meaningful is False on CPU/interpreter)
  cuda_graph          True: timed as replays of one CUDA graph of run(), whose first replay is checked
                      too (timing.cuda_graph); False: eager calls
  prefill_err, decode_err   max relative error vs the fp32 reference (NaN: part not computed/absent)
  prefill_flops, decode_bytes, tflops, gbps     tflops = prefill_flops / median time and
                      gbps = decode_bytes / median time, both over the WHOLE run() time
  backend_config      JSON of the knobs the backend chose ("{}" if none; `run.backend_config`)
  options             JSON of the BackendOptions the run was configured with (conf: backend_options)
  gpu, driver, torch, triton, flashinfer, git_commit, timestamp   (experiments.harness.provenance)

Serving rows, one per (run config, backend): `SERVING_COLUMNS` (metrics: experiments/serving/metrics.py).
Ceiling rows, one per measurement: `CEILING_SCHEMA` (experiments/ceilings.py).

Storage: CSV, appended one row at a time and flushed (`append_row`), so a run that dies half-way loses
at most the row in flight; `read_rows` reads one file back with the column types below, up to its last
complete row (a row cut by a kill, or one another process is writing, is not read; `drop_cut_row` drops
it from the file before rows are appended after it).
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path
from typing import Any, Mapping

import pandas as pd

STR, INT, FLOAT, BOOL = "string", "Int64", "float64", "boolean"   # pandas dtypes (nullable ints)

PROVENANCE_COLUMNS = ("gpu", "driver", "torch", "triton", "flashinfer", "git_commit", "timestamp")
_PROVENANCE = {c: STR for c in PROVENANCE_COLUMNS}

ATTENTION_SCHEMA: dict[str, str] = {
    "point_id": STR, "sweep": STR, "backend": STR, "model": STR,
    "num_q_heads": INT, "num_kv_heads": INT, "head_dim": INT, "dtype": STR,
    "kv_layout": STR, "page_size": INT,
    "num_prefill": INT, "chunk_len": INT, "prefill_context_len": INT,
    "num_decode": INT, "decode_context_len": INT,
    "batch": STR, "status": STR, "reason": STR,
    "median_ms": FLOAT, "p20_ms": FLOAT, "p80_ms": FLOAT, "timing_meaningful": BOOL, "cuda_graph": BOOL,
    "prefill_err": FLOAT, "decode_err": FLOAT,
    "prefill_flops": INT, "decode_bytes": INT, "tflops": FLOAT, "gbps": FLOAT,
    "backend_config": STR, "options": STR,
    **_PROVENANCE,
}

SERVING_SCHEMA: dict[str, str] = {
    "sweep": STR, "backend": STR, "model": STR, "mode": STR, "workload": STR, "num_requests": INT,
    "qps": FLOAT, "load": FLOAT, "chunk_size": INT, "num_layers": INT, "model_num_layers": INT,
    "page_size": INT, "dtype": STR,
    "status": STR, "reason": STR,
    "requests_per_s": FLOAT, "requests_per_min": FLOAT, "steady_requests_per_min": FLOAT,
    "tokens_per_s": FLOAT, "output_tokens_per_s": FLOAT,
    "ttft_p50_ms": FLOAT, "ttft_p99_ms": FLOAT, "tbt_p50_ms": FLOAT, "tbt_p99_ms": FLOAT,
    "decode_gaps": INT, "stalls_200ms": INT, "stall_frac_200ms": FLOAT, "stalls_500ms": INT,
    "stall_frac_500ms": FLOAT,
    "e2e_p50_ms": FLOAT, "e2e_p99_ms": FLOAT,
    "iterations": INT, "hybrid_iterations": INT, "mean_decodes_per_iteration": FLOAT, "preemptions": INT,
    "iteration_p50_ms": FLOAT, "iteration_max_ms": FLOAT,
    "makespan_s": FLOAT, "forward_ms": FLOAT, "attention_ms": FLOAT, "plan_ms": FLOAT,
    "attention_share": FLOAT, "attn_err": FLOAT,
    # a layer cut scaled to the full model: ESTIMATES (experiments/serving/metrics.py says how)
    "layer_ms": FLOAT, "time_scale": FLOAT, "scaled_requests_per_min": FLOAT,
    "scaled_steady_requests_per_min": FLOAT, "scaled_qps": FLOAT,
    "scaled_ttft_p50_ms": FLOAT, "scaled_ttft_p99_ms": FLOAT, "scaled_tbt_p50_ms": FLOAT,
    "scaled_tbt_p99_ms": FLOAT, "scaled_stall_frac_200ms": FLOAT, "scaled_stall_frac_500ms": FLOAT,
    "mean_prompt_len": FLOAT, "mean_output_len": FLOAT, "kv_pages": INT, "timing_meaningful": BOOL,
    "backend_config": STR, "options": STR,
    **_PROVENANCE,
}

# The card's measured ceilings (experiments/ceilings.py), what the roofline figure draws against.
CEILING_SCHEMA: dict[str, str] = {
    "sweep": STR, "gbps": FLOAT, "tflops": FLOAT, "copy_ms": FLOAT, "matmul_ms": FLOAT, **_PROVENANCE,
}

ATTENTION_COLUMNS: tuple[str, ...] = tuple(ATTENTION_SCHEMA)
SERVING_COLUMNS: tuple[str, ...] = tuple(SERVING_SCHEMA)


def numeric_columns(schema: Mapping[str, str]) -> list[str]:
    return [c for c, t in schema.items() if t in (INT, FLOAT)]


def _cell(v: Any) -> Any:
    """A CSV cell: None/NaN -> empty, dicts/lists -> JSON, everything else as is."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, (dict, list, tuple)):
        return json.dumps(v, sort_keys=True)
    return v


def append_row(path: str | os.PathLike, row: Mapping[str, Any], schema: Mapping[str, str]) -> None:
    """Append one row to a CSV with the schema's columns (header written with the first row), flushed
    to disk. A file written under an older schema (its header lacks a column added since) is rewritten
    under this one first: its rows keep their values, the new columns stay empty, and the new row's cells
    land under their own names. A column outside the schema is a KeyError."""
    columns = tuple(schema)
    unknown = set(row) - set(columns)
    if unknown:
        raise KeyError(f"row has columns outside the schema: {sorted(unknown)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    if not new:
        with open(path, newline="") as f:
            header = tuple(next(csv.reader(f), ()))
        if header[:len(columns)] != columns:
            tmp = path.with_suffix(".schema.tmp")
            read_rows(path, schema).to_csv(tmp, index=False)
            tmp.replace(path)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        if new:
            w.writeheader()
        w.writerow({c: _cell(row.get(c)) for c in columns})
        f.flush()
        os.fsync(f.fileno())


def complete_length(data: bytes) -> int:
    """Bytes of CSV `data` up to the end of its last complete row: a row ends at a newline outside quotes.
    CSV doubles a quote inside a quoted field, so a byte lies outside quotes exactly when the quotes
    before it are even."""
    end = len(data)
    while (newline := data.rfind(b"\n", 0, end)) >= 0:
        if data.count(b'"', 0, newline) % 2 == 0:
            return newline + 1
        end = newline
    return 0


def drop_cut_row(path: str | os.PathLike) -> int:
    """Truncate a CSV file to its last complete row (a kill can cut the row being written; rows appended
    after a fragment would be glued to it). Returns the bytes dropped (0: the file was whole or absent)."""
    path = Path(path)
    if not path.exists():
        return 0
    data = path.read_bytes()
    keep = complete_length(data)
    if keep < len(data):
        with open(path, "r+b") as f:
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())
    return len(data) - keep


_BOOL_CELLS = {"True": True, "False": False, "true": True, "false": False, "1": True, "0": False,
               True: True, False: False}


def typed(df: pd.DataFrame, schema: Mapping[str, str]) -> pd.DataFrame:
    """The schema's columns first, in order and with their types (missing ones added empty); other
    columns kept after them."""
    df = df.copy()
    for c in schema:
        if c not in df.columns:
            df[c] = pd.NA
    df = df[list(schema) + [c for c in df.columns if c not in schema]]
    for c, t in schema.items():
        if t == BOOL:
            df[c] = df[c].astype("object").map(_BOOL_CELLS).astype(BOOL)
        elif t == STR:
            df[c] = df[c].astype("object").where(df[c].notna(), "").astype(STR)
        else:
            df[c] = pd.to_numeric(df[c].astype("object"), errors="coerce").astype(t)
    return df


def read_rows(path: str | os.PathLike, schema: Mapping[str, str] = ATTENTION_SCHEMA) -> pd.DataFrame:
    """One CSV or Parquet file of rows, typed by `schema` (a CSV up to its last complete row)."""
    path = Path(path)
    if path.suffix == ".parquet":
        return typed(pd.read_parquet(path), schema)
    data = path.read_bytes()
    data = data[:complete_length(data)]
    if not data:
        return empty_rows(schema)
    return typed(pd.read_csv(io.BytesIO(data), dtype=str, keep_default_na=False, na_values=[""]), schema)


def empty_rows(schema: Mapping[str, str] = ATTENTION_SCHEMA) -> pd.DataFrame:
    return typed(pd.DataFrame(columns=list(schema)), schema)
