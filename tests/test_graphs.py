"""CUDA graphs, their CPU side: the harness's graph timing (timing.cuda_graph: recorded in every row, its
own results file, refused on a CPU, a poisoned replay checked before replays are timed) and the GPU check
`python -m experiments.gpu_checks graphs` (registered, refused on a CPU, its pass rule). Capturing needs
a GPU: here a stand-in "graph" replays by calling the captured run again."""
import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir

from baselines import registry
from baselines.registry import AttentionOutput, Backend, always_available
from experiments import gpu_checks
from experiments.harness import running, sweep as harness, timing
from experiments.harness.paths import results_path
from experiments.harness.schema import ATTENTION_SCHEMA, append_row, read_rows
from experiments.harness.sweep import run_sweep
from experiments.harness.timing import TimingConfig, time_run
from pod.batch import BatchSpec, make_batch
from pod.reference import reference

CONF = str(Path(__file__).resolve().parents[1] / "conf")
MODELS = {"m": dict(num_q_heads=4, num_kv_heads=2, head_dim=64)}
POINTS = [dict(chunk_len=5, prefill_context_len=3, num_decode=2, decode_context_len=6),
          dict(chunk_len=7, prefill_context_len=0)]
SPEC = BatchSpec.build(4, 2, 64, prefill=[(5, 3), (2, 0)], decode=[6, 17], page_size=16)


class Replays:
    """A CPU stand-in for a captured CUDA graph: replay() runs the captured call again."""

    def __init__(self, run):
        self.run = run

    def replay(self):
        self.run()


def stand_in_capture(run, device):
    return Replays(run), run()


def static_backend(name, stale=False, writes_once=False):
    """A backend shaped like ours: outputs allocated in prepare, run() writes them (the fp32 reference
    rounded). `stale`: it computes from copies of the inputs taken in prepare (an engine's new inputs never
    reach it); `writes_once`: only its first call writes (a replay writes nothing)."""
    def prepare(batch):
        src = batch
        if stale:
            src = make_batch(batch.spec, batch.device, seed=0)
            for t in ("q_prefill", "q_decode", "k_cache", "v_cache"):
                getattr(src, t).copy_(getattr(batch, t))
        out_p, out_d = torch.empty_like(batch.q_prefill), torch.empty_like(batch.q_decode)
        calls = []

        def run():
            if not (writes_once and calls):
                p, d = reference(src)
                out_p.copy_(p)
                out_d.copy_(d)
            calls.append(1)
            return AttentionOutput(out_p, out_d)
        return run
    return Backend(name, prepare, frozenset({"prefill", "decode"}), frozenset({"paged", "contiguous"}),
                   always_available)


@pytest.fixture
def fake_registry(monkeypatch):
    reg = {"static": static_backend("static")}
    monkeypatch.setattr(harness, "list_backends", lambda: reg)
    return reg


def sweep_cfg(tmp_path, **kw):
    return dict(sweep=dict(name="t", base=dict(model="m", page_size=16), points=POINTS), models=MODELS,
                backend=dict(names=["static"]), results_dir=str(tmp_path), progress=False,
                wandb=dict(enabled=False), **kw)


# -- the harness ----------------------------------------------------------------------------------
def test_the_timing_mode_is_recorded_in_every_row(tmp_path, fake_registry):
    fake_registry["gpu"] = Backend("gpu", static_backend("x").prepare, frozenset({"prefill", "decode"}),
                                   frozenset({"paged"}), lambda: "GPU only (test)")
    df = run_sweep({**sweep_cfg(tmp_path), "backend": dict(names=["static", "gpu"])})
    assert len(df) == 4 and set(df.status) == {"ok", "skipped"}
    assert (df.cuda_graph == False).all() and df.cuda_graph.notna().all()   # noqa: E712 - ok and skipped rows
    assert list(read_rows(tmp_path / "t" / "cpu.csv").columns) == list(ATTENTION_SCHEMA)
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("attention", overrides=["timing.cuda_graph=true"])
    assert TimingConfig.from_config(cfg.timing) == TimingConfig(25, 100, cuda_graph=True)


def test_cuda_graph_timing_on_a_cpu_is_refused_in_one_line_before_anything_runs(tmp_path, fake_registry,
                                                                                  capsys):
    cfg = sweep_cfg(tmp_path, timing=dict(cuda_graph=True), device="cpu")
    with pytest.raises(harness.SweepRefused, match=r"timing.cuda_graph=true .* need a CUDA GPU \(device=cpu"):
        run_sweep(cfg)
    assert harness.main(cfg, ["python", "-m", "experiments.attention"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("[harness] refused: timing.cuda_graph=true"), err
    assert not list(tmp_path.rglob("*.csv"))
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        time_run(lambda: None, torch.device("cpu"), TimingConfig(cuda_graph=True))


@pytest.mark.parametrize("value, says", [
    (dict(cuda_graph="yes"), "timing.cuda_graph='yes' is invalid: true or false"),
    (dict(rep_ms=0), "timing.rep_ms=0 is invalid"),
    (dict(graphs=True), "timing.graphs is unknown; timing takes warmup_ms, rep_ms, cuda_graph"),
])
def test_a_bad_timing_value_is_refused_naming_it(tmp_path, fake_registry, value, says):
    with pytest.raises(harness.SweepRefused, match=says):
        run_sweep(sweep_cfg(tmp_path, timing=value))


def test_graph_timed_rows_have_their_own_results_file(tmp_path):
    device = torch.device("cpu")
    base = dict(sweep=dict(name="s"), results_dir=str(tmp_path))
    (tmp_path / "s").mkdir()
    for name in ("cpu.csv", "cpu.shard0of2.csv", "cpu.cuda_graph.csv", "cpu.cuda_graph.shard1of2.csv"):
        (tmp_path / "s" / name).write_text("")
    path, siblings = results_path({**base, "timing": dict(cuda_graph=True)}, device)
    assert path.name == "cpu.cuda_graph.csv"
    assert [p.name for p in siblings] == ["cpu.cuda_graph.csv", "cpu.cuda_graph.shard1of2.csv"]
    path, siblings = results_path({**base, "timing": dict(cuda_graph=True), "num_shards": 2, "shard": 0}, device)
    assert path.name == "cpu.cuda_graph.shard0of2.csv"
    path, siblings = results_path({**base, "timing": dict(cuda_graph=False)}, device)
    assert path.name == "cpu.csv" and [p.name for p in siblings] == ["cpu.csv", "cpu.shard0of2.csv"]


def test_time_run_through_a_graph_checks_a_poisoned_replay_then_times_the_replays(monkeypatch):
    import triton.testing
    timed = []
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, **kw: timed.append(fn) or [2.0, 1.5, 2.5])
    monkeypatch.setattr(timing, "capture_graph", stand_in_capture)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    buf = torch.zeros(3)

    def run():                        # writes its output buffer, as ours do
        buf.copy_(torch.ones(3))
        return buf, None
    seen = []
    cuda = torch.device("cuda")
    assert time_run(run, cuda, TimingConfig(cuda_graph=True), check=lambda o: seen.append(o[0].clone())) \
        == (2.0, 1.5, 2.5, True)
    assert len(seen) == 1 and torch.equal(seen[0], torch.ones(3))
    assert isinstance(timed[0].__self__, Replays)                    # the replays are timed, not run
    seen.clear()
    time_run(run, cuda, TimingConfig(), check=lambda o: seen.append(o))
    assert timed[1] is run and not seen                             # eager: run itself, nothing replayed

    def writes_nothing():
        return buf, None
    time_run(writes_nothing, cuda, TimingConfig(cuda_graph=True), check=lambda o: seen.append(o[0].clone()))
    assert torch.isnan(seen[0]).all()                               # poisoned before the replay


def test_a_replay_worse_than_the_eager_call_sets_the_rows_error():
    batch = make_batch(SPEC, torch.device("cpu"), seed=0)
    ref = reference(batch)
    backend = static_backend("b")
    row = dict(prefill_err=5e-3, decode_err=5e-3)                 # the eager call's (worse than bf16 rounding)
    good = AttentionOutput(ref[0].to(batch.q_prefill.dtype), ref[1].to(batch.q_decode.dtype))
    running.replay_check(row, ref, batch, backend)(good)
    assert row == dict(prefill_err=5e-3, decode_err=5e-3)
    nan = AttentionOutput(torch.full_like(good.prefill, float("nan")), good.decode)
    running.replay_check(row, ref, batch, backend)(nan)
    assert row == dict(prefill_err=math.inf, decode_err=5e-3)
    half = dict(prefill_err=math.nan, decode_err=1e-3)
    decode_only = Backend("d", None, frozenset({"decode"}), frozenset({"paged"}), always_available)
    running.replay_check(half, ref, batch, decode_only)(AttentionOutput(None, good.decode))
    assert math.isnan(half["prefill_err"]) and half["decode_err"] <= 1e-2


def test_a_file_under_an_older_schema_takes_the_new_column_before_a_row_is_appended(tmp_path):
    old = [c for c in ATTENTION_SCHEMA if c != "cuda_graph"]
    path = tmp_path / "h200.csv"
    pd.DataFrame([dict(point_id="p1", backend="b", status="ok", median_ms=1.5, timing_meaningful=True,
                       options='{"x": 1}')], columns=old).to_csv(path, index=False)
    append_row(path, dict(point_id="p2", backend="b", status="ok", median_ms=2.5, timing_meaningful=True,
                          cuda_graph=True, options="{}"), ATTENTION_SCHEMA)
    df = read_rows(path)
    assert list(df.point_id) == ["p1", "p2"] and list(df.median_ms) == [1.5, 2.5]
    assert list(df.options) == ['{"x": 1}', "{}"]
    assert pd.isna(df.cuda_graph[0]) and df.cuda_graph[1] == True  # noqa: E712 - a nullable boolean
    assert path.read_text().splitlines()[0].split(",") == list(ATTENTION_SCHEMA)


# -- the GPU check ------------------------------------------------------------------------------------
def test_the_graphs_check_is_registered_and_refused_on_a_cpu_in_one_line(monkeypatch):
    assert gpu_checks.parse_args(["graphs"]) == ("graphs", [])
    assert gpu_checks.parse_args(["graphs", "pod", "triton_serial"]) == ("graphs", ["pod", "triton_serial"])
    assert "gpu_checks graphs" in gpu_checks.__doc__
    assert set(gpu_checks.our_gpu_backends()) == {"pod", "pod_paper", "pod_sm90",
                                                 "triton_prefill", "triton_decode", "triton_serial"}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as e:
        gpu_checks.main(["graphs"])
    assert str(e.value) == "GPU only: capturing CUDA graphs needs a CUDA GPU"


def test_the_graphs_check_passes_a_replay_on_fresh_inputs_and_fails_stale_or_unwritten_ones(monkeypatch):
    for name, kw in (("static", {}), ("stale", dict(stale=True)), ("writes_once", dict(writes_once=True))):
        monkeypatch.setitem(registry._REGISTRY, name, static_backend(name, **kw))
    specs = {"paged16": SPEC, "contiguous": BatchSpec.build(4, 2, 64, prefill=[(5, 3)], decode=[6, 17])}
    lines = []
    rows = gpu_checks.check_graphs(("static", "stale", "writes_once"), out=lines.append,
                                   device=torch.device("cpu"), specs=specs, capture=stand_in_capture)
    assert [(r["backend"], r["layout"]) for r in rows] == [(b, s) for s in specs for b in ("static", "stale",
                                                                                           "writes_once")]
    ok = {(r["backend"], r["layout"]): r["ok"] for r in rows}
    assert ok == {(b, s): b == "static" for b, s in ok}, rows
    static = rows[0]
    assert static["prefill_err"] < 1e-2 and static["decode_err"] < 1e-2 and static["repeat_equal"]
    stale = rows[1]
    assert stale["eager_prefill_err"] < 1e-2 and stale["prefill_err"] > 1e-1    # right once, wrong on new inputs
    assert rows[2]["prefill_err"] == math.inf                        # the replay wrote nothing: NaN stayed
    assert [json.loads(line)["backend"] for line in lines] == [r["backend"] for r in rows]
