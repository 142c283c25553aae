"""GPU diagnosis of the fused POD kernel, one configuration per process so a hang is contained.

    python scripts/pod_diag.py            # runs every case below, each under a 60 s timeout
    python scripts/pod_diag.py CASE       # one case in this process

Each case: plan, launch, synchronize, compare with the fp32 reference, time (do_bench median).
"""
from __future__ import annotations

import subprocess
import sys
import time

CASES = {
    "serial_small": ("small", dict(variant="serial")),
    "fused_small_plain": ("small", dict(variant="fused", kv_splits=1, occupancy_roles=False, num_stages=2)),
    "fused_small_s5": ("small", dict(variant="fused", kv_splits=1, occupancy_roles=False)),
    "fused_small_occ": ("small", dict(variant="fused", kv_splits=1, occupancy_roles=True)),
    "fused_small_split": ("small", dict(variant="fused", kv_splits=4, occupancy_roles=False)),
    "persistent_small": ("small", dict(variant="persistent", kv_splits=1, occupancy_roles=False)),
    "fused_orient_plain": ("orient", dict(variant="fused", kv_splits=1, occupancy_roles=False, num_stages=2)),
    "fused_orient_default": ("orient", dict()),
    "fused_orient_4w": ("orient", dict(variant="fused", kv_splits=1, num_warps=4, block_m=64, block_n=64,
                                       num_stages=2, maxnreg=None)),
    "persistent_orient": ("orient", dict(variant="persistent", kv_splits=1)),
}


def one(name: str) -> None:
    import torch
    import triton.testing
    from pod.batch import make_batch
    from pod.gpu_checks import ORIENTATION, SMALL
    from pod.pod_attention import plan, runner
    from pod.reference import max_rel_error, reference
    which, kw = CASES[name]
    spec = SMALL if which == "small" else ORIENTATION
    batch = make_batch(spec, "cuda", seed=1)
    p = plan(batch, None, **kw) if kw else plan(batch)
    run = runner(p, batch)
    t0 = time.time()
    o_p, o_d = run()
    torch.cuda.synchronize()
    first = time.time() - t0
    ref_p, ref_d = reference(batch)
    ep, ed = max_rel_error(o_p, ref_p), max_rel_error(o_d, ref_d)
    ms = triton.testing.do_bench(run, warmup=25, rep=100, return_mode="median")
    print(f"{name:24s} first {first:6.1f}s  prefill_err {ep:.2e}  decode_err {ed:.2e}  median {ms:.3f} ms  "
          f"config {p.config}", flush=True)


def main() -> int:
    if len(sys.argv) > 1:
        one(sys.argv[1])
        return 0
    for name in CASES:
        try:
            r = subprocess.run([sys.executable, __file__, name], timeout=45, capture_output=True, text=True)
            print(r.stdout.strip() or f"{name}: rc={r.returncode} {r.stderr.strip()[-400:]}", flush=True)
        except subprocess.TimeoutExpired:
            print(f"{name:24s} TIMEOUT (45 s): hung or far too slow", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
