"""Checks of the fused POD kernel that need (or are about) the real GPU, beyond what the harness
checks per point (output vs the fp32 reference, timing). Entry points for the H100:

    python -m experiments.gpu_checks repeat        # (a) 50 launches of each variant: bit-identical outputs,
                                           #     right vs the fp32 reference, counters zero after each
    compute-sanitizer --tool racecheck python -m experiments.gpu_checks sanitize   # (b) tiny batch, every
    compute-sanitizer --tool memcheck  python -m experiments.gpu_checks sanitize   #     variant, one launch
    compute-sanitizer --tool synccheck python -m experiments.gpu_checks sanitize
    python -m experiments.gpu_checks resources     # (c) registers / shared memory / spills of the compiled
                                           #     kernel and the CTAs per SM they allow, per config
    python -m experiments.gpu_checks offline [contig]   # (c') the same from ptxas, without a GPU (sm_90a)
    python -m experiments.gpu_checks schedule      # (d) traced launch: real %smid, roles per SM, tiles once

Timing (and the output check that comes with it) is the harness's: the fused kernel's configurations
on the orientation and small points are `python -m experiments.attention -m sweep=pod_configs
backend=pod backend_options.pod_config=dispatcher,paper,fused_plain,...` (conf/sweep/pod_configs.yaml).
Only the sm_90 compile report (`pod.api.sm90_report`, no GPU needed) runs in the CPU tests.
"""
from __future__ import annotations

import json
import sys
from dataclasses import replace

import torch

from pod.batch import BatchSpec, make_batch
from pod.dispatch import RESIDENT_CTAS_PER_SM, PodConfig, max_ctas_per_sm
from pod.kernels.configs import POD_CONFIGS, POD_RESOURCE_CANDIDATES

LLAMA3_8B = dict(num_q_heads=32, num_kv_heads=8, head_dim=128)
# The orientation point (as conf/sweep/pod_configs.yaml): chunk 1024 over 12288 context + 64 decodes x 8192.
ORIENTATION = BatchSpec.build(**LLAMA3_8B, prefill=[(1024, 12288)], decode=[8192] * 64, page_size=16)
SMALL = BatchSpec.build(**LLAMA3_8B, prefill=[(300, 700), (77, 0)], decode=[1000, 37, 513, 2049],
                        page_size=16)

CANDIDATES = {name: POD_CONFIGS[name] for name in POD_RESOURCE_CANDIDATES}


def _cuda():
    if not torch.cuda.is_available():
        raise SystemExit("GPU only: this check needs a CUDA GPU (without one: python -m experiments.gpu_checks offline)")
    return torch.device("cuda")


def check_repeatable(spec: BatchSpec = SMALL, launches: int = 50, configs: dict | None = None) -> dict:
    """(a) Every variant: `launches` runs of one plan on one batch give bit-identical outputs (a
    scheduling race, a stale counter or a lost merge would show as a difference or NaN), the first is
    right against the fp32 reference, and the counter workspace is all zeros after the runs."""
    from pod.api import plan, runner
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
    from pod.api import run, plan
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


def schedule_stats(spec: BatchSpec = ORIENTATION, config: PodConfig | None = None) -> dict:
    """(d) One traced launch on the GPU: which SMs the CTAs landed on (real %smid) and how the roles
    spread over SMs, to see the SM-aware scheduling work (every SM should run both roles)."""
    from pod.api import fused_launcher, plan
    dev = _cuda()
    batch = make_batch(spec, dev, seed=0)
    p = plan(batch, config or PodConfig(variant="fused"))
    (l,) = p.launches
    trace = torch.full((l.grid, 5), -1, dtype=torch.int32, device=dev)
    fused_launcher(p, batch, *batch.empty_outputs(), l, trace=trace)()
    t = trace.cpu()
    smid, role = t[:, 0].long(), t[:, 3].long()
    n_sm = int(smid.max()) + 1
    pre = torch.bincount(smid[role == 1], minlength=n_sm).float()
    tot = torch.bincount(smid, minlength=n_sm).float()
    share = pre[tot > 0] / tot[tot > 0]
    return dict(grid=l.grid, sms_used=int((tot > 0).sum()), num_sms=p.num_sms,
                prefill_share_per_sm_min=float(share.min()), prefill_share_per_sm_max=float(share.max()),
                sms_with_both_roles=int(((share > 0) & (share < 1)).sum()),
                tiles_claimed_once=bool(torch.equal(t[role == 1, 4].sort().values,
                                                    torch.arange(p.n_prefill_tiles))
                                        and torch.equal(t[role == 0, 4].sort().values,
                                                        torch.arange(p.n_decode_tiles))))


def resources(spec: BatchSpec = ORIENTATION, configs: dict | None = None) -> dict:
    """(c) Compile each candidate config on this GPU (a launch) and read the compiled kernel's
    registers, spills and shared memory; the CTAs per SM they allow must be >= 2 for POD's overlap."""
    from pod.api import fused_launcher, plan
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


def offline_resources(configs: dict | None = None, page_size: int | None = 16,
                      head_dim: int = 128) -> dict:
    """(c') Without a GPU: compile the fused kernel for sm_90 as a launch on a Llama-3-8B-shaped batch
    would specialise it (pod.api.sm90_report: Triton's compiler, then the bundled ptxas -v)
    and report registers, spills, shared memory and the CTAs per SM they allow, per candidate config
    and variant. Run in a process without TRITON_INTERPRET (the kernel must be a compiled JITFunction)."""
    from pod.api import sm90_report
    spec = BatchSpec.build(32, 8, head_dim, prefill=[(300, 700)], decode=[1000, 513], page_size=page_size)
    out = {}
    for name, cfg in (configs or CANDIDATES).items():
        for variant in ("fused", "persistent"):
            out[f"{name}/{variant}"] = sm90_report(replace(cfg, variant=variant), spec)
    return out


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
        page_size = None if argv[1:2] == ["contig"] else 16
        for name, rep in offline_resources(page_size=page_size).items():
            print(json.dumps(dict(config=name, **rep)))
        return 0
    if cmd == "schedule":
        print(json.dumps(schedule_stats(), indent=1))
        return 0
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
