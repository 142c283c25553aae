"""The harness (experiments/harness/, experiments/attention.py, conf/)."""
import json
import math
import re
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir

from experiments.harness import sweep as harness
from pod.batch import BatchSpec
from experiments import cli
from experiments.harness import running, wandb_log
from experiments.harness.points import expand_points, point_id, shard
from experiments.harness.sweep import run_sweep
from pod.reference import reference
from baselines.registry import AttentionOutput, Backend, BackendUnavailable, always_available
from analysis.load import load_results as load_tables
from experiments.harness.results import ResultStore
from experiments.harness.wandb_log import WandbLogger
from experiments.harness.schema import ATTENTION_COLUMNS as COLUMNS, ATTENTION_SCHEMA, typed

CONF = str(Path(__file__).resolve().parents[1] / "conf")


def load_results(path):
    """The attention rows under `path` as analysis.load finds them, typed by the harness's schema."""
    found = load_tables(path).attention
    return typed(found, ATTENTION_SCHEMA)[list(COLUMNS)]
REPO = Path(__file__).resolve().parents[1]
MODELS = {"m": dict(num_q_heads=4, num_kv_heads=2, head_dim=64),
          "m2": dict(num_q_heads=4, num_kv_heads=2, head_dim=64)}


# -- fake backends -----------------------------------------------------------------------------------
def _correct(batch):
    def run():
        p, d = reference(batch)
        return AttentionOutput(p.to(batch.q_prefill.dtype), d.to(batch.q_decode.dtype))
    run.backend_config = {"knob": 3}
    return run


def backend(name, prepare=_correct, computes=("prefill", "decode"), layouts=("contiguous", "paged"),
            availability=always_available):
    return Backend(name, prepare, frozenset(computes), frozenset(layouts), availability)


@pytest.fixture
def fake_registry(monkeypatch):
    reg = {}
    monkeypatch.setattr(harness, "list_backends", lambda: reg)
    return reg


def sweep_cfg(tmp_path, points, names, **kw):
    cfg = dict(sweep=dict(name="t", base=dict(model="m", page_size=16), points=points), models=MODELS,
               backend=dict(names=names), results_dir=str(tmp_path), progress=False,
               wandb=dict(enabled=False))
    cfg.update(kw)
    return cfg


POINTS = [dict(chunk_len=5, prefill_context_len=3, num_decode=2, decode_context_len=6),
          dict(chunk_len=0, num_decode=3, decode_context_len=9),
          dict(chunk_len=7, prefill_context_len=0),
          dict(chunk_len=4, prefill_context_len=2, num_decode=1, decode_context_len=5, page_size=None),
          dict(num_prefill=2, chunk_len=3, prefill_context_len=1, num_decode=2, decode_context_len=3)]


# -- points --------------------------------------------------------------------------------------------
def test_expand_points_grid_pairs_points_and_dedup():
    sweep = dict(base=dict(model="m", page_size=16, num_decode=2, decode_context_len=8),
                 grids=[dict(chunk_len=[4, 8], prefill_context_len=[0, 16], model=["m", "m2"]),
                        dict(chunk_len=4, dec=[dict(num_decode=1, decode_context_len=3),
                                               dict(num_decode=5, decode_context_len=7)])],
                 points=[dict(chunk_len=4, prefill_context_len=0)])   # duplicate of the 1st grid point
    pts = expand_points(sweep, MODELS)
    assert len(pts) == 2 * 2 * 2 + 2
    assert len({p.point_id for p in pts}) == len(pts)
    assert pts[0].spec == BatchSpec.build(4, 2, 64, [(4, 0)], [8, 8], page_size=16) and pts[0].model == "m"
    paired = [p.spec.decode_context_lens for p in pts[-2:]]
    assert paired == [(3,), (7,) * 5]
    only_decode = expand_points(dict(points=[dict(model="m", chunk_len=0, num_decode=2,
                                                  decode_context_len=4)]), MODELS)[0]
    assert only_decode.spec.num_prefill == 0 and only_decode.spec.page_size is None
    with pytest.raises(ValueError, match="chunk_size"):
        expand_points(dict(points=[dict(model="m", chunk_size=4)]), MODELS)
    with pytest.raises(ValueError, match="unknown model"):
        expand_points(dict(points=[dict(model="gpt5", chunk_len=4)]), MODELS)
    with pytest.raises(ValueError, match="page_size"):   # BatchSpec's validation names the field
        expand_points(dict(points=[dict(model="m", chunk_len=4, page_size=12)]), MODELS)


def test_point_id_is_stable_and_distinguishes_points():
    spec = BatchSpec.build(32, 8, 128, [(1024, 12288)], [8192] * 64, page_size=16)
    # Pinned: ids must not change between runs/machines, or resume and cross-run joins break.
    assert point_id("llama3_8b", spec) == point_id("llama3_8b", BatchSpec.build(
        32, 8, 128, [(1024, 12288)], [8192] * 64, page_size=16)) == "cf9ef4056f76"
    others = {point_id("llama3_8b", BatchSpec.build(32, 8, 128, [(1024, 12288)], [8192] * 64)),
              point_id("other", spec),
              point_id("llama3_8b", BatchSpec.build(32, 8, 128, [(1024, 12288)], [8192] * 63, page_size=16)),
              point_id("llama3_8b", BatchSpec.build(32, 8, 128, [(1024, 12288)], [8192] * 64, "float16", 16))}
    assert len(others) == 4 and point_id("llama3_8b", spec) not in others


def test_shards_partition_the_points():
    pts = expand_points(dict(grids=[dict(model="m", chunk_len=[1, 2, 3, 4, 5, 6, 7])]), MODELS)
    parts = [shard(pts, i, 3) for i in range(3)]
    assert sorted(p.point_id for part in parts for p in part) == sorted(p.point_id for p in pts)
    assert [len(x) for x in parts] == [3, 2, 2]
    with pytest.raises(ValueError, match="shard"):
        shard(pts, 3, 3)


def test_every_sweep_preset_expands():
    sizes = {}
    for sweep in ("smoke", "single", "paper", "kernels", "balance"):
        with initialize_config_dir(config_dir=CONF, version_base="1.3"):
            cfg = compose("attention", overrides=[f"sweep={sweep}"])
        sizes[sweep] = len(expand_points(cfg.sweep, cfg.models))
    assert sizes["single"] == 1 and 4 <= sizes["smoke"] <= 10
    assert 40 <= sizes["paper"] <= 60 and sizes["kernels"] >= 10 and sizes["balance"] >= 8


# -- one run through Hydra's compose API ----------------------------------------------------------------
def test_hydra_compose_run_writes_rows_with_provenance(tmp_path):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("attention", overrides=[
            "sweep=single", "batch=hybrid_small", "model=tiny", "backend=reference",
            f"results_dir={tmp_path}", "wandb.enabled=false", "progress=false",
            "batch.chunk_len=20", "batch.prefill_context_len=13", "batch.num_decode=3"])
    df = run_sweep(cfg)
    files = list(tmp_path.rglob("*.csv"))
    assert files == [tmp_path / "single" / "cpu.csv"] or torch.cuda.is_available()
    on_disk = load_results(tmp_path)
    assert len(df) == len(on_disk) == 1
    row = on_disk.iloc[0]
    assert list(on_disk.columns) == list(COLUMNS)
    spec = BatchSpec.build(8, 2, 64, [(20, 13)], [200] * 3, page_size=16)
    assert row.point_id == point_id("tiny", spec) and row.batch == spec.describe()
    assert (row.sweep, row.backend, row.model, row.status, row.reason) == ("single", "reference", "tiny", "ok", "")
    assert (row.num_q_heads, row.num_kv_heads, row.head_dim, row["dtype"]) == (8, 2, 64, "bfloat16")
    assert (row.kv_layout, row.page_size, row.num_prefill, row.chunk_len, row.prefill_context_len,
            row.num_decode, row.decode_context_len) == ("paged", 16, 1, 20, 13, 3, 200)
    assert row.prefill_err < 1e-2 and row.decode_err < 1e-2
    assert row.median_ms > 0 and row.p20_ms <= row.median_ms <= row.p80_ms
    assert row.prefill_flops == spec.prefill_flops() and row.decode_bytes == spec.decode_bytes()
    assert row.tflops == pytest.approx(spec.prefill_flops() / (row.median_ms * 1e-3) / 1e12)
    assert row.gbps == pytest.approx(spec.decode_bytes() / (row.median_ms * 1e-3) / 1e9)
    assert json.loads(row.backend_config) == {}
    assert row.torch == torch.__version__ and row.triton != ""
    if not torch.cuda.is_available():
        assert row.gpu == "cpu" and row.driver == "" and not row.timing_meaningful
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    if head.returncode == 0:
        assert row.git_commit.split("+")[0] == head.stdout.strip()
        assert row.git_commit.endswith("+dirty") == bool(subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
            capture_output=True, text=True).stdout.strip())
    assert datetime.fromisoformat(row.timestamp).tzinfo is not None


def test_entry_point_runs_under_hydra_cli(tmp_path):
    """`python -m experiments.attention` itself (the Hydra CLI), one point on the reference backend."""
    env_cmd = [sys.executable, "-m", "experiments.attention", "sweep=single", "model=tiny",
               "backend=reference", "batch.chunk_len=8", "batch.num_decode=2", "wandb.enabled=false",
               "progress=false", f"results_dir={tmp_path / 'r'}", f"hydra.run.dir={tmp_path / 'h'}"]
    out = subprocess.run(env_cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    df = load_results(tmp_path / "r")
    assert len(df) == 1 and df.status.iloc[0] == "ok" and df.sweep.iloc[0] == "single"


# -- resume, statuses ------------------------------------------------------------------------------------
def test_interrupted_sweep_resumes_without_losing_or_repeating_rows(tmp_path, fake_registry):
    calls = {"n": 0}

    def flaky(batch):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt   # the user hits Ctrl-C on the 3rd point
        return _correct(batch)

    fake_registry["good"] = backend("good")
    fake_registry["flaky"] = backend("flaky", prepare=flaky)
    cfg = sweep_cfg(tmp_path, POINTS, ["good", "flaky"])
    with pytest.raises(KeyboardInterrupt):
        run_sweep(cfg)
    first = load_results(tmp_path)
    assert len(first) == 2 * 2 + 1          # points 1-2 on both backends, point 3 on `good`
    assert (first.status == "ok").all()

    seen = []
    fake_registry["good"] = backend("good", prepare=lambda b: seen.append(b.spec) or _correct(b))
    df = run_sweep(cfg)
    assert len(seen) == len(POINTS) - 3     # `good` re-ran none of the points it had done
    assert calls["n"] == 3 + len(POINTS) - 2
    assert len(df) == 2 * len(POINTS) and not df.duplicated(["point_id", "backend"]).any()
    assert set(df.point_id) == {p.point_id for p in expand_points(cfg["sweep"], MODELS)}
    assert (df.status == "ok").all()
    # Rows of the first run are kept as they were (same timestamps), not re-measured.
    kept = df.merge(first, on=["point_id", "backend"], suffixes=("", "_first"))
    assert len(kept) == len(first) and (kept.timestamp == kept.timestamp_first).all()
    # A third run has nothing to do.
    assert len(run_sweep(cfg)) == 2 * len(POINTS) and len(seen) == len(POINTS) - 3


def _rows_per_pair_of(*files):
    pairs = [pair for f in files for pair in zip(*[ResultStore(f).read()[c] for c in ("point_id", "backend")])]
    return pd.Series(pairs, dtype=object).value_counts().to_dict(), files


def _rows_per_pair(tmp_path):
    """(point_id, backend) -> how many rows hold it, over every shard file of sweep `t`, as read from disk."""
    files = sorted((tmp_path / "t").glob("cpu.shard*of3.csv"))
    pairs = [pair for f in files for pair in zip(*[ResultStore(f).read()[c] for c in ("point_id", "backend")])]
    return pd.Series(pairs, dtype=object).value_counts().to_dict(), files


def test_a_killed_shard_resumes_with_nothing_lost_or_doubled(tmp_path, fake_registry):
    """Three shards; shard 1 dies after 3 of its rows (a KeyboardInterrupt from inside a backend: a kill
    between rows). Rerunning shard 1 runs exactly what it lacked: every (point, backend) of the sweep is
    in exactly one shard file once, and the loader's merge of the shard files sees each once."""
    points = POINTS + [dict(chunk_len=9, prefill_context_len=4, num_decode=2, decode_context_len=8),
                       dict(chunk_len=0, num_decode=4, decode_context_len=11)]      # 7 points: 3/2/2
    ran = []

    def counted(batch):
        ran.append(batch.spec)
        return _correct(batch)

    def dies_after(k):
        def prepare(batch):
            if len(ran) == k:
                raise KeyboardInterrupt          # the shard's process is killed here
            return counted(batch)
        return prepare

    fake_registry["a"], fake_registry["b"] = backend("a", prepare=counted), backend("b", prepare=counted)
    for i in (0, 2):
        run_sweep(sweep_cfg(tmp_path, points, ["a", "b"], shard=i, num_shards=3))
    assert len(ran) == 2 * (3 + 2)
    ran.clear()
    fake_registry["b"] = backend("b", prepare=dies_after(3))
    with pytest.raises(KeyboardInterrupt):
        run_sweep(sweep_cfg(tmp_path, points, ["a", "b"], shard=1, num_shards=3))
    assert len(ran) == 3
    counts, _ = _rows_per_pair(tmp_path)
    assert sum(counts.values()) == 10 + 3 and set(counts.values()) == {1}
    before = load_results(tmp_path)

    ran.clear()
    fake_registry["b"] = backend("b", prepare=counted)
    run_sweep(sweep_cfg(tmp_path, points, ["a", "b"], shard=1, num_shards=3))
    assert len(ran) == 1                  # shard 1 holds 2 points: 4 rows, 3 kept, 1 run now
    every = {(p.point_id, b) for p in expand_points(sweep_cfg(tmp_path, points, [])["sweep"], MODELS)
             for b in ("a", "b")}
    counts, files = _rows_per_pair(tmp_path)
    assert len(files) == 3 and counts == {pair: 1 for pair in every}
    merged = load_results(tmp_path)
    assert len(merged) == len(every) and set(zip(merged.point_id, merged.backend)) == every
    assert (merged.status == "ok").all()
    kept = merged.merge(before, on=["point_id", "backend"], suffixes=("", "_before"))
    assert len(kept) == len(before) and (kept.timestamp == kept.timestamp_before).all()   # not re-measured


def test_a_shard_killed_inside_a_row_resumes_with_it_rerun(tmp_path, fake_registry):
    """A shard killed while it wrote a row (SIGKILL, a lost node: the file ends inside the row) resumes:
    the cut row runs again, not counted as done from its fragment, the next row is not glued to the
    fragment, and another shard, which reads this file for resume, reads it. Cut anywhere: in a field,
    inside a quoted field that holds a newline, between the row's \\r and \\n."""
    reason = 'refused, "said"\nover two lines (test)'

    def refuses(batch):
        raise BackendUnavailable(reason)
    fake_registry["a"], fake_registry["s"] = backend("a"), backend("s", prepare=refuses)
    cfg = sweep_cfg(tmp_path, POINTS[:4], ["a", "s"], num_shards=2, shard=1)
    run_sweep(cfg)
    path = tmp_path / "t" / "cpu.shard1of2.csv"
    whole = path.read_bytes()
    start = whole.rfind(b"\n", 0, whole.rfind(b"refused")) + 1     # the last row: `s` on the last point
    row = whole[start:]
    assert row.endswith(b"\n") and reason.encode() in row.replace(b'""', b'"')
    cuts = sorted({1, row.find(b",") + 1, row.find(b'"refused') + 4, row.find(b"\n") + 1,
                   row.find(b"over") + 2, len(row) - 20, len(row) - 1})
    for cut in cuts:
        path.write_bytes(whole[:start + cut])
        run_sweep({**cfg, "shard": 0})                  # a sibling shard reads the cut file for resume
        df = run_sweep(cfg)
        assert len(df) == 4 and not df.duplicated(["point_id", "backend"]).any(), (cut, df)
        assert (df[df.backend == "s"].reason == reason).all() and (df.status != "").all(), cut
        assert path.read_bytes().endswith(b"\n"), cut


def test_statuses_skipped_error_oom_and_layout_fallback(tmp_path, fake_registry, monkeypatch):
    def boom(batch):
        raise RuntimeError("kernel exploded")

    def oom(batch):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 80 GiB")

    def refuses(batch):
        raise BackendUnavailable("only one prefill chunk")

    def half(batch):   # claims to compute both parts but returns no decode output
        return lambda: AttentionOutput(reference(batch)[0].to(batch.q_prefill.dtype), None)

    for b in [backend("nogpu", availability=lambda: "needs a CUDA GPU (test)"),
              backend("contig_only", layouts=("contiguous",)),
              backend("paged_only", layouts=("paged",)),
              backend("decode_only", computes=("decode",)),
              backend("boom", prepare=boom), backend("oom", prepare=oom),
              backend("refuses", prepare=refuses), backend("half", prepare=half)]:
        fake_registry[b.name] = b
    names = list(fake_registry)
    points = [POINTS[0], POINTS[2], POINTS[3]]   # hybrid paged, prefill-only paged, hybrid contiguous
    built = []
    real_batch, real_make = running.PointBatches.batch, running.make_batch

    def one_layout_at_a_time(self, spec):   # a point never holds two KV caches at once
        b = real_batch(self, spec)
        assert len(self._batches) == 1
        return b
    monkeypatch.setattr(running.PointBatches, "batch", one_layout_at_a_time)
    monkeypatch.setattr(running, "make_batch", lambda spec, *a, **k: built.append(spec) or real_make(spec, *a, **k))
    df = run_sweep(sweep_cfg(tmp_path, points, names))
    assert len(df) == len(points) * len(names)
    rows = lambda name: df[df.backend == name]          # noqa: E731

    assert (rows("nogpu").status == "skipped").all()
    assert (rows("nogpu").reason == "needs a CUDA GPU (test)").all()
    # Layout fallback: the row records the layout that actually ran, and the point id is the point's.
    assert (rows("contig_only").kv_layout == "contiguous").all() and rows("contig_only").page_size.isna().all()
    assert (rows("paged_only").kv_layout == "paged").all() and (rows("paged_only").page_size == 16).all()
    assert (rows("contig_only").status == "ok").all() and (rows("paged_only").status == "ok").all()
    assert set(rows("contig_only").point_id) == set(rows("paged_only").point_id) == set(df.point_id)
    assert (rows("contig_only").backend_config == '{"knob": 3}').all()
    # A decode-only backend on a prefill-only point is skipped; on hybrids it checks its own part.
    dec = rows("decode_only").set_index("chunk_len")
    assert dec.loc[7, "status"] == "skipped" and "decode" in dec.loc[7, "reason"]
    assert dec.loc[5, "status"] == "ok" and math.isnan(dec.loc[5, "prefill_err"])
    assert dec.loc[5, "decode_err"] < 1e-2 and math.isnan(dec.loc[5, "tflops"]) and dec.loc[5, "gbps"] > 0
    # Prefill-only point: no decode part -> decode_err NaN even for a backend that computes both.
    assert math.isnan(rows("contig_only").set_index("chunk_len").loc[7, "decode_err"])
    assert (rows("boom").status == "error").all()
    assert rows("boom").reason.str.contains("RuntimeError: kernel exploded").all()
    assert (rows("oom").status == "oom").all() and rows("oom").reason.str.contains("out of memory").all()
    assert (rows("refuses").status == "skipped").all()
    assert (rows("refuses").reason == "only one prefill chunk").all()
    half_rows = rows("half").set_index("chunk_len")
    assert half_rows.loc[5, "status"] == "error" and "no decode output" in half_rows.loc[5, "reason"]
    assert half_rows.loc[7, "status"] == "ok"    # prefill-only point: nothing missing
    assert len(built) == len(set(built)) == 2 * len(points)   # both layouts of every point, built once
    for r in df[df.status != "ok"].itertuples():
        assert math.isnan(r.median_ms) and r.gpu and r.timestamp
    assert (df.batch != "").all() and (df.gpu != "").all()


def test_sweep_stops_when_a_backend_breaks_the_cuda_context(tmp_path, fake_registry):
    def crash(batch):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")
    fake_registry.update(a=backend("a"), crash=backend("crash", prepare=crash), b=backend("b"))
    cfg = sweep_cfg(tmp_path, POINTS[:2], ["a", "crash", "b"])
    with pytest.raises(running.CudaContextLost, match="illegal memory access"):
        run_sweep(cfg)
    df = load_results(tmp_path)
    assert list(df.backend) == ["a", "crash"] and list(df.status) == ["ok", "error"]
    fake_registry["crash"] = backend("crash")   # fixed: a restart retries the error row on request
    df = run_sweep({**cfg, "rerun_errors": True})
    assert len(df) == 6 and (df.status == "ok").all()


def test_wrong_output_is_recorded_and_warned_and_errors_rerun_on_request(tmp_path, fake_registry):
    def wrong(batch):
        def run():
            p, d = reference(batch)
            return AttentionOutput((p * 1.1).to(batch.q_prefill.dtype), d.to(batch.q_decode.dtype))
        return run

    def nan_out(batch):   # a kernel that forgets to write its output (NaN-poisoned buffers)
        return lambda: AttentionOutput(*batch.empty_outputs())

    state = {"fail": True}

    def sometimes(batch):
        if state["fail"]:
            raise RuntimeError("transient")
        return _correct(batch)

    fake_registry.update(wrong=backend("wrong", prepare=wrong), nan=backend("nan", prepare=nan_out),
                         sometimes=backend("sometimes", prepare=sometimes))
    cfg = sweep_cfg(tmp_path, POINTS[:2], ["wrong", "nan", "sometimes"])
    with pytest.warns(UserWarning, match="exceed error_threshold"):
        df = run_sweep(cfg)
    w = df[df.backend == "wrong"].set_index("chunk_len")
    assert w.loc[5, "prefill_err"] > 0.05 and w.loc[5, "decode_err"] < 1e-2
    assert df[df.backend == "nan"].decode_err.eq(math.inf).all()
    assert (df[df.backend == "sometimes"].status == "error").all()

    state["fail"] = False
    with pytest.warns(UserWarning, match="exceed error_threshold"):
        df = run_sweep(cfg)
    assert (df[df.backend == "sometimes"].status == "error").all()   # errors are not retried...
    with pytest.warns(UserWarning, match="exceed error_threshold"):
        df = run_sweep({**cfg, "rerun_errors": True})                # ...unless asked
    assert (df[df.backend == "sometimes"].status == "ok").all()
    assert len(df) == 6 and not df.duplicated(["point_id", "backend"]).any()   # retried rows replaced


# -- storage, W&B -----------------------------------------------------------------------------------------
def test_result_store_roundtrip_and_schema(tmp_path):
    store = ResultStore(tmp_path / "a" / "x.csv")
    assert store.read().empty and store.done() == set()
    store.append(dict(point_id="p1", backend="b", status="ok", median_ms=1.5, timing_meaningful=True,
                      prefill_err=None, page_size=None, reason='has, "quotes"\nand a newline'))
    store.append(dict(point_id="p2", backend="b", status="error", prefill_err=math.nan))
    with pytest.raises(KeyError, match="bogus"):
        store.append(dict(point_id="p3", bogus=1))
    df = store.read()
    assert list(df.columns) == list(COLUMNS) and len(df) == 2 and pd.isna(df.page_size.iloc[0])
    assert df.median_ms.iloc[0] == 1.5 and df.timing_meaningful.iloc[0] == True  # noqa: E712
    assert df.reason.iloc[0] == 'has, "quotes"\nand a newline' and pd.isna(df.prefill_err).all()
    assert store.done() == {("p1", "b"), ("p2", "b")} and store.done(rerun_errors=True) == {("p1", "b")}
    # Siblings (other shards) count as done; a parquet export loads with the same schema.
    other = ResultStore(tmp_path / "a" / "y.csv", siblings=[tmp_path / "a" / "x.csv"])
    assert other.done() == {("p1", "b"), ("p2", "b")}
    df.to_parquet(tmp_path / "a" / "z.parquet")
    assert len(load_results(tmp_path)) == 4


def test_wandb_logger_disabled_missing_and_offline(tmp_path, monkeypatch):
    WandbLogger(enabled=False).log_row({"point_id": "p", "backend": "b", "status": "ok"})
    monkeypatch.setitem(sys.modules, "wandb", None)       # `import wandb` raises ImportError
    with pytest.warns(UserWarning, match="wandb is not installed"):
        logger = WandbLogger(enabled=True)
    logger.log_row({"point_id": "p", "backend": "b", "status": "ok"})
    logger.finish(pd.DataFrame({"a": [1]}))


# -- a first run without friction ------------------------------------------------------------------------
def test_unknown_backend_fails_before_anything_runs_listing_registered_names(tmp_path, fake_registry):
    fake_registry["good"] = backend("good", prepare=lambda b: pytest.fail("nothing may run"))
    with pytest.raises(harness.UnknownBackend, match=r"'nope'.*registered: good"):
        run_sweep(sweep_cfg(tmp_path, POINTS[:1], ["good", "nope"]))
    assert not list(tmp_path.rglob("*.csv"))                     # no error row written


def test_gpu_sized_point_on_a_cpu_is_refused_in_one_line(tmp_path, capsys):
    """`sweep=single batch=paper_example backend=all` on a CPU: refused at once, before any batch or
    reference is built, with what to run instead; the CLI wrapper prints one line, exit status 2."""
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("attention", overrides=["sweep=single", "batch=paper_example", "backend=all",
                                              f"results_dir={tmp_path}", "wandb.enabled=false",
                                              "progress=false", "device=cpu"])
    with pytest.raises(harness.SweepRefused, match="GPU-only.*sweep=smoke backend=cpu"):
        run_sweep(cfg)
    for sweep in ("paper", "balance", "kernels", "gpu_smoke", "prefill_configs", "decode_configs", "pod_configs"):
        with initialize_config_dir(config_dir=CONF, version_base="1.3"):
            gpu = compose("attention", overrides=[f"sweep={sweep}", "backend=all", "device=cpu"])
        with pytest.raises(harness.SweepRefused, match=f"sweep={sweep} is GPU-only"):
            run_sweep(gpu)
    assert harness.main(cfg, ["python", "-m", "experiments.attention"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("[harness] refused: sweep=single is GPU-only")
    assert "537,600 KV tokens" in err[0]
    assert not list(tmp_path.rglob("*.csv"))


@pytest.mark.parametrize("overrides, names", [
    (["batch.chunk_len=-5"], "BatchSpec.chunk_len=-5"),
    (["model.head_dim=96"], "head_dim=96"),
    (["model.num_kv_heads=3"], "num_kv_heads=3"),
    (["batch.dtype=int8"], "dtype='int8'"),
    (["batch.page_size=7"], "page_size=7"),
    (["batch.page_size=0"], "page_size=0 is invalid"),                 # was: contiguous KV, silently
    (["batch.num_prefill=0"], "num_prefill=0 with chunk_len=96"),      # was: the chunk dropped, silently
    (["num_shards=0"], "num_shards=0 is invalid: a positive number"),
    (["shard=2", "num_shards=2"], "shard=2 is invalid: one of 0..1"),
    (["cpu_max_kv_tokens=-1"], "cpu_max_kv_tokens=-1 is invalid"),
    (["device=tpu"], "device='tpu' is invalid"),
])
def test_a_bad_value_is_refused_in_one_line_naming_it(tmp_path, capsys, overrides, names):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("attention", overrides=["sweep=single", "model=tiny", "backend=reference",
                                              f"results_dir={tmp_path}", "wandb.enabled=false",
                                              "progress=false", *overrides])
    with pytest.raises(harness.SweepRefused, match=re.escape(names)):
        run_sweep(cfg)
    assert harness.main(cfg, ["python", "-m", "experiments.attention"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("[harness] refused: ") and names in err[0], err
    assert not list(tmp_path.rglob("*.csv"))


def test_device_cuda_without_a_gpu_is_refused_saying_what_runs_here(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = sweep_cfg(tmp_path, POINTS[:1], ["reference"], device="cuda")
    with pytest.raises(harness.SweepRefused, match=r"device=cuda: there is no CUDA GPU here; device=auto"):
        run_sweep(cfg)


def test_a_refusal_on_a_cpu_never_suggests_the_command_it_refuses(tmp_path):
    """A smoke point over a small cpu_max_kv_tokens: the way out is a bigger limit, not the same command."""
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("attention", overrides=["sweep=smoke", "backend=reference", "cpu_max_kv_tokens=10",
                                              f"results_dir={tmp_path}", "wandb.enabled=false"])
    with pytest.raises(harness.SweepRefused) as e:
        run_sweep(cfg)
    assert "cpu_max_kv_tokens=910 runs it" in str(e.value) and "sweep=smoke backend=cpu" not in str(e.value)
    # Hints name the interpreter running now (the venv's), not a bare `python` from PATH.
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        gpu = compose("attention", overrides=["sweep=paper", "backend=all", "device=cpu"])
    with pytest.raises(harness.SweepRefused, match=re.escape(f"{cli.interpreter()} -m experiments.attention")):
        run_sweep(gpu)


def test_unwritable_results_folder_is_reported_before_the_first_point(tmp_path, fake_registry):
    fake_registry["good"] = backend("good", prepare=lambda b: pytest.fail("nothing may run"))
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")                           # results_dir under a file: unwritable
    with pytest.raises(OSError, match="not writable"):
        run_sweep(sweep_cfg(blocker / "sub", POINTS[:1], ["good"]))


def test_ctrl_c_ends_in_one_line_with_rows_kept_and_the_resume_command(tmp_path, fake_registry, capsys):
    calls = {"n": 0}

    def interrupted(batch):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return _correct(batch)

    fake_registry["b"] = backend("b", prepare=interrupted)
    cfg = sweep_cfg(tmp_path, POINTS[:3], ["b"])
    assert harness.main(cfg, ["python", "-m", "experiments.attention", "sweep=t"]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"[harness] interrupted: 1 rows kept in {tmp_path / 't' / 'cpu.csv'}; "
                       "resume with: python -m experiments.attention sweep=t") or torch.cuda.is_available()
    assert len(load_results(tmp_path)) == 1


def test_progress_counts_only_rows_that_run(tmp_path, fake_registry, monkeypatch):
    """Backends that cannot run here are skipped outside the progress bar: its total (and so its
    rate and ETA) counts only the (point, backend) runs that take time."""
    totals = []
    import tqdm.auto

    class Bar:
        def __init__(self, total, **kw):
            totals.append(total)
            self.n, self.total = 0, total

        def update(self, k):
            self.n += k

        def refresh(self):
            pass

        def set_postfix_str(self, *a, **k):
            pass

        def close(self):
            totals.append((self.n, self.total))
    monkeypatch.setattr(tqdm.auto, "tqdm", Bar)
    def refuses(batch):
        raise BackendUnavailable("only one prefill chunk (test)")
    fake_registry.update(ok=backend("ok"), nogpu=backend("nogpu", availability=lambda: "GPU only (test)"),
                         dec=backend("dec", computes=("decode",)), refuses=backend("refuses", prepare=refuses))
    df = run_sweep(sweep_cfg(tmp_path, POINTS[:3], ["ok", "nogpu", "dec", "refuses"]))
    assert len(df) == 12 and (df[df.backend == "nogpu"].status == "skipped").all()
    # 3 points x ok + 2 hybrid/decode points x dec run; nogpu (3) and dec on the prefill-only point skip
    # before the bar; `refuses` (3) is counted at first and leaves the count when prepare refuses.
    assert totals[0] == 8 and totals[1] == (5, 5)


def test_wandb_chatter_comes_before_our_summary(tmp_path, fake_registry, monkeypatch, capsys):
    class ChattyLogger:
        def __init__(self, *a, **kw):
            pass

        def log_row(self, row):
            pass

        def finish(self, table=None):
            print("wandb: Synced 5 W&B file(s), 1 media file(s)", file=sys.stderr)
    monkeypatch.setattr(harness, "WandbLogger", ChattyLogger)
    fake_registry["ok"] = backend("ok")
    run_sweep(sweep_cfg(tmp_path, POINTS[:1], ["ok"]))
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("[harness] ") and "1 rows" in last


def test_backend_options_reach_prepare_and_every_row(tmp_path, fake_registry):
    seen = []

    def with_options(batch, options):
        seen.append(options)
        return _correct(batch)
    fake_registry["o"] = backend("o", prepare=with_options)
    df = run_sweep(sweep_cfg(tmp_path, POINTS[:2], ["o"], backend_options={"prefill_config": "h100"}))
    assert [o.prefill_config for o in seen] == ["h100", "h100"]
    assert all(json.loads(o)["prefill_config"] == "h100" for o in df.options)
    with pytest.raises(ValueError, match="unknown backend_options"):
        run_sweep(sweep_cfg(tmp_path, POINTS[:1], ["o"], backend_options={"bogus": 1}))


def test_provenance_fills_exactly_the_schemas_provenance_columns():
    from experiments.harness.provenance import provenance
    from experiments.harness.schema import CEILING_SCHEMA, PROVENANCE_COLUMNS, SERVING_SCHEMA
    assert tuple(provenance("cpu")) == PROVENANCE_COLUMNS
    for schema in (ATTENTION_SCHEMA, SERVING_SCHEMA, CEILING_SCHEMA):
        assert list(schema)[-len(PROVENANCE_COLUMNS):] == list(PROVENANCE_COLUMNS)
