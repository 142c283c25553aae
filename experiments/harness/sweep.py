"""The experiment: a sweep config -> its points on every backend -> rows appended, resumable.

Library code behind `experiments/attention.py` (the Hydra entry point) and `experiments/reproduce.py`:

  run_sweep(cfg) -> DataFrame   expand the points, shard, refuse what cannot run, resume, run each point
                                on each backend, append every row, log to W&B, summarise
  main(cfg, command) -> status  run_sweep for a command line: refusals and Ctrl-C in one line

The parts it is made of, each its own module:
  points.py    sweep config -> Points (validated BatchSpecs), shards
  running.py   one point on each backend: the batch in its layout, prepare, checked run, timed
  timing.py    do_bench on a GPU, eager or through a CUDA graph; one wall-clock call on a CPU
  paths.py     the device of a run and the results file its rows go to
  results.py   the append-only row store (resume)
  wandb_log.py W&B logging
  summary.py   rows over the error threshold, status counts
Before the first point, `run_sweep` refuses in one line what cannot run: an invalid value (a point's
field, num_shards, shard, cpu_max_kv_tokens, timing, a device this machine lacks), an unknown backend name
(the registered names listed), a GPU sweep, a GPU-sized point or CUDA-graph timing on a CPU, an unwritable
results file. Ctrl-C stops with
`SweepInterrupted` (rows already appended stay, a restart resumes after them).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import pandas as pd
import torch
from hydra.errors import CompactHydraException

from baselines.registry import Backend, BackendOptions, UnknownBackend, list_backends
from experiments.cli import command
from experiments.harness.paths import resolve_device, results_path, shard_count
from experiments.harness.points import Point, expand_points, kv_tokens, shard, to_container
from experiments.harness.provenance import device_slug, provenance
from experiments.harness.results import ResultStore
from experiments.harness.running import run_backend, run_point, spec_for_backend
from experiments.harness.summary import report
from experiments.harness.timing import TimingConfig
from experiments.harness.wandb_log import WandbLogger


def backends_by_name(names: Iterable[str]) -> list[Backend]:
    """The registered backends in the order asked; an unknown name raises UnknownBackend (listing
    the registered names) before anything runs."""
    registered = list_backends()
    unknown = [n for n in names if n not in registered]
    if unknown:
        raise UnknownBackend(f"unknown backend {', '.join(map(repr, unknown))}; registered: "
                             f"{', '.join(registered)}")
    return [registered[n] for n in names]


class SweepRefused(ValueError):
    """A sweep that cannot run as configured (said in one line before the first point): an invalid
    value (the message names the key), a GPU sweep on a CPU, a device this machine lacks."""


class ShardFailed(CompactHydraException):
    """A job of a multirun (one shard) that ended with a non-zero status. Raised, not sys.exit: Hydra
    records it as that job's failure and the launcher lets the other shards finish (a SystemExit in a
    joblib worker would abort them mid-row); the multirun then ends with its message, one line."""


class SweepInterrupted(KeyboardInterrupt):
    """Ctrl-C during a sweep: the rows appended so far stay in `path`; rerunning resumes."""

    def __init__(self, path: Path, rows_kept: int):
        super().__init__(f"{rows_kept} rows kept in {path}")
        self.path, self.rows_kept = path, rows_kept


def refuse_on_cpu(sweep: Mapping[str, Any], points: Sequence[Point], device: torch.device, limit: int) -> None:
    """On a CPU the kernels run in Triton's interpreter and the fp32 reference on the CPU: a GPU sweep
    (`gpu_only: true` in its config) or a GPU-sized point would take many minutes or mean nothing.
    Refuse such a sweep in one line (SweepRefused) before it starts, saying what runs instead."""
    if device.type == "cuda" or not points:
        return
    name = sweep.get("name")
    smoke = command("experiments.attention sweep=smoke backend=cpu")
    if sweep.get("gpu_only"):
        raise SweepRefused(f"sweep={name} is GPU-only (its points are sized for a GPU); run it on a CUDA "
                           f"GPU, or on this CPU: {smoke}")
    big = max(points, key=lambda p: kv_tokens(p.spec))
    need = kv_tokens(big.spec)
    if need > limit:
        instead = f"cpu_max_kv_tokens={need} runs it anyway (slowly)"
        if name != "smoke":
            instead = f"run it on a CUDA GPU, or on this CPU: {smoke}; or {instead}"
        raise SweepRefused(
            f"sweep={name} is GPU-only here: point {big.spec.describe()} holds {need:,} KV "
            f"tokens, more than cpu_max_kv_tokens={limit:,} that the Triton interpreter runs in reasonable "
            f"time; {instead}")


def _count(c: Mapping[str, Any], key: str, default: int, least: int, what: str) -> int:
    """c[key] as an int >= least, or SweepRefused naming the key and what it takes."""
    v = c.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or v < least:
        raise SweepRefused(f"{key}={v!r} is invalid: {what}")
    return v


def _run_settings(c: Mapping[str, Any]) -> tuple[int, int, int, torch.device]:
    """(shard, num_shards, cpu_max_kv_tokens, device) of a config, each checked with a message naming it."""
    try:
        num_shards = shard_count(c.get("num_shards", 1))
    except ValueError as e:
        raise SweepRefused(str(e)) from None
    shard_index = _count(c, "shard", 0, 0, f"one of 0..{num_shards - 1} (num_shards={num_shards})")
    if shard_index >= num_shards:
        raise SweepRefused(f"shard={shard_index} is invalid: one of 0..{num_shards - 1} (num_shards={num_shards})")
    limit = _count(c, "cpu_max_kv_tokens", 16384, 0, "a non-negative number of KV tokens (default 16384)")
    try:
        device = resolve_device(str(c.get("device", "auto")), shard_index)
    except ValueError as e:
        raise SweepRefused(str(e)) from None
    return shard_index, num_shards, limit, device


def _setup_interpreter(cfg: Mapping[str, Any], device: torch.device) -> None:
    """On a CPU device Triton kernels run in the interpreter (CPU tensors): set it before any kernel
    module is imported (the registry imports backend modules lazily, after this)."""
    mode = str(cfg.get("interpret", "auto")).lower()
    if mode == "true" or (mode == "auto" and device.type != "cuda"):
        os.environ.setdefault("TRITON_INTERPRET", "1")


def run_sweep(cfg: Any) -> pd.DataFrame:
    """The whole experiment from a config (a composed Hydra DictConfig or a plain dict).

    Keys: sweep {name, base, grids, points}, models {name: {num_q_heads, num_kv_heads, head_dim}},
    model (optional, added to models under its `name`), backend {names}, backend_options, device,
    seed, timing {warmup_ms, rep_ms, cuda_graph}, fallback_page_size, results_dir, results_file, shard, num_shards,
    rerun_errors, error_threshold, progress, interpret, cpu_max_kv_tokens,
    wandb {enabled, project, mode, dir, tags} (conf/attention.yaml documents each). Returns every row
    of this run's results file (earlier runs' rows included).

    Refuses before the first point (UnknownBackend, SweepRefused, OSError): an invalid value, an
    unknown backend name, a GPU sweep (`gpu_only`) or a GPU-sized point on a CPU, an unwritable results
    file. Raises SweepInterrupted on Ctrl-C and CudaContextLost after a backend breaks the CUDA context
    (its error row is written first); in both cases a restart resumes.
    """
    full_cfg = to_container(cfg)
    c = dict(full_cfg)
    shard_index, num_shards, cpu_limit, device = _run_settings(c)
    c["num_shards"] = num_shards          # `gpus` as the count it stands for (the results file's name)
    sweep_name = str(c["sweep"]["name"])
    models = dict(c.get("models") or {})
    if c.get("model"):   # the `model` group's choice is always known by its name
        models[str(c["model"]["name"])] = c["model"]
    try:   # a value BatchSpec (or the harness) refuses: one line naming the field, not a traceback
        points = shard(expand_points(c["sweep"], models), shard_index, num_shards)
        options = BackendOptions.from_config(c.get("backend_options"))
        timing = TimingConfig.from_config(c.get("timing"))
    except ValueError as e:
        raise SweepRefused(f"sweep={sweep_name}: {e}") from None
    if timing.cuda_graph and device.type != "cuda":
        raise SweepRefused(f"timing.cuda_graph=true times replays of CUDA graphs, which need a CUDA GPU "
                           f"(device={device} here); on this CPU leave it false")
    refuse_on_cpu(c["sweep"], points, device, cpu_limit)
    _setup_interpreter(c, device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backends = backends_by_name(list(c["backend"]["names"]))

    path, siblings = results_path(c, device)
    store = ResultStore(path, siblings)
    store.check_writable()
    if store.drop_cut_row():
        print(f"[harness] {path}: its last row was cut (a killed run); dropped, it runs again", file=sys.stderr)
    done = store.done(rerun_errors=bool(c.get("rerun_errors", False)))
    seed = int(c.get("seed", 0))
    fallback_page = int(c.get("fallback_page_size", 16))

    # Per point: the backends still to run, and those that cannot run here (skipped at once, outside
    # the progress bar, so its rate and ETA count only the runs that take time).
    todo = []
    for p in points:
        run, skip = [], []
        for b in backends:
            if (p.point_id, b.name) in done:
                continue
            why = b.availability() or b.unavailable_for(spec_for_backend(p.spec, b, fallback_page))
            (skip if why else run).append(b)
        todo.append((p, run, skip))
    n_run = sum(len(r) for _, r, _ in todo)
    n_skip = sum(len(s_) for _, _, s_ in todo)
    n_done = sum(1 for p in points for b in backends if (p.point_id, b.name) in done)
    print(f"[harness] sweep={sweep_name} points={len(points)} backends={len(backends)} device={device} "
          f"-> {path} ({n_done} done earlier, {n_run} to run, {n_skip} skipped here)", file=sys.stderr)

    wb_cfg = dict(c.get("wandb") or {})
    wandb = WandbLogger(bool(wb_cfg.get("enabled", False)), project=wb_cfg.get("project", "pod-attention"),
                        config=full_cfg, group=sweep_name, tags=wb_cfg.get("tags") or (),
                        name=f"{sweep_name}-{device_slug(device)}-shard{shard_index}of{num_shards}",
                        dir=wb_cfg.get("dir"), mode=wb_cfg.get("mode", "offline"),
                        quiet=device.type != "cuda")
    written = 0

    def write(row: dict[str, Any], timed: bool = True) -> None:
        nonlocal written
        store.append(row)
        written += 1
        wandb.log_row(row)
        if timed and row["status"] == "skipped":
            bar.total -= 1               # refused at prepare: took no time, so it leaves the ETA's count
            bar.refresh()
        elif timed:
            bar.update(1)

    from tqdm.auto import tqdm
    bar = tqdm(total=n_run, unit="run", desc=sweep_name, disable=not c.get("progress", True), file=sys.stderr)
    try:
        for point, run_backends, skip_backends in todo:
            for b in skip_backends:
                write({**run_backend(point, b, None, sweep_name, timing, fallback_page, options),
                       **provenance(device)}, timed=False)
            if not run_backends:
                continue
            bar.set_postfix_str(point.spec.describe(), refresh=False)
            run_point(point, run_backends, sweep_name, device, timing, seed, fallback_page, on_row=write,
                      options=options)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    except KeyboardInterrupt:
        bar.close()
        wandb.finish()
        raise SweepInterrupted(path, written) from None
    finally:
        bar.close()

    df = store.compact()
    wandb.finish(df)                     # W&B's own lines first: our summary is the last thing printed
    report(df, path, float(c.get("error_threshold", 1e-2)))
    return df


def main(cfg: Any, command: Sequence[str]) -> int:
    """`run_sweep` for a command line: a refusal (unknown backend, GPU-sized point on a CPU, unwritable
    results) or Ctrl-C ends in one line on stderr and an exit status, not a traceback. `command` is how
    the sweep was started (said again as the way to resume)."""
    try:
        run_sweep(cfg)
    except (UnknownBackend, SweepRefused, OSError) as e:
        print(f"[harness] refused: {e}", file=sys.stderr)
        return 2
    except SweepInterrupted as e:
        print(f"[harness] interrupted: {e.rows_kept} rows kept in {e.path}; resume with: "
              f"{' '.join(command)}", file=sys.stderr)
        return 130
    return 0
