"""Checks of the fused POD kernel that need (or are about) the real GPU. Entry points for the H100:

    python -m pod.gpu_checks repeat        # (a) 50 launches of each variant: bit-identical outputs,
                                           #     right vs the fp32 reference, counters zero after each
    compute-sanitizer --tool racecheck python -m pod.gpu_checks sanitize   # (b) tiny batch, every
    compute-sanitizer --tool memcheck  python -m pod.gpu_checks sanitize   #     variant, one launch
    compute-sanitizer --tool synccheck python -m pod.gpu_checks sanitize
    python -m pod.gpu_checks resources     # (c) registers / shared memory / spills of the compiled
                                           #     kernel and the CTAs per SM they allow, per config
    python -m pod.gpu_checks offline       # (c') the same from ptxas, without a GPU (sm_90a target)
    python -m pod.gpu_checks bench         # quick do_bench: pod variants vs triton_serial (orientation)

Nothing here runs in the CPU test suite except `offline_resources` (no GPU needed, but slow: not in CI).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import replace

import torch

from pod.batch import BatchSpec, make_batch
from pod.dispatch import PodConfig, RESIDENT_CTAS_PER_SM

LLAMA3_8B = dict(num_q_heads=32, num_kv_heads=8, head_dim=128)
# The orientation point of the brief: chunk 1024 over 12288 context + 64 decodes x 8192.
ORIENTATION = BatchSpec.build(**LLAMA3_8B, prefill=[(1024, 12288)], decode=[8192] * 64, page_size=16)
SMALL = BatchSpec.build(**LLAMA3_8B, prefill=[(300, 700), (77, 0)], decode=[1000, 37, 513, 2049],
                        page_size=16)

# Configurations worth comparing on the H100 (resources, speed): name -> PodConfig.
CANDIDATES = {
    "8w_m128_n32": PodConfig(num_warps=8, block_m=128, block_n=32),   # the default
    "8w_m128_n32_s3": PodConfig(num_warps=8, block_m=128, block_n=32, num_stages=3),
    "8w_m128_n64": PodConfig(num_warps=8, block_m=128, block_n=64, num_stages=2),
    "8w_m128_n64_nocap": PodConfig(num_warps=8, block_m=128, block_n=64, num_stages=2, maxnreg=None),
    "4w_m64_n64": PodConfig(num_warps=4, block_m=64, block_n=64, num_stages=2),
    "4w_m64_n64_s3": PodConfig(num_warps=4, block_m=64, block_n=64, num_stages=3),
}

SMEM_PER_SM = 228 * 1024          # H100: 228 KB shared memory per SM, 1 KB of it reserved per CTA
SMEM_RESERVED_PER_CTA = 1024
REGS_PER_SM = 65536
MAX_THREADS_PER_SM = 2048


def max_ctas_per_sm(n_regs: int, shared_bytes: int, num_warps: int) -> int:
    """Occupancy limit of one kernel on an H100 SM from its registers, shared memory and threads
    (registers are allocated per warp in units of 256)."""
    regs_per_warp = -(-n_regs * 32 // 256) * 256
    by_regs = REGS_PER_SM // max(1, regs_per_warp * num_warps)
    by_smem = SMEM_PER_SM // (shared_bytes + SMEM_RESERVED_PER_CTA)
    by_threads = MAX_THREADS_PER_SM // (32 * num_warps)
    return min(by_regs, by_smem, by_threads, 32)


def _cuda():
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    return torch.device("cuda")


def check_repeatable(spec: BatchSpec = SMALL, launches: int = 50, configs: dict | None = None) -> dict:
    """(a) Every variant: `launches` runs of one plan on one batch give bit-identical outputs (a
    scheduling race, a stale counter or a lost merge would show as a difference or NaN), the first is
    right against the fp32 reference, and the counter workspace is all zeros after the runs."""
    from pod.pod_attention import plan, runner
    from pod.reference import max_rel_error, reference
    dev = _cuda()
    batch = make_batch(spec, dev, seed=0)
    ref_p, ref_d = reference(batch)
    configs = configs or {"fused": PodConfig(variant="fused", kv_splits=4),
                          "persistent": PodConfig(variant="persistent", kv_splits=4),
                          "dispatcher": None}
    report = {}
    for name, cfg in configs.items():
        p = plan(batch, cfg)
        out = batch.empty_outputs()
        launch = runner(p, batch, out)
        first = [t.clone() for t in launch()]
        diffs = 0
        for _ in range(launches - 1):
            o = launch()
            diffs += int(not torch.equal(o[0], first[0])) + int(not torch.equal(o[1], first[1]))
        torch.cuda.synchronize()
        report[name] = dict(prefill_err=max_rel_error(first[0], ref_p),
                            decode_err=max_rel_error(first[1], ref_d),
                            differing_launches=diffs,
                            counters_nonzero=int(torch.count_nonzero(p.counters)),
                            merge_counters_nonzero=int(torch.count_nonzero(p.decode.merge_counters)),
                            variant=p.config.variant)
        ok = (report[name]["prefill_err"] <= 1e-2 and report[name]["decode_err"] <= 1e-2 and diffs == 0
              and report[name]["counters_nonzero"] == 0 and report[name]["merge_counters_nonzero"] == 0)
        report[name]["ok"] = ok
    return report


def sanitize_smoke() -> None:
    """(b) One launch of each variant on a tiny batch (split decodes, paged and contiguous), then a
    sync: small enough for compute-sanitizer's racecheck / memcheck / synccheck."""
    from pod.pod_attention import run, plan
    dev = _cuda()
    for page_size in (16, None):
        spec = BatchSpec.build(8, 2, 128, prefill=[(70, 50)], decode=[200, 33, 129],
                               page_size=page_size)
        batch = make_batch(spec, dev, seed=1)
        for variant in ("fused", "persistent"):
            p = plan(batch, PodConfig(variant=variant, kv_splits=3, num_sms=4, ctas_per_sm=2))
            run(p, batch)
            torch.cuda.synchronize()
    print("sanitize smoke: done")


def resources(spec: BatchSpec = ORIENTATION, configs: dict | None = None) -> dict:
    """(c) Compile each candidate config on this GPU (a launch) and read the compiled kernel's
    registers, spills and shared memory; the CTAs per SM they allow must be >= 2 for POD's overlap."""
    from pod.pod_attention import fused_launcher, plan
    dev = _cuda()
    batch = make_batch(spec, dev, seed=0)
    out = {}
    for name, cfg in (configs or CANDIDATES).items():
        for variant in ("fused", "persistent"):
            p = plan(batch, replace(cfg, variant=variant))
            o = batch.empty_outputs()
            k = fused_launcher(p, batch, *o, p.launches[0])()
            k._init_handles()
            nw = k.metadata.num_warps
            out[f"{name}/{variant}"] = dict(
                n_regs=k.n_regs, n_spills=k.n_spills, shared=k.metadata.shared, num_warps=nw,
                maxnreg=p.config.resolved_maxnreg(),
                max_ctas_per_sm=max_ctas_per_sm(k.n_regs, k.metadata.shared, nw))
    torch.cuda.synchronize()
    return out


def offline_resources(configs: dict | None = None, head_dim: int = 128, group: int = 4,
                      page_size: int | None = 16, arch: int = 90) -> dict:
    """(c') Without a GPU: compile the fused kernel for sm_`arch` from its source (Triton's compiler,
    then the bundled ptxas -v) and report registers, spills and shared memory per candidate config.
    Strides and pointers are assumed 16-divisible, as Triton specialises them at a real launch.
    Run in a process without TRITON_INTERPRET (the kernel must be a compiled JITFunction)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from pod.kernels.pod_fused import pod_fused_kernel as fn
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    names = fn.arg_names
    half = {"p_Q", "p_K", "p_V", "p_O", "d_q", "d_o", "d_k", "d_v"}
    f32 = {"p_LSE", "d_part_o", "d_part_lse"}
    out = {}
    for name, cfg in (configs or CANDIDATES).items():
        for variant in ("fused", "persistent"):
            const = dict(P_GROUP=group, P_HEAD_DIM=head_dim, P_BLOCK_M=cfg.block_m, P_BLOCK_N=cfg.block_n,
                         P_PAGE_SIZE=page_size or 1, P_PAGED=page_size is not None, P_HAS_LSE=False,
                         D_NUM_KV_HEADS=8, D_GROUP=group, D_HEAD_DIM=head_dim,
                         D_BLOCK_M=max(16, 1 << (group - 1).bit_length()), D_BLOCK_N=cfg.block_n_decode,
                         D_PAGE_SIZE=page_size or 1, D_PAGED=page_size is not None, D_FUSE_MERGE=True,
                         HAS_PREFILL=True, HAS_DECODE=True, PERSISTENT=variant == "persistent",
                         OCCUPANCY_ROLES=cfg.occupancy_roles and variant != "persistent",
                         SIMULATE_SMID=False, TRACE=False)
            sig, attrs = {}, {}
            for i, n in enumerate(names):
                if n in const:
                    sig[n] = "constexpr"
                elif n in half:
                    sig[n] = "*bf16"
                elif n in f32:
                    sig[n] = "*fp32"
                elif "qk_scale" in n:
                    sig[n] = "fp32"
                elif n.startswith(("p_", "d_")) and "stride" not in n and n not in (
                        "p_num_q_heads", "d_seq_offset") or n in ("counters", "trace"):
                    sig[n] = "*i32"
                else:
                    sig[n] = "i32"
                if sig[n].startswith("*") or ("stride" in n and "bt" not in n and "lse" not in n):
                    attrs[(i,)] = [["tt.divisibility", 16]]
            src = ASTSource(fn=fn, signature=sig, attrs=attrs,
                            constexprs={(names.index(k),): v for k, v in const.items()})
            opts = dict(num_warps=cfg.num_warps, num_stages=cfg.resolved_num_stages(page_size is not None))
            if cfg.resolved_maxnreg() is not None:
                opts["maxnreg"] = cfg.resolved_maxnreg()
            k = triton.compile(src, target=GPUTarget("cuda", arch, 64), options=opts)
            with tempfile.TemporaryDirectory() as tmp:
                ptx = os.path.join(tmp, "k.ptx")
                with open(ptx, "w") as f:
                    f.write(k.asm["ptx"])
                log = subprocess.run([ptxas, f"-arch=sm_{arch}a", "-v", ptx, "-o", ptx + ".cubin"],
                                     capture_output=True, text=True).stderr
            regs = int(re.search(r"Used (\d+) registers", log).group(1))
            spills = int(re.search(r"(\d+) bytes spill stores", log).group(1))
            out[f"{name}/{variant}"] = dict(
                n_regs=regs, spill_store_bytes=spills, shared=k.metadata.shared, num_warps=cfg.num_warps,
                maxnreg=cfg.resolved_maxnreg(),
                max_ctas_per_sm=max_ctas_per_sm(regs, k.metadata.shared, cfg.num_warps))
    return out


def quick_bench(spec: BatchSpec = ORIENTATION) -> dict:
    """Orientation timings (ms, do_bench median) of the pod backends and our serial kernels. The real
    measurements are the harness's; this is for tuning the dispatcher's constants quickly."""
    import triton.testing
    from pod.registry import get_backend
    dev = _cuda()
    batch = make_batch(spec, dev, seed=0)
    res = {}
    for name in ("triton_serial", "triton_prefill", "triton_decode", "pod", "pod_paper", "pod_persistent"):
        try:
            fn = get_backend(name).prepare(batch)
        except Exception as e:      # a backend missing on this machine
            res[name] = f"unavailable: {e}"
            continue
        res[name] = triton.testing.do_bench(fn, warmup=25, rep=100)
    for name, cfg in CANDIDATES.items():
        from pod.pod_attention import plan, runner
        launch = runner(plan(batch, replace(cfg, variant="fused", kv_splits=1)), batch)
        res[f"fused/{name}"] = triton.testing.do_bench(launch, warmup=25, rep=100)
    return res


def main(argv: list[str]) -> int:
    cmd = argv[0] if argv else "repeat"
    if cmd == "repeat":
        rep = check_repeatable()
        print(json.dumps(rep, indent=1))
        return 0 if all(r["ok"] for r in rep.values()) else 1
    if cmd == "sanitize":
        sanitize_smoke()
        return 0
    if cmd == "resources":
        rep = resources()
        print(json.dumps(rep, indent=1))
        return 0 if all(r["max_ctas_per_sm"] >= RESIDENT_CTAS_PER_SM for r in rep.values()) else 1
    if cmd == "offline":
        print(json.dumps(offline_resources(), indent=1))
        return 0
    if cmd == "bench":
        print(json.dumps(quick_bench(), indent=1))
        return 0
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
