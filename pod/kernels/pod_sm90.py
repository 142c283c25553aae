"""POD for Hopper, first version (NOT YET RUN ON A GPU: compile-checked for sm_90a only; no backend or
dispatcher uses it until `python -m experiments.gpu_checks pod_sm90` passes on an H200).

Design (docs/hopper_prefill.md, "What the fused POD kernel needs"): the Hopper prefill tile fills an SM by
itself, so prefill and decode cannot be two co-resident CTAs as in the paper's A100 recipe. Instead every
CTA runs both roles at once in different partitions (`gl.warp_specialize`), one CTA per SM, persistent:

  * two prefill consumers (4 warps each, 64 query rows, wgmma) and a prefill producer (1 warp, TMA)
    walk the prefill tiles cta, cta + grid, cta + 2*grid, ... (heaviest first, as planned by
    pod.kernels.prefill.plan_units): the Hopper tile's partitions, looped;
  * a decode partition (4 warps) walks the decode items cta, cta + grid, ... (one item = one request and
    one KV head, the GROUP query heads of that KV head as the rows of a 16-row mma_v2 tile, no KV split),
    streaming its K/V pages by TMA through its own ring while the tensor cores run the prefill.

Static round-robin assignment: no atomics, bitwise-repeatable outputs. The SM-aware part of POD is that
every SM runs both roles for as long as both have work; the share of each role per SM is the
prefill:decode work ratio of the batch (the paper's proportional policy, by construction).

Tail handling. Prefill, as in the Hopper tile: the last page of a sequence (or a contiguous sequence) is
read through a descriptor that ends at its last valid row, so TMA zero-fills past kv_len; these
descriptors are rebuilt per tile by the 1-warp producer alone (which also issues every copy through them),
after draining its ring, so no copy in flight reads a descriptor being rewritten. Decode reads through one
descriptor pair over the whole cache and masks: scores of keys past kv_len are -inf, their V rows are
zeroed in registers. Prefill O leaves by masked stores (no per-tile O descriptor).

Resources (sm_90a): 16 warps (4 warpgroups: 2 prefill consumers, the prefill producer's, decode) with
per-warpgroup registers summing to 512 (the register file / 128 threads: 144 + 144 + 32 + 192, which
leaves 8 bytes of spills in the paged build); shared memory: prefill Q 32 KB + STAGES x 2 x BLOCK_N x D,
decode DECODE_STAGES x 2 x DECODE_BLOCK_N x D, 226 KB in all at D=128.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma

from pod.batch import BatchSpec, HybridBatch
from pod.kernels.common import LOG2E
from pod.kernels.prefill_sm90 import _attend_rows, _issue_kv_tile, _prefill_tile_info, _tail_rows


@gluon.jit
def _prefill_producer(Q, K, V, block_table, q_indptr, kv_lens, kv_indptr, work_units,
                      q_smem, k_smem, v_smem, q_ready, q_empty, ready_k, ready_v, empty,
                      cta, grid, n_prefill_tiles, num_q_heads, total_q_rows, total_kv_rows, stride_bt,
                      GROUP: gl.constexpr, HEAD_DIM: gl.constexpr, NUM_KV_HEADS: gl.constexpr,
                      BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, COPY_ROWS: gl.constexpr,
                      PAGE_SIZE: gl.constexpr, PAGED: gl.constexpr, STAGES: gl.constexpr):
    dtype: gl.constexpr = K.dtype.element_ty
    ROWS: gl.constexpr = BLOCK_M // 2
    Q_STRIDE: gl.constexpr = GROUP * NUM_KV_HEADS * HEAD_DIM
    KV_STRIDE: gl.constexpr = NUM_KV_HEADS * HEAD_DIM
    lay: gl.constexpr = gl.NVMMASharedLayout.get_default_for([COPY_ROWS, HEAD_DIM], dtype)
    q_lay: gl.constexpr = gl.NVMMASharedLayout.get_default_for([ROWS, HEAD_DIM], dtype)
    tile_bytes: gl.constexpr = BLOCK_N * HEAD_DIM * dtype.primitive_bitwidth // 8
    q_desc = tma.make_tensor_descriptor(Q, [total_q_rows, Q_STRIDE], [Q_STRIDE, 1], [ROWS, HEAD_DIM], q_lay)
    k_full = tma.make_tensor_descriptor(K, [total_kv_rows, KV_STRIDE], [KV_STRIDE, 1], [COPY_ROWS, HEAD_DIM], lay)
    v_full = tma.make_tensor_descriptor(V, [total_kv_rows, KV_STRIDE], [KV_STRIDE, 1], [COPY_ROWS, HEAD_DIM], lay)
    it = 0
    n = 0
    for tile in range(cta, n_prefill_tiles, grid):
        chunk, head, m0, q_start, chunk_len, kv_len, kv_start, q_pos0, n_tiles = _prefill_tile_info(
            tile, work_units, q_indptr, kv_lens, kv_indptr, num_q_heads, BLOCK_M, BLOCK_N, PAGED)
        # Drain the ring before rewriting the tail descriptors: no copy in flight reads them.
        for j in gl.static_range(STAGES):
            prev = it - STAGES + j
            mbarrier.wait(empty.index((prev + STAGES) % STAGES), ((prev // STAGES) & 1), pred=prev >= 0)
        tail_rows, last_idx = _tail_rows(block_table, chunk, kv_start, kv_len, stride_bt, PAGE_SIZE, PAGED)
        k_tail = tma.make_tensor_descriptor(K, [tail_rows, KV_STRIDE], [KV_STRIDE, 1], [COPY_ROWS, HEAD_DIM], lay)
        v_tail = tma.make_tensor_descriptor(V, [tail_rows, KV_STRIDE], [KV_STRIDE, 1], [COPY_ROWS, HEAD_DIM], lay)
        # Q of this tile, once both consumers have stored the previous tile's O out of q_smem.
        mbarrier.wait(q_empty, (n & 1) ^ 1)
        mbarrier.expect(q_ready, BLOCK_M * HEAD_DIM * dtype.primitive_bitwidth // 8)
        for i in gl.static_range(2):
            tma.async_copy_global_to_shared(q_desc, [q_start + m0 + i * ROWS, head * HEAD_DIM], q_ready,
                                            q_smem.index(i))
        for t in range(n_tiles):
            s = it % STAGES
            mbarrier.wait(empty.index(s), ((it // STAGES) & 1) ^ 1)
            mbarrier.expect(ready_k.index(s), tile_bytes)
            mbarrier.expect(ready_v.index(s), tile_bytes)
            _issue_kv_tile(k_full, v_full, k_tail, v_tail, block_table, chunk, kv_start, t, last_idx, stride_bt,
                           k_smem.index(s), v_smem.index(s), ready_k.index(s), ready_v.index(s),
                           (head // GROUP) * HEAD_DIM, BLOCK_N, COPY_ROWS, PAGE_SIZE, PAGED)
            it += 1
        n += 1


@gluon.jit
def _prefill_consumer(O, q_smem, k_smem, v_smem, q_ready, q_empty, ready_k, ready_v, empty,
                      q_indptr, kv_lens, kv_indptr, work_units, cta, grid, n_prefill_tiles, num_q_heads, qk_scale,
                      HALF: gl.constexpr, GROUP: gl.constexpr, HEAD_DIM: gl.constexpr,
                      NUM_KV_HEADS: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                      PAGED: gl.constexpr, STAGES: gl.constexpr):
    """Rows HALF*64 .. HALF*64+63 of every prefill tile of this CTA (the Hopper tile's consumer, looped)."""
    ROWS: gl.constexpr = BLOCK_M // 2
    Q_STRIDE: gl.constexpr = GROUP * NUM_KV_HEADS * HEAD_DIM
    my_q = q_smem.index(HALF)
    dtype: gl.constexpr = my_q.dtype
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
    st_layout: gl.constexpr = gl.BlockedLayout([1, 8], [8, 4], [4, 1], [1, 0])
    st_rows = gl.arange(0, ROWS, layout=gl.SliceLayout(1, st_layout))
    st_cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, st_layout))
    it = 0
    n = 0
    for tile in range(cta, n_prefill_tiles, grid):
        chunk, head, m0, q_start, chunk_len, kv_len, kv_start, q_pos0, n_tiles = _prefill_tile_info(
            tile, work_units, q_indptr, kv_lens, kv_indptr, num_q_heads, BLOCK_M, BLOCK_N, PAGED)
        row0 = q_pos0 + HALF * ROWS
        mbarrier.wait(q_ready, n & 1)
        acc, l_i, m_i = _attend_rows(my_q, k_smem, v_smem, ready_k, ready_v, empty, it, n_tiles,
                                     gl.minimum(row0 + 1, kv_len) // BLOCK_N, row0, kv_len, qk_scale,
                                     ROWS, HEAD_DIM, BLOCK_N, STAGES, 4)
        # O = acc / l leaves through this Q half (every wgmma reading it has completed) and masked 16-byte
        # stores (no per-tile O descriptor: a rewritten tensormap would need each issuing warp to fence
        # it); rows past the chunk are dropped. Then the producer may load the next tile's Q here.
        acc = acc / gl.expand_dims(gl.convert_layout(l_i, gl.SliceLayout(1, o_layout)), 1)
        my_q.store(acc.to(dtype))
        o = my_q.load(st_layout)
        fence_async_shared()                             # the reads above come before the next TMA write
        mbarrier.arrive(q_empty, count=1)
        o_ptrs = O + gl.expand_dims((q_start + m0 + HALF * ROWS + st_rows).to(gl.int64) * Q_STRIDE, 1) \
            + head * HEAD_DIM + gl.expand_dims(st_cols, 0)
        gl.store(o_ptrs, o, mask=gl.expand_dims(m0 + HALF * ROWS + st_rows < chunk_len, 1))
        it += n_tiles
        n += 1


@gluon.jit
def _decode_partition(Qd, K, V, Od, block_table, kv_lens, kv_indptr, decode_items,
                      dk_smem, dv_smem, d_ready, cta, grid, n_decode_items, num_prefill, total_kv_rows,
                      stride_bt, qk_scale,
                      GROUP: gl.constexpr, HEAD_DIM: gl.constexpr, NUM_KV_HEADS: gl.constexpr,
                      BLOCK_N: gl.constexpr, COPY_ROWS: gl.constexpr, PAGE_SIZE: gl.constexpr,
                      PAGED: gl.constexpr, STAGES: gl.constexpr):
    """One decode item = (request, KV head): its GROUP query heads as rows 0..GROUP-1 of a 16-row mma_v2
    tile (warps side by side along N), all of its keys, no split. K/V pages by TMA through a STAGES ring
    that this partition fills itself: tile t+STAGES-1 is issued once every warp holds tile t-1 in
    registers (a partition barrier), so a stage is never overwritten while read."""
    dtype: gl.constexpr = K.dtype.element_ty
    KV_STRIDE: gl.constexpr = NUM_KV_HEADS * HEAD_DIM
    Q_STRIDE: gl.constexpr = GROUP * NUM_KV_HEADS * HEAD_DIM
    lay: gl.constexpr = gl.NVMMASharedLayout.get_default_for([COPY_ROWS, HEAD_DIM], dtype)
    tile_bytes: gl.constexpr = BLOCK_N * HEAD_DIM * dtype.primitive_bitwidth // 8
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, 4], instr_shape=[16, 8])
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    b_layout: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=2)
    ld: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [1, 4], [1, 0])
    rows_ld = gl.arange(0, 16, layout=gl.SliceLayout(1, ld))
    cols_ld = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, ld))
    rows_o = gl.arange(0, 16, layout=gl.SliceLayout(1, mma))
    cols_o = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, mma))
    keys = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, mma))
    v_keys = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, b_layout))
    k_full = tma.make_tensor_descriptor(K, [total_kv_rows, KV_STRIDE], [KV_STRIDE, 1], [COPY_ROWS, HEAD_DIM], lay)
    v_full = tma.make_tensor_descriptor(V, [total_kv_rows, KV_STRIDE], [KV_STRIDE, 1], [COPY_ROWS, HEAD_DIM], lay)
    it = 0
    for item in range(cta, n_decode_items, grid):
        req = gl.load(decode_items + 2 * item)
        g = gl.load(decode_items + 2 * item + 1)
        seq = num_prefill + req
        kv_len = gl.load(kv_lens + seq)
        if PAGED:
            kv_start = kv_len * 0
        else:
            kv_start = gl.load(kv_indptr + seq)
        n_tiles = (kv_len + BLOCK_N - 1) // BLOCK_N
        # One descriptor pair over the whole cache (no per-item rewrite): slots past kv_len are read as they
        # are (stale, maybe NaN); their scores are masked and their V rows zeroed in registers below.
        _, last_idx = _tail_rows(block_table, seq, kv_start, kv_len, stride_bt, PAGE_SIZE, PAGED)
        q_ptrs = Qd + req.to(gl.int64) * Q_STRIDE + (g * GROUP + gl.expand_dims(rows_ld, 1)) * HEAD_DIM \
            + gl.expand_dims(cols_ld, 0)
        q = gl.load(q_ptrs, mask=gl.expand_dims(rows_ld < GROUP, 1), other=0.0)
        q = gl.convert_layout(q, a_layout)
        for j in gl.static_range(STAGES - 1):
            s = (it + j) % STAGES
            mbarrier.expect(d_ready.index(s), 2 * tile_bytes, pred=j < n_tiles)
            if j < n_tiles:
                _issue_kv_tile(k_full, v_full, k_full, v_full, block_table, seq, kv_start, j, last_idx, stride_bt,
                               dk_smem.index(s), dv_smem.index(s), d_ready.index(s), d_ready.index(s),
                               g * HEAD_DIM, BLOCK_N, COPY_ROWS, PAGE_SIZE, PAGED)
        m_i = gl.full([16], -float("inf"), gl.float32, gl.SliceLayout(1, mma))
        l_i = gl.zeros([16], gl.float32, gl.SliceLayout(1, mma))
        acc = gl.zeros([16, HEAD_DIM], gl.float32, mma)
        for t in range(n_tiles):
            s = (it + t) % STAGES
            mbarrier.wait(d_ready.index(s), ((it + t) // STAGES) & 1)
            k = dk_smem.index(s).permute((1, 0)).load(b_layout)          # K^T [D, BLOCK_N]
            v = dv_smem.index(s).load(b_layout)                          # V [BLOCK_N, D]
            v = gl.where(gl.expand_dims(t * BLOCK_N + v_keys < kv_len, 1), v, 0.0)
            gl.thread_barrier()                                          # every warp holds stage s
            nxt = t + STAGES - 1
            sn = (it + nxt) % STAGES
            if nxt < n_tiles:
                fence_async_shared()
                mbarrier.expect(d_ready.index(sn), 2 * tile_bytes)
                _issue_kv_tile(k_full, v_full, k_full, v_full, block_table, seq, kv_start, nxt, last_idx,
                               stride_bt, dk_smem.index(sn), dv_smem.index(sn), d_ready.index(sn),
                               d_ready.index(sn), g * HEAD_DIM, BLOCK_N, COPY_ROWS, PAGE_SIZE, PAGED)
            sc = mma_v2(q, k, gl.zeros([16, BLOCK_N], gl.float32, mma))
            sc = gl.where(gl.expand_dims(t * BLOCK_N + keys < kv_len, 0), sc, -float("inf"))
            m_new = gl.maximum(m_i, gl.max(sc, 1) * qk_scale)
            p = gl.exp2(sc * qk_scale - gl.expand_dims(m_new, 1))
            alpha = gl.exp2(m_i - m_new)
            l_i = l_i * alpha + gl.sum(p, 1)
            acc = mma_v2(gl.convert_layout(p.to(dtype), a_layout), v, acc * gl.expand_dims(alpha, 1))
            m_i = m_new
        it += n_tiles
        out = acc / gl.expand_dims(l_i, 1)
        o_ptrs = Od + req.to(gl.int64) * Q_STRIDE + (g * GROUP + gl.expand_dims(rows_o, 1)) * HEAD_DIM \
            + gl.expand_dims(cols_o, 0)
        gl.store(o_ptrs, out.to(dtype), mask=gl.expand_dims(rows_o < GROUP, 1))


@gluon.jit
def pod_sm90_kernel(Q, Qd, K, V, O, Od, q_indptr, kv_lens, kv_indptr, block_table, work_units, decode_items,
                    n_prefill_tiles, n_decode_items, num_prefill, num_q_heads, total_q_rows, total_kv_rows,
                    stride_bt, qk_scale,
                    GROUP: gl.constexpr, HEAD_DIM: gl.constexpr, NUM_KV_HEADS: gl.constexpr,
                    BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, PAGE_SIZE: gl.constexpr, PAGED: gl.constexpr,
                    STAGES: gl.constexpr, DECODE_BLOCK_N: gl.constexpr, DECODE_STAGES: gl.constexpr,
                    CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr, DECODE_REGS: gl.constexpr):
    dtype: gl.constexpr = Q.dtype.element_ty
    ROWS: gl.constexpr = BLOCK_M // 2
    COPY_ROWS: gl.constexpr = PAGE_SIZE if PAGED and PAGE_SIZE < BLOCK_N else BLOCK_N
    D_COPY_ROWS: gl.constexpr = PAGE_SIZE if PAGED and PAGE_SIZE < DECODE_BLOCK_N else DECODE_BLOCK_N
    cta = gl.program_id(0)
    grid = gl.num_programs(0)
    q_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([ROWS, HEAD_DIM], dtype)
    kv_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, HEAD_DIM], dtype)
    d_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([DECODE_BLOCK_N, HEAD_DIM], dtype)
    q_smem = gl.allocate_shared_memory(dtype, [2, ROWS, HEAD_DIM], q_layout)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], kv_layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], kv_layout)
    dk_smem = gl.allocate_shared_memory(dtype, [DECODE_STAGES, DECODE_BLOCK_N, HEAD_DIM], d_layout)
    dv_smem = gl.allocate_shared_memory(dtype, [DECODE_STAGES, DECODE_BLOCK_N, HEAD_DIM], d_layout)
    ready_k = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    ready_v = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    d_ready = gl.allocate_shared_memory(gl.int64, [DECODE_STAGES, 1], mbarrier.MBarrierLayout())
    q_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    q_empty = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready_k.index(i), count=1)
        mbarrier.init(ready_v.index(i), count=1)
        mbarrier.init(empty.index(i), count=2)           # both prefill consumers release a stage
    for i in gl.static_range(DECODE_STAGES):
        mbarrier.init(d_ready.index(i), count=1)
    mbarrier.init(q_ready, count=1)
    mbarrier.init(q_empty, count=2)
    fence_async_shared()                                 # the inits are visible to the TMA engine
    gl.warp_specialize([
        (_prefill_consumer, (O, q_smem, k_smem, v_smem, q_ready, q_empty, ready_k, ready_v, empty, q_indptr,
                             kv_lens, kv_indptr, work_units, cta, grid, n_prefill_tiles, num_q_heads, qk_scale,
                             0, GROUP, HEAD_DIM, NUM_KV_HEADS, BLOCK_M, BLOCK_N, PAGED, STAGES)),
        (_prefill_consumer, (O, q_smem, k_smem, v_smem, q_ready, q_empty, ready_k, ready_v, empty, q_indptr,
                             kv_lens, kv_indptr, work_units, cta, grid, n_prefill_tiles, num_q_heads, qk_scale,
                             1, GROUP, HEAD_DIM, NUM_KV_HEADS, BLOCK_M, BLOCK_N, PAGED, STAGES)),
        (_prefill_producer, (Q, K, V, block_table, q_indptr, kv_lens, kv_indptr, work_units, q_smem, k_smem, v_smem,
                             q_ready, q_empty, ready_k, ready_v, empty, cta, grid, n_prefill_tiles, num_q_heads,
                             total_q_rows, total_kv_rows, stride_bt, GROUP, HEAD_DIM, NUM_KV_HEADS, BLOCK_M,
                             BLOCK_N, COPY_ROWS, PAGE_SIZE, PAGED, STAGES)),
        (_decode_partition, (Qd, K, V, Od, block_table, kv_lens, kv_indptr, decode_items, dk_smem, dv_smem, d_ready,
                             cta, grid, n_decode_items, num_prefill, total_kv_rows, stride_bt, qk_scale, GROUP,
                             HEAD_DIM, NUM_KV_HEADS, DECODE_BLOCK_N, D_COPY_ROWS, PAGE_SIZE, PAGED, DECODE_STAGES)),
    ], [4, 1, 4], [CONSUMER_REGS, PRODUCER_REGS, DECODE_REGS])


# ------------------------------------------------------------------------------------------------
# Host side
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PodSm90Config:
    """Tile sizes and per-partition registers (consumer x2 + producer + decode = 512 a thread slot)."""
    block_n: int = 64
    stages: int = 3
    decode_block_n: int = 64
    decode_stages: int = 3
    consumer_regs: int = 144     # the second prefill consumer's (the first gets what is left: 144)
    producer_regs: int = 32
    decode_regs: int = 192       # the decode partition holds its K^T and V stage as mma operands


def pod_sm90_supports(spec: BatchSpec, config: PodSm90Config = PodSm90Config()) -> str | None:
    """None when this kernel handles the batch, else why not."""
    h = spec.heads
    if h.head_dim not in (64, 128):
        return f"head_dim {h.head_dim} (64 or 128)"
    if config.stages < 2 or config.decode_stages < 2:
        return "rings need >= 2 stages (one being read while the next lands)"
    smem = (128 + 2 * config.stages * config.block_n + 2 * config.decode_stages * config.decode_block_n) \
        * h.head_dim * 2 + 2560                          # + barriers and the decode partition's scratch
    if smem > 227 * 1024:
        return f"{config} needs ~{smem} B of shared memory (227 KB an SM)"
    if h.group_size > 16:
        return f"GQA group {h.group_size} (the decode tile has 16 rows)"
    if spec.paged:
        p = spec.page_size
        for n in (config.block_n, config.decode_block_n):
            if p < 8 or not (p % n == 0 or n % p == 0):
                return f"page_size {p} (needs >= 8 and a divisor or multiple of {n})"
    return None


@dataclass
class PodSm90Plan:
    """A KernelWork (pod/kernels/contract.py)."""
    config: PodSm90Config
    work_units: torch.Tensor        # [units, 2] int32 (chunk, q_block), heaviest first
    n_prefill_tiles: int
    decode_items: torch.Tensor      # [items, 2] int32 (decode request, kv head), longest first
    n_decode_items: int
    grid: int                       # one persistent CTA an SM

    @property
    def num_tiles(self) -> int:
        """Work tiles of both roles (the grid's persistent CTAs claim them)."""
        return self.n_prefill_tiles + self.n_decode_items

    def describe(self) -> dict:
        return dict(kernel="pod_sm90", **asdict(self.config), n_prefill_tiles=self.n_prefill_tiles,
                    n_decode_items=self.n_decode_items, grid=self.grid)

    def runner(self, batch: HybridBatch, out_prefill: torch.Tensor, out_decode: torch.Tensor):
        """``launch() -> (out_prefill, out_decode)`` with its arguments bound once (`pod_sm90_runner`)."""
        return pod_sm90_runner(batch, self, out_prefill, out_decode)


def plan_pod_sm90(batch_or_spec: HybridBatch | BatchSpec, config: PodSm90Config = PodSm90Config(),
                  num_sms: int | None = None, device: torch.device | str | None = None) -> PodSm90Plan:
    """Shape-only: the prefill work list (as the Hopper tile's), the decode items, the grid."""
    from pod.env import device_num_sms, unpack_batch_or_spec
    from pod.kernels.prefill import plan_units
    spec, dev = unpack_batch_or_spec(batch_or_spec, device)
    why = pod_sm90_supports(spec, config)
    if why is not None:
        raise ValueError(f"the Hopper POD kernel does not handle this batch: {why}")
    units, _ = plan_units(spec, 128)
    hkv = spec.heads.num_kv_heads
    order = sorted(range(spec.num_decode), key=lambda j: -spec.decode_context_lens[j])
    items = [(j, g) for j in order for g in range(hkv)]
    if num_sms is None:
        num_sms = device_num_sms(dev)
    n_p, n_d = len(units) * spec.heads.num_q_heads, len(items)
    return PodSm90Plan(config=config,
                       work_units=torch.tensor(units or [[0, 0]], dtype=torch.int32, device=dev).reshape(-1, 2),
                       n_prefill_tiles=n_p,
                       decode_items=torch.tensor(items or [[0, 0]], dtype=torch.int32, device=dev).reshape(-1, 2),
                       n_decode_items=n_d, grid=max(1, min(num_sms, max(n_p, n_d))))


def launch_args(batch: HybridBatch, plan: PodSm90Plan, out_prefill: torch.Tensor, out_decode: torch.Tensor):
    """(positional runtime args, constexpr kwargs) of `pod_sm90_kernel`."""
    spec, cfg = batch.spec, plan.config
    h = spec.heads
    k = batch.k_cache
    for name, t in (("q_prefill", batch.q_prefill), ("q_decode", batch.q_decode), ("k_cache", k),
                    ("v_cache", batch.v_cache), ("out_prefill", out_prefill), ("out_decode", out_decode)):
        if not t.is_contiguous():
            raise ValueError(f"the Hopper POD kernel needs a dense {name}")
    paged = spec.paged
    bt = batch.block_table if paged else batch.kv_lens
    args = (batch.q_prefill, batch.q_decode, k, batch.v_cache, out_prefill, out_decode, batch.q_indptr,
            batch.kv_lens, batch.kv_indptr if not paged else batch.kv_lens, bt, plan.work_units, plan.decode_items,
            plan.n_prefill_tiles, plan.n_decode_items, spec.num_prefill, h.num_q_heads, batch.q_prefill.shape[0],
            k.shape[0] * k.shape[1] if paged else k.shape[0], bt.stride(0) if paged else 0,
            float(batch.sm_scale) * LOG2E)
    const = dict(GROUP=h.group_size, HEAD_DIM=h.head_dim, NUM_KV_HEADS=h.num_kv_heads, BLOCK_M=128,
                 BLOCK_N=cfg.block_n, PAGE_SIZE=spec.page_size if paged else cfg.block_n, PAGED=paged,
                 STAGES=cfg.stages, DECODE_BLOCK_N=cfg.decode_block_n, DECODE_STAGES=cfg.decode_stages,
                 CONSUMER_REGS=cfg.consumer_regs, PRODUCER_REGS=cfg.producer_regs, DECODE_REGS=cfg.decode_regs)
    return args, const


def pod_sm90_runner(batch: HybridBatch, plan: PodSm90Plan, out_prefill: torch.Tensor, out_decode: torch.Tensor):
    """Bind the one launch; returns ``launch() -> (out_prefill, out_decode)``."""
    from pod.kernels.prefill_sm90 import ensure_scratch_allocator
    args, const = launch_args(batch, plan, out_prefill, out_decode)
    ensure_scratch_allocator()
    grid = (plan.grid,)

    def launch():
        pod_sm90_kernel[grid](*args, **const, num_warps=4)
        return out_prefill, out_decode
    return launch


def compile_report(config: PodSm90Config = PodSm90Config(), *, head_dim: int = 128, dtype: str = "bfloat16",
                   paged: bool = True, page_size: int = 16, num_q_heads: int = 32, num_kv_heads: int = 8) -> dict:
    """Compile for sm_90a on the host (no GPU), with the arguments a real launch on a small hybrid batch of
    this layout gets: shared memory, registers, spills, wgmma / mma.sync / TMA / setmaxnreg counts."""
    from pod.batch import make_batch
    from pod.kernels.common import sm90_compile_report
    spec = BatchSpec.build(num_q_heads, num_kv_heads, head_dim, prefill=[(300, 700), (77, 0)], decode=[1000, 513],
                           dtype=dtype, page_size=page_size if paged else None)
    batch = make_batch(spec, "cpu", seed=0)
    out = (torch.empty_like(batch.q_prefill), torch.empty_like(batch.q_decode))
    args, const = launch_args(batch, plan_pod_sm90(batch, config, num_sms=132), *out)
    rep = sm90_compile_report(pod_sm90_kernel, *args, num_warps=4, **const)
    return {k: v for k, v in rep.items() if k != "cp_async"}
