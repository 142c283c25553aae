"""The one backend registry: every attention implementation the harness can run, ours and baselines.

A backend is registered with `@register_backend(name, ...)` on a *prepare* function:

    prepare(batch: HybridBatch) -> run: Callable[[], AttentionOutput]

`prepare` does everything that depends only on the batch's shape and tensors (FlashInfer's plan(),
our pod.plan(), workspace allocation) and is never timed; the returned `run` only launches kernels
and is what the harness times, as an engine would call it once per layer. Backends return outputs;
the harness (not the backend) checks them against the reference and computes metrics.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch

from pod.batch import HybridBatch


class AttentionOutput(NamedTuple):
    prefill: torch.Tensor | None   # [total_chunk_tokens, Hq, D] or None if the backend skips prefill
    decode: torch.Tensor | None    # [num_decodes, Hq, D] or None if it skips decode


Prepare = Callable[[HybridBatch], Callable[[], AttentionOutput]]


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

    def unavailable_reason(self, batch: HybridBatch | None = None) -> str | None:
        why = self.availability()
        if why is not None:
            return why
        if batch is not None:
            layout = "paged" if batch.spec.paged else "contiguous"
            if layout not in self.layouts:
                return f"{self.name} supports {sorted(self.layouts)} KV, not {layout}"
            needs = set()
            if batch.spec.num_prefill:
                needs.add("prefill")
            if batch.spec.num_decode:
                needs.add("decode")
            if not (needs & self.computes):
                return f"{self.name} computes {sorted(self.computes)}; the batch has only {sorted(needs)}"
        return None

    def is_available(self) -> bool:
        return self.availability() is None


_REGISTRY: dict[str, Backend] = {}

# Modules whose import registers backends. Imported lazily so that `pod` stays light and optional
# packages (FlashInfer) are only touched when a backend list is asked for.
BACKEND_MODULES = (
    "pod.backends",
    "baselines.torch_fa",
    "baselines.flashinfer",
    "pod.ops",
    "pod.pod_attention",
)


def always_available() -> str | None:
    return None


def cuda_available() -> str | None:
    return None if torch.cuda.is_available() else "needs a CUDA GPU (torch.cuda.is_available() is False)"


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
    for mod in BACKEND_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            # Only a missing module of our own tree is tolerated (while it is being written);
            # a missing optional dependency must be handled inside the module via `availability`.
            if e.name != mod:
                raise


def get_backend(name: str) -> Backend:
    _load_all()
    if name not in _REGISTRY:
        raise KeyError(f"unknown backend {name!r}; registered: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def list_backends() -> dict[str, Backend]:
    _load_all()
    return dict(sorted(_REGISTRY.items()))
