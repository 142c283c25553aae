"""FlashInfer baselines (flashinfer-python 0.6.6), all on the paged KV cache.

  fi_serial          BatchPrefillWithPagedKVCacheWrapper (causal) over the prefill chunks, then
                     BatchDecodeWithPagedKVCacheWrapper(use_tensor_cores=True) over the decodes: 2 launches
  fi_batched         one BatchPrefillWithPagedKVCacheWrapper over the whole hybrid batch, decodes as
                     length-1 queries (causal masks are bottom-right aligned, so a 1-row query sees all keys)
  fi_batch_attention flashinfer.BatchAttention (the "holistic" persistent kernel) over the whole batch
  fi_pod             PODWithPagedKVCacheWrapper: FlashInfer's POD-Attention port; ONE prefill request with
                     contiguous (ragged) K/V + paged batch decode, fused in one launch
  fi_batch_pod       BatchPODWithPagedKVCacheWrapper: paged batch prefill + paged batch decode, one launch
  fi_prefill_ragged  BatchPrefillWithRaggedKVCacheWrapper (causal) over the prefill chunks on the contiguous
                     cache (prefill part only): FlashInfer's prefill kernel without the page indirection

Layout (all but fi_prefill_ragged): FlashInfer's NHD paged cache is exactly ours, k_cache/v_cache [num_pages, page_size, Hkv, D],
addressed by the CSR (page_indptr, page_indices, last_page_len) of HybridBatch. Sequences are ordered
prefill chunks first, then decodes, so each part's CSR is a contiguous slice of the batch's, rebased
to start at 0 (`page_csr`).

FlashInfer is optional and imported lazily (`_fi`): without it, or without CUDA, every backend here
reports unavailable with the reason. Everything that plan() needs (wrapper creation, plan(), the
gathered K/V of fi_pod's prefill) happens in prepare, untimed; run() only launches. All wrappers share
one zero-initialised float workspace per device (`workspace`), grown to the largest size a batch's
heads need (`float_workspace_bytes`); runs are stream-ordered, so sharing is safe.
FlashInfer JIT-compiles each kernel module on first use into its cache (FLASHINFER_WORKSPACE_BASE,
FlashInfer's own variable, is respected: nothing here overrides it); `python -m experiments.attention -m sweep=gpu_smoke backend=baselines
backend_options.fi_prefill_backend=auto,fa2` builds them once and checks every baseline.

Knob: backend_options.fi_prefill_backend (BackendOptions) picks the prefill wrappers' `backend`:
"auto" (default; fa3 on Hopper for bf16/fp16) or "fa2" / "fa3". It is reported in
`run.backend_config` and, with every option, in the row's `options`.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import re

import torch

from baselines.common import hybrid_q, hybrid_qo_indptr, split_rows
from pod.batch import HybridBatch, ModelHeads
from baselines.registry import DEFAULT_OPTIONS, AttentionOutput, BackendOptions, BackendUnavailable, register_backend

INSTALL_HINT = "pip install '.[flashinfer]'"
PREFILL_BACKENDS = ("auto", "fa2", "fa3")
_WORKSPACES: dict[torch.device, torch.Tensor] = {}

# The float workspace holds split-KV partial outputs. FlashInfer's FA2 planner (PrefillPlan in
# include/flashinfer/attention/scheduler.cuh, used by the prefill wrappers on their fa2 backend, the
# tensor-core decode wrapper and the POD wrappers' parts) splits KV only into at most
# 2 CTAs per SM / num_kv_heads work tiles, and reserves for each tile num_qo_heads x cta_tile_q
# (<= 128) rows of fp32 output and LSE. 0.6.6 does not divide that by the GQA group (0.7.2 does), so
# MQA needs far more than GQA: 32 q heads over 1 KV head with 64 decodes of 2048 (16-token pages)
# takes 270 MB on an H200, past the fixed 256 MiB this module once used. The bound below holds on both.
FA2_SPLIT_CTAS_PER_SM = 2
FA2_MAX_CTA_TILE_Q = 128
MIN_WORKSPACE_BYTES = 128 * 2**20          # FlashInfer's recommended size


# -- availability and the lazy import ----------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _import_error() -> str | None:
    try:
        importlib.import_module("flashinfer")
    except Exception as e:  # a broken install (missing pynvml, ninja, tvm_ffi ABI...) is "unavailable"
        return f"`import flashinfer` failed: {type(e).__name__}: {e} (reinstall: {INSTALL_HINT})"
    return None


def flashinfer_availability() -> str | None:
    """None when FlashInfer can run here, else what is missing (and how to install it)."""
    missing = []
    if not torch.cuda.is_available():
        missing.append("a CUDA GPU (torch.cuda.is_available() is False)")
    if importlib.util.find_spec("flashinfer") is None:
        missing.append(f"the flashinfer-python package (install: {INSTALL_HINT})")
    if missing:
        return ("GPU only: " if not torch.cuda.is_available() else "") + "needs " + " and ".join(missing)
    return _import_error()


def _needs_attr(attr: str):
    def availability() -> str | None:
        why = flashinfer_availability()
        if why is None and not hasattr(_fi(), attr):
            why = f"this FlashInfer ({getattr(_fi(), '__version__', '?')}) has no flashinfer.{attr}"
        return why
    return availability


def _fi():
    """The flashinfer module (tests replace this seam with a CPU stand-in)."""
    why = flashinfer_availability()
    if why is not None:
        raise BackendUnavailable(why)
    return importlib.import_module("flashinfer")


def prefill_backend(options: BackendOptions) -> str:
    if options.fi_prefill_backend not in PREFILL_BACKENDS:
        raise ValueError(f"backend_options.fi_prefill_backend={options.fi_prefill_backend!r}: "
                         f"one of {PREFILL_BACKENDS}")
    return options.fi_prefill_backend


def float_workspace_bytes(heads: ModelHeads, num_sms: int, plans: int = 1) -> int:
    """Float workspace that `plans` FA2 plans of these heads can take at once, at least FlashInfer's
    recommended 128 MiB, in whole 2 MiB (BatchPOD halves its buffer: each half stays aligned):
    plans x num_qo_heads x (2 x num_sms // num_kv_heads tiles) x 128 rows x (head_dim + 1) x 4 bytes."""
    tiles = FA2_SPLIT_CTAS_PER_SM * num_sms // heads.num_kv_heads
    per_plan = heads.num_q_heads * tiles * FA2_MAX_CTA_TILE_Q * (heads.head_dim + 1) * 4 + 2 * 16
    step = 2 * 2**20
    return max(MIN_WORKSPACE_BYTES, -(-plans * per_plan // step) * step)


def num_sms(device: torch.device) -> int:
    """The SMs FlashInfer's planner splits over (pod.env's count: the simulated one off a GPU)."""
    from pod.env import device_num_sms
    return device_num_sms(device)


def _allocate(nbytes: int, device: torch.device) -> torch.Tensor:
    return torch.zeros(nbytes, dtype=torch.uint8, device=device)


def workspace(device: torch.device, nbytes: int = MIN_WORKSPACE_BYTES) -> torch.Tensor:
    """The float workspace of `device`, shared by every wrapper, at least `nbytes` (replaced by a
    bigger one when a batch needs more; wrappers planned on the old one keep it alive). Zeroed when
    made: the decode wrapper requires a zero-initialised buffer on first use."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device not in _WORKSPACES or _WORKSPACES[device].numel() < nbytes:
        _WORKSPACES.pop(device, None)
        _WORKSPACES[device] = _allocate(nbytes, device)
    return _WORKSPACES[device]


def batch_workspace(batch: HybridBatch, plans: int = 1) -> torch.Tensor:
    return workspace(batch.device, float_workspace_bytes(batch.spec.heads, num_sms(batch.device), plans))


# -- index arithmetic (pure torch; unit-tested on the CPU) ------------------------------------------
def page_csr(batch: HybridBatch, rows: slice) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(page_indptr, page_indices, last_page_len) of sequences rows.start..rows.stop-1, rebased to 0.

    page_indptr [n+1] int32, page_indices [pages of those rows] int32, last_page_len [n] int32.
    """
    a, b = rows.start, rows.stop
    first, last = int(batch.page_indptr[a]), int(batch.page_indptr[b])
    indptr = (batch.page_indptr[a:b + 1] - first).to(torch.int32)
    return indptr, batch.page_indices[first:last], batch.last_page_len[a:b]


def _common_plan_kwargs(batch: HybridBatch) -> dict:
    return dict(q_data_type=batch.spec.torch_dtype, kv_data_type=batch.spec.torch_dtype,
                sm_scale=batch.sm_scale)


def _paged(batch: HybridBatch) -> None:
    if batch.block_table is None:
        raise BackendUnavailable("FlashInfer backends need a paged KV cache (BatchSpec.page_size)")


def _with_config(run, **config):
    run.backend_config = config
    return run


# -- wrappers ------------------------------------------------------------------------------------
def _plan_prefill(batch: HybridBatch, qo_indptr, csr, backend: str):
    fi = _fi()
    h = batch.spec.heads
    w = fi.BatchPrefillWithPagedKVCacheWrapper(batch_workspace(batch), "NHD", backend=backend)
    w.plan(qo_indptr, *csr, h.num_q_heads, h.num_kv_heads, h.head_dim, batch.spec.page_size,
           causal=True, **_common_plan_kwargs(batch))
    return w


def _plan_decode(batch: HybridBatch, csr):
    fi = _fi()
    h = batch.spec.heads
    w = fi.BatchDecodeWithPagedKVCacheWrapper(batch_workspace(batch), "NHD", use_tensor_cores=True)
    w.plan(*csr, h.num_q_heads, h.num_kv_heads, h.head_dim, batch.spec.page_size,
           **_common_plan_kwargs(batch))
    return w


_FI = dict(layouts=("paged",), availability=flashinfer_availability)


@register_backend("fi_serial", **_FI,
                  description="FlashInfer batch prefill (paged, causal) then batch decode "
                              "(tensor cores): two launches")
def prepare_fi_serial(batch: HybridBatch, options: BackendOptions = DEFAULT_OPTIONS):
    _paged(batch)
    spec, kv = batch.spec, (batch.k_cache, batch.v_cache)
    backend = prefill_backend(options)
    pre = dec = None
    if spec.num_prefill:
        pre = _plan_prefill(batch, batch.q_indptr, page_csr(batch, batch.prefill_rows()), backend)
    if spec.num_decode:
        dec = _plan_decode(batch, page_csr(batch, batch.decode_rows()))
    empty_p, empty_d = torch.empty_like(batch.q_prefill), torch.empty_like(batch.q_decode)
    q_p, q_d = batch.q_prefill, batch.q_decode

    def run() -> AttentionOutput:
        out_p = pre.run(q_p, kv) if pre is not None else empty_p
        out_d = dec.run(q_d, kv) if dec is not None else empty_d
        return AttentionOutput(out_p, out_d)
    return _with_config(run, prefill_backend=backend, decode_tensor_cores=True)


@register_backend("fi_batched", **_FI,
                  description="one FlashInfer batch prefill over the hybrid batch, decodes as "
                              "1-token queries")
def prepare_fi_batched(batch: HybridBatch, options: BackendOptions = DEFAULT_OPTIONS):
    _paged(batch)
    backend = prefill_backend(options)
    all_rows = slice(0, batch.spec.num_prefill + batch.spec.num_decode)
    w = _plan_prefill(batch, hybrid_qo_indptr(batch), page_csr(batch, all_rows), backend)
    q = hybrid_q(batch)
    kv = (batch.k_cache, batch.v_cache)

    def run() -> AttentionOutput:
        return split_rows(w.run(q, kv), batch)
    return _with_config(run, prefill_backend=backend)


# BatchAttention's own float workspace is a fixed 384 MiB (0.6.6 and 0.7.2), which its holistic planner's
# partial outputs outgrow on MHA batches: Llama-2-7B, 1024 new tokens over 12288 beside 1-128 decodes of
# 4096 asked for 1.25 GB of holistic_partial_o (H200, the balance sweep). plan() hands FlashInfer the
# wrapper's `float_workspace_buffer`, so on FlashInfer's overflow error that buffer is replaced by one with
# room for what the error asked and the plan repeated (the partial outputs only: they are what the float
# buffer holds; the int buffer's allocations are fixed).
_OVERFLOW = re.compile(r"memory for (\w*partial\w*) with size (\d+) .*?only (\d+) bytes available")
HOLISTIC_PLAN_TRIES = 4
HOLISTIC_SLACK_BYTES = 64 * 2**20


def _plan_with_room(w, plan) -> tuple[int, bool]:
    """plan(), growing w's float workspace on FlashInfer's overflow error; returns (the workspace's bytes,
    whether it was grown), recorded in the rows: at ff9fb15 BatchAttention gave wrong outputs at four MHA
    `paper` points, and whether its workspace had been grown there was not recorded."""
    start = w.float_workspace_buffer.numel()
    for attempt in range(HOLISTIC_PLAN_TRIES):
        try:
            plan()
            return w.float_workspace_buffer.numel(), w.float_workspace_buffer.numel() != start
        except RuntimeError as e:
            m = _OVERFLOW.search(str(e))
            if m is None or attempt == HOLISTIC_PLAN_TRIES - 1:
                raise
            buf = w.float_workspace_buffer
            need = buf.numel() + int(m[2]) - int(m[3]) + HOLISTIC_SLACK_BYTES
            w.float_workspace_buffer = _allocate(-(-need // (2 * 2**20)) * 2 * 2**20, buf.device)


@register_backend("fi_batch_attention", layouts=("paged",),
                  availability=_needs_attr("BatchAttention"),
                  description="flashinfer.BatchAttention (persistent holistic kernel) over the "
                              "hybrid batch")
def prepare_fi_batch_attention(batch: HybridBatch):
    _paged(batch)
    fi, h = _fi(), batch.spec.heads
    # BatchAttention owns its workspaces (it allocates them itself; no buffer argument in 0.6.6).
    w = fi.BatchAttention(kv_layout="NHD", device=str(batch.device))
    float_bytes, grown = _plan_with_room(w, lambda: w.plan(
        hybrid_qo_indptr(batch), batch.page_indptr, batch.page_indices, batch.kv_lens,
        h.num_q_heads, h.num_kv_heads, h.head_dim, h.head_dim, batch.spec.page_size,
        causal=True, sm_scale=batch.sm_scale, q_data_type=batch.spec.torch_dtype,
        kv_data_type=batch.spec.torch_dtype))
    q = hybrid_q(batch)
    kv = (batch.k_cache, batch.v_cache)

    def run() -> AttentionOutput:
        out, _lse = w.run(q, kv)
        return split_rows(out, batch)
    return _with_config(run, float_workspace_mb=round(float_bytes / 2**20), workspace_grown=grown)


@register_backend("fi_pod", layouts=("paged",), availability=_needs_attr("PODWithPagedKVCacheWrapper"),
                  description="FlashInfer PODWithPagedKVCacheWrapper: 1 prefill (ragged K/V) + "
                              "paged batch decode, fused")
def prepare_fi_pod(batch: HybridBatch):
    _paged(batch)
    spec = batch.spec
    if spec.num_prefill != 1 or spec.num_decode == 0:
        raise BackendUnavailable(
            f"fi_pod runs exactly one prefill chunk with >= 1 decode; this batch has "
            f"{spec.num_prefill} prefill chunk(s) and {spec.num_decode} decode(s)")
    fi, h = _fi(), spec.heads
    w = fi.PODWithPagedKVCacheWrapper(batch_workspace(batch), "NHD")   # the prefill part's tmp is its own
    w.plan(*page_csr(batch, batch.decode_rows()), h.num_q_heads, h.num_kv_heads, h.head_dim,
           spec.page_size, **_common_plan_kwargs(batch))
    # The prefill part takes its K/V as ragged NHD tensors [kv_len, Hkv, D]: gathered here, untimed.
    k_p, v_p = (t.contiguous() for t in batch.sequence_kv(0))
    q_p, q_d, kv = batch.q_prefill, batch.q_decode, (batch.k_cache, batch.v_cache)

    def run() -> AttentionOutput:
        out_p, out_d = w.run(q_p, k_p, v_p, q_d, kv, causal_p=True, sm_scale_p=batch.sm_scale)
        return AttentionOutput(out_p, out_d)
    return _with_config(run, prefill_kv="ragged-gathered")


@register_backend("fi_batch_pod", layouts=("paged",),
                  availability=_needs_attr("BatchPODWithPagedKVCacheWrapper"),
                  description="FlashInfer BatchPODWithPagedKVCacheWrapper: paged batch prefill + "
                              "batch decode, fused")
def prepare_fi_batch_pod(batch: HybridBatch):
    _paged(batch)
    spec = batch.spec
    if spec.num_prefill == 0 or spec.num_decode == 0:
        raise BackendUnavailable(
            f"fi_batch_pod needs >= 1 prefill chunk and >= 1 decode; this batch has "
            f"{spec.num_prefill} and {spec.num_decode}")
    fi, h = _fi(), spec.heads
    qo_indptr_d = torch.arange(spec.num_decode + 1, dtype=torch.int32, device=batch.device)
    w = fi.BatchPODWithPagedKVCacheWrapper(batch_workspace(batch, plans=2), "NHD")   # halved: one plan each
    w.plan(batch.q_indptr, *page_csr(batch, batch.prefill_rows()),
           qo_indptr_d, *page_csr(batch, batch.decode_rows()),
           h.num_q_heads, h.num_kv_heads, h.head_dim, spec.page_size, **_common_plan_kwargs(batch))
    q_p, q_d, kv = batch.q_prefill, batch.q_decode, (batch.k_cache, batch.v_cache)

    def run() -> AttentionOutput:
        out_p, out_d = w.run(q_p, kv, q_d, kv, causal_p=True)
        return AttentionOutput(out_p, out_d)
    return _with_config(run)


@register_backend("fi_prefill_ragged", computes=("prefill",), layouts=("contiguous",),
                  availability=flashinfer_availability,
                  description="FlashInfer batch prefill on the contiguous (ragged) KV cache, causal "
                              "(prefill part only)")
def prepare_fi_prefill_ragged(batch: HybridBatch, options: BackendOptions = DEFAULT_OPTIONS):
    spec, h = batch.spec, batch.spec.heads
    if not spec.num_prefill:
        raise BackendUnavailable("the batch has no prefill chunk")
    fi = _fi()
    backend = prefill_backend(options)
    w = fi.BatchPrefillWithRaggedKVCacheWrapper(batch_workspace(batch), "NHD", backend=backend)
    # Prefill sequences come first, so their K/V rows start at row 0: kv_indptr[:P+1] is their CSR.
    w.plan(batch.q_indptr, batch.kv_indptr[: spec.num_prefill + 1], h.num_q_heads, h.num_kv_heads,
           h.head_dim, causal=True, **_common_plan_kwargs(batch))
    q, k, v = batch.q_prefill, batch.k_cache, batch.v_cache

    def run() -> AttentionOutput:
        return AttentionOutput(w.run(q, k, v), None)
    return _with_config(run, prefill_backend=backend)
