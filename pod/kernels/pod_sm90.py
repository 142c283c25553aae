"""POD on Hopper (sm_90a, Gluon): prefill and decode attention in one persistent launch, each SM running
one role at a time with the full Hopper tile (SM-level roles, planned per batch).

Why this shape (docs/hopper_pod.md has the numbers). The Hopper prefill tile fills an SM (225 KB of shared
memory, the whole register file), so the paper's recipe of a prefill CTA and a decode CTA co-resident on
an SM would shrink it; the first version of this kernel ran a decode partition beside a smaller prefill
ring in every CTA and lost to the two standalone launches (0.81x). Here every CTA is the full tile, one a
SM, persistent, and walks a list of work items planned on the host:

  * a prefill item is one tile of the Hopper prefill kernel (pod/kernels/prefill_sm90.py): 128 query rows
    of one chunk for one q head, 128-key stages, the tile's own partition code looped;
  * a decode item pair is two decode items, (request, kv head, key range) each, one for each consumer
    warpgroup: stage t carries keys [64t, 64t+64) of item A in rows 0-63 and of item B in rows 64-127, so
    both consumers read every stage (each releases its K half once S^T is computed, `empty`, and its V
    half after O^T, `empty_v`), and a decode SM streams K/V through the same 3 x 64 KB TMA ring at up to
    HBM rate from a fraction of the SMs. The softmax's column maxima cross the warpgroup's 4 warps once a
    stage through 256 B of shared memory; the sums stay per thread until the item ends (_decode_rows).

The planner (`plan_pod_sm90`) gives the decode pairs to `decode_ctas` CTAs and the prefill tiles to the
rest (optionally to the decode CTAs too, after their pairs: `steal`), heaviest first onto the
least-loaded CTA (LPT), choosing `decode_ctas` so both roles are estimated to finish together: prefill runs compute-bound on its SMs while decode streams K/V on its own. One launch
beats two only where a decode SM streams well above HBM / #SMs (serial runs decode on every SM, their
tensor cores idle); docs/hopper_pod.md has the rates measured so far and where the time goes.

Math (exp2 domain, as pod/kernels/common.py): s2 = (q . k) * qk_scale, qk_scale = sm_scale * log2(e);
out = sum_j 2^(s2_j - lse2) v_j; lse2 = log2(sum_j 2^s2_j). A decode item covering only part of a
request's keys (split-KV) writes its fp32 partial output and lse2 to the workspace; pod.kernels.merge
merges them after the launch (only batches whose plan splits a decode need that second launch).

Memory layout (NHD, d unit-stride):
    Q, O       [total_chunk_tokens, Hq, D] viewed as 2-D [tokens, Hq*D] (a prefill tile: box [64, D])
    Qd, Od     [num_decodes, Hq, D] viewed as 2-D [num_decodes*Hq, D]: a decode item's GROUP q heads are
               GROUP consecutive rows; one [64, D] box loads them (the other 64-GROUP rows are computed and
               dropped; rows past the tensor are zero-filled by TMA)
    K, V       contiguous [total_kv, Hkv, D] or paged [pages, PAGE_SIZE, Hkv, D], as 2-D [rows, Hkv*D]
    PartO      fp32 [partial_rows, Hq, D], PartLse fp32 [partial_rows, Hq] (split decodes only)
Work lists (int32): work_units [units, 2] (chunk, q_block) as the prefill tile's; prefill tile id =
unit * Hq + head. dec_items [pairs * 2, 6] = (seq or -1, request, kv_head, kv_start, kv_end, part_row),
consumer c of pair p takes row 2p + c. cta_items[cta_ptr[c]:cta_ptr[c+1]] lists CTA c's items: >= 0 a
prefill tile, < 0 the decode pair -(item + 1). balance "dynamic" (PodSm90Config; "auto" picks it where the
decode outweighs the prefill): cta_items is two queues, the decode pairs then the prefill tiles, cta_ptr[c]
CTA c's first item, and the producer claims the rest at run time (_claim_item).

Stale keys. Prefill: as the Hopper tile, the last page of a sequence is read through a descriptor that ends
at the sequence's last valid row (TMA zero-fills past it); the producer rebuilds that pair per prefill item
after the ring has drained. Decode: the half a consumer owns is read by it alone, so on its last tile it
zeroes the V rows past the item's keys in shared memory (then a proxy fence) and masks their scores:
a stale NaN never reaches P V.

Partitions (one CTA, 12 warps): consumer 0 (default, 4 warps) and consumer 1 (4 warps) run wgmma on the
ring (prefill: 64 query rows each; decode: one item each), the producer (1 warp) issues every TMA copy.
"""
from __future__ import annotations

import heapq
import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma,
                                                              warpgroup_mma, warpgroup_mma_wait)

from pod.batch import BatchSpec, HybridBatch
from pod.kernels.common import LOG2E
from pod.kernels.lpt import RunBounds, list_schedule, lpt, lpt_makespan, runs_of, shifted_runs
from pod.kernels.tables import device_tables
from pod.kernels.prefill_sm90 import _attend_rows, _issue_kv_tile, _prefill_tile_info, _tail_rows
from pod.kernels.ptx_hints import install as _install_ptx_hints, l2_tag_evict_first, l2_tag_evict_last

if TYPE_CHECKING:
    from pod.kernels.decode import DecodeWork

SM90_SHARED_LIMIT = 227 * 1024


# ------------------------------------------------------------------------------------------------
# Device side
# ------------------------------------------------------------------------------------------------
@gluon.jit
def _globaltimer(x):
    """%globaltimer (ns, one clock for every SM): `x` is any int32 scalar (it only gives the result a shape)."""
    return gl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l,r", [x], dtype=gl.int64, is_pure=False,
                                     pack=1)


@gluon.jit
def _smid(x):
    return gl.inline_asm_elementwise("mov.u32 $0, %smid;", "=r,r", [x], dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def _claim_list(sm_map, claim, n_lists):
    """SM-aware binding: the CTA list this CTA runs, chosen by the SM it landed on. sm_map[smid] is the list
    planned for that SM (-1: none); claim [n_lists + 2] int32 (zero between launches) holds a flag a list,
    then a fallback cursor and an arrival count. A CTA whose SM's list is taken or missing (the grid is not
    one CTA an SM, or another kernel holds SMs) takes the first unclaimed list from the cursor: every list
    is run exactly once whatever the placement (as many lists as CTAs). The last CTA to claim zeroes
    the workspace for the next launch (no memset launch; CUDA graphs replay it)."""
    pref = gl.load(sm_map + _smid(n_lists))
    mine = pref * 0 - 1
    if pref >= 0:
        if gl.atomic_xchg(claim + pref, 1) == 0:
            mine = pref
    while mine < 0:
        i = gl.atomic_add(claim + n_lists, 1)
        if gl.atomic_xchg(claim + i, 1) == 0:
            mine = i
    if gl.atomic_add(claim + n_lists + 1, 1) == n_lists - 1:
        lay: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])
        offs = gl.arange(0, 512, layout=lay)
        for b in range(0, n_lists + 2, 512):
            gl.store(claim + b + offs, 0, mask=b + offs < n_lists + 2)
    return mine


@gluon.jit
def _zero_rows_from(buf, rows, valid, layout: gl.constexpr):
    """Zero the rows of a shared [R, D] K/V view at or past `valid` (`rows`: its row indices in `layout`'s
    row slice): stale page slots (a NaN there) must not reach P V as 0 * NaN. The caller fences before a
    wgmma reads it."""
    v = buf.load(layout)
    buf.store(gl.where(gl.expand_dims(rows < valid, 1), v, gl.zeros_like(v)))


@gluon.jit
def _decode_info(dec_items, pair, c, HALF_N: gl.constexpr):
    """Item c (0/1) of decode pair `pair`: (seq, request, kv head, first key, key count, partial row,
    half-tiles). seq < 0: no item (the pair's other consumer has one)."""
    row = dec_items + (2 * pair + c) * 6
    seq = gl.load(row)
    req = gl.load(row + 1)
    g = gl.load(row + 2)
    ks = gl.load(row + 3)
    n_keys = gl.load(row + 4) - ks
    part_row = gl.load(row + 5)
    n_half = gl.where(seq >= 0, (n_keys + HALF_N - 1) // HALF_N, 0)
    return seq, req, g, ks, n_keys, part_row, n_half


@gluon.jit
def _pair_rows(block_table, seq_a, seq_b, st_a, st_b, tile_a, tile_b, last_a, last_b, stride_bt,
               NCOPY: gl.constexpr, COPY_ROWS: gl.constexpr, PAGE_SIZE: gl.constexpr, PAGED: gl.constexpr,
               HALF_N: gl.constexpr):
    """Cache rows of the 2 * NCOPY copies of one decode-pair stage (item A's half-tile, then B's): one
    gather of block-table entries (one memory latency a stage, issued before the producer waits for the
    stage to free up). Page slots past a sequence's last page re-read the last page (masked keys)."""
    # Every lane holds all 2 * NCOPY rows: picking copy c's row is register selects, not a warp reduction.
    lay: gl.constexpr = gl.BlockedLayout([2 * NCOPY], [32], [1], [0])
    i = gl.arange(0, 2 * NCOPY, layout=lay)
    is_b = i >= NCOPY
    tok = gl.where(is_b, tile_b, tile_a) * HALF_N + (i % NCOPY) * COPY_ROWS
    if PAGED:
        seq = gl.where(is_b, gl.maximum(seq_b, 0), gl.maximum(seq_a, 0))
        idx = gl.minimum(tok // PAGE_SIZE, gl.where(is_b, last_b, last_a))
        rows = gl.load(block_table + seq.to(gl.int64) * stride_bt + idx) * PAGE_SIZE + tok % PAGE_SIZE
    else:
        rows = gl.where(is_b, st_b, st_a) + tok
    return rows, i


@gluon.jit
def _issue_pair_half(desc, bar, dst, rows, ci, single, both, use_a, use_b, col_a, col_b,
                     NCOPY: gl.constexpr, COPY_ROWS: gl.constexpr, HALF_N: gl.constexpr, BLOCK_N: gl.constexpr,
                     HEAD_DIM: gl.constexpr, ELT: gl.constexpr):
    """K (or V) of one decode-pair stage into `dst` [BLOCK_N, D]: the expected bytes on `bar` (one half-tile
    or both), then copy c of _pair_rows' 2 * NCOPY rows into rows c * COPY_ROWS.. (item A's, then B's,
    each from its kv head's columns col_a / col_b; a copy of an item with no keys left is predicated off)."""
    mbarrier.expect(bar, HALF_N * HEAD_DIM * ELT, pred=single)
    mbarrier.expect(bar, BLOCK_N * HEAD_DIM * ELT, pred=both)
    for c in gl.static_range(2 * NCOPY):
        row = gl.sum(gl.where(ci == c, rows, 0), 0)
        use = use_a if c < NCOPY else use_b
        col = col_a if c < NCOPY else col_b
        tma.async_copy_global_to_shared(desc, [row, col], bar, dst.slice(c * COPY_ROWS, COPY_ROWS), pred=use)


# The end of a CTA's items (an item id no list holds: prefill tiles are >= 0, decode pairs < 0 and > -2^30),
# and, in the dynamic schedule, "claim the next one" (_claim_item).
CLAIM_ID = 2 ** 31 - 2                                   # (the host writes it into cta_ptr)
END = gl.constexpr(2 ** 31 - 1)
CLAIM = gl.constexpr(CLAIM_ID)


@gluon.jit
def _list_item(cta_items, j0, j1, n):
    """The static schedule: item n of the CTA's planned list cta_items[j0:j1], END past it."""
    return gl.load(cta_items + j0 + n, mask=j0 + n < j1, other=END)


@gluon.jit
def _claim_item(cta_items, queue, cta, dec_ctas, live):
    """The dynamic schedule (balance="dynamic"), in the producer: the CTA's next item. Queue 0 is the decode
    pairs, cta_items[0:n_dec], queue 1 the prefill tiles, cta_items[n_dec:n_all], each heaviest first; a CTA's
    own queue is its planned role's. Its first item is not claimed here: cta_ptr[cta] holds it, the static
    plan's first round (item i of a queue for the i-th CTA of its role; no atomic, so the launch does not
    start with every CTA on one counter), or CLAIM where its queue is shorter than that round. The next items come
    from its own queue while it lasts, then from the other queue, END once neither gives one.
    `queue` int32 [12]: the claims on each queue past its first round (relaxed atomics: every item goes to
    exactly one CTA), then the CTAs done (acq_rel: the last one zeroes the three; zero between launches, so
    one launch of a plan at a time, like _claim_list's workspace), a pad; n_dec, n_all; for each queue the
    fewest items it must still hold for a CTA of the other role to take one (PodSm90Config.cross_rounds:
    the other role's CTAs each have a round left, so taking one shortens that role; near its end the owners
    finish it sooner than a newcomer would); for each queue its first round (its role's CTA count).
    `live`: bit q set until queue q refused (a cursor only grows: a queue that ran dry, or too short to
    take from, stays so, and is not asked again)."""
    n_dec = gl.load(queue + 4)                           # (loaded here, not kept: the producer has 48 registers)
    n_all = gl.load(queue + 5)
    own = gl.where(cta < dec_ctas, 0, 1)                 # the role planned for this CTA's SM comes first
    item = n_dec * 0 + END
    for r in gl.static_range(2):
        q = own ^ r
        if item == END:
            if ((live >> q) & 1) == 1:
                lo = gl.where(q == 0, 0, n_dec) + gl.load(queue + 8 + q)    # past the first round
                hi = gl.where(q == 0, n_dec, n_all)
                ok = lo < hi
                if r == 1:                               # the other role's queue: only while it is long
                    left = hi - lo - gl.atomic_add(queue + q, 0, sem="relaxed")
                    ok = left >= gl.load(queue + 6 + q)
                if ok:
                    i = gl.atomic_add(queue + q, 1, sem="relaxed")
                    if lo + i < hi:
                        item = gl.load(cta_items + lo + i)
                    else:
                        live = live & ~(1 << q)
                else:
                    live = live & ~(1 << q)
    return item, live


@gluon.jit
def _post_item(item_smem, item_ready, item, n):
    """The dynamic schedule: the producer hands item n to both consumers as soon as it has claimed it, through
    slot n % 2 of a two-slot ring in shared memory and that slot's `item_ready` mbarrier (one arrive a phase),
    so a consumer reads the item and its tables while the item's Q and first stages are still in flight.
    Slot n % 2 held item n - 2, which both consumers read before they freed item n - 2's Q buffer; the
    producer claims item n only after its q_empty wait for item n - 1, so no slot is written while read, and a
    slot's barrier never runs a phase ahead of its waiters. (It replaced one slot written after q_empty; what
    dynamic loses on short launches, up to 5%, stayed: docs/hopper_pod.md, Session 14.)"""
    lay: gl.constexpr = gl.BlockedLayout([1], [32], [1], [0])
    item_smem.index(n & 1).store(gl.full([1], item, gl.int32, layout=lay))
    gl.thread_barrier()                                  # the store is the warp's before the arrive (release)
    mbarrier.arrive(item_ready.index(n & 1), count=1)


@gluon.jit
def _take_item(item_smem, item_ready, n):
    """The dynamic schedule, in a consumer: item n as the producer posted it (END: no more)."""
    mbarrier.wait(item_ready.index(n & 1), (n >> 1) & 1)
    lay: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])
    return gl.max(item_smem.index(n & 1).load(lay), 0)


@gluon.jit
def _load_q_prefill(q_desc, q_smem, q_ready, q_empty, n, row, col, ROWS: gl.constexpr, BYTES: gl.constexpr):
    """Item n's Q tile (two [ROWS, D] halves, one a consumer) once both consumers freed the buffer."""
    mbarrier.wait(q_empty, (n & 1) ^ 1)
    mbarrier.expect(q_ready, BYTES)
    for i in gl.static_range(2):
        tma.async_copy_global_to_shared(q_desc, [row + i * ROWS, col], q_ready, q_smem.index(i))


@gluon.jit
def _load_q_decode(qd_desc, q_smem, q_ready, q_empty, n, row_a, row_b, seq_b, BYTES: gl.constexpr):
    """Decode pair n's two q-head groups (one [64, D] box each; B's only if the pair has a second item,
    seq_b >= 0)."""
    mbarrier.wait(q_empty, (n & 1) ^ 1)
    # expect-tx byte counts are constants: one expect for one Q box, the other for two
    mbarrier.expect(q_ready, BYTES, pred=seq_b < 0)
    mbarrier.expect(q_ready, 2 * BYTES, pred=seq_b >= 0)
    tma.async_copy_global_to_shared(qd_desc, [row_a, 0], q_ready, q_smem.index(0))
    tma.async_copy_global_to_shared(qd_desc, [row_b, 0], q_ready, q_smem.index(1), pred=seq_b >= 0)


@gluon.jit
def _producer(Q, Qd, K, V, block_table, q_indptr, kv_lens, kv_indptr, work_units, dec_items, cta_ptr, cta_items, cta,
              q_smem, k_smem, v_smem, q_ready, q_empty, ready_k, ready_v, empty, empty_v, item_smem, item_ready, queue,
              dec_ctas, num_q_heads, total_q_rows, total_qd_rows, total_kv_rows, stride_bt,
              GROUP: gl.constexpr, HEAD_DIM: gl.constexpr, NUM_KV_HEADS: gl.constexpr,
              BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, PAGE_SIZE: gl.constexpr, PAGED: gl.constexpr,
              STAGES: gl.constexpr, TAIL_MASK: gl.constexpr, OVERLAP: gl.constexpr, DECODE_L2: gl.constexpr,
              PREFILL_L2: gl.constexpr, DYNAMIC: gl.constexpr):
    """1 warp: every TMA copy of the CTA's items, in item order, through the one ring. TAIL_MASK: a prefill
    item's last page comes through the whole-tensor descriptors like every other (its stale V rows are
    zeroed by the consumers), so items follow each other through the ring without a drain; else through
    tail descriptors rebuilt per item after the ring drains (TMA zero-fills past kv_len).
    OVERLAP: an item's first STAGES - 1 stages are issued before its Q (whose buffer the previous item may
    still hold), so the next item's K/V are in flight while the consumers finish the last one. Never more
    than STAGES - 1: stage STAGES would wait for a slot that only this item's first stage frees, which
    needs its Q (a deadlock).
    DECODE_L2 / PREFILL_L2: 1 tags the role's K/V copies with an L2 policy (evict-first / evict-last), 0 not.
    (Q copies are never tagged.)
    DYNAMIC: items come from the two queues (_claim_item), each posted to the consumers as soon as it is
    claimed (_post_item: a two-slot ring, so they read its tables while its Q lands), then END; else from the
    CTA's planned list.
    Ring slots and their V halves: every stage releases its slot's `empty` twice (once a consumer), so its phase
    is the ring round; a decode stage also releases its V half on `empty_v`, a prefill stage does not (both
    halves go with `empty`). So a slot's `empty_v` phase counts the decode stages it has held: v_par bit s is
    that count's parity for slot s, v_last bit s says the slot's last stage was a decode one (its V half may
    still be read: wait for it before the slot is written again), whichever order the roles come in."""
    dtype: gl.constexpr = K.dtype.element_ty
    ROWS: gl.constexpr = BLOCK_M // 2
    HALF_N: gl.constexpr = BLOCK_N // 2
    Q_STRIDE: gl.constexpr = GROUP * NUM_KV_HEADS * HEAD_DIM
    KV_STRIDE: gl.constexpr = NUM_KV_HEADS * HEAD_DIM
    COPY_ROWS: gl.constexpr = PAGE_SIZE if PAGED and PAGE_SIZE < BLOCK_N else BLOCK_N
    D_COPY_ROWS: gl.constexpr = PAGE_SIZE if PAGED and PAGE_SIZE < HALF_N else HALF_N
    NCOPY: gl.constexpr = HALF_N // D_COPY_ROWS         # copies a decode half-tile
    ELT: gl.constexpr = dtype.primitive_bitwidth // 8
    lay: gl.constexpr = gl.NVMMASharedLayout.get_default_for([COPY_ROWS, HEAD_DIM], dtype)
    d_lay: gl.constexpr = gl.NVMMASharedLayout.get_default_for([D_COPY_ROWS, HEAD_DIM], dtype)
    q_lay: gl.constexpr = gl.NVMMASharedLayout.get_default_for([ROWS, HEAD_DIM], dtype)
    # Whole-tensor descriptors, built once per CTA (the prefill tail pair is rebuilt per prefill item).
    q_desc = tma.make_tensor_descriptor(Q, [total_q_rows, Q_STRIDE], [Q_STRIDE, 1], [ROWS, HEAD_DIM], q_lay)
    qd_desc = tma.make_tensor_descriptor(Qd, [total_qd_rows, HEAD_DIM], [HEAD_DIM, 1], [ROWS, HEAD_DIM], q_lay)
    k_full = tma.make_tensor_descriptor(K, [total_kv_rows, KV_STRIDE], [KV_STRIDE, 1], [COPY_ROWS, HEAD_DIM], lay)
    v_full = tma.make_tensor_descriptor(V, [total_kv_rows, KV_STRIDE], [KV_STRIDE, 1], [COPY_ROWS, HEAD_DIM], lay)
    kd = tma.make_tensor_descriptor(K, [total_kv_rows, KV_STRIDE], [KV_STRIDE, 1], [D_COPY_ROWS, HEAD_DIM], d_lay)
    vd = tma.make_tensor_descriptor(V, [total_kv_rows, KV_STRIDE], [KV_STRIDE, 1], [D_COPY_ROWS, HEAD_DIM], d_lay)
    j0 = gl.load(cta_ptr + cta)
    j1 = gl.load(cta_ptr + cta + 1)
    it = j0 * 0                                          # ring slots used so far
    v_par = j0 * 0                                       # bit s: parity of decode stages slot s has held
    v_last = j0 * 0                                      # bit s: slot s last held a decode stage
    n = j0 * 0                                           # items so far: the Q handshake's phase
    live = j0 * 0 + 3                                    # DYNAMIC: both queues may hold items (_claim_item)
    if DYNAMIC:
        item = j0                                        # the first item (cta_ptr[cta]), or CLAIM
    else:
        item = j0 * 0                                    # (not END: the loop takes its first item at the top)
    while item != END:
        if DYNAMIC:
            if item == CLAIM:
                item, live = _claim_item(cta_items, queue, cta, dec_ctas, live)
        else:
            item = _list_item(cta_items, j0, j1, n)
        # DYNAMIC: each branch posts its item itself (END included: the consumers stop); one post above the
        # branches keeps more of the loop's state live across it: 64 B of producer spills instead of 44.
        if item == END:
            if DYNAMIC:
                _post_item(item_smem, item_ready, item, n)
        elif item >= 0:
            if DYNAMIC:
                _post_item(item_smem, item_ready, item, n)
            chunk, head, m0, q_start, chunk_len, kv_len, kv_start, q_pos0, n_tiles = _prefill_tile_info(
                item, work_units, q_indptr, kv_lens, kv_indptr, num_q_heads, BLOCK_M, BLOCK_N, PAGED)
            tail_rows, last_idx = _tail_rows(block_table, chunk, kv_start, kv_len, stride_bt, PAGE_SIZE, PAGED)
            kv_col = (head // GROUP) * HEAD_DIM
            if PREFILL_L2 == 1:                          # re-read by every query tile of the kv head: keep in L2
                kv_col = l2_tag_evict_last(kv_col)
            if TAIL_MASK:
                k_tail = k_full
                v_tail = v_full
            else:
                # Drain the ring before rewriting the tail descriptors: no copy in flight reads them. A slot
                # a decode stage used last is free once its V half is released too (empty_v, v_last).
                for jj in gl.static_range(STAGES):
                    prev = it - STAGES + jj
                    sp = (prev + STAGES) % STAGES
                    mbarrier.wait(empty.index(sp), (prev // STAGES) & 1, pred=prev >= 0)
                    mbarrier.wait(empty_v.index(sp), ((v_par >> sp) & 1) ^ 1, pred=((v_last >> sp) & 1) == 1)
                k_tail = tma.make_tensor_descriptor(K, [tail_rows, KV_STRIDE], [KV_STRIDE, 1], [COPY_ROWS, HEAD_DIM], lay)
                v_tail = tma.make_tensor_descriptor(V, [tail_rows, KV_STRIDE], [KV_STRIDE, 1], [COPY_ROWS, HEAD_DIM], lay)
            if not OVERLAP:
                _load_q_prefill(q_desc, q_smem, q_ready, q_empty, n, q_start + m0, head * HEAD_DIM, ROWS,
                                BLOCK_M * HEAD_DIM * ELT)
            for t in range(n_tiles):
                s = it % STAGES
                mbarrier.wait(empty.index(s), ((it // STAGES) & 1) ^ 1)
                # A slot a decode stage used last: its V half too (in "desc" the drain above waited for it)
                mbarrier.wait(empty_v.index(s), ((v_par >> s) & 1) ^ 1, pred=((v_last >> s) & 1) == 1)
                v_last = v_last & ~(1 << s)
                mbarrier.expect(ready_k.index(s), BLOCK_N * HEAD_DIM * ELT)
                mbarrier.expect(ready_v.index(s), BLOCK_N * HEAD_DIM * ELT)
                _issue_kv_tile(k_full, v_full, k_tail, v_tail, block_table, chunk, kv_start, t, last_idx, stride_bt,
                               k_smem.index(s), v_smem.index(s), ready_k.index(s), ready_v.index(s),
                               kv_col, BLOCK_N, COPY_ROWS, PAGE_SIZE, PAGED)
                it += 1
                if OVERLAP:
                    if t + 1 == gl.minimum(n_tiles, STAGES - 1):
                        _load_q_prefill(q_desc, q_smem, q_ready, q_empty, n, q_start + m0, head * HEAD_DIM,
                                        ROWS, BLOCK_M * HEAD_DIM * ELT)
        else:
            if DYNAMIC:
                _post_item(item_smem, item_ready, item, n)
            pair = -item - 1
            seq_a, req_a, g_a, ks_a, nk_a, pr_a, n_a = _decode_info(dec_items, pair, 0, HALF_N)
            seq_b, req_b, g_b, ks_b, nk_b, pr_b, n_b = _decode_info(dec_items, pair, 1, HALF_N)
            len_a = gl.load(kv_lens + gl.maximum(seq_a, 0))
            len_b = gl.load(kv_lens + gl.maximum(seq_b, 0))
            st_a = gl.load(kv_indptr + gl.maximum(seq_a, 0))  # contiguous: the sequence's first cache row
            st_b = gl.load(kv_indptr + gl.maximum(seq_b, 0))
            _, last_a = _tail_rows(block_table, gl.maximum(seq_a, 0), st_a, len_a, stride_bt, PAGE_SIZE, PAGED)
            _, last_b = _tail_rows(block_table, gl.maximum(seq_b, 0), st_b, len_b, stride_bt, PAGE_SIZE, PAGED)
            qrow_a = req_a * (GROUP * NUM_KV_HEADS) + g_a * GROUP
            qrow_b = req_b * (GROUP * NUM_KV_HEADS) + g_b * GROUP
            n_st = gl.maximum(n_a, n_b)
            col_a = g_a * HEAD_DIM                       # the items' kv-head columns of K / V
            col_b = g_b * HEAD_DIM
            if DECODE_L2 == 1:                           # read once: evict-first in L2 (pod.kernels.ptx_hints)
                col_a = l2_tag_evict_first(col_a)
                col_b = l2_tag_evict_first(col_b)
            if not OVERLAP:
                _load_q_decode(qd_desc, q_smem, q_ready, q_empty, n, qrow_a, qrow_b, seq_b, ROWS * HEAD_DIM * ELT)
            # Half-tile t of an item = keys ks + 64t ...: tile index (ks / 64) + t of its sequence. The block
            # table is read a stage ahead, so its latency hides behind this stage's wait and copies.
            rows_next, ci = _pair_rows(block_table, seq_a, seq_b, st_a, st_b, ks_a // HALF_N, ks_b // HALF_N,
                                       last_a, last_b, stride_bt, NCOPY, D_COPY_ROWS, PAGE_SIZE, PAGED, HALF_N)
            for t in range(n_st):
                rows = rows_next
                rows_next, ci = _pair_rows(block_table, seq_a, seq_b, st_a, st_b, ks_a // HALF_N + t + 1,
                                           ks_b // HALF_N + t + 1, last_a, last_b, stride_bt, NCOPY, D_COPY_ROWS,
                                           PAGE_SIZE, PAGED, HALF_N)
                s = it % STAGES
                both = t < gl.minimum(n_a, n_b)          # else exactly one half lands (t < max(n_a, n_b))
                single = t >= gl.minimum(n_a, n_b)
                # A decode stage's K and V are released apart (K once S^T is computed): refill each alone.
                mbarrier.wait(empty.index(s), ((it // STAGES) & 1) ^ 1)
                _issue_pair_half(kd, ready_k.index(s), k_smem.index(s), rows, ci, single, both, t < n_a, t < n_b,
                                 col_a, col_b, NCOPY, D_COPY_ROWS, HALF_N, BLOCK_N, HEAD_DIM, ELT)
                mbarrier.wait(empty_v.index(s), ((v_par >> s) & 1) ^ 1, pred=((v_last >> s) & 1) == 1)
                v_par = v_par ^ (1 << s)
                v_last = v_last | (1 << s)
                _issue_pair_half(vd, ready_v.index(s), v_smem.index(s), rows, ci, single, both, t < n_a, t < n_b,
                                 col_a, col_b, NCOPY, D_COPY_ROWS, HALF_N, BLOCK_N, HEAD_DIM, ELT)
                it += 1
                if OVERLAP:
                    if t + 1 == gl.minimum(n_st, STAGES - 1):
                        _load_q_decode(qd_desc, q_smem, q_ready, q_empty, n, qrow_a, qrow_b, seq_b,
                                       ROWS * HEAD_DIM * ELT)
            if OVERLAP:
                if n_st == 0:                            # no stage at all (never planned): Q still lands
                    _load_q_decode(qd_desc, q_smem, q_ready, q_empty, n, qrow_a, qrow_b, seq_b,
                                   ROWS * HEAD_DIM * ELT)
        if item != END:
            n += 1
            if DYNAMIC:
                item = CLAIM
    if DYNAMIC:
        # The last CTA out zeroes the cursors for the next launch: every CTA counted here has made its last
        # claim (its acq_rel add orders them before; no memset launch; graphs replay).
        if gl.atomic_add(queue + 2, 1) == gl.num_programs(0) - 1:
            gl.store(queue, 0)
            gl.store(queue + 1, 0)
            gl.store(queue + 2, 0)


@gluon.jit
def _xchg_softmax(st, red, m_i, l_part, qk_scale, HALF_N: gl.constexpr, DEC_N: gl.constexpr,
                  col_layout: gl.constexpr):
    """One stage's online softmax down S^T's columns (decode_xchg): row w of the [4, 16, DEC_N] view is warp
    w's keys, so its maxima need shuffles only; the 4 warp maxima meet in `red` behind one barrier; the sums
    stay per thread (l_part). Returns (P, alpha, l_part, m_i) in the exp2 domain."""
    _xchg_publish(st, red, HALF_N, DEC_N)
    gl.thread_barrier()
    return _xchg_finish(st, red, m_i, l_part, qk_scale, DEC_N, col_layout)


@gluon.jit
def _xchg_publish(st, red, HALF_N: gl.constexpr, DEC_N: gl.constexpr):
    """This warp's maxima of S^T's columns over its 16 keys (shuffles only) into its row of `red`."""
    red.reshape([4, DEC_N]).store(gl.max(gl.reshape(st, [4, HALF_N // 4, DEC_N]), 1))


@gluon.jit
def _xchg_col_max(red, DEC_N: gl.constexpr, col_layout: gl.constexpr):
    """The column maxima of S^T: the largest of the 4 warps' rows of `red` (after the barrier that follows
    every warp's _xchg_publish)."""
    return gl.maximum(
        gl.maximum(red.slice(0, DEC_N).load(col_layout), red.slice(DEC_N, DEC_N).load(col_layout)),
        gl.maximum(red.slice(2 * DEC_N, DEC_N).load(col_layout), red.slice(3 * DEC_N, DEC_N).load(col_layout)))


@gluon.jit
def _xchg_finish(st, red, m_i, l_part, qk_scale, DEC_N: gl.constexpr, col_layout: gl.constexpr):
    """After the barrier that follows every warp's _xchg_publish: the column maxima, P, alpha, sums."""
    m_new = gl.maximum(m_i, _xchg_col_max(red, DEC_N, col_layout) * qk_scale)
    p = gl.exp2(st * qk_scale - gl.expand_dims(m_new, 0))
    alpha = gl.exp2(m_i - m_new)
    return p, alpha, l_part * gl.expand_dims(alpha, 0) + p, m_new


@gluon.jit
def _decode_rows(q_smem, k_smem, v_smem, red, ready_k, ready_v, empty, empty_v, it, n_half, n_keys, qk_scale,
                 HALF: gl.constexpr, HEAD_DIM: gl.constexpr, HALF_N: gl.constexpr, STAGES: gl.constexpr,
                 DEC_N: gl.constexpr, SKIP: gl.constexpr, XCHG: gl.constexpr, EARLY_K: gl.constexpr,
                 LOOP: gl.constexpr = 0):
    """One decode item on this consumer's half of n_half stages (ring slots it, it+1, ...), swap-AB: the
    item's q heads are the wgmma's N (DEC_N = 16 or 32 columns), its 64 keys and D its M, so a GQA group
    of 4 costs 16 columns of tensor-core work instead of 64 padded rows:
        S^T = K Q^T            [64 keys, DEC_N]   A = K half (smem), B = Q^T (this consumer's Q buffer)
        softmax down each column (per q head, over keys; exp2 domain)
        O^T += V^T P^T         [D, DEC_N]         A = V half^T (smem), B = P^T (staged in spare Q rows)
    Keys past n_keys (the last half-tile only) get -inf scores and zeroed V rows. Releases each stage's K
    half once S^T is computed (`empty`; EARLY_K, else with V) and its V half after O^T (`empty_v`): the
    producer refills K while this consumer is still on the softmax. Returns O^T (un-normalised), and the per-head sums and maxima.

    The keys (S^T's rows) lie across the warpgroup's 4 warps, 16 each, so a column maximum crosses warps.
    XCHG: each warp reduces its 16 keys with shuffles and the 4 warp maxima meet in `red` (4 x DEC_N fp32)
    behind one barrier; the sums stay per thread ([64, DEC_N] partials, rescaled like O) and are reduced
    once after the last stage. That leaves two barriers a stage (this one and P^T's); gl.max / gl.sum down
    the columns (XCHG off) cost ~9, and half of a decode SM's time (docs/hopper_pod.md).
    SKIP (diagnostics only, wrong output; 0 ships): a bit mask of links of the chain left out, to time each
    by difference - 1 the softmax's reductions / exchange, 2 the P^T store + fence + barrier, 4 the O^T
    wgmma, 8 the S^T wgmma.
    LOOP (PodSm90Config.decode_loop): 0 this loop, 1 _decode_rows_pipelined, 2 _decode_rows_lagged,
    3 _decode_rows_lazy."""
    dtype: gl.constexpr = q_smem.dtype
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, DEC_N, 16])
    col_layout: gl.constexpr = gl.SliceLayout(0, s_layout)
    z_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
    q_t = q_smem.slice(0, DEC_N).permute((1, 0))                  # B of S^T: [D, DEC_N]
    p_buf = q_smem.slice(DEC_N, DEC_N).slice(0, HALF_N, dim=1)    # P [DEC_N, 64] in Q rows no head uses
    keys = gl.arange(0, HALF_N, layout=gl.SliceLayout(1, s_layout))
    v_rows = gl.arange(0, HALF_N, layout=gl.SliceLayout(1, z_layout))
    zero_s = gl.zeros([HALF_N, DEC_N], gl.float32, s_layout)
    m_i = gl.full([DEC_N], -float("inf"), gl.float32, col_layout)
    l_i = gl.zeros([DEC_N], gl.float32, col_layout)
    l_part = gl.zeros([HALF_N, DEC_N], gl.float32, s_layout)     # XCHG: per-thread partial sums
    acc = gl.zeros([HEAD_DIM, DEC_N], gl.float32, s_layout)
    if LOOP == 1:
        return _decode_rows_pipelined(q_t, p_buf, k_smem, v_smem, red, ready_k, ready_v, empty, empty_v, it, n_half,
                                      n_keys, qk_scale, keys, v_rows, zero_s, m_i, l_part, acc, HALF, HALF_N,
                                      STAGES, DEC_N, EARLY_K, s_layout, col_layout, z_layout)
    if LOOP == 2:
        return _decode_rows_lagged(q_t, p_buf, k_smem, v_smem, red, ready_k, ready_v, empty, empty_v, it, n_half,
                                   n_keys, qk_scale, keys, v_rows, zero_s, m_i, l_part, acc, HALF, HALF_N, STAGES,
                                   DEC_N, col_layout, z_layout)
    if LOOP == 3:
        return _decode_rows_lazy(q_t, p_buf, k_smem, v_smem, red, ready_k, ready_v, empty, empty_v, it, n_half,
                                 n_keys, qk_scale, keys, v_rows, zero_s, m_i, l_part, acc, HALF, HALF_N, STAGES,
                                 DEC_N, col_layout, z_layout)
    for t in range(n_half):
        slot = it + t
        s = slot % STAGES
        ph = (slot // STAGES) & 1
        valid = n_keys - t * HALF_N                      # keys of this half-tile that belong to the item
        mbarrier.wait(ready_k.index(s), ph)
        k_half = k_smem.index(s).slice(HALF * HALF_N, HALF_N)
        if (SKIP & 8) == 0:
            st = warpgroup_mma(k_half, q_t, zero_s, use_acc=False)
        else:
            st = zero_s
        if EARLY_K:
            mbarrier.arrive(empty.index(s), count=1)     # K read (the wgmma has completed)
        if valid < HALF_N:
            st = gl.where(gl.expand_dims(keys < valid, 1), st, -float("inf"))
        if (SKIP & 1) != 0:
            p = gl.exp2(st * qk_scale)
            alpha = gl.full([DEC_N], 1.0, gl.float32, col_layout)
        elif XCHG:
            p, alpha, l_part, m_i = _xchg_softmax(st, red, m_i, l_part, qk_scale, HALF_N, DEC_N, col_layout)
        else:
            m_new = gl.maximum(m_i, gl.max(st, 0) * qk_scale)
            p = gl.exp2(st * qk_scale - gl.expand_dims(m_new, 0))
            alpha = gl.exp2(m_i - m_new)
            l_i = l_i * alpha + gl.sum(p, 0)
            m_i = m_new
        if (SKIP & 2) == 0:
            p_buf.store(gl.permute(p.to(dtype), (1, 0)))
        mbarrier.wait(ready_v.index(s), ph)
        v_half = v_smem.index(s).slice(HALF * HALF_N, HALF_N)
        if valid < HALF_N:
            # This consumer is the half's only reader, and the producer refills it only after the release below.
            _zero_rows_from(v_half, v_rows, valid, z_layout)
        if (SKIP & 2) == 0:
            # P (and zeroed V rows) before the tensor cores read them; also every warp's reads of `red`
            # before the next stage overwrites it.
            fence_async_shared()
            gl.thread_barrier()
        if (SKIP & 4) == 0:
            acc = warpgroup_mma(v_half.permute((1, 0)), p_buf.permute((1, 0)), acc * gl.expand_dims(alpha, 0))
        else:
            acc = acc * gl.expand_dims(alpha, 0)
        if not EARLY_K:
            mbarrier.arrive(empty.index(s), count=1)
        mbarrier.arrive(empty_v.index(s), count=1)
    if XCHG:
        l_i = gl.sum(l_part, 0)
    return acc, l_i, m_i


@gluon.jit
def _decode_rows_pipelined(q_t, p_buf, k_smem, v_smem, red, ready_k, ready_v, empty, empty_v, it, n_half, n_keys,
                           qk_scale, keys, v_rows, zero_s, m_i, l_part, acc, HALF: gl.constexpr,
                           HALF_N: gl.constexpr, STAGES: gl.constexpr, DEC_N: gl.constexpr, EARLY_K: gl.constexpr,
                           s_layout: gl.constexpr, col_layout: gl.constexpr, z_layout: gl.constexpr):
    """_decode_rows (XCHG softmax) with its two wgmmas in flight together: stage t issues O^T_t and, its K
    half landed, S^T_{t+1} right behind it, then waits for O^T_t (wgmma groups retire in order), releases
    stage t and waits for S^T_{t+1}: one wgmma round trip a stage instead of two. P^T_t is read by O^T_t
    only, which has retired before the next stage stores P^T_{t+1}."""
    dtype: gl.constexpr = p_buf.dtype
    s0 = it % STAGES
    mbarrier.wait(ready_k.index(s0), (it // STAGES) & 1)
    st = warpgroup_mma(k_smem.index(s0).slice(HALF * HALF_N, HALF_N), q_t, zero_s, use_acc=False)
    for t in range(n_half):
        slot = it + t
        s = slot % STAGES
        ph = (slot // STAGES) & 1
        valid = n_keys - t * HALF_N
        if EARLY_K:
            mbarrier.arrive(empty.index(s), count=1)     # K read (S^T_t has retired)
        if valid < HALF_N:
            st = gl.where(gl.expand_dims(keys < valid, 1), st, -float("inf"))
        p, alpha, l_part, m_i = _xchg_softmax(st, red, m_i, l_part, qk_scale, HALF_N, DEC_N, col_layout)
        p_buf.store(gl.permute(p.to(dtype), (1, 0)))
        mbarrier.wait(ready_v.index(s), ph)
        v_half = v_smem.index(s).slice(HALF * HALF_N, HALF_N)
        if valid < HALF_N:
            _zero_rows_from(v_half, v_rows, valid, z_layout)
        fence_async_shared()                             # P^T (and zeroed V rows) before the tensor cores;
        gl.thread_barrier()                              # every warp's reads of `red` before it is rewritten
        o_tok = warpgroup_mma(v_half.permute((1, 0)), p_buf.permute((1, 0)), acc * gl.expand_dims(alpha, 0),
                              is_async=True)
        if t + 1 < n_half:
            sn = (slot + 1) % STAGES
            mbarrier.wait(ready_k.index(sn), ((slot + 1) // STAGES) & 1)
            s_tok = warpgroup_mma(k_smem.index(sn).slice(HALF * HALF_N, HALF_N), q_t, zero_s, use_acc=False,
                                  is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=1, deps=(o_tok, ))
            if not EARLY_K:
                mbarrier.arrive(empty.index(s), count=1)
            mbarrier.arrive(empty_v.index(s), count=1)
            st = warpgroup_mma_wait(num_outstanding=0, deps=(s_tok, ))
        else:
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(o_tok, ))
            if not EARLY_K:
                mbarrier.arrive(empty.index(s), count=1)
            mbarrier.arrive(empty_v.index(s), count=1)
    return acc, gl.sum(l_part, 0), m_i


@gluon.jit
def _lag_stage(k_smem, q_t, red, ready_k, empty, slot, valid, keys, zero_s, HALF: gl.constexpr,
               HALF_N: gl.constexpr, STAGES: gl.constexpr, DEC_N: gl.constexpr):
    """The first half of a lagged stage (_decode_rows_lagged): S^T once its K half has landed, the masked
    scores, this warp's maxima published, the one barrier, the K half released. Returns S^T."""
    s = slot % STAGES
    mbarrier.wait(ready_k.index(s), (slot // STAGES) & 1)
    st = warpgroup_mma(k_smem.index(s).slice(HALF * HALF_N, HALF_N), q_t, zero_s, use_acc=False)
    if valid < HALF_N:
        st = gl.where(gl.expand_dims(keys < valid, 1), st, -float("inf"))
    _xchg_publish(st, red, HALF_N, DEC_N)
    # The stage's one barrier: every warp's maxima are in `red`, every warp's S^T has completed (the K half
    # may go), and every warp's P^T of the previous stage is stored and fenced (its O^T may be issued).
    gl.thread_barrier()
    mbarrier.arrive(empty.index(s), count=1)
    return st


@gluon.jit
def _lag_store_p(p, p_buf, v_smem, ready_v, slot, valid, v_rows, HALF: gl.constexpr, HALF_N: gl.constexpr,
                 STAGES: gl.constexpr, z_layout: gl.constexpr):
    """The end of a lagged stage: P^T into p_buf (the previous O^T has retired in every warp), the V half's
    stale rows zeroed once it has landed, and a proxy fence; the next stage's barrier publishes both."""
    p_buf.store(gl.permute(p.to(p_buf.dtype), (1, 0)))
    s = slot % STAGES
    mbarrier.wait(ready_v.index(s), (slot // STAGES) & 1)
    if valid < HALF_N:
        _zero_rows_from(v_smem.index(s).slice(HALF * HALF_N, HALF_N), v_rows, valid, z_layout)
    fence_async_shared()


@gluon.jit
def _decode_rows_lagged(q_t, p_buf, k_smem, v_smem, red, ready_k, ready_v, empty, empty_v, it, n_half, n_keys,
                        qk_scale, keys, v_rows, zero_s, m_i, l_part, acc, HALF: gl.constexpr,
                        HALF_N: gl.constexpr, STAGES: gl.constexpr, DEC_N: gl.constexpr,
                        col_layout: gl.constexpr, z_layout: gl.constexpr):
    """_decode_rows (XCHG softmax, K released early) with O^T one stage behind: stage t's exchange barrier
    also publishes P^T_{t-1}, so O^T_{t-1} is issued right after it and runs on the tensor cores while this
    warpgroup computes stage t's softmax; it retires (the V half of t-1 is released, p_buf is free) before
    P^T_t is stored. Two barriers a stage written here; Triton adds one after each mbarrier.arrive and one
    before the S^T wgmma (P^T shares Q's allocation): five in the PTX against the plain loop's six. O^T of the
    last stage runs after the loop. n_half >= 1. Measured slower (docs/hopper_pod.md, session 5)."""
    st = _lag_stage(k_smem, q_t, red, ready_k, empty, it, n_keys, keys, zero_s, HALF, HALF_N, STAGES, DEC_N)
    p, alpha, l_part, m_i = _xchg_finish(st, red, m_i, l_part, qk_scale, DEC_N, col_layout)
    _lag_store_p(p, p_buf, v_smem, ready_v, it, n_keys, v_rows, HALF, HALF_N, STAGES, z_layout)
    for t in range(1, n_half):
        slot = it + t
        valid = n_keys - t * HALF_N
        st = _lag_stage(k_smem, q_t, red, ready_k, empty, slot, valid, keys, zero_s, HALF, HALF_N, STAGES, DEC_N)
        sp = (slot - 1) % STAGES
        o_tok = warpgroup_mma(v_smem.index(sp).slice(HALF * HALF_N, HALF_N).permute((1, 0)), p_buf.permute((1, 0)),
                              acc * gl.expand_dims(alpha, 0), is_async=True)
        p, alpha, l_part, m_i = _xchg_finish(st, red, m_i, l_part, qk_scale, DEC_N, col_layout)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(o_tok, ))
        gl.thread_barrier()                              # every warp's O^T_{t-1} retired, its `red` reads done
        mbarrier.arrive(empty_v.index(sp), count=1)
        _lag_store_p(p, p_buf, v_smem, ready_v, slot, valid, v_rows, HALF, HALF_N, STAGES, z_layout)
    gl.thread_barrier()                                  # the last P^T (and zeroed V rows) from every warp
    sl = (it + n_half - 1) % STAGES
    acc = warpgroup_mma(v_smem.index(sl).slice(HALF * HALF_N, HALF_N).permute((1, 0)), p_buf.permute((1, 0)),
                        acc * gl.expand_dims(alpha, 0))
    gl.thread_barrier()
    mbarrier.arrive(empty_v.index(sl), count=1)
    return acc, gl.sum(l_part, 0), m_i


@gluon.jit
def _release(bar):
    """Arrive once on a ring slot's `empty` barrier for this warpgroup, without the warpgroup barrier that
    Triton 3.6's shared-memory analysis puts before every mbarrier.arrive (it takes an arrive to touch all
    of shared memory). An expect of 0 bytes is the same thread-0 arrive (mbarrier.arrive.expect_tx, tx 0)
    without that. Sound only where the slot was read by wgmmas alone and every one has completed (a
    wgmma is one warpgroup-wide operation: one warp's wait sees all of it done), which is how CUTLASS's
    consumer_release and FA3 release a stage: one thread, right after the warpgroup wait."""
    mbarrier.expect(bar, 0)


# A column's running maximum may trail its true maximum by this much (log2 units) before the lazy loop
# rescales: P <= 2^8 in bf16 and fp32 sums, far from overflow, and bf16's relative precision is scale-free.
LAZY_RESCALE_LOG2 = gl.constexpr(8.0)


@gluon.jit
def _decode_rows_lazy(q_t, p_buf, k_smem, v_smem, red, ready_k, ready_v, empty, empty_v, it, n_half, n_keys,
                      qk_scale, keys, v_rows, zero_s, m_i, l_part, acc, HALF: gl.constexpr,
                      HALF_N: gl.constexpr, STAGES: gl.constexpr, DEC_N: gl.constexpr,
                      col_layout: gl.constexpr, z_layout: gl.constexpr):
    """_decode_rows (XCHG, K released early) with the softmax rescaled lazily, so a stage waits at one
    barrier instead of two: P = exp2(S^T - m) is computed with the running maxima m before this stage's
    column maxima are known, and the warp maxima travel in `red` behind the barrier that publishes P^T
    anyway. After it every warp reads the same four maxima, so all take the same branch: where no column's
    maximum passed m + LAZY_RESCALE_LOG2 (every stage but an item's first, mostly) P stands and neither O^T
    nor the sums are rescaled; else m moves to the true maxima, O^T and the sums are rescaled, P is
    recomputed and published again (a second barrier). Exact: O^T and the sums carry one scale, exp2(-m),
    whatever m is, and P <= 2^LAZY_RESCALE_LOG2 (FA4's lazy rescaling, with the threshold checked here
    rather than assumed). The first stage of an item always takes the second branch (m = -inf).
    The K and V halves are released through _release (no barrier: only wgmmas that have completed read them),
    and P^T is stored before the maxima so one barrier orders both stores after the last stage's reads (the
    shared-memory analysis tracks whole allocations): two barriers a stage in the PTX, against six."""
    dtype: gl.constexpr = p_buf.dtype
    for t in range(n_half):
        slot = it + t
        s = slot % STAGES
        ph = (slot // STAGES) & 1
        valid = n_keys - t * HALF_N
        mbarrier.wait(ready_k.index(s), ph)
        st = warpgroup_mma(k_smem.index(s).slice(HALF * HALF_N, HALF_N), q_t, zero_s, use_acc=False)
        _release(empty.index(s))                         # K read (the wgmma has completed)
        if valid < HALF_N:
            st = gl.where(gl.expand_dims(keys < valid, 1), st, -float("inf"))
        st = st * qk_scale                               # exp2 domain (qk_scale > 0: maxima commute)
        p = gl.exp2(st - gl.expand_dims(m_i, 0))
        p_buf.store(gl.permute(p.to(dtype), (1, 0)))
        _xchg_publish(st, red, HALF_N, DEC_N)
        mbarrier.wait(ready_v.index(s), ph)
        v_half = v_smem.index(s).slice(HALF * HALF_N, HALF_N)
        if valid < HALF_N:
            _zero_rows_from(v_half, v_rows, valid, z_layout)
        fence_async_shared()                             # P^T and zeroed V rows before the tensor cores,
        gl.thread_barrier()                              # every warp's maxima before the reads below
        col_max = _xchg_col_max(red, DEC_N, col_layout)
        if gl.max(col_max - m_i, 0) > LAZY_RESCALE_LOG2:
            m_new = gl.maximum(m_i, col_max)
            alpha = gl.expand_dims(gl.exp2(m_i - m_new), 0)
            acc = acc * alpha
            l_part = l_part * alpha
            m_i = m_new
            p = gl.exp2(st - gl.expand_dims(m_i, 0))
            p_buf.store(gl.permute(p.to(dtype), (1, 0)))
            fence_async_shared()
            gl.thread_barrier()
        l_part = l_part + p
        acc = warpgroup_mma(v_half.permute((1, 0)), p_buf.permute((1, 0)), acc)
        _release(empty_v.index(s))
    return acc, gl.sum(l_part, 0), m_i


@gluon.jit
def _skip_stages(ready_k, ready_v, empty, empty_v, it, n, STAGES: gl.constexpr):
    """Release n ring slots this consumer does not read (its pair partner's longer item): wait until each
    has landed first, so a release never runs a ring round ahead of the other consumer's."""
    for t in range(n):
        slot = it + t
        mbarrier.wait(ready_k.index(slot % STAGES), (slot // STAGES) & 1)
        mbarrier.wait(ready_v.index(slot % STAGES), (slot // STAGES) & 1)
        mbarrier.arrive(empty.index(slot % STAGES), count=1)
        mbarrier.arrive(empty_v.index(slot % STAGES), count=1)


@gluon.jit
def _consumer(O, Od, PartO, PartLse, q_smem, k_smem, v_smem, red, q_ready, q_empty, ready_k, ready_v, empty, empty_v,
              vz, item_smem, item_ready, q_indptr, kv_lens, kv_indptr, work_units, dec_items, cta_ptr, cta_items, cta, trace, num_q_heads,
              qk_scale, HALF: gl.constexpr, GROUP: gl.constexpr, HEAD_DIM: gl.constexpr, NUM_KV_HEADS: gl.constexpr,
              BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, PAGED: gl.constexpr, STAGES: gl.constexpr,
              TRACE: gl.constexpr, DECODE_SKIP: gl.constexpr, DECODE_XCHG: gl.constexpr,
              DECODE_EARLY_K: gl.constexpr, TAIL_MASK: gl.constexpr, OVERLAP: gl.constexpr,
              DECODE_LOOP: gl.constexpr, DYNAMIC: gl.constexpr):
    """Consumer HALF (0/1): rows HALF*64.. of every prefill tile, item HALF of every decode pair.
    TAIL_MASK: on a prefill item's last KV tile, V rows past kv_len (stale page slots: a NaN there would
    reach P V as 0 * NaN) are zeroed, each consumer its 64 rows, both before either's P V (`vz`).
    OVERLAP: a prefill item frees its Q buffer once its last S = Q K^T is done (before the last P V and the
    epilogue), and writes O from registers, so the next item's Q and first stages land meanwhile.
    DYNAMIC: each item as the producer claimed and posted it (_take_item), until END; else the planned list."""
    ROWS: gl.constexpr = BLOCK_M // 2
    HALF_N: gl.constexpr = BLOCK_N // 2
    Q_STRIDE: gl.constexpr = GROUP * NUM_KV_HEADS * HEAD_DIM
    my_q = q_smem.index(HALF)
    dtype: gl.constexpr = my_q.dtype
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
    DEC_N: gl.constexpr = 16 if GROUP <= 16 else 32
    d_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, DEC_N, 16])
    st_layout: gl.constexpr = gl.BlockedLayout([1, 8], [8, 4], [4, 1], [1, 0])
    st_rows = gl.arange(0, ROWS, layout=gl.SliceLayout(1, st_layout))
    st_cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, st_layout))
    o_rows = gl.arange(0, ROWS, layout=gl.SliceLayout(1, o_layout))         # prefill O (OVERLAP's stores)
    o_cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
    d_rows = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(1, d_layout))     # decode O^T: rows = d
    d_cols = gl.arange(0, DEC_N, layout=gl.SliceLayout(0, d_layout))        #             columns = q heads
    j0 = gl.load(cta_ptr + cta)
    j1 = gl.load(cta_ptr + cta + 1)
    if TRACE:
        t_start = _globaltimer(cta)
    it = j0 * 0
    n_pre = j0 * 0
    n_tail = j0 * 0                                      # prefill items with stale V rows so far: vz's phase
    z_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
    z_rows = HALF * ROWS + gl.arange(0, ROWS, layout=gl.SliceLayout(1, z_layout))
    n = j0 * 0                                           # items so far: the Q handshake's phase
    item = j0 * 0                                        # (not END: the loop takes its first item at the top)
    while item != END:
        if DYNAMIC:
            item = _take_item(item_smem, item_ready, n)
        else:
            item = _list_item(cta_items, j0, j1, n)
        if TRACE > 6:
            t_item = _globaltimer(cta)
        if item == END:
            pass
        elif item >= 0:
            chunk, head, m0, q_start, chunk_len, kv_len, kv_start, q_pos0, n_tiles = _prefill_tile_info(
                item, work_units, q_indptr, kv_lens, kv_indptr, num_q_heads, BLOCK_M, BLOCK_N, PAGED)
            row0 = q_pos0 + HALF * ROWS
            mbarrier.wait(q_ready, n & 1)
            if TAIL_MASK or OVERLAP:
                acc, l_i, m_i, pb = _attend_rows(my_q, k_smem, v_smem, ready_k, ready_v, empty, it, n_tiles,
                                                 gl.minimum(row0 + 1, kv_len) // BLOCK_N, row0, kv_len, qk_scale,
                                                 ROWS, HEAD_DIM, BLOCK_N, STAGES, 4, False)
                if OVERLAP:
                    # The last S = Q K^T has completed (_attend_rows waited on it): this item reads its Q no
                    # more, so the producer may load the next item's Q while this one runs its last P V.
                    gl.thread_barrier()
                    mbarrier.arrive(q_empty, count=1)
                sl = (it + n_tiles - 1) % STAGES
                mbarrier.wait(ready_v.index(sl), ((it + n_tiles - 1) // STAGES) & 1)
                if TAIL_MASK:
                    valid = kv_len - (n_tiles - 1) * BLOCK_N      # keys of the last tile before kv_len
                    if valid < BLOCK_N:
                        _zero_rows_from(v_smem.index(sl).slice(HALF * ROWS, ROWS), z_rows, valid, z_layout)
                        fence_async_shared()
                        gl.thread_barrier()              # every warp's zeros before the arrive
                        mbarrier.arrive(vz, count=1)
                        mbarrier.wait(vz, n_tail & 1)    # ... and the other consumer's
                        n_tail += 1
                acc = warpgroup_mma(pb, v_smem.index(sl), acc)
                mbarrier.arrive(empty.index(sl), count=1)
            else:
                acc, l_i, m_i, pb = _attend_rows(my_q, k_smem, v_smem, ready_k, ready_v, empty, it, n_tiles,
                                                 gl.minimum(row0 + 1, kv_len) // BLOCK_N, row0, kv_len, qk_scale,
                                                 ROWS, HEAD_DIM, BLOCK_N, STAGES, 4)
            acc = acc / gl.expand_dims(gl.convert_layout(l_i, gl.SliceLayout(1, o_layout)), 1)
            if OVERLAP:
                # O = acc / l straight from the wgmma layout (4-byte stores: the Q buffer holds the next Q).
                o_ptrs = O + gl.expand_dims((q_start + m0 + HALF * ROWS + o_rows).to(gl.int64) * Q_STRIDE, 1) \
                    + head * HEAD_DIM + gl.expand_dims(o_cols, 0)
                gl.store(o_ptrs, acc.to(dtype), mask=gl.expand_dims(m0 + HALF * ROWS + o_rows < chunk_len, 1))
            else:
                # O = acc / l through this Q half (its wgmmas are done) and masked 16-byte stores; then the
                # producer may load the next item's Q here.
                my_q.store(acc.to(dtype))
                o = my_q.load(st_layout)
                fence_async_shared()                     # the reads above come before the next TMA write
                mbarrier.arrive(q_empty, count=1)
                o_ptrs = O + gl.expand_dims((q_start + m0 + HALF * ROWS + st_rows).to(gl.int64) * Q_STRIDE, 1) \
                    + head * HEAD_DIM + gl.expand_dims(st_cols, 0)
                gl.store(o_ptrs, o, mask=gl.expand_dims(m0 + HALF * ROWS + st_rows < chunk_len, 1))
            it += n_tiles
            n_pre += 1
        else:
            pair = -item - 1
            seq, req, g, ks, n_keys, part_row, n_mine = _decode_info(dec_items, pair, HALF, HALF_N)
            _, _, _, _, _, _, n_other = _decode_info(dec_items, pair, 1 - HALF, HALF_N)
            mbarrier.wait(q_ready, n & 1)
            if DECODE_SKIP >= 16:
                # Diagnostics only (wrong decode output): stream the ring without computing on it, to split
                # a decode SM's time between the K/V stream and the consumers' work.
                mbarrier.arrive(q_empty, count=1)
                _skip_stages(ready_k, ready_v, empty, empty_v, it, gl.maximum(n_mine, n_other), STAGES)
            elif n_mine > 0:
                acc, l_i, m_i = _decode_rows(my_q, k_smem, v_smem, red, ready_k, ready_v, empty, empty_v, it,
                                             n_mine, n_keys, qk_scale, HALF, HEAD_DIM, HALF_N, STAGES, DEC_N,
                                             DECODE_SKIP, DECODE_XCHG, DECODE_EARLY_K, DECODE_LOOP)
                mbarrier.arrive(q_empty, count=1)
                _skip_stages(ready_k, ready_v, empty, empty_v, it + n_mine, gl.maximum(n_other - n_mine, 0), STAGES)
                # O^T [D, DEC_N] / l: column h is q head g*GROUP + h; columns >= GROUP are padding.
                out = acc / gl.expand_dims(l_i, 0)
                heads = g * GROUP + d_cols
                keep = gl.expand_dims(d_cols < GROUP, 0)
                if part_row < 0:
                    od_ptrs = Od + gl.expand_dims((req * (GROUP * NUM_KV_HEADS) + heads).to(gl.int64) * HEAD_DIM, 0) \
                        + gl.expand_dims(d_rows, 1)
                    gl.store(od_ptrs, out.to(dtype), mask=keep)
                else:
                    prow = part_row * (GROUP * NUM_KV_HEADS) + heads
                    po_ptrs = PartO + gl.expand_dims(prow.to(gl.int64) * HEAD_DIM, 0) + gl.expand_dims(d_rows, 1)
                    gl.store(po_ptrs, out, mask=keep)
                    gl.store(PartLse + prow, m_i + gl.log2(l_i), mask=d_cols < GROUP)
            else:
                mbarrier.arrive(q_empty, count=1)
                _skip_stages(ready_k, ready_v, empty, empty_v, it, n_other, STAGES)
            it += gl.maximum(n_mine, n_other)
        if TRACE > 6:                                    # (item, start ns, end ns) of the first items
            if HALF == 0:
                if (item != END) & (n < (TRACE - 6) // 3):
                    rec = trace + cta.to(gl.int64) * TRACE + 6 + 3 * n
                    gl.store(rec, item.to(gl.int64))
                    gl.store(rec + 1, t_item)
                    gl.store(rec + 2, _globaltimer(cta))
        if item != END:
            n += 1
    if TRACE:
        if HALF == 0:
            t_end = _globaltimer(cta)
            row = trace + cta.to(gl.int64) * TRACE
            gl.store(row, _smid(cta).to(gl.int64))
            gl.store(row + 1, t_start)
            gl.store(row + 2, t_end)
            gl.store(row + 3, n_pre.to(gl.int64))
            gl.store(row + 4, (n - n_pre).to(gl.int64))
            gl.store(row + 5, it.to(gl.int64))


# The batch's sizes are not specialised on (== 1, % 16): a serving engine's batches change them every
# iteration, and each new specialisation would be a multi-second compile inside a timed step.
@gluon.jit(do_not_specialize=["dec_ctas", "total_q_rows", "total_qd_rows", "total_kv_rows", "stride_bt"])
def pod_sm90_kernel(Q, Qd, K, V, O, Od, PartO, PartLse, q_indptr, kv_lens, kv_indptr, block_table, work_units,
                    dec_items, cta_ptr, cta_items, trace, sm_map, claim, queue, dec_ctas,
                    num_q_heads, total_q_rows, total_qd_rows, total_kv_rows, stride_bt, qk_scale,
                    GROUP: gl.constexpr, HEAD_DIM: gl.constexpr, NUM_KV_HEADS: gl.constexpr,
                    BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, PAGE_SIZE: gl.constexpr, PAGED: gl.constexpr,
                    STAGES: gl.constexpr, CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr,
                    TRACE: gl.constexpr, DECODE_SKIP: gl.constexpr, DECODE_XCHG: gl.constexpr,
                    DECODE_EARLY_K: gl.constexpr, BIND: gl.constexpr, TAIL_MASK: gl.constexpr,
                    OVERLAP: gl.constexpr, DECODE_LOOP: gl.constexpr, DECODE_L2: gl.constexpr,
                    PREFILL_L2: gl.constexpr, DYNAMIC: gl.constexpr):
    dtype: gl.constexpr = Q.dtype.element_ty
    if BIND:                                             # the list planned for this SM (_claim_list)
        cta = _claim_list(sm_map, claim, gl.num_programs(0))
    else:                                                # CTA i runs list i, wherever it landed
        cta = gl.program_id(0)
    ROWS: gl.constexpr = BLOCK_M // 2
    q_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([ROWS, HEAD_DIM], dtype)
    kv_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, HEAD_DIM], dtype)
    q_smem = gl.allocate_shared_memory(dtype, [2, ROWS, HEAD_DIM], q_layout)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], kv_layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], kv_layout)
    # Each decode consumer's warp maxima a stage (fp32 [4, DEC_N], one buffer a consumer; _decode_rows)
    red_layout: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0])
    red0 = gl.allocate_shared_memory(gl.float32, [4 * (16 if GROUP <= 16 else 32)], red_layout)
    red1 = gl.allocate_shared_memory(gl.float32, [4 * (16 if GROUP <= 16 else 32)], red_layout)
    ready_k = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    ready_v = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty_v = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    q_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    q_empty = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    vz = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())     # TAIL_MASK: V rows zeroed
    # DYNAMIC: items n and n + 1 as the producer claimed them (_post_item), each slot with its barrier
    item_smem = gl.allocate_shared_memory(gl.int32, [2, 1], red_layout)
    item_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready_k.index(i), count=1)
        mbarrier.init(ready_v.index(i), count=1)
        mbarrier.init(empty.index(i), count=2)           # both consumers release every stage (decode CTAs:
        mbarrier.init(empty_v.index(i), count=2)         # its K half here, its V half in empty_v)
    mbarrier.init(q_ready, count=1)
    mbarrier.init(q_empty, count=2)
    mbarrier.init(vz, count=2)
    for i in gl.static_range(2):
        mbarrier.init(item_ready.index(i), count=1)
    fence_async_shared()                                 # the inits are visible to the TMA engine
    gl.warp_specialize([
        (_consumer, (O, Od, PartO, PartLse, q_smem, k_smem, v_smem, red0, q_ready, q_empty, ready_k, ready_v,
                     empty, empty_v, vz, item_smem, item_ready, q_indptr, kv_lens, kv_indptr, work_units, dec_items, cta_ptr, cta_items, cta,
                     trace, num_q_heads, qk_scale, 0, GROUP, HEAD_DIM, NUM_KV_HEADS, BLOCK_M, BLOCK_N, PAGED, STAGES,
                     TRACE, DECODE_SKIP, DECODE_XCHG, DECODE_EARLY_K, TAIL_MASK, OVERLAP, DECODE_LOOP, DYNAMIC)),
        (_consumer, (O, Od, PartO, PartLse, q_smem, k_smem, v_smem, red1, q_ready, q_empty, ready_k, ready_v,
                     empty, empty_v, vz, item_smem, item_ready, q_indptr, kv_lens, kv_indptr, work_units, dec_items, cta_ptr, cta_items, cta,
                     trace, num_q_heads, qk_scale, 1, GROUP, HEAD_DIM, NUM_KV_HEADS, BLOCK_M, BLOCK_N, PAGED, STAGES,
                     TRACE, DECODE_SKIP, DECODE_XCHG, DECODE_EARLY_K, TAIL_MASK, OVERLAP, DECODE_LOOP, DYNAMIC)),
        (_producer, (Q, Qd, K, V, block_table, q_indptr, kv_lens, kv_indptr, work_units, dec_items, cta_ptr,
                     cta_items, cta, q_smem, k_smem, v_smem, q_ready, q_empty, ready_k, ready_v, empty, empty_v,
                     item_smem, item_ready, queue, dec_ctas, num_q_heads,
                     total_q_rows, total_qd_rows, total_kv_rows, stride_bt, GROUP, HEAD_DIM, NUM_KV_HEADS,
                     BLOCK_M, BLOCK_N, PAGE_SIZE, PAGED, STAGES, TAIL_MASK, OVERLAP, DECODE_L2, PREFILL_L2, DYNAMIC)),
    ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])


# ------------------------------------------------------------------------------------------------
# Host side: config, the static schedule, plan, launch
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PodSm90Config:
    """The kernel's tile (the Hopper prefill tile's default: 128x128, 3 stages, two consumers) and the cost
    model its planner splits the SMs by (per SM of an H200; docs/hopper_pod.md says where each comes from)."""
    block_n: int = 128
    stages: int = 3
    consumer_regs: int = 232
    producer_regs: int = 48
    prefill_tflops_per_sm: float = 4.3   # the prefill tile's rate on one SM (572 TFLOP/s / 132 SMs)
    decode_gbps_per_sm: float = 67.0     # a decode CTA's K/V stream: HBM (4.3 TB/s) from 64 SM-bound decode CTAs
                                         # (16-token pages; docs/hopper_pod.md)
    decode_gbps_per_sm_d64: float = 48.0 # the same at head_dim 64: a stage carries half the bytes for about the
                                         # same consumer work (H200, 64 x 8192: 48.4 on 64 CTAs, 51 on 16-32)
    hbm_gbps: float = 4300.0             # what all decode CTAs together can draw
    item_us: float = 2.0                 # fixed cost of an item: Q load, ring fill, epilogue
    item_us_hbm: float = 20.0            # more a prefill item costs beside decode CTAs that saturate HBM
                                         # (scaled by their share of it; docs/hopper_pod.md)
    min_split_keys: int = 512            # a split decode item has at least this many keys
    plateau_tol: float | None = 0.02     # decode CTAs past HBM saturation: the fewest within this fraction of
                                         # the balanced split's makespan (None: the balanced split; split_sms)
    decode_ctas: int | None = None       # force the decode CTA count (diagnostics); None: the model's
    num_ctas: int | None = None          # force the grid (diagnostics: per-SM rates); None: one CTA a SM
    decode_xchg: bool = True             # decode softmax: warp maxima through shared memory, sums per thread
                                         # (False: gl.max / gl.sum down the columns; _decode_rows)
    steal: str = "never"                 # decode CTAs take prefill tiles after their pairs: "auto" where the
                                         # cost model says it pays (not yet swept with a correct LPT; see
                                         # docs/hopper_pod.md), "always" (GPU checks), "never"
    decode_early_k: bool = True          # decode: release a stage's K half once S^T is computed (else with V)
    prefill_tail: str = "mask"           # a prefill item's stale last-page rows: "mask" (read whole pages, the
                                         # consumers zero stale V rows: no ring drain between items) or "desc"
                                         # (tail descriptors rebuilt per item after a drain; TMA zero-fills)
    bind: str = "smid"                   # which SM runs which CTA list: "block" (list = blockIdx, wherever the
                                         # hardware puts it), "smid" (list i on SM i: decode lists on the lowest
                                         # SM ids), "stride" (decode lists on SM ids spread evenly), "collide"
                                         # (checks: every SM asks for list 0, the rest claimed by fallback),
                                         # "gpc_spread" / "gpc_pack" (decode lists on TPCs taken from every
                                         # GPC in turn / on whole GPCs: pod/kernels/sm_map.py)
    gpcs: tuple | None = None            # the GPU's GPCs as groups of SM ids for the "gpc_*" binds (None:
                                         # sm_map.probe_gpcs on the plan's device: launches and syncs once a
                                         # process, so plan such a config before any CUDA-graph capture)
    overlap: bool = True                 # an item's Q and first stages load while the previous item finishes
                                         # (prefill frees Q after its last S and stores O from registers; else
                                         # each item's Q waits for the previous epilogue: a ring drain an item)
    decode_loop: str = "plain"           # the decode consumer's stage loop (_decode_rows; needs decode_xchg and
                                         # decode_skip 0 unless "plain"): "plain"; "pipe" (the next stage's S^T
                                         # issued before this stage's O^T completes: FA3's in-warpgroup
                                         # pipelining, swap-AB); "lag" (O^T one stage behind, issued after the
                                         # next stage's exchange barrier: two barriers a stage instead of six);
                                         # "lazy" (the softmax rescaled only when a maximum moves past 2^8: no
                                         # exchange barrier, the maxima travel with P^T's)
    prefill_order: str = "kv_head"       # which prefill tiles run side by side: "kv_head" (list scheduling by
                                         # kv head, longest first within one: the tiles that read one kv
                                         # head's K/V run together, fewer streams in L2 beside the decode's;
                                         # H200, 46 paper points: 1.031x "cost", MHA up to 1.17x) or "cost"
                                         # (LPT, longest first: the first wave holds a few query tiles of
                                         # every kv head)
    decode_l2: str = "normal"            # the decode role's K/V copies in L2: "normal" or "evict_first" (read
                                         # once: they should not push out the prefill tiles' K/V, which every
                                         # query tile of a kv head re-reads from L2; pod/kernels/ptx_hints.py)
    prefill_l2: str = "normal"           # the prefill role's K/V copies: "normal" or "evict_last"
    balance: str = "auto"                # which CTA runs which item: "static" (the planned lists), "dynamic"
                                         # (two queues in the plan's orders, decode pairs and prefill tiles; a CTA
                                         # claims from its planned role's queue, then from the other's once its
                                         # own is empty: a role that finishes early takes the other's items) or
                                         # "auto": dynamic where both roles run and the plan's decode estimate is
                                         # at least auto_decode_ratio x its prefill's (prefill SMs would idle;
                                         # H200, 46 paper points, three runs: 1.009-1.011x static, min 0.965)
    auto_decode_ratio: float = 1.5
    cross_rounds: float = 1.0            # dynamic: a CTA takes an item of the other role only while that queue
                                         # holds at least this many items for each CTA of that role (0: always)
    decode_tail_keys: int | None = None  # dynamic: the shortest requests, about the decode work the plan leaves
                                         # after its prefill ends, split to items of this many keys (a multiple
                                         # of 64), so a CTA whose tiles are done takes short items at the end of
                                         # the decode queue (an 8192-key pair takes ~100 us, as long as a
                                         # balanced point's imbalance); None: one split length for all
    static_tail_keys: int | None = None  # static lists: the shortest requests, static_tail_frac of the decode keys,
                                         # split to items of this many keys (a multiple of 64; STATIC_TAIL_KEYS),
                                         # so LPT can even out the CTAs' ends (unsplit 8192-key pairs take ~110 us:
                                         # 256 of them on 46 CTAs end 5 or 6 pairs in), and prefill CTAs whose
                                         # tiles end early take pairs (static_fill); planned only where the model's
                                         # makespan falls by static_tail_gain. Off by default: its search costs a
                                         # static plan ~4 ms of host time, which a serving step pays and did not
                                         # win back (H200, Fig 12 Llama-3-8B / Llama-2-7B: attention time the same,
                                         # requests/min 0.93x / 0.89x); the kernel alone runs 1.05x at the grid
                                         # points where it plans tails (docs/hopper_pod.md, Sessions 15-16)
    static_tail_frac: float = 0.5        # the share of the decode keys split to static_tail_keys
    static_fill: str = "auto"            # static_tail_keys: prefill CTAs end with decode pairs: "auto" where the
                                         # model (fluid_span: HBM shared by every streaming CTA) says it pays,
                                         # "always" (checks), "never" (only the decode CTAs' last round evened)
    static_tail_gain: float = 0.05
    decode_skip: int = 0                 # diagnostics only (wrong decode output): links of the decode chain
                                         # left out (_decode_rows' SKIP bits; 16: stream K/V unread)

    def decode_gbps(self, head_dim: int) -> float:
        """A decode CTA's K/V rate in the cost model for this head_dim."""
        return self.decode_gbps_per_sm_d64 if head_dim == 64 else self.decode_gbps_per_sm

    def shared_bytes(self, head_dim: int, elt: int = 2) -> int:
        return (128 + 2 * self.stages * self.block_n) * head_dim * elt + 8 * (4 * self.stages + 5) + 2 * 4 * 32 * 4 + 8

    def to_json(self) -> dict:
        return asdict(self)


def pod_sm90_supports(spec: BatchSpec, config: PodSm90Config = PodSm90Config()) -> str | None:
    """None when this kernel handles the batch, else why not."""
    h = spec.heads
    if h.head_dim not in (64, 128):
        return f"head_dim {h.head_dim} (64 or 128)"
    if spec.dtype not in ("bfloat16", "float16"):
        return f"dtype {spec.dtype} (bfloat16 or float16)"
    if config.block_n != 128 or config.stages < 2:
        return f"{config}: the tile is 128x128 with >= 2 stages"
    if config.shared_bytes(h.head_dim) + 1024 > SM90_SHARED_LIMIT:
        return f"{config} needs {config.shared_bytes(h.head_dim)} B of shared memory (227 KB an SM)"
    if h.group_size > 32:
        return f"GQA group {h.group_size} (<= 32: a decode item's q heads are the N of a swap-AB wgmma)"
    if config.decode_l2 not in DECODE_L2S:
        return f"decode_l2 {config.decode_l2!r} (one of {DECODE_L2S})"
    if config.prefill_l2 not in PREFILL_L2S:
        return f"prefill_l2 {config.prefill_l2!r} (one of {PREFILL_L2S})"
    if config.decode_loop not in DECODE_LOOPS:
        return f"decode_loop {config.decode_loop!r} (one of {DECODE_LOOPS})"
    if config.decode_loop != "plain" and (config.decode_skip or not config.decode_xchg):
        return f"decode_loop {config.decode_loop!r} needs decode_xchg and decode_skip 0"
    if spec.paged:
        p = spec.page_size
        if p < 8 or not (p % 128 == 0 or 64 % p == 0):
            return f"page_size {p} (>= 8, dividing 64 or a multiple of 128)"
    return None


DECODE_LOOPS = ("plain", "pipe", "lag", "lazy")   # PodSm90Config.decode_loop -> the kernel's DECODE_LOOP
DECODE_L2S = ("normal", "evict_first")            # PodSm90Config.decode_l2 -> DECODE_L2
PREFILL_L2S = ("normal", "evict_last")            # PodSm90Config.prefill_l2 -> PREFILL_L2
PREFILL_ORDERS = ("cost", "kv_head")
BALANCES = ("static", "dynamic", "auto")          # PodSm90Config.balance -> the kernel's DYNAMIC
SM_SLOTS = 1024                          # sm_map entries: %smid < %nsmid <= 1024 on every NVIDIA GPU so far
BINDS = ("block", "smid", "stride", "collide", "gpc_spread", "gpc_pack")


def sm_order(bind: str, num_sms: int, decode_ctas: int, gpcs=None) -> list[int]:
    """The SM each CTA list is planned on (list i on SM order[i]; decode lists are 0..decode_ctas-1).
    `gpcs`: the GPCs as groups of SM ids, for the "gpc_*" binds (pod/kernels/sm_map.py)."""
    if bind.startswith("gpc_"):
        from pod.kernels.sm_map import gpc_order
        if gpcs is None:
            raise ValueError(f"bind {bind!r} needs the GPU's GPCs (sm_map.probe_gpcs)")
        return gpc_order(bind, gpcs, num_sms, decode_ctas)
    if bind == "stride" and 0 < decode_ctas < num_sms:
        dec = [i * num_sms // decode_ctas for i in range(decode_ctas)]    # distinct: num_sms >= decode_ctas
        taken = set(dec)
        return dec + [sm for sm in range(num_sms) if sm not in taken]
    return list(range(num_sms))


def sm_map_for(bind: str, num_sms: int, decode_ctas: int, grid: int, gpcs=None) -> list[int]:
    """sm_map [SM_SLOTS] for _claim_list: the list planned for each SM id, -1 for none."""
    m = [-1] * SM_SLOTS
    if bind == "collide":
        return [0] * SM_SLOTS
    for i, sm in enumerate(sm_order(bind, num_sms, decode_ctas, gpcs)[:grid]):
        m[sm] = i
    return m


def _shifted(costs: list[float], extra: float) -> list[float]:
    return costs if not extra else [c + extra for c in costs]


def split_sms(prefill_costs: list[float], decode_costs: list[float], grid: int, decode_slowdown,
              plateau_tol: float | None = None, prefill_extra=None) -> tuple[int, float, float]:
    """(decode CTAs k, estimated prefill us, estimated decode us): the k in [1, grid-1] that minimises
    max(LPT(decode on k) * decode_slowdown(k), LPT(prefill on grid - k)); k = 0 or grid for one role.
    `plateau_tol`: where that k saturates HBM, the fewest decode CTAs within this fraction of its makespan.
    `prefill_extra(k)`: us added to every prefill item beside k decode CTAs (their HBM traffic slows the
    prefill items' dependent loads: block table, tail descriptors, Q, the first stage)."""
    extra = prefill_extra or (lambda k: 0.0)
    if not decode_costs:
        return 0, lpt_makespan(prefill_costs, grid), 0.0
    if not prefill_costs:
        return grid, 0.0, lpt_makespan(decode_costs, grid) * decode_slowdown(grid)
    pre_runs, dec_runs = runs_of(prefill_costs), runs_of(decode_costs)   # once: every k below reuses them
    pre_bounds, dec_bounds = RunBounds(pre_runs), RunBounds(dec_runs)
    memo: dict = {}

    def times(k):
        if k not in memo:
            memo[k] = (lpt_makespan(shifted_runs(pre_runs, extra(k)), grid - k),
                       lpt_makespan(dec_runs, k) * decode_slowdown(k))
        return memo[k]

    def decode_bounds(k):                    # bounds on times(k)[1] without LPT
        lo_, hi_ = dec_bounds.bounds(k)
        return lo_ * decode_slowdown(k), hi_ * decode_slowdown(k)

    def decode_fits(k):                      # times(k)[1] <= times(k)[0]; LPT only where the bounds overlap
        d_lo, d_hi = decode_bounds(k)
        p_lo, p_hi = pre_bounds.bounds(grid - k, extra(k))
        if d_hi <= p_lo or d_lo > p_hi:
            return d_hi <= p_lo
        tp, td = times(k)
        return td <= tp

    lo, hi = 1, grid - 1                     # smallest k whose decode time <= its prefill time
    while lo < hi:
        mid = (lo + hi) // 2
        if decode_fits(mid):
            hi = mid
        else:
            lo = mid + 1
    best = min({max(1, lo - 1), lo}, key=lambda k: (max(times(k)), k))
    tp, td = times(best)
    if plateau_tol is not None and decode_slowdown(best) > 1.0:
        # Past HBM saturation every extra decode CTA streams nothing more: the decode time stays flat while
        # the prefill tiles crowd onto fewer SMs (H200, 512@0 + 64 x 8192 planned at 130 decode CTAs: 0.86 ms
        # against 0.52 serial). Take the fewest decode CTAs whose decode estimate stays within `plateau_tol`
        # of the balanced plan's makespan (the decode estimate only grows as k shrinks, the prefill's falls).
        bound = (1.0 + plateau_tol) * max(tp, td)
        lo, hi = 1, best
        while lo < hi:
            mid = (lo + hi) // 2
            d_lo, d_hi = decode_bounds(mid)
            fits = d_hi <= bound if (d_hi <= bound or d_lo > bound) else \
                lpt_makespan(dec_runs, mid) * decode_slowdown(mid) <= bound
            if fits:
                hi = mid
            else:
                lo = mid + 1
        if lo < best:
            best = lo
            tp, td = times(best)
    return best, tp, td


def lpt_with_stealing(prefill_costs: list[float], decode_costs: list[float], grid: int, k: int,
                      decode_slowdown) -> tuple[list[list[int]], list[list[int]], float, float]:
    """Decode pairs LPT onto CTAs 0..k-1 (their loads stretched by decode_slowdown(k)); then prefill tiles LPT
    onto all `grid` CTAs, a decode CTA starting from its decode load: the decode SMs take prefill tiles once
    their K/V stream is done. Returns (decode lists, prefill lists [grid], decode makespan, makespan)."""
    dec_lists, _ = lpt(decode_costs, k)
    loads = [sum(decode_costs[i] for i in lst) * decode_slowdown(k) for lst in dec_lists] + [0.0] * (grid - k)
    pre_lists, span = lpt(prefill_costs, grid, loads)
    return dec_lists, pre_lists, max(loads[:k] or [0.0]), span


@dataclass
class PodSm90Work:
    """The plan of one batch shape for the Hopper POD kernel (shape-only; `runner` binds a launch)."""
    config: PodSm90Config
    spec: BatchSpec
    grid: int
    decode_ctas: int
    n_prefill_tiles: int
    n_decode_pairs: int
    work_units: torch.Tensor        # [units, 2] int32 (chunk, q_block)
    dec_items: torch.Tensor         # [pairs * 2, 6] int32 (seq or -1, request, kv head, kv_start, kv_end, part_row)
    cta_ptr: torch.Tensor           # [grid + 1] int32 (balance "dynamic": each CTA's first item, or 2^31 - 2:
                                    # claim one)
    cta_items: torch.Tensor         # [items] int32: >= 0 prefill tile, < 0 decode pair -(p + 1) (balance
                                    # "dynamic": the decode queue, then the prefill queue)
    decode: DecodeWork | None       # the decode plan: splits, partial workspace, merge list (None: no decodes)
    estimate_us: dict
    sm_map: torch.Tensor | None = None   # [SM_SLOTS] int32: the list planned for each SM (config.bind != "block")
    claim: torch.Tensor | None = None    # [grid + 2] int32 zeros: _claim_list's workspace (one launch at a time)
    tails: int = 0                       # static_tail_keys: prefill CTAs that end with decode pairs, + 1 (0: no
                                         # static tails planned; 1: tails on the decode CTAs only)
    queue: torch.Tensor | None = None    # [12] int32, balance "dynamic": the queues' claims and CTAs done (zero
                                         # between launches, like claim), a pad, n_dec, n_all, the two take-minima,
                                         # the two first rounds (_claim_item), two pads

    @property
    def num_tiles(self) -> int:
        return self.n_prefill_tiles + self.n_decode_pairs

    @property
    def needs_merge(self) -> bool:
        return bool(self.decode is not None and self.decode.needs_merge)

    def describe(self) -> dict:
        """The config's knobs (those set), then what the plan made of them (`decode_ctas`: the split run,
        whether planned or forced by config.decode_ctas; `schedule`: the lists or the queues, balance)."""
        knobs = {k: v for k, v in self.config.to_json().items() if v is not None}
        return {**knobs, **dict(kernel="pod_sm90", grid=self.grid, decode_ctas=self.decode_ctas,
                                n_prefill_tiles=self.n_prefill_tiles, n_decode_pairs=self.n_decode_pairs,
                                decode_kv_chunk=self.decode.kv_chunk_len if self.decode is not None else None,
                                merge_launch=self.needs_merge, estimate_us=self.estimate_us,
                                static_tails=self.tails,
                                schedule="dynamic" if self.queue is not None else "static")}

    def runner(self, batch: HybridBatch, out_prefill: torch.Tensor, out_decode: torch.Tensor,
               trace: torch.Tensor | None = None):
        return pod_sm90_runner(batch, self, out_prefill, out_decode, trace)


def _decode_split_keys(spec: BatchSpec, cfg: PodSm90Config, decode_share: float, grid: int) -> int:
    """Keys per decode item: every item at most a third of a decode consumer's expected share (so LPT can
    balance), never under min_split_keys; a multiple of 64 (a half-tile)."""
    lens = spec.decode_context_lens
    key_heads = sum(lens) * spec.heads.num_kv_heads
    k_est = max(1, round(grid * decode_share))
    chunk = max(cfg.min_split_keys, math.ceil(key_heads / (6 * k_est)))
    chunk = -(-chunk // 64) * 64
    return min(chunk, -(-max(lens) // 64) * 64)


def plan_pod_sm90(batch_or_spec: HybridBatch | BatchSpec, config: PodSm90Config = PodSm90Config(),
                  num_sms: int | None = None, device: torch.device | str | None = None) -> PodSm90Work:
    """Shape-only: the prefill tiles, the decode items (split where needed) paired for the two consumers,
    the SM split and each CTA's list (LPT). `num_sms`: the grid without a forced one (default: the
    device's SM count, pod.env.device_num_sms)."""
    from pod.env import device_num_sms, unpack_batch_or_spec
    from pod.kernels.decode import plan_decode
    from pod.kernels.prefill import plan_units
    spec, device = unpack_batch_or_spec(batch_or_spec, device)
    cfg = config
    why = pod_sm90_supports(spec, cfg)
    if why is not None:
        raise ValueError(f"the Hopper POD kernel does not handle this batch: {why}")
    h = spec.heads
    if num_sms is None:
        num_sms = device_num_sms(device)

    # Prefill tiles: the Hopper tile's work list; cost = KV tiles computed x a full tile's FLOPs.
    units, _ = plan_units(spec, 128)
    tile_us = 4 * 128 * 128 * h.head_dim / (cfg.prefill_tflops_per_sm * 1e6)
    unit_cost = []
    for c, b in units:
        ch = spec.prefill_chunks[c]
        q_pos0 = ch.context_len + b * 128
        n_kv = -(-min(ch.context_len + ch.chunk_len, q_pos0 + 128) // cfg.block_n)
        unit_cost.append(n_kv * tile_us + cfg.item_us)
    prefill_costs = np.repeat(np.asarray(unit_cost, dtype=np.float64), h.num_q_heads).tolist()

    # Decode items (request, kv head, key range): split so LPT can balance them over the decode CTAs.
    rate = cfg.decode_gbps(h.head_dim)                 # GB/s a decode CTA
    stage_us = 2 * cfg.block_n * h.head_dim * spec.torch_dtype.itemsize / (rate * 1e3)
    grid0 = cfg.num_ctas or num_sms
    dec, decode_costs = None, []                       # decode_costs: one a pair
    if spec.num_decode:
        p_total = sum(prefill_costs)
        d_total = sum(-(-n // 64) for n in spec.decode_context_lens) * h.num_kv_heads / 2 * stage_us
        chunk = _decode_split_keys(spec, cfg, d_total / (d_total + p_total), grid0)    # a multiple of 64
        items = _decode_items(spec.decode_context_lens, chunk, h.num_kv_heads)
        decode_costs = _pair_costs(items, stage_us, cfg.item_us)

    grid = max(1, min(grid0, len(prefill_costs) + len(decode_costs)))

    def slowdown(k):                          # k decode CTAs share HBM
        return max(1.0, k * rate / cfg.hbm_gbps)

    def prefill_extra(k):                     # a prefill item's extra latency beside k decode CTAs
        return cfg.item_us_hbm * min(1.0, k * rate / cfg.hbm_gbps)

    if cfg.decode_ctas is not None and prefill_costs and decode_costs:
        k = max(1, min(cfg.decode_ctas, grid - 1))
        t_p = lpt_makespan(_shifted(prefill_costs, prefill_extra(k)), grid - k)
        t_d = lpt_makespan(decode_costs, k) * slowdown(k)
    else:
        k, t_p, t_d = split_sms(prefill_costs, decode_costs, grid, slowdown, cfg.plateau_tol, prefill_extra)
    k = min(k, len(decode_costs))
    steal = None
    if cfg.prefill_tail not in ("mask", "desc"):
        raise ValueError(f"PodSm90Config.prefill_tail: 'mask' or 'desc', not {cfg.prefill_tail!r}")
    if cfg.bind not in BINDS:
        raise ValueError(f"PodSm90Config.bind: one of {BINDS}, not {cfg.bind!r}")
    if cfg.steal not in ("auto", "always", "never"):
        raise ValueError(f"PodSm90Config.steal: 'auto', 'always' or 'never', not {cfg.steal!r}")
    if cfg.prefill_order not in PREFILL_ORDERS:
        raise ValueError(f"PodSm90Config.prefill_order: one of {PREFILL_ORDERS}, not {cfg.prefill_order!r}")
    if cfg.balance not in BALANCES:
        raise ValueError(f"PodSm90Config.balance: one of {BALANCES}, not {cfg.balance!r}")
    if cfg.balance == "dynamic" and cfg.steal != "never":
        raise ValueError("PodSm90Config: steal plans decode CTAs' prefill tiles ahead; balance='dynamic' takes "
                         "them at run time (set steal='never')")
    dynamic = cfg.balance == "dynamic" or (
        cfg.balance == "auto" and cfg.steal == "never" and bool(prefill_costs) and bool(decode_costs)
        and t_d >= cfg.auto_decode_ratio * t_p)
    if cfg.decode_tail_keys is not None and (cfg.decode_tail_keys < 64 or cfg.decode_tail_keys % 64):
        raise ValueError(f"PodSm90Config.decode_tail_keys: a multiple of 64, not {cfg.decode_tail_keys}")
    if cfg.static_tail_keys is not None and (cfg.static_tail_keys < 64 or cfg.static_tail_keys % 64):
        raise ValueError(f"PodSm90Config.static_tail_keys: a multiple of 64, not {cfg.static_tail_keys}")
    if cfg.static_fill not in STATIC_FILLS:
        raise ValueError(f"PodSm90Config.static_fill: one of {tuple(STATIC_FILLS)}, not {cfg.static_fill!r}")
    chunks = None                                      # keys per split for each request (decode_tail_keys)
    if dynamic and cfg.decode_tail_keys and prefill_costs and decode_costs and t_d > t_p:
        chunks = tail_chunks(spec.decode_context_lens, chunk, cfg.decode_tail_keys, 1.0 - t_p / t_d)
        items = _decode_items(spec.decode_context_lens, chunks, h.num_kv_heads)
        decode_costs = _pair_costs(items, stage_us, cfg.item_us)
        t_d = lpt_makespan(decode_costs, k) * slowdown(k)      # the estimate of the split plan
    # The prefill tiles' order for list scheduling (None: LPT); a shift of every cost leaves it as it is, so
    # one order serves every decode CTA count.
    pre_order = _kv_head_order(prefill_costs, h.num_q_heads, h.group_size) if cfg.prefill_order == "kv_head" \
        else None
    parallel = cfg.hbm_gbps / rate                     # decode CTAs HBM feeds at the full rate (fluid_span)
    lists, tails = None, 0                             # the static tail plan: (prefill lists, decode lists)
    if not dynamic and cfg.steal == "never" and cfg.static_tail_keys and prefill_costs and decode_costs:
        # The static lists' CTAs end a whole item apart (LPT of equal pairs; tiles of a long context take
        # ~200 us): split about `static_tail_frac` of the decode keys (the shortest requests) finer, and plan
        # every pair over all CTAs, LPT from each CTA's prefill load (a prefill CTA runs its tiles, then the
        # pairs that fill its idle end), for decode CTA counts up to the split's; kept where the model's
        # makespan falls by static_tail_gain (it pays a merge and an item's fixed cost a pair).
        t_chunks = tail_chunks(spec.decode_context_lens, chunk, cfg.static_tail_keys, cfg.static_tail_frac)
        t_items = _decode_items(spec.decode_context_lens, t_chunks, h.num_kv_heads)
        t_costs = _pair_costs(t_items, stage_us, cfg.item_us)
        # No plan of these items ends before all CTAs' work spread evenly, nor before the decode's work at
        # HBM's rate (fluid_span): where even that misses the gain, skip the search (the same answer, sooner).
        floor = max((sum(prefill_costs) + sum(t_costs)) / grid, sum(t_costs) / parallel)
        search = floor < (1.0 - cfg.static_tail_gain) * max(t_p, t_d)
        cands = [] if not search else [k] if cfg.decode_ctas is not None else \
            sorted({max(1, min(grid - 1, len(t_costs), round(k * f))) for f in FILL_K_FACTORS})
        best = _best_fill_plan(prefill_costs, t_costs, grid, cands, STATIC_FILLS[cfg.static_fill], parallel,
                               prefill_extra, pre_order)
        if best is not None and best[3] < (1.0 - cfg.static_tail_gain) * max(t_p, t_d):
            chunks, items, decode_costs = t_chunks, t_items, t_costs
            lists, k, t_p, t_d = best[:2], best[4], best[2], best[3]
            tails = 1 + sum(1 for lst in lists[1][k:] if lst)
    if spec.num_decode:                                # the decode plan (partials, merge) of those items
        dec = plan_decode(spec, num_sms, kv_chunk_len=chunk, kv_chunk_lens=chunks, block_n=64, device=device)
    if cfg.steal != "never" and prefill_costs and 0 < k < grid:
        # Decode CTAs may take prefill tiles after their pairs (LPT from their decode loads): where that
        # beats the split's makespan (for some k around it), plan it. Only k that leave HBM unsaturated:
        # prefill tiles beside a saturating decode stream ran far slower than the model (H200: 1024@12288 +
        # 64 x 8192 at k=64 took 0.918 ms against 0.78 unstolen at k=46; docs/hopper_pod.md).
        k_max = max(1, int(cfg.hbm_gbps // rate))
        cands = [k] if cfg.decode_ctas is not None else \
            sorted({max(1, min(len(decode_costs), grid - 1, k_max, round(k * f))) for f in (0.8, 0.9, 1.0, 1.1, 1.25, 1.4)})
        best = min(((lpt_with_stealing(prefill_costs, decode_costs, grid, c, slowdown), c) for c in cands),
                   key=lambda x: (x[0][3], x[1]))
        if cfg.steal == "always" or best[0][3] < max(t_p, t_d):
            steal, k = best
    if steal is not None:
        dec_lists, pre_all, t_d, t_p = steal
        # A CTA runs its decode pairs first (the planner's order; the producer takes either), then its tiles.
        cta_lists = [[-(p + 1) for p in dl] + list(pl) for dl, pl in zip(dec_lists, pre_all[:k])] \
            + [list(pl) for pl in pre_all[k:]]
    elif not dynamic:
        # The decode CTAs' pairs; a prefill CTA's tiles, then the pairs the tail plan filled its end with.
        if lists is None:
            pre_lists, _, _ = _prefill_lists(prefill_costs, grid, k, prefill_extra(k), pre_order)
            dec_all = _decode_lists(decode_costs, grid, k, False)
        else:
            pre_lists, dec_all = lists
        cta_lists = [[-(p + 1) for p in dec_all[c]] for c in range(k)] \
            + [list(pl) + [-(p + 1) for p in dec_all[k + i]] for i, pl in enumerate(pre_lists)]
    if dynamic:                                        # (no lists to build: k decode CTAs of `grid`)
        # Two queues in the static plan's orders (the decode pairs longest first; the prefill tiles in
        # prefill_order): the same greedy rule run online, so the lists end where the SMs really are.
        if pre_order is None:                          # LPT's order
            pre_order = np.argsort(-np.asarray(_shifted(prefill_costs, prefill_extra(k))), kind="stable").tolist()
        n_pairs = len(decode_costs)
        flat = [-(p + 1) for p in range(n_pairs)] + list(pre_order) or [0]
        owners = (k, grid - k)                         # CTAs whose own queue is the decode / prefill one
        # Each CTA's first item (_claim_item): the i-th of its role's CTAs takes item i of its queue; CLAIM
        # where the queue is shorter than that.
        cta_ptr = np.full(grid + 1, CLAIM_ID, dtype=np.int64)
        cta_ptr[:min(k, n_pairs)] = flat[:min(k, n_pairs)]
        n_first = min(grid - k, len(pre_order))
        cta_ptr[k:k + n_first] = pre_order[:n_first]
        take_min = [math.ceil(cfg.cross_rounds * o) if o else 0 for o in owners]
        queue = [0, 0, 0, 0, n_pairs, n_pairs + len(pre_order), *take_min, *owners, 0, 0]
    else:
        cta_ptr = np.cumsum([0] + [len(lst) for lst in cta_lists])
        flat = [x for lst in cta_lists for x in lst] or [0]
    # dec_items rows, pair p's two items at 2p and 2p + 1: (seq, request, kv head, kv_start, kv_end,
    # partial row); a pair without a second item gets (-1, 0, 0, 0, 1, -1).
    rows = np.tile(np.array([-1, 0, 0, 0, 1, -1], dtype=np.int64), (max(2 * len(decode_costs), 2), 1))
    if decode_costs:
        rows[:len(items), 0] = spec.num_prefill + items[:, 0]
        rows[:len(items), 1:] = items
    bound = cfg.bind != "block"
    gpcs = cfg.gpcs
    if cfg.bind.startswith("gpc_") and gpcs is None:
        from pod.kernels.sm_map import gpcs_of
        gpcs = gpcs_of(device)
    tables = device_tables(device, work_units=np.array(units or [(0, 0)]), dec_items=rows, cta_ptr=cta_ptr,
                            cta_items=np.array(flat),
                            sm_map=np.array(sm_map_for(cfg.bind, num_sms, k, grid, gpcs)) if bound else None,
                            claim=np.zeros(grid + 2) if bound else None,
                            queue=np.array(queue) if dynamic else None)
    return PodSm90Work(config=cfg, spec=spec, grid=grid, decode_ctas=k, tails=tails,
                       n_prefill_tiles=len(prefill_costs), n_decode_pairs=len(decode_costs), decode=dec,
                       estimate_us=dict(prefill=round(t_p, 1), decode=round(t_d, 1)), **tables)


STATIC_FILLS = {"auto": (False, True), "always": (True,), "never": (False,)}   # static_fill -> plans tried
STATIC_TAIL_KEYS = 2048          # static_tail_keys where turned on (backend_options.pod_sm90_static_tails)
FILL_K_FACTORS = (0.7, 0.8, 0.9, 0.95, 1.0, 1.05, 1.1)   # static_tail_keys: decode CTA counts tried, x the split's


def fluid_span(starts, works, parallel: float) -> float:
    """When the last CTA ends, each CTA c streaming `works[c]` us of decode (at the full rate) from
    `starts[c]` (its prefill load; 0 for a decode CTA), all streaming CTAs sharing HBM: each runs at
    min(1, parallel / streaming) of the full rate (`parallel`: how many CTAs HBM feeds at the full rate).
    Processor sharing: every streaming CTA advances alike, so each ends when the shared progress V (the
    integral of the rate) has grown by its work since it started."""
    pending = sorted((t, w) for t, w in zip(starts, works) if w > 0)
    end = max(starts, default=0.0)
    t = v = 0.0
    finish: list[float] = []                           # heap of the streaming CTAs' V at their end
    i = 0
    while i < len(pending) or finish:
        f = min(1.0, parallel / len(finish)) if finish else 1.0
        t_in = pending[i][0] if i < len(pending) else math.inf
        t_out = t + (finish[0] - v) / f if finish else math.inf
        if t_in <= t_out:
            if finish:
                v += (t_in - t) * f
            t = t_in
            heapq.heappush(finish, v + pending[i][1])
            i += 1
        else:
            v, t = heapq.heappop(finish), t_out
    return max(end, t)


def _prefill_lists(prefill_costs, grid: int, k: int, extra: float, pre_order: list[int] | None):
    """The prefill tiles onto CTAs k..grid-1 (list scheduling in `pre_order`, or LPT where None), every cost
    + `extra`: (lists, the makespan, the shifted costs they were scheduled by)."""
    shifted = _shifted(prefill_costs, extra)
    if pre_order is not None:
        pre_lists, t_p = list_schedule(shifted, grid - k, pre_order)
    else:
        pre_lists, t_p = lpt(shifted, grid - k)
    return pre_lists, t_p, shifted


def _list_sums(costs, lists) -> list[float]:
    """Each list's cost, added in list order from 0.0 (what sum() over it gives, bit for bit: bincount adds
    its weights one by one in input order) without a Python loop an item."""
    flat = [i for lst in lists for i in lst]
    if not flat:
        return [0.0] * len(lists)
    owner = np.repeat(np.arange(len(lists)), [len(lst) for lst in lists])
    return np.bincount(owner, weights=np.asarray(costs, dtype=np.float64)[flat], minlength=len(lists)).tolist()


def _decode_lists(decode_costs, grid: int, k: int, fill: bool, loads: list[float] | None = None) -> list[list[int]]:
    """Every decode pair LPT onto the k decode CTAs (fill False) or onto all grid CTAs from their prefill
    `loads` (fill True: a prefill CTA runs its tiles, then its pairs): one list a CTA [grid]."""
    if fill:
        return lpt(decode_costs, grid, loads)[0]
    return lpt(decode_costs, k)[0] + [[] for _ in range(grid - k)]


def _fluid_floor(starts: list[float], work: float, parallel: float) -> float:
    """When `work` (us at the full rate) would end if it were divisible at will: every CTA streams from its
    start, together at most `parallel` CTAs' rate (fluid_span's HBM), i.e. the L with the integral over
    0..L of min(parallel, CTAs started by t) = work. No plan of these starts ends its decode sooner."""
    xs = sorted(starts)
    t, done = 0.0, 0.0
    for n in range(1, len(xs) + 1):                    # n CTAs stream from xs[n - 1] to the next start
        rate = min(parallel, n)
        t = xs[n - 1]
        nxt = xs[n] if n < len(xs) else math.inf
        if done + rate * (nxt - t) >= work:
            return t + (work - done) / rate
        done += rate * (nxt - t)
    return t


# fluid_span's result against the bounds below, computed from the same costs in another order: a relative slack
_SPAN_SLACK = 1e-9


def _best_fill_plan(prefill_costs, decode_costs, grid: int, cands, fills, parallel: float, prefill_extra,
                    pre_order: list[int] | None):
    """static_tail_keys' search: the plan of the shortest modelled makespan over decode CTA counts `cands`
    (ascending) and `fills` (ties to the first in that order), as (prefill lists [grid - k], decode lists
    [grid], the prefill makespan, the makespan, k), or None without candidates.

    Best first (the search runs on every serving step's plan): each candidate is a heap entry keyed by a
    lower bound of its makespan, made exact in steps - first from sums alone (the prefill spread over its
    CTAs, the largest pair, the decode at HBM's rate or over its k CTAs), then with its prefill lists (their
    makespan; fill False: the k decode CTAs' LPT, True: the decode poured at will onto every CTA from its
    load, _fluid_floor), then the plan itself (fluid_span). A plan popped with its exact makespan is the
    answer: every other entry's key bounds its own makespan from below. Most candidates never get lists."""
    if not cands:
        return None
    total, largest = sum(decode_costs), max(decode_costs, default=0.0)
    bounds = RunBounds(runs_of(decode_costs))
    pre_total, pre_max, n_pre = sum(prefill_costs), max(prefill_costs, default=0.0), len(prefill_costs)
    pre: dict = {}                                     # kc -> its prefill lists, makespan, every CTA's load
    heap = []
    for i, (kc, fill) in enumerate((kc, fill) for kc in cands for fill in fills):
        x = prefill_extra(kc)
        lo = max((pre_total + n_pre * x) / (grid - kc), pre_max + x, largest, total / parallel,
                 total / min(kc, parallel) if not fill else 0.0, bounds.bounds(kc)[0] if not fill else 0.0)
        heap.append((lo * (1 - _SPAN_SLACK), i, 0, kc, fill, None))
    heapq.heapify(heap)
    while True:
        key, i, stage, kc, fill, plan = heapq.heappop(heap)
        if stage == 2:
            return plan
        if kc not in pre:
            pre_lists, t_p, shifted = _prefill_lists(prefill_costs, grid, kc, prefill_extra(kc), pre_order)
            pre[kc] = pre_lists, t_p, [0.0] * kc + _list_sums(shifted, pre_lists)
        pre_lists, t_p, loads = pre[kc]
        if stage == 0:
            spread = _fluid_floor(loads, total, parallel) if fill else \
                max(lpt_makespan(decode_costs, kc), total / min(kc, parallel))
            heapq.heappush(heap, (max(key, max(t_p, largest, spread) * (1 - _SPAN_SLACK)), i, 1, kc, fill, None))
        else:
            dec_lists = _decode_lists(decode_costs, grid, kc, fill, loads)
            span = fluid_span(loads, _list_sums(decode_costs, dec_lists), parallel)
            heapq.heappush(heap, (span, i, 2, kc, fill, (pre_lists, dec_lists, t_p, span, kc)))


def _kv_head_order(costs: list[float], num_q_heads: int, group: int) -> list[int]:
    """Prefill tiles (index = unit x num_q_heads + q head) by kv head, the longest first within one (ties in
    index order): list scheduling in this order starts the tiles that read one kv head's K/V together."""
    t = np.arange(len(costs))
    return np.lexsort((t, -np.asarray(costs, dtype=np.float64), (t % num_q_heads) // group)).tolist()


def tail_chunks(lens, chunk: int, tail_keys: int, frac: float) -> np.ndarray:
    """Keys per split for each request (decode_tail_keys): `chunk`, but min(chunk, tail_keys) for the
    shortest requests (the last in request order among equals) whose keys add up to at least `frac` of all:
    their items sort to the end of the decode queue (longest first)."""
    n = np.asarray(lens, dtype=np.int64)
    out = np.full(len(n), chunk, dtype=np.int64)
    need = max(0.0, min(1.0, frac)) * n.sum()
    got = 0
    for r in sorted(range(len(n)), key=lambda r: (n[r], -r)):     # shortest first, later requests first
        if got >= need:
            break
        out[r] = min(chunk, tail_keys)
        got += n[r]
    return out


def _pair_costs(items: np.ndarray, stage_us: float, item_us: float) -> list[float]:
    """The cost model's time of each decode pair: pairs are neighbours in the items' order (longest first),
    so a pair takes its first, longer item's 64-key stages, plus an item's fixed cost."""
    n_half = (items[0::2, 3] - items[0::2, 2] + 63) // 64
    return (n_half * stage_us + item_us).tolist()       # float64 as Python's n * stage_us + item_us


def _decode_items(lens, chunk, num_kv_heads: int) -> np.ndarray:
    """int64 [items, 5] (request, kv head, kv_start, kv_end, partial row or -1): the decode plan's items
    (decode.split_items, longest first) for every kv head; all heads of a split have its length, so this is
    the items by (request, split, kv head) sorted longest first (stable). `chunk`: keys per split, one for
    all requests or one each."""
    from pod.kernels.decode import split_items
    n = np.asarray(lens, dtype=np.int64)
    work, _ = split_items(n, np.broadcast_to(np.asarray(chunk, dtype=np.int64), n.shape).copy())
    items = np.insert(np.repeat(work, num_kv_heads, axis=0), 1, 0, axis=1)
    items[:, 1] = np.tile(np.arange(num_kv_heads), len(work))
    return items


def launch_args(batch: HybridBatch, work: PodSm90Work, out_prefill: torch.Tensor, out_decode: torch.Tensor,
                trace: torch.Tensor | None = None):
    """(positional runtime args, constexpr kwargs) of `pod_sm90_kernel`."""
    spec, cfg = batch.spec, work.config
    h = spec.heads
    k, v = batch.k_cache, batch.v_cache
    for name, t in (("q_prefill", batch.q_prefill), ("q_decode", batch.q_decode), ("k_cache", k),
                    ("v_cache", v), ("out_prefill", out_prefill), ("out_decode", out_decode)):
        if not t.is_contiguous():
            raise ValueError(f"the Hopper POD kernel needs a dense {name} (got strides {t.stride()})")
    paged = spec.paged
    if cfg.decode_l2 != "normal" or cfg.prefill_l2 != "normal":
        _install_ptx_hints()                     # the tags become cache policies when the kernel compiles
    # A role without rows still gets a valid TMA descriptor: the other role's queries stand in (never read).
    q = batch.q_prefill if batch.q_prefill.shape[0] else batch.q_decode
    qd = batch.q_decode if batch.q_decode.shape[0] else batch.q_prefill
    bt = batch.block_table if paged else batch.kv_lens
    kv_indptr = batch.kv_indptr if not paged else batch.kv_lens
    # Empty outputs (a role the batch lacks) have no storage: a live buffer stands in, never written.
    o = out_prefill if out_prefill.numel() else out_decode
    od = out_decode if out_decode.numel() else out_prefill
    dec = work.decode
    part_o = dec.part_o if dec is not None else work.cta_ptr.new_zeros(1, dtype=torch.float32)
    part_lse = dec.part_lse if dec is not None else part_o
    args = (q, qd, k, v, o, od, part_o, part_lse, batch.q_indptr, batch.kv_lens, kv_indptr, bt,
            work.work_units, work.dec_items, work.cta_ptr, work.cta_items,
            trace if trace is not None else work.cta_ptr,
            work.sm_map if work.sm_map is not None else work.cta_ptr,
            work.claim if work.claim is not None else work.cta_ptr,
            work.queue if work.queue is not None else work.cta_ptr, work.decode_ctas,
            h.num_q_heads, q.shape[0] if q is batch.q_prefill else 1, qd.shape[0] * h.num_q_heads,
            k.shape[0] * k.shape[1] if paged else k.shape[0], bt.stride(0) if paged else 0,
            float(batch.sm_scale) * LOG2E)
    const = dict(GROUP=h.group_size, HEAD_DIM=h.head_dim, NUM_KV_HEADS=h.num_kv_heads, BLOCK_M=128,
                 BLOCK_N=cfg.block_n, PAGE_SIZE=spec.page_size if paged else cfg.block_n, PAGED=paged,
                 STAGES=cfg.stages, CONSUMER_REGS=cfg.consumer_regs, PRODUCER_REGS=cfg.producer_regs,
                 TRACE=trace.shape[1] if trace is not None else 0, DECODE_SKIP=cfg.decode_skip, DECODE_XCHG=cfg.decode_xchg,
                 DECODE_EARLY_K=cfg.decode_early_k, BIND=work.sm_map is not None,
                 TAIL_MASK=cfg.prefill_tail == "mask", OVERLAP=cfg.overlap,
                 DECODE_LOOP=DECODE_LOOPS.index(cfg.decode_loop),
                 DECODE_L2=DECODE_L2S.index(cfg.decode_l2), PREFILL_L2=PREFILL_L2S.index(cfg.prefill_l2),
                 DYNAMIC=work.queue is not None)
    return args, const


def pod_sm90_runner(batch: HybridBatch, work: PodSm90Work, out_prefill: torch.Tensor, out_decode: torch.Tensor,
                    trace: torch.Tensor | None = None):
    """Bind the launch once; returns ``launch() -> (out_prefill, out_decode)`` (no allocation, no sync).
    `trace`: int64 [grid, 6 + 3m] gets each CTA's (smid, start ns, end ns, prefill items, decode pairs, stages),
    then (item, start ns, end ns) of its first m items (%globaltimer; diagnostics: pod_sm90_diag items)."""
    from pod.kernels.merge import merge_partials
    from pod.kernels.prefill_sm90 import ensure_scratch_allocator
    args, const = launch_args(batch, work, out_prefill, out_decode, trace)
    ensure_scratch_allocator()
    grid = (work.grid,)
    dec = work.decode
    merge = work.needs_merge

    def launch():
        if work.num_tiles:
            pod_sm90_kernel[grid](*args, **const, num_warps=4)
        if merge:
            merge_partials(dec.merge_reqs, dec.part_indptr, dec.part_o, dec.part_lse, out_decode)
        return out_prefill, out_decode
    return launch


def compile_report(config: PodSm90Config = PodSm90Config(), *, head_dim: int = 128, dtype: str = "bfloat16",
                   paged: bool = True, page_size: int = 16, num_q_heads: int = 32, num_kv_heads: int = 8,
                   trace: bool = False) -> dict:
    """Compile for sm_90a on the host (no GPU), with the arguments a real launch on a small hybrid batch of
    this layout gets: shared memory, registers, spills, wgmma / TMA / setmaxnreg counts."""
    from pod.batch import make_batch
    from pod.kernels.common import sm90_compile_report
    spec = BatchSpec.build(num_q_heads, num_kv_heads, head_dim, prefill=[(300, 700), (77, 0)], decode=[1000, 513],
                           dtype=dtype, page_size=page_size if paged else None)
    batch = make_batch(spec, "cpu", seed=0)
    out = (torch.empty_like(batch.q_prefill), torch.empty_like(batch.q_decode))
    tr = torch.zeros(132, 6 + 3 * 8, dtype=torch.int64) if trace else None
    args, const = launch_args(batch, plan_pod_sm90(batch, config, num_sms=132), *out, tr)
    rep = sm90_compile_report(pod_sm90_kernel, *args, num_warps=4, **const)
    return {k: v for k, v in rep.items() if k != "cp_async"}
