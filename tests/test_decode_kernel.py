"""Split-KV decode kernel, its plan and the LSE merge, through the Triton interpreter (CPU).

Every kernel test draws fresh random inputs, poisons the output with NaN and compares the whole output
with the fp32 reference; shapes are ragged (context 1, lengths that are not multiples of BLOCK_N or the
page size) and the batches hold a prefill chunk first so the decode requests are not sequence 0.
"""
import itertools
import math
import random

import pytest
import torch
import triton
import triton.language as tl

from pod.batch import BatchSpec, make_batch
from pod.kernels.common import LN2
from pod.kernels.decode import (choose_kv_chunk_len, choose_kv_chunk_len_balanced, decode, decode_tile,
                                lpt_makespan, plan_decode)
from pod.kernels.merge import merge_partials
from pod.reference import max_rel_error, reference, reference_decode
from baselines.registry import get_backend

TOL = 1e-2


def _seed() -> int:
    return random.randrange(1 << 30)


def _ragged(n: int, hi: int, rng: random.Random) -> list[int]:
    """n context lengths in [1, hi], always including 1 and one length past `hi - 16`."""
    lens = [1, hi - rng.randrange(1, 15)] + [rng.randrange(1, hi + 1) for _ in range(n - 2)]
    rng.shuffle(lens)
    return lens[:n]


def _check(batch, work, out):
    assert out.dtype == batch.q_decode.dtype and out.shape == batch.q_decode.shape
    assert torch.isfinite(out.float()).all(), "decode output not fully written (NaN poison left)"
    err = max_rel_error(out, reference_decode(batch))
    assert err <= TOL, f"max rel error {err:.3g} > {TOL} ({batch.spec.describe()}, splits {work.splits})"


# (num_q_heads, num_kv_heads, head_dim, dtype, page_size, plan kwargs, split expectation)
CASES = [
    pytest.param(8, 2, 64, "bfloat16", None, {}, "single", id="gqa4-d64-bf16-contig-single"),
    pytest.param(8, 2, 128, "float16", 16, dict(kv_splits=3), "multi", id="gqa4-d128-fp16-page16-split3"),
    pytest.param(8, 1, 64, "bfloat16", 32, dict(kv_splits=4, fuse_merge=True), "multi",
                 id="gqa8-d64-bf16-page32-split4-fusedmerge"),
    pytest.param(4, 4, 64, "float16", 64, dict(kv_splits=2), "multi", id="mha-d64-fp16-page64>blockn"),
    pytest.param(2, 2, 128, "bfloat16", None, dict(kv_splits=5, block_n=32), "multi",
                 id="mha-d128-bf16-contig-split5-bn32"),
    pytest.param(8, 2, 64, "float16", 16, dict(kv_splits=2, block_n=32), "multi",
                 id="gqa4-d64-fp16-page16<blockn"),
    pytest.param(16, 2, 64, "bfloat16", 128, dict(target_ctas=24, min_kv_chunk_len=16, split_policy="fit"),
                 "variable",
                 id="gqa8-d64-bf16-page128-heuristic-splits"),
]


@pytest.mark.parametrize("hq,hkv,d,dtype,page_size,plan_kw,expect", CASES)
def test_decode_matches_reference(hq, hkv, d, dtype, page_size, plan_kw, expect):
    rng = random.Random(_seed())
    lens = _ragged(4, 90, rng)
    spec = BatchSpec.build(hq, hkv, d, prefill=[(rng.randrange(1, 20), rng.randrange(0, 30))],
                           decode=lens, dtype=dtype, page_size=page_size)
    batch = make_batch(spec, seed=_seed())
    work = plan_decode(batch, **plan_kw)
    if expect == "single":
        assert max(work.splits) == 1 and not work.needs_merge
    elif expect == "multi":
        assert max(work.splits) > 1 and work.needs_merge
    else:   # the heuristic gives longer requests more splits
        assert len(set(work.splits)) > 1
        assert work.num_tiles <= 24
    out = torch.full_like(batch.q_decode, float("nan"))
    work.part_o.fill_(float("nan"))        # the merge must read only partials this launch wrote
    work.part_lse.fill_(float("nan"))
    assert decode(batch, work, out) is out
    _check(batch, work, out)


def test_decode_large_values_and_repeat_launch():
    """Scores far from 0 (scale 4) stress the running max; a second launch of the same plan (the fused
    merge's counters must have been reset by the first) gives the same output."""
    spec = BatchSpec.build(8, 2, 64, decode=[70, 33, 1], dtype="float16", page_size=16)
    batch = make_batch(spec, seed=_seed(), scale=2.0)
    work = plan_decode(batch, kv_splits=3, fuse_merge=True)
    assert work.needs_merge
    out1 = decode(batch, work, torch.full_like(batch.q_decode, float("nan")))
    assert int(work.merge_counters.abs().sum()) == 0, "fused-merge counters not reset"
    out2 = decode(batch, work, torch.full_like(batch.q_decode, float("nan")))
    _check(batch, work, out1)
    assert torch.equal(out1, out2)


# -- the merge kernel on its own ------------------------------------------------------------------
def test_merge_kernel_matches_torch_lse_merge():
    gen = torch.Generator().manual_seed(_seed())
    hq, d = 6, 64
    splits = [3, 1, 2, 5]               # request 1 has one split: no partial rows, left untouched
    part_indptr = [0]
    for s in splits:
        part_indptr.append(part_indptr[-1] + (s if s > 1 else 0))
    rows = part_indptr[-1]
    part_o = torch.randn(rows, hq, d, generator=gen)
    part_lse = torch.randn(rows, hq, generator=gen) * 8        # base 2
    part_lse[0, 0] = float("-inf")                               # a split that saw no key
    merge_reqs = [r for r, s in enumerate(splits) if s > 1]
    out = torch.full((len(splits), hq, d), float("nan"), dtype=torch.bfloat16)
    i32 = lambda x: torch.tensor(x, dtype=torch.int32)            # noqa: E731
    merge_partials(i32(merge_reqs), i32(part_indptr), part_o, part_lse, out)

    for r in range(len(splits)):
        if r not in merge_reqs:
            assert torch.isnan(out[r].float()).all(), "a single-split request's row was written"
            continue
        a, b = part_indptr[r], part_indptr[r + 1]
        lse_nat = part_lse[a:b] * LN2                            # [S, Hq] natural log
        w = torch.softmax(lse_nat, dim=0)                        # exp(lse_s) / sum exp(lse)
        ref = (w[:, :, None] * part_o[a:b]).sum(0)
        torch.testing.assert_close(out[r].float(), ref, atol=2e-2, rtol=1e-2)


# -- the plan: shape-only host logic --------------------------------------------------------------
def test_plan_covers_every_key_once_and_aligns_splits():
    rng = random.Random(_seed())
    lens = [rng.randrange(1, 5000) for _ in range(7)] + [1, 4096]
    spec = BatchSpec.build(32, 8, 128, prefill=[(16, 0)], decode=lens, page_size=16)
    for kw in (dict(num_sms=132), dict(num_sms=132, kv_splits=4), dict(target_ctas=300, block_n=64),
               dict(kv_chunk_len=100, block_n=32), dict(kv_splits=1)):
        work = plan_decode(spec, device="cpu", **kw)
        w = work.work.tolist()
        align = (work.config or {}).get("BLOCK_N", 128)
        assert work.seq_offset == 1 and work.num_tiles == len(w) * 8
        assert [a for a, b in zip(w, w[1:]) if (a[2] - a[1]) < (b[2] - b[1])] == [], "not longest first"
        part = work.part_indptr.tolist()
        for r, n in enumerate(lens):
            mine = sorted((s, e, p) for q, s, e, p in w if q == r)
            assert len(mine) == work.splits[r]
            assert mine[0][0] == 0 and mine[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(mine, mine[1:])), "splits not contiguous"
            assert all(s % align == 0 and e > s for s, e, _ in mine)
            rows = [p for _, _, p in mine]
            if len(mine) == 1:
                assert rows == [-1] and part[r + 1] == part[r]
            else:
                assert rows == list(range(part[r], part[r + 1]))
        assert work.part_o.shape[0] >= part[-1] and work.merge_reqs.tolist() == \
            [r for r, s in enumerate(work.splits) if s > 1]
        if kw.get("kv_splits"):
            assert max(work.splits) <= kw["kv_splits"]


def test_choose_kv_chunk_len_fills_but_does_not_exceed_target():
    # 8 requests x 8K, 8 kv heads on 132 SMs x 2: 64 tiles unsplit -> split to <= 264 tiles.
    chunk = choose_kv_chunk_len([8192] * 8, 8, 264, 128, 256)
    tiles = 8 * math.ceil(8192 / chunk) * 8
    assert tiles <= 264 and 8 * math.ceil(8192 / (chunk - 128)) * 8 > 264
    # Enough tiles already: one split (chunk covers the longest request).
    assert choose_kv_chunk_len([8192] * 64, 8, 264, 128, 256) == 8192
    # The balanced policy also splits a batch that fills 1.2 waves unsplit, and not one at 1.94 waves.
    assert choose_kv_chunk_len_balanced([8192] * 40, 8, 264, 128, 256) < 8192
    assert choose_kv_chunk_len_balanced([8192] * 64, 8, 264, 128, 256) == 8192
    assert choose_kv_chunk_len_balanced([8192] * 8, 8, 264, 128, 256) == chunk
    # Never below the minimum chunk, even if that leaves the GPU part-empty.
    assert choose_kv_chunk_len([300], 1, 1000, 64, 256) == 256
    assert choose_kv_chunk_len([300], 1, 1000, 64, 200) == 256   # rounded up to the alignment
    assert choose_kv_chunk_len_balanced([300], 1, 1000, 64, 200) == 256


def test_lpt_makespan():
    assert lpt_makespan([5, 4, 3, 3, 1], 2) == 8          # {5, 3} and {4, 3, 1}
    assert lpt_makespan([7, 1, 1], 8) == 7 and lpt_makespan([], 4) == 0


def _balanced_chunk_brute(lens, hkv, target, align, min_len, overhead=128, max_candidates=32):
    """choose_kv_chunk_len_balanced's definition, run as written: LPT for every candidate that fits."""
    longest = -(-max(lens) // align) * align
    min_chunk = max(align, -(-min_len // align) * align)
    if len(lens) * hkv >= 4 * target or longest <= min_chunk:
        return longest
    best, best_cost = longest, None
    for chunk in sorted({max(min_chunk, -(-(-(-max(lens) // s)) // align) * align)
                         for s in range(1, max_candidates + 1)}, reverse=True):
        tiles = [min(chunk, n - i) + overhead for n in lens for i in range(0, n, chunk) for _ in range(hkv)]
        if len(tiles) > 8 * target:
            break
        cost = lpt_makespan(tiles, target)
        if best_cost is None or cost < best_cost:
            best, best_cost = chunk, cost
    return best


@pytest.mark.parametrize("seed", range(3))
def test_balanced_chunk_is_the_brute_force_choice(seed):
    """The balanced split rule skips LPT where a lower bound rules a candidate out: the same chunk as LPT
    on every candidate, on batches like a serving engine's (every context different) and uniform ones."""
    rng = random.Random(seed)
    for _ in range(60):
        n = rng.randint(1, 70)
        lens = rng.choice([[rng.randint(1, 20000) for _ in range(n)], [rng.choice([2048, 8192])] * n,
                           [16384 + rng.randint(0, 900) for _ in range(n)]])
        hkv, target = rng.choice([1, 4, 8, 32]), rng.choice([132, 264])
        args = (lens, hkv, target, rng.choice([64, 128]), 256)
        assert choose_kv_chunk_len_balanced(*args) == _balanced_chunk_brute(*args)


PER_REQUEST_CHUNKS = [random.Random(5).choice([100, 512, 2048, 4096]) for _ in range(39)]


@pytest.mark.parametrize("mode", [dict(), dict(kv_splits=3), dict(kv_chunk_len=1000),
                                  dict(kv_chunk_lens=PER_REQUEST_CHUNKS)], ids=["default", "splits", "chunk", "chunks"])
def test_plan_items_are_each_requests_splits_longest_first(mode):
    """plan_decode's work rows: (request, first key, end key, partial row or -1) for every split of every
    request, longest first and in request order among equals; partial rows numbered request by request.
    kv_chunk_lens: each request's own split length (64-aligned), the plan's kv_chunk_len their largest."""
    rng = random.Random(11)
    lens = [rng.randint(1, 9000) for _ in range(37)] + [1, 4096]
    spec = BatchSpec.build(8, 2, 64, decode=lens, page_size=16)
    work = plan_decode(spec, 132, block_n=64, device="cpu", **mode)
    if "kv_chunk_lens" in mode:
        assert work.kv_chunk_len == max(math.ceil(c / 64) * 64 for c in PER_REQUEST_CHUNKS)
    rows, parts = [], 0
    for r, n in enumerate(lens):
        c = math.ceil(math.ceil(n / mode["kv_splits"]) / 64) * 64 if "kv_splits" in mode else \
            math.ceil(PER_REQUEST_CHUNKS[r] / 64) * 64 if "kv_chunk_lens" in mode else work.kv_chunk_len
        s = -(-n // c)
        assert work.splits[r] == s
        rows += [(r, i * c, min(n, (i + 1) * c), parts + i if s > 1 else -1) for i in range(s)]
        parts += s if s > 1 else 0
    rows.sort(key=lambda it: it[1] - it[2])
    assert [tuple(x) for x in work.work.tolist()] == rows
    assert work.part_indptr.tolist() == [0, *itertools.accumulate(s if s > 1 else 0 for s in work.splits)]
    assert work.part_indptr[-1] == parts and work.part_o.shape[0] == max(parts, 1)
    assert work.merge_reqs.tolist() == [r for r, s in enumerate(work.splits) if s > 1]
    with pytest.raises(ValueError, match="kv_splits=0"):
        plan_decode(spec, 132, kv_splits=0, device="cpu")
    with pytest.raises(ValueError, match="kv_chunk_lens has 2 entries"):
        plan_decode(spec, 132, kv_chunk_lens=[64, 64], device="cpu")


# -- decode_tile reused from another kernel (as the fused POD kernel does) ------------------------
@triton.jit
def _reversed_tiles_kernel(num_tiles, args,
                           NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr,
                           PAGED: tl.constexpr, FUSE_MERGE: tl.constexpr):
    # Tiles in the opposite order of the plain kernel: a split's partner splits arrive in another order.
    decode_tile(num_tiles - 1 - tl.program_id(0), args,
                NUM_KV_HEADS, GROUP, HEAD_DIM, BLOCK_M, BLOCK_N, PAGE_SIZE, PAGED, FUSE_MERGE)


def test_decode_tile_is_reusable_with_fused_merge():
    spec = BatchSpec.build(8, 2, 64, prefill=[(3, 5)], decode=[50, 7, 33], dtype="bfloat16", page_size=16)
    batch = make_batch(spec, seed=_seed())
    work = plan_decode(batch, kv_splits=3, block_n=16, fuse_merge=True)
    out = torch.full_like(batch.q_decode, float("nan"))
    _reversed_tiles_kernel[(work.num_tiles,)](work.num_tiles, work.tile_args(batch, out),
                                             **work.tile_constexprs(block_n=16))
    _check(batch, work, out)


# -- through the registry ----------------------------------------------------------------------------
def test_triton_decode_and_serial_backends_match_reference():
    spec = BatchSpec.build(8, 2, 64, prefill=[(20, 9), (5, 0)], decode=[1, 45, 31], dtype="bfloat16",
                           page_size=16)
    batch = make_batch(spec, seed=_seed())
    ref_p, ref_d = reference(batch)
    dec = get_backend("triton_decode").prepare(batch)()
    assert dec.prefill is None
    assert max_rel_error(dec.decode, ref_d) <= TOL
    out = get_backend("triton_serial").prepare(batch)()
    assert max_rel_error(out.prefill, ref_p) <= TOL
    assert max_rel_error(out.decode, ref_d) <= TOL


# -- the real (non-interpreted) kernel builds for the H100 -----------------------------------------
def test_decode_kernel_compiles_for_sm90_with_pipelined_loads():
    """Compiles the GPU kernel for sm_90 (Triton's bundled ptxas, no GPU needed) in a subprocess, since
    this process runs the interpreter: catches code only the interpreter accepts, register spills, and
    K/V loads that fell out of the cp.async software pipeline."""
    import json
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-m", "pod.kernels.decode", "--sm90-report"], env=env,
                         capture_output=True, text=True, timeout=300,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert res.returncode == 0, res.stderr[-3000:]
    reports = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    assert len(reports) == 5
    for r in reports:
        assert r["cp_async"] > 0, f"K/V loads not pipelined: {r}"
        # The fused merge adds a second loop to the tile's epilogue: a few spilled bytes are tolerated.
        assert (r["spill_bytes"] or 0) <= (64 if r["fuse_merge"] else 0), f"register spills: {r}"
        assert r["shared_bytes"] <= 160 * 1024, r


def test_autotuned_launch_path_passes_every_argument(monkeypatch):
    """The GPU path launches the autotuned kernel without BLOCK_N; the interpreter cannot autotune, so
    stand in for the autotuner with a launch that picks BLOCK_N itself and check the result."""
    import pod.kernels.decode as dec

    picked = {}

    class FakeAutotuner:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                assert "BLOCK_N" not in kwargs and "num_stages" not in kwargs
                picked.update(kwargs)
                return dec._decode_kernel[grid](*args, BLOCK_N=16, **kwargs)
            return launch

    monkeypatch.setattr(dec, "_decode_kernel_autotuned", FakeAutotuner())
    spec = BatchSpec.build(8, 2, 64, prefill=[(4, 4)], decode=[1, 60, 23], dtype="bfloat16")
    batch = make_batch(spec, seed=_seed())
    work = plan_decode(batch, kv_splits=2)
    work.config = None                      # as on the GPU: BLOCK_N left to the autotuner
    out = dec.decode(batch, work, torch.full_like(batch.q_decode, float("nan")))
    assert picked["GROUP"] == 4 and picked["PAGED"] is False
    _check(batch, work, out)
