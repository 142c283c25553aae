"""The serving loop: schedule -> build the iteration's hybrid batch -> forward -> sample greedy -> update.

One iteration = one `IterationPlan` of the scheduler = one HybridBatch (prefill chunks first, then
decodes, exactly pod.batch's sequence order) over the paged KV cache. Its tokens are laid out as the
batch's queries are: rows 0..P_tokens-1 the prefill chunks packed in plan order, then one row per
decode. Index tensors are built on the host in one int32 buffer and copied to the device once.

Attention through the registry, plan reused across layers (as engines reuse a FlashInfer plan):
the backend's prepare(batch) runs ONCE per iteration, before the forward, on a HybridBatch whose
q/k/v tensors are our own tensor objects (aliasing a q-shaped scratch tensor and layer 0's pools);
at every layer these SAME tensor objects are re-pointed at that layer's q and KV pool with
`Tensor.set_` (no copy), so a run() reading the tensors it was handed computes that layer (our
Triton backends' prepare also launches the kernel once to compile/autotune: on the scratch q, its
output discarded). A backend whose prepare derives copies or views of q/k_cache/v_cache (e.g.
fi_batched concatenates q at prepare time) would compute stale queries: run those with
`plan_per_layer=True`, which calls prepare at every layer (correct, slower; plan cost is then timed).
`verify=True` checks every layer's attention against the fp32 reference (the warm-up does this, so
a stale plan shows up as a large `attn_err`).

Per layer, before attention, the new tokens' K/V are scattered into the layer's pages (the batch
model assumes the chunk's own K/V and the decode token's K/V are in the cache); a decode's
context_len counts its new token.

Timing: one host sync per iteration, on the event marking the iteration's end (after it the sampled
tokens, which the scheduler needs, are copied to the host without a further wait); none inside the
forward. On a GPU, CUDA events around each iteration's forward and each layer's attention run() give
the device time spent, read after that sync (prepare/plan time
is inside the iteration's forward time, not in attention time). The span between the first and
the last layer's attention start gives one layer's time (`layer_ms`): what cutting layers removes
(metrics.py scales a cut run to the full model with it).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from pod.batch import SUPPORTED_DTYPES, BatchSpec, HybridBatch, PrefillChunk
from pod.reference import max_rel_error, reference
from baselines.registry import DEFAULT_OPTIONS, BackendOptions, get_backend
from experiments.serving.kv_cache import PagedKVCache
from experiments.serving.model import LlamaModel
from experiments.serving.scheduler import IterationPlan, Request, Scheduler, SchedulerConfig
from experiments.serving.workload import RequestSpec

_ALIGN = 4  # int32 words: each index tensor starts 16-byte aligned inside the packed buffer


def _dtype_label(dtype: torch.dtype) -> str:
    """BatchSpec's dtype label. An fp32 model (CPU tests) is labelled bfloat16: the label is only
    metadata for the backends that read it; the reference backend works on the tensors' dtype."""
    for name, dt in SUPPORTED_DTYPES.items():
        if dt == dtype:
            return name
    return "bfloat16"


@dataclass
class IterationInputs:
    batch: HybridBatch          # q/k/v tensors are placeholders until IterationAttention binds them
    tokens: torch.Tensor        # [T] int32
    positions: torch.Tensor     # [T] int32
    slots: torch.Tensor         # [T] int64 rows of a layer's pool flattened to [pages*page_size, ...]
    sample_rows: torch.Tensor   # [S] int64 rows whose logits are sampled


def _page_array(r: Request) -> np.ndarray:
    """r.pages as int32 numpy, cached on the request: pages are only appended to (a preempted or
    finished request gets a new list), so only the new tail is converted. Keeps the per-iteration
    host work O(new pages) instead of O(all pages) in Python."""
    cached = r.__dict__.get("_pages_np")
    if cached is None or cached[0] is not r.pages or cached[1].shape[0] > len(r.pages):
        arr = np.asarray(r.pages, dtype=np.int32)
    elif cached[1].shape[0] < len(r.pages):
        arr = np.concatenate([cached[1], np.asarray(r.pages[cached[1].shape[0]:], dtype=np.int32)])
    else:
        return cached[1]
    r.__dict__["_pages_np"] = (r.pages, arr)
    return arr


def build_iteration(plan: IterationPlan, page_size: int, model_dtype: torch.dtype, heads,
                    device: torch.device) -> IterationInputs:
    prefills, decodes = plan.prefills, plan.decodes
    spec = BatchSpec(heads=heads,
                     prefill_chunks=tuple(PrefillChunk(c.length, c.start) for c in prefills),
                     decode_context_lens=tuple(r.num_computed + 1 for r in decodes),
                     dtype=_dtype_label(model_dtype), page_size=page_size)
    chunk_lens = np.array([c.length for c in prefills], dtype=np.int32)
    num_seqs = len(prefills) + len(decodes)
    tokens = np.array([t for c in prefills for t in c.request.tokens[c.start:c.start + c.length]]
                      + [r.tokens[r.num_computed] for r in decodes], dtype=np.int32)
    positions = np.concatenate([np.arange(c.start, c.start + c.length, dtype=np.int32) for c in prefills]
                               + [np.array([r.num_computed for r in decodes], dtype=np.int32)])
    seq_of_token = np.concatenate([np.repeat(np.arange(len(prefills), dtype=np.int32), chunk_lens),
                                   np.arange(len(prefills), num_seqs, dtype=np.int32)])
    q_indptr = np.zeros(len(prefills) + 1, dtype=np.int32)
    np.cumsum(chunk_lens, out=q_indptr[1:])
    kv_lens = np.array(spec.kv_lens, dtype=np.int32)
    n_pages = (kv_lens + page_size - 1) // page_size
    # Width rounded up to 16 pages, as an engine's fixed-width block table would be: its row stride keeps
    # one divisibility class, so no kernel specialised on it recompiles as contexts grow.
    block_table = np.zeros((num_seqs, -(-int(n_pages.max()) // 16) * 16), dtype=np.int32)
    for i, r in enumerate([c.request for c in prefills] + decodes):
        block_table[i, :n_pages[i]] = _page_array(r)[:n_pages[i]]
    page_indptr = np.zeros(num_seqs + 1, dtype=np.int32)
    np.cumsum(n_pages, out=page_indptr[1:])
    page_indices = block_table[np.arange(block_table.shape[1])[None, :] < n_pages[:, None]]  # row-major
    last_page_len = kv_lens - (n_pages - 1) * page_size
    sample_rows = np.array([row for _, row in plan.sampling()], dtype=np.int32)

    # One host buffer, one copy to the device; each field a 16-byte-aligned view of it.
    parts = [tokens, positions, seq_of_token, q_indptr, kv_lens, block_table.ravel(), page_indptr,
             page_indices, last_page_len, sample_rows]
    bounds, at = [], 0
    for p in parts:
        bounds.append((at, at + p.size))
        at += p.size + (-p.size % _ALIGN)
    host = np.zeros(at, dtype=np.int32)
    for (a, b), p in zip(bounds, parts):
        host[a:b] = p
    # `host` is pageable: the driver stages it before the copy call returns, so it may be freed
    # right after. (A pinned buffer would make the copy truly asynchronous but would have to live
    # until the copy ends: not worth it for a few KB an iteration.)
    buf = torch.from_numpy(host).to(device, non_blocking=True)
    (tok, pos, seq, qi, kl, bt, pi, pidx, lpl, srows) = (buf[a:b] for a, b in bounds)
    bt = bt.view(block_table.shape)
    # Slot of each new token: its page (block table row of its sequence) * page_size + row in page.
    pos64 = pos.long()
    slots = bt[seq.long(), pos64 // page_size].long() * page_size + pos64 % page_size

    placeholder = torch.empty(0, dtype=model_dtype, device=device)
    batch = HybridBatch(spec=spec, q_prefill=placeholder, q_decode=placeholder, k_cache=placeholder,
                        v_cache=placeholder, q_indptr=qi, kv_lens=kl, block_table=bt,
                        page_indptr=pi, page_indices=pidx, last_page_len=lpl,
                        sm_scale=1.0 / math.sqrt(heads.head_dim))
    return IterationInputs(batch, tok, pos, slots, srows.long())


class _Marks:
    """Points on the device timeline: CUDA events on a GPU, perf_counter on the CPU (where every op is
    synchronous). A CUDA event's elapsed time can be read only once both events have completed
    (cudaEventElapsedTime): `wait(last)` blocks the host until the stream has passed the last mark,
    and with it every earlier one of the same stream. `ms` is valid after that wait. Nothing else
    syncs reliably: the sampled tokens' copy to the host does not when no row is sampled (an
    iteration of prefill chunks that completes no prompt copies nothing)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._pool: list = []
        self._used = 0

    def reset(self) -> None:
        self._used = 0

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        if self._used == len(self._pool):
            self._pool.append(torch.cuda.Event(enable_timing=True))
        ev = self._pool[self._used]
        self._used += 1
        ev.record()
        return ev

    def wait(self, mark) -> None:
        """Block the host until the device has passed `mark` (a no-op on the CPU)."""
        if self.cuda:
            mark.synchronize()

    def ms(self, a, b) -> float:
        return a.elapsed_time(b) if self.cuda else (b - a) * 1e3


class IterationAttention:
    """The `attention(layer, q, k, v)` the model calls during one iteration (see module doc).

    The batch's q_prefill/q_decode/k_cache/v_cache are tensor objects of our own, made here to alias
    a q-shaped scratch tensor and layer 0's pools, then re-pointed (Tensor.set_) at each layer's
    tensors; the backend's prepare (the plan) runs here, before the forward, as engines plan before
    the layers run (so e.g. FlashInfer's plan-time host sync finds the GPU idle)."""

    def __init__(self, inputs: IterationInputs, cache: PagedKVCache, backend, plan_per_layer: bool,
                 verify: bool, marks: _Marks, q_dtype: torch.dtype, options: BackendOptions = DEFAULT_OPTIONS):
        self.inputs, self.cache, self.backend, self.options = inputs, cache, backend, options
        self.plan_per_layer, self.verify, self.marks = plan_per_layer, verify, marks
        self.intervals: list[tuple] = []       # (start, end) marks of every run()
        self.plan_intervals: list[tuple] = []  # (start, end) marks of every prepare()
        self.max_err = 0.0
        b = inputs.batch
        h, n_p = b.spec.heads, b.spec.num_prefill_tokens
        device = inputs.tokens.device
        q = torch.empty(inputs.tokens.shape[0], h.num_q_heads, h.head_dim, dtype=q_dtype, device=device)
        k_pool, v_pool = cache.layer(0)
        b.q_prefill = torch.empty(0, dtype=q_dtype, device=device).set_(q[:n_p])
        b.q_decode = torch.empty(0, dtype=q_dtype, device=device).set_(q[n_p:])
        b.k_cache = torch.empty(0, dtype=k_pool.dtype, device=device).set_(k_pool)
        b.v_cache = torch.empty(0, dtype=v_pool.dtype, device=device).set_(v_pool)
        self.run = None if plan_per_layer else self._prepare()
        self.backend_config = self._config()

    def _prepare(self):
        start = self.marks.mark()
        run = self.backend.setup(self.inputs.batch, self.options)
        self.plan_intervals.append((start, self.marks.mark()))
        return run

    def _config(self) -> dict:
        return dict(getattr(self.run, "backend_config", None) or {})

    def _bind(self, layer: int, q: torch.Tensor) -> None:
        b = self.inputs.batch
        n_p = b.spec.num_prefill_tokens
        k_pool, v_pool = self.cache.layer(layer)
        b.q_prefill.set_(q[:n_p])
        b.q_decode.set_(q[n_p:])
        b.k_cache.set_(k_pool)
        b.v_cache.set_(v_pool)

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        self.cache.write(layer, self.inputs.slots, k, v)      # the new tokens' K/V first
        self._bind(layer, q)
        if self.plan_per_layer:
            self.run = self._prepare()
            self.backend_config = self._config()
        start = self.marks.mark()
        out = self.run()
        self.intervals.append((start, self.marks.mark()))
        parts = [t for t in out if t is not None and t.shape[0]]   # a part may be empty (or None)
        o = parts[0] if len(parts) == 1 else torch.cat(parts)
        if self.verify:
            ref_p, ref_d = reference(self.inputs.batch)
            self.max_err = max(self.max_err, max_rel_error(out.prefill, ref_p),
                               max_rel_error(out.decode, ref_d))
        return o


def _layer_period_ms(marks: _Marks, intervals: list[tuple]) -> float:
    """Device time of one decoder layer in this iteration: the span between the starts of the first
    and the last layer's attention covers (layers - 1) whole layers (attention, projections, MLP, norms,
    KV writes), so the embedding, LM head and sampling are left out. What a layer cut removes."""
    if len(intervals) < 2:
        return float("nan")
    return marks.ms(intervals[0][0], intervals[-1][0]) / (len(intervals) - 1)


@dataclass
class IterationStats:
    num_prefill: int
    num_prefill_tokens: int
    num_decode: int
    forward_ms: float       # build + plan + forward + sampling, device time
    attention_ms: float     # the backend's run() calls, all layers
    plan_ms: float          # the backend's prepare() calls
    end_s: float
    layer_ms: float = float("nan")   # one decoder layer: (start of the last layer's attention - start of
                                     # the first's) / (layers - 1), device time; NaN with one layer
    start_s: float = 0.0             # wall clock when the iteration was scheduled (end_s - start_s: busy)


@dataclass
class EngineRun:
    requests: list[Request]
    iterations: list[IterationStats]
    makespan_s: float
    num_preemptions: int
    attn_err: float | None = None
    backend_config: dict = field(default_factory=dict)


class Engine:
    def __init__(self, model: LlamaModel, cache: PagedKVCache, scheduler_config: SchedulerConfig,
                 backend: str = "reference", plan_per_layer: bool = False, verify: bool = False,
                 record_logits: bool = False, options: BackendOptions = DEFAULT_OPTIONS):
        self.model, self.cache, self.scheduler_config = model, cache, scheduler_config
        self.options = options
        self.backend = get_backend(backend)
        why = self.backend.availability()
        if why is not None:
            raise RuntimeError(f"backend {backend!r} is unavailable: {why}")
        if "paged" not in self.backend.layouts or self.backend.computes != {"prefill", "decode"}:
            raise RuntimeError(f"backend {backend!r} cannot serve: it supports "
                               f"{sorted(self.backend.layouts)} KV and computes {sorted(self.backend.computes)}; the engine needs paged KV "
                               f"and both prefill and decode")
        self.plan_per_layer, self.verify, self.record_logits = plan_per_layer, verify, record_logits
        self.device = model.device
        self.marks = _Marks(self.device)
        self.logits: dict[int, list[torch.Tensor]] = {}   # request id -> fp32 logits per sampled token

    def step(self, plan: IterationPlan) -> tuple[list[int], IterationStats, IterationAttention]:
        """Run one iteration's forward and sample; returns the sampled tokens (host ints)."""
        self.marks.reset()
        t_start = self.marks.mark()
        inputs = build_iteration(plan, self.cache.page_size, self.model.dtype, self.model.cfg.heads,
                                 self.device)
        attention = IterationAttention(inputs, self.cache, self.backend, self.plan_per_layer,
                                       self.verify, self.marks, self.model.dtype, self.options)
        hidden = self.model(inputs.tokens, inputs.positions, attention)
        logits = self.model.logits(hidden[inputs.sample_rows])
        next_tokens = logits.argmax(dim=-1)
        t_end = self.marks.mark()
        self.marks.wait(t_end)                         # the iteration's one host sync
        sampled = next_tokens.tolist()
        if self.record_logits:
            for (r, _), row in zip(plan.sampling(), logits.cpu()):
                self.logits.setdefault(r.request_id, []).append(row)
        stats = IterationStats(
            num_prefill=len(plan.prefills), num_prefill_tokens=sum(c.length for c in plan.prefills),
            num_decode=len(plan.decodes), forward_ms=self.marks.ms(t_start, t_end),
            attention_ms=sum(self.marks.ms(a, b) for a, b in attention.intervals),
            plan_ms=sum(self.marks.ms(a, b) for a, b in attention.plan_intervals), end_s=0.0,
            layer_ms=_layer_period_ms(self.marks, attention.intervals))
        return sampled, stats, attention

    def run(self, specs: list[RequestSpec], online: bool = False) -> EngineRun:
        """Serve `specs` to completion. Offline: all requests are queued at t = 0. Online: each is
        queued when the wall clock passes its arrival_s (the engine idles until the next one)."""
        scheduler = Scheduler(self.scheduler_config, self.cache.allocator, self.cache.page_size)
        max_len = max(len(s.prompt) + s.output_len for s in specs)
        if max_len > self.model.cfg.max_position:
            raise ValueError(f"a request needs {max_len} positions; the model's RoPE table has "
                             f"{self.model.cfg.max_position} (ModelConfig.max_position)")
        pending = sorted(specs, key=lambda s: s.arrival_s)
        requests = [Request.from_spec(s) for s in pending]
        if not online:
            for r in requests:
                scheduler.add(r)
            requests_iter = iter(())
        else:
            requests_iter = iter(requests)
        nxt = next(requests_iter, None)
        iterations, attn_err, backend_config = [], 0.0, {}
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        while nxt is not None or scheduler.has_work():
            now = time.perf_counter() - t0
            while nxt is not None and nxt.spec.arrival_s <= now:
                scheduler.add(nxt)
                nxt = next(requests_iter, None)
            if not scheduler.has_work():
                time.sleep(max(0.0, nxt.spec.arrival_s - now))
                continue
            start_s = time.perf_counter() - t0
            plan = scheduler.schedule()
            if plan.empty:
                raise RuntimeError("the scheduler produced an empty iteration with work pending "
                                   "(a request cannot be admitted)")
            sampled, stats, attention = self.step(plan)
            stats.end_s = time.perf_counter() - t0
            stats.start_s = start_s
            scheduler.complete(plan, sampled, stats.end_s)
            iterations.append(stats)
            attn_err = max(attn_err, attention.max_err)
            backend_config = attention.backend_config or backend_config
        makespan = max(r.finish_s for r in requests)
        return EngineRun(requests=requests, iterations=iterations, makespan_s=makespan,
                         num_preemptions=scheduler.num_preemptions,
                         attn_err=attn_err if self.verify else None, backend_config=backend_config)
