"""Shared `@triton.jit` helpers of the prefill, decode and fused POD kernels.

Conventions every kernel of ours follows (the decode merge and the fused kernel rely on them):

* **exp2 domain.** Scores are computed as ``s2 = (q . k) * qk_scale`` with
  ``qk_scale = sm_scale * log2(e)`` (see `qk_scale_log2`), so ``exp(sm_scale * q.k) = 2 ** s2``
  and the softmax uses the cheaper ``exp2``. Masked scores are ``-inf``.
* **Online softmax state** of a block of query rows: ``m`` (running row max of s2, fp32 [M]),
  ``l`` (running row sum of ``2 ** (s2 - m)``, fp32 [M]) and ``acc`` (un-normalised output,
  fp32 [M, D]). `online_softmax_update` advances it by one KV tile; `softmax_finalize` turns it into
  the output and the log-sum-exp.
* **LSE is base 2**: ``lse2 = m + log2(l) = log2(sum_j 2 ** s2_j) = ln(sum_j exp(sm_scale q.k_j)) * log2(e)``,
  fp32 (natural in the exp2 domain; no conversion in the merge). Two partial results (o_a, lse_a), (o_b, lse_b) over
  disjoint key sets merge as ``lse = max + log2(2**(lse_a-max) + 2**(lse_b-max))``,
  ``o = o_a * 2**(lse_a-lse) + o_b * 2**(lse_b-lse)``. Natural-log LSE is ``lse2 * ln(2)``.
  A row that saw no key at all has ``lse2 = -inf`` and output 0.
* **KV cache layouts** (token-major "NHD", as pod/batch.py documents):
  contiguous ``[total_kv_tokens, Hkv, D]``, sequence s holds rows ``kv_indptr[s]:kv_indptr[s+1]``;
  paged ``[num_pages, page_size, Hkv, D]``, token j of sequence s lives in page
  ``block_table[s, j // page_size]`` at slot ``j % page_size``. `kv_tile_offsets` hides the
  difference: it returns the element offset of the first element (head 0, dim 0) of every key row of a
  tile; add ``kv_head * stride_head + d`` to address elements. K and V caches must share strides.

Device helpers: `online_softmax_update` (exp2-domain scores), `online_softmax_update_qk` (raw q.k and
the scale, one FMA a score), `softmax_finalize`, `kv_tile_offsets`. Host helpers: `qk_scale_log2`,
`lse2_to_natural`, `sm90_compile_report` (compile any of our Triton kernels for sm_90 on a GPU-less
machine and read shared memory, registers, spills, wgmma/cp.async/TMA counts), `ptxas_report`
(registers and spills of any PTX, e.g. a Gluon kernel's).
"""
from __future__ import annotations

import os
import re
from collections import Counter

import triton
import triton.language as tl

LOG2E = 1.4426950408889634  # log2(e): exp(x) == exp2(x * LOG2E)
LN2 = 0.6931471805599453


def qk_scale_log2(sm_scale: float) -> float:
    """Host-side: the factor that takes q.k to the exp2 domain (sm_scale * log2(e))."""
    return float(sm_scale) * LOG2E


def lse2_to_natural(lse2):
    """Host-side: base-2 LSE (our kernels' output) -> natural-log LSE (torch.logsumexp's)."""
    return lse2 * LN2


@triton.jit
def online_softmax_update(m_i, l_i, acc, s2):
    """Advance the online-softmax state of M query rows by one tile of N scores.

    Args:
      m_i:  fp32 [M] running max of the exp2-domain scores (``-inf`` before the first tile).
      l_i:  fp32 [M] running sum of ``2 ** (s2 - m_i)``.
      acc:  fp32 [M, D] running un-normalised output ``sum_j 2 ** (s2_j - m_i) v_j``.
      s2:   fp32 [M, N] exp2-domain scores of this tile (``q.k * qk_scale``), ``-inf`` where masked.

    Returns ``(p, m_new, l_new, acc_scaled)``: ``p`` fp32 [M, N] = ``2 ** (s2 - m_new)`` (0 where
    masked); the caller finishes the step with ``acc_scaled += p @ v`` (``tl.dot(p.to(v.dtype), v)``
    for a matrix tile, or ``tl.sum(p[:, :, None] * v[None], 1)`` for a few decode rows).
    Rows with every score so far masked keep ``m = -inf, l = 0, acc = 0`` (no NaN).
    """
    m_new = tl.maximum(m_i, tl.max(s2, 1))
    # Rows that have seen only masked keys: subtract 0 instead of -inf so exp2 gives 0, not NaN.
    m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_sub)
    p = tl.math.exp2(s2 - m_sub[:, None])
    l_new = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    return p, m_new, l_new, acc


@triton.jit
def online_softmax_update_qk(m_i, l_i, acc, qk, qk_scale):
    """`online_softmax_update` taking raw scores ``qk = q . k`` (fp32 [M, N], ``-inf`` where masked)
    and the exp2-domain factor ``qk_scale = sm_scale * log2(e)`` (> 0).

    Same state and results, but the scale is applied inside the exponent, ``2 ** (qk * qk_scale - m)``,
    which compiles to one FMA per score instead of a multiply and a subtract (the row max is taken on
    the raw scores and scaled once per row). Returns ``(p, m_new, l_new, acc_scaled)``."""
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_sub)
    p = tl.math.exp2(qk * qk_scale - m_sub[:, None])
    l_new = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    return p, m_new, l_new, acc


@triton.jit
def softmax_finalize(m_i, l_i, acc):
    """Online-softmax state -> (output fp32 [M, D] = acc / l, base-2 LSE fp32 [M] = m + log2(l)).

    A row with ``l == 0`` (it saw no key) gets output 0 and LSE ``-inf``."""
    safe_l = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / safe_l[:, None]
    lse2 = tl.where(l_i == 0.0, float("-inf"), m_i + tl.math.log2(safe_l))
    return out, lse2


@triton.jit
def kv_tile_offsets(seq, start, kv_len, kv_indptr_ptr, block_table_ptr, stride_bt_seq,
                    stride_kv_page, stride_kv_token,
                    BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr, PAGED: tl.constexpr):
    """Element offsets (int64 [BLOCK_N]) of key rows ``start .. start+BLOCK_N-1`` of sequence ``seq``.

    Args:
      seq:             sequence id (row of kv_indptr / block_table), int32 scalar.
      start:           position of the tile's first key inside the sequence, int32 scalar.
      kv_len:          the sequence's KV length; rows at or past it get offset 0 (a valid address:
                       callers must still mask their scores/loads with ``start + arange < kv_len``).
      kv_indptr_ptr:   contiguous layout: int32 [num_seqs + 1] first cache row of every sequence.
      block_table_ptr: paged layout: int32 [num_seqs, max_pages] page ids, row stride ``stride_bt_seq``.
      stride_kv_page:  paged: elements between pages of the cache (``page_size * Hkv * D`` if dense).
      stride_kv_token: elements between consecutive tokens (``Hkv * D`` if dense).
      BLOCK_N, PAGE_SIZE, PAGED: constexprs; PAGE_SIZE is ignored when not PAGED.

    The pointer to element (key row n, kv head h, dim d) is ``base + off[n] + h*stride_head + d``.
    When ``PAGE_SIZE % BLOCK_N == 0`` and ``start`` is a multiple of BLOCK_N the whole tile lies in one
    page and a single block-table entry is read; otherwise one entry per key (any page size works,
    smaller or larger than BLOCK_N).
    """
    offs_n = start + tl.arange(0, BLOCK_N)
    valid = offs_n < kv_len
    if PAGED:
        if PAGE_SIZE % BLOCK_N == 0:
            # Tile inside one page (callers step `start` by BLOCK_N from 0): one scalar lookup.
            page = tl.load(block_table_ptr + seq.to(tl.int64) * stride_bt_seq + start // PAGE_SIZE)
            slot = offs_n % PAGE_SIZE
            off = page.to(tl.int64) * stride_kv_page + slot.to(tl.int64) * stride_kv_token
        else:
            page = tl.load(block_table_ptr + seq.to(tl.int64) * stride_bt_seq + offs_n // PAGE_SIZE,
                           mask=valid, other=0)
            slot = offs_n % PAGE_SIZE
            off = page.to(tl.int64) * stride_kv_page + slot.to(tl.int64) * stride_kv_token
    else:
        row0 = tl.load(kv_indptr_ptr + seq)
        off = (row0 + offs_n).to(tl.int64) * stride_kv_token
    return tl.where(valid, off, 0)


def sm90_compile_report(kernel, *args, num_warps: int = 4, num_stages: int = 3, arch: int = 90,
                        **kwargs) -> dict:
    """Host-side, no GPU needed: compile ``kernel`` (a ``@triton.jit`` or ``@gluon.jit`` function) for sm_90 with the
    specialisation a real launch with these arguments would get (tensors may live on the CPU), and
    report what decides occupancy and speed: shared memory bytes, registers per thread and spill bytes
    (from the bundled ptxas), and counts of wgmma, cp.async and TMA instructions in the PTX.

    Used by the tests to keep the fused-kernel configs small enough for two CTAs a SM, and by
    developers without an H100 to see whether a change pipelines its loads."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.compiler import compile as triton_compile
    from triton.runtime.jit import create_function_from_signature
    from pod.kernels.ptx_hints import hinted_copies

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    kwargs = dict(kwargs, num_warps=num_warps, num_stages=num_stages)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args, specialization,
                                                              options)
    source = ASTSource
    if getattr(kernel, "is_gluon", lambda: False)():
        from triton.experimental.gluon._runtime import GluonASTSource as source
    compiled = triton_compile(source(kernel, signature, constexprs, attrs), target=target,
                              options=options.__dict__)
    ptx = compiled.asm["ptx"]
    report = dict(shared_bytes=compiled.metadata.shared, num_warps_total=compiled.metadata.num_warps,
                  wgmma=ptx.count("wgmma.mma_async"), mma_sync=ptx.count("mma.sync"),
                  cp_async=ptx.count("cp.async.cg") + ptx.count("cp.async.ca"),
                  tma_loads=ptx.count("cp.async.bulk.tensor"), setmaxnreg=ptx.count("setmaxnreg"),
                  l2_hints=hinted_copies(ptx),    # TMA copies given an L2 policy (pod.kernels.ptx_hints)
                  wgmma_shapes=dict(sorted(Counter(re.findall(r"wgmma\.mma_async\.sync\.aligned\.(m\d+n\d+k\d+)",
                                                              ptx)).items())))
    report.update(ptxas_report(ptx, arch))
    return report


def ptxas_report(ptx: str, arch: int = 90) -> dict:
    """Assemble PTX with Triton's bundled ptxas for sm_<arch>a: registers per thread, spill bytes, and
    whether it assembled (the error text when not). No GPU needed."""
    import subprocess
    import tempfile
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        res = subprocess.run([ptxas, "-v", f"--gpu-name=sm_{arch}a", path, "-o", os.path.join(tmp, "k.o")],
                             capture_output=True, text=True)
    regs = re.search(r"Used (\d+) registers", res.stderr)
    spill = re.search(r"(\d+) bytes spill stores", res.stderr)
    out = dict(registers=int(regs.group(1)) if regs else None,
               spill_bytes=int(spill.group(1)) if spill else None)
    if res.returncode != 0:
        out["ptxas_error"] = res.stderr[-2000:]
    return out
