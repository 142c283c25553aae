"""POD-Attention's public API: plan(batch) once per batch shape, run(plan, batch) per layer.

    p = plan(batch)                      # or plan(spec, device="cuda"), plan(batch, PodConfig(...))
    o_prefill, o_decode = run(p, batch)  # one fused launch (two for the "serial" variant)
    o_prefill, o_decode = pod_attention(batch, kv_splits=4)   # plan + run, config as keywords

`plan` does all shape-only work, FlashInfer-style: the dispatcher's choice (pod.dispatch), the prefill
and decode work lists (sorted longest first), tile counts, the decode KV splits and their fp32 partial
workspace, the role policy, the grid, and the int32 counter workspace (zeros; the kernel leaves it
zeroed after every launch). `run` only launches: no host sync, no allocation but the outputs.

Registers the backends `pod` (dispatcher), `pod_paper` (paper's fixed scheme: one tile per CTA, 2 CTAs
per SM, 1:1 alternating roles) and `pod_persistent` (persistent work-stealing workers).
"""
from __future__ import annotations

import os
import sys
import types
from dataclasses import dataclass, replace

import torch

from pod.batch import BatchSpec, HybridBatch
from pod.dispatch import PodConfig, choose_config, decode_kv_splits, role_policy
from pod.kernels.decode import DecodeWork, decode_runner, plan_decode
from pod.kernels.pod_fused import (COUNTER_WORDS, DECODE_TILE_CONSTEXPRS, PREFILL_TILE_CONSTEXPRS,
                                   pod_fused_kernel)
from pod.kernels.prefill import (PrefillConfig, PrefillWork, plan_prefill, prefill_launch_args,
                                 prefill_runner)
from pod.registry import AttentionOutput, cuda_available, register_backend

SIMULATED_NUM_SMS = 4   # SMs the interpreter pretends to have (CTA i "runs" on SM i % 4)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _simulate_smid(device: torch.device) -> bool:
    return (device.type != "cuda" or _interpreting()
            or os.environ.get("POD_SIMULATE_SMID", "0") not in ("", "0"))


@dataclass(frozen=True)
class Launch:
    """One launch of the fused kernel: which roles it runs and its grid."""
    has_prefill: bool
    has_decode: bool
    n_prefill_tiles: int
    n_decode_tiles: int
    grid: int
    persistent: bool


@dataclass
class Plan:
    spec: BatchSpec
    config: PodConfig                  # resolved: the dispatcher's choice when none was given
    device: torch.device
    num_sms: int
    simulate_smid: bool
    prefill: PrefillWork               # the prefill kernel's plan: work units (chunk, q_block), heaviest first
    decode: DecodeWork                 # the decode kernel's plan: (request, split) items, partials, merge counters
    counters: torch.Tensor             # int32 [COUNTER_WORDS] scheduling counters (zeros between runs)
    prefill_share: int                 # role policy: prefill_share of every policy_period SM arrival slots
    policy_period: int
    launches: tuple[Launch, ...]       # fused/persistent: one; serial: none (standalone kernels)

    @property
    def n_prefill_tiles(self) -> int:
        return self.prefill.num_tiles

    @property
    def n_decode_tiles(self) -> int:
        return self.decode.num_tiles

    def describe(self) -> dict:
        """The knobs as a flat dict (the harness stores it as the row's backend_config)."""
        d = self.config.as_dict()
        d.update(num_sms=self.num_sms, n_prefill_tiles=self.n_prefill_tiles,
                 n_decode_tiles=self.n_decode_tiles, grid=[l.grid for l in self.launches],
                 prefill_share=self.prefill_share, policy_period=self.policy_period,
                 max_kv_splits=max(self.decode.splits, default=0))
        return d


def _device_num_sms(device: torch.device) -> int:
    if device.type == "cuda" and not _interpreting():
        return torch.cuda.get_device_properties(device).multi_processor_count
    return SIMULATED_NUM_SMS


def plan(batch_or_spec: HybridBatch | BatchSpec, config: PodConfig | None = None, *,
         device: str | torch.device | None = None, **overrides) -> Plan:
    """Shape-only work for a batch. `config=None` lets the dispatcher choose; keyword overrides
    (e.g. kv_splits=4, variant="persistent") apply on top of the chosen or given config."""
    if isinstance(batch_or_spec, HybridBatch):
        spec, device = batch_or_spec.spec, device or batch_or_spec.device
    else:
        spec = batch_or_spec
        device = device or ("cuda" if torch.cuda.is_available() and not _interpreting() else "cpu")
    device = torch.device(device)
    base = config or PodConfig()
    num_sms = base.num_sms or _device_num_sms(device)
    if config is None:
        config = choose_config(spec, num_sms, base)
    if overrides:
        config = replace(config, **overrides)

    if config.variant == "serial":
        # Two launches of the standalone kernels with their own tuned defaults (= triton_serial).
        pre = plan_prefill(spec, None, device=device)
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
        persistent = config.variant == "persistent"
        grid = min(config.ctas_per_sm * num_sms, n_p + n_d) if persistent else n_p + n_d
        launches = (Launch(n_p > 0, n_d > 0, n_p, n_d, grid, persistent),)
    share, period = role_policy(spec, config)
    return Plan(spec=spec, config=config, device=device, num_sms=num_sms,
                simulate_smid=_simulate_smid(device), prefill=pre, decode=dec,
                counters=torch.zeros(COUNTER_WORDS, dtype=torch.int32, device=device),
                prefill_share=share, policy_period=period, launches=launches)


def _launch_kwargs(config: PodConfig, paged: bool) -> dict:
    kw = dict(num_warps=config.num_warps, num_stages=config.resolved_num_stages(paged))
    if not _interpreting():
        maxnreg = config.resolved_maxnreg()
        if maxnreg is not None:
            kw["maxnreg"] = maxnreg
    return kw


def fused_launch_args(p: Plan, batch: HybridBatch, o_prefill: torch.Tensor, o_decode: torch.Tensor,
                      l: Launch, trace: torch.Tensor | None = None) -> tuple[tuple, dict]:
    """(positional args, keyword args) of one pod_fused_kernel launch. The tile helpers' arguments are
    the standalone kernels' own (prefill_launch_args, DecodeWork.tile_args), forwarded unchanged."""
    p_args = prefill_launch_args(batch, p.prefill, o_prefill, None)
    d_args = p.decode.tile_args(batch, o_decode)
    p_const = p.prefill.constexprs(has_lse=False)
    d_const = p.decode.tile_constexprs(p.config.block_n_decode)
    if set(p_const) != set(PREFILL_TILE_CONSTEXPRS) or set(d_const) != set(DECODE_TILE_CONSTEXPRS):
        raise RuntimeError(f"prefill_tile/decode_tile constexprs changed: {sorted(p_const)} / "
                           f"{sorted(d_const)}; update pod_fused_kernel's P_*/D_* parameters")
    args = (*p_args, *d_args, l.n_prefill_tiles, l.n_decode_tiles, p.counters, p.prefill_share,
            p.policy_period, p.config.ctas_per_sm, p.num_sms, trace if trace is not None else p.counters)
    kwargs = dict(**{f"P_{k}": v for k, v in p_const.items()}, **{f"D_{k}": v for k, v in d_const.items()},
                  HAS_PREFILL=l.has_prefill, HAS_DECODE=l.has_decode, PERSISTENT=l.persistent,
                  OCCUPANCY_ROLES=p.config.occupancy_roles and not l.persistent
                  and l.has_prefill and l.has_decode,
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
    from pod.gpu_checks import max_ctas_per_sm
    rep["max_ctas_per_sm"] = max_ctas_per_sm(rep["registers"], rep["shared_bytes"], p.config.num_warps)
    return rep


def runner(p: Plan, batch: HybridBatch, out: tuple[torch.Tensor, torch.Tensor] | None = None):
    """A closure running the plan on `batch` into `out` (allocated here if None), arguments bound once:
    the least host work per call, what a timed loop should call. The closure returns (o_prefill, o_decode)."""
    o_prefill, o_decode = out if out is not None else (torch.empty_like(batch.q_prefill),
                                                       torch.empty_like(batch.q_decode))
    if p.config.variant == "serial":
        launch_prefill = prefill_runner(batch, p.prefill, o_prefill)
        launch_decode = decode_runner(batch, p.decode, o_decode)

        def serial():
            launch_prefill()
            launch_decode()
            return o_prefill, o_decode
        return serial
    launches = [fused_launcher(p, batch, o_prefill, o_decode, l) for l in p.launches if l.grid > 0]

    def fused():
        for launch in launches:
            launch()
        return o_prefill, o_decode
    return fused


def run(p: Plan, batch: HybridBatch,
        out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the plan on `batch` (same shape as planned). Returns (o_prefill, o_decode)."""
    return runner(p, batch, out)()


def pod_attention(batch: HybridBatch, config: PodConfig | None = None, **overrides):
    """plan + run in one call (for scripts; an engine keeps the plan and calls run per layer)."""
    return run(plan(batch, config, **overrides), batch)


# ---- backends -----------------------------------------------------------------------------------------
def _available() -> str | None:
    return None if _interpreting() else cuda_available()


def _prepare(batch: HybridBatch, config: PodConfig | None):
    if config is None and os.environ.get("POD_AUTOTUNE", "0") not in ("", "0") and not _interpreting():
        config, timings = autotune_config(batch)
    else:
        timings = None
    p = plan(batch, config)
    launch = runner(p, batch)
    if not _interpreting():
        launch()                          # compile (and autotune the serial kernels) here, untimed

    def run_() -> AttentionOutput:
        return AttentionOutput(*launch())
    run_.backend_config = p.describe()
    if timings is not None:
        run_.backend_config["autotune_ms"] = timings
    run_.plan = p
    return run_


def autotune_candidates(spec: BatchSpec, num_sms: int) -> dict[str, PodConfig]:
    """What POD_AUTOTUNE=1 times for the `pod` backend: the dispatcher's choice, its neighbours in the
    knobs measured least (tile shape, variant, occupancy roles), and serial. Few on purpose: each
    distinct set of tile constexprs is one more compile (cached across batches)."""
    chosen = choose_config(spec, num_sms)
    fused = chosen if chosen.variant != "serial" else replace(
        chosen, variant="fused", kv_splits=decode_kv_splits(spec, num_sms, chosen.block_n_decode))
    cands = {"dispatcher": chosen,
             "fused": fused,
             "fused_4w_m64": replace(fused, num_warps=4, block_m=64, block_n=64),
             "persistent": replace(fused, variant="persistent"),
             "fused_flip_occupancy": replace(fused, occupancy_roles=not fused.occupancy_roles),
             "serial": replace(chosen, variant="serial")}
    if not (spec.num_prefill and spec.num_decode):
        cands = {k: v for k, v in cands.items() if k in ("dispatcher", "serial")}
    if _persistent_available() is not None:   # not on GPUs until its GPU bug is fixed (it can hang)
        cands.pop("persistent", None)
    return cands


def autotune_config(batch: HybridBatch, candidates: dict[str, PodConfig] | None = None,
                    timer=None) -> tuple[PodConfig, dict[str, float]]:
    """Time every candidate config on `batch` (untimed prepare work, like Triton's autotuner) and
    return the fastest and all timings (ms). `timer(fn) -> ms` defaults to triton.testing.do_bench."""
    if timer is None:
        import triton.testing

        def timer(fn):
            return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")
    candidates = candidates or autotune_candidates(batch.spec, _device_num_sms(batch.device))
    timings = {}
    for name, cfg in candidates.items():
        launch = runner(plan(batch, cfg), batch)
        launch()                                       # compile outside the timing
        timings[name] = float(timer(launch))
    best = min(timings, key=timings.get)
    return candidates[best], timings


@register_backend("pod", availability=_available,
                  description="POD fused prefill+decode (Triton), dispatcher-chosen config")
def prepare_pod(batch: HybridBatch):
    """POD with the dispatcher's config (env POD_AUTOTUNE=1: the fastest of autotune_candidates)."""
    return _prepare(batch, None)


PAPER_CONFIG = PodConfig(variant="fused", ctas_per_sm=2, policy="alternating", kv_splits=1,
                         occupancy_roles=False)


@register_backend("pod_paper", availability=_available,
                  description="POD fused, the paper's scheme: one tile per CTA, 2 CTAs/SM, 1:1 roles")
def prepare_pod_paper(batch: HybridBatch):
    return _prepare(batch, PAPER_CONFIG)


def _persistent_available() -> str | None:
    """The persistent variant is right in the interpreter but not yet on the GPU: on the H100
    (2026-11-25, scripts/pod_diag.py) it left output rows unwritten on a small batch and did not finish
    within 45 s on the orientation batch. Until that is fixed it refuses to run on a GPU, so a sweep
    records a skipped row instead of hanging. POD_ALLOW_PERSISTENT=1 runs it anyway (to debug it)."""
    why = _available()
    if why is None and not _interpreting() and os.environ.get("POD_ALLOW_PERSISTENT", "0") in ("", "0"):
        why = ("pod_persistent is disabled on GPUs: wrong output and a hang on the H100 "
               "(docs/h100_notes.md); POD_ALLOW_PERSISTENT=1 to debug it")
    return why


@register_backend("pod_persistent", availability=_persistent_available,
                  description="POD fused, persistent work-stealing workers (ctas_per_sm x SMs)")
def prepare_pod_persistent(batch: HybridBatch):
    cfg = PodConfig(variant="persistent")
    cfg = replace(cfg, kv_splits=decode_kv_splits(batch.spec, _device_num_sms(batch.device),
                                                  cfg.block_n_decode))
    return _prepare(batch, cfg)


class _CallableModule(types.ModuleType):
    """`from pod import pod_attention` may yield this module (the submodule shares the function's
    name); calling it calls the function."""

    def __call__(self, *args, **kwargs):
        return pod_attention(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
