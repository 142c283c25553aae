"""`make reproduce`: measure and rebuild every figure and table.

    python -m experiments.reproduce [--sweeps paper balance kernels paper_grid ...] [--fresh] [--figures-only]
                                    [--no-wandb] [--wandb-mode offline|online]

What runs comes from conf/reproduce.yaml. On a GPU (torch.cuda.is_available()): its `gpu.runs`, in
order (each composed from conf/attention.yaml and run by experiments.harness.sweep.run_sweep; a knob
run with a `pod_config` writes its own file, results/<gpu>/<sweep>/<gpu>.<config>.csv), rows appended to
results/<gpu>/<sweep>/<gpu>.csv (rows already there are kept and not re-measured unless --fresh: a cut
run resumes), then the paper's serving experiments, then every figure and table rebuilt from
results/<gpu>/ into the folder `figures` names for it (results/figures/ for the H100, else
results/figures/<gpu>/).
Without a GPU: the `cpu.sweep` (smoke) in the Triton interpreter into results/smoke/cpu.csv
(git-ignored; always re-measured), its tables into results/smoke/figures/, then the figures rebuilt from
each committed GPU's results (`figures`: results/h100/ -> results/figures/, results/h200/ ->
results/figures/h200/), where there are any.
W&B (offline unless WANDB_MODE says otherwise; --no-wandb: off): the harness logs each sweep's config
and rows; this script logs the figures and summary tables, quietly (one line says where the run went).
wandb missing -> a warning, nothing else.
An argument it cannot act on, a sweep refused by the harness and Ctrl-C (at start-up, in a sweep, while
figures are drawn) each end in one line.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from experiments import cli

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "conf"
CONFIG_NAME = "attention"
PLAN_FILE = CONF_DIR / "reproduce.yaml"   # which sweeps run, in order, and where figures go
COMMITTED_GPU = "h100"   # the figures in results/figures/ itself come from this GPU's results


@dataclass(frozen=True)
class Run:
    """One harness run of `make reproduce` on a GPU: a sweep, a backend list, and (knob sweeps) either the
    `pod` config named in pod/kernels/configs.py POD_CONFIGS or backend `options` (BackendOptions fields)
    under a `tag`; a knob run's rows go to a file of their own, <gpu>.<pod_config or tag>.csv."""
    sweep: str
    backend: str = "all"
    pod_config: str | None = None
    options: dict | None = None
    tag: str | None = None

    def __post_init__(self):
        if self.options and not self.tag:
            raise ValueError(f"reproduce run {self.sweep}: `options` {self.options} need a `tag` (its results file)")

    @property
    def knob(self) -> str | None:
        """What names this run's own results file (None: the sweep's file)."""
        return self.pod_config or self.tag


@dataclass(frozen=True)
class Plan:
    """conf/reproduce.yaml: the GPU runs (and whether the serving experiments follow), the CPU's smoke
    sweep, and which committed results folder rebuilds into which figures folder."""
    gpu_runs: tuple[Run, ...]
    serving: bool
    cpu_sweep: str
    cpu_backend: str
    figure_sets: dict[str, str]

    @property
    def gpu_sweeps(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(r.sweep for r in self.gpu_runs))


def load_plan(path: Path | None = None) -> Plan:
    """conf/reproduce.yaml (or `path`) as a Plan."""
    from omegaconf import OmegaConf
    c = OmegaConf.to_container(OmegaConf.load(path or PLAN_FILE), resolve=True)
    runs = tuple(Run(**r) for r in c["gpu"]["runs"])
    return Plan(runs, bool(c["gpu"].get("serving", True)), str(c["cpu"]["sweep"]), str(c["cpu"]["backend"]),
                {str(k): str(v) for k, v in c["figures"].items()})


class ReproduceRefused(ValueError):
    """An argument `make reproduce` cannot act on (said in one line before anything runs)."""


def figures_dir(results_root: Path, gpu: str, plan: Plan | None = None) -> Path:
    sets = (plan or load_plan()).figure_sets
    return results_root / sets.get(gpu, f"figures/{gpu}")


def has_gpu() -> bool:
    import torch
    return torch.cuda.is_available()


def compose_sweep(sweep: str, backend: str, results_dir: Path, wandb_enabled: bool, wandb_mode: str,
                  extra: list[str] | tuple[str, ...] = ()):
    """The harness config of one sweep, composed from conf/ through Hydra's compose API."""
    from hydra import compose, initialize_config_dir
    overrides = [f"sweep={sweep}", f"backend={backend}", f"results_dir='{results_dir}'",
                 f"wandb.enabled={str(wandb_enabled).lower()}", f"wandb.mode={wandb_mode}", *extra]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name=CONFIG_NAME, overrides=overrides)


def run_overrides(run: Run, results_dir: Path, device: str) -> list[str]:
    """A knob run's pod_config or backend options, and its own results file
    <results_dir>/<sweep>/<device>.<config or tag>.csv."""
    if run.knob is None:
        return []
    path = results_dir / run.sweep / f"{device}.{run.knob}.csv"
    opts = {"pod_config": run.pod_config} if run.pod_config else {}
    opts.update(run.options or {})
    return [f"backend_options.{k}={v}" for k, v in opts.items()] + [f"results_file='{path}'"]


def run_sweeps(runs, backend: str | None, results_dir: Path, args, device: str = "cpu") -> dict[str, int]:
    """Each run (a Run, or a sweep name run with `backend`) through experiments.harness.sweep.run_sweep;
    `backend` given overrides every run's list. Returns {sweep[:config]: rows in its results file}."""
    from experiments.harness.sweep import run_sweep  # imported late: the interpreter switch must come first
    rows = {}
    for run in runs:
        run = run if isinstance(run, Run) else Run(run)
        names = backend or run.backend
        extra = run_overrides(run, results_dir, device)
        cfg = compose_sweep(run.sweep, names, results_dir, not args.no_wandb, args.wandb_mode, extra)
        key = run.sweep + (f":{run.knob}" if run.knob else "")
        print(f"[reproduce] sweep={run.sweep} backend={names}"
              + (f" pod_config={run.pod_config}" if run.pod_config else "")
              + "".join(f" {k}={v}" for k, v in (run.options or {}).items()) + f" -> {results_dir}/{run.sweep}/",
              flush=True)
        df = run_sweep(cfg)
        rows[key] = len(df)
    return rows


def _shown(p: Path) -> str:
    """`p` relative to the repository when it lies inside it (what a user sees in their checkout)."""
    try:
        return str(p.resolve().relative_to(ROOT))
    except ValueError:
        return str(p)


def clear_sweeps(results_dir: Path, sweeps, device: str, why: str = "re-measured") -> list[Path]:
    """Delete this device's earlier rows of `sweeps` (<results_dir>/<sweep>/<device>[.shard*].csv),
    saying first which files go, how many rows each holds, and `why`. Returns the removed files."""
    files = sorted(f for sweep in sweeps for f in (results_dir / sweep).glob(f"{device}*.csv"))
    if not files:
        return []
    listed = ", ".join(f"{_shown(f)} ({max(sum(1 for _ in f.open(errors='replace')) - 1, 0)} rows)"
                       for f in files)
    print(f"[reproduce] removing earlier rows ({why}): {listed}", flush=True)
    for f in files:
        f.unlink()
    return files


class FiguresInterrupted(KeyboardInterrupt):
    """Ctrl-C while figures were drawn into `out`: some may be half-written; a rerun rebuilds them all."""

    def __init__(self, out: Path):
        super().__init__(str(out))
        self.out = out


def rebuild_figures(results_dir: Path, out: Path) -> dict[str, list[Path]]:
    """Every figure and table (attention, the paper's, serving) from `results_dir`: analysis.figures'
    build_all, the one entry point `make figures` uses too."""
    from analysis.figures import build_all
    try:
        written = build_all(results_dir, out)
    except KeyboardInterrupt:
        raise FiguresInterrupted(out) from None
    n = sum(len(v) for v in written.values())
    if written:
        print(f"[reproduce] {n} figure/table files from {results_dir}/ -> {out}/ "
              f"(summary: {out / 'summary.md'})", flush=True)
    return written


def log_to_wandb(written: dict[str, list[Path]], name: str, config: dict, mode: str,
                 project: str = "pod-attention") -> None:
    """Figures (PNG) and summary tables of one reproduce run to W&B, in one line of ours."""
    from experiments.harness.wandb_log import log_files
    folder = log_files(written, name, config, mode, project)
    if folder is not None:
        where = os.environ.get("WANDB_MODE", mode)
        print(f"[reproduce] W&B ({where}): figures and tables of {name} -> {_shown(folder)}"
              + (f" (upload: {_shown(Path(sys.executable).parent / 'wandb')} sync {_shown(folder)})"
                 if where == "offline" else ""), flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sweeps", nargs="+", default=None,
                    help="GPU only: the sweeps to run (default: every run of conf/reproduce.yaml gpu.runs; "
                         "a sweep of conf/sweep/ not listed there runs with backend all)")
    ap.add_argument("--backend", default=None,
                    help="backend list of conf/backend for every run (default GPU: each run's own, CPU: cpu)")
    ap.add_argument("--results-root", type=Path, default=ROOT / "results",
                    help="folder holding results/<gpu>/, results/smoke/ and results/figures/")
    ap.add_argument("--out", type=Path, default=None,
                    help="GPU: where the rows go (default <results-root>/<gpu>)")
    ap.add_argument("--figures", type=Path, default=None,
                    help="where figures go (default <results-root>/figures for H100 results, "
                         "<results-root>/figures/<gpu> for another GPU's)")
    ap.add_argument("--fresh", action="store_true",
                    help="GPU: delete this GPU's earlier rows of the chosen sweeps and re-measure all")
    ap.add_argument("--figures-only", action="store_true", help="measure nothing, rebuild figures")
    ap.add_argument("--no-wandb", action="store_true", help="no W&B logging at all")
    ap.add_argument("--wandb-mode", default="offline", choices=("offline", "online", "disabled"))
    return ap.parse_args(argv)


def gpu_runs(plan: Plan, sweeps: list[str] | None) -> list[Run]:
    """The plan's runs of `sweeps` (all when None), in the plan's order; a sweep of conf/sweep/ the plan
    does not list runs once with backend all; a name conf/sweep/ lacks is refused."""
    if sweeps is None:
        return list(plan.gpu_runs)
    known = sorted(p.stem for p in (CONF_DIR / "sweep").glob("*.yaml"))
    missing = [s for s in sweeps if s not in known]
    if missing:
        raise ReproduceRefused(f"--sweeps {' '.join(missing)}: no such sweep in conf/sweep/; known: "
                               f"{', '.join(known)}")
    return ([r for r in plan.gpu_runs if r.sweep in sweeps]
            + [Run(s) for s in dict.fromkeys(sweeps) if s not in plan.gpu_sweeps])


def main_gpu(args, plan: Plan) -> list[str]:
    from experiments.harness.provenance import device_slug
    slug = device_slug("cuda")
    runs = gpu_runs(plan, args.sweeps)
    sweeps = list(dict.fromkeys(r.sweep for r in runs))
    results_dir = args.out or args.results_root / slug
    figures = args.figures or figures_dir(args.results_root, slug, plan)
    done = []
    if not args.figures_only:
        if args.fresh:
            clear_sweeps(results_dir, sweeps, slug, "--fresh: the chosen sweeps are re-measured")
        rows = run_sweeps(runs, args.backend, results_dir, args, slug)
        done.append(f"measured sweeps {', '.join(f'{s} ({n} rows)' for s, n in rows.items())} on "
                    f"{slug} -> {results_dir}/")
        if args.sweeps is None and plan.serving:   # the full run: the paper's serving experiments too
            from experiments.serving.paper import run_paper_serving
            done += run_paper_serving(results_dir, fresh=args.fresh, figures=False)
    written = rebuild_figures(results_dir, figures)
    if written:
        done.append(f"rebuilt figures and tables from {results_dir}/ -> {figures}/")
        if not args.no_wandb:
            log_to_wandb(written, f"reproduce-{slug}", {"sweeps": sweeps, "results": str(results_dir)},
                         args.wandb_mode)
    else:
        done.append(f"no result rows under {results_dir}/: no figures")
    return done


def main_cpu(args, plan: Plan) -> list[str]:
    # The harness writes <results_dir>/<sweep>/<device>.csv: results/smoke/cpu.csv here, as
    # `python -m experiments.attention` (whose default sweep is the smoke one) does.
    smoke = plan.cpu_sweep
    smoke_dir = args.results_root / smoke
    done = []
    if not args.figures_only:
        clear_sweeps(args.results_root, [smoke], "cpu", "smoke rows are scratch: every smoke run re-measures them")
        rows = run_sweeps([smoke], args.backend or plan.cpu_backend, args.results_root, args)
        rebuild_figures(smoke_dir, smoke_dir / "figures")
        done.append(f"no GPU: ran the {smoke} sweep in the Triton interpreter ({rows[smoke]} rows) -> "
                    f"{smoke_dir}/; its tables (status, errors; CPU timings are not meaningful, so no "
                    f"speed-ups) -> {smoke_dir / 'figures'}/")
    for gpu in plan.figure_sets:
        committed = args.results_root / gpu
        figures = (args.figures if gpu == COMMITTED_GPU and args.figures
                   else figures_dir(args.results_root, gpu, plan))
        written = rebuild_figures(committed, figures)
        if written:
            done.append(f"rebuilt figures and tables from the committed {gpu.upper()} results "
                        f"{committed}/ -> {figures}/")
            if not args.no_wandb:
                log_to_wandb(written, f"figures-{gpu}", {"results": str(committed)}, args.wandb_mode)
        else:
            done.append(f"no committed {gpu.upper()} results under {committed}/ yet: no figures "
                        f"rebuilt (run `make reproduce` on an {gpu.upper()} and commit results/{gpu}/)")
    return done


def main(argv=None) -> int:
    """`make reproduce`. Its exit status: 0 done, 2 refused (one line says why), 130 Ctrl-C (one line says
    what was kept and how to go on)."""
    args = parse_args(argv)
    plan = load_plan()
    gpu = has_gpu()                      # imports torch: a Ctrl-C here is said by experiments.cli.run
    if not gpu:
        if args.sweeps is not None and args.sweeps != [plan.cpu_sweep]:
            one = cli.command(f"experiments.attention sweep=<name> backend={plan.cpu_backend}")
            print(f"[reproduce] refused: --sweeps {' '.join(args.sweeps)} picks GPU sweeps and there is no "
                  f"CUDA GPU here; without one `make reproduce` runs the {plan.cpu_sweep} sweep (no --sweeps); "
                  f"one sweep on this CPU: {one}", file=sys.stderr)
            return 2
        # Kernels run in the Triton interpreter: set before anything imports triton.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from baselines.registry import UnknownBackend
    from experiments.harness.sweep import SweepInterrupted, SweepRefused
    from experiments.serving.experiment import ServingRefused
    try:
        done = main_gpu(args, plan) if gpu else main_cpu(args, plan)
    except (ReproduceRefused, SweepRefused, UnknownBackend, ServingRefused, OSError) as e:
        print(f"[reproduce] refused: {e}", file=sys.stderr)
        return 2
    except SweepInterrupted as e:
        print(f"[reproduce] interrupted: {e.rows_kept} new rows kept in {_shown(e.path)}; "
              f"`make reproduce` goes on from there", file=sys.stderr)
        return 130
    except FiguresInterrupted as e:
        print(f"[reproduce] interrupted while drawing figures into {_shown(e.out)} (some may be half-written); "
              f"`make reproduce` (or {cli.command('experiments.reproduce --figures-only')}) rebuilds them",
              file=sys.stderr)
        return 130
    print("\n[reproduce] done:" + "".join(f"\n  - {line}" for line in done), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run("reproduce", main))
