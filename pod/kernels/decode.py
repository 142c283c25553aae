"""Split-KV (flash-decoding) batch decode attention in Triton, GQA group packed into the M dimension.

Math. Decode request r has one query per q head over its ``L_r`` cached keys. The q heads of one GQA
group (``GROUP = Hq / Hkv`` heads sharing kv head h) read the same K/V rows, so a CTA loads the group's
queries as one ``[BLOCK_M, D]`` block (``BLOCK_M = max(16, next_pow2(GROUP))``, padded rows are zero
and never stored) and runs ``S = Q K^T`` and ``O += P V`` as tensor-core ``tl.dot``s: each K/V byte is
read once for the whole group. The key range of a request is cut into *splits* (flash-decoding) so
that short batches still fill the GPU; each split runs the online softmax of pod/kernels/common.py over
its keys and leaves an fp32 partial output and base-2 LSE, merged by pod/kernels/merge.py. A request
with a single split writes its final output directly (no merge, no workspace).

Plan/run. `plan_decode(batch_or_spec, num_sms, ...)` does all shape work on the host once (split
counts, the work list, workspace allocation, the merge list) and returns a `DecodeWork`;
`decode(batch, work, out)` only launches (the decode kernel, then the merge kernel if any request
has more than one split); `work.runner(batch, out)` (`decode_runner`) binds the launch arguments once
and returns the closure a timed run() calls. Nothing in either synchronises with the host.

Splits. By default the plan targets ``num_sms * ctas_per_sm`` resident CTAs (num_sms queried from the
device, pod.env.SIMULATED_NUM_SMS in the interpreter) and picks the keys per split with the shortest modelled
makespan (split_policy="balanced"; "fit" is FlashInfer's rule: the smallest chunk whose tiles fit one
wave). Requests get different split counts (a long request gets more). `kv_splits`, `target_ctas` or
`kv_chunk_len` override it, e.g. for a fused kernel that wants fewer decode CTAs.

Work list. ``work`` is int32 ``[num_items, 4]``, one row per (request, split):
``(request, kv_start, kv_end, part_row)`` with ``0 <= kv_start < kv_end <= L_r`` and ``part_row`` the
partial-workspace row of the split, or -1 when the request has one split (final output written
directly). Items are sorted by decreasing key count (longest first evens the tail). A *tile* is one
(item, kv head): ``tile_id = item * NUM_KV_HEADS + kv_head``, so the kv heads of one split run side by
side and read neighbouring bytes of the (token-major) cache. ``kv_start`` is a multiple of BLOCK_N
(the plan aligns splits to it), which lets `kv_tile_offsets` read one block-table entry per tile when
the page size is a multiple of BLOCK_N.

Memory layouts (see pod/batch.py and pod/kernels/common.py):
  q, o        [num_decodes, Hq, D]  (last dim contiguous; q head = kv_head * GROUP + g)
  K/V cache   contiguous [total_kv, Hkv, D] with kv_indptr, or paged [pages, page_size, Hkv, D] with
              block_table [num_seqs, max_pages]; decode request r is sequence ``seq_offset + r``
              (seq_offset = number of prefill chunks: prefill sequences come first).
  part_o      fp32 [num_partial_rows, Hq, D]; part_lse fp32 [num_partial_rows, Hq] (base 2)
  part_indptr int32 [num_decodes + 1]: request r owns partial rows part_indptr[r]:part_indptr[r+1]
  merge_counters int32 [num_decodes * Hkv], zero between launches (only with FUSE_MERGE)

`decode_tile(tile_id, args, *constexprs)` — the reusable unit (the fused POD kernel calls it with its
own tile ids). tile_id is an int32 scalar in [0, num_items * NUM_KV_HEADS); `args` is one tuple of:
  q_ptr, stride_qn, stride_qh   decode queries [num_decodes, Hq, D] and their request / head strides
  o_ptr, stride_on, stride_oh   decode output  [num_decodes, Hq, D] (q's dtype)
  k_ptr, v_ptr                  K and V caches (same strides)
  stride_kv_page                elements between pages (paged; pass 0 when contiguous)
  stride_kv_token               elements between consecutive tokens (Hkv * D if dense)
  stride_kv_head                elements between kv heads (D if dense)
  kv_indptr_ptr                 contiguous: int32 [num_seqs + 1] (any valid int32 pointer if paged)
  block_table_ptr, stride_bt    paged: int32 [num_seqs, max_pages] and its row stride
                                (any valid int32 pointer and 0 if contiguous)
  work_ptr                      int32 [num_items, 4] work list (above)
  part_indptr_ptr, part_o_ptr, part_lse_ptr   the split-KV workspace (above)
  merge_counter_ptr             int32 [num_decodes * Hkv] arrival counters (FUSE_MERGE only)
  seq_offset                    int32: sequence id of decode request 0
  qk_scale                      fp32: sm_scale * log2(e)
  NUM_KV_HEADS, GROUP, HEAD_DIM, BLOCK_M, BLOCK_N, PAGE_SIZE, PAGED, FUSE_MERGE   constexprs
With FUSE_MERGE the CTA that writes the last partial of its (request, kv head) merges the group's
partials itself (an acq_rel atomic counter decides who is last; the merger resets it to 0), so
no merge launch is needed. `DecodeWork.tile_args(batch, out)` returns the `args` tuple and
`DecodeWork.tile_constexprs(block_n)` the constexprs, so a caller never spells them out.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl

from pod.batch import BatchSpec, HybridBatch
from pod.env import device_num_sms, interpreting, unpack_batch_or_spec
from pod.kernels.common import kv_tile_offsets, online_softmax_update_qk, qk_scale_log2, softmax_finalize
from pod.kernels.configs import DECODE_AUTOTUNE, DECODE_COMPILE_CHECKS, DECODE_INTERPRET, DECODE_MAX_BLOCK_N
from pod.kernels.lpt import lpt_makespan
from pod.kernels.tables import device_tables
from pod.kernels.merge import merge_heads, merge_partials

# -- launch configurations: pod/kernels/configs.py (DECODE_AUTOTUNE, DECODE_FIXED, DECODE_INTERPRET) --
AUTOTUNE_CONFIGS = [triton.Config(kw, num_warps=w, num_stages=st) for kw, w, st in DECODE_AUTOTUNE]
MAX_BLOCK_N = DECODE_MAX_BLOCK_N
INTERPRET_CONFIG = DECODE_INTERPRET


# -- kernel -----------------------------------------------------------------------------------------
@triton.jit
def decode_tile(tile_id, args,
                NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr,
                PAGED: tl.constexpr, FUSE_MERGE: tl.constexpr):
    """One work item: the GROUP q heads of kv head `tile_id % NUM_KV_HEADS` of one request over the
    key range [kv_start, kv_end) of work row `tile_id // NUM_KV_HEADS` (layouts: module docstring).
    `args` is the tuple `DecodeWork.tile_args` builds, in this order:"""
    (q_ptr, stride_qn, stride_qh,
     o_ptr, stride_on, stride_oh,
     k_ptr, v_ptr, stride_kv_page, stride_kv_token, stride_kv_head,
     kv_indptr_ptr, block_table_ptr, stride_bt,
     work_ptr, part_indptr_ptr, part_o_ptr, part_lse_ptr, merge_counter_ptr,
     seq_offset, qk_scale) = args
    NUM_Q_HEADS: tl.constexpr = NUM_KV_HEADS * GROUP
    item = tile_id // NUM_KV_HEADS
    kv_head = tile_id % NUM_KV_HEADS
    req = tl.load(work_ptr + item * 4 + 0)
    kv_start = tl.load(work_ptr + item * 4 + 1)
    kv_end = tl.load(work_ptr + item * 4 + 2)
    part_row = tl.load(work_ptr + item * 4 + 3)
    seq = seq_offset + req

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_valid = offs_m < GROUP                      # rows GROUP..BLOCK_M-1 are padding
    q_heads = kv_head * GROUP + offs_m              # the group's q heads are consecutive

    # Q block [BLOCK_M, D]: row g = q[req, kv_head*GROUP + g, :]; padded rows are 0 (scores 0, harmless).
    q = tl.load(q_ptr + req.to(tl.int64) * stride_qn + q_heads[:, None] * stride_qh + offs_d[None, :],
                mask=row_valid[:, None], other=0.0)
    head_off = kv_head.to(tl.int64) * stride_kv_head

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)

    # Full tiles: no masking. kv_tile_offsets gives the element offset of each key row (token-major
    # cache: row n at off[n] + kv_head*stride_kv_head, D contiguous elements).
    full_end = kv_start + ((kv_end - kv_start) // BLOCK_N) * BLOCK_N
    for start in range(kv_start, full_end, BLOCK_N):
        off = kv_tile_offsets(seq, start, kv_end, kv_indptr_ptr, block_table_ptr, stride_bt,
                              stride_kv_page, stride_kv_token, BLOCK_N, PAGE_SIZE, PAGED) + head_off
        k = tl.load(k_ptr + off[:, None] + offs_d[None, :])                    # [BLOCK_N, D]
        qk = tl.dot(q, tl.trans(k))                                            # [BLOCK_M, BLOCK_N] fp32
        p, m_i, l_i, acc = online_softmax_update_qk(m_i, l_i, acc, qk, qk_scale)
        v = tl.load(v_ptr + off[:, None] + offs_d[None, :])                    # [BLOCK_N, D]
        acc = tl.dot(p.to(v.dtype), v, acc)
    # Tail: 0 or 1 tile with keys at or past kv_end masked to -inf (never reads past the sequence).
    for start in tl.range(full_end, kv_end, BLOCK_N, num_stages=1):
        key_valid = (start + offs_n) < kv_end
        off = kv_tile_offsets(seq, start, kv_end, kv_indptr_ptr, block_table_ptr, stride_bt,
                              stride_kv_page, stride_kv_token, BLOCK_N, PAGE_SIZE, PAGED) + head_off
        k = tl.load(k_ptr + off[:, None] + offs_d[None, :], mask=key_valid[:, None], other=0.0)
        qk = tl.where(key_valid[None, :], tl.dot(q, tl.trans(k)), float("-inf"))
        p, m_i, l_i, acc = online_softmax_update_qk(m_i, l_i, acc, qk, qk_scale)
        v = tl.load(v_ptr + off[:, None] + offs_d[None, :], mask=key_valid[:, None], other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc)

    out, lse2 = softmax_finalize(m_i, l_i, acc)
    if part_row < 0:
        # Single split: the final output, in q's dtype.
        tl.store(o_ptr + req.to(tl.int64) * stride_on + q_heads[:, None] * stride_oh + offs_d[None, :],
                 out.to(o_ptr.dtype.element_ty), mask=row_valid[:, None])
    else:
        # Partial of split part_row: fp32 o [Hq, D] row block and base-2 LSE [Hq].
        prow = part_row * NUM_Q_HEADS + q_heads
        tl.store(part_o_ptr + prow[:, None] * HEAD_DIM + offs_d[None, :], out, mask=row_valid[:, None])
        tl.store(part_lse_ptr + prow, lse2, mask=row_valid)
        if FUSE_MERGE:
            # Last-arriving split of this (request, kv head) merges. The barrier orders every thread's
            # partial stores before the (acq_rel, gpu-scope) arrival; the merger reads with .cg.
            tl.debug_barrier()
            num_splits = tl.load(part_indptr_ptr + req + 1) - tl.load(part_indptr_ptr + req)
            counter = merge_counter_ptr + req * NUM_KV_HEADS + kv_head
            arrived = tl.atomic_add(counter, 1, sem="acq_rel")
            if arrived == num_splits - 1:
                merge_heads(req, kv_head * GROUP, GROUP, part_indptr_ptr, part_o_ptr, part_lse_ptr,
                            o_ptr, stride_on, stride_oh, NUM_Q_HEADS, HEAD_DIM, BLOCK_M)
                tl.atomic_xchg(counter, 0)            # ready for the next launch


@triton.jit
def _with_batch_ints(args, stride_bt, seq_offset):
    """`args` (DecodeWork.tile_args) with its block-table stride and sequence offset replaced."""
    (q_ptr, stride_qn, stride_qh, o_ptr, stride_on, stride_oh, k_ptr, v_ptr, stride_kv_page,
     stride_kv_token, stride_kv_head, kv_indptr_ptr, block_table_ptr, _bt,
     work_ptr, part_indptr_ptr, part_o_ptr, part_lse_ptr, merge_counter_ptr, _seq, qk_scale) = args
    return (q_ptr, stride_qn, stride_qh, o_ptr, stride_on, stride_oh, k_ptr, v_ptr, stride_kv_page,
            stride_kv_token, stride_kv_head, kv_indptr_ptr, block_table_ptr, stride_bt,
            work_ptr, part_indptr_ptr, part_o_ptr, part_lse_ptr, merge_counter_ptr, seq_offset, qk_scale)


# The block-table stride and the first decode's sequence id change with every batch of a serving engine
# (0, 1 or more prefill chunks; the longest context's pages): they travel outside `args` (which holds
# zeros in their slots) and are not specialised on, so a new batch never means a new compile.
@triton.jit(do_not_specialize=["stride_bt", "seq_offset"])
def _decode_kernel(args, stride_bt, seq_offset, kv_chunk_hint,
                   NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr,
                   PAGED: tl.constexpr, FUSE_MERGE: tl.constexpr):
    # grid: (num_items * NUM_KV_HEADS,); kv_chunk_hint only keys the autotuner (split length bucket).
    decode_tile(tl.program_id(0), _with_batch_ints(args, stride_bt, seq_offset), NUM_KV_HEADS, GROUP,
                HEAD_DIM, BLOCK_M, BLOCK_N, PAGE_SIZE, PAGED, FUSE_MERGE)


_decode_kernel_autotuned = triton.autotune(
    configs=AUTOTUNE_CONFIGS,
    key=["kv_chunk_hint", "NUM_KV_HEADS", "GROUP", "HEAD_DIM", "PAGE_SIZE", "PAGED", "FUSE_MERGE"],
)(_decode_kernel)


# -- plan ---------------------------------------------------------------------------------------------
@dataclass
class DecodeWork:
    """Everything `decode` needs that depends only on the batch's shape (FlashInfer's plan()).
    A KernelWork (pod/kernels/contract.py)."""

    num_decodes: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    page_size: int | None          # None: contiguous KV
    seq_offset: int                # sequence id of decode request 0 (= number of prefill chunks)
    splits: tuple[int, ...]        # splits of every request
    kv_chunk_len: int              # keys per split (the last split of a request may be shorter)
    kv_align: int                  # every kv_start is a multiple of this (BLOCK_N must divide it)
    work: torch.Tensor             # int32 [num_items, 4]: (request, kv_start, kv_end, part_row)
    part_indptr: torch.Tensor      # int32 [num_decodes + 1]
    part_o: torch.Tensor           # fp32 [max(rows, 1), Hq, D]
    part_lse: torch.Tensor         # fp32 [max(rows, 1), Hq]
    merge_reqs: torch.Tensor       # int32 [num requests with > 1 split]
    merge_counters: torch.Tensor   # int32 [num_decodes * Hkv], zeros (used with fuse_merge)
    fuse_merge: bool
    num_sms: int
    target_ctas: int
    config: dict | None            # fixed {"BLOCK_N", "num_warps", "num_stages"}, or None: autotune
    split_policy: str = "balanced" # how the default split was chosen (plan_decode's split_policy)

    @property
    def group(self) -> int:
        return self.num_q_heads // self.num_kv_heads

    @property
    def block_m(self) -> int:
        return max(16, triton.next_power_of_2(self.group))

    @property
    def num_items(self) -> int:
        return self.work.shape[0]

    @property
    def num_tiles(self) -> int:
        """CTAs of the decode launch: one per (request, split, kv head)."""
        return self.num_items * self.num_kv_heads

    @property
    def needs_merge(self) -> bool:
        return self.merge_reqs.numel() > 0

    def describe(self) -> dict:
        """JSON-able knobs for result rows (backend_config): the split plan and the launch config. An
        autotuned plan reports the autotuner's pick once a launch has made it."""
        d = dict(kv_chunk_len=self.kv_chunk_len, max_splits=max(self.splits, default=0),
                 num_items=self.num_items, num_tiles=self.num_tiles,
                 partial_rows=sum(s for s in self.splits if s > 1), target_ctas=self.target_ctas,
                 split_policy=self.split_policy, fuse_merge=self.fuse_merge,
                 config=dict(self.config) if self.config is not None else "autotune")
        if self.config is None:
            best = getattr(_decode_kernel_autotuned, "best_config", None)
            if best is not None:
                d["config"] = dict(BLOCK_N=best.kwargs.get("BLOCK_N"), num_warps=best.num_warps,
                                   num_stages=best.num_stages)
            d["autotuned"] = True
        return d

    def runner(self, batch: HybridBatch, out: torch.Tensor):
        """``launch() -> out`` with its arguments bound once (`decode_runner`)."""
        return decode_runner(batch, self, out)

    def tile_args(self, batch: HybridBatch, out: torch.Tensor) -> tuple:
        """Runtime arguments of `decode_tile` after tile_id, in its order (see the module docstring)."""
        k, v, q = batch.k_cache, batch.v_cache, batch.q_decode
        assert k.stride() == v.stride() and k.stride(-1) == 1 and q.stride(-1) == 1 and out.stride(-1) == 1
        if self.page_size:
            page_s, tok_s, head_s = k.stride(0), k.stride(1), k.stride(2)
            kv_indptr, table, bt_s = batch.block_table, batch.block_table, batch.block_table.stride(0)
        else:
            page_s, tok_s, head_s = 0, k.stride(0), k.stride(1)
            kv_indptr, table, bt_s = batch.kv_indptr, batch.kv_indptr, 0
        return (q, q.stride(0), q.stride(1), out, out.stride(0), out.stride(1),
                k, v, page_s, tok_s, head_s, kv_indptr, table, bt_s,
                self.work, self.part_indptr, self.part_o, self.part_lse, self.merge_counters,
                self.seq_offset, qk_scale_log2(batch.sm_scale))

    def kernel_args(self, batch: HybridBatch, out: torch.Tensor) -> tuple:
        """(args, stride_bt, seq_offset) of `_decode_kernel`: tile_args with its two batch-varying ints
        taken out (zeros in their slots), passed unspecialised."""
        args = self.tile_args(batch, out)
        return args[:13] + (0,) + args[14:19] + (0,) + args[20:], args[13], args[19]

    def tile_constexprs(self, block_n: int) -> dict:
        """Constexprs of `decode_tile`, with the caller's BLOCK_N (it must divide kv_align: tiles start
        at multiples of BLOCK_N, which `kv_tile_offsets`' one-page-a-tile path relies on)."""
        assert block_n == 0 or self.kv_align % block_n == 0, \
            f"BLOCK_N={block_n} must divide the plan's split alignment {self.kv_align}"
        return dict(NUM_KV_HEADS=self.num_kv_heads, GROUP=self.group, HEAD_DIM=self.head_dim,
                    BLOCK_M=self.block_m, BLOCK_N=block_n, PAGE_SIZE=self.page_size or 1,
                    PAGED=bool(self.page_size), FUSE_MERGE=self.fuse_merge)


def _round_up(x: int, a: int) -> int:
    return (x + a - 1) // a * a


def choose_kv_chunk_len(kv_lens: list[int], num_kv_heads: int, target_ctas: int, align: int,
                        min_chunk_len: int) -> int:
    """Keys per split: the smallest multiple of `align` (>= min_chunk_len) whose tile count
    ``sum_r ceil(L_r / chunk) * Hkv`` fits in `target_ctas` (FlashInfer's split-KV rule); a batch that
    already has `target_ctas` tiles unsplit gets one split per request."""
    longest = _round_up(max(kv_lens), align)
    if len(kv_lens) * num_kv_heads >= target_ctas:
        return longest

    def tiles(chunk: int) -> int:
        return sum((n + chunk - 1) // chunk for n in kv_lens) * num_kv_heads

    lo, hi = max(align, _round_up(min_chunk_len, align)) // align, longest // align
    if lo >= hi:
        return longest
    while lo < hi:               # tiles() is non-increasing in chunk: bisect on multiples of align
        mid = (lo + hi) // 2
        if tiles(mid * align) <= target_ctas:
            hi = mid
        else:
            lo = mid + 1
    return lo * align


def choose_kv_chunk_len_balanced(kv_lens: list[int], num_kv_heads: int, target_ctas: int, align: int,
                                 min_chunk_len: int, tile_overhead: int = 128,
                                 max_candidates: int = 32) -> int:
    """Keys per split minimising the modelled makespan of the launch: tiles (one per request split and
    kv head, cost = its keys + `tile_overhead` key-equivalents for the q load, epilogue and merge) run
    longest first on `target_ctas` equal slots. Unlike the fit rule this also splits a batch whose
    unsplit tiles fill 1.2 waves (e.g. 40 x 8K on 264 slots), and leaves 64 x 8K (1.94 waves) alone.
    Ties go to the longer chunk (fewer partials). A batch with >= 4 waves of tiles is not split."""
    longest = _round_up(max(kv_lens), align)
    min_chunk = max(align, _round_up(min_chunk_len, align))
    if len(kv_lens) * num_kv_heads >= 4 * target_ctas or longest <= min_chunk:
        return longest
    candidates = sorted({max(min_chunk, _round_up(-(-max(kv_lens) // s), align))
                         for s in range(1, max_candidates + 1)}, reverse=True)
    # Each candidate's tiles, all candidates at once: a request of n keys has n // chunk full splits and
    # maybe a shorter last one, for every kv head (the same tiles); a tile costs its keys + tile_overhead.
    lens = Counter(kv_lens)
    n_keys = np.fromiter(lens.keys(), dtype=np.int64, count=len(lens))
    mult = np.fromiter(lens.values(), dtype=np.int64, count=len(lens)) * num_kv_heads
    chunks = np.array(candidates, dtype=np.int64)[:, None]
    full, rest = n_keys // chunks, n_keys % chunks
    tiles = (mult * (full + (rest > 0))).sum(1)
    feasible = int(np.argmax(tiles > 8 * target_ctas)) if (tiles > 8 * target_ctas).any() else len(candidates)
    total = (mult * (full * (chunks + tile_overhead) + (rest > 0) * (rest + tile_overhead))).sum(1)
    longest_tile = np.where(full.max(1) > 0, chunks[:, 0], rest.max(1)) + tile_overhead
    # Lower bounds on each candidate's makespan (integer costs: exact): every schedule ends at or after the
    # longest tile and the mean load; with at most target_ctas tiles LPT's makespan is the longest tile.
    n_full = (mult * full).sum(1)
    low = np.maximum(longest_tile, total / target_ctas).tolist()
    exact = np.where(tiles <= target_ctas, longest_tile, -1).tolist()

    def runs(i: int) -> dict:
        last = rest[i] > 0
        keys, at = np.unique(rest[i][last], return_inverse=True)
        out = dict(zip((keys + tile_overhead).tolist(), np.bincount(at, mult[last]).astype(np.int64).tolist()))
        if n_full[i]:
            out[candidates[i] + tile_overhead] = int(n_full[i])
        return out

    # The first chunk of least makespan (ties go to the longer chunk: fewer partials). Candidates go by
    # lower bound; LPT runs only for those whose bound could still beat, or earlier in the list tie, the best.
    best_i, best_cost = None, None
    for i in sorted(range(feasible), key=lambda i: (low[i], i)):
        if best_cost is not None and (low[i] > best_cost or (low[i] == best_cost and i > best_i)):
            continue
        cost = exact[i] if exact[i] >= 0 else lpt_makespan(runs(i), target_ctas)
        if best_cost is None or (cost, i) < (best_cost, best_i):
            best_i, best_cost = i, cost
    return candidates[best_i] if best_i is not None else longest


def split_items(lens: np.ndarray, chunks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The decode plan's items, one a (request, split), and each request's split count: int64 rows
    (request, kv_start, kv_end, partial row or -1) covering keys [i * c, min(n, (i + 1) * c)) of request r
    (n = lens[r], c = chunks[r]); partial rows numbered request by request, only for requests split in
    two or more; longest key range first, request order among equals (a stable sort)."""
    s = (lens + chunks - 1) // chunks
    req = np.repeat(np.arange(len(lens)), s)
    i = np.arange(req.size) - np.repeat(np.cumsum(s) - s, s)     # the split's index in its request
    n_parts = np.where(s > 1, s, 0)
    part = np.where(s[req] > 1, np.repeat(np.cumsum(n_parts) - n_parts, s) + i, -1)
    ks = i * chunks[req]
    work = np.stack([req, ks, np.minimum(lens[req], ks + chunks[req]), part], axis=1)
    return work[np.argsort(work[:, 1] - work[:, 2], kind="stable")], s


SPLIT_POLICIES = {"balanced": choose_kv_chunk_len_balanced, "fit": choose_kv_chunk_len}


def plan_decode(batch_or_spec: HybridBatch | BatchSpec, num_sms: int | None = None, *,
                ctas_per_sm: int = 2, target_ctas: int | None = None, kv_splits: int | None = None,
                kv_chunk_len: int | None = None, kv_chunk_lens=None, min_kv_chunk_len: int = 256,
                split_policy: str = "balanced", block_n: int | None = None, num_warps: int = 4,
                num_stages: int | None = None, fuse_merge: bool = False,
                device: torch.device | str | None = None) -> DecodeWork:
    """Plan the decode part of a batch: split counts, work list, workspace. Shape only, no launch.

    Splits (first that is given wins):
      kv_chunk_lens keys per split for each request (each rounded up to the split alignment; the plan's
                    kv_chunk_len is their largest);
      kv_chunk_len  keys per split (rounded up to the split alignment);
      kv_splits     at most this many splits per request (1: never split);
      target_ctas   split so that the launch has about this many CTAs;
      default       target_ctas = num_sms * ctas_per_sm (num_sms: the device's SM count if None).
    split_policy (with target_ctas/default): "balanced" picks the chunk with the shortest modelled
              makespan (`choose_kv_chunk_len_balanced`), "fit" the smallest chunk whose tiles fit in
              one wave of target_ctas (FlashInfer's rule, `choose_kv_chunk_len`).
    block_n:  fix BLOCK_N (and num_warps/num_stages) instead of autotuning; always fixed in the
              interpreter (INTERPRET_CONFIG). num_stages None: 3 contiguous, 5 paged (two K/V buffers
              in flight either way; paged spends a stage on the block-table load).
              Splits start at multiples of BLOCK_N (of MAX_BLOCK_N when autotuned), which is what
              lets a fused kernel run `decode_tile` with any BLOCK_N dividing that alignment.
    fuse_merge: the last split CTA of each (request, kv head) merges; no merge launch.
    """
    spec, device = unpack_batch_or_spec(batch_or_spec, device)
    for name, v in (("kv_splits", kv_splits), ("kv_chunk_len", kv_chunk_len), ("target_ctas", target_ctas)):
        if v is not None and v < 1:
            raise ValueError(f"plan_decode: {name}={v} must be >= 1")
    h = spec.heads
    if block_n is None and interpreting():
        config = dict(INTERPRET_CONFIG)
    elif block_n is not None:
        stages = num_stages if num_stages is not None else (5 if spec.paged else 3)
        config = dict(BLOCK_N=block_n, num_warps=num_warps, num_stages=stages)
    else:
        config = None
    align = config["BLOCK_N"] if config else MAX_BLOCK_N
    num_sms = num_sms if num_sms is not None else device_num_sms(device)
    target = target_ctas if target_ctas is not None else num_sms * ctas_per_sm
    lens = list(spec.decode_context_lens)

    if kv_chunk_lens is not None and len(kv_chunk_lens) != len(lens):
        raise ValueError(f"plan_decode: kv_chunk_lens has {len(kv_chunk_lens)} entries for {len(lens)} requests")
    if kv_chunk_lens is not None and min(kv_chunk_lens, default=1) < 1:
        raise ValueError(f"plan_decode: kv_chunk_lens={list(kv_chunk_lens)} must be >= 1")
    per_request = _round_up(np.asarray(kv_chunk_lens, dtype=np.int64), align) if kv_chunk_lens is not None else None
    if not lens:
        chunk = align
    elif per_request is not None:
        chunk = int(per_request.max())
    elif kv_chunk_len is not None:
        chunk = _round_up(kv_chunk_len, align)
    elif kv_splits is not None:
        chunk = _round_up(math.ceil(max(lens) / max(1, kv_splits)), align)
    else:
        if split_policy not in SPLIT_POLICIES:
            raise ValueError(f"split_policy={split_policy!r}: choose one of {sorted(SPLIT_POLICIES)}")
        chunk = SPLIT_POLICIES[split_policy](lens, h.num_kv_heads, target, align, min_kv_chunk_len)

    n = np.asarray(lens, dtype=np.int64)
    if per_request is not None and lens:
        c = per_request
    elif kv_splits is not None and kv_chunk_len is None:
        c = _round_up(-(-n // kv_splits), align)       # at most kv_splits splits a request, BLOCK_N-aligned
    else:
        c = np.full(len(lens), chunk, dtype=np.int64)
    work, s = split_items(n, c)
    n_parts = np.where(s > 1, s, 0)                    # partial rows a request writes
    part_indptr = np.concatenate([[0], np.cumsum(n_parts)])
    merge_reqs = np.flatnonzero(s > 1)
    splits = s.tolist()
    rows = int(part_indptr[-1])
    # The int tables in one host-to-device copy (pod/kernels/tables.py); the merge counters start at zero.
    tables = device_tables(device, work=work, part_indptr=part_indptr, merge_reqs=merge_reqs,
                           merge_counters=np.zeros(max(len(lens) * h.num_kv_heads, 1), dtype=np.int64))
    return DecodeWork(
        num_decodes=len(lens), num_q_heads=h.num_q_heads, num_kv_heads=h.num_kv_heads,
        head_dim=h.head_dim, page_size=spec.page_size, seq_offset=spec.num_prefill,
        splits=tuple(splits), kv_chunk_len=chunk, kv_align=align,
        part_o=torch.empty(max(rows, 1), h.num_q_heads, h.head_dim, dtype=torch.float32, device=device),
        part_lse=torch.empty(max(rows, 1), h.num_q_heads, dtype=torch.float32, device=device),
        fuse_merge=fuse_merge, num_sms=num_sms, target_ctas=target, config=config, split_policy=split_policy,
        **tables)


# -- run ----------------------------------------------------------------------------------------------
def decode_runner(batch: HybridBatch, work: DecodeWork, out: torch.Tensor):
    """A closure that launches the planned decode into `out`, its arguments bound once (the least host
    work a call: what a backend's timed run() should call). Returns out."""
    if work.num_items == 0:
        return lambda: out
    args = work.kernel_args(batch, out) + (triton.next_power_of_2(work.kv_chunk_len),)
    grid = (work.num_tiles,)
    if work.config is None:
        constexprs = work.tile_constexprs(block_n=0)
        del constexprs["BLOCK_N"]                    # the autotuner's choice
        kernel, launch_kw = _decode_kernel_autotuned[grid], constexprs
    else:
        cfg = work.config
        kernel = _decode_kernel[grid]
        launch_kw = dict(work.tile_constexprs(cfg["BLOCK_N"]), num_warps=cfg["num_warps"],
                         num_stages=cfg["num_stages"])
    merge = work.needs_merge and not work.fuse_merge

    def run() -> torch.Tensor:
        kernel(*args, **launch_kw)
        if merge:
            merge_partials(work.merge_reqs, work.part_indptr, work.part_o, work.part_lse, out)
        return out
    return run


def decode(batch: HybridBatch, work: DecodeWork, out: torch.Tensor | None = None) -> torch.Tensor:
    """Decode attention of `batch` as planned in `work`: launches only (decode, then merge if needed).

    out: [num_decodes, Hq, D] in q's dtype (allocated if None). Returns out.
    """
    if out is None:
        out = torch.empty_like(batch.q_decode)
    return work.runner(batch, out)()


def sm90_report(spec: BatchSpec, *, block_n: int = 64, num_warps: int = 4, num_stages: int = 3,
                fuse_merge: bool = False) -> dict:
    """Compile `_decode_kernel` for sm_90 without a GPU (Triton's bundled ptxas), specialised as a real
    launch on `spec`'s tensors would be (built small on the CPU), and report shared memory, registers,
    spills and cp.async counts (`pod.kernels.common.sm90_compile_report`). Needs TRITON_INTERPRET unset.
    """
    from pod.batch import make_batch
    from pod.kernels.common import sm90_compile_report
    batch = make_batch(spec, device="cpu")
    work = plan_decode(batch, block_n=block_n, num_warps=num_warps, num_stages=num_stages,
                       fuse_merge=fuse_merge, kv_splits=2, device="cpu")
    out = torch.empty_like(batch.q_decode)
    report = sm90_compile_report(_decode_kernel, *work.kernel_args(batch, out), 1,
                                 **work.tile_constexprs(block_n), num_warps=num_warps, num_stages=num_stages)
    # 16-byte cp.async: K/V tiles streamed through shared memory by the software pipeline.
    return dict(batch=spec.describe(), block_n=block_n, num_warps=num_warps, num_stages=num_stages,
                fuse_merge=fuse_merge, **report)


if __name__ == "__main__":
    # No GPU needed: compile for sm_90, one JSON line a config. To check and time decode plans on a GPU:
    #   python -m experiments.attention -m sweep=decode_configs backend=triton_decode \
    #       backend_options.decode_config=auto,fit,fixed64,auto_fused_merge,no_split
    import json
    for kw in DECODE_COMPILE_CHECKS:
        print(json.dumps(sm90_report(**kw)))
