"""A control for compute-sanitizer's racecheck on Gluon kernels: the smallest warp-specialized kernel.

Its partitions touch no shared memory of their own (each writes a slice of a global tensor), so any shared
memory hazard racecheck reports on it lies in the code Triton generates around `gl.warp_specialize` (the
worker warps wait at the kernel's entry for the default warps to hand them their partition), not in ours:

    compute-sanitizer --tool racecheck python -m experiments.gpu_checks sanitize_ws

docs/hopper_pod.md compares its report with the Hopper kernels'.
"""
from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl


@gluon.jit
def _ws_default(out):
    lay: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])
    i = gl.arange(0, 128, layout=lay)
    gl.store(out + gl.program_id(0) * 160 + i, i.to(gl.float32))


@gluon.jit
def _ws_worker(out):
    lay: gl.constexpr = gl.BlockedLayout([1], [32], [1], [0])
    i = gl.arange(0, 32, layout=lay)
    gl.store(out + gl.program_id(0) * 160 + 128 + i, i.to(gl.float32) + 128.0)


@gluon.jit
def ws_minimal_kernel(out):
    gl.warp_specialize([(_ws_default, (out,)), (_ws_worker, (out,))], [1], [48])


def run_minimal(device: str = "cuda", ctas: int = 8) -> bool:
    """One launch; True when every CTA wrote 0..159 (both partitions ran)."""
    out = torch.full((ctas, 160), float("nan"), device=device)
    ws_minimal_kernel[(ctas,)](out, num_warps=4)
    torch.cuda.synchronize()
    return bool(torch.equal(out, torch.arange(160, device=device, dtype=torch.float32).expand(ctas, 160)))
