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
                 args,                              # prefill_launch_args(batch, work, out, lse): a tuple
                 GROUP, HEAD_DIM, BLOCK_M, BLOCK_N, PAGE_SIZE, PAGED, HAS_LSE)  # work.constexprs()

The runtime arguments travel as one tuple (its order is written once, where prefill_tile unpacks it);
kv_indptr is read only when not PAGED and block_table only when PAGED (pass any int32 tensor for the
other). K and V must have the same strides. The tile writes O and (HAS_LSE) LSE rows of its block
and head only; rows past chunk_len are neither read nor written.

Configs: pod/kernels/configs.py (PREFILL_CONFIGS; "autotune" is the GPU default, "interpret" the CPU
tests'). The harness checks and times them (`backend_options.prefill_config=<name>`);
`python -m pod.kernels.prefill --sm90 [NAMES]` reports sm_90 shared memory/registers without a GPU.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl

from pod.batch import BatchSpec, HybridBatch
from pod.env import interpreting, unpack_batch_or_spec
from pod.kernels.common import kv_tile_offsets, online_softmax_update_qk, qk_scale_log2, softmax_finalize
from pod.kernels.configs import (PREFILL_AUTOTUNE, PREFILL_COMPILE_CHECKS, PREFILL_CONFIGS, PREFILL_DEFAULT,
                                 PrefillConfig)


# ------------------------------------------------------------------------------------------------
# The kernel
# ------------------------------------------------------------------------------------------------
@triton.jit
def _kv_step(q, q_pos, m_i, l_i, acc, K, V, start, seq, kv_len, kv_indptr, block_table,
             stride_bt_seq, stride_kv_page, stride_kv_tok, kv_head_off, qk_scale,
             HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr,
             PAGED: tl.constexpr, MASKED: tl.constexpr):
    """One KV tile (keys start..start+BLOCK_N-1) of one query block: scores, online softmax, P @ V.

    MASKED: apply the causal mask (key <= query position) and the length mask (key < kv_len).
    Row offsets of the tile's keys come from `kv_tile_offsets` (contiguous: the sequence's rows;
    paged: one block-table entry a key)."""
    offs_n = start + tl.arange(0, BLOCK_N)
    key_ok = offs_n < kv_len
    off = kv_tile_offsets(seq, start, kv_len, kv_indptr, block_table, stride_bt_seq,
                          stride_kv_page, stride_kv_tok, BLOCK_N, PAGE_SIZE, PAGED) + kv_head_off
    offs_d = tl.arange(0, HEAD_DIM)
    if MASKED:
        k = tl.load(K + off[None, :] + offs_d[:, None], mask=key_ok[None, :], other=0.0)
    else:
        k = tl.load(K + off[None, :] + offs_d[:, None])         # K^T tile [D, BLOCK_N]
    qk = tl.dot(q, k)                                          # [BLOCK_M, BLOCK_N] raw scores
    if MASKED:
        visible = (offs_n[None, :] <= q_pos[:, None]) & key_ok[None, :]
        qk = tl.where(visible, qk, float("-inf"))
    # exp2 domain: p = 2^(qk * qk_scale - m), one FMA a score.
    p, m_i, l_i, acc = online_softmax_update_qk(m_i, l_i, acc, qk, qk_scale)
    if MASKED:
        # Slots past kv_len of a paged sequence's last page hold stale data: keep NaN out of P @ V.
        v = tl.load(V + off[:, None] + offs_d[None, :], mask=key_ok[:, None], other=0.0)
    else:
        v = tl.load(V + off[:, None] + offs_d[None, :])
    acc = tl.dot(p.to(v.dtype), v, acc)
    return m_i, l_i, acc


@triton.jit
def prefill_tile(tile_id, args,
                 GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr, PAGED: tl.constexpr,
                 HAS_LSE: tl.constexpr):
    """One tile: BLOCK_M query rows of one chunk, one q head (see the module docstring). `args` is the
    tuple `prefill_launch_args` builds, in this order:"""
    (Q, K, V, O, LSE,                                   # pointers (LSE ignored unless HAS_LSE)
     q_indptr, kv_lens, kv_indptr, block_table, work_units,   # int32 pointers
     num_q_heads,
     stride_q_tok, stride_q_head, stride_o_tok, stride_o_head,
     stride_lse_tok, stride_lse_head,
     stride_kv_page, stride_kv_tok, stride_kv_head, stride_bt_seq,
     qk_scale) = args                                   # float: sm_scale * log2(e)
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
    kv_head_off = kv_head.to(tl.int64) * stride_kv_head

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)

    # Keys [0, full_end): every row of the block sees them (key < context + first row of the block).
    full_end = (context + q_block * BLOCK_M) // BLOCK_N * BLOCK_N
    # Keys [full_end, kv_hi): the diagonal, causal-masked. kv_hi: one past the last row's position.
    kv_hi = context + tl.minimum((q_block + 1) * BLOCK_M, chunk_len)
    for start in tl.range(0, full_end, BLOCK_N):
        m_i, l_i, acc = _kv_step(q, q_pos, m_i, l_i, acc, K, V, start, chunk, kv_len, kv_indptr,
                                 block_table, stride_bt_seq, stride_kv_page, stride_kv_tok, kv_head_off,
                                 qk_scale, HEAD_DIM, BLOCK_N, PAGE_SIZE, PAGED, False)
    for start in range(full_end, kv_hi, BLOCK_N):
        m_i, l_i, acc = _kv_step(q, q_pos, m_i, l_i, acc, K, V, start, chunk, kv_len, kv_indptr,
                                 block_table, stride_bt_seq, stride_kv_page, stride_kv_tok, kv_head_off,
                                 qk_scale, HEAD_DIM, BLOCK_N, PAGE_SIZE, PAGED, True)

    out, lse2 = softmax_finalize(m_i, l_i, acc)
    tl.store(O + q_rows[:, None] * stride_o_tok + head * stride_o_head + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=row_ok[:, None])
    if HAS_LSE:
        tl.store(LSE + q_rows * stride_lse_tok + head * stride_lse_head, lse2, mask=row_ok)


@triton.jit
def _prefill_kernel(args, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr, PAGED: tl.constexpr,
                    HAS_LSE: tl.constexpr):
    prefill_tile(tl.program_id(0), args, GROUP, HEAD_DIM, BLOCK_M, BLOCK_N, PAGE_SIZE, PAGED, HAS_LSE)


_prefill_kernel_autotuned = triton.autotune(
    configs=[triton.Config(kw, num_warps=w, num_stages=st) for kw, w, st in PREFILL_AUTOTUNE],
    key=["GROUP", "HEAD_DIM", "BLOCK_M", "PAGE_SIZE", "PAGED", "HAS_LSE"],
)(_prefill_kernel)


# ------------------------------------------------------------------------------------------------
# Plan (host, shape-only) and run (launch only)
# ------------------------------------------------------------------------------------------------
def default_config() -> PrefillConfig:
    """"interpret" under the interpreter, else PREFILL_DEFAULT (autotuned)."""
    return PREFILL_CONFIGS["interpret" if interpreting() else PREFILL_DEFAULT]


def resolve_config(config: PrefillConfig | str | None) -> PrefillConfig:
    """A PrefillConfig from None (the default), a name of PREFILL_CONFIGS, or a PrefillConfig. Under the
    interpreter an autotuned config runs the "interpret" tiles (the autotuner needs a GPU)."""
    if config is None:
        return default_config()
    if isinstance(config, str):
        if config not in PREFILL_CONFIGS:
            raise ValueError(f"prefill config {config!r} unknown; named configs: {sorted(PREFILL_CONFIGS)}")
        config = PREFILL_CONFIGS[config]
    if config.block_n is None and interpreting():
        config = PREFILL_CONFIGS["interpret"]
    return config


@dataclass
class PrefillWork:
    """Everything `prefill()` needs besides the batch tensors: the work list and launch constants.
    A KernelWork (pod/kernels/contract.py)."""
    work_units: torch.Tensor        # [num_units, 2] int32 (chunk, q_block), heaviest first, on device
    num_units: int
    num_q_heads: int
    group: int
    head_dim: int
    page_size: int | None           # None: contiguous KV
    paged: bool
    config: PrefillConfig
    unit_cost: list[int] = field(default_factory=list)   # keys seen by each unit's last row (host)

    @property
    def num_tiles(self) -> int:
        """Tiles (= CTAs of the standalone kernel): one per (unit, q head)."""
        return self.num_units * self.num_q_heads

    @property
    def autotune(self) -> bool:
        return self.config.block_n is None

    def constexprs(self, has_lse: bool = True) -> dict:
        """The constexpr arguments of `prefill_tile` (BLOCK_N omitted when autotuned)."""
        c = dict(GROUP=self.group, HEAD_DIM=self.head_dim, BLOCK_M=self.config.block_m,
                 PAGE_SIZE=self.page_size or 1, PAGED=self.paged, HAS_LSE=has_lse)   # ignored unless PAGED
        if not self.autotune:
            c["BLOCK_N"] = self.config.block_n
        return c

    def describe(self) -> dict:
        """JSON-able knobs for result rows (backend_config). An autotuned plan reports the autotuner's
        pick once a launch has made it."""
        d = self.config.to_json()
        if self.autotune:
            best = getattr(_prefill_kernel_autotuned, "best_config", None)
            if best is not None:
                d.update(block_n=best.kwargs.get("BLOCK_N"), num_warps=best.num_warps,
                         num_stages=best.num_stages)
            d["autotuned"] = True
        return d

    def runner(self, batch: HybridBatch, out: torch.Tensor, lse: torch.Tensor | None = None):
        """``launch() -> out`` with its arguments bound once (`prefill_runner`)."""
        return prefill_runner(batch, self, out, lse)


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
    """Plan the prefill part of a batch: work list (on `device`: pod.env.unpack_batch_or_spec) and
    constants. Depends only on the batch's shape; call once per batch shape, then `prefill()` per layer."""
    spec, device = unpack_batch_or_spec(batch_or_spec, device)
    cfg = resolve_config(config)
    if cfg.block_n is not None and cfg.block_n < 16 or cfg.block_m < 16:
        raise ValueError(f"prefill config {cfg}: block_m and block_n must be >= 16 (tl.dot)")
    units, cost = plan_units(spec, cfg.block_m)
    work_units = torch.tensor(units if units else [[0, 0]], dtype=torch.int32).reshape(-1, 2)
    h = spec.heads
    return PrefillWork(work_units=work_units.to(device), num_units=len(units),
                       num_q_heads=h.num_q_heads, group=h.group_size, head_dim=h.head_dim,
                       page_size=spec.page_size, paged=spec.paged, config=cfg, unit_cost=cost)


def prefill_launch_args(batch: HybridBatch, work: PrefillWork, out: torch.Tensor,
                        lse: torch.Tensor | None) -> tuple:
    """`prefill_tile`'s `args` tuple (its order: where prefill_tile unpacks it)."""
    k, v = batch.k_cache, batch.v_cache
    assert k.stride() == v.stride(), "K and V caches must share strides"
    assert batch.q_prefill.stride(-1) == 1 and out.stride(-1) == 1 and k.stride(-1) == 1
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
    grid = (work.num_tiles,)

    def launch() -> torch.Tensor:
        if work.num_units:
            kernel[grid](args, **const, **opts)
        return out
    return launch


def prefill(batch: HybridBatch, work: PrefillWork, out: torch.Tensor | None = None,
            lse: torch.Tensor | None = None, return_lse: bool = True
            ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch the prefill kernel. Returns (out [tokens, Hq, D] in q's dtype, lse2 [tokens, Hq] fp32 or None).

    `out`/`lse` may be preallocated (e.g. by a backend's prepare); otherwise they are allocated here.
    No host synchronisation: only a launch. For repeated calls `work.runner` binds arguments once."""
    if out is None:
        out = torch.empty_like(batch.q_prefill)
    if lse is None and return_lse:
        lse = torch.empty(batch.q_prefill.shape[:2], dtype=torch.float32, device=out.device)
    work.runner(batch, out, lse)()
    return out, lse


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
    report = sm90_compile_report(_prefill_kernel, prefill_launch_args(batch, work, out, lse),
                                 **work.constexprs(), num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return dict(config=json_name(cfg), page_size=page_size, head_dim=head_dim, **report)


if __name__ == "__main__":
    import argparse
    import json
    parser = argparse.ArgumentParser(description="prefill kernel: sm_90 compile report (no GPU needed); "
                                     "to check and time configs on a GPU: python -m experiments.attention "
                                     "-m sweep=prefill_configs backend=triton_prefill "
                                     "backend_options.prefill_config=autotune,h100,fused")
    parser.add_argument("--sm90", nargs="*", metavar="CONFIG",
                        help="compile these named configs for sm_90 and print JSON lines")
    parser.add_argument("--page-size", type=int, default=None)
    cli = parser.parse_args()
    for name in cli.sm90 or PREFILL_COMPILE_CHECKS:
        print(json.dumps(sm90_report(name, page_size=cli.page_size)))
