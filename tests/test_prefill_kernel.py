"""Our Triton chunked-prefill kernel, run through the Triton interpreter against the fp32 reference.

Shapes are small (8 q heads, tens of tokens) but ragged: chunk lengths, contexts and page sizes are not
multiples of the block sizes, so every masked edge of the kernel is exercised.
"""
import json
import math
import zlib

import pytest
import torch
import triton
import triton.language as tl

import pod.kernels  # noqa: F401  (installs the interpreter fixes)
from pod.batch import BatchSpec, make_batch
from pod.kernels.common import online_softmax_update, online_softmax_update_qk, softmax_finalize
from pod.kernels.prefill import (PrefillConfig, plan_prefill, plan_units, prefill, reference_prefill_lse)
from pod.reference import max_rel_error, reference_prefill

TOL = 1e-2          # max |out - ref| / max |ref|
LSE_TOL = 1e-3      # max |lse2 - ref| (base 2): lse2 is computed in fp32 from fp32 scores


def run_and_check(spec: BatchSpec, seed: int, config=None):
    batch = make_batch(spec, seed=seed)
    work = plan_prefill(batch, config)
    out, _ = batch.empty_outputs()                                   # NaN-poisoned
    lse = torch.full(batch.q_prefill.shape[:2], float("nan"))
    got, got_lse = prefill(batch, work, out=out, lse=lse)
    assert got is out and got_lse is lse
    assert torch.isfinite(out).all(), "some output rows were never written"
    assert torch.isfinite(lse).all(), "some LSE entries were never written"
    ref, ref_lse = reference_prefill_lse(batch)
    err = max_rel_error(out, ref)
    assert err <= TOL, f"{spec.describe()} seed={seed}: rel err {err:.3g}"
    # The module's own reference must agree with the project's ground truth.
    assert max_rel_error(ref, reference_prefill(batch)) < 1e-5
    lse_err = float((lse - ref_lse).abs().max())
    assert lse_err <= LSE_TOL, f"{spec.describe()} seed={seed}: lse err {lse_err:.3g}"
    return out, lse


# (q heads, kv heads, head_dim, dtype, page_size, [(chunk_len, context_len), ...]).
# Interpreter config: BLOCK_M = BLOCK_N = 16.
CASES = [
    pytest.param(8, 8, 64, "bfloat16", None, [(37, 0), (20, 45), (5, 3)], id="contig-g1-d64-bf16"),
    pytest.param(8, 2, 128, "float16", None, [(33, 0), (17, 70)], id="contig-g4-d128-fp16"),
    pytest.param(8, 1, 64, "bfloat16", 16, [(40, 23), (9, 0)], id="paged16-g8-d64-bf16"),
    pytest.param(8, 2, 128, "bfloat16", 32, [(29, 50), (3, 1)], id="paged32-g4-d128-bf16"),
    pytest.param(8, 8, 64, "float16", 8, [(21, 13), (16, 0)], id="paged8(<BLOCK_N)-g1-d64-fp16"),
]


@pytest.mark.parametrize("hq,hkv,d,dtype,page,chunks", CASES)
def test_prefill_matches_reference(hq, hkv, d, dtype, page, chunks):
    spec = BatchSpec.build(hq, hkv, d, prefill=chunks, dtype=dtype, page_size=page)
    run_and_check(spec, seed=zlib.crc32(spec.describe().encode()))   # distinct, reproducible


@pytest.mark.parametrize("page", [16, 64], ids=["page<BLOCK_N", "page>BLOCK_N"])
def test_explicit_config_and_page_sizes(page):
    """BLOCK_M = BLOCK_N = 32: pages of 16 (several pages per KV tile) and of 64 (one table lookup a tile)."""
    spec = BatchSpec.build(8, 4, 64, prefill=[(45, 70), (12, 0)], page_size=page)
    run_and_check(spec, seed=page, config=PrefillConfig(block_m=32, block_n=32, num_warps=4, num_stages=1))


def test_decodes_in_the_batch_are_left_alone():
    """Prefill chunks are sequences 0..P-1; decode sequences after them must not change the result."""
    spec = BatchSpec.build(8, 2, 64, prefill=[(18, 9)], decode=[7, 40], page_size=16)
    run_and_check(spec, seed=5)


def test_without_lse_writes_output_only():
    batch = make_batch(BatchSpec.build(8, 2, 64, prefill=[(19, 6)]), seed=11)
    out, lse = prefill(batch, plan_prefill(batch), out=batch.empty_outputs()[0], return_lse=False)
    assert lse is None
    assert max_rel_error(out, reference_prefill(batch)) <= TOL


def test_plan_lists_every_block_once_heaviest_first():
    spec = BatchSpec.build(8, 2, 64, prefill=[(100, 0), (20, 500), (1, 3)])
    units, cost = plan_units(spec, block_m=32)
    expected = {(0, b) for b in range(4)} | {(1, 0)} | {(2, 0)}
    assert sorted(units) == sorted(expected) and len(units) == len(expected)
    assert cost == sorted(cost, reverse=True)
    assert units[0] == (1, 0) and cost[0] == 520          # 20 queries over a 500-token context
    assert dict(zip(units, cost))[(0, 3)] == 100 and dict(zip(units, cost))[(0, 0)] == 32
    work = plan_prefill(spec, PrefillConfig(block_m=32, block_n=32))
    assert work.num_tiles == len(units) * 8 and work.group == 4
    assert work.work_units.dtype == torch.int32 and work.work_units.tolist() == [list(u) for u in units]
    assert not work.paged and work.constexprs()["BLOCK_N"] == 32


def test_plan_rejects_blocks_too_small_for_dot():
    spec = BatchSpec.build(8, 2, 64, prefill=[(10, 0)])
    with pytest.raises(ValueError, match="block_m and block_n"):
        plan_prefill(spec, PrefillConfig(block_m=8, block_n=16))
    with pytest.raises(ValueError, match="unknown"):
        plan_prefill(spec, "no-such-config")


def test_backend_registered_and_correct():
    from baselines.registry import get_backend
    backend = get_backend("triton_prefill")
    assert backend.computes == {"prefill"} and backend.layouts == {"contiguous", "paged"}
    batch = make_batch(BatchSpec.build(8, 8, 128, prefill=[(23, 17)], decode=[4], page_size=16), seed=3)
    assert backend.unavailable_reason(batch) is None
    res = backend.prepare(batch)()
    assert res.decode is None
    assert max_rel_error(res.prefill, reference_prefill(batch)) <= TOL


@triton.jit
def _softmax_steps_kernel(S, O_out, LSE_out, V, scale, N_TILES: tl.constexpr, M: tl.constexpr,
                          N: tl.constexpr, D: tl.constexpr, RAW_QK: tl.constexpr):
    # S: [N_TILES, M, N] scores (-inf = masked), exp2 domain once multiplied by `scale` (RAW_QK) or
    # already (not RAW_QK); V: [N_TILES, N, D]; out [M, D], lse [M].
    rm, rn, rd = tl.arange(0, M), tl.arange(0, N), tl.arange(0, D)
    m_i = tl.full([M], float("-inf"), tl.float32)
    l_i = tl.zeros([M], tl.float32)
    acc = tl.zeros([M, D], tl.float32)
    for t in range(N_TILES):
        s = tl.load(S + t * M * N + rm[:, None] * N + rn[None, :])
        if RAW_QK:
            p, m_i, l_i, acc = online_softmax_update_qk(m_i, l_i, acc, s, scale)
        else:
            p, m_i, l_i, acc = online_softmax_update(m_i, l_i, acc, s)
        v = tl.load(V + t * N * D + rn[:, None] * D + rd[None, :])
        acc += tl.sum(p[:, :, None] * v[None, :, :], 1)
    out, lse2 = softmax_finalize(m_i, l_i, acc)
    tl.store(O_out + rm[:, None] * D + rd[None, :], out)
    tl.store(LSE_out + rm, lse2)


@pytest.mark.parametrize("raw_qk", [False, True], ids=["update", "update_qk"])
def test_online_softmax_helpers_handle_fully_masked_rows(raw_qk):
    """The shared helpers: exact softmax over several tiles; a row masked in a whole tile (or in all
    tiles) gives no NaN, and a row that saw no key yields output 0 and lse2 = -inf."""
    tiles, m, n, d = 3, 16, 16, 16
    s = torch.randn(tiles, m, n) * 3
    s[0, 2] = float("-inf")                 # row 2 masked in the first tile only
    s[:, 5] = float("-inf")                 # row 5 masked everywhere
    v = torch.randn(tiles, n, d)
    out, lse = torch.full((m, d), float("nan")), torch.full((m,), float("nan"))
    scale = 0.37
    _softmax_steps_kernel[(1,)](s / scale if raw_qk else s, out, lse, v, scale, tiles, m, n, d, raw_qk)
    s_all = s.transpose(0, 1).reshape(m, tiles * n)
    w = torch.softmax(s_all * math.log(2), -1)                # 2^s = e^(s ln 2)
    ref = w @ v.reshape(tiles * n, d)
    keep = torch.arange(m) != 5
    assert torch.allclose(out[keep], ref[keep], atol=1e-5)
    assert torch.allclose(lse[keep], torch.logsumexp(s_all[keep] * math.log(2), -1) / math.log(2), atol=1e-5)
    assert torch.equal(out[5], torch.zeros(d)) and lse[5] == float("-inf")


def test_sm90_compile_fits_two_ctas_per_sm_and_pipelines():
    """Compile for sm_90 with the bundled ptxas (no GPU needed; the interpreter must be off, hence the
    subprocess). The "fused" configs must leave room for a second CTA on the same SM (<= 100 KB shared
    memory; fused_m64 also in registers), nothing may spill, K/V loads must be pipelined (cp.async)
    into wgmma."""
    import json
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmds = [["--sm90", "fused", "h100", "fused_m64"], ["--sm90", "fused", "h100", "--page-size", "16"]]
    reports = []
    for args in cmds:
        res = subprocess.run([sys.executable, "-m", "pod.kernels.prefill", *args], env=env,
                             capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        reports += [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    fused_contig, h100, m64, fused_paged, h100_paged = reports
    for r in (h100, h100_paged):
        assert r["cp_async"] > 0 and r["wgmma"] > 0, r
    for r in (fused_contig, fused_paged, m64):
        assert r["shared_bytes"] <= 100 * 1024, r
        assert r["cp_async"] > 0 and r["wgmma"] > 0, r
    # fused_m64: two CTAs of 4 warps fit the SM's 64K registers without a register cap.
    assert 2 * 4 * 32 * m64["registers"] <= 65536, m64
    for r in reports:
        assert r["spill_bytes"] == 0, r


@pytest.mark.parametrize("page,block_n", [(8, 32), (16, 32), (64, 16)],
                         ids=["page<BLOCK_N", "page=BLOCK_N/2", "page>BLOCK_N"])
def test_paged_kv_with_pages_smaller_and_larger_than_a_tile_matches_reference(page, block_n):
    """One block-table entry a key: chunks long enough for several unmasked KV tiles, contexts ending
    mid-page, a chunk with no context (no unmasked tile)."""
    spec = BatchSpec.build(8, 2, 64, prefill=[(40, 77), (19, 0), (5, 2 * block_n + 3)], page_size=page)
    cfg = PrefillConfig(block_m=16, block_n=block_n, num_warps=4, num_stages=1)
    assert plan_prefill(spec, cfg).constexprs()["BLOCK_N"] == block_n
    run_and_check(spec, seed=100 * page + block_n, config=cfg)


def test_named_configs_are_checked_and_timed_by_the_harness(tmp_path):
    """Comparing prefill configs is a sweep over the harness (conf/sweep/prefill_configs.yaml on a GPU):
    here in the interpreter, two named configs on a paged point, each row checked against the reference
    and recording its config; an unknown name is an error row that says which names exist."""
    from experiments.harness.sweep import run_sweep
    rows = []
    for name in ("fused_small", "interpret", "no-such-config"):
        cfg = dict(sweep=dict(name="pc", base=dict(model="m", page_size=16, chunk_len=20, prefill_context_len=37)),
                   models={"m": dict(num_q_heads=4, num_kv_heads=1, head_dim=64)},
                   backend=dict(names=["triton_prefill"]), results_dir=str(tmp_path / name), progress=False,
                   wandb=dict(enabled=False), backend_options=dict(prefill_config=name))
        cfg["sweep"]["points"] = [{}]
        rows.append(run_sweep(cfg).iloc[0])
    small, interp, unknown = rows
    for r in (small, interp):
        assert r.status == "ok" and r.prefill_err <= TOL, r
    assert json.loads(small.backend_config)["block_n"] == 32 and json.loads(interp.backend_config)["block_n"] == 16
    assert json.loads(small.options)["prefill_config"] == "fused_small"
    assert unknown.status == "error" and "no-such-config" in unknown.reason and "fused_m64" in unknown.reason
