"""`make reproduce`: measure and rebuild every figure and table.

    python -m experiments.reproduce [--sweeps paper balance kernels paper_grid ...] [--fresh] [--figures-only]
                                    [--no-wandb] [--wandb-mode offline|online]

On a GPU (torch.cuda.is_available()): every run of GPU_RUNS, in order - the sweeps `paper`, `balance`,
`kernels`, the paper grid's seeded sample (`paper_grid`), the per-chunk sweep with `backend=all`, and the
knob sweeps `policy` and `ctas_per_sm` with the `pod` backend once per named pod_config (each config to its
own file, results/<gpu>/<sweep>/<gpu>.<config>.csv, since both write the same (point, backend) pairs) -
composed from conf/attention.yaml and run by experiments.harness.sweep.run_sweep, rows appended to
results/<gpu>/<sweep>/<gpu>.csv (rows already there are kept and not re-measured unless --fresh: a cut
run resumes), then every figure and table rebuilt from results/<gpu>/ into results/figures/ for the H100
the committed figures come from, results/figures/<gpu>/ for any other GPU (FIGURE_SETS).
Without a GPU: the smoke sweep (`sweep=smoke backend=cpu`) in the Triton interpreter into
results/smoke/cpu.csv (git-ignored; always re-measured), its tables into results/smoke/figures/, then the
figures rebuilt from each committed GPU's results (results/h100/ -> results/figures/, results/h200/ ->
results/figures/h200/), where there are any.
W&B (offline unless WANDB_MODE says otherwise; --no-wandb: off): the harness logs each sweep's config
and rows; this script logs the figures and summary tables. wandb missing -> a warning, nothing else.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "conf"
CONFIG_NAME = "attention"
SMOKE_SWEEP = "smoke"
COMMITTED_GPU = "h100"   # the figures in results/figures/ itself come from this GPU's results
# Committed results folder -> the folder (under the results root) its figures go to.
FIGURE_SETS = {"h100": "figures", "h200": "figures/h200"}


@dataclass(frozen=True)
class Run:
    """One harness run of `make reproduce` on a GPU: a sweep, a backend list, and (knob sweeps) the
    `pod` config named in pod/kernels/configs.py POD_CONFIGS, whose rows then go to their own file."""
    sweep: str
    backend: str = "all"
    pod_config: str | None = None


GPU_RUNS = (
    Run("paper"), Run("balance"), Run("kernels"),
    Run("paper_grid"),                          # the seeded stratified sample; the full grid: README
    Run("per_chunk"),
    Run("policy", "pod", "policy_5050"), Run("policy", "pod", "policy_proportional"),
    Run("ctas_per_sm", "pod", "ctas_2"), Run("ctas_per_sm", "pod", "ctas_4"),
)
PAPER_SWEEPS = tuple(dict.fromkeys(r.sweep for r in GPU_RUNS))


def figures_dir(results_root: Path, gpu: str) -> Path:
    return results_root / FIGURE_SETS.get(gpu, f"figures/{gpu}")


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
    """A knob run's pod_config, and its own results file <results_dir>/<sweep>/<device>.<config>.csv."""
    if run.pod_config is None:
        return []
    path = results_dir / run.sweep / f"{device}.{run.pod_config}.csv"
    return [f"backend_options.pod_config={run.pod_config}", f"results_file='{path}'"]


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
        key = run.sweep + (f":{run.pod_config}" if run.pod_config else "")
        print(f"[reproduce] sweep={run.sweep} backend={names}"
              + (f" pod_config={run.pod_config}" if run.pod_config else "") + f" -> {results_dir}/{run.sweep}/",
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


def rebuild_figures(results_dir: Path, out: Path) -> dict[str, list[Path]]:
    from analysis.figures import build_all
    from analysis.serving_figures import build_serving_figures   # the paper's serving figures (experiments/serving/paper.py)
    written = build_all(results_dir, out)
    written.update(build_serving_figures(results_dir, out))
    n = sum(len(v) for v in written.values())
    if written:
        print(f"[reproduce] {n} figure/table files from {results_dir}/ -> {out}/ "
              f"(summary: {out / 'summary.md'})", flush=True)
    return written


def log_to_wandb(written: dict[str, list[Path]], name: str, config: dict, mode: str,
                 project: str = "pod-attention") -> None:
    """Figures (PNG) and summary tables of one reproduce run to W&B; never fails the run."""
    try:
        import wandb
    except ImportError:
        warnings.warn("wandb is not installed: figures are not logged to W&B (pip install wandb)",
                      stacklevel=2)
        return
    os.environ.setdefault("WANDB_MODE", mode)
    try:
        import pandas as pd
        run = wandb.init(project=project, name=name, job_type="figures", config=config, reinit=True)
        for key, paths in written.items():
            for p in paths:
                if p.suffix == ".png":
                    run.log({f"figures/{p.stem}": wandb.Image(str(p))})
                elif p.suffix == ".csv" and key.startswith("table:"):
                    df = pd.read_csv(p)
                    run.log({f"tables/{p.stem}": wandb.Table(dataframe=df.astype(object).where(df.notna(), None))})
        run.finish()
    except Exception as e:  # a broken W&B setup must never cost the figures
        warnings.warn(f"W&B logging of figures failed: {e}", stacklevel=2)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sweeps", nargs="+", default=None,
                    help=f"GPU sweeps (default: {' '.join(PAPER_SWEEPS)}; the runs of GPU_RUNS of these "
                         f"sweeps); CPU always runs '{SMOKE_SWEEP}'")
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


def main_gpu(args) -> list[str]:
    from experiments.harness.provenance import device_slug
    slug = device_slug("cuda")
    sweeps = args.sweeps or list(PAPER_SWEEPS)
    unknown = [s for s in sweeps if s not in PAPER_SWEEPS]
    runs = [r for r in GPU_RUNS if r.sweep in sweeps] + [Run(s) for s in unknown]   # any other sweep: backend all
    results_dir = args.out or args.results_root / slug
    figures = args.figures or figures_dir(args.results_root, slug)
    done = []
    if not args.figures_only:
        if args.fresh:
            clear_sweeps(results_dir, sweeps, slug, "--fresh: the chosen sweeps are re-measured")
        rows = run_sweeps(runs, args.backend, results_dir, args, slug)
        done.append(f"measured sweeps {', '.join(f'{s} ({n} rows)' for s, n in rows.items())} on "
                    f"{slug} -> {results_dir}/")
        if args.sweeps is None:   # the default full run: the paper's serving experiments too -> results/<gpu>/serving/
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


def main_cpu(args) -> list[str]:
    # Kernels run in the Triton interpreter: set before anything imports triton.
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # The harness writes <results_dir>/<sweep>/<device>.csv: results/smoke/cpu.csv here, as
    # `python -m experiments.attention` (whose default sweep is the smoke one) does.
    smoke_dir = args.results_root / SMOKE_SWEEP
    done = []
    if not args.figures_only:
        clear_sweeps(args.results_root, [SMOKE_SWEEP], "cpu",
                     "smoke rows are scratch: every smoke run re-measures them")
        rows = run_sweeps([SMOKE_SWEEP], args.backend or "cpu", args.results_root, args)
        rebuild_figures(smoke_dir, smoke_dir / "figures")
        done.append(f"no GPU: ran the smoke sweep in the Triton interpreter ({rows[SMOKE_SWEEP]} rows) -> "
                    f"{smoke_dir}/; its tables (status, errors; CPU timings are not meaningful, so no "
                    f"speed-ups) -> {smoke_dir / 'figures'}/")
    for gpu in FIGURE_SETS:
        committed = args.results_root / gpu
        figures = (args.figures if gpu == COMMITTED_GPU and args.figures
                   else figures_dir(args.results_root, gpu))
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
    args = parse_args(argv)
    gpu = has_gpu()
    done = main_gpu(args) if gpu else main_cpu(args)
    print("\n[reproduce] done:" + "".join(f"\n  - {line}" for line in done), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
