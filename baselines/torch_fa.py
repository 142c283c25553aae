"""FlashAttention-2 baselines through torch's built-in kernel (aten::_flash_attention_forward, varlen).

  fa2_serial   prefill chunks in one varlen call (causal), then the decodes in a second call
  fa2_streams  the same two calls on two CUDA streams joined by events (the paper's FA_Streams)
  fa2_batched  one varlen call over the whole hybrid batch, decodes as length-1 queries

Varlen layout (FA2): q [total_q, Hq, D] and k/v [total_k, Hkv, D] packed, sequence b owns q rows
cu_q[b]:cu_q[b+1] and k/v rows cu_k[b]:cu_k[b+1] (int32 [B+1], starting at 0); GQA is native
(Hq a multiple of Hkv). FA2's causal mask is bottom-right aligned when a sequence has fewer queries
than keys: query i of an Lq-row sequence over Lk keys sees keys 0..Lk-Lq+i, i.e. the queries are the
last Lq positions -- exactly a prefill chunk over context + chunk keys, and a 1-row query sees all.

Contiguous KV only (FA2's paged mode needs pages of 256 tokens). Sequences are ordered prefill chunks
first, then decodes, so each part's K/V is one contiguous slice of the cache, and its cu_k the slice of
kv_indptr rebased to 0: no copies. Argument building happens in prepare (untimed); run only launches.
`flash_varlen` is the one place that calls the kernel: tests replace it with a CPU stand-in.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from baselines.common import hybrid_q, hybrid_qo_indptr, split_rows
from pod.batch import HybridBatch
from baselines.registry import AttentionOutput, BackendUnavailable, register_backend

# The CUDA stream API used by fa2_streams (tests substitute a stand-in to run the logic on the CPU).
_cuda = torch.cuda


def fa2_availability() -> str | None:
    """None when torch's FlashAttention-2 kernel can run here, else why not."""
    if not torch.cuda.is_available():
        return "GPU only: needs a CUDA GPU (torch.cuda.is_available() is False)"
    if not hasattr(torch.ops.aten, "_flash_attention_forward"):
        return f"torch {torch.__version__} has no aten::_flash_attention_forward"
    flash_built = getattr(torch.backends.cuda, "is_flash_attention_available", lambda: True)
    if not flash_built():
        return f"torch {torch.__version__} was built without FlashAttention"
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        return f"FlashAttention-2 needs sm80 or newer, this GPU is sm{major}{minor}"
    return None


def flash_varlen(q, k, v, cu_q, cu_k, max_q: int, max_k: int, causal: bool, scale: float):
    """FA2 varlen forward; returns out [total_q, Hq, D] in q's dtype."""
    return torch.ops.aten._flash_attention_forward(
        q, k, v, cu_q, cu_k, max_q, max_k, 0.0, causal, False, scale=scale)[0]


@dataclass(frozen=True)
class VarlenCall:
    """The arguments of one flash_varlen call, built once in prepare."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    cu_q: torch.Tensor
    cu_k: torch.Tensor
    max_q: int
    max_k: int
    causal: bool
    scale: float

    def __call__(self) -> torch.Tensor:
        # Looked up at call time so the test seam (monkeypatched flash_varlen) applies.
        return flash_varlen(self.q, self.k, self.v, self.cu_q, self.cu_k, self.max_q, self.max_k,
                            self.causal, self.scale)


def _contiguous_kv(batch: HybridBatch) -> None:
    if batch.kv_indptr is None:
        raise BackendUnavailable("FlashAttention-2 (varlen) baselines need a contiguous KV cache "
                                 "(BatchSpec.page_size=None); FA2's paged mode needs pages of 256")


def _kv_slice(batch: HybridBatch, rows: slice) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(k, v, cu_k) of sequences rows.start..rows.stop-1: one contiguous slice of the cache (a view)
    and its kv_indptr rows rebased to 0."""
    first, last = int(batch.kv_indptr[rows.start]), int(batch.kv_indptr[rows.stop])
    cu_k = (batch.kv_indptr[rows.start:rows.stop + 1] - first).to(torch.int32)
    return batch.k_cache[first:last], batch.v_cache[first:last], cu_k


def prefill_call(batch: HybridBatch) -> VarlenCall | None:
    """The prefill chunks as one causal varlen call (None if the batch has no prefill)."""
    spec = batch.spec
    if not spec.num_prefill:
        return None
    k, v, cu_k = _kv_slice(batch, batch.prefill_rows())
    return VarlenCall(batch.q_prefill, k, v, batch.q_indptr.to(torch.int32), cu_k,
                      max(c.chunk_len for c in spec.prefill_chunks),
                      max(c.kv_len for c in spec.prefill_chunks), True, batch.sm_scale)


def decode_call(batch: HybridBatch) -> VarlenCall | None:
    """The decodes as one varlen call of 1-row queries (None if the batch has no decode)."""
    spec = batch.spec
    if not spec.num_decode:
        return None
    k, v, cu_k = _kv_slice(batch, batch.decode_rows())
    cu_q = torch.arange(spec.num_decode + 1, dtype=torch.int32, device=batch.q_decode.device)
    return VarlenCall(batch.q_decode, k, v, cu_q, cu_k, 1, max(spec.decode_context_lens),
                      False, batch.sm_scale)


def batched_call(batch: HybridBatch) -> VarlenCall:
    """The whole hybrid batch as one causal varlen call: chunk rows then one row per decode."""
    spec = batch.spec
    k, v, cu_k = _kv_slice(batch, slice(0, spec.num_prefill + spec.num_decode))
    max_q = max([c.chunk_len for c in spec.prefill_chunks] + [1] * bool(spec.num_decode))
    return VarlenCall(hybrid_q(batch), k, v, hybrid_qo_indptr(batch), cu_k, max_q,
                      max(spec.kv_lens), True, batch.sm_scale)


def _or_empty(call: VarlenCall | None, like: torch.Tensor):
    """The call itself, or (no rows of this part) a function returning a preallocated empty output."""
    if call is not None:
        return call
    empty = torch.empty_like(like)
    return lambda: empty


_FA = dict(layouts=("contiguous",), availability=fa2_availability)


@register_backend("fa2_serial", **_FA,
                  description="torch FlashAttention-2 varlen: prefill call then decode call")
def prepare_fa2_serial(batch: HybridBatch):
    _contiguous_kv(batch)
    pre = _or_empty(prefill_call(batch), batch.q_prefill)
    dec = _or_empty(decode_call(batch), batch.q_decode)

    def run() -> AttentionOutput:
        return AttentionOutput(pre(), dec())
    return run


@register_backend("fa2_streams", **_FA,
                  description="torch FlashAttention-2: prefill and decode calls on two CUDA streams")
def prepare_fa2_streams(batch: HybridBatch):
    _contiguous_kv(batch)
    parts = (_or_empty(prefill_call(batch), batch.q_prefill),
             _or_empty(decode_call(batch), batch.q_decode))
    device = batch.device
    side = tuple(_cuda.Stream(device=device) for _ in parts)

    def run() -> AttentionOutput:
        main = _cuda.current_stream(device)
        outs = []
        for stream, part in zip(side, parts):
            stream.wait_stream(main)         # inputs written on main are visible (event record+wait)
            with _cuda.stream(stream):
                out = part()
            if out.is_cuda:
                out.record_stream(main)      # allocated on `stream`, consumed on main: keep it alive
            outs.append(out)
        for stream in side:
            main.wait_stream(stream)         # join: main waits on both parts' events
        return AttentionOutput(*outs)
    return run


@register_backend("fa2_batched", **_FA,
                  description="torch FlashAttention-2: one varlen call, decodes as 1-token queries")
def prepare_fa2_batched(batch: HybridBatch):
    _contiguous_kv(batch)
    call = batched_call(batch)

    def run() -> AttentionOutput:
        return split_rows(call(), batch)
    return run
