"""Index arithmetic shared by the baselines that run the hybrid batch as one ragged query."""
from __future__ import annotations

import functools
import importlib.metadata
from dataclasses import dataclass

import torch

from pod.batch import HybridBatch
from baselines.registry import AttentionOutput


@functools.lru_cache(maxsize=None)
def installed_version(distribution: str) -> str | None:
    """The installed version of a distribution (read once: the serving engine prepares every iteration)."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def gpu_and_package(distribution: str, installed, install_hint: str) -> str | None:
    """None when there is a CUDA GPU and `distribution` is installed (`installed(name)` is not None),
    else one line saying what is missing (both, when both are)."""
    missing = []
    if not torch.cuda.is_available():
        missing.append("a CUDA GPU (torch.cuda.is_available() is False)")
    if installed(distribution) is None:
        missing.append(f"the {distribution} package (install: {install_hint})")
    if missing:
        return ("GPU only: " if not torch.cuda.is_available() else "") + "needs " + " and ".join(missing)
    return None


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


def joined_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor | None:
    """[a; b] as ONE view, no copy, when b's rows directly follow a's in one storage (the serving
    engine's q: prefill rows then decode rows of one tensor); None when they do not."""
    if a.shape[0] == 0:
        return b
    if b.shape[0] == 0:
        return a
    if not (a.is_contiguous() and b.is_contiguous() and a.shape[1:] == b.shape[1:] and a.dtype == b.dtype
            and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
            and b.storage_offset() == a.storage_offset() + a.numel()):
        return None
    return a.as_strided((a.shape[0] + b.shape[0], *a.shape[1:]), a.stride())


def hybrid_q_source(batch: HybridBatch):
    """A callable returning the batch's queries as one [tokens, Hq, D] tensor for a one-launch backend's
    run(): a view of the batch's own q tensors when they are adjacent (it follows the serving engine's
    per-layer re-pointing of q_prefill/q_decode), else a copy made now, in prepare (`hybrid_q`)."""
    if joined_rows(batch.q_prefill, batch.q_decode) is None:
        q = hybrid_q(batch)
        return lambda: q
    q_prefill, q_decode = batch.q_prefill, batch.q_decode
    return lambda: joined_rows(q_prefill, q_decode)


def split_rows(out: torch.Tensor, batch: HybridBatch) -> AttentionOutput:
    """Views of a whole-batch output: rows [0, prefill tokens) are prefill, the rest decode. No copy."""
    n_p = batch.q_prefill.shape[0]
    return AttentionOutput(out[:n_p], out[n_p:])


@dataclass(frozen=True)
class VarlenLayout:
    """The hybrid batch as ONE varlen batch, the layout of FlashAttention's varlen forward and of vLLM's
    unified attention: sequence i (prefill chunks first, then decodes) has queries
    q[cu_seqlens_q[i]:cu_seqlens_q[i+1]] of the joined q and keys the first seqused_k[i] tokens of its
    pages (paged: page_table[i, j] holds tokens j*page_size..) or rows cu_seqlens_k[i]:cu_seqlens_k[i+1]
    of the contiguous cache. The causal mask is bottom-right aligned (query j of the last n sees keys
    0..kv_len-n+j), so a decode's one query sees all its keys."""
    cu_seqlens_q: torch.Tensor              # [P+D+1] int32
    seqused_k: torch.Tensor                 # [P+D] int32 kv lengths
    page_table: torch.Tensor | None         # paged: [P+D, max_pages] int32 (the block table)
    cu_seqlens_k: torch.Tensor | None       # contiguous: [P+D+1] int32 (kv_indptr)
    max_seqlen_q: int
    max_seqlen_k: int


def varlen_layout(batch: HybridBatch) -> VarlenLayout:
    """Our batch's index tensors in the varlen layout (pure: no kernel, no host sync)."""
    spec = batch.spec
    max_q = max([c.chunk_len for c in spec.prefill_chunks] + [1] * bool(spec.num_decode))
    as_index = lambda t: t.to(torch.int32).contiguous()   # noqa: E731 - no copy when already int32
    paged = batch.block_table is not None
    return VarlenLayout(cu_seqlens_q=hybrid_qo_indptr(batch), seqused_k=as_index(batch.kv_lens),
                        page_table=as_index(batch.block_table) if paged else None,
                        cu_seqlens_k=None if paged else as_index(batch.kv_indptr),
                        max_seqlen_q=max_q, max_seqlen_k=max(spec.kv_lens))
