"""The one backend registry: every attention implementation the harness can run, ours and baselines.

A backend is registered with `@register_backend(name, ...)` on a *prepare* function in a module of
this package (one module per family: ours.py, torch_fa.py, flashinfer.py); the registry imports every
module of the package it finds, so a new family is a new file and nothing else:

    prepare(batch: HybridBatch[, options: BackendOptions]) -> run: Callable[[], AttentionOutput]

`prepare` does everything that depends only on the batch's shape and tensors (FlashInfer's plan(),
our pod.plan(), workspace allocation) and is never timed; the returned `run` only launches kernels
and is what the harness times, as an engine would call it once per layer. Backends return outputs;
the harness (not the backend) checks them against the reference and computes metrics.

`BackendOptions` are the knobs that change what a backend runs (kernel configs, FlashInfer's prefill
kernel, autotuning): set from the Hydra config (`backend_options`), passed to every prepare that takes
them, and recorded in every result row (`options`).
"""
from __future__ import annotations

import importlib
import inspect
import pkgutil
from pathlib import Path
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable, Mapping, NamedTuple

import torch

from pod.batch import BatchSpec, HybridBatch


class AttentionOutput(NamedTuple):
    prefill: torch.Tensor | None   # [total_chunk_tokens, Hq, D] or None if the backend skips prefill
    decode: torch.Tensor | None    # [num_decodes, Hq, D] or None if it skips decode


Prepare = Callable[..., Callable[[], AttentionOutput]]


@dataclass(frozen=True)
class BackendOptions:
    """Knobs that change what a backend runs; every row records them (conf/attention.yaml documents each)."""
    prefill_config: str = "auto"       # triton_prefill / triton_serial: "auto" or a pod.kernels.configs name
    decode_config: str = "auto"        # triton_decode / triton_serial: a DECODE_CONFIGS name
    pod_config: str = "dispatcher"     # pod: a POD_CONFIGS name ("dispatcher": chosen per batch)
    pod_autotune: bool = False         # pod: time pod_autotune_candidates per batch and keep the fastest
    pod_sm90_decode_gbps: float = 0.0  # pod_sm90: a decode SM's K/V rate in its planner's cost model, every head_dim (0: its defaults)
    pod_sm90_decode_ctas: int = 0      # pod_sm90: force the SM split (decode CTAs; 0: the planner's)
    pod_sm90_static_tails: bool = False  # pod, pod_sm90: the planner's static-tail search (PodSm90Config.static_tail_keys=STATIC_TAIL_KEYS)
    fi_prefill_backend: str = "auto"   # FlashInfer prefill wrappers' backend: auto (fa3 on Hopper) | fa2 | fa3

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None) -> "BackendOptions":
        cfg = dict(cfg or {})
        known = {f.name for f in fields(cls)}
        unknown = set(cfg) - known
        if unknown:
            raise ValueError(f"unknown backend_options {sorted(unknown)}; allowed: {sorted(known)}")
        return cls(**cfg)

    def as_dict(self) -> dict:
        return asdict(self)


DEFAULT_OPTIONS = BackendOptions()


class BackendUnavailable(RuntimeError):
    """The backend cannot run here (no CUDA, optional package missing, unsupported batch)."""


@dataclass(frozen=True)
class Backend:
    name: str
    prepare: Prepare
    computes: frozenset[str]               # subset of {"prefill", "decode"}
    layouts: frozenset[str]                # subset of {"contiguous", "paged"}
    availability: Callable[[], str | None]  # None when it can run here, else the reason
    description: str = ""

    def setup(self, batch: HybridBatch, options: BackendOptions = DEFAULT_OPTIONS):
        """prepare(batch[, options]): the untimed shape-only work; returns the timed `run`."""
        if len(inspect.signature(self.prepare).parameters) >= 2:
            return self.prepare(batch, options)
        return self.prepare(batch)

    def unavailable_reason(self, batch: HybridBatch | None = None) -> str | None:
        why = self.availability()
        if why is None and batch is not None:
            why = self.unavailable_for(batch.spec)
        return why

    def unavailable_for(self, spec: BatchSpec) -> str | None:
        """Why this backend cannot run a batch of `spec` (its KV layout, or no part it computes)."""
        layout = "paged" if spec.paged else "contiguous"
        if layout not in self.layouts:
            return f"{self.name} supports {sorted(self.layouts)} KV, not {layout}"
        needs = set()
        if spec.num_prefill:
            needs.add("prefill")
        if spec.num_decode:
            needs.add("decode")
        if not (needs & self.computes):
            return f"{self.name} computes {sorted(self.computes)}; the batch has only {sorted(needs)}"
        return None

    def is_available(self) -> bool:
        return self.availability() is None


_REGISTRY: dict[str, Backend] = {}

def always_available() -> str | None:
    return None


def cuda_available() -> str | None:
    return None if torch.cuda.is_available() else "GPU only: needs a CUDA GPU (torch.cuda.is_available() is False)"


def register_backend(name: str, *, computes=("prefill", "decode"), layouts=("contiguous", "paged"),
                     availability: Callable[[], str | None] = always_available, description: str = ""):
    def deco(prepare: Prepare) -> Prepare:
        if name in _REGISTRY and _REGISTRY[name].prepare is not prepare:
            raise ValueError(f"backend {name!r} is registered twice")
        _REGISTRY[name] = Backend(name, prepare, frozenset(computes), frozenset(layouts), availability,
                                  description or (prepare.__doc__ or "").strip().split("\n")[0])
        return prepare
    return deco


def _load_all() -> None:
    """Import every module of this package: their @register_backend decorators fill the registry.
    A missing optional dependency (FlashInfer) is handled inside its module via `availability`."""
    for info in pkgutil.iter_modules([str(Path(__file__).parent)]):
        if info.name != "registry" and not info.name.startswith("_"):
            importlib.import_module(f"baselines.{info.name}")


class UnknownBackend(KeyError):
    """A backend name nobody registered."""

    def __str__(self) -> str:
        return str(self.args[0])


def get_backend(name: str) -> Backend:
    _load_all()
    if name not in _REGISTRY:
        raise UnknownBackend(f"unknown backend {name!r}; registered: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def list_backends() -> dict[str, Backend]:
    _load_all()
    return dict(sorted(_REGISTRY.items()))
