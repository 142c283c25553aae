"""POD-Attention's public API: plan(batch) once per batch shape, run(plan, batch) per layer.

    p = plan(batch)                      # or plan(spec, device="cuda"), plan(batch, PodConfig(...))
    o_prefill, o_decode = run(p, batch)  # one fused launch (two for the "serial" variant)
    launch = p.runner(batch)             # arguments bound once; launch() -> (o_prefill, o_decode)
    o_prefill, o_decode = pod_attention(batch, kv_splits=4)   # plan + run, config as keywords
    warmup(batch)                        # a serving engine, once before timing: compile every kernel plan may pick

`plan` does all shape-only work, FlashInfer-style: the dispatcher's choice (pod.dispatch), the prefill
and decode work lists (sorted longest first), tile counts, the decode KV splits and their fp32 partial
workspace, the role policy, the grid, and the int32 counter workspace (zeros; the kernel leaves it
zeroed after every launch). `run` only launches: no host sync, no allocation but the outputs.
A Plan is a KernelWork (pod/kernels/contract.py), as the standalone kernels' plans it holds are.

The backends `pod` and `pod_paper` (baselines/ours.py) are thin adapters over this API.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from pod.batch import BatchSpec, HybridBatch
from pod.dispatch import PodConfig, choose_config, max_ctas_per_sm, role_policy
from pod.env import device_num_sms, interpreting, on_hopper, unpack_batch_or_spec
from pod.kernels.contract import KernelWork
from pod.kernels.decode import DecodeWork, plan_decode
from pod.kernels.pod_fused import (COUNTER_WORDS, DECODE_TILE_CONSTEXPRS, PREFILL_TILE_CONSTEXPRS,
                                   pod_fused_kernel)
from pod.kernels.prefill import PrefillConfig, plan_prefill, prefill_launch_args
from pod.prefill import plan_chunked_prefill, resolve_prefill_kernel

if TYPE_CHECKING:
    from pod.kernels.pod_sm90 import PodSm90Config


def _simulate_smid(device: torch.device) -> bool:
    """The interpreter (and a CPU device) has no %smid: CTA i is said to run on SM i % num_sms."""
    return device.type != "cuda" or interpreting()


@dataclass(frozen=True)
class Launch:
    """One launch of the fused kernel: which roles it runs and its grid."""
    has_prefill: bool
    has_decode: bool
    n_prefill_tiles: int
    n_decode_tiles: int
    grid: int


@dataclass
class Plan:
    """The plan of one batch shape (KernelWork): the config, both roles' plans, the fused launches."""
    spec: BatchSpec
    config: PodConfig                  # resolved: the dispatcher's choice when none was given
    device: torch.device
    num_sms: int
    simulate_smid: bool
    prefill: KernelWork                # the prefill plan (PrefillWork; serial on Hopper: Sm90PrefillWork)
    decode: DecodeWork                 # the decode kernel's plan: (request, split) items, partials, merge counters
    counters: torch.Tensor             # int32 [COUNTER_WORDS] scheduling counters (zeros between runs)
    prefill_share: int                 # role policy: prefill_share of every policy_period SM arrival slots
    policy_period: int
    launches: tuple[Launch, ...]       # fused: one; serial, fused_sm90: none (their own launches)
    sm90: KernelWork | None = None     # fused_sm90: the Hopper POD kernel's plan (pod/kernels/pod_sm90.py)

    @property
    def n_prefill_tiles(self) -> int:
        return self.prefill.num_tiles

    @property
    def n_decode_tiles(self) -> int:
        return self.decode.num_tiles

    @property
    def num_tiles(self) -> int:
        """Work tiles of both roles (fused: one CTA each)."""
        return self.n_prefill_tiles + self.n_decode_tiles

    def describe(self) -> dict:
        """The knobs as a flat dict (the harness stores it as the row's backend_config)."""
        d = self.config.as_dict()
        d.update(num_sms=self.num_sms, n_prefill_tiles=self.n_prefill_tiles,
                 n_decode_tiles=self.n_decode_tiles, grid=[l.grid for l in self.launches],
                 prefill_share=self.prefill_share, policy_period=self.policy_period,
                 max_kv_splits=max(self.decode.splits, default=0))
        if self.sm90 is not None:
            d["sm90"] = self.sm90.describe()
        return d

    def runner(self, batch: HybridBatch, o_prefill: torch.Tensor | None = None,
               o_decode: torch.Tensor | None = None):
        """A closure running the plan on `batch` into the outputs (allocated here if None), arguments
        bound once: the least host work per call, what a timed loop should call. The closure returns
        (o_prefill, o_decode)."""
        if o_prefill is None:
            o_prefill = torch.empty_like(batch.q_prefill)
        if o_decode is None:
            o_decode = torch.empty_like(batch.q_decode)
        if self.config.variant == "fused_sm90":
            return self.sm90.runner(batch, o_prefill, o_decode)
        if self.config.variant == "serial":
            launch_prefill = self.prefill.runner(batch, o_prefill)
            launch_decode = self.decode.runner(batch, o_decode)

            def serial():
                launch_prefill()
                launch_decode()
                return o_prefill, o_decode
            return serial
        launches = [fused_launcher(self, batch, o_prefill, o_decode, l) for l in self.launches if l.grid > 0]

        def fused():
            for launch in launches:
                launch()
            return o_prefill, o_decode
        return fused


def dispatch_facts(spec: BatchSpec, device: torch.device) -> dict:
    """What the dispatcher (pod.dispatch.choose_config) is told about where this batch runs: the standalone
    prefill kernel pod.prefill picks, whether the Hopper POD kernel handles the batch, a Hopper GPU or not."""
    from pod.kernels.pod_sm90 import pod_sm90_supports
    return dict(prefill_kernel=resolve_prefill_kernel(spec, None, device)[0],
                sm90_supported=pod_sm90_supports(spec) is None, hopper=on_hopper(device))


def plan(batch_or_spec: HybridBatch | BatchSpec, config: PodConfig | None = None, *,
         device: str | torch.device | None = None, sm90_config: PodSm90Config | None = None,
         **overrides) -> Plan:
    """Shape-only work for a batch. `config=None` lets the dispatcher choose; keyword overrides
    (e.g. kv_splits=4, variant="serial") apply on top of the chosen or given config. `sm90_config`: the
    Hopper POD kernel's planner settings where the dispatcher runs it (default PodSm90Config())."""
    spec, device = unpack_batch_or_spec(batch_or_spec, device)
    base = config or PodConfig()
    num_sms = base.num_sms or device_num_sms(device)
    if config is None:
        config = choose_config(spec, num_sms, base, **dispatch_facts(spec, device))
    if overrides:
        config = replace(config, **overrides)

    sm90 = None
    if config.variant == "fused_sm90":
        # One launch of the Hopper POD kernel (its own planner: SM split, lists, decode splits); the
        # standalone prefill plan stays for describe()'s tile count.
        from pod.kernels.pod_sm90 import PodSm90Config, plan_pod_sm90
        sm90 = plan_pod_sm90(spec, sm90_config or PodSm90Config(), num_sms=num_sms, device=device)
        pre = plan_chunked_prefill(spec, None, device=device)
        dec = sm90.decode
        launches = ()
    elif config.variant == "serial":
        # Two launches of the standalone kernels with their own defaults (= triton_serial): the prefill
        # kernel pod.prefill picks (the Hopper tile on sm_90), the decode kernel's own plan.
        pre = plan_chunked_prefill(spec, None, device=device)
        dec = plan_decode(spec, num_sms, device=device)
        launches = ()
    else:
        stages = config.resolved_num_stages(spec.paged)
        pre = plan_prefill(spec, PrefillConfig(block_m=config.block_m, block_n=config.block_n,
                                               num_warps=config.num_warps, num_stages=stages),
                           device=device)
        dec = plan_decode(spec, num_sms, kv_splits=config.kv_splits, block_n=config.block_n_decode,
                          num_warps=config.num_warps, num_stages=stages, fuse_merge=True,
                          device=device)
        n_p, n_d = pre.num_tiles, dec.num_tiles
        launches = (Launch(n_p > 0, n_d > 0, n_p, n_d, n_p + n_d),)
    share, period = role_policy(spec, config)
    return Plan(spec=spec, config=config, device=device, num_sms=num_sms,
                simulate_smid=_simulate_smid(device), prefill=pre, decode=dec,
                counters=torch.zeros(COUNTER_WORDS, dtype=torch.int32, device=device),
                prefill_share=share, policy_period=period, launches=launches, sm90=sm90)


def _launch_kwargs(config: PodConfig, paged: bool) -> dict:
    kw = dict(num_warps=config.num_warps, num_stages=config.resolved_num_stages(paged))
    if not interpreting():
        maxnreg = config.resolved_maxnreg()
        if maxnreg is not None:
            kw["maxnreg"] = maxnreg
    return kw


def fused_launch_args(p: Plan, batch: HybridBatch, o_prefill: torch.Tensor, o_decode: torch.Tensor,
                      l: Launch, trace: torch.Tensor | None = None) -> tuple[tuple, dict]:
    """(positional args, keyword args) of one pod_fused_kernel launch. Each role's tile arguments are
    the standalone kernel's own (prefill_launch_args, DecodeWork.tile_args), forwarded as one tuple;
    its constexprs as one tuple in the order pod_fused.*_TILE_CONSTEXPRS names."""
    p_const = p.prefill.constexprs(has_lse=False)
    d_const = p.decode.tile_constexprs(p.config.block_n_decode)
    if set(p_const) != set(PREFILL_TILE_CONSTEXPRS) or set(d_const) != set(DECODE_TILE_CONSTEXPRS):
        raise RuntimeError(f"prefill_tile/decode_tile constexprs changed: {sorted(p_const)} / "
                           f"{sorted(d_const)}; update pod_fused's *_TILE_CONSTEXPRS and _run_tile")
    args = (prefill_launch_args(batch, p.prefill, o_prefill, None), p.decode.tile_args(batch, o_decode),
            l.n_prefill_tiles, l.n_decode_tiles, p.counters, p.prefill_share, p.policy_period,
            p.config.ctas_per_sm, p.num_sms, trace if trace is not None else p.counters)
    kwargs = dict(P_CONST=tuple(p_const[k] for k in PREFILL_TILE_CONSTEXPRS),
                  D_CONST=tuple(d_const[k] for k in DECODE_TILE_CONSTEXPRS),
                  HAS_PREFILL=l.has_prefill, HAS_DECODE=l.has_decode,
                  OCCUPANCY_ROLES=p.config.occupancy_roles and l.has_prefill and l.has_decode,
                  SIMULATE_SMID=p.simulate_smid, TRACE=trace is not None,
                  **_launch_kwargs(p.config, p.spec.paged))
    return args, kwargs


def fused_launcher(p: Plan, batch: HybridBatch, o_prefill: torch.Tensor, o_decode: torch.Tensor,
                   l: Launch, trace: torch.Tensor | None = None):
    """Bind the fused kernel's arguments once; returns a closure that launches it (no host sync) and
    returns Triton's compiled-kernel handle. `trace` (tests, debugging): int32 [grid, 5] gets every
    CTA's (smid, slot, wanted role, first claimed role, first tile); roles are 1 = prefill, 0 = decode."""
    args, kwargs = fused_launch_args(p, batch, o_prefill, o_decode, l, trace)
    kernel = pod_fused_kernel[(l.grid,)]
    return lambda: kernel(*args, **kwargs)


def sm90_report(config: PodConfig | None = None, spec: BatchSpec | None = None) -> dict:
    """No GPU needed (but the interpreter must be off): compile the fused kernel for sm_90 exactly as a
    launch on `spec` would specialise it, and report shared memory, registers, spills and wgmma /
    cp.async counts (pod.kernels.common.sm90_compile_report) plus the CTAs per SM they allow."""
    from pod.batch import make_batch
    from pod.kernels.common import sm90_compile_report
    spec = spec or BatchSpec.build(32, 8, 128, prefill=[(300, 700)], decode=[1000, 513], page_size=16)
    config = config or PodConfig()
    batch = make_batch(spec, "cpu", seed=0)
    p = plan(batch, replace(config, num_sms=config.num_sms or 132))
    p.simulate_smid = False                  # compile the real %smid path
    o_p, o_d = batch.empty_outputs()
    args, kwargs = fused_launch_args(p, batch, o_p, o_d, p.launches[0])
    rep = sm90_compile_report(pod_fused_kernel, *args, **kwargs)
    rep.update(variant=p.config.variant, num_warps=p.config.num_warps,
               num_stages=kwargs["num_stages"], maxnreg=kwargs.get("maxnreg"))
    rep["max_ctas_per_sm"] = max_ctas_per_sm(rep["registers"], rep["shared_bytes"], p.config.num_warps)
    return rep


def run(p: Plan, batch: HybridBatch,
        out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the plan on `batch` (same shape as planned). Returns (o_prefill, o_decode)."""
    return p.runner(batch, *(out or ()))()


# Small batches that between them make `plan` launch every kernel it can pick for a head layout: a hybrid
# with a split decode (fused, the merge launch; serial), a tiny chunk beside short decodes (the portable
# prefill tile), decode-only, prefill-only (the Hopper tile on sm_90).
WARMUP_BATCHES = (([(512, 1536)], [8192, 8192]), ([(64, 0)], [256] * 3), ([], [4096] * 4), ([(2048, 0)], []))
SM90_WARMUP_BALANCES = ("static", "dynamic")    # the Hopper POD kernel's schedules, one compiled variant each
# The decode kernel's autotuner keys on its split length's power of two: every bucket a serving run may meet
# (H200, fig12 Llama-3-8B at 1ffa7d7: one 0.51 s step in pod's run, an autotune of a bucket that the
# warm-up had only met fused; gone at 55de78a), tuned on decodes of that length, at most
# WARMUP_DECODE_TOKENS of them.
WARMUP_DECODE_CHUNKS = tuple(2 ** i for i in range(7, 16))          # 128 .. 32768 keys a split
WARMUP_DECODE_TOKENS = 2 ** 19
_WARMED: dict = {}        # (heads, dtype, page size, device) -> whether the decode buckets were tuned too


def warmup(batch_or_spec: HybridBatch | BatchSpec, device: str | torch.device | None = None, *,
           decode_buckets: bool = False) -> list[str]:
    """Compile (and autotune) the kernels `plan` may launch for batches with this one's heads, dtype and KV
    layout, on WARMUP_BATCHES (synthetic, a few MB): a serving engine calls it before its first timed step,
    where a kernel's first launch would be a compile (seconds) or a cache load (tenths of a second) inside
    one iteration. The fused variant of the device (fused_sm90 on Hopper where it handles the layout, once
    a schedule: "fused_sm90:static", "fused_sm90:dynamic"; else fused) and serial are both launched on the
    hybrid. `decode_buckets` (a GPU): then autotune the decode
    kernel for every split-length bucket (WARMUP_DECODE_CHUNKS) on synthetic decodes: no later step pays an
    autotune (0.5 s), but a bucket keeps the config picked there, not on the real batches (the H200 paper
    sweep ran our decode 1.026x slower geomean, up to 1.25x, with every bucket tuned this way; the attention
    harness therefore leaves it off, a serving run turns it on). Returns what was launched, one entry a launch;
    a layout warmed before (with the buckets, if asked for now) launches nothing."""
    from pod.batch import make_batch
    spec, device = unpack_batch_or_spec(batch_or_spec, device)
    key = (spec.heads, spec.dtype, spec.page_size, str(device))
    if key in _WARMED and (_WARMED[key] or not decode_buckets):
        return []
    h = spec.heads
    num_sms = device_num_sms(device)
    launched = []
    for prefill, decode in WARMUP_BATCHES:
        small = BatchSpec.build(h.num_q_heads, h.num_kv_heads, h.head_dim, prefill=prefill, decode=decode,
                                dtype=spec.dtype, page_size=spec.page_size)
        batch = make_batch(small, device, seed=0)
        chosen = plan(batch)
        variants = {chosen.config.variant}
        if prefill and decode:
            facts = dispatch_facts(small, device)
            variants |= {"fused_sm90" if facts["hopper"] and facts["sm90_supported"] else "fused", "serial"}
        for variant in sorted(variants):
            if variant == "fused_sm90":
                # Its kernel compiles once a schedule (the queues are a constexpr: DYNAMIC): both, whichever
                # this batch gets (H200, fig12: the queues' variant compiled 6 s into the timed run before).
                from pod.kernels.pod_sm90 import PodSm90Config
                for balance in SM90_WARMUP_BALANCES:
                    plan(batch, variant=variant, sm90_config=PodSm90Config(balance=balance)).runner(batch)()
                    launched.append(f"{variant}:{balance}")
                continue
            p = chosen if variant == chosen.config.variant else plan(batch, variant=variant)
            p.runner(batch)()
            launched.append(variant)
    if decode_buckets and device.type == "cuda" and not interpreting():
        launched += _warm_decode_buckets(spec, device, num_sms)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    _WARMED[key] = decode_buckets or _WARMED.get(key, False)
    return launched


def _warm_decode_buckets(spec: BatchSpec, device: torch.device, num_sms: int) -> list[str]:
    """Autotune the decode kernel for every WARMUP_DECODE_CHUNKS bucket on decodes of that many keys (two
    tiles an SM where WARMUP_DECODE_TOKENS allows), one split each. Returns "decode<chunk>" a bucket."""
    from pod.batch import make_batch
    h = spec.heads
    done = []
    for chunk in WARMUP_DECODE_CHUNKS:
        n = max(1, min(-(-2 * num_sms // h.num_kv_heads), WARMUP_DECODE_TOKENS // chunk))
        small = BatchSpec.build(h.num_q_heads, h.num_kv_heads, h.head_dim, decode=[chunk] * n, dtype=spec.dtype,
                                page_size=spec.page_size)
        batch = make_batch(small, device, seed=0)
        work = plan_decode(batch, num_sms, kv_chunk_len=chunk, device=device)
        work.runner(batch, torch.empty_like(batch.q_decode))()
        done.append(f"decode{chunk}")
        del batch
    return done


def pod_attention(batch: HybridBatch, config: PodConfig | None = None, **overrides):
    """plan + run in one call (for scripts; an engine keeps the plan and calls run per layer)."""
    return run(plan(batch, config, **overrides), batch)
