"""A control for compute-sanitizer's racecheck on Gluon kernels: the smallest warp-specialized kernel.

Its partitions touch no shared memory of their own (each writes a slice of a global tensor), so any shared
memory hazard racecheck reports on it lies in the code Triton generates around `gl.warp_specialize` (the
worker warps wait at the kernel's entry for the default warps to hand them their partition and the values
it captures), not in ours. Two kernels: one whose worker takes only a kernel argument, one whose worker
takes values computed before `gl.warp_specialize` (a scalar and a shared-memory buffer), which Triton
hands over through shared memory:

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


@gluon.jit
def _ws_worker_captures(out, base, buf):
    lay: gl.constexpr = gl.BlockedLayout([1], [32], [1], [0])
    i = gl.arange(0, 32, layout=lay)
    buf.store(i.to(gl.float32) + 128.0)                   # the worker's own buffer: no other reader
    gl.store(out + base + 128 + i, buf.load(lay))


@gluon.jit
def ws_captures_kernel(out):
    base = gl.program_id(0) * 160                         # computed before the split: a captured value
    buf = gl.allocate_shared_memory(gl.float32, [32], gl.SwizzledSharedLayout(1, 1, 1, [0]))
    gl.warp_specialize([(_ws_default, (out,)), (_ws_worker_captures, (out, base, buf))], [1], [48])


def run_minimal(device: str = "cuda", ctas: int = 8) -> bool:
    """One launch of each kernel; True when every CTA wrote 0..159 (both partitions ran)."""
    ok = True
    for kernel in (ws_minimal_kernel, ws_captures_kernel):
        out = torch.full((ctas, 160), float("nan"), device=device)
        kernel[(ctas,)](out, num_warps=4)
        torch.cuda.synchronize()
        ok &= bool(torch.equal(out, torch.arange(160, device=device, dtype=torch.float32).expand(ctas, 160)))
    return ok
