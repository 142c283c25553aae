"""Log-sum-exp merge of split-KV partial results (flash-decoding's second step).

A decode request whose context is split into S ranges gets S partial results per query head, each
over a disjoint key set: ``o_s`` (fp32 [D], already normalised by its own softmax sum) and its base-2
log-sum-exp ``lse_s`` (the convention of pod/kernels/common.py). The exact attention output is

    M   = max_s lse_s
    w_s = 2 ** (lse_s - M)
    o   = sum_s w_s * o_s / sum_s w_s

Workspace layout (written by pod/kernels/decode.py, read here):
  part_indptr : int32 [num_decodes + 1]; request r owns partial rows part_indptr[r]:part_indptr[r+1]
                (no rows at all when the request has a single split: its output is written directly)
  part_o      : fp32 [num_partial_rows, Hq, D], contiguous
  part_lse    : fp32 [num_partial_rows, Hq], contiguous, base-2

`merge_heads` merges a block of query heads of one request; the standalone `_merge_kernel` runs it for
every (multi-split request, head block), and the fused POD kernel calls it from the last-arriving split
CTA of a (request, kv head) group.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def merge_heads(req, head_start, num_heads, part_indptr_ptr, part_o_ptr, part_lse_ptr,
                o_ptr, stride_on, stride_oh,
                NUM_Q_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr):
    """Merge the partials of query heads ``head_start .. head_start+num_heads-1`` (num_heads <= BLOCK_H)
    of request ``req`` and store them, cast to o's dtype, at ``o[req, head, :]``
    (``o_ptr + req*stride_on + head*stride_oh + d``).

    Partials are loaded with ``.cg`` (L2, not L1): inside a fused launch they were written by other
    CTAs moments before.
    """
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, HEAD_DIM)
    heads = head_start + offs_h
    h_valid = offs_h < num_heads
    row0 = tl.load(part_indptr_ptr + req)
    row1 = tl.load(part_indptr_ptr + req + 1)
    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    w = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, HEAD_DIM], tl.float32)
    # Online merge over the request's splits: a running max keeps every 2**x <= 1.
    for row in range(row0, row1):
        lse = tl.load(part_lse_ptr + row * NUM_Q_HEADS + heads, mask=h_valid, other=0.0,
                      cache_modifier=".cg")
        o_s = tl.load(part_o_ptr + (row * NUM_Q_HEADS + heads)[:, None] * HEAD_DIM + offs_d[None, :],
                      mask=h_valid[:, None], other=0.0, cache_modifier=".cg")
        m_new = tl.maximum(m, lse)
        # A split that saw no key has lse = -inf and weight 0; a row whose every split is empty
        # keeps m = -inf, so subtract 0 there instead (weights stay 0, no NaN).
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m - m_sub)
        beta = tl.math.exp2(lse - m_sub)
        acc = acc * alpha[:, None] + o_s * beta[:, None]
        w = w * alpha + beta
        m = m_new
    out = acc / tl.where(w == 0.0, 1.0, w)[:, None]
    tl.store(o_ptr + req.to(tl.int64) * stride_on + heads[:, None] * stride_oh + offs_d[None, :],
             out.to(o_ptr.dtype.element_ty), mask=h_valid[:, None])


@triton.jit
def _merge_kernel(merge_reqs_ptr, part_indptr_ptr, part_o_ptr, part_lse_ptr, o_ptr,
                  stride_on, stride_oh,
                  NUM_Q_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr):
    # grid: (num_merge_requests, cdiv(Hq, BLOCK_H)); merge_reqs lists the requests with > 1 split.
    req = tl.load(merge_reqs_ptr + tl.program_id(0))
    head_start = tl.program_id(1) * BLOCK_H
    merge_heads(req, head_start, NUM_Q_HEADS - head_start, part_indptr_ptr, part_o_ptr, part_lse_ptr,
                o_ptr, stride_on, stride_oh, NUM_Q_HEADS, HEAD_DIM, BLOCK_H)


def merge_block_h(num_q_heads: int) -> int:
    """Heads merged by one program: a power of two, at most 16 (16 x 128 fp32 = 8 KB of partials)."""
    return min(16, triton.next_power_of_2(num_q_heads))


def merge_partials(merge_reqs: torch.Tensor, part_indptr: torch.Tensor, part_o: torch.Tensor,
                   part_lse: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Launch the merge: ``out[r, h] = merge of part_o/part_lse rows of r`` for every r in merge_reqs.

    out: [num_decodes, Hq, D] (last dim contiguous), rows not in merge_reqs are left untouched.
    """
    num_q_heads, head_dim = part_o.shape[1], part_o.shape[2]
    if merge_reqs.numel() == 0:
        return out
    block_h = merge_block_h(num_q_heads)
    grid = (merge_reqs.numel(), triton.cdiv(num_q_heads, block_h))
    _merge_kernel[grid](merge_reqs, part_indptr, part_o, part_lse, out, out.stride(0), out.stride(1),
                        NUM_Q_HEADS=num_q_heads, HEAD_DIM=head_dim, BLOCK_H=block_h,
                        num_warps=4 if head_dim * block_h >= 2048 else 2)
    return out
