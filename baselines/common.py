"""Index arithmetic shared by the baselines that run the hybrid batch as one ragged query."""
from __future__ import annotations

import torch

from pod.batch import HybridBatch
from baselines.registry import AttentionOutput


def hybrid_qo_indptr(batch: HybridBatch) -> torch.Tensor:
    """Query indptr [P+D+1] int32 of the whole batch as one ragged query: the prefill chunks, then
    one row per decode; these are the rows of torch.cat([q_prefill, q_decode])."""
    n_p = batch.q_prefill.shape[0]
    decode_ends = n_p + torch.arange(1, batch.spec.num_decode + 1, dtype=torch.int32,
                                     device=batch.q_indptr.device)
    return torch.cat([batch.q_indptr.to(torch.int32), decode_ends])


def hybrid_q(batch: HybridBatch) -> torch.Tensor:
    """[prefill tokens + decodes, Hq, D]: the queries as one tensor, as an engine holds them (a copy
    here, made in prepare, untimed)."""
    return torch.cat([batch.q_prefill, batch.q_decode])


def split_rows(out: torch.Tensor, batch: HybridBatch) -> AttentionOutput:
    """Views of a whole-batch output: rows [0, prefill tokens) are prefill, the rest decode. No copy."""
    n_p = batch.q_prefill.shape[0]
    return AttentionOutput(out[:n_p], out[n_p:])
