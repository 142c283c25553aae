"""Where a sweep runs and where its rows go: the device of a (shard of a) run and its results file."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch

from experiments.harness.provenance import device_slug


def resolve_device(name: str, shard_index: int = 0) -> torch.device:
    """"auto": cuda:(shard % gpus) when CUDA is there (one GPU per multirun shard), else cpu; "cuda" (no
    index): the same GPU as "auto"; "cpu"; "cuda:<i>". ValueError, naming what is here, for a device
    this machine does not have or a name torch does not know."""
    name = str(name).strip()
    if name == "auto":
        return resolve_device("cuda" if torch.cuda.is_available() else "cpu", shard_index)
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"device={name!r} is invalid: auto, cpu, cuda or cuda:<index>") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise ValueError(f"device={name} is not supported: auto, cpu, cuda or cuda:<index>")
    if not torch.cuda.is_available():
        raise ValueError(f"device={name}: there is no CUDA GPU here; device=auto (or cpu) runs the "
                         "kernels in Triton's interpreter on this CPU")
    count = torch.cuda.device_count()
    if device.index is None:
        return torch.device("cuda", shard_index % count)
    if device.index >= count:
        raise ValueError(f"device={name}: this machine has {count} CUDA GPU(s), cuda:0..cuda:{count - 1}")
    return device


def shard_count(value: Any) -> int:
    """`num_shards` as a count: a positive int as is; "gpus": one shard a CUDA GPU this process sees
    (CUDA_VISIBLE_DEVICES applies), 1 on a machine without one. ValueError naming what it takes else.
    Also the `shard_count` resolver of conf/attention.yaml: a multirun's shards are range(0, count)."""
    if str(value).strip().lower() == "gpus":
        return max(1, torch.cuda.device_count()) if torch.cuda.is_available() else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"num_shards={value!r} is invalid: a positive number of shards (1: no sharding) "
                         "or gpus (one a CUDA GPU of this machine)")
    return value


def results_path(cfg: Mapping[str, Any], device: torch.device) -> tuple[Path, list[Path]]:
    """(file this run appends to, sibling files whose rows also count for resume).

    Default: <results_dir>/<sweep>/<device>.csv, or <device>.shard<i>of<n>.csv under multirun; timed
    through CUDA graphs (timing.cuda_graph), <device>.cuda_graph[.shard<i>of<n>].csv: the same (point,
    backend) pairs as the eager rows, so a file of their own (resume counts only its own mode's rows).
    """
    if cfg.get("results_file"):
        path = Path(cfg["results_file"])
        return path, []
    slug = device_slug(device) + (".cuda_graph" if (cfg.get("timing") or {}).get("cuda_graph") else "")
    n = int(cfg.get("num_shards", 1))
    name = f"{slug}.csv" if n == 1 else f"{slug}.shard{int(cfg.get('shard', 0))}of{n}.csv"
    folder = Path(cfg.get("results_dir", "results")) / str(cfg["sweep"]["name"])
    siblings = sorted(folder.glob(f"{slug}.csv")) + sorted(folder.glob(f"{slug}.shard*.csv"))
    return folder / name, siblings
