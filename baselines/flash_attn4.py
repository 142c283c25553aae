"""FlashAttention's own Hopper forward (flash-attn-4 4.0.0b36: the CuTe DSL `flash_attn.cute` package),
over the WHOLE hybrid batch in one varlen launch: the way vLLM runs mixed batches on Hopper.

  fa_varlen   flash_attn.cute.flash_attn_varlen_func over the batch as one varlen batch
              (baselines.common.varlen_layout): prefill chunks and decodes are rows of one q,
              cu_seqlens_q; paged KV through page_table (our block table) + seqused_k (kv lengths),
              contiguous KV through cu_seqlens_k; causal, bottom-right aligned (a decode's one query
              sees all its keys); num_splits=1 (sm_90 refuses more).

prepare (untimed) builds the index tensors; run() is the one call. The queries are a view of the
batch's own q when q_decode's rows follow q_prefill's in memory (the serving engine), else a copy made
in prepare. FA4 compiles each specialisation on its first call (the harness's checked call, the
engine's warm-up). Its paged path loads whole page rows: rows of a last page past seqused_k must be
finite (ours are: caches are filled with finite values); pages a sequence does not use may hold anything.

Optional: `pip install '.[fa4]'`. Installed with `pip --target DIR`, the CUTLASS DSL's `cutlass` package
is importable only with DIR/nvidia_cutlass_dsl/dsl_packages on PYTHONPATH (the wheel's .pth is not read
there). Without the package, CUDA or sm_90+, the backend reports unavailable with the reason.
"""
from __future__ import annotations

import functools
import importlib

import torch

from baselines.common import gpu_and_package, hybrid_q_source, installed_version, split_rows, varlen_layout
from baselines.registry import AttentionOutput, BackendUnavailable, register_backend
from pod.batch import HybridBatch

DISTRIBUTION = "flash-attn-4"
INSTALL_HINT = "pip install '.[fa4]'"
DSL_PATH_HINT = ("installed with pip --target DIR? put DIR/nvidia_cutlass_dsl/dsl_packages on PYTHONPATH "
                 "(the cutlass package lives there)")


_installed = installed_version          # a module attribute: tests stand in for the installed package


@functools.lru_cache(maxsize=1)
def _import_error() -> str | None:
    try:
        importlib.import_module("flash_attn.cute")
    except Exception as e:  # a broken install (no cutlass DSL, tvm_ffi ABI...) is "unavailable"
        hint = DSL_PATH_HINT if "cutlass" in str(e) else f"reinstall: {INSTALL_HINT}"
        return f"`import flash_attn.cute` failed: {type(e).__name__}: {e} ({hint})"
    return None


def fa4_availability() -> str | None:
    """None when fa_varlen can run here, else what is missing."""
    why = gpu_and_package(DISTRIBUTION, _installed, INSTALL_HINT)
    if why is not None:
        return why
    major, minor = torch.cuda.get_device_capability()
    if major < 9:
        return f"needs sm_90 or newer (this GPU is sm_{major}{minor}; FA4 has no paged KV before Hopper)"
    return _import_error()


def _fa4():
    """The flash_attn.cute module (tests replace this seam with a CPU stand-in)."""
    why = fa4_availability()
    if why is not None:
        raise BackendUnavailable(why)
    return importlib.import_module("flash_attn.cute")


@register_backend("fa_varlen", availability=fa4_availability,
                  description="FlashAttention-4 (flash_attn.cute) varlen forward over the whole hybrid "
                              "batch: one launch, bottom-right causal")
def prepare_fa_varlen(batch: HybridBatch):
    fa = _fa4()
    lay = varlen_layout(batch)
    q_of = hybrid_q_source(batch)
    k, v = batch.k_cache, batch.v_cache
    kv = (dict(page_table=lay.page_table, seqused_k=lay.seqused_k) if lay.page_table is not None
          else dict(cu_seqlens_k=lay.cu_seqlens_k))

    def run() -> AttentionOutput:
        out, _lse = fa.flash_attn_varlen_func(
            q_of(), k, v, cu_seqlens_q=lay.cu_seqlens_q, max_seqlen_q=lay.max_seqlen_q,
            max_seqlen_k=lay.max_seqlen_k, softmax_scale=batch.sm_scale, causal=True, num_splits=1, **kv)
        return split_rows(out, batch)
    run.backend_config = dict(package=f"{DISTRIBUTION} {_installed(DISTRIBUTION)}",
                              kv="paged" if lay.page_table is not None else "contiguous", num_splits=1)
    return run
