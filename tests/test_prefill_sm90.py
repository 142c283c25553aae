"""The Hopper prefill tile (pod/kernels/prefill_sm90.py) on a CPU: Gluon does not run in the interpreter,
so every shipped config is compiled for sm_90a here and the test asserts what makes it fast — warp
specialization (`setmaxnreg` in the PTX), wgmma, TMA, no spills, shared memory within an SM — so a
Triton upgrade that silently drops one of them fails CI. Correctness is checked on the GPU against the
fp32 reference (docs/hopper_prefill.md says how); the host-side planning is tested here."""
import pytest
import torch

from pod.batch import BatchSpec, make_batch
from pod.kernels import prefill_sm90 as S

# Every shipped config on 16-token pages (the layout with the most copies a tile), and the default
# config on the other layouts it serves: contiguous KV, fp16 on 64-token pages, head_dim 64.
DEFAULT = S.SM90_DEFAULT
LAYOUTS = ([(name, 128, "bfloat16", True, 16) for name in S.SM90_CONFIGS]
           + [(DEFAULT, 128, "bfloat16", False, 0), (DEFAULT, 128, "float16", True, 64)]
           + [(name, 64, "bfloat16", True, 16) for name in S.SM90_CONFIGS_D64])
CASES = [dict(config=S.sm90_configs(d)[name], head_dim=d, dtype=dt, paged=paged, page_size=page)
         for name, d, dt, paged, page in LAYOUTS]
IDS = [f"{name}-d{d}-{dt}-p{page}" for name, d, dt, paged, page in LAYOUTS]


@pytest.fixture(scope="module")
def reports():
    """Every shipped config compiled for sm_90a once (a child process: see compile_reports_subprocess)."""
    return S.compile_reports_subprocess([dict(c) for c in CASES])


@pytest.mark.parametrize("i", range(len(CASES)), ids=IDS)
def test_shipped_config_compiles_fast_for_sm90a(reports, i):
    r, case = reports[i], CASES[i]
    cfg, paged, page = case["config"], case["paged"], case["page_size"]
    assert r["ptxas_ok"], r.get("ptxas_error")
    assert r["spill_bytes"] == 0, r
    assert r["shared_bytes"] <= S.SM90_SHARED_LIMIT, r
    assert r["num_warps_total"] == 12, r                     # 8 consumer warps + the producer warpgroup
    assert r["setmaxnreg"] > 0, r                            # warp specialization kept
    assert r["wgmma"] > 0, r                                 # tensor cores through wgmma, not mma.sync
    copies_per_tile = cfg.block_n // page if paged and page < cfg.block_n else 1
    assert r["tma_loads"] >= 2 * copies_per_tile + 1, r     # K and V pages by TMA, and Q


def test_default_config_is_the_measured_winner():
    for d in (64, 128):
        cfg = S.default_sm90_config(d)
        assert cfg.consumers == 2 and cfg.block_n == 128 and cfg.stages == 3
        assert cfg.shared_bytes(d) + 1024 <= S.SM90_SHARED_LIMIT


@pytest.mark.parametrize("page,ok", [(None, True), (16, True), (64, True), (256, True), (4, False)])
def test_supports_names_the_layout_it_refuses(page, ok):
    spec = BatchSpec.build(32, 8, 128, prefill=[(100, 50)], page_size=page)
    why = S.sm90_supports(spec)
    assert (why is None) == ok
    if not ok:
        assert "page_size" in why
        with pytest.raises(ValueError, match="page_size"):
            S.plan_prefill_sm90(spec)


def test_plan_lists_every_query_block_heaviest_first():
    spec = BatchSpec.build(32, 8, 128, prefill=[(300, 0), (517, 1234), (1, 77)], page_size=16)
    work = S.plan_prefill_sm90(spec)
    units = work.work_units.tolist()
    assert sorted(units) == sorted([[0, b] for b in range(3)] + [[1, b] for b in range(5)] + [[2, 0]])
    cost = [spec.prefill_chunks[c].context_len + min((b + 1) * 128, spec.prefill_chunks[c].chunk_len)
            for c, b in units]
    assert cost == sorted(cost, reverse=True)
    assert work.num_tiles == len(units) * 32


def test_launch_args_describe_the_batch():
    spec = BatchSpec.build(32, 8, 64, prefill=[(70, 10), (33, 0)], page_size=16)
    batch = make_batch(spec, "cpu", seed=3)
    work = S.plan_prefill_sm90(batch, "sm90_n128_s2")
    out = torch.empty_like(batch.q_prefill)
    lse = torch.empty(batch.q_prefill.shape[:2])
    args, const = S.launch_args(batch, work, out, lse)
    names = S.prefill_sm90_kernel.arg_names
    runtime = dict(zip([n for n in names if n not in const], args))
    assert runtime["total_q_rows"] == 103
    assert runtime["total_kv_rows"] == batch.k_cache.shape[0] * 16
    assert runtime["stride_lse_tok"] == 32
    assert const["GROUP"] == 4 and const["PAGE_SIZE"] == 16 and const["PAGED"] and const["HAS_LSE"]
    assert const["CONSUMERS"] == 1 and const["STAGES"] == 2


def test_launch_refuses_a_strided_cache():
    spec = BatchSpec.build(32, 8, 128, prefill=[(64, 0)], page_size=None)
    batch = make_batch(spec, "cpu", seed=0)
    batch.k_cache = batch.k_cache.transpose(0, 1).contiguous().transpose(0, 1)
    with pytest.raises(ValueError, match="dense k_cache"):
        S.launch_args(batch, S.plan_prefill_sm90(batch), torch.empty_like(batch.q_prefill), None)


def test_unknown_config_lists_the_names():
    spec = BatchSpec.build(32, 8, 128, prefill=[(64, 0)])
    with pytest.raises(ValueError, match="sm90_n128_s3_c2"):
        S.plan_prefill_sm90(spec, "nope")


def test_auto_keeps_the_portable_tile_off_hopper_and_for_tiny_prefills(monkeypatch):
    from pod import prefill as P
    spec = BatchSpec.build(32, 8, 128, prefill=[(512, 4096)], page_size=16)
    assert P.resolve_prefill_kernel(spec, "auto", "cpu") == ("portable", None)
    assert P.resolve_prefill_kernel(spec, "h100", "cpu") == ("portable", "h100")
    assert P.resolve_prefill_kernel(spec, "sm90_n128_s2", "cpu") == ("sm90", "sm90_n128_s2")
    with pytest.raises(ValueError, match="unknown"):
        P.resolve_prefill_kernel(spec, "nope", "cpu")
    # On an sm_90 GPU: a 512-token chunk over 4K of context (37 GFLOP) -> Hopper tile; the same chunk
    # without context (2.1 GFLOP) -> portable; 1024 tokens without context (8.6 GFLOP) -> Hopper tile.
    monkeypatch.setattr(P, "on_hopper", lambda device: True)
    assert P.resolve_prefill_kernel(spec, "auto", "cuda") == ("sm90", S.SM90_DEFAULT)
    tiny = BatchSpec.build(32, 8, 128, prefill=[(512, 0)], page_size=16)
    assert tiny.prefill_flops() < P.SM90_MIN_PREFILL_FLOPS
    assert P.resolve_prefill_kernel(tiny, "auto", "cuda") == ("portable", None)
    assert P.resolve_prefill_kernel(BatchSpec.build(32, 8, 128, prefill=[(1024, 0)]), "auto", "cuda")[0] == "sm90"
    odd = BatchSpec.build(32, 8, 128, prefill=[(1024, 4096)], page_size=4)
    assert P.resolve_prefill_kernel(odd, "auto", "cuda") == ("portable", None)


def test_hopper_pod_kernel_compiles_with_both_roles_for_sm90a():
    """pod/kernels/pod_sm90.py: one persistent CTA an SM, the Hopper tile's three partitions running both
    roles. It must keep wgmma and TMA, per-partition registers (setmaxnreg), no spills, and fit an SM's
    shared memory, on paged and contiguous KV."""
    import json
    import os
    import subprocess
    import sys
    # the shipped default on both layouts, the path that loads an item's Q only after the last epilogue, and
    # the pipelined decode (S^T of the next stage in flight with O^T of this one), the lagged one (O^T one
    # stage behind) and the lazily rescaled one, the L2 policies, and items claimed at run time on both layouts
    code = ("import json; from pod.kernels.pod_sm90 import compile_report, PodSm90Config; "
            "print(json.dumps([compile_report(paged=True), compile_report(paged=False, trace=True), "
            "compile_report(PodSm90Config(overlap=False), paged=True), "
            "compile_report(PodSm90Config(decode_loop='pipe'), paged=True), "
            "compile_report(PodSm90Config(decode_loop='lag'), paged=True), "
            "compile_report(PodSm90Config(decode_loop='lazy'), paged=True), "
            "compile_report(PodSm90Config(decode_l2='evict_first', prefill_l2='evict_last'), paged=True), "
            "compile_report(PodSm90Config(decode_l2='evict_first'), paged=False), "
            "compile_report(PodSm90Config(balance='dynamic'), paged=True), "
            "compile_report(PodSm90Config(balance='dynamic'), paged=False)]))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=dict(os.environ, TRITON_INTERPRET="0"))
    assert res.returncode == 0, res.stderr[-3000:]
    reports = json.loads(res.stdout.strip().splitlines()[-1])
    # L2 policies (pod.kernels.ptx_hints): none unless asked; then every copy of the role's K/V, each of
    # them two TMA copies at head_dim 128 (128-byte swizzle: columns 0-63 and 64-127). Paged (16-token
    # pages): a decode stage's 2 items x 4 pages of K and of V; a prefill stage's 8 pages x (whole, tail
    # descriptor) x (K, V). Contiguous: one box an item half (decode), one of K and of V (prefill).
    assert all(not r["l2_hints"] for r in reports[:6] + reports[8:]), [r["l2_hints"] for r in reports]
    assert reports[6]["l2_hints"] == {"evict_first": 2 * 16, "evict_last": 2 * 32}, reports[6]
    assert reports[7]["l2_hints"] == {"evict_first": 2 * 4}, reports[7]
    for r in reports:
        assert r["num_warps_total"] == 12 and r["setmaxnreg"] > 0, r
        assert r["wgmma"] > 0 and r["tma_loads"] > 0, r
        # prefill: 64 query rows x 128 keys; decode swap-AB: 64 keys (or D) x the item's 16 q-head columns
        # (not 64 padded rows: 4x the tensor-core work, docs/hopper_pod.md)
        assert r["wgmma_shapes"].get("m64n128k16", 0) > 0 and r["wgmma_shapes"].get("m64n16k16", 0) > 0, r
        assert r["wgmma_shapes"].get("m64n64k16", 0) == 0, r
        # ptxas spills 16-48 B (the 48-register producer: the decode's K and V refills, each after its own
        # release; the dynamic schedule's claim state); anything more means a partition lost its budget.
        assert r["spill_bytes"] <= 48 and r["shared_bytes"] <= S.SM90_SHARED_LIMIT, r
