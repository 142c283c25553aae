"""Backends of our own: the fp32 reference (and, registered by the kernel modules, the Triton ones)."""
from __future__ import annotations

from pod.batch import HybridBatch
from pod.reference import reference
from pod.registry import AttentionOutput, register_backend


@register_backend("reference", description="fp32 PyTorch reference (ground truth, slow)")
def prepare_reference(batch: HybridBatch):
    def run() -> AttentionOutput:
        p, d = reference(batch)
        return AttentionOutput(p.to(batch.q_prefill.dtype), d.to(batch.q_decode.dtype))
    return run
