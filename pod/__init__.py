"""POD-Attention in Triton: prefill and decode attention of a hybrid batch in one kernel launch.

The product, importable alone: the batch spec (pod.batch), the fp32 reference (pod.reference), the
kernels (pod.kernels), the plan/run API (pod.api) and the dispatcher (pod.dispatch).
"""
from pod.batch import BatchSpec, HybridBatch, ModelHeads, PrefillChunk, make_batch

__all__ = ["BatchSpec", "HybridBatch", "ModelHeads", "PrefillChunk", "make_batch",
           "plan", "run", "pod_attention"]


def __getattr__(name):
    # The API is imported on first use, so `import pod` does not import Triton (whose TRITON_INTERPRET
    # switch is read when kernels are defined).
    if name in ("plan", "run", "pod_attention"):
        from pod import api
        return getattr(api, name)
    raise AttributeError(f"module 'pod' has no attribute {name!r}")
