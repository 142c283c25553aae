"""POD-Attention in Triton: prefill and decode attention of a hybrid batch in one kernel launch."""
from pod.batch import BatchSpec, HybridBatch, ModelHeads, PrefillChunk, make_batch
from pod.registry import AttentionOutput, get_backend, list_backends, register_backend

__all__ = ["BatchSpec", "HybridBatch", "ModelHeads", "PrefillChunk", "make_batch",
           "AttentionOutput", "get_backend", "list_backends", "register_backend",
           "plan", "run", "pod_attention"]


def __getattr__(name):
    # The fused-kernel API is imported on first use, so `import pod` does not import Triton (whose
    # TRITON_INTERPRET switch is read when kernels are defined). The submodule pod.pod_attention
    # shares the function's name; it is callable, so `pod.pod_attention(batch)` works either way.
    if name in ("plan", "run", "pod_attention"):
        import importlib
        api = importlib.import_module("pod.pod_attention")
        return api if name == "pod_attention" else getattr(api, name)
    raise AttributeError(f"module 'pod' has no attribute {name!r}")
