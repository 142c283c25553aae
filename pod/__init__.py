"""POD-Attention in Triton: prefill and decode attention of a hybrid batch in one kernel launch."""
from pod.batch import BatchSpec, HybridBatch, ModelHeads, PrefillChunk, make_batch
from pod.registry import AttentionOutput, get_backend, list_backends, register_backend

__all__ = ["BatchSpec", "HybridBatch", "ModelHeads", "PrefillChunk", "make_batch",
           "AttentionOutput", "get_backend", "list_backends", "register_backend"]
