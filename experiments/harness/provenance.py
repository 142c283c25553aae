"""Provenance of a result row: which GPU, driver, library versions and code produced it.

Every result row carries these columns (experiments.harness.schema.PROVENANCE_COLUMNS) so a table can
be trusted (or rejected) on its own:

  gpu         torch.cuda.get_device_name() of the device used, or "cpu"
  driver      NVIDIA driver version (nvidia-smi, else "cuda <torch.version.cuda>"), "" on CPU
  torch       torch.__version__
  triton      triton.__version__ ("" if not installed)
  flashinfer  installed flashinfer-python version ("" if not installed; never imported here)
  git_commit  `git rev-parse --short HEAD` of the repository, "+dirty" when tracked files are
              modified, "" when not run from a git checkout
  timestamp   ISO-8601 UTC time the row was written (the only per-row field)

`provenance()` gathers the static fields once per process (subprocess calls are not free);
`timestamp()` is called per row.
"""
from __future__ import annotations

import functools
import os
import importlib.metadata
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]


def _run(cmd: list[str], cwd: Path | None = None, timeout: float = 10.0) -> str | None:
    """stdout of `cmd` stripped, or None when it cannot run or fails."""
    try:
        out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _package_version(*dist_names: str) -> str:
    for name in dist_names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return ""


def git_commit(repo: Path = REPO_ROOT) -> str:
    """Short commit hash, "+dirty" if tracked files differ from HEAD; "" outside a git checkout.

    POD_GIT_COMMIT, when set, wins: a copy of the tree without .git (on a GPU machine it was copied to)
    is told the commit it was copied from (POD_GIT_COMMIT, as scripts/gpu_session.sh's callers set it)."""
    if os.environ.get("POD_GIT_COMMIT"):
        return os.environ["POD_GIT_COMMIT"]
    sha = _run(["git", "rev-parse", "--short", "HEAD"], cwd=repo)
    if not sha:
        return ""
    status = _run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo)
    return sha + ("+dirty" if status else "")


def gpu_name(device: torch.device | str | None = None) -> str:
    device = torch.device(device) if device is not None else None
    if device is not None and device.type != "cuda":
        return "cpu"
    if not torch.cuda.is_available():
        return "cpu"
    return torch.cuda.get_device_name(device)


def driver_version(device: torch.device | str | None = None) -> str:
    if gpu_name(device) == "cpu":
        return ""
    index = torch.device(device).index if device is not None else None
    index = torch.cuda.current_device() if index is None else index
    smi = _run(["nvidia-smi", f"--id={index}", "--query-gpu=driver_version", "--format=csv,noheader"])
    if smi:
        return smi.splitlines()[0].strip()
    return f"cuda {torch.version.cuda}" if torch.version.cuda else ""


@functools.lru_cache(maxsize=None)
def _static(device_key: str) -> tuple[tuple[str, str], ...]:
    device = None if device_key == "default" else device_key
    return (
        ("gpu", gpu_name(device)),
        ("driver", driver_version(device)),
        ("torch", torch.__version__),
        ("triton", _package_version("triton")),
        ("flashinfer", _package_version("flashinfer-python", "flashinfer")),
        ("git_commit", git_commit()),
    )


def timestamp() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def provenance(device: torch.device | str | None = None) -> dict[str, str]:
    """All provenance columns for rows measured on `device` (default: the current CUDA device or cpu)."""
    row = dict(_static(str(device) if device is not None else "default"))
    row["timestamp"] = timestamp()
    return row


def device_slug(device: torch.device | str | None = None) -> str:
    """Short file-name-safe device label: "h100", "h200", "a100", ... or "cpu"."""
    name = gpu_name(device)
    if name == "cpu":
        return "cpu"
    for token in name.replace("-", " ").split():
        t = token.lower()
        if t[:1] in "abhlvt" and any(ch.isdigit() for ch in t) and t not in ("pcie", "sxm", "sxm5"):
            return "".join(ch for ch in t if ch.isalnum())
    return "".join(ch if ch.isalnum() else "_" for ch in name.lower()).strip("_") or "gpu"
