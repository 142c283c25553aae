"""End-to-end serving slice on the CPU: tiny Llama, paged cache, Sarathi-style scheduler, the engine.

The central check: the logits the engine samples from, for every request at every step, match a
plain full forward of that request's tokens (no cache, causal attention) - with chunked prefills
over several iterations, several chunks per iteration, decodes batched with them, pages handed out
in random order and the unused cache poisoned with NaN.
"""
from __future__ import annotations

import csv
import dataclasses
import math
import random
import re
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from pod.reference import reference
from baselines.registry import AttentionOutput, Backend, get_backend
from experiments.serving.engine import Engine, _Marks
from experiments.serving.experiment import model_config, serve
from experiments.serving.kv_cache import PageAllocator, PagedKVCache, pages_for
from experiments.harness.schema import SERVING_COLUMNS
from experiments.serving.model import LlamaModel, ModelConfig
from experiments.serving.scheduler import Request, Scheduler, SchedulerConfig
from experiments.serving.workload import LengthDist, RequestSpec, WorkloadConfig, generate

CONF = str(Path(__file__).resolve().parents[1] / "conf")
TINY = ModelConfig("tiny_llama", hidden_size=64, num_layers=2, num_q_heads=4, num_kv_heads=2, head_dim=64,
                   intermediate_size=128, vocab_size=128, max_position=1024)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_requests(n: int, seed: int, low=20, high=90, out_low=3, out_high=9) -> list[RequestSpec]:
    return generate(WorkloadConfig(n, LengthDist("uniform", low=low, high=high),
                                   LengthDist("uniform", low=out_low, high=out_high),
                                   vocab_size=TINY.vocab_size, seed=seed))


def chunked_requests(seed: int, chunk_size: int) -> list[RequestSpec]:
    """tiny_requests(5, ...) with at least one prompt longer than two chunks: 5 prompts of 20-90 tokens
    all fit in two chunks of 24 for about 1 seed in 150, so such a draw is replaced by the next seed's."""
    specs = tiny_requests(5, seed)
    while max(len(r.prompt) for r in specs) <= 2 * chunk_size:
        seed += 1
        specs = tiny_requests(5, seed)
    return specs


def make_engine(seed: int, chunk_size: int, num_pages: int = 64, page_size: int = 16, **kw):
    model = LlamaModel(TINY, dtype=torch.float32, device="cpu", seed=seed)
    cache = PagedKVCache(TINY.num_layers, num_pages, page_size, TINY.heads, torch.float32, "cpu",
                         seed=seed, fill=float("nan"))
    return Engine(model, cache, SchedulerConfig(chunk_size, max_num_seqs=8, watermark=0.0),
                  backend="reference", record_logits=True, **kw)


def assert_matches_full_forward(engine: Engine, run) -> None:
    for r in run.requests:
        assert len(r.output) == r.spec.output_len
        tokens = torch.tensor(list(r.spec.prompt) + r.output[:-1])
        full = engine.model.full_forward(tokens)[len(r.spec.prompt) - 1:]   # the sampled positions
        got = torch.stack(engine.logits[r.request_id])
        assert got.shape == full.shape
        torch.testing.assert_close(got, full, rtol=1e-4, atol=1e-4)
        # Greedy: each output token is the argmax (up to fp32 noise on near-ties of two logits).
        chosen = full.gather(1, torch.tensor(r.output)[:, None])[:, 0]
        assert (chosen >= full.max(-1).values - 1e-4).all()


# -- the engine against a cache-free forward ------------------------------------------------------
@pytest.mark.parametrize("plan_per_layer", [False, True])
def test_engine_logits_match_full_forward(plan_per_layer):
    seed = random.randrange(1 << 30)
    engine = make_engine(seed, chunk_size=24, plan_per_layer=plan_per_layer, verify=True)
    specs = chunked_requests(seed, 24)
    run = engine.run(specs)
    its = run.iterations
    # The schedule exercised what it must: prompts chunked over several iterations (a prompt of over two
    # chunks: chunked_requests), decodes batched with prefill chunks, several chunks in one iteration, the
    # budget never exceeded.
    assert sum(i.num_prefill_tokens > 0 for i in its) > 2
    assert any(i.num_prefill and i.num_decode for i in its)
    assert any(i.num_prefill > 1 for i in its)
    assert all(i.num_prefill_tokens + i.num_decode <= 24 for i in its)
    assert run.attn_err == 0.0
    assert_matches_full_forward(engine, run)
    assert engine.cache.allocator.num_free == engine.cache.num_pages


def test_engine_preempts_and_recomputes_correctly():
    """A pool too small for all requests' outputs: decodes preempt the newest request, which later
    re-prefills prompt + generated tokens; outputs still match the full forward."""
    seed = random.randrange(1 << 30)
    engine = make_engine(seed, chunk_size=40, num_pages=12, page_size=8)
    specs = tiny_requests(4, seed, low=30, high=40, out_low=20, out_high=24)
    run = engine.run(specs)
    assert run.num_preemptions > 0
    assert_matches_full_forward(engine, run)


def _capturing_reference(batch):
    """Like fi_serial: holds the batch's tensor OBJECTS captured at prepare time."""
    frozen = dataclasses.replace(batch)

    def run():
        p, d = reference(frozen)
        return AttentionOutput(p.to(frozen.q_prefill.dtype), d.to(frozen.q_decode.dtype))
    return run


def _copying_reference(batch):
    """Like fi_batched: copies q at prepare time, so a reused plan recomputes layer 0's queries."""
    frozen = dataclasses.replace(batch, q_prefill=batch.q_prefill.clone(), q_decode=batch.q_decode.clone())
    return _capturing_reference(frozen)


def _backend(prepare) -> Backend:
    ref = get_backend("reference")
    return dataclasses.replace(ref, name=prepare.__name__, prepare=prepare)


def test_plan_reuse_rebinds_tensors_and_verify_catches_stale_plans():
    seed = random.randrange(1 << 30)
    specs = tiny_requests(3, seed)
    # A backend holding the tensor objects it was prepared with follows every layer (Tensor.set_).
    engine = make_engine(seed, chunk_size=24, verify=True)
    engine.backend = _backend(_capturing_reference)
    run = engine.run(specs)
    assert run.attn_err == 0.0
    assert_matches_full_forward(engine, run)
    # One that copies q at prepare time is wrong from layer 1 on: verify reports it ...
    engine = make_engine(seed, chunk_size=24, verify=True)
    engine.backend = _backend(_copying_reference)
    assert engine.run(specs).attn_err > 0.1
    # ... and plan_per_layer makes it correct.
    engine = make_engine(seed, chunk_size=24, verify=True, plan_per_layer=True)
    engine.backend = _backend(_copying_reference)
    run = engine.run(specs)
    assert run.attn_err == 0.0
    assert_matches_full_forward(engine, run)


class _FakeCudaStream:
    """The completion rule of CUDA events on one stream, on the CPU: an event is complete once the host
    has synchronized on it or on a later event of the stream (nothing completes on its own)."""

    def __init__(self):
        self.recorded, self.completed = 0, 0


class _FakeCudaEvent:
    stream: _FakeCudaStream

    def __init__(self, enable_timing: bool = False):
        assert enable_timing, "elapsed_time needs enable_timing=True"
        self.seq, self.t = None, None

    def record(self, stream=None):
        self.stream.recorded += 1
        self.seq, self.t = self.stream.recorded, time.perf_counter()

    def synchronize(self):
        self.stream.completed = max(self.stream.completed, self.seq)

    def query(self) -> bool:
        return self.seq is not None and self.seq <= self.stream.completed

    def elapsed_time(self, end: "_FakeCudaEvent") -> float:
        if self.seq is None or end.seq is None:
            raise RuntimeError("Both events must be recorded before calculating elapsed time.")
        if not (self.query() and end.query()):
            raise RuntimeError("Both events must be completed before calculating elapsed time.")
        return (end.t - self.t) * 1e3


def test_engine_reads_cuda_event_times_only_after_they_complete(monkeypatch):
    """The GPU timing path on the CPU: events that complete only when the host syncs on them. An
    iteration whose prefill chunk completes no prompt samples no token, so copying its (empty) sampled
    tokens to the host is no sync; the engine must wait on its last event before reading times."""
    seed = random.randrange(1 << 30)
    monkeypatch.setattr(_FakeCudaEvent, "stream", _FakeCudaStream(), raising=False)
    monkeypatch.setattr(torch.cuda, "Event", _FakeCudaEvent)
    engine = make_engine(seed, chunk_size=16)
    engine.marks = _Marks(torch.device("cuda"))           # CUDA events; everything else stays on the CPU
    specs = tiny_requests(2, seed, low=40, high=60)       # prompts of 3-4 chunks: iterations sample nothing
    run = engine.run(specs)
    assert any(i.num_decode == 0 and i.num_prefill_tokens == 16 for i in run.iterations)
    for i in run.iterations:
        assert 0.0 <= i.attention_ms <= i.forward_ms and 0.0 <= i.plan_ms <= i.forward_ms
        assert math.isfinite(i.layer_ms) and i.layer_ms >= 0.0
    assert_matches_full_forward(engine, run)


# -- scheduler invariants ---------------------------------------------------------------------------
@pytest.mark.parametrize("num_pages,lengths", [
    (10, (30, 40, 18, 24)),   # any two requests outgrow the pool: preemption is certain
    (40, (1, 60, 1, 20)),
])
def test_scheduler_invariants(num_pages, lengths):
    seed = random.randrange(1 << 30)
    page_size, cfg = 8, SchedulerConfig(chunk_size=32, max_num_seqs=6, watermark=0.05)
    alloc = PageAllocator(num_pages, seed)
    sched = Scheduler(cfg, alloc, page_size)
    specs = tiny_requests(12, seed, *lengths)
    reqs = [Request.from_spec(s) for s in specs]
    for r in reqs:
        sched.add(r)
    rng = random.Random(seed)
    for _ in range(10_000):
        if not sched.has_work():
            break
        free_before = alloc.num_free
        plan = sched.schedule()
        assert not plan.empty
        assert plan.num_tokens <= cfg.chunk_size
        assert len(sched.running) <= cfg.max_num_seqs
        held = [p for r in sched.running for p in r.pages]
        assert len(held) == len(set(held)) and len(held) + alloc.num_free == num_pages
        for c in plan.prefills:
            assert c.start == c.request.num_computed and c.length >= 1
            assert len(c.request.pages) >= pages_for(c.start + c.length, page_size)
        for r in plan.decodes:
            assert r.in_decode and len(r.pages) >= pages_for(r.num_computed + 1, page_size)
        admitted = [c.request for c in plan.prefills if c.start == 0]
        if admitted and plan.decodes:       # admission kept the watermark free
            assert free_before >= sum(len(r.pages) for r in admitted)
        assert len({id(r) for r in [c.request for c in plan.prefills] + plan.decodes}) == \
            len(plan.prefills) + len(plan.decodes)
        sched.complete(plan, [rng.randrange(128) for _ in plan.sampling()], 0.0)
    else:
        pytest.fail("the scheduler did not finish")
    assert all(len(r.output) == r.spec.output_len and r.finish_s is not None for r in reqs)
    assert all(r.tokens == list(r.spec.prompt) + r.output for r in reqs)
    assert alloc.num_free == num_pages
    if num_pages == 10:
        assert sched.num_preemptions > 0


def test_scheduler_rejects_request_larger_than_cache():
    sched = Scheduler(SchedulerConfig(chunk_size=16), PageAllocator(4), page_size=8)
    with pytest.raises(ValueError, match="KV pages"):
        sched.add(Request.from_spec(RequestSpec(0, 0.0, tuple(range(30)), 5)))


# -- workload ---------------------------------------------------------------------------------------
def test_workload_seeded_and_distributed():
    def wl(seed, qps=None, kind="lognormal"):
        dist = {"fixed": LengthDist("fixed", value=7), "uniform": LengthDist("uniform", low=5, high=9),
                "lognormal": LengthDist("lognormal", median=20, sigma=1.0, low=4, high=64)}[kind]
        return WorkloadConfig(400, dist, LengthDist("uniform", low=1, high=3), vocab_size=50,
                              qps=qps, seed=seed)
    assert generate(wl(3)) == generate(wl(3))
    assert generate(wl(3)) != generate(wl(4))
    for kind, lo, hi in (("fixed", 7, 7), ("uniform", 5, 9), ("lognormal", 4, 64)):
        reqs = generate(wl(1, kind=kind))
        lens = [len(r.prompt) for r in reqs]
        assert min(lens) >= lo and max(lens) <= hi
        assert all(0 <= t < 50 for r in reqs for t in r.prompt)
        assert all(1 <= r.output_len <= 3 for r in reqs)
        if kind != "fixed":
            assert len(set(lens)) > 3
    lens = sorted(len(r.prompt) for r in generate(wl(1)))
    assert 15 <= lens[len(lens) // 2] <= 26                     # lognormal median ~ 20
    assert all(r.arrival_s == 0.0 for r in generate(wl(1)))     # offline
    arr = [r.arrival_s for r in generate(wl(1, qps=10.0))]
    assert arr == sorted(arr) and arr[0] > 0
    assert 0.08 < arr[-1] / len(arr) < 0.12                      # Poisson: mean gap 1/qps
    with pytest.raises(ValueError, match="kind"):
        LengthDist("zipf")
    with pytest.raises(ValueError, match="low/high"):
        LengthDist("uniform", low=9, high=5)


# -- configs and the experiment ------------------------------------------------------------------
def compose_serving(*overrides: str):
    with initialize_config_dir(version_base="1.3", config_dir=CONF):
        return compose("serving", overrides=list(overrides))


@pytest.mark.parametrize("name,params", [("llama3_8b", 8_030_261_248), ("llama2_7b", 6_738_415_616),
                                         ("yi_6b", 6_061_035_520)])
def test_model_configs_have_published_shapes(name, params):
    cfg = model_config(compose_serving(f"serving/model={name}", "num_layers=null"))
    assert cfg.num_parameters() == params          # the published parameter counts, exactly
    assert cfg.head_dim == 128 and cfg.num_q_heads == 32


@pytest.mark.parametrize("mode", ["offline", "online"])
def test_experiment_writes_a_row(tmp_path, mode):
    cfg = compose_serving("serving/model=tiny_llama", "serving/workload=tiny", "serving/scheduler=tiny",
                          "device=cpu", "dtype=float32", "num_layers=2", "num_requests=4", "num_pages=64",
                          "backends=[reference]", f"mode={mode}", "qps=200", f"out_dir={tmp_path}",
                          "sweep_name=smoke")
    rows = serve(cfg)
    with open(tmp_path / "smoke" / "cpu.csv") as f:
        table = list(csv.DictReader(f))
    assert len(rows) == len(table) == 1
    row, saved = rows[0], table[0]
    assert tuple(saved) == SERVING_COLUMNS
    assert row["status"] == "ok", row["reason"]
    assert saved["backend"] == "reference" and saved["mode"] == mode and saved["model"] == "tiny_llama"
    assert saved["sweep"] == "smoke"
    assert 0 < row["iteration_p50_ms"] <= row["iteration_max_ms"]
    assert row["num_requests"] == 4 and row["chunk_size"] == 32 and row["iterations"] > 0
    assert row["requests_per_s"] > 0 and row["tokens_per_s"] > row["requests_per_s"]
    assert 0 < row["ttft_p50_ms"] <= row["ttft_p99_ms"] <= row["e2e_p99_ms"]
    assert 0 < row["tbt_p50_ms"] <= row["tbt_p99_ms"]
    assert row["attn_err"] == 0.0 and row["timing_meaningful"] is False
    assert (row["qps"] == 200.0) if mode == "online" else row["qps"] is None
    assert saved["torch"] == torch.__version__ and saved["gpu"] == "cpu" and saved["timestamp"]


@pytest.mark.parametrize("backend", ["triton_serial", "pod"])
def test_engine_serves_with_our_kernels(backend):
    """Our Triton backends (interpreter) serve through the engine: one plan per iteration reused
    across layers by re-pointing tensors, every layer's attention checked against the reference."""
    try:
        why = get_backend(backend).availability()
    except KeyError as e:
        pytest.skip(str(e))
    if why is not None:
        pytest.skip(why)
    seed = random.randrange(1 << 30)
    model = LlamaModel(TINY, dtype=torch.bfloat16, device="cpu", seed=seed)
    cache = PagedKVCache(TINY.num_layers, 32, 16, TINY.heads, torch.bfloat16, "cpu", seed=seed,
                         fill=float("nan"))
    engine = Engine(model, cache, SchedulerConfig(24, max_num_seqs=4, watermark=0.0), backend=backend,
                    verify=True)
    run = engine.run(tiny_requests(3, seed, low=20, high=60, out_low=2, out_high=4))
    assert any(i.num_prefill and i.num_decode for i in run.iterations)
    assert all(len(r.output) == r.spec.output_len for r in run.requests)
    assert run.attn_err < 2e-2                     # bf16 outputs vs the fp32 reference, every layer


def test_unknown_backend_and_a_missing_gpu_are_refused_before_anything_is_built(monkeypatch):
    import experiments.serving.experiment as experiment
    from baselines.registry import UnknownBackend
    monkeypatch.setattr(experiment, "LlamaModel", lambda *a, **k: pytest.fail("nothing may be built"))
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        bad = compose("serving", overrides=["device=cpu", "backends=[reference,nope]", "out_dir="])
        gpu = compose("serving", overrides=["device=cuda", "backends=[reference]", "out_dir="])
    with pytest.raises(UnknownBackend, match="'nope'.*registered"):
        serve(bad)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(experiment.ServingRefused, match="GPU-only.*device=cpu"):
        serve(gpu)


# -- what a first run meets: the KV pool sized to fit, bad values in one line ----------------------------
SMOKE = ("serving/model=tiny_llama", "serving/workload=tiny", "serving/scheduler=tiny", "device=cpu",
         "dtype=float32", "backends=[reference]", "num_layers=2", "num_requests=4", "out_dir=")


@pytest.fixture
def nothing_allocated(monkeypatch):
    import experiments.serving.experiment as experiment
    monkeypatch.setattr(experiment, "LlamaModel", lambda *a, **k: pytest.fail("no model may be built"))
    monkeypatch.setattr(experiment, "PagedKVCache", type("NoCache", (experiment.PagedKVCache,), {
        "__init__": lambda *a, **k: pytest.fail("no KV cache may be allocated")}))
    return experiment


def test_cpu_smoke_without_num_pages_sizes_the_kv_pool_from_the_workload(monkeypatch):
    """The README's CPU smoke without num_pages allocated the 40 GB kv_cache_gb default on the CPU (the
    process was killed, rc 137, no message): the pool now holds what the workload can use at once."""
    import experiments.serving.experiment as experiment
    from experiments.serving.kv_cache import pages_to_hold
    sizes = []

    class Recorded(experiment.PagedKVCache):
        def __init__(self, layers, pages, *a, **k):
            sizes.append(pages)
            super().__init__(layers, pages, *a, **k)
    monkeypatch.setattr(experiment, "PagedKVCache", Recorded)
    cfg = compose_serving(*SMOKE)
    assert cfg.num_pages is None
    rows = serve(cfg)
    assert rows[0]["status"] == "ok", rows[0]["reason"]
    specs = generate(experiment.workload_config(cfg, 128))
    need = pages_to_hold([len(r.prompt) + r.output_len for r in specs], 16, 0.0)
    assert sizes == [need] and rows[0]["kv_pages"] == need < 64
    # A budget bigger than the workload changes no schedule: it is capped the same way.
    assert experiment.kv_pages(compose_serving(*SMOKE, "kv_cache_gb=40"), torch.float32, need_pages=need) == need
    # Without a budget, free memory less the weights sets it (here: 1 MiB free, ~0.3 MiB of weights).
    free = experiment.kv_pages(compose_serving(*SMOKE), torch.float32, free_bytes=2**20)
    assert 0 < free < need * 100 and free == experiment.PagedKVCache.num_pages_for_bytes(
        int(0.9 * 2**20) - experiment.weight_bytes(model_config(cfg), torch.float32), 2, 16, TINY.heads, torch.float32)


@pytest.mark.parametrize("override, free_gib, says", [
    ("kv_cache_gb=40", 2**-12, "kv_cache_gb=40: a KV pool of 19 pages"),        # the old default, 1 MiB free
    ("kv_cache_gb=null", 2**-12, "kv_cache_gb=null: a KV pool of 1 pages"),     # the weights alone do not fit
    ("num_pages=1000000", 8, "num_pages=1000000: a KV pool of 1,000,000 pages"),
])
def test_a_kv_pool_that_does_not_fit_is_refused_before_anything_is_allocated(nothing_allocated, monkeypatch,
                                                                               override, free_gib, says):
    monkeypatch.setattr(nothing_allocated, "free_memory_bytes", lambda device: (int(free_gib * 2**30), "available RAM"))
    with pytest.raises(nothing_allocated.KVCacheTooLarge, match=re.escape(says)) as e:
        serve(compose_serving(*SMOKE, override))
    assert f"{free_gib:.1f} GiB available RAM on cpu" in str(e.value) and "kv_cache_gb=null" in str(e.value)
    assert "\n" not in str(e.value)


def test_a_pool_smaller_than_the_longest_request_is_refused(nothing_allocated):
    with pytest.raises(nothing_allocated.ServingRefused, match="fewer than the longest request"):
        serve(compose_serving(*SMOKE, "num_pages=2"))


@pytest.mark.parametrize("override, says", [
    ("qps=-1", "qps=-1 is invalid"), ("dtype=int8", "dtype='int8' is invalid"),
    ("page_size=7", "page_size=7 is invalid"), ("num_pages=0", "num_pages=0 is invalid"),
    ("num_requests=0", "num_requests=0 is invalid"), ("mode=batch", "mode='batch' is invalid"),
    ("serving.model.num_kv_heads=3", "num_kv_heads=3 must divide"), ("device=tpu", "device='tpu' is invalid"),
    ("kv_memory_fraction=2", "kv_memory_fraction=2 is invalid"), ("num_layers=0", "num_layers=0 is invalid"),
    ("serving.scheduler.watermark=1.5", "watermark=1.5"),
])
def test_a_bad_serving_value_is_refused_in_one_line_naming_it(nothing_allocated, override, says):
    with pytest.raises(nothing_allocated.ServingRefused, match=re.escape(says)) as e:
        serve(compose_serving(*SMOKE, override))
    assert "\n" not in str(e.value)


def test_the_serving_cli_says_a_refusal_in_one_line(tmp_path):
    """`python -m experiments.serving ... qps=-1`: one line on stderr, exit status 2, no traceback."""
    import subprocess
    import sys
    p = subprocess.run([sys.executable, "-m", "experiments.serving", *SMOKE, "mode=online", "qps=-1",
                        f"hydra.run.dir={tmp_path}"], cwd=Path(CONF).parent, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 2, p.stderr[-2000:]
    assert p.stderr.strip().splitlines() == ["[serving] refused: qps=-1 is invalid: requests per second > 0 "
                                             "(online mode; null offline)"]


def test_gpu_checks_serving_step_runs_the_engine_and_refuses_without_a_gpu(monkeypatch):
    """`python -m experiments.gpu_checks serving`: importable and refused in one line on a CPU; its logic
    (engine iterations, the pass rule, skipped rows for missing packages) run here with the reference."""
    from experiments import gpu_checks
    rows = gpu_checks.check_serving(("reference", "fi_serial"), device=torch.device("cpu"), out=lambda s: None)
    ref, fi = rows
    assert ref["ok"] and ref["tokens_ok"] and ref["logits_finite"] and ref["times_finite"], ref
    assert ref["attn_err"] < 2e-2 and ref["hybrid_iterations"] > 0
    if get_backend("fi_serial").availability() is not None:
        assert fi["ok"] and fi["skipped"]                    # optional: a skipped row, not a failure
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="GPU only"):
        gpu_checks.main(["serving"])
    assert "serving" in gpu_checks.__doc__
