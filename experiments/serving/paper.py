"""The paper's serving experiments (its Fig. 12 and the online arXiv runs), each one command, all resumable.

    python -m experiments.serving.paper                       # every experiment below, in order
    python -m experiments.serving.paper --only fig12_llama3_8b arxiv_online_llama3_8b
    python -m experiments.serving.paper --only fig12_yi_6b num_requests=128     # Hydra overrides last
    python -m experiments.serving.paper --figures-only        # rebuild the serving figures from rows
    python -m experiments.serving.paper --plan                # each schedule simulated (no model, CPU)

Experiments (presets in conf/serving/experiment/, each also runnable as
`python -m experiments.serving serving/experiment=<name>`):
  fig12_yi_6b, fig12_llama3_8b, fig12_llama2_7b   the paper's Fig 12: 16K-token requests all at t=0,
                    prefill:decode 8 / 17 / 64, chunk 512 / 1024 / 1024; requests per minute
  arxiv_capacity_llama3_8b   the arXiv-like mix served offline: the capacity the online rates come from
  arxiv_online_llama3_8b     Poisson arrivals at load x capacity for each load (0.85, 0.95): TTFT, TBT,
                    stalls; runs the capacity experiment first when its rows are missing
  fig12_llama2_7b_all_layers the layer-cut check (all 32 layers; the others build 8)
each with backends pod, triton_serial and fi_serial. Rows: <results>/serving/<experiment>/<gpu>.csv
(results/h200/serving/... on the H200). A backend (an online backend at a load) with an ok row
already there is not run again (--fresh: the experiment's rows of this device are removed first), so
a cut run is resumed by running the same command again. Figures: analysis.serving_figures, where
make reproduce puts the GPU's figures (results/figures/h200/ for results/h200/).

`run_paper_serving(results_dir)` is what `make reproduce` calls on a GPU.

GPU time grows linearly with num_requests and with the iterations `--plan` counts for each schedule
(the README's serving section turns them into minutes).
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence

from experiments import cli

# torch, the schema and the engine are imported where used: `python -m experiments.serving.paper` starts
# without them, so a Ctrl-C during their import ends in one line (experiments.cli.run).

ROOT = Path(__file__).resolve().parents[2]
CONF_DIR = ROOT / "conf"
FIG12 = ("fig12_yi_6b", "fig12_llama3_8b", "fig12_llama2_7b")
PAPER_EXPERIMENTS = (*FIG12, "arxiv_capacity_llama3_8b", "arxiv_online_llama3_8b", "fig12_llama2_7b_all_layers")
# What a CPU run of the whole plan overrides (tests, smoke): the tiny model with 4 layers built 2
# (so the scaled columns are exercised), the fp32 reference backend, a few requests.
CPU_OVERRIDES = ("serving/model=tiny_llama", "serving/workload=tiny", "serving/scheduler=tiny", "device=cpu",
                 "dtype=float32", "backends=[reference]", "serving.model.num_layers=4", "num_layers=2",
                 "num_pages=64", "num_requests=6", "warmup_requests=0", "online.rate_backend=reference")


def compose_experiment(name: str, overrides: Sequence[str] = ()):
    """The composed serving config of the preset `name` plus Hydra overrides (compose API)."""
    from hydra import compose, initialize_config_dir
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("serving", overrides=[f"serving/experiment={name}", *overrides])


def _device_slug(device: str) -> str:
    import torch

    from experiments.harness.provenance import device_slug
    return device_slug(torch.device(device))


def rows_file(serving_dir: Path, experiment: str, device: str) -> Path:
    return Path(serving_dir) / experiment / f"{_device_slug(device)}.csv"


def _ok_rows(path: Path):
    from experiments.harness.schema import SERVING_SCHEMA, read_rows
    if not path.exists():
        return None
    df = read_rows(path, SERVING_SCHEMA)
    return df[df["status"] == "ok"]


def capacity_rps(rows, backend: str) -> float:
    """Offline capacity (requests/s) of `backend` in offline serving rows (a DataFrame or a list of row
    dicts): its steady_requests_per_min / 60 (the rate once the pipeline is full), else requests_per_s;
    the latest ok row wins. ValueError when the rows hold no such measurement."""
    import pandas as pd
    df = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
    if df.empty or "backend" not in df:
        raise ValueError(f"no offline rows to take {backend}'s capacity from")
    df = df[(df["backend"] == backend) & (df["status"] == "ok") & (df["mode"] == "offline")]
    if df.empty:
        raise ValueError(f"no ok offline row of backend {backend!r} to take the capacity from")
    row = df.iloc[-1]
    steady = row.get("steady_requests_per_min")
    if steady is not None and not pd.isna(steady) and steady > 0:
        return float(steady) / 60.0
    return float(row["requests_per_s"])


def capacity_with_fallback(rows, backend: str) -> tuple[float, str]:
    """(capacity, backend it came from): `backend`'s, else (it has no ok row, e.g. FlashInfer missing)
    the lowest capacity of the backends that have one, said in one line."""
    try:
        return capacity_rps(rows, backend), backend
    except ValueError as e:
        caps = {}
        for b in sorted(set(rows["backend"])):
            try:
                caps[b] = capacity_rps(rows, b)
            except ValueError:
                pass
        if not caps:
            raise
        slowest = min(caps, key=caps.get)
        print(f"[serving] {e}: the rates come from the slowest backend that has one, {slowest}", flush=True)
        return caps[slowest], slowest


def online_rates(capacity: float, loads: Iterable[float]) -> list[tuple[float, float]]:
    """[(load, qps)]: qps = load x capacity, loads in (0, 1.5]. Near saturation means loads just below 1
    (the paper's 0.85 and 0.95 QPS sat just below its baseline's capacity): the queue, and with it
    TTFT, grows sharply there, while decode stalls come from the prefill chunks every iteration carries."""
    out = []
    for load in loads:
        load = float(load)
        if not 0 < load <= 1.5:
            raise ValueError(f"load={load} is invalid: a fraction of the offline capacity in (0, 1.5]")
        if not (capacity > 0 and math.isfinite(capacity)):
            raise ValueError(f"capacity={capacity} requests/s is invalid: need a positive number")
        out.append((load, load * capacity))
    return out


def _key(mode: str, backend: str, load) -> tuple:
    return (mode, backend, None if load is None or (isinstance(load, float) and math.isnan(load))
            else round(float(load), 6))


def _done(path: Path) -> set[tuple]:
    import pandas as pd
    df = _ok_rows(path)
    if df is None:
        return set()
    return {_key(str(m), str(b), None if pd.isna(l) else float(l))
            for m, b, l in zip(df["mode"], df["backend"], df["load"])}


def _remove(path: Path) -> None:
    if path.exists():
        print(f"[serving] --fresh: removing {path}", flush=True)
        path.unlink()


def _serve_missing(cfg, serving_dir: Path, load: float | None = None) -> list[dict[str, Any]]:
    """serve() for the backends of `cfg` without an ok row yet (at this load, online)."""
    path = rows_file(serving_dir, cfg.sweep_name, cfg.device)
    done = _done(path)
    backends = [cfg.backends] if isinstance(cfg.backends, str) else list(cfg.backends)
    todo = [b for b in backends if _key(cfg.mode, b, load) not in done]
    where = f"{cfg.sweep_name}" + (f" load {load:g} (qps {cfg.qps:.4g})" if load is not None else "")
    if not todo:
        print(f"[serving] {where}: every backend has an ok row in {path}: kept", flush=True)
        return []
    print(f"[serving] {where}: {', '.join(todo)} -> {path}", flush=True)
    cfg.backends = todo
    cfg.out_dir = str(serving_dir)
    from experiments.serving.experiment import serve
    return serve(cfg)


def run_experiment(name: str, serving_dir: str | Path, overrides: Sequence[str] = (),
                   fresh: bool = False) -> list[dict[str, Any]]:
    """One preset's missing rows (online: per load, the capacity experiment first if it has no rows)."""
    import torch

    from experiments.harness.schema import SERVING_SCHEMA, read_rows
    from experiments.serving.experiment import ServingRefused, cpu_smoke
    serving_dir = Path(serving_dir)
    cfg = compose_experiment(name, overrides)
    if str(cfg.device).startswith("cuda") and not torch.cuda.is_available():
        raise ServingRefused(f"serving experiment {name} is GPU-sized (device={cfg.device}) and there is "
                             f"no CUDA GPU here; on a CPU: {cpu_smoke()}")
    if fresh:
        _remove(rows_file(serving_dir, cfg.sweep_name, cfg.device))
    if cfg.mode != "online":
        return _serve_missing(cfg, serving_dir)
    if cfg.online.capacity_sweep is None:            # a hand-set qps
        return _serve_missing(cfg, serving_dir, cfg.get("load"))
    cap_path = rows_file(serving_dir, cfg.online.capacity_sweep, cfg.device)
    rows = []
    tried = set(read_rows(cap_path, SERVING_SCHEMA)["backend"]) if cap_path.exists() else set()
    ok = _ok_rows(cap_path)
    if ok is None or ok.empty or cfg.online.rate_backend not in tried:
        print(f"[serving] {name}: no capacity rows of {cfg.online.rate_backend} yet: running "
              f"{cfg.online.capacity_sweep} first", flush=True)
        rows += run_experiment(cfg.online.capacity_sweep, serving_dir, overrides)
    capacity, rate_backend = capacity_with_fallback(read_rows(cap_path, SERVING_SCHEMA), cfg.online.rate_backend)
    print(f"[serving] {name}: capacity of {rate_backend} {capacity:.4g} requests/s "
          f"({cap_path})", flush=True)
    for load, qps in online_rates(capacity, cfg.online.loads):
        c = compose_experiment(name, [*overrides, f"qps={qps!r}", f"load={load!r}"])
        rows += _serve_missing(c, serving_dir, load)
    return rows


def schedule_plan(name: str, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The schedule a preset will run, simulated without a model (scheduler and page allocator only,
    offline (an online preset: its requests all at t=0), every token sampled as 0; a second on a
    CPU): iterations (hybrid, decode-only), the most
    decodes in one iteration (the steady-state concurrency C), preemptions, and how many finishes fall
    in the steady window (first finish .. last prefill; metrics.steady_rate_per_min). What the GPU run
    will do, in iterations: the number to budget GPU time with (time ~ iterations x iteration time)."""
    import dataclasses

    import torch

    from experiments.serving.experiment import kv_pages, model_config, scheduler_config, workload_config
    from experiments.serving.kv_cache import PageAllocator, pages_to_hold
    from experiments.serving.scheduler import Request, Scheduler
    from experiments.serving.workload import generate
    cfg = compose_experiment(name, [*overrides, "qps=1.0"])
    mcfg = model_config(cfg)
    scfg = scheduler_config(cfg)
    wl = dataclasses.replace(workload_config(cfg, 2), qps=None)
    specs = generate(wl)
    need = pages_to_hold([len(r.prompt) + r.output_len for r in specs], int(cfg.page_size), scfg.watermark)
    pages = kv_pages(cfg, torch.bfloat16, need_pages=need)
    sched = Scheduler(scfg, PageAllocator(pages, int(cfg.seed)), int(cfg.page_size))
    reqs = [Request.from_spec(r) for r in specs]
    for r in reqs:
        sched.add(r)
    its = hybrid = decode_only = max_decodes = 0
    while sched.has_work():
        plan = sched.schedule()
        its += 1
        hybrid += bool(plan.prefills and plan.decodes)
        decode_only += not plan.prefills
        max_decodes = max(max_decodes, len(plan.decodes))
        sched.complete(plan, [0] * len(plan.sampling()), float(its))
    last_prefill = max(r.token_times_s[0] for r in reqs)
    return dict(experiment=name, num_requests=len(reqs), num_layers=mcfg.num_layers, kv_pages=pages,
                iterations=its, hybrid_iterations=hybrid, decode_only_iterations=decode_only,
                max_decodes=max_decodes, preemptions=sched.num_preemptions,
                steady_window_finishes=sum(r.finish_s <= last_prefill for r in reqs))


def run_paper_serving(results_dir: str | Path, experiments: Sequence[str] | None = None,
                      overrides: Sequence[str] = (), fresh: bool = False,
                      figures_dir: str | Path | None = None, figures: bool = True) -> list[str]:
    """Run the paper's serving experiments into <results_dir>/serving/ (what is missing only) and build
    the serving figures into `figures_dir` (default make reproduce's, results/figures/<gpu>). Returns summary lines.
    On a machine without a GPU the GPU-sized presets are refused (ServingRefused) before anything runs;
    pass CPU_OVERRIDES for a CPU run of the machinery. A preset whose KV pool does not fit this GPU
    (KVCacheTooLarge) is said in one line and skipped; the others run."""
    from experiments.serving.experiment import KVCacheTooLarge
    results_dir = Path(results_dir)
    serving_dir = results_dir / "serving"
    done = []
    for name in experiments or PAPER_EXPERIMENTS:
        try:
            rows = run_experiment(name, serving_dir, overrides, fresh)
        except KVCacheTooLarge as e:     # this card is smaller than the preset's: the others still run
            print(f"[serving] {name} refused: {e}", file=sys.stderr, flush=True)
            done.append(f"serving {name}: refused, {e}")
            continue
        bad = [r for r in rows if r["status"] != "ok"]
        done.append(f"serving {name}: {len(rows)} new rows"
                    + (f" ({len(bad)} not ok: {', '.join(r['backend'] + ' ' + r['status'] for r in bad)})"
                       if bad else "") + f" -> {serving_dir / name}/")
    if figures:
        done += build_figures(serving_dir, Path(figures_dir) if figures_dir else default_figures(results_dir))
    return done


def default_figures(results_dir: Path) -> Path:
    """results/h200 -> results/figures/h200, where make reproduce puts the H200's figures (it builds
    the serving figures itself, in rebuild_figures; this module does not import it: no import cycle)."""
    return Path(results_dir).parent / "figures" / Path(results_dir).name


def build_figures(serving_dir: Path, out: Path) -> list[str]:
    from analysis.serving_figures import build_serving_figures
    written = build_serving_figures(serving_dir, out)
    n = sum(len(v) for v in written.values())
    return [f"serving figures/tables: {n} files from {serving_dir}/ -> {out}/" if n
            else f"no timed serving rows under {serving_dir}/: no serving figures"]


def parse_args(argv=None) -> argparse.Namespace:
    """The command line: options, then `--only NAME ...`, then Hydra overrides (key=value) for every
    experiment. argparse hands --only every word after it, so the words with an `=` are moved to the
    overrides; a name that is no experiment is an error."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="+", default=None, metavar="NAME",
                    help=f"experiments to run (default: all of {', '.join(PAPER_EXPERIMENTS)}); "
                         "Hydra overrides may follow the names")
    ap.add_argument("--results", type=Path, default=None,
                    help="folder holding serving/ and figures/ (default results/<gpu>, e.g. results/h200)")
    ap.add_argument("--figures", type=Path, default=None,
                    help="where figures go (default make reproduce's: results/figures/<gpu>)")
    ap.add_argument("--fresh", action="store_true", help="remove this device's rows of the chosen experiments first")
    ap.add_argument("--figures-only", action="store_true", help="run nothing; rebuild the serving figures")
    ap.add_argument("--plan", action="store_true",
                    help="run nothing; print each experiment's schedule simulated without a model (iterations)")
    ap.add_argument("--cpu", action="store_true",
                    help="the whole plan on the CPU with the tiny model (the machinery, no timings)")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides for every experiment (e.g. num_requests=32)")
    args = ap.parse_args(argv)
    if args.only is not None:
        args.overrides = [w for w in args.only if "=" in w] + args.overrides
        args.only = [w for w in args.only if "=" not in w]
        unknown = [w for w in args.only if w not in PAPER_EXPERIMENTS]
        if unknown or not args.only:
            ap.error(f"--only {' '.join(unknown) or '(no name)'}: not an experiment; one of "
                     f"{', '.join(PAPER_EXPERIMENTS)}")
    bad = [w for w in args.overrides if "=" not in w]
    if bad:
        ap.error(f"{' '.join(bad)}: not a Hydra override (key=value); experiment names go after --only")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from experiments.serving.experiment import ServingRefused
    overrides = [*(CPU_OVERRIDES if args.cpu else ()), *args.overrides]
    device = "cpu" if args.cpu else "cuda"
    if args.results is not None:
        results = args.results
    elif args.cpu or not torch.cuda.is_available():   # without a GPU the presets are refused anyway
        results = ROOT / "results" / "smoke"
    else:
        results = ROOT / "results" / _device_slug(device)
    if args.plan:
        for name in args.only or PAPER_EXPERIMENTS:
            print(schedule_plan(name, overrides), flush=True)
        return 0
    if args.figures_only:
        lines = build_figures(results / "serving", args.figures or default_figures(results))
    else:
        try:
            lines = run_paper_serving(results, args.only, overrides, args.fresh, args.figures)
        except ServingRefused as e:
            print(f"[serving] refused: {e}", file=sys.stderr)
            return 2
    print("[serving] done:" + "".join(f"\n  - {line}" for line in lines), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run("serving", main))
