"""Checks of the fused POD kernel that need (or are about) the real GPU, beyond what the harness
checks per point (output vs the fp32 reference, timing). Entry points for the H100:

    python -m experiments.gpu_checks repeat        # (a) 50 launches of each config: bit-identical outputs,
                                           #     right vs the fp32 reference, counters zero after each
    compute-sanitizer --tool racecheck python -m experiments.gpu_checks sanitize   # (b) tiny batch, the
    compute-sanitizer --tool memcheck  python -m experiments.gpu_checks sanitize   #     fused kernel, one launch
    compute-sanitizer --tool synccheck python -m experiments.gpu_checks sanitize
    compute-sanitizer --tool racecheck python -m experiments.gpu_checks sanitize_sm90  # (b') the same for the
                                           #     Hopper kernels (prefill tile, POD on Hopper)
    compute-sanitizer --tool racecheck python -m experiments.gpu_checks sanitize_ws    # (b'') the control: the
                                           #     smallest warp-specialized Gluon kernel (experiments/ws_probe.py)
    python -m experiments.gpu_checks resources     # (c) registers / shared memory / spills of the compiled
                                           #     kernel and the CTAs per SM they allow, per config
    python -m experiments.gpu_checks offline [contig]   # (c') the same from ptxas, without a GPU (sm_90a)
    python -m experiments.gpu_checks schedule      # (d) traced launch: real %smid, roles per SM, tiles once
    python -m experiments.gpu_checks prefill_sm90  # (e) every shipped Hopper prefill config on fresh random
                                           #     ragged batches (4 models, bf16/fp16, contiguous and pages
                                           #     of 16/64/256, NaN in stale page slots, NaN-poisoned
                                           #     outputs, 2 seeds): vs the fp32 reference, LSE, repeat
    python -m experiments.gpu_checks pod_sm90 [i/n [GRID,...]]  # (f) the Hopper POD kernel
                                           #     (pod/kernels/pod_sm90.py) on hybrid, decode-only and
                                           #     prefill-only batches, same checks as (e) for both parts;
                                           #     i/n: every n-th case from i (run n processes side by side:
                                           #     they compile in parallel); GRID,...: only those configs
    python -m experiments.gpu_checks serving [BACKEND ...]  # (g) a few serving-engine iterations of a
                                           #     small model with pod, triton_serial (and fi_serial when
                                           #     FlashInfer imports): tokens, finite logits, attention error
    python -m experiments.gpu_checks graphs [BACKEND ...]   # (h) each of our GPU backends' run() captured
                                           #     in a CUDA graph on a small hybrid batch (paged, contiguous),
                                           #     replayed on fresh inputs copied into the same buffers
                                           #     (NaN-poisoned outputs, NaN in stale page slots): vs the fp32
                                           #     reference, and a second replay bitwise equal

Timing (and the output check that comes with it) is the harness's: the fused kernel's configurations
on the orientation and small points are `python -m experiments.attention -m sweep=pod_configs
backend=pod backend_options.pod_config=dispatcher,paper,fused_plain,...` (conf/sweep/pod_configs.yaml).
Only the sm_90 compile report (`pod.api.sm90_report`, no GPU needed) runs in the CPU tests.
"""
from __future__ import annotations

import json
import re
import sys
from dataclasses import replace

import torch

from experiments.cli import command
from pod.batch import BatchSpec, make_batch
from pod.dispatch import RESIDENT_CTAS_PER_SM, PodConfig, max_ctas_per_sm
from pod.kernels.configs import POD_CONFIGS, POD_RESOURCE_CANDIDATES

LLAMA3_8B = dict(num_q_heads=32, num_kv_heads=8, head_dim=128)
# The orientation point (as conf/sweep/pod_configs.yaml): chunk 1024 over 12288 context + 64 decodes x 8192.
ORIENTATION = BatchSpec.build(**LLAMA3_8B, prefill=[(1024, 12288)], decode=[8192] * 64, page_size=16)
SMALL = BatchSpec.build(**LLAMA3_8B, prefill=[(300, 700), (77, 0)], decode=[1000, 37, 513, 2049],
                        page_size=16)

CANDIDATES = {name: POD_CONFIGS[name] for name in POD_RESOURCE_CANDIDATES}


def _cuda(what: str = "this check", offline: bool = True):
    if not torch.cuda.is_available():
        instead = f" (without one: {command('experiments.gpu_checks offline')})" if offline else ""
        raise SystemExit(f"GPU only: {what} needs a CUDA GPU{instead}")
    return torch.device("cuda")


def check_repeatable(spec: BatchSpec = SMALL, launches: int = 50, configs: dict | None = None) -> dict:
    """(a) Every config: `launches` runs of one plan on one batch give bit-identical outputs (a
    scheduling race, a stale counter or a lost merge would show as a difference or NaN), the first is
    right against the fp32 reference, and the counter workspace is all zeros after the runs."""
    from pod.api import plan
    from pod.reference import max_rel_error, reference
    dev = _cuda()
    batch = make_batch(spec, dev, seed=0)
    ref_p, ref_d = reference(batch)
    configs = configs or {"fused": PodConfig(variant="fused", kv_splits=4), "dispatcher": None}
    report = {}
    for name, cfg in configs.items():
        p = plan(batch, cfg)
        out = batch.empty_outputs()
        launch = p.runner(batch, *out)
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
    """(b) One launch of the fused kernel on a tiny batch (split decodes, paged and contiguous), then a
    sync: small enough for compute-sanitizer's racecheck / memcheck / synccheck."""
    from pod.api import run, plan
    dev = _cuda()
    for page_size in (16, None):
        spec = BatchSpec.build(8, 2, 128, prefill=[(70, 50)], decode=[200, 33, 129],
                               page_size=page_size)
        batch = make_batch(spec, dev, seed=1)
        run(plan(batch, PodConfig(variant="fused", kv_splits=3, num_sms=4, ctas_per_sm=2)), batch)
        torch.cuda.synchronize()
    print("sanitize smoke: done")


def sanitize_sm90() -> None:
    """(b') One launch of each Hopper (Gluon, sm_90a) kernel on small ragged batches, paged and contiguous,
    then a sync: the Hopper prefill tile, and the Hopper POD kernel on a hybrid batch (its planned grid
    and a 4-CTA grid: many items a CTA). Small enough for compute-sanitizer:
        compute-sanitizer --tool racecheck python -m experiments.gpu_checks sanitize_sm90"""
    from pod.kernels.pod_sm90 import PodSm90Config, plan_pod_sm90
    from pod.kernels.prefill_sm90 import plan_prefill_sm90
    dev = _cuda()
    for page_size in (16, None):
        spec = BatchSpec.build(8, 2, 128, prefill=[(70, 50), (130, 0)], decode=[200, 33, 129], page_size=page_size)
        batch = make_batch(spec, dev, seed=1)
        poison_stale_slots(batch)
        o_p, o_d = batch.empty_outputs()
        plan_prefill_sm90(batch).runner(batch, o_p)()
        for cfg in (PodSm90Config(), PodSm90Config(num_ctas=4)):
            plan_pod_sm90(batch, cfg).runner(batch, o_p, o_d)()
        torch.cuda.synchronize()
    print("sanitize sm90: done")


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
        p = plan(batch, cfg)
        o = batch.empty_outputs()
        k = fused_launcher(p, batch, *o, p.launches[0])()
        k._init_handles()
        nw = k.metadata.num_warps
        out[name] = dict(n_regs=k.n_regs, n_spills=k.n_spills, shared=k.metadata.shared, num_warps=nw,
                         maxnreg=p.config.resolved_maxnreg(),
                         max_ctas_per_sm=max_ctas_per_sm(k.n_regs, k.metadata.shared, nw))
    torch.cuda.synchronize()
    return out


def offline_resources(configs: dict | None = None, page_size: int | None = 16,
                      head_dim: int = 128) -> dict:
    """(c') Without a GPU: compile the fused kernel for sm_90 as a launch on a Llama-3-8B-shaped batch
    would specialise it (pod.api.sm90_report: Triton's compiler, then the bundled ptxas -v)
    and report registers, spills, shared memory and the CTAs per SM they allow, per candidate config.
    Run in a process without TRITON_INTERPRET (the kernel must be a compiled JITFunction)."""
    from pod.api import sm90_report
    spec = BatchSpec.build(32, 8, head_dim, prefill=[(300, 700)], decode=[1000, 513], page_size=page_size)
    out = {}
    return {name: sm90_report(cfg, spec) for name, cfg in (configs or CANDIDATES).items()}


# Ragged chunk sets (chunk_len, context_len), none a multiple of a tile or a page: one of 1 row, GQA 4 and 8,
# MHA, head_dim 64.
SM90_CHECK_SHAPES = (
    (dict(num_q_heads=32, num_kv_heads=8, head_dim=128), ((300, 0), (517, 1234), (128, 4096), (1, 77), (45, 0))),
    (dict(num_q_heads=32, num_kv_heads=4, head_dim=128), ((1000, 3000), (64, 64))),
    (dict(num_q_heads=32, num_kv_heads=32, head_dim=128), ((777, 555),)),
    (dict(num_q_heads=32, num_kv_heads=8, head_dim=64), ((513, 999), (200, 0), (1, 1))),
)


def poison_stale_slots(batch) -> None:
    """NaN in every slot of a sequence's last page past its length: a kernel that lets a stale slot reach
    P @ V (0 * NaN) fails."""
    if batch.block_table is None:
        return
    p = batch.spec.page_size
    for s in range(batch.kv_lens.numel()):
        n = int(batch.kv_lens[s])
        if n % p:
            page = int(batch.block_table[s, (n - 1) // p])
            batch.k_cache[page, n % p:] = float("nan")
            batch.v_cache[page, n % p:] = float("nan")


def check_prefill_sm90(seeds=(1, 2), tol: float = 2e-2, lse_tol: float = 1e-2, out=print) -> list[dict]:
    """(e) The Hopper prefill tile: every shipped config (pod.kernels.configs.SM90_CONFIGS[_D64]) on every
    case of SM90_CHECK_SHAPES x {bf16, fp16} x {contiguous, pages 16/64/256} x seeds. Outputs and LSE
    start as NaN; a run passes when max rel error < tol, |LSE - ref| < lse_tol and a second launch is
    bitwise equal. One JSON-able dict a run."""
    import math

    from pod.kernels.prefill_sm90 import plan_prefill_sm90, sm90_configs, sm90_supports
    from pod.reference import max_rel_error, reference_prefill
    dev = _cuda()
    rows = []
    for n_case, (heads, chunks) in enumerate(SM90_CHECK_SHAPES):
        for dtype in ("bfloat16", "float16"):
            for page in (None, 16, 64, 256):
                spec = BatchSpec.build(**heads, prefill=chunks, dtype=dtype, page_size=page)
                for seed in seeds:
                    batch = make_batch(spec, dev, seed=1000 * n_case + seed)
                    poison_stale_slots(batch)
                    lse_ref = torch.empty(batch.q_prefill.shape[:2], device=dev)
                    ref = reference_prefill(batch, lse=lse_ref)
                    for name, cfg in sm90_configs(heads["head_dim"]).items():
                        row = dict(heads=heads, chunks=chunks, dtype=dtype, page_size=page, seed=seed, config=name)
                        why = sm90_supports(spec, cfg)
                        if why:
                            rows.append(dict(row, ok=True, skipped=why))
                            continue
                        work = plan_prefill_sm90(batch, cfg)
                        o = torch.full_like(batch.q_prefill, float("nan"))
                        lse = torch.full(batch.q_prefill.shape[:2], float("nan"), device=dev)
                        work.runner(batch, o, lse)()
                        o2 = torch.full_like(o, float("nan"))
                        work.runner(batch, o2, None)()
                        torch.cuda.synchronize()
                        err = max_rel_error(o, ref)
                        lse_err = (float((lse * math.log(2) - lse_ref).abs().max())
                                   if torch.isfinite(lse).all() else float("inf"))
                        same = bool(torch.equal(o, o2))
                        row.update(err=err, lse_err=lse_err, repeat_equal=same,
                                   ok=err < tol and lse_err < lse_tol and same)
                        rows.append(row)
                        out(json.dumps(row))
    return rows


# The Hopper POD kernel (pod/kernels/pod_sm90.py): hybrid, decode-only and prefill-only batches with ragged
# chunks and decodes (none a multiple of a tile, a half-tile or a page), GQA 4 and 8, MHA, MQA, head_dim 64;
# long decodes next to few items make the planner split them (partials + merge).
POD_SM90_CHECK_SHAPES = (
    # (heads, prefill chunks, decode context lens, layouts, dtypes)
    (dict(num_q_heads=32, num_kv_heads=8, head_dim=128), ((300, 700), (77, 0), (1, 50)), (1000, 37, 513, 2049, 1),
     (None, 16, 64, 256), ("bfloat16", "float16")),
    (dict(num_q_heads=32, num_kv_heads=8, head_dim=128), ((1024, 4096),), (4096,) * 48 + (333,) * 17,
     (16,), ("bfloat16",)),
    (dict(num_q_heads=32, num_kv_heads=8, head_dim=128), (), (20000, 65, 3000), (None, 16), ("bfloat16",)),
    (dict(num_q_heads=32, num_kv_heads=8, head_dim=128), ((517, 1234), (128, 0)), (), (None, 16), ("bfloat16",)),
    (dict(num_q_heads=32, num_kv_heads=4, head_dim=128), ((1000, 3000),), (4097, 1, 700), (None, 16), ("bfloat16",)),
    (dict(num_q_heads=32, num_kv_heads=32, head_dim=128), ((129, 64),), (700, 90), (16,), ("bfloat16",)),
    (dict(num_q_heads=32, num_kv_heads=1, head_dim=128), ((512, 2048),), (2048,) * 9 + (5,), (16,), ("bfloat16",)),
    (dict(num_q_heads=32, num_kv_heads=8, head_dim=64), ((513, 999),), (333, 64, 5000), (None, 16), ("bfloat16",)),
)


def check_pod_sm90(seeds=(1, 2), tol: float = 2e-2, out=print, shard: tuple[int, int] = (0, 1),
                   only: tuple[str, ...] | None = None) -> list[dict]:
    """(f) pod/kernels/pod_sm90.py on POD_SM90_CHECK_SHAPES x layouts x dtypes x seeds, each with the
    planner's grid (the default config; "static": its planned lists whatever balance="auto" picks) and with a
    4-CTA grid (many items a CTA: ring and Q-handshake phases across items, pairs
    of unequal items), a forced 1-CTA decode role, and 2 decode CTAs of 6 that take prefill tiles after
    their pairs (a ring used by both roles), lists bound to blocks ("block"), spread SMs ("stride") or SMs
    chosen by GPC ("gpc_spread", "gpc_pack": the probed GPC map; the default binds them to SMs by %smid) and a
    12-CTA grid whose SMs all ask for list 0 (every other list claimed through the fallback), and prefill
    tails through rebuilt descriptors ("desc"; the default masks them), and each item's Q loaded only after
    the previous item's epilogue ("no_overlap"; the default overlaps them), and the decode's two wgmmas in
    flight together ("decode_pipe") or its O^T one stage behind ("decode_lag", also on 4 CTAs: "lag_ctas4"),
    or its softmax rescaled lazily ("decode_lazy", "lazy_ctas4"; these and "planned" once more on the first
    seed with decode queries x SHARP_Q, rows "sharp_..."), and prefill tiles in LPT order ("cost_order"; the
    default lists them by kv head), and L2 policies on both roles' K/V copies ("l2_hints", "l2_ctas4": decode
    evict-first ("l2_decode": that alone), prefill evict-last), and items claimed at run time from the two
    queues ("dynamic"; on 4 CTAs that take the other role's items whenever theirs run out, cross_rounds 0, so
    both roles' CTAs run both roles in either order, "dyn_ctas4", also with tails through rebuilt descriptors "dyn_desc" and without overlap "dyn_no_overlap";
    one decode CTA of 12, "dyn_decode1"; lists bound to blocks, "dyn_block", or all SMs asking for list 0,
    "dyn_collide"; the decode queue's last requests split finer, decode_tail_keys, "dyn_tail",
    "dyn_tail_ctas4"; the static lists with tails, static_tail_keys, "static_tail", and prefill CTAs that end
    with decode pairs, "fill", "fill_ctas4"): both outputs start as NaN, stale page slots hold NaN;
    a run passes when both parts are within `tol` of the fp32 reference and a second launch is bitwise
    equal (the dynamic queues' cursors are reset by the launch itself). `shard=(i, n)`: only cases i, i+n,
    ... (n processes compile their kernels in parallel); `only`: just these grids (names above)."""
    from pod.kernels.pod_sm90 import PodSm90Config, pod_sm90_supports
    dev = _cuda()
    rows = []
    grids = {"planned": PodSm90Config(), "static": PodSm90Config(balance="static"), "ctas4": PodSm90Config(num_ctas=4),
             "decode1": PodSm90Config(num_ctas=12, decode_ctas=1),
             "steal": PodSm90Config(num_ctas=6, decode_ctas=2, steal="always"),
             "block": PodSm90Config(bind="block"), "stride": PodSm90Config(bind="stride"),
             "gpc_spread": PodSm90Config(bind="gpc_spread"), "gpc_pack": PodSm90Config(bind="gpc_pack"),
             "collide": PodSm90Config(num_ctas=12, bind="collide"), "desc": PodSm90Config(prefill_tail="desc"),
             "no_overlap": PodSm90Config(overlap=False), "decode_pipe": PodSm90Config(decode_loop="pipe"),
             "decode_lag": PodSm90Config(decode_loop="lag"), "lag_ctas4": PodSm90Config(num_ctas=4, decode_loop="lag"),
             "decode_lazy": PodSm90Config(decode_loop="lazy"),
             "lazy_ctas4": PodSm90Config(num_ctas=4, decode_loop="lazy"),
             "cost_order": PodSm90Config(prefill_order="cost"),
             "l2_decode": PodSm90Config(decode_l2="evict_first"),
             "l2_hints": PodSm90Config(decode_l2="evict_first", prefill_l2="evict_last"),
             "l2_ctas4": PodSm90Config(num_ctas=4, decode_l2="evict_first", prefill_l2="evict_last"),
             "dynamic": PodSm90Config(balance="dynamic"),
             "dyn_ctas4": PodSm90Config(num_ctas=4, balance="dynamic", cross_rounds=0.0),
             "dyn_desc": PodSm90Config(num_ctas=4, balance="dynamic", cross_rounds=0.0, prefill_tail="desc"),
             "dyn_no_overlap": PodSm90Config(num_ctas=4, balance="dynamic", cross_rounds=0.0, overlap=False),
             "dyn_decode1": PodSm90Config(num_ctas=12, decode_ctas=1, balance="dynamic"),
             "dyn_block": PodSm90Config(balance="dynamic", bind="block"),
             "dyn_collide": PodSm90Config(num_ctas=12, bind="collide", balance="dynamic"),
             "dyn_tail": PodSm90Config(balance="dynamic", cross_rounds=0.0, decode_tail_keys=256),
             "dyn_tail_ctas4": PodSm90Config(num_ctas=4, balance="dynamic", cross_rounds=0.0, decode_tail_keys=128),
             "static_tail": PodSm90Config(balance="static", static_tail_keys=128, static_tail_frac=0.5,
                                          static_tail_gain=-1.0),
             "fill": PodSm90Config(balance="static", static_tail_keys=128, static_tail_frac=0.5,
                                   static_tail_gain=-1.0, static_fill="always"),
             "fill_ctas4": PodSm90Config(num_ctas=4, balance="static", static_tail_keys=64, static_tail_frac=0.5,
                                         static_tail_gain=-1.0, static_fill="always")}
    # Sharp softmax (decode queries x SHARP_Q: scores spread over tens of log2 units, so a column's maximum
    # keeps jumping past the lazy loop's threshold after an item's first stage): these grids run again on it.
    sharp_grids = ("planned", "decode_lazy", "lazy_ctas4", "dynamic")
    if only is not None:
        unknown = set(only) - set(grids)
        if unknown:
            raise ValueError(f"pod_sm90 grids {sorted(unknown)}: not among {sorted(grids)}")
        grids = {g: c for g, c in grids.items() if g in only}
        sharp_grids = tuple(g for g in sharp_grids if g in only)
    case = -1
    for n_case, (heads, chunks, decodes, layouts, dtypes) in enumerate(POD_SM90_CHECK_SHAPES):
        for dtype in dtypes:
            for page in layouts:
                case += 1
                if case % shard[1] != shard[0]:
                    continue
                spec = BatchSpec.build(**heads, prefill=chunks, decode=decodes, dtype=dtype, page_size=page)
                why = pod_sm90_supports(spec)
                for seed in seeds:
                    row = dict(heads=heads, chunks=chunks, decodes=len(decodes), dtype=dtype, page_size=page,
                               seed=seed)
                    if why:
                        rows.append(dict(row, ok=True, skipped=why))
                        continue
                    batch = make_batch(spec, dev, seed=1000 * n_case + seed)
                    poison_stale_slots(batch)
                    runs = [(batch, "", grids)]
                    if spec.num_decode and seed == seeds[0]:
                        sharp = replace(batch, q_decode=batch.q_decode * SHARP_Q)
                        if sharp_grids:
                            runs.append((sharp, "sharp_", {g: grids[g] for g in sharp_grids}))
                    for b, tag, run_grids in runs:
                        rows += _check_pod_sm90_grids(b, row, tag, run_grids, tol, out)
    return rows


SHARP_Q = 8.0   # check_pod_sm90's sharp-softmax runs: decode queries scaled by this


def _check_pod_sm90_grids(batch, row: dict, tag: str, grids: dict, tol: float, out) -> list[dict]:
    """One batch through each of `grids` (name -> PodSm90Config) twice: a row per grid (check_pod_sm90)."""
    from pod.kernels.pod_sm90 import plan_pod_sm90
    from pod.reference import max_rel_error, reference
    spec = batch.spec
    rows = []
    ref_p, ref_d = reference(batch)
    for gname, cfg in grids.items():
        work = plan_pod_sm90(batch, cfg)
        outs = []
        for _ in range(2):
            o = (torch.full_like(batch.q_prefill, float("nan")),
                 torch.full_like(batch.q_decode, float("nan")))
            work.runner(batch, *o)()
            torch.cuda.synchronize()
            outs.append(o)
        err_p = max_rel_error(outs[0][0], ref_p) if spec.num_prefill else 0.0
        err_d = max_rel_error(outs[0][1], ref_d) if spec.num_decode else 0.0
        same = all(torch.equal(a, b) for a, b in zip(outs[0], outs[1]))
        r = dict(row, plan=tag + gname, grid=work.grid, decode_ctas=work.decode_ctas,
                 merge=work.needs_merge, prefill_err=err_p, decode_err=err_d, repeat_equal=same,
                 ok=err_p < tol and err_d < tol and same)
        rows.append(r)
        out(json.dumps(r))
    return rows


COMMANDS = ("repeat", "sanitize", "sanitize_sm90", "sanitize_ws", "resources", "offline", "schedule", "prefill_sm90", "pod_sm90",
            "serving", "graphs")


def parse_args(argv: list[str]) -> tuple[str, list[str]]:
    """(check, its arguments): the first word (default repeat), one of COMMANDS; anything else exits 2
    with one line naming the checks."""
    cmd, rest = (argv[0], list(argv[1:])) if argv else ("repeat", [])
    shard_ok = cmd == "pod_sm90" and len(rest) in (1, 2) and re.fullmatch(r"\d+/[1-9]\d*", rest[0]) \
        and int(rest[0].split("/")[0]) < int(rest[0].split("/")[1]) \
        and (len(rest) == 1 or re.fullmatch(r"[a-z0-9_]+(,[a-z0-9_]+)*", rest[1]) is not None)
    if cmd not in COMMANDS or (rest and cmd not in ("serving", "graphs") and not shard_ok
                               and (rest != ["contig"] or cmd != "offline")):
        print(f"gpu_checks: {' '.join(argv)!r} is not a check; one of {', '.join(COMMANDS)} "
              f"(offline takes `contig`, pod_sm90 a shard `i/n` and grid names `a,b`, serving and graphs backend names)",
              file=sys.stderr)
        raise SystemExit(2)
    return cmd, rest
# (g) The serving engine: a small Llama shape (GQA 4, head_dim 128, bf16, 16-token pages) whose prompts
# span 2-3 chunks, so the first iterations sample no token (the case that broke CUDA-event timing) and
# later ones mix chunks with decodes.
SERVING_CHECK_BACKENDS = ("pod", "triton_serial", "fi_serial")
SERVING_MUST_RUN = ("pod", "triton_serial")   # the others give a skipped row where their package is missing


def check_serving(backends=SERVING_CHECK_BACKENDS, device=None, tol: float = 2e-2, out=print) -> list[dict]:
    """(g) Serve 3 requests (prompts of 200-330 tokens, 4 output tokens, chunk 128) through
    experiments.serving.engine with each backend, every layer's attention checked against the fp32
    reference (the engine's verify). A backend passes when every request got its tokens, every sampled
    logit is finite, the attention error is below `tol` and every iteration's times are finite."""
    import math

    from baselines.registry import get_backend
    from experiments.serving.engine import Engine
    from experiments.serving.kv_cache import PagedKVCache
    from experiments.serving.model import LlamaModel, ModelConfig
    from experiments.serving.scheduler import SchedulerConfig
    from experiments.serving.workload import LengthDist, WorkloadConfig, generate
    dev = device or _cuda()
    cfg = ModelConfig("serving_check", hidden_size=512, num_layers=2, num_q_heads=8, num_kv_heads=2,
                      head_dim=128, intermediate_size=1024, vocab_size=512, max_position=1024)
    specs = generate(WorkloadConfig(3, LengthDist("uniform", low=200, high=330), LengthDist("fixed", value=4),
                                    vocab_size=cfg.vocab_size, seed=0))
    model = LlamaModel(cfg, dtype=torch.bfloat16, device=dev, seed=0)
    rows = []
    for name in backends:
        row = dict(backend=name)
        why = get_backend(name).availability()
        if why is not None:
            row.update(ok=name not in SERVING_MUST_RUN, skipped=why)
            rows.append(row)
            out(json.dumps(row))
            continue
        try:
            cache = PagedKVCache(cfg.num_layers, 96, 16, cfg.heads, torch.bfloat16, dev, seed=0)
            engine = Engine(model, cache, SchedulerConfig(128, max_num_seqs=4, watermark=0.0), backend=name,
                            verify=True, record_logits=True)
            run = engine.run(specs)
            its = run.iterations
            logits = [t for rows_ in engine.logits.values() for t in rows_]
            times = [x for i in its for x in (i.forward_ms, i.attention_ms, i.plan_ms, i.layer_ms)]
            row.update(iterations=len(its), hybrid_iterations=sum(bool(i.num_prefill and i.num_decode) for i in its),
                       attn_err=run.attn_err, forward_ms_max=max(i.forward_ms for i in its),
                       tokens_ok=all(len(r.output) == r.spec.output_len for r in run.requests),
                       logits_finite=bool(logits) and all(bool(torch.isfinite(t).all()) for t in logits),
                       times_finite=all(math.isfinite(x) and x >= 0 for x in times))
            row["ok"] = (row["tokens_ok"] and row["logits_finite"] and row["times_finite"]
                         and row["attn_err"] < tol)
        except Exception as e:  # noqa: BLE001 - a failing backend is a failed row; the others still run
            row.update(ok=False, error=f"{type(e).__name__}: {e}"[:500])
        rows.append(row)
        out(json.dumps(row))
    return rows


# (h) CUDA graphs: engines capture attention in graphs, so every run() of ours must replay right. Two small
# hybrid batches (Llama-3-8B heads, ragged chunks and decodes), paged and contiguous.
GRAPH_CHECK_SPECS = {"paged16": SMALL, "contiguous": replace(SMALL, page_size=None)}


def our_gpu_backends() -> list[str]:
    """Our kernel backends, from the registry: those baselines/ours.py registers, less the fp32 reference
    (a backend whose GPU cannot run it, or that refuses the batch, gives a skipped row)."""
    from baselines.registry import list_backends
    return [name for name, b in list_backends().items()
            if b.prepare.__module__ == "baselines.ours" and name != "reference"]


def check_graphs(backends=None, tol: float = 2e-2, out=print, device=None, specs=None, capture=None) -> list[dict]:
    """(h) For each backend (default: our_gpu_backends()) and batch of `specs` (GRAPH_CHECK_SPECS):
    prepare, one eager run, its run() captured in a CUDA graph (`capture`: the harness's capture_graph,
    as timing.cuda_graph does), then fresh random inputs (another seed) copied into the batch's own
    tensors with NaN in stale page slots, and two replays into NaN-poisoned outputs. A run passes when the
    eager outputs and the first replay's (against the fp32 reference of the fresh inputs) are within `tol`
    and the second replay is bitwise equal to the first."""
    import math

    from baselines.registry import BackendUnavailable, get_backend
    from experiments.harness.running import check_outputs
    from experiments.harness.timing import capture_graph, replay_poisoned
    from pod.reference import reference
    dev = device or _cuda("capturing CUDA graphs", offline=False)
    capture = capture or capture_graph
    rows = []
    for layout, spec in (specs or GRAPH_CHECK_SPECS).items():
        for name in backends or our_gpu_backends():
            backend = get_backend(name)
            row = dict(backend=name, layout=layout)
            why = backend.availability() or backend.unavailable_for(spec)
            batch = make_batch(spec, dev, seed=0)
            try:
                run = None if why else backend.setup(batch)
            except BackendUnavailable as e:
                why = str(e)
            if why:
                rows.append(dict(row, ok=True, skipped=why))
                out(json.dumps(rows[-1]))
                continue
            try:
                eager = check_outputs(run(), reference(batch), batch, backend)
                graph, outs = capture(run, dev)
                fresh = make_batch(spec, dev, seed=1)
                for t in ("q_prefill", "q_decode", "k_cache", "v_cache"):
                    getattr(batch, t).copy_(getattr(fresh, t))
                poison_stale_slots(batch)
                first = [None if t is None else t.clone() for t in replay_poisoned(graph, outs, dev)]
                replay = check_outputs(outs, reference(batch), batch, backend)
                second = replay_poisoned(graph, outs, dev)
                same = all((a is None) == (b is None) and (a is None or torch.equal(a, b))
                           for a, b in zip(first, second))
                del graph
                errs = [e for e in (*eager, *replay) if not math.isnan(e)]
                row.update(eager_prefill_err=eager[0], eager_decode_err=eager[1], prefill_err=replay[0],
                           decode_err=replay[1], repeat_equal=same, ok=bool(errs) and max(errs) < tol and same)
            except Exception as e:  # noqa: BLE001 - a failing backend is a failed row; the others still run
                row.update(ok=False, error=f"{type(e).__name__}: {e}"[:500])
            rows.append(row)
            out(json.dumps(row))
    return rows


def main(argv: list[str]) -> int:
    cmd, rest = parse_args(argv)
    if cmd == "repeat":
        rep = check_repeatable()
        print(json.dumps(rep, indent=1))
        return 0 if all(r["ok"] for r in rep.values()) else 1
    if cmd == "sanitize":
        sanitize_smoke()
        return 0
    if cmd == "sanitize_sm90":
        sanitize_sm90()
        return 0
    if cmd == "sanitize_ws":
        from experiments.ws_probe import run_minimal
        ok = run_minimal(_cuda())
        print(f"sanitize ws: minimal warp-specialized kernel {'ran' if ok else 'WROTE WRONG VALUES'}")
        return 0 if ok else 1
    if cmd == "resources":
        rep = resources()
        print(json.dumps(rep, indent=1))
        return 0 if all(r["max_ctas_per_sm"] >= RESIDENT_CTAS_PER_SM for r in rep.values()) else 1
    if cmd == "offline":
        page_size = None if rest == ["contig"] else 16
        for name, rep in offline_resources(page_size=page_size).items():
            print(json.dumps(dict(config=name, **rep)))
        return 0
    if cmd == "schedule":
        print(json.dumps(schedule_stats(), indent=1))
        return 0
    if cmd == "graphs":
        rows = check_graphs(tuple(rest) or None)
        bad = [r for r in rows if not r["ok"]]
        ran = sum("skipped" not in r for r in rows)
        print(f"graphs: {ran} runs captured and replayed, {len(bad)} failed"
              + "".join(f"\n  FAILED {json.dumps(r)}" for r in bad))
        return 1 if bad else 0
    if cmd == "serving":
        rows = check_serving(tuple(rest) or SERVING_CHECK_BACKENDS)
        bad = [r for r in rows if not r["ok"]]
        ran = sum("skipped" not in r for r in rows)
        print(f"serving: {ran} backends served, {len(bad)} failed" + "".join(f"\n  FAILED {json.dumps(r)}" for r in bad))
        return 1 if bad else 0
    shard = tuple(int(x) for x in rest[0].split("/")) if rest else (0, 1)
    only = tuple(rest[1].split(",")) if len(rest) > 1 else None
    rows = check_prefill_sm90() if cmd == "prefill_sm90" else check_pod_sm90(shard=shard, only=only)  # the two left
    bad = [r for r in rows if not r["ok"]]
    ran = sum("skipped" not in r for r in rows)
    print(f"{cmd}: {ran} runs, {len(bad)} failed" + "".join(f"\n  FAILED {json.dumps(r)}" for r in bad))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
