"""Public Python API of our Triton kernels, and registration of the `triton_*` backends.

Prefill (pod/kernels/prefill.py):
    work = plan_prefill(batch_or_spec, config=None | "autotune" | "h100" | "fused" | PrefillConfig(...))
    out, lse2 = prefill(batch, work, out=None, lse=None, return_lse=True)   # launch only
    launch = prefill_runner(batch, work, out, lse=None); launch() -> out     # args bound once
    out, lse2 = prefill_attention(batch)                                       # plan + run, one shot
lse2 is fp32 [tokens, Hq], base-2 log-sum-exp (natural = lse2 * ln 2), see pod/kernels/common.py.

Decode functions are added below by the decode kernel's author (keep both parts).
"""
from __future__ import annotations

import torch

from pod.batch import HybridBatch
from pod.kernels.prefill import (PREFILL_CONFIGS, PrefillConfig, PrefillWork, bench_prefill, interpreting,
                                 plan_prefill, prefill, prefill_attention, prefill_runner,
                                 reference_prefill_lse)
from pod.registry import AttentionOutput, register_backend

__all__ = ["PREFILL_CONFIGS", "PrefillConfig", "PrefillWork", "bench_prefill", "plan_prefill", "prefill",
           "prefill_attention", "prefill_runner", "reference_prefill_lse", "triton_available"]


def triton_available() -> str | None:
    """Our Triton kernels run on a CUDA GPU, or on the CPU through the Triton interpreter."""
    if torch.cuda.is_available() or interpreting():
        return None
    return "needs a CUDA GPU or the Triton interpreter (TRITON_INTERPRET=1)"


def _prefill_backend_config(work: PrefillWork) -> dict:
    cfg = work.describe()
    if work.autotune:
        from pod.kernels.prefill import _prefill_kernel_autotuned
        best = getattr(_prefill_kernel_autotuned, "best_config", None)
        if best is not None:
            cfg.update(block_n=best.kwargs.get("BLOCK_N"), num_warps=best.num_warps,
                       num_stages=best.num_stages)
        cfg["autotuned"] = True
    return cfg


@register_backend("triton_prefill", computes=("prefill",), layouts=("contiguous", "paged"),
                  availability=triton_available,
                  description="our Triton chunked-prefill kernel (prefill part only)")
def prepare_triton_prefill(batch: HybridBatch):
    work = plan_prefill(batch)
    launch = prefill_runner(batch, work, torch.empty_like(batch.q_prefill))   # no LSE needed here
    if not interpreting():
        launch()                          # compile and autotune here, untimed

    def run() -> AttentionOutput:
        return AttentionOutput(launch(), None)

    run.backend_config = _prefill_backend_config(work)
    return run


# ================================================================================================
# Decode (K2): split-KV batch decode + LSE merge (pod/kernels/decode.py, pod/kernels/merge.py)
#     work = plan_decode(batch_or_spec, num_sms=None, kv_splits=None, target_ctas=None, block_n=None,
#                        fuse_merge=False, ...)                      # shape only, untimed
#     out = decode(batch, work, out=None)                           # launch only
#     out = decode_attention(batch)                                 # plan + run, one shot
# ================================================================================================
from pod.kernels.decode import (DecodeWork, bench_decode, decode, decode_attention,  # noqa: E402
                                decode_runner, plan_decode)

__all__ += ["DecodeWork", "bench_decode", "decode", "decode_attention", "decode_runner", "plan_decode"]


def _decode_backend_config(work: DecodeWork) -> dict:
    cfg = dict(work.describe)
    if work.config is None:
        from pod.kernels.decode import _decode_kernel_autotuned
        best = getattr(_decode_kernel_autotuned, "best_config", None)
        if best is not None:
            cfg["config"] = dict(BLOCK_N=best.kwargs.get("BLOCK_N"), num_warps=best.num_warps,
                                 num_stages=best.num_stages)
        cfg["autotuned"] = True
    return cfg


@register_backend("triton_decode", computes=("decode",), layouts=("contiguous", "paged"),
                  availability=triton_available,
                  description="our Triton split-KV decode (GQA group packed in M) + LSE merge")
def prepare_triton_decode(batch: HybridBatch):
    work = plan_decode(batch)
    out = torch.empty_like(batch.q_decode)
    launch = decode_runner(batch, work, out)
    if not interpreting():
        launch()                          # compile and autotune here, untimed

    def run() -> AttentionOutput:
        return AttentionOutput(None, launch())

    run.backend_config = _decode_backend_config(work)
    return run


@register_backend("triton_serial", computes=("prefill", "decode"), layouts=("contiguous", "paged"),
                  availability=triton_available,
                  description="our Triton prefill kernel, then our Triton decode kernel (two launches)")
def prepare_triton_serial(batch: HybridBatch):
    pre_work, dec_work = plan_prefill(batch), plan_decode(batch)
    out_p, out_d = torch.empty_like(batch.q_prefill), torch.empty_like(batch.q_decode)
    launch_prefill = prefill_runner(batch, pre_work, out_p)      # arguments bound once, untimed
    launch_decode = decode_runner(batch, dec_work, out_d)

    def run() -> AttentionOutput:
        return AttentionOutput(launch_prefill(), launch_decode())

    if not interpreting():
        run()                             # compile and autotune both kernels here, untimed
    run.backend_config = {"prefill": _prefill_backend_config(pre_work),
                          "decode": _decode_backend_config(dec_work)}
    return run
