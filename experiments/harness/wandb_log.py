"""Weights & Biases: what a sweep logs (its config, each row's metrics, the final table) and what
`make reproduce` logs (its figures and summary tables).

Offline unless the user set WANDB_MODE (no account needed; `wandb sync` later); wandb missing -> one
warning, then nothing. A broken W&B setup never costs a sweep.
"""
from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping

import pandas as pd

from experiments.cli import command


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
            warnings.warn(f"wandb is not installed: W&B logging is off ({command('pip install wandb')})", stacklevel=2)
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


def log_files(written: Mapping[str, Iterable[Path]], name: str, config: dict, mode: str,
              project: str = "pod-attention") -> Path | None:
    """Figures (PNG) and summary tables (CSV of `table:*` keys) of one run to W&B, quietly: W&B's own
    banner, history and sync hints stay out of the terminal (the caller says where the run went).
    Returns the run's folder, or None when nothing was logged; never fails the caller."""
    try:
        import wandb
    except ImportError:
        warnings.warn(f"wandb is not installed: figures are not logged to W&B ({command('pip install wandb')})",
                      stacklevel=2)
        return None
    os.environ.setdefault("WANDB_MODE", mode)
    try:
        if getattr(wandb, "run", None) is not None:     # one run at a time (no deprecated reinit=True)
            wandb.run.finish()
        run = wandb.init(project=project, name=name, job_type="figures", config=config,
                         settings=wandb.Settings(silent=True))
        for key, paths in written.items():
            for p in paths:
                if p.suffix == ".png":
                    run.log({f"figures/{p.stem}": wandb.Image(str(p))})
                elif p.suffix == ".csv" and key.startswith("table:"):
                    df = pd.read_csv(p)
                    run.log({f"tables/{p.stem}": wandb.Table(dataframe=df.astype(object).where(df.notna(), None))})
        folder = Path(run.dir).parent if getattr(run, "dir", None) else None
        run.finish()
        return folder
    except Exception as e:  # a broken W&B setup must never cost the figures
        warnings.warn(f"W&B logging of figures failed: {e}", stacklevel=2)
        return None
