"""Chunked-prefill attention in Triton: any number of prefill chunks in one launch, GQA, paged or
contiguous KV, output + base-2 log-sum-exp.

Math. Chunk c belongs to sequence c (prefill chunks come first, see pod/batch.py). Its chunk_len queries
are the last positions of a sequence of kv_len = context_len + chunk_len keys: query row i sits at
position context_len + i and attends causally to keys 0..context_len+i. Query head h reads KV head
h // GROUP. Per row, with s2_j = (q . k_j) * sm_scale * log2(e) (exp2 domain, see common.py):
    out = sum_j 2^(s2_j - lse2) v_j,      lse2 = log2(sum_j 2^(s2_j))      (fp32, base 2).

Memory layout (NHD, token-major; d is the unit-stride dimension everywhere):
    Q, O : [total_chunk_tokens, Hq, D]   chunk c owns rows q_indptr[c]:q_indptr[c+1]
    LSE  : [total_chunk_tokens, Hq] fp32 (base 2; natural log = lse2 * ln 2)
    K, V : contiguous [total_kv_tokens, Hkv, D] (rows kv_indptr[s]:kv_indptr[s+1]) or
           paged [num_pages, page_size, Hkv, D] with block_table [num_seqs, max_pages] int32.

Work decomposition. A *tile* is one BLOCK_M block of query rows of one chunk for one q head. The plan
(`plan_prefill`, host, shape-only) lists *units* (chunk, q_block) in an int32 tensor
work_units [num_units, 2], heaviest first (a unit's cost is the number of keys its last row sees), so
the long causal tiles start first and the short ones fill the tail. Tile t is unit t // Hq, q head
t % Hq: the GROUP q heads sharing a KV head are neighbours and read the same K/V tiles through L2.

Per tile the KV loop is split in two: keys < context_len + q_block*BLOCK_M (rounded down to BLOCK_N)
are visible to every row of the block and run without any mask; only the remaining diagonal tiles
(at most ceil(BLOCK_M / BLOCK_N) + 1) apply the causal and length masks.

Reuse by the fused POD kernel (pod/kernels/pod_fused.py): call

    prefill_tile(tile_id,                           # int32 in [0, work.num_tiles)
                 Q, K, V, O, LSE,                   # pointers (LSE ignored unless HAS_LSE)
                 q_indptr, kv_lens, kv_indptr, block_table, work_units,   # int32 pointers
                 num_q_heads,                       # int
                 stride_q_tok, stride_q_head, stride_o_tok, stride_o_head,
                 stride_lse_tok, stride_lse_head,
                 stride_kv_page, stride_kv_tok, stride_kv_head, stride_bt_seq,
                 qk_scale,                          # float: sm_scale * log2(e)
                 GROUP, HEAD_DIM, BLOCK_M, BLOCK_N, PAGE_SIZE, PAGED, HAS_LSE,   # constexprs
                 USE_TMA=False, WARP_SPECIALIZE=False)                          # optional constexprs

`prefill_launch_args(batch, work, out, lse)` returns exactly the runtime arguments after tile_id (a
tuple) and `work.constexprs()` the constexpr ones (a dict), so a caller can forward them unchanged.
kv_indptr is read only when not PAGED and block_table only when PAGED (pass any int32 tensor for the
other). K and V must have the same strides. The tile writes O and (HAS_LSE) LSE rows of its block
and head only; rows past chunk_len are neither read nor written.

Configs (`PREFILL_CONFIGS`, or any `PrefillConfig`): "autotune" (GPU default; override with env
POD_PREFILL_CONFIG), "h100"/"h100_tma" fixed, "fused"/"fused_small"/"fused_m64" sized for a fused
kernel sharing the SM with a decode CTA, "interpret" for CPU tests, and tuning candidates (VARIANTS:
_pv/_pf paged address generation, _s4 four stages, n128 BLOCK_N=128, _tma tensor descriptors).
`bench_prefill()` times configs on the GPU; `python -m pod.kernels.prefill --variants [NAMES]` times the
tuning candidates and the FlashInfer/FA2 baselines on the paged-KV tuning shapes (`bench_variants`);
`python -m pod.kernels.prefill --sm90` reports sm_90 shared memory/registers without a GPU.

Paged address generation (PAGED_ADDR, sm_90 compile of BLOCK_M=128, BLOCK_N=64, 3 stages, D=128):
per-key block-table reads (0) leave the pipeliner only 2 K/V buffers (96 KB shared memory, vs 128 KB
contiguous); reading the next tile's page ids one iteration ahead (2) restores 3 (4 with num_stages=4),
on the pointer and the TMA path alike.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl

from pod.batch import BatchSpec, HybridBatch
from pod.kernels.common import (ensure_tma_allocator, kv_tile_offsets, online_softmax_update_qk,
                               paged_tile_offsets, qk_scale_log2, softmax_finalize)


def interpreting() -> bool:
    """True under the Triton interpreter (CPU tests): small fixed block sizes, no autotune."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# ------------------------------------------------------------------------------------------------
# The kernel
# ------------------------------------------------------------------------------------------------
@triton.jit
def _kv_step(q, q_pos, m_i, l_i, acc, K, V, k_desc, v_desc, start, seq, kv_len, kv_indptr, block_table,
             stride_bt_seq, stride_kv_page, stride_kv_tok, kv_head_off, qk_scale, off_pre,
             HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr,
             PAGED: tl.constexpr, MASKED: tl.constexpr, USE_TMA: tl.constexpr,
             PAGED_ADDR: tl.constexpr = 0, OFF_GIVEN: tl.constexpr = False):
    """One KV tile (keys start..start+BLOCK_N-1) of one query block: scores, online softmax, P @ V.

    MASKED: apply the causal mask (key <= query position) and the length mask (key < kv_len).
    Pointer path: OFF_GIVEN uses ``off_pre`` (int64 [BLOCK_N] row offsets incl. the head, computed
    one iteration ahead by the caller); else PAGED_ADDR > 0 builds them with `paged_tile_offsets`
    (one block-table read a page), PAGED_ADDR == 0 with `kv_tile_offsets` (one a key)."""
    offs_n = start + tl.arange(0, BLOCK_N)
    key_ok = offs_n < kv_len
    if USE_TMA:
        # Descriptors over the token-major cache viewed as 2-D [tokens, Hkv*D]; the block is this
        # head's [BLOCK_N, D] slab. Contiguous: rows are relative to the sequence's first row and
        # rows >= kv_len read as 0. Paged: one page holds the whole tile (PAGE_SIZE % BLOCK_N == 0).
        if PAGED and OFF_GIVEN:
            row = off_pre                                       # cache row, read one tile ahead
        elif PAGED:
            page = tl.load(block_table + seq.to(tl.int64) * stride_bt_seq + start // PAGE_SIZE)
            row = page * PAGE_SIZE + start % PAGE_SIZE
        else:
            row = start
        k = k_desc.load([row, kv_head_off])                     # [BLOCK_N, D]
        qk = tl.dot(q, k.T)                                    # [BLOCK_M, BLOCK_N] raw scores
    else:
        if OFF_GIVEN:
            off = off_pre
        elif PAGED and PAGED_ADDR > 0:
            off = paged_tile_offsets(seq, start, kv_len, block_table, stride_bt_seq, stride_kv_page,
                                     stride_kv_tok, BLOCK_N, PAGE_SIZE, MASKED) + kv_head_off
        else:
            off = kv_tile_offsets(seq, start, kv_len, kv_indptr, block_table, stride_bt_seq,
                                  stride_kv_page, stride_kv_tok, BLOCK_N, PAGE_SIZE, PAGED) + kv_head_off
        offs_d = tl.arange(0, HEAD_DIM)
        if MASKED:
            k = tl.load(K + off[None, :] + offs_d[:, None], mask=key_ok[None, :], other=0.0)
        else:
            k = tl.load(K + off[None, :] + offs_d[:, None])     # K^T tile [D, BLOCK_N]
        qk = tl.dot(q, k)                                      # [BLOCK_M, BLOCK_N] raw scores
    if MASKED:
        visible = (offs_n[None, :] <= q_pos[:, None]) & key_ok[None, :]
        qk = tl.where(visible, qk, float("-inf"))
    # exp2 domain: p = 2^(qk * qk_scale - m), one FMA a score.
    p, m_i, l_i, acc = online_softmax_update_qk(m_i, l_i, acc, qk, qk_scale)
    if USE_TMA:
        v = v_desc.load([row, kv_head_off])                     # V tile [BLOCK_N, D]
        if MASKED:
            # Slots past kv_len of a paged sequence's last page hold stale data: keep NaN out of P @ V.
            v = tl.where(key_ok[:, None], v, 0.0)
    else:
        if MASKED:
            v = tl.load(V + off[:, None] + offs_d[None, :], mask=key_ok[:, None], other=0.0)
        else:
            v = tl.load(V + off[:, None] + offs_d[None, :])
    acc = tl.dot(p.to(v.dtype), v, acc)
    return m_i, l_i, acc


@triton.jit
def prefill_tile(tile_id,
                 Q, K, V, O, LSE,
                 q_indptr, kv_lens, kv_indptr, block_table, work_units,
                 num_q_heads,
                 stride_q_tok, stride_q_head, stride_o_tok, stride_o_head,
                 stride_lse_tok, stride_lse_head,
                 stride_kv_page, stride_kv_tok, stride_kv_head, stride_bt_seq,
                 qk_scale,
                 GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr, PAGED: tl.constexpr,
                 HAS_LSE: tl.constexpr, USE_TMA: tl.constexpr = False,
                 WARP_SPECIALIZE: tl.constexpr = False, PAGED_ADDR: tl.constexpr = 0):
    """One tile: BLOCK_M query rows of one chunk, one q head (see the module docstring).

    USE_TMA (optional, default False): load K/V tiles through tensor descriptors (TMA on Hopper) instead
    of pointer tensors; needs a dense cache and, when PAGED, PAGE_SIZE % BLOCK_N == 0; the launcher must
    have called `pod.kernels.common.ensure_tma_allocator()`. WARP_SPECIALIZE (optional, default False):
    ask Triton to warp-specialise the unmasked KV loop. PAGED_ADDR (optional, default 0; paged pointer
    path only, PAGE_SIZE and BLOCK_N powers of two): 0 = one block-table read per key
    (`kv_tile_offsets`); 1 = one per page (`paged_tile_offsets`); 2 = as 1, and the unmasked loop reads
    the next tile's page ids one iteration ahead (software prefetch: the K/V loads of a pipeline stage
    never wait on a dependent block-table load)."""
    unit = tile_id // num_q_heads
    head = tile_id % num_q_heads
    # work_units: [num_units, 2] int32 (chunk, q_block); chunk c is sequence c of the batch.
    chunk = tl.load(work_units + 2 * unit)
    q_block = tl.load(work_units + 2 * unit + 1)
    q_start = tl.load(q_indptr + chunk)
    chunk_len = tl.load(q_indptr + chunk + 1) - q_start
    kv_len = tl.load(kv_lens + chunk)
    context = kv_len - chunk_len
    kv_head = head // GROUP

    offs_m = q_block * BLOCK_M + tl.arange(0, BLOCK_M)       # query row inside the chunk
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < chunk_len
    q_rows = (q_start + offs_m).to(tl.int64)
    # Q tile [BLOCK_M, D]: rows of the packed query tensor, this head's D contiguous elements.
    q = tl.load(Q + q_rows[:, None] * stride_q_tok + head * stride_q_head + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    q_pos = context + offs_m                                   # absolute position of each query

    if USE_TMA:
        kv_head_off = kv_head * stride_kv_head                 # column of the 2-D [tokens, Hkv*D] view
        if PAGED:
            # Every page is allocated, and a tile never leaves its page: no bound needed on the rows.
            k_desc = tl.make_tensor_descriptor(K, shape=[2147483647, stride_kv_tok],
                                               strides=[stride_kv_tok, 1], block_shape=[BLOCK_N, HEAD_DIM])
            v_desc = tl.make_tensor_descriptor(V, shape=[2147483647, stride_kv_tok],
                                               strides=[stride_kv_tok, 1], block_shape=[BLOCK_N, HEAD_DIM])
        else:
            row0 = tl.load(kv_indptr + chunk).to(tl.int64)
            k_desc = tl.make_tensor_descriptor(K + row0 * stride_kv_tok, shape=[kv_len, stride_kv_tok],
                                               strides=[stride_kv_tok, 1], block_shape=[BLOCK_N, HEAD_DIM])
            v_desc = tl.make_tensor_descriptor(V + row0 * stride_kv_tok, shape=[kv_len, stride_kv_tok],
                                               strides=[stride_kv_tok, 1], block_shape=[BLOCK_N, HEAD_DIM])
    else:
        kv_head_off = kv_head.to(tl.int64) * stride_kv_head
        k_desc = K
        v_desc = V

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)

    # Keys [0, full_end): every row of the block sees them (key < context + first row of the block).
    full_end = (context + q_block * BLOCK_M) // BLOCK_N * BLOCK_N
    # Keys [full_end, kv_hi): the diagonal, causal-masked. kv_hi: one past the last row's position.
    kv_hi = context + tl.minimum((q_block + 1) * BLOCK_M, chunk_len)

    if PAGED and PAGED_ADDR == 2 and USE_TMA:
        # TMA with pages holding whole tiles: the cache row of tile `start` was read one iteration ahead.
        bt_row = block_table + chunk.to(tl.int64) * stride_bt_seq
        row = tl.load(bt_row) * PAGE_SIZE
        for start in tl.range(0, full_end, BLOCK_N, warp_specialize=WARP_SPECIALIZE):
            nxt = start + BLOCK_N                              # <= full_end < kv_len: a valid page
            row_next = tl.load(bt_row + nxt // PAGE_SIZE) * PAGE_SIZE + nxt % PAGE_SIZE
            m_i, l_i, acc = _kv_step(q, q_pos, m_i, l_i, acc, K, V, k_desc, v_desc, start, chunk, kv_len,
                                     kv_indptr, block_table, stride_bt_seq, stride_kv_page, stride_kv_tok,
                                     kv_head_off, qk_scale, row, HEAD_DIM, BLOCK_N, PAGE_SIZE, PAGED,
                                     False, USE_TMA, PAGED_ADDR, True)
            row = row_next
    elif PAGED and PAGED_ADDR == 2:
        # Offsets of tile `start` were read during the previous iteration. The read for the tile after
        # the last unmasked one is masked by kv_len (it may be a diagonal tile or past the end).
        off = paged_tile_offsets(chunk, 0, kv_len, block_table, stride_bt_seq, stride_kv_page,
                                 stride_kv_tok, BLOCK_N, PAGE_SIZE, True) + kv_head_off
        for start in tl.range(0, full_end, BLOCK_N, warp_specialize=WARP_SPECIALIZE):
            off_next = paged_tile_offsets(chunk, start + BLOCK_N, kv_len, block_table, stride_bt_seq,
                                          stride_kv_page, stride_kv_tok, BLOCK_N, PAGE_SIZE, True) + kv_head_off
            m_i, l_i, acc = _kv_step(q, q_pos, m_i, l_i, acc, K, V, k_desc, v_desc, start, chunk, kv_len,
                                     kv_indptr, block_table, stride_bt_seq, stride_kv_page, stride_kv_tok,
                                     kv_head_off, qk_scale, off, HEAD_DIM, BLOCK_N, PAGE_SIZE, PAGED,
                                     False, USE_TMA, PAGED_ADDR, True)
            off = off_next
    else:
        for start in tl.range(0, full_end, BLOCK_N, warp_specialize=WARP_SPECIALIZE):
            m_i, l_i, acc = _kv_step(q, q_pos, m_i, l_i, acc, K, V, k_desc, v_desc, start, chunk, kv_len,
                                     kv_indptr, block_table, stride_bt_seq, stride_kv_page, stride_kv_tok,
                                     kv_head_off, qk_scale, 0, HEAD_DIM, BLOCK_N, PAGE_SIZE, PAGED,
                                     False, USE_TMA, PAGED_ADDR, False)
    for start in range(full_end, kv_hi, BLOCK_N):
        m_i, l_i, acc = _kv_step(q, q_pos, m_i, l_i, acc, K, V, k_desc, v_desc, start, chunk, kv_len,
                                 kv_indptr, block_table, stride_bt_seq, stride_kv_page, stride_kv_tok,
                                 kv_head_off, qk_scale, 0, HEAD_DIM, BLOCK_N, PAGE_SIZE, PAGED,
                                 True, USE_TMA, PAGED_ADDR, False)

    out, lse2 = softmax_finalize(m_i, l_i, acc)
    tl.store(O + q_rows[:, None] * stride_o_tok + head * stride_o_head + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=row_ok[:, None])
    if HAS_LSE:
        tl.store(LSE + q_rows * stride_lse_tok + head * stride_lse_head, lse2, mask=row_ok)


@triton.jit
def _prefill_kernel(Q, K, V, O, LSE,
                    q_indptr, kv_lens, kv_indptr, block_table, work_units,
                    num_q_heads,
                    stride_q_tok, stride_q_head, stride_o_tok, stride_o_head,
                    stride_lse_tok, stride_lse_head,
                    stride_kv_page, stride_kv_tok, stride_kv_head, stride_bt_seq,
                    qk_scale,
                    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr, PAGED: tl.constexpr,
                    HAS_LSE: tl.constexpr, USE_TMA: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
                    PAGED_ADDR: tl.constexpr = 0):
    prefill_tile(tl.program_id(0),
                 Q, K, V, O, LSE,
                 q_indptr, kv_lens, kv_indptr, block_table, work_units,
                 num_q_heads,
                 stride_q_tok, stride_q_head, stride_o_tok, stride_o_head,
                 stride_lse_tok, stride_lse_head,
                 stride_kv_page, stride_kv_tok, stride_kv_head, stride_bt_seq,
                 qk_scale,
                 GROUP, HEAD_DIM, BLOCK_M, BLOCK_N, PAGE_SIZE, PAGED, HAS_LSE, USE_TMA, WARP_SPECIALIZE,
                 PAGED_ADDR)


# Autotune space on the GPU (BLOCK_M is fixed by the plan because the work list depends on it).
# Keyed on the shapes that decide code; Triton adds the tensor dtypes to the key itself. sm_90 compile
# of D=128 bf16, BLOCK_M=128 (pod.kernels.common.sm90_compile_report): BLOCK_N=64 ~190 registers and
# 96/128/160 KB shared memory at 2/3/4 stages; BLOCK_N=128 ~250 registers, 160 KB at 2 stages.
AUTOTUNE_CONFIGS = [
    triton.Config({"BLOCK_N": 64}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_N": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_N": 64}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_N": 128}, num_warps=8, num_stages=2),
]
_prefill_kernel_autotuned = triton.autotune(
    configs=AUTOTUNE_CONFIGS,
    key=["GROUP", "HEAD_DIM", "BLOCK_M", "PAGE_SIZE", "PAGED", "HAS_LSE", "USE_TMA", "WARP_SPECIALIZE",
         "PAGED_ADDR"],
)(_prefill_kernel)


# ------------------------------------------------------------------------------------------------
# Plan (host, shape-only) and run (launch only)
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PrefillConfig:
    """Block sizes and launch knobs.

    block_n=None: autotune BLOCK_N / num_warps / num_stages over AUTOTUNE_CONFIGS (GPU only).
    use_tma: K/V through tensor descriptors (TMA); used where the layout allows it (contiguous KV, or
    pages holding whole KV tiles), else the plan falls back to pointer loads.
    warp_specialize: Triton's automatic warp specialisation of the unmasked KV loop. Triton 3.6 ignores
    it on sm_90 (the sm_90 compile has no warp-specialised partitions); kept for newer Triton / Blackwell.
    paged_addr: paged-KV address generation of the pointer path (see `prefill_tile`'s PAGED_ADDR):
    0 one block-table read a key, 1 one a page, 2 one a page read one KV tile ahead (also with TMA,
    where 0 and 1 are the same: one read a tile). Used for paged KV with a power-of-two page, else 0."""
    block_m: int = 128
    block_n: int | None = 64
    num_warps: int = 8
    num_stages: int = 3
    use_tma: bool = False
    warp_specialize: bool = False
    paged_addr: int = 0

    def to_json(self) -> dict:
        return {"block_m": self.block_m, "block_n": self.block_n, "num_warps": self.num_warps,
                "num_stages": self.num_stages, "use_tma": self.use_tma,
                "warp_specialize": self.warp_specialize, "paged_addr": self.paged_addr}


PREFILL_CONFIGS: dict[str, PrefillConfig] = {
    # Standalone prefill on H100: fixed BLOCK_M=128, the rest autotuned over AUTOTUNE_CONFIGS.
    "autotune": PrefillConfig(block_m=128, block_n=None),
    "autotune_tma": PrefillConfig(block_m=128, block_n=None, use_tma=True),
    # FA-tutorial-like fixed choices for Hopper, D=128 (128 KB shared memory).
    "h100": PrefillConfig(block_m=128, block_n=64, num_warps=8, num_stages=3),
    "h100_tma": PrefillConfig(block_m=128, block_n=64, num_warps=8, num_stages=3, use_tma=True),
    # For the fused POD kernel, where a prefill CTA and a decode CTA share an SM. One fused kernel has
    # one register count and warp count for both roles, so 2 CTAs/SM need
    # 2 * num_warps * 32 * registers <= 65536 and 2 * shared <= ~227 KB. sm_90 compile, D=128 bf16:
    #   "fused":       BLOCK_M=128, 8 warps: 96 KB, ~190 registers -> 2 CTAs/SM only with maxnreg=128
    #                  (which spills 100-200 B; Q 32 KB + 2 stages x (K 16 KB + V 16 KB)).
    #   "fused_small": BLOCK_M=128, BLOCK_N=32, 8 warps: 64 KB, ~146 registers.
    #   "fused_m64":   BLOCK_M=64, 4 warps: 80 KB, ~215 registers -> 2 x 27.5K registers: fits 2 CTAs/SM.
    "fused": PrefillConfig(block_m=128, block_n=64, num_warps=8, num_stages=2),
    "fused_small": PrefillConfig(block_m=128, block_n=32, num_warps=8, num_stages=2),
    "fused_m64": PrefillConfig(block_m=64, block_n=64, num_warps=4, num_stages=2),
    # Candidates for the standalone defaults, compared by `bench_variants` (python -m pod.kernels.prefill
    # --variants). _pv: one block-table read a page (paged KV); _pf: that, read one KV tile ahead;
    # _s4: 4 pipeline stages (Q 32 KB + 4 x 32 KB = 160 KB at BLOCK_N=64, D=128); n128: BLOCK_N=128.
    "autotune_pv": PrefillConfig(block_m=128, block_n=None, paged_addr=1),
    "autotune_pf": PrefillConfig(block_m=128, block_n=None, paged_addr=2),
    "h100_pv": PrefillConfig(block_m=128, block_n=64, num_warps=8, num_stages=3, paged_addr=1),
    "h100_pf": PrefillConfig(block_m=128, block_n=64, num_warps=8, num_stages=3, paged_addr=2),
    "h100_s4": PrefillConfig(block_m=128, block_n=64, num_warps=8, num_stages=4),
    "h100_pv_s4": PrefillConfig(block_m=128, block_n=64, num_warps=8, num_stages=4, paged_addr=1),
    "h100_pf_s4": PrefillConfig(block_m=128, block_n=64, num_warps=8, num_stages=4, paged_addr=2),
    "h100_tma_s4": PrefillConfig(block_m=128, block_n=64, num_warps=8, num_stages=4, use_tma=True),
    "h100_tma_pf": PrefillConfig(block_m=128, block_n=64, num_warps=8, num_stages=3, use_tma=True, paged_addr=2),
    "h100_tma_pf_s4": PrefillConfig(block_m=128, block_n=64, num_warps=8, num_stages=4, use_tma=True,
                                    paged_addr=2),
    "autotune_tma_pf": PrefillConfig(block_m=128, block_n=None, use_tma=True, paged_addr=2),
    "n128_pv": PrefillConfig(block_m=128, block_n=128, num_warps=8, num_stages=2, paged_addr=1),
    "n128_pf": PrefillConfig(block_m=128, block_n=128, num_warps=8, num_stages=2, paged_addr=2),
    "n128_tma": PrefillConfig(block_m=128, block_n=128, num_warps=8, num_stages=2, use_tma=True),
    # Triton interpreter (CPU tests): small tiles so the emulation stays fast.
    "interpret": PrefillConfig(block_m=16, block_n=16, num_warps=4, num_stages=1),
}


def default_config() -> PrefillConfig:
    """"interpret" under the interpreter; on the GPU the named config in env POD_PREFILL_CONFIG
    (e.g. "autotune_tma" once bench_prefill shows it faster), else "autotune"."""
    if interpreting():
        return PREFILL_CONFIGS["interpret"]
    return resolve_config(os.environ.get("POD_PREFILL_CONFIG") or "autotune")


def resolve_config(config: PrefillConfig | str | None) -> PrefillConfig:
    if config is None:
        return default_config()
    if isinstance(config, str):
        if config not in PREFILL_CONFIGS:
            raise ValueError(f"prefill config {config!r} unknown; named configs: {sorted(PREFILL_CONFIGS)}")
        return PREFILL_CONFIGS[config]
    return config


def tma_fits(config: PrefillConfig, page_size: int | None) -> bool:
    """TMA reads a KV tile as one [BLOCK_N, D] box: always for contiguous KV, for paged KV only when
    every tile lies inside one page (page_size a multiple of every BLOCK_N the config may use)."""
    if page_size is None:
        return True
    block_ns = [config.block_n] if config.block_n else [c.kwargs["BLOCK_N"] for c in AUTOTUNE_CONFIGS]
    return all(page_size % n == 0 for n in block_ns)


@dataclass
class PrefillWork:
    """Everything `prefill()` needs besides the batch tensors: the work list and launch constants."""
    work_units: torch.Tensor        # [num_units, 2] int32 (chunk, q_block), heaviest first, on device
    num_units: int
    num_q_heads: int
    group: int
    head_dim: int
    page_size: int                  # 1 for contiguous (unused there)
    paged: bool
    config: PrefillConfig
    use_tma: bool = False           # config.use_tma where the layout allows it
    paged_addr: int = 0             # config.paged_addr where it applies (paged KV)
    unit_cost: list[int] = field(default_factory=list)   # keys seen by each unit's last row (host)

    @property
    def num_tiles(self) -> int:
        """Tiles (= CTAs of the standalone kernel): one per (unit, q head)."""
        return self.num_units * self.num_q_heads

    @property
    def autotune(self) -> bool:
        return self.config.block_n is None

    def constexprs(self, has_lse: bool = True) -> dict:
        """The constexpr arguments of `prefill_tile` (BLOCK_N omitted when autotuned, PAGED_ADDR when 0,
        its default, so callers that do not know it keep working)."""
        c = dict(GROUP=self.group, HEAD_DIM=self.head_dim, BLOCK_M=self.config.block_m,
                 PAGE_SIZE=self.page_size, PAGED=self.paged, HAS_LSE=has_lse,
                 USE_TMA=self.use_tma, WARP_SPECIALIZE=self.config.warp_specialize)
        if not self.autotune:
            c["BLOCK_N"] = self.config.block_n
        if self.paged_addr:
            c["PAGED_ADDR"] = self.paged_addr
        return c

    def describe(self) -> dict:
        """JSON-able knobs for result rows (backend_config)."""
        return dict(self.config.to_json(), use_tma=self.use_tma, paged_addr=self.paged_addr)


def plan_units(spec: BatchSpec, block_m: int) -> tuple[list[tuple[int, int]], list[int]]:
    """(chunk, q_block) units sorted by decreasing cost (keys seen by the block's last row).

    Ties keep (chunk, q_block) order, so the plan is deterministic."""
    units, cost = [], []
    for c, ch in enumerate(spec.prefill_chunks):
        for b in range(triton.cdiv(ch.chunk_len, block_m)):
            units.append((c, b))
            cost.append(ch.context_len + min((b + 1) * block_m, ch.chunk_len))
    order = sorted(range(len(units)), key=lambda i: -cost[i])
    return [units[i] for i in order], [cost[i] for i in order]


def plan_prefill(batch_or_spec: HybridBatch | BatchSpec, config: PrefillConfig | str | None = None,
                 device: torch.device | str | None = None) -> PrefillWork:
    """Plan the prefill part of a batch: work list (on `device`, default the batch's) and constants.

    Depends only on the batch's shape; call once per batch shape, then `prefill()` per layer."""
    if isinstance(batch_or_spec, HybridBatch):
        spec, device = batch_or_spec.spec, device or batch_or_spec.device
    else:
        spec, device = batch_or_spec, device or "cpu"
    cfg = resolve_config(config)
    if cfg.block_n is not None and cfg.block_n < 16 or cfg.block_m < 16:
        raise ValueError(f"prefill config {cfg}: block_m and block_n must be >= 16 (tl.dot)")
    units, cost = plan_units(spec, cfg.block_m)
    work_units = torch.tensor(units if units else [[0, 0]], dtype=torch.int32).reshape(-1, 2)
    h = spec.heads
    use_tma = cfg.use_tma and tma_fits(cfg, spec.page_size)
    page = spec.page_size or 0
    paged_addr = cfg.paged_addr if spec.paged and page & (page - 1) == 0 else 0
    return PrefillWork(work_units=work_units.to(device), num_units=len(units),
                       num_q_heads=h.num_q_heads, group=h.group_size, head_dim=h.head_dim,
                       page_size=spec.page_size or 1, paged=spec.paged, config=cfg,
                       use_tma=use_tma, paged_addr=paged_addr, unit_cost=cost)


def prefill_launch_args(batch: HybridBatch, work: PrefillWork, out: torch.Tensor,
                        lse: torch.Tensor | None) -> tuple:
    """The runtime arguments of `prefill_tile` after tile_id, in order (see the module docstring)."""
    k, v = batch.k_cache, batch.v_cache
    assert k.stride() == v.stride(), "K and V caches must share strides"
    assert batch.q_prefill.stride(-1) == 1 and out.stride(-1) == 1 and k.stride(-1) == 1
    assert not work.use_tma or k.is_contiguous(), "TMA needs a dense KV cache"
    if batch.spec.paged:
        stride_page, stride_tok, stride_head = k.stride(0), k.stride(1), k.stride(2)
        block_table, kv_indptr = batch.block_table, batch.kv_lens      # kv_indptr unused when paged
    else:
        stride_page, stride_tok, stride_head = 0, k.stride(0), k.stride(1)
        block_table, kv_indptr = batch.kv_indptr, batch.kv_indptr      # block_table unused
    lse_arg = lse if lse is not None else out                          # unused when HAS_LSE=False
    lse_strides = (lse.stride(0), lse.stride(1)) if lse is not None else (0, 0)
    return (batch.q_prefill, k, v, out, lse_arg,
            batch.q_indptr, batch.kv_lens, kv_indptr, block_table, work.work_units,
            work.num_q_heads,
            batch.q_prefill.stride(0), batch.q_prefill.stride(1), out.stride(0), out.stride(1),
            *lse_strides,
            stride_page, stride_tok, stride_head, block_table.stride(0),
            qk_scale_log2(batch.sm_scale))


def prefill_runner(batch: HybridBatch, work: PrefillWork, out: torch.Tensor,
                   lse: torch.Tensor | None = None):
    """Bind the launch arguments once and return ``launch() -> out`` (an engine's per-layer call):
    the least host work per launch, no allocation, no host synchronisation."""
    args = prefill_launch_args(batch, work, out, lse)
    const = work.constexprs(has_lse=lse is not None)
    if work.autotune:
        kernel, opts = _prefill_kernel_autotuned, {}
    else:
        kernel, opts = _prefill_kernel, dict(num_warps=work.config.num_warps,
                                             num_stages=work.config.num_stages)
    if work.use_tma:
        ensure_tma_allocator()
    grid = (work.num_tiles,)

    def launch() -> torch.Tensor:
        if work.num_units:
            kernel[grid](*args, **const, **opts)
        return out
    return launch


def prefill(batch: HybridBatch, work: PrefillWork, out: torch.Tensor | None = None,
            lse: torch.Tensor | None = None, return_lse: bool = True
            ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch the prefill kernel. Returns (out [tokens, Hq, D] in q's dtype, lse2 [tokens, Hq] fp32 or None).

    `out`/`lse` may be preallocated (e.g. by a backend's prepare); otherwise they are allocated here.
    No host synchronisation: only a launch. For repeated calls `prefill_runner` binds arguments once."""
    if out is None:
        out = torch.empty_like(batch.q_prefill)
    if lse is None and return_lse:
        lse = torch.empty(batch.q_prefill.shape[:2], dtype=torch.float32, device=out.device)
    prefill_runner(batch, work, out, lse)()
    return out, lse


def prefill_attention(batch: HybridBatch, config: PrefillConfig | str | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """One-shot convenience: plan + run. Returns (out, lse2)."""
    return prefill(batch, plan_prefill(batch, config))


# ------------------------------------------------------------------------------------------------
# GPU microbenchmark (the lead runs it on the H100): checks against the fp32 reference, then times.
# ------------------------------------------------------------------------------------------------
def default_bench_shapes() -> list[BatchSpec]:
    """Llama-3-8B (32q/8kv/128) bf16: chunk 1024 over 12K context (the headline point), contiguous and
    paged (16), plus a 4-chunk batch and a short-context chunk."""
    mk = BatchSpec.build
    return [
        mk(32, 8, 128, prefill=[(1024, 12288)]),
        mk(32, 8, 128, prefill=[(1024, 12288)], page_size=16),
        mk(32, 8, 128, prefill=[(1024, 12288)], page_size=64),
        mk(32, 8, 128, prefill=[(2048, 0)]),
        mk(32, 8, 128, prefill=[(512, 4096)] * 4),
        mk(32, 32, 128, prefill=[(1024, 12288)]),
        mk(32, 8, 64, prefill=[(1024, 12288)], dtype="float16"),
    ]


def bench_prefill(shapes: list[BatchSpec] | None = None,
                  configs: tuple[str | PrefillConfig, ...] = ("autotune", "autotune_tma", "h100", "h100_tma",
                                                              "fused", "fused_small", "fused_m64"),
                  device: str = "cuda", check: bool = True) -> list[dict]:
    """Time `prefill()` (median of triton.testing.do_bench) for every shape x config.

    Returns one dict per run: batch, config, use_tma, median_ms, tflops (spec.prefill_flops() / time),
    prefill_err (max rel error of out vs the fp32 reference), lse_err (max abs error of lse2), and
    error (the exception text when a config fails to compile or run; the other configs still run).
    Usage on the GPU:  python -m pod.kernels.prefill   (prints a table)."""
    from pod.batch import make_batch
    from pod.reference import max_rel_error
    rows = []
    for spec in shapes or default_bench_shapes():
        batch = make_batch(spec, device=device, seed=0)
        ref = ref_lse = None
        if check:
            ref, ref_lse = reference_prefill_lse(batch)
        for cfg in configs:
            cfg = resolve_config(cfg)
            work = plan_prefill(batch, cfg)
            row = dict(batch=spec.describe(), config=json_name(cfg), use_tma=work.use_tma)
            try:
                out, lse = prefill(batch, work)      # compiles (and autotunes) outside the timing
                row.update(prefill_err=max_rel_error(out, ref) if check else float("nan"),
                           lse_err=float((lse - ref_lse).abs().max()) if check else float("nan"))
                ms = triton.testing.do_bench(prefill_runner(batch, work, out, lse), return_mode="median")
                row.update(median_ms=ms, tflops=spec.prefill_flops() / (ms * 1e-3) / 1e12, error="")
                if work.autotune:
                    best = _prefill_kernel_autotuned.best_config
                    row["config"] += f"[n{best.kwargs['BLOCK_N']}w{best.num_warps}s{best.num_stages}]"
            except Exception as e:                    # report and go on with the other configs
                row.update(median_ms=float("nan"), tflops=float("nan"), error=repr(e)[:300])
            rows.append(row)
        del batch
    return rows


# Variants `bench_variants` compares by default (names of PREFILL_CONFIGS), and the shapes it times.
VARIANTS = ("autotune", "autotune_pv", "autotune_pf", "autotune_tma",
            "h100", "h100_pv", "h100_pf", "h100_s4", "h100_pv_s4", "h100_pf_s4", "h100_tma", "h100_tma_s4",
            "h100_tma_pf", "h100_tma_pf_s4", "autotune_tma_pf",
            "n128_pv", "n128_pf", "n128_tma")
VARIANT_BASELINES = ("fi_serial", "fa2_serial")   # registry backends timed on the same batches


def variant_shapes(tiny: bool = False) -> list[BatchSpec]:
    """Llama-3-8B (32q/8kv/128) bf16 points of the paged-KV tuning: 1024@12288 contiguous / page 16 /
    page 64, 2048@0 contiguous / page 16, 512@16384 page 16. tiny: the same layouts at interpreter
    size (4q/1kv/64; contexts not multiples of the blocks) for a CPU dry run of the harness."""
    mk = BatchSpec.build
    if tiny:
        return [mk(4, 1, 64, prefill=[(130, 200)]), mk(4, 1, 64, prefill=[(130, 200)], page_size=16),
                mk(4, 1, 64, prefill=[(130, 200)], page_size=64), mk(4, 1, 64, prefill=[(70, 0)], page_size=16),
                mk(4, 1, 64, prefill=[(40, 300)], page_size=16)]
    return [mk(32, 8, 128, prefill=[(1024, 12288)]),
            mk(32, 8, 128, prefill=[(1024, 12288)], page_size=16),
            mk(32, 8, 128, prefill=[(1024, 12288)], page_size=64),
            mk(32, 8, 128, prefill=[(2048, 0)]),
            mk(32, 8, 128, prefill=[(2048, 0)], page_size=16),
            mk(32, 8, 128, prefill=[(512, 16384)], page_size=16)]


def bench_variants(variants: tuple[str, ...] = VARIANTS, shapes: list[BatchSpec] | None = None,
                   baselines: tuple[str, ...] = VARIANT_BASELINES, device: str | None = None,
                   tol: float = 2e-2, echo: bool = True) -> list[dict]:
    """Time each named prefill variant (and registry baselines) on each shape; check every result
    against the fp32 reference. One row per (shape, variant): batch, variant, resolved (best autotune
    config, or the block sizes), use_tma, paged_addr, ok (error within `tol`), prefill_err, lse_err,
    median_ms, tflops, vs_best (median_ms / the shape's fastest correct median), error.

    Robust by construction: a variant that fails to plan, compile or run, or gives a wrong result, is
    reported in its row (ok=False, error) and the others go on. echo: print each row as it finishes
    (partial results survive a crash). On the GPU timings are do_bench medians; under the interpreter
    (TRITON_INTERPRET=1, device cpu, `variant_shapes(tiny=True)`) one wall-clock call, not meaningful,
    and autotuned variants run their first AUTOTUNE_CONFIGS entry (the autotuner needs a GPU)."""
    import time

    from pod.batch import make_batch
    from pod.reference import max_rel_error
    from pod.registry import get_backend
    interp = interpreting()
    device = device or ("cpu" if interp else "cuda")
    shapes = shapes if shapes is not None else variant_shapes(tiny=interp)
    rows: list[dict] = []

    def timed(fn) -> float:
        if interp:
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
        return triton.testing.do_bench(fn, return_mode="median")

    for spec in shapes:
        batch = make_batch(spec, device=device, seed=0)
        ref, ref_lse = reference_prefill_lse(batch)
        shape_rows = []
        for name in (*variants, *baselines):
            row = dict(batch=spec.describe(), variant=name, resolved="", use_tma=False, paged_addr=0,
                       ok=False, prefill_err=float("nan"), lse_err=float("nan"), median_ms=float("nan"),
                       tflops=float("nan"), error="")
            try:
                if name in variants:
                    cfg = resolve_config(name)
                    if interp and cfg.block_n is None:
                        cfg = PrefillConfig(**dict(cfg.to_json(), block_n=AUTOTUNE_CONFIGS[0].kwargs["BLOCK_N"]))
                    work = plan_prefill(batch, cfg)
                    row.update(use_tma=work.use_tma, paged_addr=work.paged_addr,
                               resolved=f"m{cfg.block_m}n{cfg.block_n}w{cfg.num_warps}s{cfg.num_stages}")
                    out = torch.full_like(batch.q_prefill, float("nan"))
                    lse = torch.full(batch.q_prefill.shape[:2], float("nan"), device=batch.device)
                    fn = prefill_runner(batch, work, out, lse)
                    fn()                                    # compiles (and autotunes) outside the timing
                    if work.autotune:
                        best = _prefill_kernel_autotuned.best_config
                        row["resolved"] = (f"m{cfg.block_m}n{best.kwargs['BLOCK_N']}w{best.num_warps}"
                                           f"s{best.num_stages}")
                    row["lse_err"] = float((lse - ref_lse).abs().max())
                else:
                    backend = get_backend(name)
                    why = backend.unavailable_reason(batch)
                    if why is not None:
                        raise RuntimeError(f"unavailable: {why}")
                    run = backend.prepare(batch)
                    fn = run
                    out = run().prefill
                    row["resolved"] = "baseline"
                row["prefill_err"] = max_rel_error(out, ref)
                row["ok"] = bool(row["prefill_err"] <= tol and (name not in variants or row["lse_err"] <= 1e-2))
                ms = timed(fn)
                row.update(median_ms=ms, tflops=spec.prefill_flops() / (ms * 1e-3) / 1e12)
                if not row["ok"]:
                    row["error"] = f"wrong result: prefill_err {row['prefill_err']:.3g} lse_err {row['lse_err']:.3g}"
            except Exception as e:                      # report and go on with the other variants
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            if echo:
                print(f"{row['batch']:<40} {name:<14} {row['resolved']:<14} ok={row['ok']!s:<5} "
                      f"{row['median_ms']:8.4f} ms {row['tflops']:7.1f} TFLOP/s  {row['error']}", flush=True)
            shape_rows.append(row)
        best = min((r["median_ms"] for r in shape_rows if r["ok"]), default=float("nan"))
        for r in shape_rows:
            r["vs_best"] = r["median_ms"] / best
        rows += shape_rows
        del batch
    return rows


def json_name(cfg: PrefillConfig) -> str:
    for name, c in PREFILL_CONFIGS.items():
        if c == cfg:
            return name
    return f"m{cfg.block_m}n{cfg.block_n}w{cfg.num_warps}s{cfg.num_stages}"


def reference_prefill_lse(batch: HybridBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 reference output [tokens, Hq, D] and base-2 LSE [tokens, Hq] of the prefill part
    (pod.reference's computation; the kernel's LSE is base 2)."""
    from pod.reference import reference_prefill
    lse = torch.empty(batch.q_prefill.shape[:2], dtype=torch.float32, device=batch.device)
    out = reference_prefill(batch, lse=lse)
    return out, lse / math.log(2)


def sm90_report(config: PrefillConfig | str, page_size: int | None = None, head_dim: int = 128,
                dtype: str = "bfloat16") -> dict:
    """Compile the standalone prefill kernel for sm_90 on this (GPU-less) machine and report shared
    memory, registers, spills and instruction counts (see common.sm90_compile_report). Llama-3-8B heads.
    Must run without TRITON_INTERPRET (the interpreter replaces jit functions)."""
    from pod.batch import make_batch
    from pod.kernels.common import sm90_compile_report
    cfg = resolve_config(config)
    if cfg.block_n is None:
        raise ValueError("sm90_report needs a fixed block_n (not an autotuned config)")
    batch = make_batch(BatchSpec.build(32, 8, head_dim, prefill=[(256, 512)], dtype=dtype,
                                       page_size=page_size))
    work = plan_prefill(batch, cfg)
    out = torch.empty_like(batch.q_prefill)
    lse = torch.empty(batch.q_prefill.shape[:2], dtype=torch.float32)
    report = sm90_compile_report(_prefill_kernel, *prefill_launch_args(batch, work, out, lse),
                                 **work.constexprs(), num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return dict(config=json_name(cfg), page_size=page_size, head_dim=head_dim, use_tma=work.use_tma,
                paged_addr=work.paged_addr, **report)


if __name__ == "__main__":
    import argparse
    import json
    parser = argparse.ArgumentParser(description="prefill kernel: GPU benchmark, or sm_90 compile report")
    parser.add_argument("--sm90", nargs="*", metavar="CONFIG",
                        help="compile these named configs for sm_90 (no GPU needed) and print JSON lines")
    parser.add_argument("--page-size", type=int, default=None)
    parser.add_argument("--variants", nargs="*", metavar="CONFIG",
                        help="time these named configs (default: VARIANTS) and the baselines on the "
                             "paged-KV tuning shapes, checked against the reference; prints a table")
    parser.add_argument("--baselines", nargs="*", default=None, metavar="BACKEND",
                        help=f"registry backends timed with --variants (default: {' '.join(VARIANT_BASELINES)})")
    parser.add_argument("--tiny", action="store_true",
                        help="with --variants: interpreter-sized shapes on the CPU (run with TRITON_INTERPRET=1)")
    parser.add_argument("--csv", default=None, help="with --variants: also write the rows to this CSV")
    parser.add_argument("--shapes", nargs="*", type=int, default=None, metavar="I",
                        help="with --variants: only these indices of variant_shapes() (default: all)")
    cli = parser.parse_args()
    if cli.variants is not None:
        import pandas as pd
        if cli.tiny and not interpreting():
            parser.error("--tiny needs TRITON_INTERPRET=1 in the environment")
        pd.set_option("display.width", 250)
        pd.set_option("display.max_rows", 500)
        shapes = variant_shapes(cli.tiny or interpreting())
        shapes = [shapes[i] for i in cli.shapes] if cli.shapes else shapes
        df = pd.DataFrame(bench_variants(tuple(cli.variants) or VARIANTS, shapes,
                                         VARIANT_BASELINES if cli.baselines is None else tuple(cli.baselines)))
        if cli.csv:
            df.to_csv(cli.csv, index=False)
        cols = ["batch", "variant", "resolved", "use_tma", "paged_addr", "ok", "median_ms", "tflops",
                "vs_best", "prefill_err", "error"]
        df["error"] = df["error"].str.slice(0, 100)
        print(df[cols].to_string(index=False, float_format=lambda x: f"{x:.4g}"))
    elif cli.sm90 is not None:
        for name in cli.sm90 or ["h100", "h100_tma", "fused", "fused_small", "fused_m64"]:
            print(json.dumps(sm90_report(name, page_size=cli.page_size)))
    else:
        import pandas as pd
        pd.set_option("display.width", 200)
        print(pd.DataFrame(bench_prefill()).to_string(index=False))
