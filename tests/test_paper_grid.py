"""The paper's attention grid (experiments/harness/paper_grid.py) and the item-3 sweeps (per_chunk, policy,
ctas_per_sm): memory formula, heads per GPU, the grid's cells, the seeded stratified sample, Hydra
composition, and the decode batch that fills the H200's SMs, checked against pod's own plans. CPU only,
no kernel runs."""
from __future__ import annotations

import dataclasses
import math
from collections import Counter
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from experiments.harness import paper_grid as pg
from experiments.harness.points import expand_points
from experiments.harness.sweep import SweepRefused, refuse_on_cpu

CONF = str(Path(__file__).resolve().parents[1] / "conf")
H200_SMS = 132


def _compose(sweep: str, *overrides: str):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("attention", overrides=[f"sweep={sweep}", *overrides])


@pytest.fixture(scope="module")
def grid_cfg():
    return _compose("paper_grid")


def test_max_decode_batch_formula_by_hand():
    # Llama-3-8B, TP 1, 4K context, H200: KV budget 0.9 * 141e9 - 8.03e9 * 2 bytes of weights;
    # a token's KV: 2 (K, V) x 32 layers x 8 kv heads x 128 x 2 bytes = 131072 bytes.
    budget = 0.9 * 141e9 - 16.06e9
    assert pg.kv_bytes_per_token(32, 8, 128) == 131072
    want = math.floor(budget / (131072 * 4096))
    got = pg.max_decode_batch(4096, params=8.03e9, num_layers=32, tp=1, kv_heads_per_gpu=8, head_dim=128,
                              card_bytes=141e9)
    assert got == want == 206
    # TP 8: an eighth of the weights, one kv head a GPU.
    tp8 = pg.max_decode_batch(4096, params=8.03e9, num_layers=32, tp=8, kv_heads_per_gpu=1, head_dim=128,
                              card_bytes=141e9)
    assert tp8 == math.floor((0.9 * 141e9 - 16.06e9 / 8) / (16384 * 4096))
    # More context, fewer requests; a smaller card, fewer still.
    assert pg.max_decode_batch(20480, params=8.03e9, num_layers=32, tp=1, kv_heads_per_gpu=8, head_dim=128,
                               card_bytes=141e9) < got
    assert pg.max_decode_batch(4096, params=8.03e9, num_layers=32, tp=1, kv_heads_per_gpu=8, head_dim=128,
                               card_bytes=80e9) < got


def test_full_grid_cells_heads_and_kv(grid_cfg):
    block = {**dict(grid_cfg.sweep.generate), "sample": None}
    strata, models = pg.grid_cells(block, grid_cfg.models)
    assert {n: (m["num_q_heads"], m["num_kv_heads"]) for n, m in models.items()} == {
        "llama3_8b_tp1": (32, 8), "llama3_8b_tp2": (16, 4), "llama3_8b_tp4": (8, 2), "llama3_8b_tp8": (4, 1),
        "yi_6b_tp1": (32, 4), "yi_6b_tp2": (16, 2), "yi_6b_tp4": (8, 1)}
    assert all(m["head_dim"] == 128 for m in models.values())
    assert len(strata) == 7 * 3 * 5
    cells = [c for _, cells in strata for c in cells]
    assert len(cells) == 7 * (8 + 16 + 24 + 32 + 40 + 4 + 8 + 12 + 16 + 20 + 2 + 4 + 6 + 8 + 10) * 3 == 4410
    for (model, tp, chunk, context), cs in strata:
        assert {c["prefill_context_len"] + c["chunk_len"] for c in cs} == set(range(chunk, context + 1, chunk))
        assert {c["decode_context_len"] for c in cs} == {context}
        most = pg.max_decode_batch(context, params=float(block["models"][model]["params"]), num_layers=32,
                                   tp=tp, kv_heads_per_gpu=models[f"{model}_tp{tp}"]["num_kv_heads"],
                                   head_dim=128, card_bytes=141e9)
        assert {c["num_decode"] for c in cs} == {math.floor(f * most) for f in (0.9, 0.95, 1.0)}


def test_sample_is_stratified_seeded_and_a_subset(grid_cfg):
    block = dict(grid_cfg.sweep.generate)
    strata, _ = pg.grid_cells(block, grid_cfg.models)
    full = pg.sample_cells(strata, None)
    a = pg.sample_cells(strata, {"per_stratum": 2, "seed": 0})
    assert a == pg.sample_cells(strata, {"per_stratum": 2, "seed": 0})          # reproducible
    assert a != pg.sample_cells(strata, {"per_stratum": 2, "seed": 1})          # the seed matters
    assert len(a) == 2 * len(strata) and all(c in full for c in a)
    per = Counter((c["model"], c["chunk_len"], c["decode_context_len"]) for c in a)
    assert set(per.values()) == {2} and len(per) == len(strata)
    # A stratum's draw depends on its own key only: dropping a model leaves Yi-6B's draw as it was.
    only_yi = {**block, "models": {"yi_6b": block["models"]["yi_6b"]}}
    yi, _ = pg.grid_cells(only_yi, grid_cfg.models)
    assert pg.sample_cells(yi, {"per_stratum": 2, "seed": 0}) == [c for c in a if c["model"].startswith("yi")]
    # Nested: a bigger sample of the same seed holds the smaller one, so growing it re-uses measured rows.
    one, six = (pg.sample_cells(strata, {"per_stratum": n, "seed": 0}) for n in (1, 6))
    assert all(c in a for c in one) and all(c in six for c in a)
    # A stratum smaller than per_stratum gives all its cells.
    assert len(pg.sample_cells(strata[:1], {"per_stratum": 10**6})) == len(strata[0][1])


def test_sweep_config_expands_through_hydra_and_refuses_a_cpu(grid_cfg):
    pts = expand_points(grid_cfg.sweep, grid_cfg.models)
    assert len(pts) == 210
    assert {p.model for p in pts} == {f"llama3_8b_tp{t}" for t in (1, 2, 4, 8)} | {f"yi_6b_tp{t}" for t in (1, 2, 4)}
    p = pts[0]
    assert p.spec.page_size == 16 and p.spec.dtype == "bfloat16" and p.spec.num_prefill == 1
    # The analysis needs fa2_serial (the reference) and our two halves (the 20% filter): `all` has them.
    assert {"fa2_serial", "triton_prefill", "triton_decode"} <= set(_compose("paper_grid", "backend=all").backend.names)
    with pytest.raises(SweepRefused, match="GPU-only"):
        refuse_on_cpu(grid_cfg.sweep, pts, torch.device("cpu"), 16384)
    full = _compose("paper_grid", "sweep.generate.sample=null")
    assert full.sweep.generate.sample is None
    # The generator's models do not leak into the caller's catalog.
    assert "yi_6b_tp2" not in grid_cfg.models
    with pytest.raises(ValueError, match="generate.kind"):
        expand_points({"name": "x", "generate": {"kind": "nope"}}, grid_cfg.models)


def test_item3_sweeps_expand():
    sizes = {}
    for sweep in ("per_chunk", "policy", "ctas_per_sm"):
        cfg = _compose(sweep)
        assert cfg.sweep.gpu_only
        sizes[sweep] = expand_points(cfg.sweep, cfg.models)
    chunks = sizes["per_chunk"]
    assert len(chunks) == 64 and {p.model for p in chunks} == {"yi_6b"}
    assert sorted({c.context_len for p in chunks for c in p.spec.prefill_chunks}) == list(range(0, 16384, 512))
    assert {p.spec.num_decode for p in chunks} == {66, 67}
    assert len(sizes["policy"]) == 10 and len(sizes["ctas_per_sm"]) == 25


def test_per_chunk_decode_batch_fills_the_h200_sms_and_one_more():
    """Batch 66 of Yi-6B decodes over 16K: pod's decode plans give 264 CTAs, two per SM on 132 SMs."""
    from pod.batch import BatchSpec
    from pod.dispatch import CTAS_PER_SM, decode_kv_splits
    from pod.kernels.decode import plan_decode
    cfg = _compose("per_chunk")
    kv_heads = cfg.models.yi_6b.num_kv_heads
    fill = CTAS_PER_SM * H200_SMS // kv_heads
    assert fill == 66 and sorted({p.spec.num_decode for p in expand_points(cfg.sweep, cfg.models)}) == [fill, fill + 1]
    for batch, tiles in ((fill, 2 * H200_SMS), (fill + 1, 2 * H200_SMS + kv_heads)):
        spec = BatchSpec.build(32, kv_heads, 128, decode=[16384] * batch, page_size=16)
        assert decode_kv_splits(spec, H200_SMS) == 1          # the dispatcher does not split it
        work = plan_decode(spec, H200_SMS, kv_splits=1, device="cpu")
        assert work.num_tiles == tiles


def test_knob_configs_differ_only_in_their_knob():
    from pod.dispatch import REGISTERS_PER_SM
    from pod.kernels.configs import POD_CONFIGS

    def diff(a, b):
        a, b = dataclasses.asdict(POD_CONFIGS[a]), dataclasses.asdict(POD_CONFIGS[b])
        return {k for k in a if a[k] != b[k]}
    assert diff("policy_5050", "policy_proportional") == {"policy"}
    assert POD_CONFIGS["policy_5050"].policy == "alternating"           # 1:1 = 50:50
    assert "ctas_per_sm" in diff("ctas_2", "ctas_4")
    c4 = POD_CONFIGS["ctas_4"]
    assert 4 * c4.num_warps * 32 * c4.resolved_maxnreg() <= REGISTERS_PER_SM
    assert all(POD_CONFIGS[n].variant == "fused" for n in ("policy_5050", "policy_proportional", "ctas_2", "ctas_4"))


def test_a_tiny_paper_grid_runs_through_the_harness_on_a_cpu(tmp_path):
    """The generator end to end on tiny points: the harness expands a `generate:` block, runs the
    points (fp32 reference backend) and records each row under its TP model with the heads per GPU."""
    from experiments.harness.sweep import run_sweep
    cfg = _compose("paper_grid", "backend=reference", f"results_dir={tmp_path}", "wandb.enabled=false",
                   "progress=false")
    sweep = dict(name="tiny_grid", base=dict(num_prefill=1, page_size=16, dtype="bfloat16"), generate=dict(
        kind="paper_grid", models={"tiny": {"params": 1e3, "num_layers": 2, "tp": [1, 2]}},
        # a card that holds 2 (TP 1: 2 kv heads) or 5 (TP 2: 1 kv head) requests of 32 tokens
        card_bytes=3 * 32768 / 0.9, chunks=[16], contexts=[32], sample={"per_stratum": 1, "seed": 0}))
    from omegaconf import OmegaConf
    c = OmegaConf.to_container(cfg, resolve=True)
    df = run_sweep({**c, "sweep": sweep})
    assert len(df) == 2 and set(df["status"]) == {"ok"}
    heads = {r.model: (r.num_q_heads, r.num_kv_heads, r.num_decode) for r in df.itertuples()}
    assert {m: h[:2] for m, h in heads.items()} == {"tiny_tp1": (8, 2), "tiny_tp2": (4, 1)}
    assert heads["tiny_tp1"][2] in (1, 2) and heads["tiny_tp2"][2] in (4, 5)
    assert (df["decode_context_len"] == 32).all() and (df["chunk_len"] == 16).all()
