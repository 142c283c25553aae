"""vLLM's Triton unified attention kernel (vllm 0.34.0: vllm/v1/attention/ops/triton_unified_attention.py),
the kernel of vLLM's TRITON_ATTN backend: prefill chunks and decodes of the hybrid batch in one launch.

  vllm_unified   unified_attention(q, k_cache, v_cache, out, cu_seqlens_q, max_seqlen_q, seqused_k,
                 max_seqlen_k, softmax_scale, causal=True, window_size=(-1, -1), block_table, ...)
                 over the batch as one varlen batch (baselines.common.varlen_layout), paged KV only
                 (vLLM's cache layout [blocks, block_size, Hkv, D] is ours). A batch with a query longer
                 than 8 rows (any prefill chunk) runs the 2D kernel: one launch. A decode-only batch of
                 at most 128 / Hkv sequences runs vLLM's split-KV 3D kernel and its reduction (two
                 launches), with the scratch and threshold vLLM's metadata builder gives it.

prepare (untimed) builds the index tensors, the output and the split-KV scratch; run() is the one call.
The queries are a view of the batch's own q when they are adjacent (the serving engine), else a copy.

Import cost: only that module and what it imports (vllm.envs, vllm.logger, vllm.platforms,
vllm.triton_utils, the kernel helpers, vllm.v1.kv_cache_interface: ~36 vllm modules, about 0.1 s after
torch, measured without CUDA; beyond torch/triton/numpy it needs only `regex`), not vLLM's engine. But importing any vllm module
runs vllm/__init__ -> vllm.env_override, which sets TRITON_CACHE_AUTOTUNING=1 and a few torch/NCCL
variables and patches torch inductor; the environment is restored after the import here so our own
Triton autotuning is unchanged. On a CUDA machine vllm.platforms resolves to CudaPlatform, which loads
vllm's compiled `_C_stable_libtorch` extension (built for vllm's torch pin, torch==2.14.0): if that fails
to load against the installed torch, the backend reports it as unavailable.

Optional: install without vLLM's dependencies (they pin torch): `pip install --no-deps vllm==0.34.0 regex`
(or `pip install '.[vllm]'` where vLLM's torch pin is acceptable).
"""
from __future__ import annotations

import functools
import importlib
import os

import torch

from baselines.common import gpu_and_package, hybrid_q_source, installed_version, split_rows, varlen_layout
from baselines.registry import AttentionOutput, BackendUnavailable, register_backend
from pod.batch import HybridBatch

DISTRIBUTION = "vllm"
INSTALL_HINT = "pip install --no-deps vllm==0.34.0 regex"
# Where the kernel lives, newest layout first (vLLM moved it under v1/ in 2025).
KERNEL_MODULES = ("vllm.v1.attention.ops.triton_unified_attention", "vllm.attention.ops.triton_unified_attention")
# vLLM's TritonAttentionMetadataBuilder (vllm/v1/attention/backends/triton_attn.py): the 3D (split-KV)
# kernel runs decode batches of fewer than MIN_LAUNCH_GRID_SIZE_2D // num_kv_heads sequences, with
# NUM_PAR_SOFTMAX_SEGMENTS segments and scratch for that many query tokens.
MIN_LAUNCH_GRID_SIZE_2D = 128
NUM_PAR_SOFTMAX_SEGMENTS = 16


_installed = installed_version          # a module attribute: tests stand in for the installed package


def _import_keeping_env(name: str):
    """import `name`, then put os.environ back as it was (vllm.env_override sets variables on import)."""
    saved = dict(os.environ)
    try:
        return importlib.import_module(name)
    finally:
        os.environ.clear()
        os.environ.update(saved)


@functools.lru_cache(maxsize=1)
def _kernel_module():
    """(module, None) or (None, why it cannot be imported)."""
    errors = []
    for name in KERNEL_MODULES:
        try:
            return _import_keeping_env(name), None
        except Exception as e:  # a missing layout, a broken extension: try the next, then report
            errors.append(f"`import {name}` failed: {type(e).__name__}: {e}")
    return None, "; ".join(errors) + f" (reinstall: {INSTALL_HINT})"


def vllm_availability() -> str | None:
    """None when vllm_unified can run here, else what is missing."""
    why = gpu_and_package(DISTRIBUTION, _installed, INSTALL_HINT)
    if why is not None:
        return why
    return _kernel_module()[1]


def _unified_attention():
    """vLLM's unified_attention function (tests replace this seam with a CPU stand-in)."""
    why = vllm_availability()
    if why is not None:
        raise BackendUnavailable(why)
    return _kernel_module()[0].unified_attention


def split_kv_scratch(batch: HybridBatch) -> dict:
    """The 3D kernel's threshold, segments and fp32 scratch as vLLM's metadata builder sizes them
    (max_num_seqs taken as unbounded: rows for the threshold's worth of one-token queries)."""
    h = batch.spec.heads
    threshold = MIN_LAUNCH_GRID_SIZE_2D // h.num_kv_heads
    rows, d_pad = max(threshold, 1), 1 << (h.head_dim - 1).bit_length()
    f32 = dict(dtype=torch.float32, device=batch.device)
    return dict(seq_threshold_3D=threshold, num_par_softmax_segments=NUM_PAR_SOFTMAX_SEGMENTS,
                softmax_segm_output=torch.empty(rows, h.num_q_heads, NUM_PAR_SOFTMAX_SEGMENTS, d_pad, **f32),
                softmax_segm_max=torch.empty(rows, h.num_q_heads, NUM_PAR_SOFTMAX_SEGMENTS, **f32),
                softmax_segm_expsum=torch.empty(rows, h.num_q_heads, NUM_PAR_SOFTMAX_SEGMENTS, **f32))


@register_backend("vllm_unified", layouts=("paged",), availability=vllm_availability,
                  description="vLLM's Triton unified attention over the whole hybrid batch: one launch")
def prepare_vllm_unified(batch: HybridBatch):
    if batch.block_table is None:
        raise BackendUnavailable("vllm_unified needs a paged KV cache (BatchSpec.page_size)")
    unified_attention = _unified_attention()
    lay = varlen_layout(batch)
    q_of = hybrid_q_source(batch)
    k, v = batch.k_cache, batch.v_cache
    h = batch.spec.heads
    rows = batch.q_prefill.shape[0] + batch.q_decode.shape[0]
    out = torch.empty(rows, h.num_q_heads, h.head_dim, dtype=batch.q_prefill.dtype, device=batch.device)
    scratch = split_kv_scratch(batch)

    def run() -> AttentionOutput:
        unified_attention(q=q_of(), k=k, v=v, out=out, cu_seqlens_q=lay.cu_seqlens_q,
                          max_seqlen_q=lay.max_seqlen_q, seqused_k=lay.seqused_k,
                          max_seqlen_k=lay.max_seqlen_k, softmax_scale=batch.sm_scale, causal=True,
                          window_size=(-1, -1), block_table=lay.page_table, softcap=0.0,
                          q_descale=None, k_descale=None, v_descale=None, **scratch)
        return split_rows(out, batch)
    run.backend_config = dict(package=f"{DISTRIBUTION} {_installed(DISTRIBUTION)}",
                              seq_threshold_3D=scratch["seq_threshold_3D"],
                              num_par_softmax_segments=NUM_PAR_SOFTMAX_SEGMENTS)
    return run
