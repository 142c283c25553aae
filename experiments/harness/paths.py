"""Where a sweep runs and where its rows go: the device of a (shard of a) run and its results file."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch

from experiments.harness.provenance import device_slug


def resolve_device(name: str, shard_index: int = 0) -> torch.device:
    """"auto": cuda:(shard % gpus) when CUDA is there (one GPU per multirun shard), else cpu."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", shard_index % torch.cuda.device_count())
        return torch.device("cpu")
    return torch.device(name)


def results_path(cfg: Mapping[str, Any], device: torch.device) -> tuple[Path, list[Path]]:
    """(file this run appends to, sibling files whose rows also count for resume).

    Default: <results_dir>/<sweep>/<device>.csv, or <device>.shard<i>of<n>.csv under multirun.
    """
    if cfg.get("results_file"):
        path = Path(cfg["results_file"])
        return path, []
    slug = device_slug(device)
    n = int(cfg.get("num_shards", 1))
    name = f"{slug}.csv" if n == 1 else f"{slug}.shard{int(cfg.get('shard', 0))}of{n}.csv"
    folder = Path(cfg.get("results_dir", "results")) / str(cfg["sweep"]["name"])
    siblings = sorted(folder.glob(f"{slug}.csv")) + sorted(folder.glob(f"{slug}.shard*.csv"))
    return folder / name, siblings
