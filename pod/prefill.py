"""Chunked prefill, the product's entry point: the Hopper tile where it runs, the portable tile elsewhere.

    work = plan_chunked_prefill(batch)            # shape-only, once per batch shape
    launch = work.runner(batch, out, lse)          # either kernel's plan: a KernelWork (pod/kernels/contract.py)
    launch()                                       # per layer: one launch, no allocation, no sync

Config names (pod/kernels/configs.py): "auto" picks SM90_DEFAULT (pod/kernels/prefill_sm90.py, Gluon,
sm_90a) on a Hopper GPU when the tile handles the batch's layout (head_dim 64/128, contiguous KV or pages
of >= 8 tokens that divide or are multiples of its BLOCK_N) and the prefill is at least
SM90_MIN_PREFILL_FLOPS of work; the portable Triton tile (pod/kernels/prefill.py; PREFILL_DEFAULT, or its
interpreter config on a CPU) otherwise. Measured on the H200 (docs/hopper_prefill.md), same run: on one
512-token chunk without context (2.1 GFLOP, 128 light tiles) the Hopper tile's fixed per-CTA cost (five
tensor descriptors built on the device, the pipeline fill) loses to the portable tile (64 vs 108 TFLOP/s
contiguous, 68 vs 87 on 16-token pages); from 1024 tokens without context (8.6 GFLOP) and at every point
with context (a 512-token chunk over 4K: 37 GFLOP, 556 vs 404) it wins. An SM90_CONFIGS
name forces the Hopper tile, a PREFILL_CONFIGS name the portable one.
"""
from __future__ import annotations

import torch

from pod.batch import BatchSpec, HybridBatch
from pod.env import on_hopper, unpack_batch_or_spec
from pod.kernels.configs import PREFILL_AUTO, PREFILL_CONFIGS, SM90_CONFIGS, SM90_CONFIGS_D64, SM90_DEFAULT
from pod.kernels.contract import KernelWork

# Below this much prefill work the launch is latency-bound and the portable tile is faster (see above).
SM90_MIN_PREFILL_FLOPS = 4e9


def resolve_prefill_kernel(spec: BatchSpec, config: str | None, device: torch.device | str) -> tuple[str, str]:
    """(kernel, config name): kernel is "sm90" or "portable"; config None means "auto"."""
    device = torch.device(device)
    name = PREFILL_AUTO if config is None else config
    if name == PREFILL_AUTO:
        if on_hopper(device):
            from pod.kernels.prefill_sm90 import sm90_supports
            if sm90_supports(spec) is None and spec.prefill_flops() >= SM90_MIN_PREFILL_FLOPS:
                return "sm90", SM90_DEFAULT
        return "portable", None                    # the portable tile's own default (interpreter aware)
    if name in SM90_CONFIGS or name in SM90_CONFIGS_D64:
        if device.type == "cuda" and not on_hopper(device):
            raise ValueError(f"prefill config {name!r} is the Hopper (sm_90a) tile; this GPU is "
                             f"{torch.cuda.get_device_name(device)}: use 'auto' or a portable config")
        return "sm90", name
    if name in PREFILL_CONFIGS:
        return "portable", name
    raise ValueError(f"prefill config {name!r} unknown; named configs: "
                     f"{sorted({PREFILL_AUTO, *PREFILL_CONFIGS, *SM90_CONFIGS, *SM90_CONFIGS_D64})}")


def plan_chunked_prefill(batch_or_spec: HybridBatch | BatchSpec, config: str | None = PREFILL_AUTO,
                         device: torch.device | str | None = None) -> KernelWork:
    """The plan of the kernel `config` picks for this batch (a PrefillWork or an Sm90PrefillWork), on
    `device` (pod.env.unpack_batch_or_spec: a batch's own, or where the kernels run)."""
    spec, device = unpack_batch_or_spec(batch_or_spec, device)
    kernel, name = resolve_prefill_kernel(spec, config, device)
    if kernel == "sm90":
        if device.type != "cuda":
            raise ValueError(f"prefill config {name!r} is the Hopper tile (Gluon): it runs on an sm_90 GPU "
                             f"only, not in Triton's interpreter; use 'auto' or a portable config on a CPU")
        from pod.kernels.prefill_sm90 import plan_prefill_sm90
        return plan_prefill_sm90(spec, name, device=device)
    from pod.kernels.prefill import plan_prefill
    return plan_prefill(spec, name, device=device)
