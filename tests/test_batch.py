"""BatchSpec validation, make_batch layouts, and the counting helpers (pod/batch.py)."""
import random

import pytest
import torch

from pod.batch import BatchSpec, ModelHeads, PrefillChunk, make_batch


def _build(**kw):
    args = dict(num_q_heads=8, num_kv_heads=2, head_dim=64, prefill=[(16, 8)], decode=[5])
    args.update(kw)
    return BatchSpec.build(**args)


@pytest.mark.parametrize("kwargs, field", [
    (dict(num_kv_heads=3), "heads.num_kv_heads"),          # 3 does not divide 8
    (dict(head_dim=96), "heads.head_dim"),
    (dict(num_q_heads=0), "heads.num_q_heads"),
    (dict(num_kv_heads=-2), "heads.num_kv_heads"),
    (dict(prefill=[(16, 0), (0, 4)]), "prefill_chunks[1].chunk_len"),
    (dict(prefill=[(-3, 4)]), "prefill_chunks[0].chunk_len"),
    (dict(prefill=[(16, -1)]), "prefill_chunks[0].context_len"),
    (dict(decode=[5, 0]), "decode_context_lens[1]"),
    (dict(decode=[-7]), "decode_context_lens[0]"),
    (dict(page_size=24), "page_size"),
    (dict(page_size=0), "page_size"),
    (dict(page_size=-16), "page_size"),
    (dict(dtype="float32"), "dtype"),
    (dict(dtype="int8"), "dtype"),
    (dict(prefill=[], decode=[]), "the batch is empty"),
])
def test_invalid_spec_names_the_field(kwargs, field, monkeypatch):
    # Validation happens in the constructor, before any tensor exists: make every allocator raise.
    def no_alloc(*a, **k):
        raise AssertionError("a tensor was allocated while validating a BatchSpec")
    for fn in ("empty", "zeros", "randn", "full", "tensor", "rand", "randperm"):
        monkeypatch.setattr(torch, fn, no_alloc)
    with pytest.raises(ValueError) as e:
        _build(**kwargs)
    assert field in str(e.value)


def test_valid_specs_and_normalisation():
    s = BatchSpec(ModelHeads(8, 8, 128), [PrefillChunk(3, 0)], [1, 2], dtype="float16", page_size=1)
    assert s.prefill_chunks == (PrefillChunk(3, 0),) and s.decode_context_lens == (1, 2)
    assert hash(s) == hash(BatchSpec.build(8, 8, 128, [(3, 0)], [1, 2], "float16", 1))
    assert s.kv_lens == (3, 1, 2) and s.num_prefill == 1 and s.num_decode == 2
    assert BatchSpec.build(8, 1, 64, decode=[4]).heads.group_size == 8
    assert _build(prefill=[(4, 2), (1, 0)], decode=[]).describe() == \
        "q8kv2d64 P[4@2,1@0] D[-] bfloat16 contig"
    assert _build(decode=[3, 9], page_size=16).describe() == \
        "q8kv2d64 P[16@8] D[2x[3..9]] bfloat16 paged16"


def test_counting_helpers_hand_computed():
    # heads 2q/1kv/64; chunk 4 over context 2: query i sees 2+i+1 keys -> 3+4+5+6 = 18 pairs.
    s = BatchSpec.build(2, 1, 64, prefill=[(4, 2)], decode=[3, 5])
    assert s.prefill_flops() == 4 * 64 * 2 * 18 == 9216
    assert s.decode_flops() == 4 * 64 * 2 * 8 == 4096
    # decode bytes (bf16): K+V of 3+5 tokens x 1 kv head x 64 = 2*8*64*2 = 2048; q+o 2*2*2*64*2 = 1024
    assert s.decode_bytes() == 3072
    # prefill bytes: K+V of 6 tokens: 2*6*64*2 = 1536; q+o of 4 tokens x 2 heads: 2*4*2*64*2 = 2048
    assert s.prefill_bytes() == 3584
    assert BatchSpec.build(2, 1, 64, decode=[3, 5], dtype="float16").decode_bytes() == 3072


def test_prefill_flops_match_brute_force_pair_count():
    rng = random.Random()
    chunks = [(rng.randint(1, 40), rng.randint(0, 60)) for _ in range(3)]
    s = BatchSpec.build(8, 2, 128, prefill=chunks)
    pairs = sum(1 for c, ctx in chunks for i in range(c) for j in range(ctx + c) if j <= ctx + i)
    assert s.prefill_flops() == 4 * 128 * 8 * pairs, chunks


@pytest.mark.parametrize("page_size", [None, 4, 16])
def test_make_batch_layout(page_size):
    seed = random.randrange(2**31)
    spec = BatchSpec.build(4, 2, 64, prefill=[(5, 7), (3, 0)], decode=[1, 9, 16],
                           page_size=page_size)
    b = make_batch(spec, "cpu", seed)
    assert b.q_prefill.shape == (8, 4, 64) and b.q_decode.shape == (3, 4, 64)
    assert b.q_prefill.dtype == torch.bfloat16
    assert b.q_indptr.tolist() == [0, 5, 8] and b.kv_lens.tolist() == [12, 3, 1, 9, 16]
    assert b.sm_scale == pytest.approx(64 ** -0.5)
    for t in (b.q_indptr, b.kv_lens):
        assert t.dtype == torch.int32
    if page_size is None:
        assert b.kv_indptr.tolist() == [0, 12, 15, 16, 25, 41]
        assert b.k_cache.shape == (41, 2, 64) and b.block_table is None
    else:
        p = page_size
        pages = [(n + p - 1) // p for n in (12, 3, 1, 9, 16)]
        assert b.k_cache.shape == (sum(pages), p, 2, 64)
        assert b.page_indptr.tolist() == [0] + list(torch.tensor(pages).cumsum(0).tolist())
        # Every page is used exactly once; the CSR indices and the block table agree.
        assert sorted(b.page_indices.tolist()) == list(range(sum(pages)))
        for s, n in enumerate(pages):
            a = b.page_indptr[s]
            assert b.block_table[s, :n].tolist() == b.page_indices[a:a + n].tolist()
        assert b.last_page_len.tolist() == [n - (k - 1) * p for n, k in zip((12, 3, 1, 9, 16), pages)]
        # sequence_kv gathers exactly the pages of the block table, in order.
        k, v = b.sequence_kv(3)
        assert k.shape == (9, 2, 64)
        want = torch.cat([b.k_cache[int(i)] for i in b.block_table[3, :pages[3]]])[:9]
        assert torch.equal(k, want)
    # Same seed -> same tensors; another seed -> different ones.
    again = make_batch(spec, "cpu", seed)
    assert torch.equal(again.q_prefill, b.q_prefill) and torch.equal(again.k_cache, b.k_cache)
    assert not torch.equal(make_batch(spec, "cpu", seed + 1).q_decode, b.q_decode)
    po, do = b.empty_outputs()
    assert po.shape == b.q_prefill.shape and torch.isnan(po.float()).all() and torch.isnan(do.float()).all()


# -- counts from a config (conf/batch/*.yaml, a sweep's grid): checked, never truncated -------------
HEADS = ModelHeads(8, 2, 64)


@pytest.mark.parametrize("field, value", [
    ("num_decode", -3), ("num_prefill", -1), ("chunk_len", 1.5), ("chunk_len", -16),
    ("prefill_context_len", 2.5), ("decode_context_len", -8), ("num_decode", 2.25),
    ("num_decode", True), ("num_decode", "4"), ("page_size", 16.5), ("decode_context_len", float("nan")),
])
def test_from_counts_rejects_negative_and_fractional_counts(field, value):
    counts = dict(num_prefill=1, chunk_len=16, prefill_context_len=8, num_decode=2,
                  decode_context_len=32, page_size=16)
    counts[field] = value
    with pytest.raises(ValueError) as e:
        BatchSpec.from_counts(HEADS, **counts)
    assert f"BatchSpec.{field}=" in str(e.value)


def test_from_counts_builds_the_batch_the_counts_say():
    s = BatchSpec.from_counts(HEADS, num_prefill=2, chunk_len=16, prefill_context_len=8, num_decode=3,
                              decode_context_len=32.0, page_size="null")
    assert s == BatchSpec.build(8, 2, 64, prefill=[(16, 8)] * 2, decode=[32] * 3)
    assert all(type(n) is int for n in s.decode_context_lens)
    assert BatchSpec.from_counts(HEADS, chunk_len=0, num_decode=1, decode_context_len=5,
                                 page_size=0).num_prefill == 0      # chunk_len=0: no prefill
    assert BatchSpec.from_counts(HEADS, num_prefill=0, chunk_len=16, num_decode=1,
                                 decode_context_len=5, page_size=16).page_size == 16
    with pytest.raises(ValueError, match="decode_context_len"):
        BatchSpec.from_counts(HEADS, chunk_len=16, num_decode=2, decode_context_len=0)


@pytest.mark.parametrize("kwargs, field", [
    (dict(prefill=[(1.5, 0)]), "prefill_chunks[0].chunk_len"),
    (dict(prefill=[(16, -0.5)]), "prefill_chunks[0].context_len"),
    (dict(decode=[7, 2.5]), "decode_context_lens[1]"),
])
def test_build_does_not_truncate(kwargs, field):
    with pytest.raises(ValueError) as e:
        _build(**kwargs)
    assert field in str(e.value)


@pytest.mark.parametrize("override, field", [("batch.num_decode=-3", "num_decode"),
                                             ("batch.chunk_len=1.5", "chunk_len")])
def test_hydra_override_rejected_before_anything_runs(override, field, tmp_path):
    """The command line a user types: the point is refused in one line naming the field (no traceback),
    no row is written."""
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "experiments.attention", "sweep=single", "batch=hybrid_small",
           "backend=cpu", override, f"results_dir={tmp_path / 'results'}", "wandb.enabled=false",
           f"hydra.run.dir={tmp_path / 'hydra'}"]
    p = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=300)
    out = p.stdout + p.stderr
    assert p.returncode == 2, out
    assert len(p.stderr.strip().splitlines()) == 1, out[-3000:]
    assert p.stderr.startswith("[harness] refused: sweep=single: BatchSpec."), out[-3000:]
    assert f"BatchSpec.{field}=" in out and "Traceback" not in out, out[-3000:]
    assert not list((tmp_path / "results").rglob("*.csv")), "a row was written for an invalid point"
