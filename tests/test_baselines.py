"""Baselines on the CPU: availability reasons, and the Python logic of every wrapper (argument building,
which rows go to which call, output splitting) run against CPU stand-ins of the kernels.

The stand-ins are written from the kernels' documented semantics (FA2 varlen with a bottom-right causal
mask; FlashInfer's CSR page tables), independently of pod.reference, and write into NaN-poisoned
outputs: a row a wrapper forgets to send stays NaN and fails the comparison with the reference.
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import baselines.flashinfer as fib
import baselines.torch_fa as tfa
from pod.batch import BatchSpec, ModelHeads, make_batch
from pod.reference import max_rel_error, reference
from baselines.registry import BackendOptions, BackendUnavailable, always_available, get_backend, list_backends

FA_NAMES = ("fa2_serial", "fa2_streams", "fa2_batched")
FI_NAMES = ("fi_serial", "fi_batched", "fi_batch_attention", "fi_pod", "fi_batch_pod")
TOL = 1e-2  # bf16 outputs of fp32 math vs the fp32 reference


# -- a CPU attention written from the kernels' contracts --------------------------------------------
def _attend_rows(q, k, v, causal, scale):
    """q [Lq, Hq, D], k/v [Lk, Hkv, D]; causal is bottom-right aligned (FA2/FlashInfer convention):
    query i sees keys 0..Lk-Lq+i. fp32 math, output in q's dtype."""
    lq, hq, _ = q.shape
    lk, hkv, _ = k.shape
    assert hq % hkv == 0 and lk >= lq
    g = hq // hkv
    s = torch.einsum("qhd,khd->hqk", q.float(), k.float().repeat_interleave(g, 1)) * scale
    if causal:
        qi = torch.arange(lq)[:, None] + (lk - lq)
        s = s.masked_fill(torch.arange(lk)[None, :] > qi, float("-inf"))
    out = torch.einsum("hqk,khd->qhd", torch.softmax(s, -1), v.float().repeat_interleave(g, 1))
    return out.to(q.dtype)


def _check_indptr(ptr, total):
    assert ptr.dtype == torch.int32 and int(ptr[0]) == 0 and int(ptr[-1]) == total
    assert bool((ptr[1:] >= ptr[:-1]).all())


def fake_flash_varlen(calls):
    def flash_varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale):
        assert q.dtype == k.dtype == v.dtype and q.stride(-1) == k.stride(-1) == 1
        _check_indptr(cu_q, q.shape[0])
        _check_indptr(cu_k, k.shape[0])
        lq, lk = cu_q.diff().tolist(), cu_k.diff().tolist()
        assert max_q == max(lq) and max_k == max(lk), "max_q/max_k size FA2's grid: must be exact maxima"
        out = torch.full_like(q, float("nan"))
        for b in range(len(lq)):
            qa, ka = int(cu_q[b]), int(cu_k[b])
            out[qa:qa + lq[b]] = _attend_rows(q[qa:qa + lq[b]], k[ka:ka + lk[b]], v[ka:ka + lk[b]],
                                              causal, scale)
        calls.append(dict(rows=q.shape[0], seqs=len(lq), causal=causal))
        return out
    return flash_varlen


def _paged_kv(kv, indptr, indices, b, kv_len):
    k_cache, v_cache = kv
    pages = indices[int(indptr[b]):int(indptr[b + 1])].long()
    assert len(pages) == math.ceil(kv_len / k_cache.shape[1])
    k = k_cache[pages].flatten(0, 1)[:kv_len]
    v = v_cache[pages].flatten(0, 1)[:kv_len]
    return k, v


def _paged_attention(q, qo_indptr, kv, indptr, indices, kv_lens, causal, scale):
    _check_indptr(qo_indptr, q.shape[0])
    _check_indptr(indptr, indices.shape[0])
    out = torch.full_like(q, float("nan"))
    for b in range(len(kv_lens)):
        qa, qb = int(qo_indptr[b]), int(qo_indptr[b + 1])
        k, v = _paged_kv(kv, indptr, indices, b, int(kv_lens[b]))
        out[qa:qb] = _attend_rows(q[qa:qb], k, v, causal, scale)
    return out


def _kv_lens(indptr, last_page_len, page_size):
    return [(int(indptr[b + 1]) - int(indptr[b]) - 1) * page_size + int(last_page_len[b])
            for b in range(len(last_page_len))]


H200_SMS = 132


def fa2_plan_float_bytes(qo_lens, kv_pages, hq, hkv, head_dim, page_size, num_sms=H200_SMS) -> int:
    """Float workspace bytes FlashInfer 0.6.6's FA2 planner takes for one plan (PrefillPlan and
    PrefillSplitQOKVIndptr in include/flashinfer/attention/scheduler.cuh, rewritten here): queries are
    packed with their GQA group into cta_tile_q-row tiles; KV is split (binary search on the chunk, in
    pages) only while the tiles fit 2 CTAs per SM / num_kv_heads; a split plan reserves tmp_v
    [hq x tiles x cta_tile_q x head_dim] and tmp_s [hq x tiles x cta_tile_q] fp32, 16-byte aligned."""
    packed = [q * (hq // hkv) for q in qo_lens]
    avg = sum(packed) // len(packed)
    cta = 128 if avg > 64 and head_dim < 256 else 64 if avg > 16 else 16
    max_tiles = 2 * num_sms // hkv
    kv = [max(k, 1) for k in kv_pages]

    def tiles(chunk):
        return sum(-(-p // cta) * -(-k // chunk) for p, k in zip(packed, kv))
    lo, hi = max(128 // page_size, 1), max([1] + kv)
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if tiles(mid) > max_tiles else (lo, mid)
    if not lo < max([1] + kv):
        return 0                                  # no split: nothing in the float workspace
    n = tiles(lo)
    return -(-hq * n * cta * head_dim * 4 // 16) * 16 + hq * n * cta * 4


class _Wrapper:
    log: list
    workspace_bytes: int = 0

    def _plan_common(self, kw, page_size):
        self.scale, self.page_size = kw["sm_scale"], page_size
        assert kw["q_data_type"] == kw["kv_data_type"] and kw["q_data_type"] in (torch.bfloat16, torch.float16)

    def _fit(self, qo_indptr, indptr, hq, hkv, d, page_size):
        """FlashInfer's plan-time check: the split-KV partials must fit the float workspace."""
        need = fa2_plan_float_bytes(qo_indptr.diff().tolist(), indptr.diff().tolist(), hq, hkv, d, page_size)
        if need > self.workspace_bytes:
            raise RuntimeError(f"Buffer overflow when allocating memory for batch_prefill_tmp_s with size "
                               f"{need} and alignment 16, but only {self.workspace_bytes} bytes available in "
                               f"AlignedAllocator. Increase the workspace buffer size.")


def make_fake_flashinfer(log):
    class BatchPrefillWithPagedKVCacheWrapper(_Wrapper):
        def __init__(self, workspace, kv_layout, backend="auto"):
            assert kv_layout == "NHD" and workspace.dtype == torch.uint8
            self.workspace_bytes = workspace.numel()
            log.append(("prefill", backend))

        def plan(self, qo_indptr, indptr, indices, last_page_len, hq, hkv, d, page_size, causal, **kw):
            self._plan_common(kw, page_size)
            self._fit(qo_indptr, indptr, hq, hkv, d, page_size)
            self.csr = (qo_indptr, indptr, indices, _kv_lens(indptr, last_page_len, page_size))
            self.causal = causal

        def run(self, q, kv):
            qo, ip, ix, lens = self.csr
            return _paged_attention(q, qo, kv, ip, ix, lens, self.causal, self.scale)

    class BatchDecodeWithPagedKVCacheWrapper(_Wrapper):
        def __init__(self, workspace, kv_layout, use_tensor_cores=False):
            assert kv_layout == "NHD" and workspace.dtype == torch.uint8
            self.workspace_bytes = workspace.numel()
            log.append(("decode", use_tensor_cores))

        def plan(self, indptr, indices, last_page_len, hq, hkv, d, page_size, **kw):
            self._plan_common(kw, page_size)
            # The tensor-core decode plans with the FA2 prefill planner, one query row a request.
            self._fit(torch.arange(indptr.numel(), dtype=torch.int32), indptr, hq, hkv, d, page_size)
            self.csr = (indptr, indices, _kv_lens(indptr, last_page_len, page_size))

        def run(self, q, kv):
            ip, ix, lens = self.csr
            qo = torch.arange(q.shape[0] + 1, dtype=torch.int32)
            return _paged_attention(q, qo, kv, ip, ix, lens, False, self.scale)

    class BatchAttention(_Wrapper):
        need_bytes = 0            # holistic_partial_o a plan asks for (tests set it)
        used_bytes = 1 << 20      # what the plan allocated before it

        def __init__(self, kv_layout="NHD", device="cuda"):
            assert kv_layout == "NHD"
            self.float_workspace_buffer = torch.empty(384 * 2**20, dtype=torch.uint8, device="meta")
            log.append(("batch_attention",))

        def plan(self, qo_indptr, kv_indptr, kv_indices, kv_len_arr, hq, hkv, dqk, dvo, page_size,
                 causal=False, **kw):
            self._plan_common(kw, page_size)
            left = self.float_workspace_buffer.numel() - self.used_bytes
            if self.need_bytes > left:
                raise RuntimeError(f"Error in function 'aligned_alloc' at allocator.h:49: Buffer overflow when "
                                   f"allocating memory for holistic_partial_o with size {self.need_bytes} and "
                                   f"alignment 16, but only {left} bytes available in AlignedAllocator. "
                                   f"Increase the workspace buffer size.")
            self.args = (qo_indptr, kv_indptr, kv_indices, kv_len_arr.tolist(), causal)

        def run(self, q, kv):
            qo, ip, ix, lens, causal = self.args
            out = _paged_attention(q, qo, kv, ip, ix, lens, causal, self.scale)
            return out, torch.zeros(q.shape[:2])

    class PODWithPagedKVCacheWrapper(_Wrapper):
        def __init__(self, workspace, kv_layout):
            self.workspace_bytes = workspace.numel()
            log.append(("pod",))

        def plan(self, indptr, indices, last_page_len, hq, hkv, d, page_size, **kw):
            self._plan_common(kw, page_size)
            self._fit(torch.arange(indptr.numel(), dtype=torch.int32), indptr, hq, hkv, d, page_size)
            self.csr = (indptr, indices, _kv_lens(indptr, last_page_len, page_size))

        def run(self, q_p, k_p, v_p, q_d, kv, causal_p=False, sm_scale_p=None):
            assert k_p.shape == v_p.shape and k_p.dim() == 3 and k_p.is_contiguous()
            ip, ix, lens = self.csr
            out_p = _attend_rows(q_p, k_p, v_p, causal_p, sm_scale_p or 1 / math.sqrt(q_p.shape[-1]))
            qo = torch.arange(q_d.shape[0] + 1, dtype=torch.int32)
            return out_p, _paged_attention(q_d, qo, kv, ip, ix, lens, False, self.scale)

    class BatchPODWithPagedKVCacheWrapper(_Wrapper):
        def __init__(self, workspace, kv_layout):
            self.workspace_bytes = workspace.numel() // 2      # torch.chunk(workspace, 2): a half a plan
            log.append(("batch_pod",))

        def plan(self, qo_p, ip_p, ix_p, last_p, qo_d, ip_d, ix_d, last_d, hq, hkv, d, page_size, **kw):
            self._plan_common(kw, page_size)
            self._fit(qo_p, ip_p, hq, hkv, d, page_size)
            self._fit(qo_d, ip_d, hq, hkv, d, page_size)
            self.p = (qo_p, ip_p, ix_p, _kv_lens(ip_p, last_p, page_size))
            self.d = (qo_d, ip_d, ix_d, _kv_lens(ip_d, last_d, page_size))

        def run(self, q_p, kv_p, q_d, kv_d, causal_p=False):
            return (_paged_attention(q_p, self.p[0], kv_p, *self.p[1:], causal_p, self.scale),
                    _paged_attention(q_d, self.d[0], kv_d, *self.d[1:], False, self.scale))

    class BatchPrefillWithRaggedKVCacheWrapper(_Wrapper):
        def __init__(self, workspace, kv_layout, backend="auto"):
            assert kv_layout == "NHD" and workspace.dtype == torch.uint8
            self.workspace_bytes = workspace.numel()
            log.append(("ragged", backend))

        def plan(self, qo_indptr, kv_indptr, hq, hkv, d, causal=False, **kw):
            self._plan_common(kw, 1)
            self._fit(qo_indptr, kv_indptr, hq, hkv, d, 1)       # ragged KV: the planner's "pages" are tokens
            self.indptr, self.causal = (qo_indptr, kv_indptr), causal

        def run(self, q, k, v):
            qo, kv = self.indptr
            _check_indptr(qo, q.shape[0])
            out = torch.full_like(q, float("nan"))
            for b in range(qo.numel() - 1):
                qa, qb, ka, kb = int(qo[b]), int(qo[b + 1]), int(kv[b]), int(kv[b + 1])
                out[qa:qb] = _attend_rows(q[qa:qb], k[ka:kb], v[ka:kb], self.causal, self.scale)
            return out

    return SimpleNamespace(**{c.__name__: c for c in (
        BatchPrefillWithPagedKVCacheWrapper, BatchDecodeWithPagedKVCacheWrapper, BatchAttention,
        PODWithPagedKVCacheWrapper, BatchPODWithPagedKVCacheWrapper, BatchPrefillWithRaggedKVCacheWrapper)})


# -- batches: uneven lengths, none a multiple of the page size; mixed, prefill-only, decode-only ----
def _spec(prefill, decode, page_size=None, heads=(4, 2, 64), dtype="bfloat16"):
    return BatchSpec.build(*heads, prefill=prefill, decode=decode, dtype=dtype, page_size=page_size)


MIXED = dict(prefill=[(37, 21), (19, 0)], decode=[1, 45, 18])
SHAPES = [
    (MIXED, (4, 2, 64), "bfloat16"),
    (dict(prefill=[(23, 40)], decode=[33, 7]), (6, 1, 128), "float16"),
    (dict(prefill=[(29, 5), (3, 60)], decode=[]), (4, 4, 64), "bfloat16"),
    (dict(prefill=[], decode=[17, 1, 64]), (8, 2, 64), "bfloat16"),
]


def _assert_matches_reference(batch, out):
    ref_p, ref_d = reference(batch)
    assert out.prefill.shape == batch.q_prefill.shape and out.decode.shape == batch.q_decode.shape
    assert out.prefill.dtype == out.decode.dtype == batch.q_prefill.dtype
    assert max_rel_error(out.prefill, ref_p) < TOL
    assert max_rel_error(out.decode, ref_d) < TOL


# -- registry and availability -----------------------------------------------------------------------
def test_registry_lists_every_baseline_with_layouts():
    backends = list_backends()
    for name in FA_NAMES:
        assert backends[name].layouts == {"contiguous"}
    for name in FI_NAMES:
        assert backends[name].layouts == {"paged"}
    assert "hfuse" not in backends  # not expressible in Triton/Gluon here: nothing fake registered


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only reasons")
def test_unavailable_on_cpu_with_reason():
    for name in FA_NAMES + FI_NAMES:
        why = get_backend(name).unavailable_reason()
        assert why and "GPU only" in why and "CUDA" in why, (name, why)
    if fib.importlib.util.find_spec("flashinfer") is None:
        for name in FI_NAMES:
            why = get_backend(name).unavailable_reason()
            assert "flashinfer" in why and fib.INSTALL_HINT in why


def test_flashinfer_missing_or_broken_is_reported(monkeypatch, tmp_path):
    monkeypatch.setattr(fib.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(fib.importlib.util, "find_spec", lambda name: None)
    why = fib.flashinfer_availability()
    assert "CUDA" not in why and "flashinfer-python" in why and fib.INSTALL_HINT in why
    monkeypatch.undo()

    # Installed but broken (e.g. a missing dependency): the import error is the reason.
    (tmp_path / "flashinfer").mkdir()
    (tmp_path / "flashinfer" / "__init__.py").write_text("import pynvml_missing_for_test\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(fib.torch.cuda, "is_available", lambda: True)
    monkeypatch.delitem(sys.modules, "flashinfer", raising=False)
    fib._import_error.cache_clear()
    try:
        why = fib.flashinfer_availability()
        assert "pynvml_missing_for_test" in why and fib.INSTALL_HINT in why
        with pytest.raises(BackendUnavailable):
            fib._fi()
    finally:
        fib._import_error.cache_clear()
        sys.modules.pop("flashinfer", None)


def test_wrong_layout_is_refused():
    paged = make_batch(_spec(**MIXED, page_size=16))
    contig = make_batch(_spec(**MIXED))
    anywhere = dataclasses.replace(get_backend("fa2_serial"), availability=always_available)
    assert "contiguous" in anywhere.unavailable_reason(paged) and anywhere.unavailable_reason(contig) is None
    with pytest.raises(BackendUnavailable):
        get_backend("fa2_serial").prepare(paged)
    with pytest.raises(BackendUnavailable):
        get_backend("fi_serial").prepare(contig)


# -- FA2 wrappers against the CPU stand-in -------------------------------------------------------------
class _FakeStream:
    def __init__(self, name, log):
        self.name, self.log = name, log

    def wait_stream(self, other):
        self.log.append(("wait", self.name, other.name))


def _fake_cuda(log):
    main = _FakeStream("main", log)
    current = [main]
    made = []

    class _Ctx:
        def __init__(self, s):
            self.s = s

        def __enter__(self):
            current.append(self.s)
            log.append(("enter", self.s.name))

        def __exit__(self, *exc):
            current.pop()
            log.append(("exit", self.s.name))

    def stream_factory(device=None):
        made.append(_FakeStream(f"side{len(made)}", log))
        return made[-1]

    return SimpleNamespace(Stream=stream_factory, current_stream=lambda device=None: current[-1],
                           stream=_Ctx), current


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[1]}-{len(s[0]['prefill'])}p{len(s[0]['decode'])}d")
@pytest.mark.parametrize("name", FA_NAMES)
def test_fa2_wrappers_match_reference(name, shape, monkeypatch):
    parts, heads, dtype = shape
    calls, stream_log = [], []
    monkeypatch.setattr(tfa, "flash_varlen", fake_flash_varlen(calls))
    fake_cuda, current = _fake_cuda(stream_log)
    monkeypatch.setattr(tfa, "_cuda", fake_cuda)
    batch = make_batch(_spec(**parts, heads=heads, dtype=dtype), seed=torch.randint(0, 2**31, ()).item())
    run = get_backend(name).prepare(batch)
    assert calls == []  # prepare launches nothing
    _assert_matches_reference(batch, run())

    n_p, n_d = batch.spec.num_prefill, batch.spec.num_decode
    if name == "fa2_batched":
        assert calls == [dict(rows=batch.q_prefill.shape[0] + n_d, seqs=n_p + n_d, causal=True)]
    else:
        expect = ([dict(rows=batch.q_prefill.shape[0], seqs=n_p, causal=True)] if n_p else []) + \
                 ([dict(rows=n_d, seqs=n_d, causal=False)] if n_d else [])
        assert calls == expect
    if name == "fa2_streams":
        # Each side stream waits for main before its launch; main waits for both after; main is current again.
        assert stream_log == [("wait", "side0", "main"), ("enter", "side0"), ("exit", "side0"),
                              ("wait", "side1", "main"), ("enter", "side1"), ("exit", "side1"),
                              ("wait", "main", "side0"), ("wait", "main", "side1")]
        assert current[-1].name == "main"


# -- FlashInfer wrappers against the CPU stand-in ------------------------------------------------------
@pytest.fixture
def fake_fi(monkeypatch):
    log = []
    fake = make_fake_flashinfer(log)
    monkeypatch.setattr(fib, "_fi", lambda: fake)
    monkeypatch.setattr(fib, "_WORKSPACES", {})
    monkeypatch.setattr(fib, "num_sms", lambda device: H200_SMS)
    # Workspaces of hundreds of MB: sized, never touched by the stand-ins, so none is allocated.
    monkeypatch.setattr(fib, "_allocate", lambda n, device: torch.empty(n, dtype=torch.uint8, device="meta"))
    return log


@pytest.mark.parametrize("page_size", [16, 4])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[1]}-{len(s[0]['prefill'])}p{len(s[0]['decode'])}d")
@pytest.mark.parametrize("name", FI_NAMES)
def test_flashinfer_wrappers_match_reference(name, shape, page_size, fake_fi, monkeypatch):
    parts, heads, dtype = shape
    fa2 = BackendOptions(fi_prefill_backend="fa2")
    batch = make_batch(_spec(**parts, heads=heads, dtype=dtype, page_size=page_size),
                       seed=torch.randint(0, 2**31, ()).item())
    n_p, n_d = batch.spec.num_prefill, batch.spec.num_decode
    supported = {"fi_pod": n_p == 1 and n_d > 0, "fi_batch_pod": n_p > 0 and n_d > 0}.get(name, True)
    if not supported:
        with pytest.raises(BackendUnavailable, match="prefill"):
            get_backend(name).setup(batch, fa2)
        return
    run = get_backend(name).setup(batch, fa2)
    _assert_matches_reference(batch, run())
    if name == "fi_serial":
        assert fake_fi == [("prefill", "fa2")] * bool(n_p) + [("decode", True)] * bool(n_d)
        assert run.backend_config == {"prefill_backend": "fa2", "decode_tensor_cores": True}
    if name == "fi_batched":
        assert fake_fi == [("prefill", "fa2")]


def test_flashinfer_prefill_ragged_matches_reference(fake_fi):
    for parts, heads, dtype in SHAPES:
        batch = make_batch(_spec(**parts, heads=heads, dtype=dtype), seed=torch.randint(0, 2**31, ()).item())
        if not batch.spec.num_prefill:
            with pytest.raises(BackendUnavailable, match="no prefill"):
                get_backend("fi_prefill_ragged").setup(batch)
            continue
        out = get_backend("fi_prefill_ragged").setup(batch, BackendOptions(fi_prefill_backend="fa2"))()
        assert out.decode is None
        assert max_rel_error(out.prefill, reference(batch)[0]) < TOL


# The parameter lists of FlashInfer's wrapper methods in each release we run (scripts/flashinfer_api_snapshot.py
# reads them from the wheels' source): every call our backends make must bind to both.
FI_API = json.loads((Path(__file__).parent / "data" / "flashinfer_api.json").read_text())


def _signature(params: str) -> inspect.Signature:
    scope: dict = {}
    exec(f"def f{params}: pass", scope)     # noqa: S102 - a parameter list from the snapshot, defaults `...`
    return inspect.signature(scope["f"])


def _recording(fake, calls: list) -> SimpleNamespace:
    """Subclasses of the stand-ins that log the arguments of every __init__ / plan / run call."""
    def logged(cls_name, method):
        def call(self, *args, **kwargs):
            calls.append((cls_name, method.__name__, args, kwargs))
            return method(self, *args, **kwargs)
        return call
    return SimpleNamespace(**{name: type(name, (cls,), {m: logged(name, getattr(cls, m)) for m in ("__init__", "plan", "run")})
                              for name, cls in vars(fake).items()})


@pytest.mark.parametrize("version", sorted(FI_API))
def test_flashinfer_calls_bind_to_each_release(version, fake_fi, monkeypatch):
    """FlashInfer 0.6.6 (the pin) and 0.7.2: the same calls, positional and keyword, fit both APIs (0.7.2's
    decode plan() takes **kwargs and forwards them to _plan_impl: they are checked against that)."""
    calls = []
    monkeypatch.setattr(fib, "_fi", lambda: _recording(make_fake_flashinfer([]), calls))
    for parts in (MIXED, dict(prefill=[(23, 40)], decode=[33, 7])):      # fi_pod takes one chunk only
        for page_size in (16, None):
            batch = make_batch(_spec(**parts, page_size=page_size), seed=4)
            for name in FI_NAMES + ("fi_prefill_ragged",):
                backend = get_backend(name)
                if backend.unavailable_for(batch.spec) is None and not (name == "fi_pod" and parts is MIXED):
                    backend.setup(batch, BackendOptions(fi_prefill_backend="fa2"))()
    assert {c for c, *_ in calls} == set(FI_API[version]) and all(m in ("__init__", "plan", "run") for _, m, *_ in calls)
    for cls, method, args, kwargs in calls:
        api = FI_API[version][cls]
        _signature(api[method]).bind(None, *args, **kwargs)
        if method == "plan" and "_plan_impl" in api:
            _signature(api["_plan_impl"]).bind(None, *args, **kwargs)


def test_flashinfer_workspace_is_shared_grown_and_zeroed(monkeypatch):
    monkeypatch.setattr(fib, "_WORKSPACES", {})
    a = fib.workspace(torch.device("cpu"), 1024)
    assert a is fib.workspace("cpu", 512) and a.numel() == 1024 and a.dtype == torch.uint8 and not a.any()
    b = fib.workspace("cpu", 4096)
    assert b.numel() == 4096 and not b.any() and fib.workspace("cpu", 1024) is b


# The MQA batch that overflowed FlashInfer's fixed workspace (32 q heads over 1 KV head, chunk 512 over 2048 + 64 decodes of 2048, 16-token
# pages): its decodes alone took 270 MB of split-KV partials on the H200, past the fixed 256 MiB.
MQA_ISSUE = BatchSpec.build(32, 1, 128, prefill=[(512, 2048)], decode=[2048] * 64, page_size=16)


@pytest.mark.parametrize("name", ["fi_serial", "fi_batched", "fi_pod", "fi_batch_pod"])
def test_flashinfer_workspace_fits_the_mqa_batch(name, fake_fi):
    decode_pages = [2048 // 16] * 64
    assert fa2_plan_float_bytes([1] * 64, decode_pages, 32, 1, 128, 16) > 256 * 2**20   # the old size
    batch = make_batch(MQA_ISSUE, seed=0)
    get_backend(name).setup(batch, BackendOptions(fi_prefill_backend="fa2"))   # the stand-ins' plans check


def test_batch_attention_gets_the_workspace_its_plan_asks_for(fake_fi, monkeypatch):
    """BatchAttention's own 384 MiB overflowed on MHA batches (1.25 GB of holistic_partial_o, balance sweep,
    H200): its buffer is grown to what FlashInfer's error asks for and the plan repeated; other errors and a
    plan that keeps overflowing still raise."""
    batch = make_batch(MQA_ISSUE, seed=0)
    fake = fib._fi()
    monkeypatch.setattr(fake.BatchAttention, "need_bytes", 1_245_708_288)
    run = get_backend("fi_batch_attention").setup(batch)
    assert run is not None
    assert run.backend_config["workspace_grown"] and run.backend_config["float_workspace_mb"] * 2**20 >= 1_245_708_288
    w = fake.BatchAttention()
    got, grown = fib._plan_with_room(w, lambda: w.plan(torch.tensor([0, 1]), torch.tensor([0, 1]), None, torch.tensor([1]),
                                          4, 2, 64, 64, 16, sm_scale=1.0, q_data_type=torch.bfloat16,
                                          kv_data_type=torch.bfloat16))
    assert w.float_workspace_buffer.numel() >= 1_245_708_288 + w.used_bytes
    assert w.float_workspace_buffer.numel() % (2 * 2**20) == 0 and got == w.float_workspace_buffer.numel() and grown
    monkeypatch.setattr(fake.BatchAttention, "need_bytes", 0)      # fits: nothing grown, and the rows say so
    assert get_backend("fi_batch_attention").setup(batch).backend_config["workspace_grown"] is False

    def other():
        raise RuntimeError("an unrelated failure")
    with pytest.raises(RuntimeError, match="unrelated"):
        fib._plan_with_room(w, other)
    calls = []

    def always_full():
        calls.append(1)
        raise RuntimeError("... memory for holistic_partial_lse with size 10 and alignment 16, but only 0 bytes "
                           "available ...")
    with pytest.raises(RuntimeError, match="only 0 bytes"):
        fib._plan_with_room(w, always_full)
    assert len(calls) == fib.HOLISTIC_PLAN_TRIES

    def int_buffer_full():               # not the float buffer's: growing it cannot help, so no retry
        calls.append(2)
        raise RuntimeError("... memory for work_indptr with size 10 and alignment 16, but only 0 bytes available")
    with pytest.raises(RuntimeError, match="work_indptr"):
        fib._plan_with_room(w, int_buffer_full)
    assert calls.count(2) == 1


def test_float_workspace_bound_covers_flashinfers_planner():
    """float_workspace_bytes against the planner rewritten above, on ragged batches of every GQA ratio
    (MHA to MQA), head_dim 64/128, page sizes 1 (ragged) to 64, for GPUs of 78 to 148 SMs."""
    gen = torch.Generator().manual_seed(17)
    for hq, hkv in ((32, 32), (32, 8), (32, 4), (32, 1), (64, 1), (8, 1)):
        for d in (64, 128):
            for sms in (78, 132, 148):
                bound = fib.float_workspace_bytes(ModelHeads(hq, hkv, d), sms)
                for page in (1, 16, 64):
                    for _ in range(8):
                        n = int(torch.randint(1, 300, (), generator=gen))
                        qo = torch.randint(1, 3, (n,), generator=gen) ** torch.randint(0, 12, (n,), generator=gen)
                        kv_tokens = qo + torch.randint(0, 20000, (n,), generator=gen)
                        pages = (kv_tokens + page - 1) // page
                        need = fa2_plan_float_bytes(qo.tolist(), pages.tolist(), hq, hkv, d, page, sms)
                        assert need <= bound, (hq, hkv, d, sms, page, n)
    assert fib.float_workspace_bytes(ModelHeads(32, 8, 128), 132) == fib.MIN_WORKSPACE_BYTES
    two = fib.float_workspace_bytes(ModelHeads(32, 1, 128), 132, plans=2)
    assert two % (2 * 2**20) == 0 and two > fib.float_workspace_bytes(ModelHeads(32, 1, 128), 132)  # halves aligned


def test_prefill_backend_option_defaults_to_auto_and_is_checked():
    assert fib.prefill_backend(BackendOptions()) == "auto"
    with pytest.raises(ValueError, match="fi_prefill_backend='fa4'"):
        fib.prefill_backend(BackendOptions(fi_prefill_backend="fa4"))


def test_gpu_smoke_sweep_checks_every_baseline_and_skips_on_cpu(tmp_path):
    """The first-GPU-call check (conf/sweep/gpu_smoke.yaml, through the harness): on a CPU the GPU-only
    baselines give skipped rows saying so, our kernels say how to run them without a GPU."""
    from hydra import compose, initialize_config_dir

    from experiments.harness.points import expand_points
    from experiments.harness.sweep import SweepRefused, run_sweep
    conf = str(Path(__file__).resolve().parents[1] / "conf")
    with initialize_config_dir(config_dir=conf, version_base="1.3"):
        cfg = compose("attention", overrides=["sweep=gpu_smoke", "backend=baselines", f"results_dir={tmp_path}",
                                              "wandb.enabled=false", "progress=false"])
    points = expand_points(cfg.sweep, {m: cfg.models[m] for m in cfg.models})
    assert len(points) == 7
    mqa = [p.spec for p in points if p.spec.heads.num_kv_heads == 1]
    assert len(mqa) == 3 and MQA_ISSUE.kv_lens in [m.kv_lens for m in mqa]     # the overflowing batch is one
    if torch.cuda.is_available():
        return
    with pytest.raises(SweepRefused, match="sweep=gpu_smoke is GPU-only"):
        run_sweep(cfg)
    cfg.sweep.gpu_only = False                      # run anyway: every baseline says why it cannot
    cfg.cpu_max_kv_tokens = 10**6                   # (no batch is built: unavailable backends skip first)
    df = run_sweep(cfg)
    assert len(df) == 7 * len(cfg.backend.names) and (df.status == "skipped").all()
    assert df.reason.str.contains("GPU|CUDA|flashinfer").all()


def test_prepare_warms_a_kernel_once_per_specialisation(monkeypatch):
    """An engine prepares every iteration: the untimed warm-up launch runs only for a new specialisation."""
    import baselines.ours as ours
    monkeypatch.setattr(ours, "interpreting", lambda: False)
    monkeypatch.setattr(ours, "_WARMED", set())
    calls = []
    ours._warm_once(("k", 1), lambda: calls.append(1))
    ours._warm_once(("k", 1), lambda: calls.append(2))
    ours._warm_once(("k", 2), lambda: calls.append(3))
    assert calls == [1, 3]


# -- one-launch varlen baselines: FlashAttention-4 (fa_varlen) and vLLM's unified attention ------------
import baselines.flash_attn4 as fa4b  # noqa: E402
import baselines.vllm_triton as vub  # noqa: E402
from baselines.common import hybrid_q_source, joined_rows, varlen_layout  # noqa: E402

VARLEN_NAMES = ("fa_varlen", "vllm_unified")


def _varlen_keys(k, v, b, page_table, seqused_k, cu_seqlens_k):
    """Sequence b's keys and values as the varlen contract defines them (pages or cu_seqlens_k)."""
    if page_table is not None:
        n = int(seqused_k[b])
        pages = page_table[b, :math.ceil(n / k.shape[1])].long()
        return k[pages].flatten(0, 1)[:n], v[pages].flatten(0, 1)[:n]
    a, e = int(cu_seqlens_k[b]), int(cu_seqlens_k[b + 1])
    return k[a:e], v[a:e]


def _varlen_attention(q, k, v, cu_seqlens_q, max_seqlen_q, max_seqlen_k, page_table, seqused_k,
                      cu_seqlens_k, causal, scale):
    _check_indptr(cu_seqlens_q, q.shape[0])
    lq = cu_seqlens_q.diff().tolist()
    assert max_seqlen_q == max(lq), "max_seqlen_q sizes the grid: the exact maximum"
    for t in (cu_seqlens_q, seqused_k, page_table, cu_seqlens_k):
        assert t is None or (t.dtype == torch.int32 and t.stride(-1) == 1)
    out = torch.full_like(q, float("nan"))
    lens = []
    for b in range(len(lq)):
        kb, vb = _varlen_keys(k, v, b, page_table, seqused_k, cu_seqlens_k)
        lens.append(kb.shape[0])
        a = int(cu_seqlens_q[b])
        out[a:a + lq[b]] = _attend_rows(q[a:a + lq[b]], kb, vb, causal, scale)
    assert max_seqlen_k == max(lens)
    return out


def fake_flash_attn_cute(calls):
    """flash_attn.cute's flash_attn_varlen_func, from its docstring (paged: page_table + seqused_k, no
    cu_seqlens_k; contiguous: cu_seqlens_k), returning (out, lse)."""
    def flash_attn_varlen_func(q, k, v, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None,
                               max_seqlen_k=None, seqused_k=None, page_table=None, softmax_scale=None,
                               causal=False, num_splits=1):
        assert num_splits == 1, "sm_90 refuses num_splits > 1"
        assert (page_table is None) != (cu_seqlens_k is None), "page_table is not supported with cu_seqlens_k"
        assert q.is_contiguous() and q.dtype == k.dtype == v.dtype
        out = _varlen_attention(q, k, v, cu_seqlens_q, max_seqlen_q, max_seqlen_k, page_table, seqused_k,
                                cu_seqlens_k, causal, softmax_scale)
        calls.append(dict(rows=q.shape[0], seqs=cu_seqlens_q.numel() - 1, causal=causal,
                          paged=page_table is not None))
        return out, None
    return SimpleNamespace(flash_attn_varlen_func=flash_attn_varlen_func)


def fake_unified_attention(calls):
    """vLLM's unified_attention, from its signature and vLLM's TRITON_ATTN call: writes `out`."""
    def unified_attention(q, k, v, out, cu_seqlens_q, max_seqlen_q, seqused_k, max_seqlen_k, softmax_scale,
                          causal, window_size, block_table, softcap, q_descale, k_descale, v_descale,
                          seq_threshold_3D=None, num_par_softmax_segments=None, softmax_segm_output=None,
                          softmax_segm_max=None, softmax_segm_expsum=None):
        assert window_size == (-1, -1) and softcap == 0 and q_descale is k_descale is v_descale is None
        assert out.shape == q.shape and out.dtype == q.dtype and block_table.shape[0] == seqused_k.shape[0]
        hq, hkv, d = q.shape[1], k.shape[2], q.shape[2]
        assert seq_threshold_3D == 128 // hkv and num_par_softmax_segments == 16
        rows = softmax_segm_max.shape[0]
        assert softmax_segm_output.shape == (rows, hq, 16, triton_next_pow2(d)) and rows >= 1
        assert softmax_segm_max.shape == softmax_segm_expsum.shape == (rows, hq, 16)
        out.fill_(float("nan"))
        out.copy_(_varlen_attention(q, k, v, cu_seqlens_q, max_seqlen_q, max_seqlen_k, block_table, seqused_k,
                                    None, causal, softmax_scale))
        calls.append(dict(rows=q.shape[0], seqs=cu_seqlens_q.numel() - 1, causal=causal, paged=True))
    return unified_attention


def triton_next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


@pytest.fixture
def fake_varlen(monkeypatch):
    calls = []
    monkeypatch.setattr(fa4b, "_fa4", lambda: fake_flash_attn_cute(calls))
    monkeypatch.setattr(vub, "_unified_attention", lambda: fake_unified_attention(calls))
    return calls


def test_varlen_baselines_are_registered():
    backends = list_backends()
    assert backends["fa_varlen"].layouts == {"contiguous", "paged"}
    assert backends["vllm_unified"].layouts == {"paged"}
    for name in VARLEN_NAMES:
        assert backends[name].computes == {"prefill", "decode"}


def test_varlen_baselines_say_what_is_missing(monkeypatch, tmp_path):
    if not torch.cuda.is_available():
        for name, module in zip(VARLEN_NAMES, (fa4b, vub)):
            why = get_backend(name).unavailable_reason()
            assert why.startswith("GPU only") and "CUDA" in why, why
            if module._installed(module.DISTRIBUTION) is None:
                assert module.DISTRIBUTION in why and module.INSTALL_HINT in why
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(fa4b, "_installed", lambda d: None)
    monkeypatch.setattr(vub, "_installed", lambda d: None)
    for module, availability, seam in ((fa4b, fa4b.fa4_availability, fa4b._fa4),
                                       (vub, vub.vllm_availability, vub._unified_attention)):
        why = availability()
        assert "GPU only" not in why and module.DISTRIBUTION in why and module.INSTALL_HINT in why
        with pytest.raises(BackendUnavailable):
            seam()
    # Installed but not importable: the import error is the reason (FA4's missing cutlass: the PYTHONPATH hint).
    monkeypatch.setattr(fa4b, "_installed", lambda d: "4.0.0b36")
    (tmp_path / "flash_attn" / "cute").mkdir(parents=True)
    (tmp_path / "flash_attn" / "cute" / "__init__.py").write_text("import cutlass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("flash_attn", "flash_attn.cute", "cutlass"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    fa4b._import_error.cache_clear()
    try:
        why = fa4b.fa4_availability()
        assert "cutlass" in why and "dsl_packages" in why
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
        assert "sm_90" in fa4b.fa4_availability()
    finally:
        fa4b._import_error.cache_clear()
        for name in ("flash_attn", "flash_attn.cute"):
            sys.modules.pop(name, None)
    monkeypatch.setattr(vub, "_installed", lambda d: "0.34.0")
    monkeypatch.setattr(vub, "KERNEL_MODULES", ("no_such_vllm_for_test.ops",))
    vub._kernel_module.cache_clear()
    try:
        assert "no_such_vllm_for_test" in vub.vllm_availability()
    finally:
        vub._kernel_module.cache_clear()


@pytest.mark.parametrize("page_size", [16, 4, None])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[1]}-{len(s[0]['prefill'])}p{len(s[0]['decode'])}d")
def test_varlen_layout_maps_our_batch(shape, page_size):
    """The index tensors fa_varlen and vllm_unified hand their kernels, checked without the packages."""
    parts, heads, dtype = shape
    batch = make_batch(_spec(**parts, heads=heads, dtype=dtype, page_size=page_size), seed=1)
    lay = varlen_layout(batch)
    spec, n_p = batch.spec, batch.q_prefill.shape[0]
    chunk_ends = torch.tensor([0] + [c.chunk_len for c in spec.prefill_chunks]).cumsum(0).tolist()
    assert lay.cu_seqlens_q.tolist() == chunk_ends + [n_p + i + 1 for i in range(spec.num_decode)]
    assert lay.seqused_k.tolist() == list(spec.kv_lens) and lay.seqused_k.dtype == torch.int32
    assert lay.max_seqlen_q == max([c.chunk_len for c in spec.prefill_chunks] + [1] * bool(spec.num_decode))
    assert lay.max_seqlen_k == max(spec.kv_lens)
    assert (lay.page_table is None) == (page_size is None) != (lay.cu_seqlens_k is None)
    for s, n in enumerate(spec.kv_lens):       # every sequence's keys through the varlen indices
        k, v = _varlen_keys(batch.k_cache, batch.v_cache, s, lay.page_table, lay.seqused_k, lay.cu_seqlens_k)
        k_ref, v_ref = batch.sequence_kv(s)
        assert torch.equal(k, k_ref) and torch.equal(v, v_ref) and k.shape[0] == n


def test_hybrid_q_source_views_adjacent_queries_and_copies_others():
    q = torch.randn(7, 4, 64)
    batch = make_batch(_spec(**MIXED, page_size=16), seed=2)
    separate = hybrid_q_source(batch)()                # make_batch's q tensors are separate: one copy
    assert torch.equal(separate, torch.cat([batch.q_prefill, batch.q_decode]))
    assert separate.data_ptr() not in (batch.q_prefill.data_ptr(), batch.q_decode.data_ptr())
    # The serving engine's layout: both parts are slices of one q, re-pointed (Tensor.set_) every layer.
    batch.q_prefill = torch.empty(0).set_(q[:4])
    batch.q_decode = torch.empty(0).set_(q[4:])
    source = hybrid_q_source(batch)
    assert source().data_ptr() == q.data_ptr() and torch.equal(source(), q)
    q2 = torch.randn(7, 4, 64)
    batch.q_prefill.set_(q2[:4])
    batch.q_decode.set_(q2[4:])
    assert source().data_ptr() == q2.data_ptr() and torch.equal(source(), q2)
    assert joined_rows(q[:0], q[3:]).data_ptr() == q[3:].data_ptr() and joined_rows(q[:2], q[3:]) is None


@pytest.mark.parametrize("page_size", [16, 4, None])
@pytest.mark.parametrize("shape", SHAPES + [(dict(prefill=[(23, 40)], decode=[33, 7, 90]), (32, 1, 64), "bfloat16")],
                         ids=lambda s: f"{s[1]}-{len(s[0]['prefill'])}p{len(s[0]['decode'])}d")
@pytest.mark.parametrize("name", VARLEN_NAMES)
def test_varlen_baselines_match_reference(name, shape, page_size, fake_varlen):
    parts, heads, dtype = shape
    batch = make_batch(_spec(**parts, heads=heads, dtype=dtype, page_size=page_size),
                       seed=torch.randint(0, 2**31, ()).item())
    backend = get_backend(name)
    if page_size is None and name == "vllm_unified":
        assert "paged" in dataclasses.replace(backend, availability=always_available).unavailable_reason(batch)
        with pytest.raises(BackendUnavailable, match="paged"):
            backend.setup(batch)
        return
    run = backend.setup(batch)
    assert fake_varlen == []                            # prepare launches nothing
    _assert_matches_reference(batch, run())
    n_p, n_d = batch.spec.num_prefill, batch.spec.num_decode
    assert fake_varlen == [dict(rows=batch.q_prefill.shape[0] + n_d, seqs=n_p + n_d, causal=True,
                                paged=page_size is not None)]      # ONE launch for the whole batch
    assert run.backend_config["package"].startswith(("flash-attn-4", "vllm"))


@pytest.mark.parametrize("name", VARLEN_NAMES)
def test_varlen_baselines_serve_with_one_plan_per_iteration(name, fake_varlen):
    """In the serving engine the plan is made once an iteration and q re-pointed at every layer: the
    one-launch backends read a view of the engine's q (no stale prepare-time copy), so every layer's
    attention matches the reference without plan_per_layer."""
    from experiments.serving.engine import Engine
    from experiments.serving.kv_cache import PagedKVCache
    from experiments.serving.model import LlamaModel, ModelConfig
    from experiments.serving.scheduler import SchedulerConfig
    from experiments.serving.workload import LengthDist, WorkloadConfig, generate
    cfg = ModelConfig("tiny", hidden_size=64, num_layers=3, num_q_heads=4, num_kv_heads=2, head_dim=64,
                      intermediate_size=128, vocab_size=128, max_position=512)
    model = LlamaModel(cfg, dtype=torch.float32, device="cpu", seed=3)
    cache = PagedKVCache(cfg.num_layers, 32, 16, cfg.heads, torch.float32, "cpu", seed=3, fill=float("nan"))
    engine = Engine(model, cache, SchedulerConfig(24, max_num_seqs=4, watermark=0.0), verify=True)
    engine.backend = dataclasses.replace(get_backend(name), availability=always_available)
    specs = generate(WorkloadConfig(3, LengthDist("uniform", low=20, high=60), LengthDist("uniform", low=2, high=4),
                                    vocab_size=cfg.vocab_size, seed=3))
    run = engine.run(specs)
    assert any(i.num_prefill and i.num_decode for i in run.iterations)
    assert run.attn_err < 1e-4       # a q copied at prepare time would be layer 0's from layer 1 on
    assert len(fake_varlen) == cfg.num_layers * len(run.iterations)   # one launch a layer
