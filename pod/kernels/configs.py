"""Every named kernel configuration, in one place: the standalone prefill kernel's, the decode kernel's
plan variants, the fused POD kernel's, and the autotuners' search spaces.

A sweep names them (`backend_options.prefill_config=h100`, `decode_config=fit`, `pod_config=paper`;
see conf/attention.yaml), the harness checks and times them like any backend, and every row records
the name in its `options` column. To add a configuration (a Hopper tile, say), add one entry to the
dict of its kernel; a new kernel family adds its own dict here.

Shared-memory and register figures are sm_90 compiles of D=128 bf16 (pod.kernels.common.sm90_compile_report,
`python -m experiments.gpu_checks offline`).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from pod.batch import BatchSpec
from pod.dispatch import PodConfig, choose_config, decode_kv_splits


# -- prefill (pod/kernels/prefill.py) -------------------------------------------------------------
@dataclass(frozen=True)
class PrefillConfig:
    """Block sizes and launch knobs of the standalone prefill kernel.
    block_n=None: autotune BLOCK_N / num_warps / num_stages over PREFILL_AUTOTUNE (GPU only)."""
    block_m: int = 128
    block_n: int | None = 64
    num_warps: int = 8
    num_stages: int = 3

    def to_json(self) -> dict:
        return {"block_m": self.block_m, "block_n": self.block_n, "num_warps": self.num_warps,
                "num_stages": self.num_stages}


# Autotune space on the GPU (BLOCK_M is fixed by the plan because the work list depends on it).
# BLOCK_N=64: ~190 registers, 96/128/160 KB shared memory at 2/3/4 stages; BLOCK_N=128: ~250 registers,
# 160 KB at 2 stages. Each entry: (kernel constexprs, num_warps, num_stages).
PREFILL_AUTOTUNE = (({"BLOCK_N": 64}, 8, 2), ({"BLOCK_N": 64}, 8, 3), ({"BLOCK_N": 64}, 8, 4),
                    ({"BLOCK_N": 128}, 8, 2))

PREFILL_CONFIGS: dict[str, PrefillConfig] = {
    # Standalone prefill on the GPU (the measured default): BLOCK_M=128, the rest autotuned.
    "autotune": PrefillConfig(block_m=128, block_n=None),
    # FA-tutorial-like fixed choice for Hopper (128 KB shared memory).
    "h100": PrefillConfig(block_m=128, block_n=64, num_warps=8, num_stages=3),
    "h100_s4": PrefillConfig(block_m=128, block_n=64, num_warps=8, num_stages=4),
    # Sized for a prefill CTA sharing an SM with a decode CTA (2 CTAs/SM need
    # 2 * num_warps * 32 * registers <= 65536 and 2 * shared <= ~227 KB):
    #   "fused":       96 KB, ~190 registers -> 2 CTAs/SM only with maxnreg=128 (spills 100-200 B)
    #   "fused_small": BLOCK_N=32: 64 KB, ~146 registers
    #   "fused_m64":   BLOCK_M=64, 4 warps: 80 KB, ~215 registers -> 2 x 27.5K registers: fits
    "fused": PrefillConfig(block_m=128, block_n=64, num_warps=8, num_stages=2),
    "fused_small": PrefillConfig(block_m=128, block_n=32, num_warps=8, num_stages=2),
    "fused_m64": PrefillConfig(block_m=64, block_n=64, num_warps=4, num_stages=2),
    # Triton interpreter (CPU tests): small tiles so the emulation stays fast.
    "interpret": PrefillConfig(block_m=16, block_n=16, num_warps=4, num_stages=1),
}
PREFILL_DEFAULT = "autotune"
PREFILL_COMPILE_CHECKS = ("h100", "fused", "fused_small", "fused_m64")   # `python -m pod.kernels.prefill --sm90`


# -- Hopper prefill tile (pod/kernels/prefill_sm90.py, Gluon, sm_90a) ---------------------------------
@dataclass(frozen=True)
class Sm90PrefillConfig:
    """One compiled variant of the Hopper tile. Every shipped one is checked on the GPU before timing."""
    block_m: int = 128
    block_n: int = 128
    stages: int = 2
    consumers: int = 1           # 1: one 8-warp consumer partition; 2: two 4-warp partitions, unsynchronised
    producer_regs: int = 40
    consumer_regs: int = 232     # the second consumer partition's registers (consumers == 2)

    @property
    def num_warps(self) -> int:
        return 8 // self.consumers                       # warps of the default partition

    def shared_bytes(self, head_dim: int, elem_bytes: int = 2) -> int:
        return (self.block_m + 2 * self.stages * self.block_n) * head_dim * elem_bytes

    def to_json(self) -> dict:
        return dict(kernel="prefill_sm90", block_m=self.block_m, block_n=self.block_n, stages=self.stages,
                    consumers=self.consumers)


# Shipped configs. H200, bf16, Llama-3-8B heads, chunk 512-2048 over context 0-12K (docs/hopper_prefill.md):
# two unsynchronised consumer partitions with three 128-key stages lead everywhere (at 12K context:
# 566-599 TFLOP/s vs 459-480 for one 8-warp consumer with 3 stages and 465-526 with BLOCK_N 64, 4 stages).
# Measured and dropped: one consumer with BLOCK_N 64 at 3/4 stages, two consumers with two 128-key stages
# (no faster than one consumer: the ring runs dry).
SM90_CONFIGS: dict[str, Sm90PrefillConfig] = {
    "sm90_n128_s3_c2": Sm90PrefillConfig(block_n=128, stages=3, consumers=2),   # 225 KB: the default
    "sm90_n64_s4_c2": Sm90PrefillConfig(block_n=64, stages=4, consumers=2),     # 161 KB
    "sm90_n128_s2": Sm90PrefillConfig(block_n=128, stages=2, consumers=1),      # 161 KB, one consumer
}
# head_dim 64: Q 16 KB + 3 stages of 32 KB.
SM90_CONFIGS_D64: dict[str, Sm90PrefillConfig] = {
    "sm90_n128_s3_c2": Sm90PrefillConfig(block_n=128, stages=3, consumers=2),
    "sm90_n128_s2": Sm90PrefillConfig(block_n=128, stages=2, consumers=1),
}
SM90_DEFAULT = "sm90_n128_s3_c2"
# "auto" (the prefill backends' default): the Hopper tile's default on an sm_90 GPU where it handles the
# batch's layout, the portable tile's PREFILL_DEFAULT elsewhere (pod.prefill.plan_chunked_prefill).
PREFILL_AUTO = "auto"


# -- decode (pod/kernels/decode.py) ----------------------------------------------------------------
# H100 decode is HBM-bound: BLOCK_N 64-128 keys a step, K and V tiles multi-buffered in shared memory
# (cp.async, 16-byte loads along D), 4 warps. Contiguous s3/s4/s5 at BLOCK_N 64 = 70/102/134 KB
# (2/3/4 K+V buffers); paged spends one stage on the block-table load: s3 = s4 = 38 KB (1 buffer),
# s5 = 70 KB (2 buffers); BLOCK_N 128 s3 = 136 KB contiguous, 72 KB paged.
DECODE_AUTOTUNE = (({"BLOCK_N": 64}, 4, 3), ({"BLOCK_N": 64}, 4, 4), ({"BLOCK_N": 64}, 4, 5),
                   ({"BLOCK_N": 128}, 4, 3))
DECODE_MAX_BLOCK_N = 128                                            # splits align to this when autotuned
DECODE_FIXED = dict(BLOCK_N=64, num_warps=4, num_stages=3)          # one fixed config (paged: 5 stages)
DECODE_INTERPRET = dict(BLOCK_N=16, num_warps=4, num_stages=1)      # interpreter: small and fast

# Named plan_decode keyword sets: autotuned with the balanced split heuristic (the default), with
# FlashInfer's fit rule, the fixed config, the merge fused into the decode launch, no split at all.
DECODE_CONFIGS: dict[str, dict] = {
    "auto": {},
    "fit": dict(split_policy="fit"),
    "fixed64": dict(block_n=DECODE_FIXED["BLOCK_N"]),
    "auto_fused_merge": dict(fuse_merge=True),
    "no_split": dict(kv_splits=1),
}

# What `python -m pod.kernels.decode` compiles for sm_90 (no GPU needed; tests/test_decode_kernel.py):
# sm90_report keyword sets, one JSON line each.
DECODE_COMPILE_CHECKS = (
    dict(spec=BatchSpec.build(32, 8, 128, decode=[300, 77]), num_stages=3),
    dict(spec=BatchSpec.build(32, 8, 128, decode=[300, 77], page_size=16), num_stages=5),
    dict(spec=BatchSpec.build(32, 8, 128, decode=[300, 77], page_size=64), fuse_merge=True),
    dict(spec=BatchSpec.build(16, 2, 64, decode=[300, 77], dtype="float16", page_size=16), block_n=128),
    dict(spec=BatchSpec.build(8, 8, 128, decode=[300, 77]), block_n=128),
)


# -- the fused POD kernel (pod/kernels/pod_fused.py, planned by pod/api.py) -------------------------
# None: the dispatcher (pod.dispatch.choose_config) picks per batch. Others: fixed schemes and the
# tile/occupancy candidates compared on the H100 (docs/dispatcher.md).
POD_CONFIGS: dict[str, PodConfig | None] = {
    "dispatcher": None,
    # The paper's scheme: one tile per CTA, 2 CTAs per SM, 1:1 alternating roles, no KV split.
    "paper": PodConfig(variant="fused", ctas_per_sm=2, policy="alternating", kv_splits=1,
                       occupancy_roles=False),
    "serial": PodConfig(variant="serial"),
    "fused_plain": PodConfig(variant="fused", kv_splits=1, occupancy_roles=False, num_stages=2),
    "fused_occupancy": PodConfig(variant="fused", kv_splits=1, occupancy_roles=True),
    "fused_split4": PodConfig(variant="fused", kv_splits=4, occupancy_roles=False),
    "8w_m128_n32": PodConfig(num_warps=8, block_m=128, block_n=32),
    "8w_m128_n32_s3": PodConfig(num_warps=8, block_m=128, block_n=32, num_stages=3),
    "8w_m128_n64": PodConfig(num_warps=8, block_m=128, block_n=64, num_stages=2),
    "8w_m128_n64_nocap": PodConfig(num_warps=8, block_m=128, block_n=64, num_stages=2, maxnreg=None),
    "4w_m64_n64": PodConfig(num_warps=4, block_m=64, block_n=64, num_stages=2),
    "4w_m64_n64_s3": PodConfig(num_warps=4, block_m=64, block_n=64, num_stages=3),
    # The paper's knob comparisons (conf/sweep/policy.yaml, conf/sweep/ctas_per_sm.yaml): fused, no KV
    # split, the default tiles; each pair differs only in the knob compared.
    "policy_5050": PodConfig(variant="fused", policy="alternating", kv_splits=1),
    "policy_proportional": PodConfig(variant="fused", policy="proportional", kv_splits=1),
    # 2 vs 4 CTAs per SM: the default 8-warp 128x32 tile (registers capped for 2 resident CTAs) vs the
    # paper's 4-CTA tile (64x32 prefill, 4 warps, 2 stages; 128 registers a thread: 4 x 4 warps x 32 x 128
    # = 64K, an SM's registers).
    "ctas_2": PodConfig(variant="fused", ctas_per_sm=2, kv_splits=1),
    "ctas_4": PodConfig(variant="fused", ctas_per_sm=4, num_warps=4, block_m=64, block_n=32, num_stages=2,
                        maxnreg=128, kv_splits=1),
}
# The tile/occupancy candidates whose compiled resources `experiments.gpu_checks resources|offline` reports.
POD_RESOURCE_CANDIDATES = ("8w_m128_n32", "8w_m128_n32_s3", "8w_m128_n64", "8w_m128_n64_nocap",
                           "4w_m64_n64", "4w_m64_n64_s3")


def pod_autotune_candidates(spec: BatchSpec, num_sms: int, **facts) -> dict[str, PodConfig]:
    """What the `pod` backend times with backend_options.pod_autotune=true: the dispatcher's choice, its
    neighbours in the knobs measured least (tile shape, occupancy roles), and serial. Few on
    purpose: each distinct set of tile constexprs is one more compile (cached across batches). `facts`:
    choose_config's keywords (prefill_kernel, sm90_supported, hopper), as plan() passes them."""
    chosen = choose_config(spec, num_sms, **facts)
    fused = chosen if chosen.variant != "serial" else replace(
        chosen, variant="fused", kv_splits=decode_kv_splits(spec, num_sms, chosen.block_n_decode))
    cands = {"dispatcher": chosen,
             "fused": fused,
             "fused_4w_m64": replace(fused, num_warps=4, block_m=64, block_n=64),
             "fused_flip_occupancy": replace(fused, occupancy_roles=not fused.occupancy_roles),
             "serial": replace(chosen, variant="serial")}
    if not (spec.num_prefill and spec.num_decode):
        cands = {k: v for k, v in cands.items() if k in ("dispatcher", "serial")}
    return cands
