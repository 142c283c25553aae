"""Facts about where the kernels run, asked in one place: the Triton interpreter, the device a plan
defaults to, its SM count (simulated off the GPU) and whether it is a Hopper GPU.

Every plan_* function of pod/ and every adapter of baselines/ asks these instead of keeping its own copy
(tests/test_env.py checks it), so a plan made from a spec lands on the same device, with the same SM
count, whichever kernel it is for.
"""
from __future__ import annotations

import os

import torch

from pod.batch import BatchSpec, HybridBatch

# SMs the interpreter (or a CPU device) pretends to have: CTA i "runs" on SM i % SIMULATED_NUM_SMS, and
# the plans size their grids (decode splits, the Hopper POD kernel's one CTA an SM) for this many SMs.
SIMULATED_NUM_SMS = 4


def interpreting() -> bool:
    """True under Triton's interpreter (TRITON_INTERPRET set, not 0): the CPU tests' mode, where the
    kernels take small fixed configs (no autotune) and there is no %smid."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def default_device() -> torch.device:
    """Where the kernels run when no device is named: the GPU, unless there is none or the interpreter
    runs them (on the CPU)."""
    return torch.device("cuda" if torch.cuda.is_available() and not interpreting() else "cpu")


def device_num_sms(device: torch.device | str) -> int:
    """SMs of a CUDA device (132 on an H100 SXM or H200), SIMULATED_NUM_SMS on a CPU or in the interpreter."""
    device = torch.device(device)
    if device.type == "cuda" and not interpreting():
        return torch.cuda.get_device_properties(device).multi_processor_count
    return SIMULATED_NUM_SMS


def on_hopper(device: torch.device | str) -> bool:
    """A compute-capability 9.x GPU (H100, H200): where the Gluon (sm_90a) kernels run."""
    device = torch.device(device)
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9


def unpack_batch_or_spec(batch_or_spec: HybridBatch | BatchSpec, device: torch.device | str | None = None
                         ) -> tuple[BatchSpec, torch.device]:
    """(spec, device) of a plan_* function's first argument and its `device` keyword. `device` None: a
    HybridBatch's own device, default_device() for a BatchSpec."""
    if isinstance(batch_or_spec, HybridBatch):
        return batch_or_spec.spec, torch.device(batch_or_spec.device if device is None else device)
    return batch_or_spec, torch.device(device) if device is not None else default_device()
