"""Our backends: thin adapters over pod's API, and the fp32 reference.

  reference                         fp32 PyTorch (ground truth)
  triton_prefill, triton_decode     the standalone Triton kernels (pod.kernels.prefill / decode)
  triton_serial                     the two back to back (two launches)
  pod, pod_paper                    the fused kernel (pod.api): the dispatcher's config (or a named
                                    pod_config), the paper's scheme

Every prepare does the plan (shape-only, untimed) and binds the launch arguments once; the returned
`run` only launches. Off the GPU they run in Triton's interpreter (TRITON_INTERPRET=1).
"""
from __future__ import annotations

from dataclasses import replace

import torch

from baselines.registry import DEFAULT_OPTIONS, AttentionOutput, BackendOptions, BackendUnavailable, register_backend
from pod.api import Plan, dispatch_facts, plan, warmup
from pod.batch import HybridBatch
from pod.dispatch import PodConfig
from pod.env import device_num_sms, interpreting
from pod.kernels.configs import DECODE_CONFIGS, POD_CONFIGS, pod_autotune_candidates
from pod.kernels.contract import KernelWork
from pod.kernels.decode import DecodeWork, plan_decode
from pod.prefill import plan_chunked_prefill
from pod.reference import reference

INTERPRETER_HINT = ("runs on a CUDA GPU; on a CPU run it in Triton's interpreter: set TRITON_INTERPRET=1 "
                    "(`make test` and `make reproduce` do)")


def triton_available() -> str | None:
    """Our Triton kernels run on a CUDA GPU, or on the CPU through the Triton interpreter."""
    if torch.cuda.is_available() or interpreting():
        return None
    return INTERPRETER_HINT


@register_backend("reference", description="fp32 PyTorch reference (ground truth, slow)")
def prepare_reference(batch: HybridBatch):
    def run() -> AttentionOutput:
        p, d = reference(batch)
        return AttentionOutput(p.to(batch.q_prefill.dtype), d.to(batch.q_decode.dtype))
    return run


# -- the standalone kernels ----------------------------------------------------------------------------
def _plan_decode(batch: HybridBatch, options: BackendOptions) -> DecodeWork:
    if options.decode_config not in DECODE_CONFIGS:
        raise ValueError(f"backend_options.decode_config={options.decode_config!r} unknown; "
                         f"named configs: {sorted(DECODE_CONFIGS)}")
    return plan_decode(batch, **DECODE_CONFIGS[options.decode_config])


def _prefill_only(batch: HybridBatch, options: BackendOptions = DEFAULT_OPTIONS) -> KernelWork:
    """The prefill plan of the kernel backend_options.prefill_config picks ("auto": the Hopper tile on an
    sm_90 GPU where it handles the layout, the portable tile elsewhere; pod/prefill.py)."""
    return plan_chunked_prefill(batch, options.prefill_config)


_WARMED: set = set()


def _warm_once(key, launch) -> None:
    """Compile (and autotune) in prepare, untimed, once per kernel specialisation `key`: an engine calls
    prepare every iteration, and a warm-up launch each time would add an attention pass to every step."""
    if interpreting() or key in _WARMED:
        return
    launch()
    _WARMED.add(key)


def _shape_key(batch: HybridBatch) -> tuple:
    s = batch.spec
    return (s.heads, s.dtype, s.page_size)


def _poisoned_like(x: torch.Tensor) -> torch.Tensor:
    """An output buffer full of NaN: a row the kernel never writes fails the harness's check."""
    return torch.full_like(x, float("nan"))


@register_backend("triton_prefill", computes=("prefill",), availability=triton_available,
                  description="our Triton chunked-prefill kernel (prefill part only)")
def prepare_triton_prefill(batch: HybridBatch, options: BackendOptions = DEFAULT_OPTIONS):
    work = _prefill_only(batch, options)
    launch = work.runner(batch, _poisoned_like(batch.q_prefill))   # no LSE needed here
    _warm_once(("prefill", _shape_key(batch), type(work).__name__, repr(work.config)), launch)

    def run() -> AttentionOutput:
        return AttentionOutput(launch(), None)

    run.backend_config = work.describe()
    return run


@register_backend("triton_decode", computes=("decode",), availability=triton_available,
                  description="our Triton split-KV decode (GQA group packed in M) + LSE merge")
def prepare_triton_decode(batch: HybridBatch, options: BackendOptions = DEFAULT_OPTIONS):
    work = _plan_decode(batch, options)
    launch = work.runner(batch, torch.empty_like(batch.q_decode))
    _warm_once(("decode", _shape_key(batch), options.decode_config), launch)

    def run() -> AttentionOutput:
        return AttentionOutput(None, launch())

    run.backend_config = work.describe()
    return run


@register_backend("triton_serial", availability=triton_available,
                  description="our Triton prefill kernel, then our Triton decode kernel (two launches)")
def prepare_triton_serial(batch: HybridBatch, options: BackendOptions = DEFAULT_OPTIONS):
    pre_work, dec_work = _prefill_only(batch, options), _plan_decode(batch, options)
    out_p, out_d = _poisoned_like(batch.q_prefill), _poisoned_like(batch.q_decode)
    launch_prefill = pre_work.runner(batch, out_p)      # arguments bound once, untimed
    launch_decode = dec_work.runner(batch, out_d)

    def run() -> AttentionOutput:
        return AttentionOutput(launch_prefill(), launch_decode())

    _warm_once(("serial", _shape_key(batch), type(pre_work).__name__, repr(pre_work.config),
                options.decode_config), run)
    run.backend_config = {"prefill": pre_work.describe(), "decode": dec_work.describe()}
    return run


# -- the fused POD kernel ------------------------------------------------------------------------------
def autotune_config(batch: HybridBatch, candidates: dict[str, PodConfig], timer=None
                    ) -> tuple[PodConfig, dict[str, float]]:
    """Time every candidate config on `batch` (untimed prepare work, like Triton's autotuner) and
    return the fastest and all timings (ms). `timer(fn) -> ms` defaults to triton.testing.do_bench."""
    if timer is None:
        import triton.testing

        def timer(fn):
            return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")
    timings = {}
    for name, cfg in candidates.items():
        launch = plan(batch, cfg).runner(batch)
        launch()                                       # compile outside the timing
        timings[name] = float(timer(launch))
    best = min(timings, key=timings.get)
    return candidates[best], timings


def _sm90_config(options: BackendOptions):
    """The Hopper POD kernel's planner settings that `options` ask for (pod and pod_sm90 alike)."""
    from pod.kernels.pod_sm90 import STATIC_TAIL_KEYS, PodSm90Config
    cfg = PodSm90Config()
    if options.pod_sm90_decode_gbps > 0:          # the planner's rate at every head_dim
        cfg = replace(cfg, decode_gbps_per_sm=options.pod_sm90_decode_gbps,
                      decode_gbps_per_sm_d64=options.pod_sm90_decode_gbps)
    if options.pod_sm90_static_tails:
        cfg = replace(cfg, static_tail_keys=STATIC_TAIL_KEYS)
    return cfg


def _prepare_pod(batch: HybridBatch, config: PodConfig | None, autotune: dict[str, PodConfig] | None = None,
                 options: BackendOptions = DEFAULT_OPTIONS):
    timings = None
    if config is None:
        # The dispatcher may pick another variant (and kernel) for the next batch: compile them all the first
        # time this head layout is seen (an engine's warm-up), not in whichever later step first picks one.
        _warm_once(("pod variants", _shape_key(batch)), lambda: warmup(batch))
    if autotune and not interpreting():
        config, timings = autotune_config(batch, autotune)
    p: Plan = plan(batch, config, sm90_config=_sm90_config(options))
    launch = p.runner(batch)
    _warm_once(("pod", _shape_key(batch), repr(p.config)), launch)

    def run() -> AttentionOutput:
        return AttentionOutput(*launch())
    run.backend_config = p.describe()
    if timings is not None:
        run.backend_config["autotune_ms"] = timings
    run.plan = p
    return run


@register_backend("pod", availability=triton_available,
                  description="POD fused prefill+decode (Triton), dispatcher-chosen config")
def prepare_pod(batch: HybridBatch, options: BackendOptions = DEFAULT_OPTIONS):
    """POD with the dispatcher's config, a named pod_config, or (pod_autotune) the fastest candidate."""
    if options.pod_config not in POD_CONFIGS:
        raise ValueError(f"backend_options.pod_config={options.pod_config!r} unknown; "
                         f"named configs: {sorted(POD_CONFIGS)}")
    config = POD_CONFIGS[options.pod_config]
    cands = None
    if options.pod_autotune and config is None:
        cands = pod_autotune_candidates(batch.spec, device_num_sms(batch.device),
                                        **dispatch_facts(batch.spec, batch.device))
    return _prepare_pod(batch, config, cands, options)


@register_backend("pod_paper", availability=triton_available,
                  description="POD fused, the paper's scheme: one tile per CTA, 2 CTAs/SM, 1:1 roles")
def prepare_pod_paper(batch: HybridBatch):
    return _prepare_pod(batch, POD_CONFIGS["paper"])


# -- the Hopper POD kernel (pod/kernels/pod_sm90.py) ------------------------------------------------------
def hopper_available() -> str | None:
    """The Hopper kernels are Gluon for sm_90a: an H100/H200, not the interpreter."""
    if interpreting():
        return "sm_90a only (Gluon): Triton's interpreter cannot run it (CPU tests compile it for sm_90a instead)"
    if not torch.cuda.is_available():
        return "GPU only: needs an sm_90 GPU (H100/H200)"
    if torch.cuda.get_device_capability()[0] != 9:
        return f"sm_90a only (Gluon, wgmma/TMA): this GPU is {torch.cuda.get_device_name()}"
    return None


@register_backend("pod_sm90", availability=hopper_available,
                  description="POD on Hopper: one persistent launch, SM-level roles, the Hopper tile for both")
def prepare_pod_sm90(batch: HybridBatch, options: BackendOptions = DEFAULT_OPTIONS):
    from pod.kernels.pod_sm90 import plan_pod_sm90, pod_sm90_supports
    why = pod_sm90_supports(batch.spec)
    if why is not None:
        raise BackendUnavailable(f"pod_sm90 does not handle this batch: {why}")
    cfg = _sm90_config(options)
    if options.pod_sm90_decode_ctas > 0:
        cfg = replace(cfg, decode_ctas=options.pod_sm90_decode_ctas)
    work = plan_pod_sm90(batch, cfg)
    launch = work.runner(batch, _poisoned_like(batch.q_prefill), _poisoned_like(batch.q_decode))
    _warm_once(("pod_sm90", _shape_key(batch)), launch)

    def run() -> AttentionOutput:
        return AttentionOutput(*launch())

    run.backend_config = work.describe()
    return run
