"""Diagnostics of the Hopper POD kernel (pod/kernels/pod_sm90.py) on an sm_90 GPU: where its time goes.

    python -m experiments.pod_sm90_diag rates     # each role alone on k CTAs (one a SM): decode GB/s (total,
                                                  # a SM) and prefill TFLOP/s, against the standalone kernels
    python -m experiments.pod_sm90_diag split     # hybrid points: time vs decode CTAs around the planner's
                                                  # choice, each role's span inside the launch (%globaltimer)
    python -m experiments.pod_sm90_diag compare   # the planned launch vs triton_serial and each part alone
    python -m experiments.pod_sm90_diag curve     # every point of a sweep (--sweep, default paper): time vs
                                                  # forced decode CTAs, the planned launch, triton_serial
    python -m experiments.pod_sm90_diag launch    # three untimed launches of the decode role alone (64 x 8192
                                                  # on --ks[0] CTAs): a target for ncu / compute-sanitizer
    python -m experiments.pod_sm90_diag table FILE  # a short table of the JSON lines (no GPU needed)
    python -m experiments.pod_sm90_diag sweep-table CSV  # pod_sm90 over the serial backends, per point

One JSON line a measurement (stdout; `--out FILE` appends them there too), a table last. Every timed
configuration's outputs (NaN-poisoned) are checked against the fp32 reference first: a wrong one is
reported and not timed. Timing is the harness's (`experiments.harness.sweep.time_run`: do_bench medians
with p20/p80). The sweeps (`python -m experiments.attention sweep=paper backend=...`) are where results
come from; this says why they are what they are.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import torch

from pod.batch import BatchSpec, make_batch

L3 = dict(num_q_heads=32, num_kv_heads=8, head_dim=128)      # Llama-3-8B
L2 = dict(num_q_heads=32, num_kv_heads=32, head_dim=128)     # Llama-2-7B (MHA)
YI = dict(num_q_heads=32, num_kv_heads=4, head_dim=128)      # Yi-6B (GQA 8)
CONF = Path(__file__).resolve().parent.parent / "conf"


def _models() -> dict:
    """conf/model/*.yaml by name, as the harness reads them."""
    from omegaconf import OmegaConf
    return {f.stem: OmegaConf.to_container(OmegaConf.load(f)) for f in (CONF / "model").glob("*.yaml")}


def model_heads(name: str) -> dict:
    """The head counts of conf/model/<name>.yaml (rates --model)."""
    from dataclasses import asdict
    from experiments.harness.points import heads_of
    return asdict(heads_of(_models()[name]))

# Hybrid points: the paper sweep's centre and its slices (chunk@context + decodes x context), 16-token pages.
HYBRID = {
    "c1024@12288+64x8192": (L3, [(1024, 12288)], [8192] * 64, 16),
    "c1024@12288+64x8192/contig": (L3, [(1024, 12288)], [8192] * 64, None),
    "c1024@12288+64x8192/p64": (L3, [(1024, 12288)], [8192] * 64, 64),
    "c1024@4096+64x8192/p64": (L3, [(1024, 4096)], [8192] * 64, 64),
    "c1024@4096+64x8192": (L3, [(1024, 4096)], [8192] * 64, 16),
    "c512@4096+64x2048": (L3, [(512, 4096)], [2048] * 64, 16),
    "c2048@16384+32x8192": (L3, [(2048, 16384)], [8192] * 32, 16),
    "c1024@4096+256x2048": (L3, [(1024, 4096)], [2048] * 256, 16),
    "c1024@4096+16x16384": (L3, [(1024, 4096)], [16384] * 16, 16),
    "yi c1024@12288+64x8192": (YI, [(1024, 12288)], [8192] * 64, 16),
    "l2 c1024@4096+16x8192": (L2, [(1024, 4096)], [8192] * 16, 16),
}


def _spec(heads, prefill, decode, page) -> BatchSpec:
    return BatchSpec.build(**heads, prefill=prefill, decode=decode, page_size=page)


class Bench:
    """Check-then-time on fresh random inputs of one spec (one batch a spec, the reference once)."""

    def __init__(self, spec: BatchSpec, seed: int = 0):
        from pod.reference import reference
        from pod.kernels.prefill_sm90 import ensure_scratch_allocator
        from experiments.gpu_checks import poison_stale_slots
        ensure_scratch_allocator()
        self.spec = spec
        self.batch = make_batch(spec, "cuda", seed=seed)
        poison_stale_slots(self.batch)
        self.ref = reference(self.batch)

    def check(self, launch, outs, parts=("prefill", "decode")) -> dict:
        """One launch into NaN-poisoned `outs`: each part in `parts` (none: a diagnostic variant whose output
        is knowingly wrong) against the fp32 reference, {part_err: max relative error}."""
        from pod.reference import max_rel_error
        for o in outs:
            o.fill_(float("nan"))
        launch()
        torch.cuda.synchronize()
        return {f"{part}_err": max_rel_error(o, r) for part, o, r in zip(("prefill", "decode"), outs, self.ref)
                if part in parts and r.shape[0]}

    def measure(self, launch, outs, parts=("prefill", "decode"), tol: float = 2e-2) -> dict:
        """Check the parts in `parts`, then time."""
        return self.timed_if_ok(launch, self.check(launch, outs, parts), tol)

    def timed_if_ok(self, launch, errs: dict, tol: float = 2e-2) -> dict:
        """A row: the errors, ok, and (only when every error is under `tol`) the harness's timing of `launch`."""
        from experiments.harness.timing import TimingConfig, time_run
        row = dict(errs, ok=all(e < tol for e in errs.values()))
        if row["ok"]:
            med, p20, p80, _ = time_run(launch, self.batch.device, TimingConfig(warmup_ms=10, rep_ms=60))
            row.update(median_ms=med, p20_ms=p20, p80_ms=p80)
        return row


def _pod(bench: Bench, cfg, trace: bool = False) -> tuple[dict, object]:
    from pod.kernels.pod_sm90 import plan_pod_sm90
    work = plan_pod_sm90(bench.batch, cfg)
    outs = bench.batch.empty_outputs()
    parts = ("prefill", "decode") if not cfg.decode_skip else ("prefill",)
    row = bench.measure(work.runner(bench.batch, *outs), outs, parts)
    if cfg.decode_skip:
        row["unchecked"] = f"decode_skip={cfg.decode_skip}: decode output knowingly wrong"
    row.update(grid=work.grid, decode_ctas=work.decode_ctas, est_us=work.estimate_us,
               merge=work.needs_merge)
    if trace and row["ok"]:
        tr = torch.zeros(work.grid, 6, dtype=torch.int64, device="cuda")
        work.runner(bench.batch, *outs, trace=tr)()
        torch.cuda.synchronize()
        row.update(role_spans(tr.cpu()))
    return row, work


def role_spans(tr: torch.Tensor) -> dict:
    """From a trace [grid, 6] (smid, start ns, end ns, prefill items, decode pairs, stages): each role's
    span inside the launch (first start to last end of its CTAs, us) and the CTAs' idle tail."""
    t0 = int(tr[:, 1].min())
    out = {}
    for role, col in (("prefill", 3), ("decode", 4)):
        sel = tr[:, col] > 0
        if sel.any():
            ends = (tr[sel, 2] - t0).double() / 1e3
            out[f"{role}_span_us"] = round(float(ends.max()), 1)
            out[f"{role}_end_min_us"] = round(float(ends.min()), 1)
            out[f"{role}_ctas"] = int(sel.sum())
    out["distinct_sms"] = int(torch.unique(tr[:, 0]).numel())
    return out


def rates(out, ks=(8, 16, 24, 32, 48, 64, 96, 132), prefill: bool = True, page: int | None = 16,
          skips=(0,), old_softmax: bool = False, late_k: bool = False, loops=(), heads: dict = L3,
          binds=("smid",)) -> list[dict]:
    """Each role alone inside the kernel on k CTAs (= k SMs): the decode stream's GB/s a SM and the
    prefill tile's TFLOP/s, next to the standalone kernels on the whole GPU. `page`: the KV layout
    (None: contiguous) - the TMA copies a stage needs (one a page and 64 columns) depend on it. `skips`:
    PodSm90Config.decode_skip masks to time besides the real decode (16: consumers only release stages;
    1/2/4/8: one link of the consumers' chain left out) - the differences say where a decode SM's time goes;
    `old_softmax`: also the decode with decode_xchg=False (gl.max / gl.sum down the columns); `late_k`: also
    with decode_early_k=False (a stage's K released with its V); `loops`: also with each of these
    PodSm90Config.decode_loop values ("pipe": the next stage's S^T in flight with this stage's O^T; "lag": O^T
    one stage behind, two barriers a stage). `heads`: the model's head counts (model_heads; a stage of head_dim 64
    carries half the bytes of head_dim 128 for the same consumer work). `binds`: the decode role's SM sets
    (PodSm90Config.bind: "smid" the lowest k ids, "gpc_spread" / "gpc_pack" TPCs over every GPC / whole
    GPCs) - whether the rate an SM depends on where the k SMs sit."""
    from pod.kernels.pod_sm90 import PodSm90Config
    rows = []
    dec = Bench(_spec(heads, [], [8192] * 64, page))
    d = heads["head_dim"]
    for k, bind in ((k, b) for k in ks for b in binds):
        variants = [(x, True, True, "plain") for x in skips] + ([(0, False, True, "plain")] if old_softmax else []) \
            + ([(0, True, False, "plain")] if late_k else []) + [(0, True, True, lp) for lp in loops]
        for skip, xchg, early_k, loop in variants:
            r, _ = _pod(dec, PodSm90Config(num_ctas=k, decode_skip=skip, decode_xchg=xchg, decode_early_k=early_k,
                                           decode_loop=loop, bind=bind), trace=True)
            if r.get("median_ms"):
                gbps = dec.spec.decode_bytes() / r["median_ms"] / 1e6
                r.update(gbps=round(gbps), gbps_per_sm=round(gbps / k, 1))
            what = "decode" if not skip else "K/V stream only" if skip >= 16 else f"decode, skip {skip}"
            what += ("" if xchg else " (gl.max/gl.sum softmax)") + ("" if early_k else " (K released with V)") \
                + ("" if loop == "plain" else f" (decode_loop {loop})")
            rows.append(out(dict(what=f"{what} 64x8192 d{d} on k CTAs, page {page}", k=k, bind=bind, skip=skip,
                                 xchg=xchg, early_k=early_k, loop=loop, **r)))
    for name in ("triton_decode", "fi_serial"):
        rows.append(out(dict(what=f"{name} decode 64x8192 d{d} (whole GPU)", **_backend(dec, name))))
    if not prefill:
        return rows
    pre = Bench(_spec(heads, [(1024, 12288)], [], 16))
    for k in (66, 132):
        r, _ = _pod(pre, PodSm90Config(num_ctas=k), trace=True)
        if r.get("median_ms"):
            r["tflops"] = round(pre.spec.prefill_flops() / r["median_ms"] / 1e9, 1)
        rows.append(out(dict(what=f"prefill 1024@12288 d{d} on k CTAs", k=k, **r)))
    for name in ("triton_prefill", "fi_serial"):
        rows.append(out(dict(what=f"{name} prefill 1024@12288 d{d} (whole GPU)", **_backend(pre, name))))
    return rows


def smmap(out) -> list[dict]:
    """The GPCs as groups of SM ids (pod.kernels.sm_map.probe_gpcs, twice with other seeds: the same map?),
    and the SM sets each binding gives a decode role of 16 / 32 / 48 / 64 CTAs, by GPC."""
    from pod.env import device_num_sms
    from pod.kernels.pod_sm90 import sm_order
    from pod.kernels.sm_map import probe_gpcs
    n = device_num_sms("cuda:0")
    gpcs = probe_gpcs(0)
    again = [probe_gpcs(0, launches=96, seed=s) for s in (1, 2)]
    rows = [out(dict(what="gpcs", num_sms=n, n_gpcs=len(gpcs), sizes=[len(g) for g in gpcs],
                     same_with_other_seeds=all(a == gpcs for a in again), gpcs=[list(g) for g in gpcs]))]
    where = {s: i for i, g in enumerate(gpcs) for s in g}
    for bind in ("smid", "stride", "gpc_spread", "gpc_pack"):
        for k in (16, 32, 48, 64):
            per = [0] * len(gpcs)
            for s in sm_order(bind, n, k, gpcs)[:k]:
                per[where[s]] += 1
            rows.append(out(dict(what="decode SMs by GPC", bind=bind, k=k, per_gpc=per)))
    return rows


def launch(out, k: int = 16, page: int | None = 16, skip: int = 0, point: str | None = None,
           variants=(("default", {}),)) -> list[dict]:
    """Launches to attach a profiler to (`ncu -k regex:pod_sm90 ...`), each checked, untimed. Without
    `point`: the decode role alone (64 x 8192 Llama-3-8B on k CTAs), three times. With a HYBRID `point`: its
    planned fused launch under each config variant (parse_variants), then each role alone on the SMs the
    default plan gives it (the prefill batch on grid - decode_ctas CTAs, the decode batch on decode_ctas),
    three launches each, in that order: what the hybrid's HBM and L2 traffic is made of."""
    from pod.kernels.pod_sm90 import PodSm90Config, plan_pod_sm90
    if point is None:
        dec = Bench(_spec(L3, [], [8192] * 64, page))
        runs = [(f"launch: decode 64x8192 on {k} CTAs, page {page}, skip {skip}", dec,
                 PodSm90Config(num_ctas=k, decode_skip=skip), () if skip else ("decode",))]
    else:
        heads, prefill, decode, pg = HYBRID[point]
        hyb = Bench(_spec(heads, prefill, decode, pg))
        runs = [(f"launch: {point} {label}", hyb, replace(PodSm90Config(), **kv), ("prefill", "decode"))
                for label, kv in variants]
        planned = plan_pod_sm90(hyb.batch, PodSm90Config())
        kd = planned.decode_ctas
        if planned.grid > kd:                   # (num_ctas=0 would mean the whole GPU)
            runs.append((f"launch: {point} prefill alone on {planned.grid - kd} CTAs",
                         Bench(_spec(heads, prefill, [], pg)), PodSm90Config(num_ctas=planned.grid - kd), ("prefill",)))
        if kd > 0:
            runs.append((f"launch: {point} decode alone on {kd} CTAs",
                         Bench(_spec(heads, [], decode, pg)), PodSm90Config(num_ctas=kd), ("decode",)))
    rows = []
    for what, bench, cfg, parts in runs:
        work = plan_pod_sm90(bench.batch, cfg)
        outs = bench.batch.empty_outputs()
        run = work.runner(bench.batch, *outs)
        errs = bench.check(run, outs, parts)
        for _ in range(2):
            run()
        torch.cuda.synchronize()
        rows.append(out(dict(what=what, grid=work.grid, decode_ctas=work.decode_ctas, **errs,
                             ok=all(e < 2e-2 for e in errs.values()))))
    return rows


@functools.lru_cache(maxsize=1)
def _l2_flush_buffer() -> torch.Tensor:
    """256 MB to write before a launch so it starts with a cold L2, as do_bench's timings do (one a process)."""
    return torch.empty(256 * 2 ** 20, dtype=torch.int8, device="cuda")


def items(out, points, variants=(("default", {}),), launches: int = 5, cap: int = 48) -> list[dict]:
    """Where a launch's time goes, item by item: for each HYBRID point and config variant, `launches` traced
    launches (an L2 flush before each, as the timings do), each checked against the reference first. One row
    a launch: its span (first CTA start to last end, us) and `items`, a list of [cta, smid, role (1 prefill,
    0 decode), item, start us, end us] for each CTA's first `cap` items (the consumer's view: from taking
    the item to its last store); then a row of the untraced launch's times (_launch_times)."""
    from pod.kernels.pod_sm90 import PodSm90Config, plan_pod_sm90
    flush = _l2_flush_buffer()
    rows = []
    for point in points:
        heads, prefill, decode, pg = HYBRID[point]
        bench = Bench(_spec(heads, prefill, decode, pg))
        for label, kv in variants:
            cfg = replace(PodSm90Config(), **kv)
            work = plan_pod_sm90(bench.batch, cfg)
            outs = bench.batch.empty_outputs()
            tr = torch.zeros(work.grid, 6 + 3 * cap, dtype=torch.int64, device="cuda")
            run = work.runner(bench.batch, *outs, trace=tr)
            errs = bench.check(run, outs)
            ok = all(e < 2e-2 for e in errs.values())
            for n in range(launches if ok else 0):
                flush.zero_()
                run()
                torch.cuda.synchronize()
                t = tr.cpu()
                t0 = int(t[:, 1].min())
                recs = []
                for c in range(work.grid):
                    for m in range(min(int(t[c, 3] + t[c, 4]), cap)):
                        item, s0, s1 = (int(x) for x in t[c, 6 + 3 * m:9 + 3 * m])
                        recs.append([c, int(t[c, 0]), int(item >= 0), item, round((s0 - t0) / 1e3, 2),
                                     round((s1 - t0) / 1e3, 2)])
                rows.append(out(dict(what="items", point=point, variant=label, launch=n, grid=work.grid,
                                     decode_ctas=work.decode_ctas, span_us=round((int(t[:, 2].max()) - t0) / 1e3, 1),
                                     ok=ok, **errs, items=recs)))
            if ok:
                rows.append(out(dict(what="items_timing", point=point, variant=label, **_launch_times(bench, work))))
            else:
                rows.append(out(dict(what="items", point=point, variant=label, ok=False, **errs)))
        del bench
        torch.cuda.empty_cache()
    return rows


def _launch_times(bench: Bench, work, each: int = 40) -> dict:
    """The untraced launch timed three ways: eager (the harness's default: do_bench, L2 flushed), replayed from
    a CUDA graph (no host cost), and the host's own cost of one eager call (enqueue only, no sync): where an
    eager time exceeds the kernel's span, which of the two it is. `each_ms`: `each` launches one by one in
    launch order, each after an L2 flush and timed by its own CUDA events, so a spread that the medians hide
    (a bimodal schedule, a drift) shows."""
    import time

    from experiments.harness.timing import TimingConfig, time_run
    outs = bench.batch.empty_outputs()
    run = work.runner(bench.batch, *outs)
    eager = time_run(run, bench.batch.device, TimingConfig(warmup_ms=10, rep_ms=60))
    graph = time_run(run, bench.batch.device, TimingConfig(warmup_ms=10, rep_ms=60, cuda_graph=True))
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(20):
        run()
    host_us = (time.perf_counter() - t) / 20 * 1e6
    flush = _l2_flush_buffer()
    marks = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(each)]
    for a, b in marks:
        flush.zero_()
        a.record()
        run()
        b.record()
    torch.cuda.synchronize()
    return dict(eager_ms=eager[0], eager_p20=eager[1], eager_p80=eager[2], graph_ms=graph[0], graph_p20=graph[1],
                graph_p80=graph[2], host_us=round(host_us, 1),
                each_ms=[round(a.elapsed_time(b), 4) for a, b in marks])


def _backend(bench: Bench, name: str) -> dict:
    from baselines.registry import get_backend
    b = get_backend(name)
    why = b.unavailable_reason(bench.batch)
    if why:
        return dict(ok=False, skipped=why)
    try:
        run = b.setup(bench.batch)
    except Exception as e:  # noqa: BLE001 - a diagnostic reports, it does not stop
        return dict(ok=False, skipped=f"{type(e).__name__}: {e}"[:200])
    from experiments.harness.running import check_outputs
    out = run()
    torch.cuda.synchronize()
    errs = {f"{part}_err": e for part, e in zip(("prefill", "decode"), check_outputs(out, bench.ref, bench.batch, b))
            if not math.isnan(e)}                # NaN: a part the backend does not compute or the batch lacks
    return bench.timed_if_ok(run, errs)


def split(out, points=None, base=None) -> list[dict]:
    """Hybrid points: the planned launch (traced: each role's span), then decode_ctas around the plan's."""
    from pod.kernels.pod_sm90 import PodSm90Config
    rows = []
    for name in points or HYBRID:
        bench = Bench(_spec(*HYBRID[name]))
        base = base or PodSm90Config()
        r, work = _pod(bench, base, trace=True)
        rows.append(out(dict(what="planned", point=name, **r)))
        k0 = work.decode_ctas
        for f in (0.6, 0.8, 0.9, 1.1, 1.25, 1.5):
            k = max(1, min(work.grid - 1, round(k0 * f)))
            if k == k0:
                continue
            r, _ = _pod(bench, replace(base, decode_ctas=k), trace=True)
            rows.append(out(dict(what="decode_ctas", point=name, **r)))
        del bench
        torch.cuda.empty_cache()
    return rows


CURVE_KS = (16, 24, 32, 40, 48, 56, 64, 72, 80, 96, 112, 124)


def sweep_points(sweep: str = "paper", sample: str | None = None):
    """The points of conf/sweep/<sweep>.yaml (models from conf/model/), as the harness expands them;
    `sample` "SEED:PER_STRATUM" draws another sample of a generated grid (paper_grid: fresh points)."""
    from omegaconf import OmegaConf
    from experiments.harness.points import expand_points
    conf = OmegaConf.to_container(OmegaConf.load(CONF / "sweep" / f"{sweep}.yaml"))
    if sample:
        if "sample" not in conf.get("generate", {}):
            raise ValueError(f"--sample: sweep {sweep!r} draws no sample")
        seed, per = (int(x) for x in sample.split(":"))
        conf["generate"]["sample"] = {"seed": seed, "per_stratum": per}
    return expand_points(conf, _models())


def parse_variants(text: str | None) -> list[tuple[str, dict]]:
    """'overlap=False;stages=2,overlap=True' -> [(label, PodSm90Config overrides), ...], each value parsed as
    the field's type; None or '' -> one variant without overrides."""
    from dataclasses import fields
    from pod.kernels.pod_sm90 import PodSm90Config
    types = {f.name: f.type for f in fields(PodSm90Config)}
    out = []
    for label in (text or "").split(";"):
        label = label.strip()
        kv = {}
        for item in filter(None, (x.strip() for x in label.split(","))):
            key, _, val = item.partition("=")
            if key not in types or not val:
                raise ValueError(f"--variants: {item!r} is not FIELD=VALUE of PodSm90Config ({sorted(types)})")
            t = str(types[key])
            kv[key] = (val.lower() in ("1", "true", "yes")) if t == "bool" else \
                None if val.lower() == "none" else int(val) if "int" in t else float(val) if "float" in t else val
        out.append((label or "default", kv))
    return out


def same_plans(spec, configs, num_sms: int) -> bool:
    """Whether every config plans the launch the first plans (decode CTAs, items, lists, decode splits):
    curve --changed skips such points (on the CPU, without the GPU's SM map: binds are not compared)."""
    from pod.kernels.pod_sm90 import plan_pod_sm90
    def key(cfg):
        w = plan_pod_sm90(spec, replace(cfg, bind="block"), num_sms=num_sms, device="cpu")
        return (w.decode_ctas, w.cta_ptr.tolist(), w.cta_items.tolist(), w.dec_items.tolist(),
                w.queue.tolist() if w.queue is not None else None)
    first = key(configs[0])
    return all(key(c) == first for c in configs[1:])


def curve(out, sweep: str = "paper", ks=CURVE_KS, shard: tuple[int, int] = (0, 1), base=None,
          binds=("block",), variants=(("default", {}),), changed: bool = False, sample: str | None = None,
          min_context: int = 0) -> list[dict]:
    """Per point of a sweep: triton_serial, then for each SM binding in `binds` (PodSm90Config.bind) and
    each config variant (`variants`: (label, overrides), parse_variants) the planned launch and the launch
    with decode_ctas forced to each k in `ks` (the planner's estimate recorded beside each): the measured
    time-vs-split curve a planner rule is fitted to (offline, from these rows), what binding the CTA lists
    to SMs changes, and A/B of a kernel option on the same inputs in the same process. `changed`: only the
    points where some variant plans another launch than the first (same_plans); `min_context`: only points
    with a prefill chunk of at least this much context."""
    from pod.kernels.pod_sm90 import PodSm90Config
    from experiments.harness.points import shard as shard_points
    from pod.env import device_num_sms
    rows = []
    base = base or PodSm90Config()
    configs = [replace(base, **kv) for _, kv in variants]
    num_sms = device_num_sms("cuda") if torch.cuda.is_available() else 132
    for p in shard_points(sweep_points(sweep, sample), *shard):
        s = p.spec
        if max((c.context_len for c in s.prefill_chunks), default=0) < min_context or \
                changed and same_plans(s, configs, num_sms):
            continue
        c = s.prefill_chunks[0] if s.prefill_chunks else None
        tag = dict(point_id=p.point_id, model=p.model, chunk=c.chunk_len if c else 0, ctx=c.context_len if c else 0,
                   num_decode=s.num_decode, decode_len=max(s.decode_context_lens or [0]),
                   prefill_flops=s.prefill_flops(), decode_bytes=s.decode_bytes())
        bench = Bench(s)
        rows.append(out(dict(what="triton_serial", **tag, **_backend(bench, "triton_serial"))))
        for bind in binds:
            for label, kv in variants:
                cfg = replace(base, bind=bind, **kv)
                r, work = _pod(bench, cfg, trace=True)
                rows.append(out(dict(what="planned", bind=bind, variant=label, **tag, **r)))
                if s.num_prefill and s.num_decode:
                    for k in ks:
                        if k < work.grid and k != work.decode_ctas:
                            r, _ = _pod(bench, replace(cfg, decode_ctas=k), trace=True)
                            rows.append(out(dict(what="decode_ctas", bind=bind, variant=label, **tag, **r)))
        del bench
        torch.cuda.empty_cache()
    return rows


def compare(out, points=None, base=None) -> list[dict]:
    """The planned launch against triton_serial, fi_serial and each of our parts alone (same batch)."""
    from pod.kernels.pod_sm90 import PodSm90Config
    rows = []
    for name in points or HYBRID:
        bench = Bench(_spec(*HYBRID[name]))
        r, _ = _pod(bench, base or PodSm90Config())
        row = dict(what="compare", point=name, pod_sm90_ms=r.get("median_ms"), pod_sm90_ok=r["ok"],
                   pod_sm90_err=max(r.get("prefill_err", 0), r.get("decode_err", 0)))
        for b in ("triton_serial", "triton_prefill", "triton_decode", "fi_serial", "pod"):
            br = _backend(bench, b)
            row[f"{b}_ms"] = br.get("median_ms")
        if row["pod_sm90_ms"] and row["triton_serial_ms"]:
            row["speedup_vs_triton_serial"] = round(row["triton_serial_ms"] / row["pod_sm90_ms"], 3)
        if row["pod_sm90_ms"] and row["fi_serial_ms"]:
            row["speedup_vs_fi_serial"] = round(row["fi_serial_ms"] / row["pod_sm90_ms"], 3)
        if row["triton_prefill_ms"] and row["triton_decode_ms"]:
            row["overlap_bound_ms"] = max(row["triton_prefill_ms"], row["triton_decode_ms"])
        rows.append(out(row))
        del bench
        torch.cuda.empty_cache()
    return rows


def table(path: str) -> None:
    """A short table of a JSON-lines file this module wrote (no GPU needed)."""
    keys = ("what", "point", "k", "grid", "decode_ctas", "ok", "median_ms", "gbps", "gbps_per_sm", "tflops",
            "prefill_span_us", "decode_span_us", "prefill_err", "decode_err", "pod_sm90_ms", "triton_serial_ms",
            "triton_prefill_ms", "triton_decode_ms", "fi_serial_ms", "pod_ms", "speedup_vs_triton_serial",
            "speedup_vs_fi_serial", "skipped")
    for line in open(path):
        r = json.loads(line)
        cells = []
        for k in keys:
            if k in r and r[k] is not None:
                v = r[k]
                cells.append(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}")
        print(" ".join(cells)[:400])


def variant_table(path: str) -> None:
    """A/B of a curve's config variants (curve --variants; no GPU needed): per variant, over the points where
    it and the first variant both ran checked, the first's median time over its (geomean, min, max; > 1: the
    variant is faster), and each over triton_serial; then per model. Role spans: the mean of how far apart
    the two roles end inside the launch (|prefill - decode| / the later one)."""
    import pandas as pd

    from analysis.speedup import geomean as gm
    rows = [json.loads(line) for line in open(path)]
    df = pd.DataFrame([r for r in rows if r.get("what") == "planned" and r.get("ok") and "median_ms" in r])
    ser = pd.DataFrame([r for r in rows if r.get("what") == "triton_serial" and "median_ms" in r])
    if df.empty:
        print(f"no checked planned rows in {path}")
        return
    df["variant"] = df["variant"].fillna("default")
    t = df.pivot_table(index=["point_id", "model"], columns="variant", values="median_ms", aggfunc="first")
    serial = ser.groupby("point_id")["median_ms"].first() if len(ser) else None
    names = list(dict.fromkeys(df["variant"]))
    base = names[0]

    for v in names:
        r = (t[base] / t[v]).dropna()
        line = f"{v or 'default'}: n={len(r)} vs {base or 'default'} geomean={gm(r):.3f} min={r.min():.3f} max={r.max():.3f}"
        if serial is not None:
            s_ = serial.reindex(t.index.get_level_values(0)).to_numpy() / t[v].to_numpy()
            line += f"; vs triton_serial {gm(s_):.3f}"
        sub = df[df.variant == v]
        if {"prefill_span_us", "decode_span_us"} <= set(sub):
            both = sub.dropna(subset=["prefill_span_us", "decode_span_us"])
            if len(both):
                gap = (both.prefill_span_us - both.decode_span_us).abs() / both[["prefill_span_us", "decode_span_us"]].max(axis=1)
                line += f"; role end gap {gap.mean():.3f}"
        print(line)
    for v in names[1:]:
        r = (t[base] / t[v]).dropna()
        by = r.groupby(level="model").apply(gm)
        print(f"{v} by model: " + ", ".join(f"{m} {x:.3f}" for m, x in by.items()))


def sweep_table(path: str, ours: str = "pod_sm90", against=("triton_serial", "fi_serial")) -> None:
    """Per point of a sweep's result file: our backend's time over each serial one, and the geomean."""
    import pandas as pd
    df = pd.read_csv(path)
    ok = df[df.status == "ok"]
    t = ok.pivot_table(index="point_id", columns="backend", values="median_ms", aggfunc="first")
    if ours not in t:
        print(f"no ok {ours} rows in {path}; statuses: {df.groupby(['backend', 'status']).size().to_dict()}")
        return
    for b in against:
        if b in t:
            r = (t[b] / t[ours]).dropna()
            if len(r):
                print(f"{ours} vs {b}: n={len(r)} geomean={float(r.prod() ** (1 / len(r))):.3f} "
                      f"min={r.min():.3f} max={r.max():.3f}")
    cols = [c for c in (ours, "triton_serial", "triton_prefill", "triton_decode", "fi_serial") if c in t]
    print(t[cols].round(4).to_string(max_colwidth=60))
    bad = df[df.status != "ok"]
    if len(bad):
        print(bad[["point_id", "backend", "status", "reason"]].to_string(max_colwidth=80))


def plan_time(sweep: str = "paper", variants=(("default", {}),), repeat: int = 5, num_sms: int = 132) -> list[dict]:
    """Host time of plan_pod_sm90 (the best of `repeat`, ms) per hybrid point of a sweep and variant, on this
    machine's CPU, and what each plan is (schedule, tails): the search's price a serving step pays. Prints
    the mean per schedule and variant; no GPU needed (plans for `num_sms` SMs on the CPU)."""
    import time
    import pandas as pd
    from pod.kernels.pod_sm90 import PodSm90Config, plan_pod_sm90
    rows = []
    for p in sweep_points(sweep):
        spec = p.spec
        if not (spec.num_decode and spec.prefill_chunks):
            continue
        for label, kv in variants:
            cfg = replace(PodSm90Config(), **kv)
            best = math.inf
            for _ in range(repeat):
                t = time.perf_counter()
                w = plan_pod_sm90(spec, cfg, num_sms=num_sms, device="cpu")
                best = min(best, time.perf_counter() - t)
            rows.append(dict(point=p.point_id, variant=label, plan_ms=best * 1e3, tails=w.tails,
                             schedule=w.describe()["schedule"]))
    df = pd.DataFrame(rows)
    if len(df):
        print(df.groupby(["variant", "schedule"]).agg(points=("plan_ms", "size"), plan_ms=("plan_ms", "mean"),
                                                      max_ms=("plan_ms", "max"), tails=("tails", lambda t: int((t > 0).sum())))
              .round(3).to_string())
    return rows


def parse_args(argv: list[str]) -> argparse.Namespace:
    from experiments.cli import command
    ap = argparse.ArgumentParser(prog=command("experiments.pod_sm90_diag"), description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=("rates", "split", "compare", "curve", "launch", "items", "smmap", "table",
                                     "sweep-table", "variant-table", "plan-time"))
    ap.add_argument("file", nargs="?", help="table, variant-table: a JSON-lines file this module wrote (variant-table: "
                                            "of curve --variants); sweep-table: a sweep CSV")
    ap.add_argument("--out", help="append the JSON lines here too")
    ap.add_argument("--points", help="comma-separated HYBRID names (split/compare/items; launch: the first)")
    ap.add_argument("--ks", help="rates: comma-separated CTA counts (default 8..132); launch: the first; "
                                 "curve: the forced decode CTA counts ('none': the planned launch only)")
    ap.add_argument("--sample", help="curve: SEED:PER_STRATUM, another sample of a generated sweep (paper_grid)")
    ap.add_argument("--changed", action="store_true",
                    help="curve: only the points where some variant plans another launch than the first")
    ap.add_argument("--min-context", type=int, default=0,
                    help="curve: only the points with a prefill chunk of at least this much context")
    ap.add_argument("--sweep", default="paper", help="curve, plan-time: the sweep config (conf/sweep/) whose points it runs")
    ap.add_argument("--binds", help="curve (default block) and rates (default smid): comma-separated "
                                    "PodSm90Config.bind values to time")
    ap.add_argument("--variants", help="curve, items, launch --points, plan-time: ';'-separated PodSm90Config overrides to time side by side, "
                                       "each 'FIELD=VALUE,...' (e.g. 'overlap=True;overlap=False')")
    ap.add_argument("--launches", type=int, default=5, help="items: traced launches a point and variant")
    ap.add_argument("--shard", default="0/1", help="curve: I/N, the points i with i %% N == I")
    ap.add_argument("--decode-only", action="store_true", help="rates: leave out the prefill role")
    ap.add_argument("--model", choices=sorted(f.stem for f in (CONF / "model").glob("*.yaml")),
                    help="rates: the model whose head counts it runs (conf/model/; default llama3_8b)")
    ap.add_argument("--page", default="16", help="rates: page size of the KV cache, or 'none' (contiguous)")
    ap.add_argument("--decode-gbps", type=float,
                    help="split/compare: the planner's decode GB/s a SM at every head_dim (PodSm90Config.decode_gbps_per_sm "
                         "and decode_gbps_per_sm_d64)")
    ap.add_argument("--hbm-gbps", type=float,
                    help="split/compare: what all decode CTAs together can draw (PodSm90Config.hbm_gbps)")
    ap.add_argument("--steal", choices=("auto", "always", "never"),
                    help="split/compare: PodSm90Config.steal (decode CTAs take prefill tiles after their pairs)")
    ap.add_argument("--old-softmax", action="store_true",
                    help="rates: also the decode with decode_xchg=False (gl.max / gl.sum down the columns)")
    ap.add_argument("--late-k", action="store_true",
                    help="rates: also the decode with decode_early_k=False (a stage's K released with its V)")
    ap.add_argument("--loops", default="",
                    help="rates: also the decode with each of these comma-separated PodSm90Config.decode_loop values "
                         "(pipe, lag, lazy)")
    ap.add_argument("--skip", default="0",
                    help="rates: comma-separated decode_skip masks to time (0: the real decode; 16: consumers only "
                         "release stages; 1/2/4/8: one link of the consumers' chain left out)")
    a = ap.parse_args(argv)
    if a.what in ("table", "sweep-table", "variant-table") and not a.file:
        ap.error(f"{a.what} needs a FILE")
    try:
        parse_variants(a.variants)
    except ValueError as e:
        ap.error(str(e))
    from pod.kernels.pod_sm90 import BINDS
    bad = sorted(set((a.binds or "smid").split(",")) - set(BINDS))
    if bad:
        ap.error(f"--binds: unknown {bad}; known: {list(BINDS)}")
    if a.model and a.what != "rates":
        ap.error("--model: rates only (split/compare/curve take their points' own models)")
    if a.points:
        unknown = sorted(set(a.points.split(",")) - set(HYBRID))
        if unknown:
            ap.error(f"--points: unknown {unknown}; known: {sorted(HYBRID)}")
    return a


def main(argv: list[str]) -> int:
    a = parse_args(argv)
    if a.what == "table":
        table(a.file)
        return 0
    if a.what == "sweep-table":
        sweep_table(a.file)
        return 0
    if a.what == "variant-table":
        variant_table(a.file)
        return 0
    if a.what == "plan-time":
        plan_time(a.sweep, parse_variants(a.variants))
        return 0
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9:
        print("pod_sm90_diag: needs an sm_90 GPU (H100/H200)", file=sys.stderr)
        return 2

    def out(row):
        line = json.dumps(row, default=lambda x: round(x, 5) if isinstance(x, float) else str(x))
        print(line, flush=True)
        if a.out:
            with open(a.out, "a") as f:
                f.write(line + "\n")
        return row

    points = a.points.split(",") if a.points else None
    ks = () if a.ks == "none" else tuple(int(k) for k in a.ks.split(",")) if a.ks else (8, 16, 24, 32, 48, 64, 96, 132)
    page = None if a.page == "none" else int(a.page)
    from pod.kernels.pod_sm90 import PodSm90Config
    model = dict(decode_gbps_per_sm=a.decode_gbps, decode_gbps_per_sm_d64=a.decode_gbps, hbm_gbps=a.hbm_gbps,
                 steal=a.steal)
    model = {k: v for k, v in model.items() if v}
    base = PodSm90Config(**model) if model else None
    fn = dict(rates=lambda o: rates(o, ks, not a.decode_only, page, tuple(int(x) for x in a.skip.split(",")),
                                    a.old_softmax, a.late_k, tuple(filter(None, a.loops.split(","))), model_heads(a.model or "llama3_8b"),
                                    tuple((a.binds or "smid").split(","))),
              split=lambda o: split(o, points, base), compare=lambda o: compare(o, points, base),
              curve=lambda o: curve(o, a.sweep, ks if a.ks else CURVE_KS, tuple(int(x) for x in a.shard.split("/")), base,
                                    tuple((a.binds or "block").split(",")), parse_variants(a.variants), a.changed, a.sample, a.min_context),
              smmap=smmap, items=lambda o: items(o, points or ["c1024@12288+64x8192"], parse_variants(a.variants), a.launches),
              launch=lambda o: launch(o, ks[0] if ks and a.ks else 16, page, int(a.skip.split(",")[0]),
                                      points[0] if points else None, parse_variants(a.variants)))[a.what]
    rows = fn(out)
    bad = [r for r in rows if r.get("ok") is False and "skipped" not in r]
    print(f"{a.what}: {len(rows)} rows, {len(bad)} failed checks")
    return 1 if bad else 0


if __name__ == "__main__":
    from experiments.cli import run
    sys.exit(run("pod_sm90_diag", lambda: main(sys.argv[1:])))
