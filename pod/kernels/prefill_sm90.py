"""Hopper (sm_90a) chunked-prefill attention in Gluon: a TMA producer warp feeding two wgmma consumer
warpgroups through a ring of shared-memory stages.

Math: as pod/kernels/prefill.py. Chunk c's chunk_len queries are the last positions of a sequence of
kv_len = context_len + chunk_len keys; query row i (position context_len + i) sees keys 0..context_len+i;
q head h reads KV head h // GROUP. exp2 domain: s2 = (q . k) * qk_scale, qk_scale = sm_scale * log2(e);
out = sum_j 2^(s2_j - lse2) v_j and lse2 = log2(sum_j 2^(s2_j)) (fp32, base 2: pod/kernels/common.py).

Memory layout (NHD; d is the unit-stride dimension everywhere):
    Q, O : [total_chunk_tokens, Hq, D], viewed as 2-D [tokens, Hq*D]; a tile is the [BLOCK_M, D] box at
           (row q_indptr[c] + m0, column h*D)
    LSE  : [total_chunk_tokens, Hq] fp32
    K, V : contiguous [total_kv_tokens, Hkv, D] or paged [num_pages, PAGE_SIZE, Hkv, D], both viewed as
           2-D [rows, Hkv*D]; a KV tile is BLOCK_N rows of the box column kv_head*D.

One CTA computes one tile: BLOCK_M query rows of one chunk for one q head (`work_units` of
pod/kernels/prefill.py, heaviest first; tile t = unit t // Hq, head t % Hq, so the GROUP q heads of a
KV head are neighbours and share its K/V through L2).

Partitions (gl.warp_specialize):
  * worker, 1 warp: for KV tile t it waits until stage t % STAGES is free, then issues TMA copies of
    COPY_ROWS = min(PAGE_SIZE, BLOCK_N) rows each (a 16-token page lands in a 16-row slice of the stage),
    K on ready_k, V on ready_v, so S = Q K^T can start before V has landed.
  * consumers, 8 warps (two warpgroups, 64 query rows each; one 8-warp partition or two 4-warp ones): S_t = Q K_t^T (wgmma, both operands
    in shared memory), causal/length mask only on the tiles that need it, online softmax in registers,
    O += P_t V_t (wgmma, P from registers). Software pipeline inside each warpgroup: S_t and
    O += P_{t-1} V_{t-1} are issued back to back and the softmax of S_t runs while the tensor cores still
    work on P_{t-1} V_{t-1}; stage t-1 is released after that product has completed.

Boundaries without masks on the data path. The producer reads the last page of a sequence (paged) or
the whole sequence (contiguous) through a second descriptor whose row count ends at the sequence's last
valid row, so TMA fills rows past kv_len with zeros: a stale or NaN slot can never reach P @ V (0 * NaN
would). Page slots past the last page re-read the last page (their keys are masked). Q rows past the
chunk are computed and dropped: O leaves through a descriptor that ends at the chunk's last row (TMA
clips the rest) and LSE through a masked store.

Resources (sm_90a compile, `compile_report`; the CPU tests assert them): 12 warps (8 consumer warps + the
1-warp producer rounded to a warpgroup), producer at 40 registers, consumers at 232-240 (`setmaxnreg`), no
spills; shared memory Q (BLOCK_M*D) + STAGES * 2 * (BLOCK_N*D) elements + barriers: 225 KB for the
default (D=128, BLOCK 128x128, 3 stages), so one CTA fills an SM.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma,
                                                              warpgroup_mma, warpgroup_mma_wait)

from pod.batch import BatchSpec, HybridBatch, make_batch
from pod.env import unpack_batch_or_spec
from pod.kernels.common import LOG2E, sm90_compile_report
from pod.kernels.configs import SM90_CONFIGS, SM90_CONFIGS_D64, SM90_DEFAULT, Sm90PrefillConfig


# ------------------------------------------------------------------------------------------------
# The kernel
# ------------------------------------------------------------------------------------------------
@gluon.jit
def _tail_rows(block_table, seq, kv_start, kv_len, stride_bt, PAGE_SIZE: gl.constexpr, PAGED: gl.constexpr):
    """Cache rows up to a sequence's last valid row (TMA zero-fills beyond) and its last page index."""
    if PAGED:
        last_idx = (kv_len - 1) // PAGE_SIZE
        last_page = gl.load(block_table + seq.to(gl.int64) * stride_bt + last_idx)
        return last_page * PAGE_SIZE + (kv_len - last_idx * PAGE_SIZE), last_idx
    else:
        return kv_start + kv_len, kv_len * 0


@gluon.jit
def _issue_kv_tile(k_full, v_full, k_tail, v_tail, block_table, seq, kv_start, t, last_idx, stride_bt,
                   k_dst, v_dst, bar_k, bar_v, kv_col,
                   BLOCK_N: gl.constexpr, COPY_ROWS: gl.constexpr, PAGE_SIZE: gl.constexpr, PAGED: gl.constexpr):
    """TMA copies of KV tile t (keys t*BLOCK_N ...) of one sequence into one stage: a copy a page."""
    if PAGED:
        bt_row = block_table + seq.to(gl.int64) * stride_bt
        for c in gl.static_range(BLOCK_N // COPY_ROWS):
            tok = t * BLOCK_N + c * COPY_ROWS
            idx = gl.minimum(tok // PAGE_SIZE, last_idx)
            row = gl.load(bt_row + idx) * PAGE_SIZE + tok % PAGE_SIZE
            tma.async_copy_global_to_shared(k_full, [row, kv_col], bar_k, k_dst.slice(c * COPY_ROWS, COPY_ROWS),
                                            pred=idx != last_idx)
            tma.async_copy_global_to_shared(k_tail, [row, kv_col], bar_k, k_dst.slice(c * COPY_ROWS, COPY_ROWS),
                                            pred=idx == last_idx)
            tma.async_copy_global_to_shared(v_full, [row, kv_col], bar_v, v_dst.slice(c * COPY_ROWS, COPY_ROWS),
                                            pred=idx != last_idx)
            tma.async_copy_global_to_shared(v_tail, [row, kv_col], bar_v, v_dst.slice(c * COPY_ROWS, COPY_ROWS),
                                            pred=idx == last_idx)
    else:
        row = kv_start + t * BLOCK_N
        tma.async_copy_global_to_shared(k_tail, [row, kv_col], bar_k, k_dst)
        tma.async_copy_global_to_shared(v_tail, [row, kv_col], bar_v, v_dst)


@gluon.jit
def _kv_producer(K, V, block_table, k_smem, v_smem, ready_k, ready_v, empty,
                 seq, kv_start, kv_len, n_tiles, kv_col, total_kv_rows, stride_bt,
                 HEAD_DIM: gl.constexpr, ROW_STRIDE: gl.constexpr, BLOCK_N: gl.constexpr,
                 COPY_ROWS: gl.constexpr, PAGE_SIZE: gl.constexpr, PAGED: gl.constexpr,
                 STAGES: gl.constexpr):
    dtype: gl.constexpr = K.dtype.element_ty
    lay: gl.constexpr = gl.NVMMASharedLayout.get_default_for([COPY_ROWS, HEAD_DIM], dtype)
    tile_bytes: gl.constexpr = BLOCK_N * HEAD_DIM * dtype.primitive_bitwidth // 8
    # rows of the cache up to the sequence's last valid slot; TMA zero-fills beyond it
    tail_rows, last_idx = _tail_rows(block_table, seq, kv_start, kv_len, stride_bt, PAGE_SIZE, PAGED)
    if PAGED:
        k_full = tma.make_tensor_descriptor(K, [total_kv_rows, ROW_STRIDE], [ROW_STRIDE, 1],
                                            [COPY_ROWS, HEAD_DIM], lay)
        v_full = tma.make_tensor_descriptor(V, [total_kv_rows, ROW_STRIDE], [ROW_STRIDE, 1],
                                            [COPY_ROWS, HEAD_DIM], lay)
    k_tail = tma.make_tensor_descriptor(K, [tail_rows, ROW_STRIDE], [ROW_STRIDE, 1], [COPY_ROWS, HEAD_DIM], lay)
    v_tail = tma.make_tensor_descriptor(V, [tail_rows, ROW_STRIDE], [ROW_STRIDE, 1], [COPY_ROWS, HEAD_DIM], lay)
    if not PAGED:
        k_full = k_tail                                  # contiguous: every copy goes through the tail pair
        v_full = v_tail

    for t in range(n_tiles):
        s = t % STAGES
        mbarrier.wait(empty.index(s), ((t // STAGES) & 1) ^ 1)      # fresh barriers pass at phase 1
        mbarrier.expect(ready_k.index(s), tile_bytes)
        mbarrier.expect(ready_v.index(s), tile_bytes)
        _issue_kv_tile(k_full, v_full, k_tail, v_tail, block_table, seq, kv_start, t, last_idx, stride_bt,
                       k_smem.index(s), v_smem.index(s), ready_k.index(s), ready_v.index(s), kv_col,
                       BLOCK_N, COPY_ROWS, PAGE_SIZE, PAGED)


@gluon.jit
def _prefill_tile_info(tile, work_units, q_indptr, kv_lens, kv_indptr, num_q_heads,
                       BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, PAGED: gl.constexpr):
    """Tile = (work unit, q head): the chunk, head, first row m0, its query rows and KV range, the
    position of its first row and its number of KV tiles (keys any of its rows sees)."""
    unit = tile // num_q_heads
    head = tile % num_q_heads
    chunk = gl.load(work_units + 2 * unit)
    m0 = gl.load(work_units + 2 * unit + 1) * BLOCK_M
    q_start = gl.load(q_indptr + chunk)
    chunk_len = gl.load(q_indptr + chunk + 1) - q_start
    kv_len = gl.load(kv_lens + chunk)
    if PAGED:
        kv_start = kv_len * 0
    else:
        kv_start = gl.load(kv_indptr + chunk)
    q_pos0 = kv_len - chunk_len + m0
    n_tiles = (gl.minimum(kv_len, q_pos0 + BLOCK_M) + BLOCK_N - 1) // BLOCK_N
    return chunk, head, m0, q_start, chunk_len, kv_len, kv_start, q_pos0, n_tiles


@gluon.jit
def _causal_mask(s, t, q_pos, kv_len, BLOCK_N: gl.constexpr, col_layout: gl.constexpr):
    """-inf where key t*BLOCK_N + j is after the row's position or past kv_len."""
    k_pos = t * BLOCK_N + gl.arange(0, BLOCK_N, layout=col_layout)
    visible = (gl.expand_dims(k_pos, 0) <= gl.expand_dims(q_pos, 1)) & gl.expand_dims(k_pos < kv_len, 0)
    return gl.where(visible, s, -float("inf"))


@gluon.jit
def _attend_rows(q_smem, k_smem, v_smem, ready_k, ready_v, empty, it, n_tiles, n_full, q_pos0, kv_len, qk_scale,
                 ROWS: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                 WARPS: gl.constexpr, LAST_PV: gl.constexpr = True):
    """ROWS query rows (q_smem, first row at position q_pos0; WARPS / 4 warpgroups of 64 rows) against the
    n_tiles KV tiles that occupy ring slots it, it+1, ... (stage = slot % STAGES). Releases each stage
    after its P V. Returns the un-normalised output, the row sums, the row maxima (exp2 domain) and the last
    tile's P (MMA operand). LAST_PV=False: the last tile's P V and release are the caller's (it may fix that
    stage's V first)."""
    dtype: gl.constexpr = q_smem.dtype
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
    col_layout: gl.constexpr = gl.SliceLayout(0, s_layout)
    q_pos = q_pos0 + gl.arange(0, ROWS, layout=row_layout)
    zero_s = gl.zeros([ROWS, BLOCK_N], gl.float32, s_layout)

    # Tile 0: every row sees key 0, so m_i is finite from here on (no -inf - -inf).
    mbarrier.wait(ready_k.index(it % STAGES), (it // STAGES) & 1)
    s = warpgroup_mma(q_smem, k_smem.index(it % STAGES).permute((1, 0)), zero_s, use_acc=False)
    if n_full == 0:
        s = _causal_mask(s, 0, q_pos, kv_len, BLOCK_N, col_layout)
    m_i = gl.max(s, 1) * qk_scale
    p = gl.exp2(s * qk_scale - gl.expand_dims(m_i, 1))
    l_i = gl.sum(p, 1)
    # Only P in the MMA operand layout (half the registers of fp32 P) crosses an iteration.
    pb = gl.convert_layout(p.to(dtype), p_layout)
    acc = gl.zeros([ROWS, HEAD_DIM], gl.float32, o_layout)

    for t in range(1, n_tiles):
        st = (it + t) % STAGES
        sp = (it + t - 1) % STAGES
        mbarrier.wait(ready_k.index(st), ((it + t) // STAGES) & 1)
        s_tok = warpgroup_mma(q_smem, k_smem.index(st).permute((1, 0)), zero_s, use_acc=False, is_async=True)
        mbarrier.wait(ready_v.index(sp), ((it + t - 1) // STAGES) & 1)
        o_tok = warpgroup_mma(pb, v_smem.index(sp), acc, is_async=True)
        # wgmma groups retire in order: one outstanding means S_t is done, P_{t-1} V_{t-1} may still run.
        s = warpgroup_mma_wait(num_outstanding=1, deps=(s_tok, ))
        if t >= n_full:
            s = _causal_mask(s, t, q_pos, kv_len, BLOCK_N, col_layout)
        m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
        p = gl.exp2(s * qk_scale - gl.expand_dims(m_new, 1))
        alpha = gl.exp2(m_i - m_new)
        l_i = l_i * alpha + gl.sum(p, 1)
        pb_next = gl.convert_layout(p.to(dtype), p_layout)
        acc, pb = warpgroup_mma_wait(num_outstanding=0, deps=(o_tok, pb))
        mbarrier.arrive(empty.index(sp), count=1)
        acc = acc * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, o_layout)), 1)
        m_i = m_new
        pb = pb_next

    if LAST_PV:
        sl = (it + n_tiles - 1) % STAGES
        mbarrier.wait(ready_v.index(sl), ((it + n_tiles - 1) // STAGES) & 1)
        acc = warpgroup_mma(pb, v_smem.index(sl), acc)
        mbarrier.arrive(empty.index(sl), count=1)
    return acc, l_i, m_i, pb


@gluon.jit
def _softmax_consumer(q_smem, k_smem, v_smem, ready_k, ready_v, empty, O, LSE,
                      n_tiles, n_full, q_pos0, kv_len, qk_scale, o_row0, o_rows_end, o_col, lse_row0,
                      lse_rows, stride_lse_tok, head,
                      ROWS: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                      WARPS: gl.constexpr, Q_STRIDE: gl.constexpr, HAS_LSE: gl.constexpr):
    """ROWS query rows (WARPS / 4 warpgroups of 64) against every KV tile; writes their O and LSE.

    q_smem: this partition's [ROWS, D] slice of Q; its first row sits at position q_pos0."""
    dtype: gl.constexpr = q_smem.dtype
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
    acc, l_i, m_i, _ = _attend_rows(q_smem, k_smem, v_smem, ready_k, ready_v, empty, 0, n_tiles, n_full, q_pos0,
                                 kv_len, qk_scale, ROWS, HEAD_DIM, BLOCK_N, STAGES, WARPS)

    # Epilogue: O = acc / l through this partition's Q slice (its wgmmas have all completed) and a
    # descriptor that ends at the chunk's last row (TMA clips rows of the next chunk); LSE masked.
    acc = acc / gl.expand_dims(gl.convert_layout(l_i, gl.SliceLayout(1, o_layout)), 1)
    if HAS_LSE:
        lse_layout: gl.constexpr = gl.BlockedLayout([1], [32], [WARPS], [0])
        rows = gl.arange(0, ROWS, layout=lse_layout)
        lse = gl.convert_layout(m_i + gl.log2(l_i), lse_layout)
        gl.store(LSE + (lse_row0 + rows).to(gl.int64) * stride_lse_tok + head, lse, mask=rows < lse_rows)
    q_smem.store(acc.to(dtype))
    fence_async_shared()
    o_desc = tma.make_tensor_descriptor(O, [o_rows_end, Q_STRIDE], [Q_STRIDE, 1], [ROWS, HEAD_DIM],
                                        q_smem.type.layout)
    tma.async_copy_shared_to_global(o_desc, [o_row0, o_col], q_smem)
    tma.store_wait(0)


# Sizes not specialised on (== 1, % 16): they change with every batch of a serving engine (pod_sm90 too).
@gluon.jit(do_not_specialize=["total_q_rows", "total_kv_rows", "stride_bt"])
def prefill_sm90_kernel(Q, K, V, O, LSE,
                        q_indptr, kv_lens, kv_indptr, block_table, work_units,
                        num_q_heads, total_q_rows, total_kv_rows, stride_bt, stride_lse_tok, qk_scale,
                        GROUP: gl.constexpr, HEAD_DIM: gl.constexpr, NUM_KV_HEADS: gl.constexpr,
                        BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, PAGE_SIZE: gl.constexpr,
                        PAGED: gl.constexpr, HAS_LSE: gl.constexpr, STAGES: gl.constexpr,
                        CONSUMERS: gl.constexpr, PRODUCER_REGS: gl.constexpr, CONSUMER_REGS: gl.constexpr):
    """One tile = BLOCK_M query rows of one chunk for one q head. CONSUMERS = 1: one 8-warp consumer
    partition owns all rows; CONSUMERS = 2: two 4-warp partitions own BLOCK_M/2 rows each and run
    unsynchronised, so one's softmax overlaps the other's wgmma (launch with num_warps = 8 // CONSUMERS)."""
    dtype: gl.constexpr = Q.dtype.element_ty
    Q_STRIDE: gl.constexpr = GROUP * NUM_KV_HEADS * HEAD_DIM
    KV_STRIDE: gl.constexpr = NUM_KV_HEADS * HEAD_DIM
    COPY_ROWS: gl.constexpr = PAGE_SIZE if PAGED and PAGE_SIZE < BLOCK_N else BLOCK_N
    ROWS: gl.constexpr = BLOCK_M // CONSUMERS
    WARPS: gl.constexpr = 8 // CONSUMERS

    chunk, head, m0, q_start, chunk_len, kv_len, kv_start, q_pos0, n_tiles = _prefill_tile_info(
        gl.program_id(0), work_units, q_indptr, kv_lens, kv_indptr, num_q_heads, BLOCK_M, BLOCK_N, PAGED)

    q_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([ROWS, HEAD_DIM], dtype)
    kv_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, HEAD_DIM], dtype)
    q_smem = gl.allocate_shared_memory(dtype, [CONSUMERS, ROWS, HEAD_DIM], q_layout)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], kv_layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], kv_layout)
    ready_k = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    ready_v = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready_k.index(i), count=1)
        mbarrier.init(ready_v.index(i), count=1)
        mbarrier.init(empty.index(i), count=CONSUMERS)   # each consumer partition releases a stage
    mbarrier.init(q_bar, count=1)

    q_desc = tma.make_tensor_descriptor(Q, [total_q_rows, Q_STRIDE], [Q_STRIDE, 1], [ROWS, HEAD_DIM], q_layout)
    mbarrier.expect(q_bar, BLOCK_M * HEAD_DIM * dtype.primitive_bitwidth // 8)
    for i in gl.static_range(CONSUMERS):
        tma.async_copy_global_to_shared(q_desc, [q_start + m0 + i * ROWS, head * HEAD_DIM], q_bar, q_smem.index(i))
    mbarrier.wait(q_bar, 0)

    o_end = q_start + chunk_len
    if CONSUMERS == 1:
        gl.warp_specialize([
            (_softmax_consumer, (q_smem.index(0), k_smem, v_smem, ready_k, ready_v, empty, O, LSE, n_tiles,
                                 gl.minimum(q_pos0 + 1, kv_len) // BLOCK_N, q_pos0, kv_len, qk_scale,
                                 q_start + m0, o_end, head * HEAD_DIM, q_start + m0, chunk_len - m0,
                                 stride_lse_tok, head, ROWS, HEAD_DIM, BLOCK_N, STAGES, WARPS, Q_STRIDE, HAS_LSE)),
            (_kv_producer, (K, V, block_table, k_smem, v_smem, ready_k, ready_v, empty, chunk, kv_start,
                               kv_len, n_tiles, (head // GROUP) * HEAD_DIM, total_kv_rows, stride_bt, HEAD_DIM,
                               KV_STRIDE, BLOCK_N, COPY_ROWS, PAGE_SIZE, PAGED, STAGES)),
        ], [1], [PRODUCER_REGS])
    else:
        # n_full (tiles a partition sees whole, no mask) is per partition: its first row decides.
        gl.warp_specialize([
            (_softmax_consumer, (q_smem.index(0), k_smem, v_smem, ready_k, ready_v, empty, O, LSE, n_tiles,
                                 gl.minimum(q_pos0 + 1, kv_len) // BLOCK_N, q_pos0, kv_len, qk_scale,
                                 q_start + m0, o_end, head * HEAD_DIM, q_start + m0, chunk_len - m0,
                                 stride_lse_tok, head, ROWS, HEAD_DIM, BLOCK_N, STAGES, WARPS, Q_STRIDE, HAS_LSE)),
            (_softmax_consumer, (q_smem.index(1), k_smem, v_smem, ready_k, ready_v, empty, O, LSE, n_tiles,
                                 gl.minimum(q_pos0 + ROWS + 1, kv_len) // BLOCK_N, q_pos0 + ROWS, kv_len,
                                 qk_scale, q_start + m0 + ROWS, o_end, head * HEAD_DIM, q_start + m0 + ROWS,
                                 chunk_len - m0 - ROWS, stride_lse_tok, head, ROWS, HEAD_DIM, BLOCK_N, STAGES,
                                 WARPS, Q_STRIDE, HAS_LSE)),
            (_kv_producer, (K, V, block_table, k_smem, v_smem, ready_k, ready_v, empty, chunk, kv_start,
                               kv_len, n_tiles, (head // GROUP) * HEAD_DIM, total_kv_rows, stride_bt, HEAD_DIM,
                               KV_STRIDE, BLOCK_N, COPY_ROWS, PAGE_SIZE, PAGED, STAGES)),
        ], [WARPS, 1], [CONSUMER_REGS, PRODUCER_REGS])


# ------------------------------------------------------------------------------------------------
# Host side: configs, plan, launch
# ------------------------------------------------------------------------------------------------
SM90_SHARED_LIMIT = 227 * 1024


def sm90_configs(head_dim: int) -> dict[str, Sm90PrefillConfig]:
    """The shipped configs for this head_dim (every one is checked on the GPU before it is timed)."""
    return SM90_CONFIGS_D64 if head_dim == 64 else SM90_CONFIGS


def default_sm90_config(head_dim: int) -> Sm90PrefillConfig:
    return sm90_configs(head_dim)[SM90_DEFAULT]


def sm90_supports(spec: BatchSpec, config: Sm90PrefillConfig | None = None) -> str | None:
    """None when the Hopper tile handles this batch's layout, else the reason (the caller falls back to
    the portable tile)."""
    cfg = config or default_sm90_config(spec.heads.head_dim)
    if spec.heads.head_dim not in (64, 128):
        return f"head_dim {spec.heads.head_dim} (64 or 128)"
    if spec.paged:
        p, n = spec.page_size, cfg.block_n
        if p < 8 or not (p % n == 0 or n % p == 0):
            return f"page_size {p} (needs >= 8 and a divisor or multiple of BLOCK_N {n})"
    if cfg.shared_bytes(spec.heads.head_dim) + 1024 > SM90_SHARED_LIMIT:
        return f"{cfg} needs {cfg.shared_bytes(spec.heads.head_dim)} B of shared memory"
    return None


@dataclass
class Sm90PrefillWork:
    """The plan of one batch shape for the Hopper tile: the work list and the launch constants.
    A KernelWork (pod/kernels/contract.py)."""
    work_units: torch.Tensor        # [num_units, 2] int32 (chunk, q_block), heaviest first
    num_units: int
    num_q_heads: int
    group: int
    num_kv_heads: int
    head_dim: int
    page_size: int | None           # None: contiguous KV
    paged: bool
    config: Sm90PrefillConfig

    @property
    def num_tiles(self) -> int:
        return self.num_units * self.num_q_heads

    def describe(self) -> dict:
        return self.config.to_json()

    def runner(self, batch: HybridBatch, out: torch.Tensor, lse: torch.Tensor | None = None):
        """``launch() -> out`` with its arguments bound once (`prefill_sm90_runner`)."""
        return prefill_sm90_runner(batch, self, out, lse)


def plan_prefill_sm90(batch_or_spec: HybridBatch | BatchSpec, config: Sm90PrefillConfig | str | None = None,
                      device: torch.device | str | None = None) -> Sm90PrefillWork:
    """Plan the prefill part of a batch for the Hopper tile (shape only: once per batch shape)."""
    from pod.kernels.prefill import plan_units
    spec, device = unpack_batch_or_spec(batch_or_spec, device)
    h = spec.heads
    if isinstance(config, str):
        table = sm90_configs(h.head_dim)
        if config not in table:
            raise ValueError(f"sm90 prefill config {config!r} unknown for head_dim {h.head_dim}; "
                             f"named configs: {sorted(table)}")
        config = table[config]
    cfg = config or default_sm90_config(h.head_dim)
    why = sm90_supports(spec, cfg)
    if why is not None:
        raise ValueError(f"the Hopper prefill tile does not handle this batch: {why}")
    units, _ = plan_units(spec, cfg.block_m)
    work_units = torch.tensor(units if units else [[0, 0]], dtype=torch.int32).reshape(-1, 2)
    return Sm90PrefillWork(work_units=work_units.to(device), num_units=len(units), num_q_heads=h.num_q_heads,
                           group=h.group_size, num_kv_heads=h.num_kv_heads, head_dim=h.head_dim,
                           page_size=spec.page_size, paged=spec.paged, config=cfg)


_SCRATCH: dict = {}


def ensure_scratch_allocator() -> None:
    """Device-side TMA descriptors live in a per-launch global scratch buffer that Triton asks for."""
    if not _SCRATCH:
        def alloc(size: int, alignment: int, stream):
            return torch.empty(size, dtype=torch.int8, device="cuda")
        triton.set_allocator(alloc)
        _SCRATCH["set"] = True


def launch_args(batch: HybridBatch, work: Sm90PrefillWork, out: torch.Tensor, lse: torch.Tensor | None):
    """(positional runtime args, constexpr kwargs) of `prefill_sm90_kernel`."""
    q, k, v = batch.q_prefill, batch.k_cache, batch.v_cache
    hkv, d = work.num_kv_heads, work.head_dim
    for name, t in (("q_prefill", q), ("out", out), ("k_cache", k), ("v_cache", v)):
        if not t.is_contiguous():
            raise ValueError(f"the Hopper prefill tile needs a dense {name} (got strides {t.stride()})")
    total_kv_rows = k.shape[0] * k.shape[1] if work.paged else k.shape[0]
    bt = batch.block_table if work.paged else batch.kv_lens             # block_table unused when contiguous
    kv_indptr = batch.kv_indptr if not work.paged else batch.kv_lens    # kv_indptr unused when paged
    lse_arg = lse if lse is not None else out
    args = (q, k, v, out, lse_arg, batch.q_indptr, batch.kv_lens, kv_indptr, bt, work.work_units,
            work.num_q_heads, q.shape[0], total_kv_rows, bt.stride(0) if work.paged else 0,
            lse.stride(0) if lse is not None else 0, float(batch.sm_scale) * LOG2E)
    cfg = work.config
    const = dict(GROUP=work.group, HEAD_DIM=d, NUM_KV_HEADS=hkv, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                 PAGE_SIZE=work.page_size if work.paged else cfg.block_n, PAGED=work.paged,
                 HAS_LSE=lse is not None, STAGES=cfg.stages, CONSUMERS=cfg.consumers,
                 PRODUCER_REGS=cfg.producer_regs, CONSUMER_REGS=cfg.consumer_regs)
    return args, const


def prefill_sm90_runner(batch: HybridBatch, work: Sm90PrefillWork, out: torch.Tensor,
                        lse: torch.Tensor | None = None):
    """Bind the launch once and return ``launch() -> out``: no allocation and no sync per call."""
    args, const = launch_args(batch, work, out, lse)
    ensure_scratch_allocator()
    grid = (work.num_tiles,)
    num_warps = work.config.num_warps

    def launch() -> torch.Tensor:
        if work.num_units:
            prefill_sm90_kernel[grid](*args, **const, num_warps=num_warps)
        return out
    return launch


# ------------------------------------------------------------------------------------------------
# Compile report (no GPU needed)
# ------------------------------------------------------------------------------------------------
def compile_reports_subprocess(cases: list[dict]) -> list[dict]:
    """`compile_report(**case)` for each case, in a child Python with the interpreter off: under
    TRITON_INTERPRET=1 (the CPU tests) Gluon's own helpers are interpreter functions and cannot compile."""
    import json
    import os
    import subprocess
    import sys
    env = dict(os.environ, TRITON_INTERPRET="0")
    code = ("import json, sys\n"
            "from pod.kernels.prefill_sm90 import Sm90PrefillConfig, compile_report\n"
            "cases = json.loads(sys.stdin.read())\n"
            "print(json.dumps([compile_report(Sm90PrefillConfig(**c.pop('config')), **c) for c in cases]))\n")
    payload = json.dumps([dict(c, config=c["config"].__dict__) for c in cases])
    res = subprocess.run([sys.executable, "-c", code], input=payload, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"sm_90a compile failed:\n{res.stderr[-4000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def compile_report(config: Sm90PrefillConfig, *, head_dim: int = 128, dtype: str = "bfloat16",
                   paged: bool = True, page_size: int = 16, num_q_heads: int = 32, num_kv_heads: int = 8,
                   has_lse: bool = True) -> dict:
    """Compile the tile for sm_90a on the host, with the arguments a real launch on a small batch of this
    layout gets, and report what makes it fast: shared memory, registers, spills (ptxas), wgmma / TMA /
    setmaxnreg counts in the PTX (pod.kernels.common.sm90_compile_report)."""
    spec = BatchSpec.build(num_q_heads, num_kv_heads, head_dim, prefill=[(300, 700), (77, 0)], dtype=dtype,
                           page_size=page_size if paged else None)
    batch = make_batch(spec, "cpu", seed=0)
    out = torch.empty_like(batch.q_prefill)
    lse = torch.empty(batch.q_prefill.shape[:2]) if has_lse else None
    args, const = launch_args(batch, plan_prefill_sm90(batch, config), out, lse)
    rep = sm90_compile_report(prefill_sm90_kernel, *args, num_warps=config.num_warps, **const)
    report = dict(config.to_json(), head_dim=head_dim, dtype=dtype, paged=paged,
                  page_size=page_size if paged else None, ptxas_ok="ptxas_error" not in rep)
    report.update({k: rep[k] for k in ("shared_bytes", "num_warps_total", "wgmma", "tma_loads", "setmaxnreg",
                                       "registers", "spill_bytes")})
    if "ptxas_error" in rep:
        report["ptxas_error"] = rep["ptxas_error"]
    return report
