"""The fp32 reference (pod/reference.py) against an independent naive loop, and max_rel_error."""
import math
import random

import pytest
import torch

from pod.batch import BatchSpec, make_batch
from pod.reference import max_rel_error, reference


def naive(batch):
    """Attention one (query, head) at a time, straight from the definition, in float64."""
    spec, hq = batch.spec, batch.spec.heads.num_q_heads
    group = spec.heads.group_size
    outs = []
    queries = []  # (q row tensor [Hq, D], sequence, position of the query)
    for i, c in enumerate(spec.prefill_chunks):
        a = int(batch.q_indptr[i])
        queries += [(batch.q_prefill[a + t], i, c.context_len + t) for t in range(c.chunk_len)]
    for j, n in enumerate(spec.decode_context_lens):
        queries.append((batch.q_decode[j], spec.num_prefill + j, n - 1))
    for q, s, pos in queries:
        k, v = batch.sequence_kv(s)
        row = torch.empty(hq, spec.heads.head_dim, dtype=torch.float64)
        for h in range(hq):
            kh, vh = k[: pos + 1, h // group].double(), v[: pos + 1, h // group].double()
            scores = [float(q[h].double() @ kh[t]) * batch.sm_scale for t in range(pos + 1)]
            m = max(scores)
            w = torch.tensor([math.exp(x - m) for x in scores], dtype=torch.float64)
            row[h] = (w[:, None] * vh).sum(0) / w.sum()
        outs.append(row)
    n_pre = spec.num_prefill_tokens
    return outs[:n_pre], outs[n_pre:]


@pytest.mark.parametrize("heads, page_size, dtype", [
    ((4, 2, 64), None, "bfloat16"),    # GQA 2, contiguous
    ((4, 1, 64), 4, "float16"),        # GQA 4, paged, pages smaller than the sequences
    ((2, 2, 128), 16, "bfloat16"),     # MHA, head_dim 128, one page a sequence
])
def test_reference_matches_naive_loop(heads, page_size, dtype):
    seed = random.randrange(2**31)
    rng = random.Random(seed)
    spec = BatchSpec.build(*heads, prefill=[(rng.randint(1, 6), rng.randint(1, 9)), (rng.randint(1, 4), 0)],
                           decode=[1, rng.randint(2, 19)], dtype=dtype, page_size=page_size)
    batch = make_batch(spec, "cpu", seed)
    ref_p, ref_d = reference(batch)
    want_p, want_d = naive(batch)
    assert ref_p.dtype == torch.float32 and ref_p.shape == batch.q_prefill.shape
    assert ref_d.shape == batch.q_decode.shape
    torch.testing.assert_close(ref_p.double(), torch.stack(want_p), atol=1e-5, rtol=1e-5,
                               msg=lambda m: f"seed={seed} {spec.describe()}: {m}")
    torch.testing.assert_close(ref_d.double(), torch.stack(want_d), atol=1e-5, rtol=1e-5,
                               msg=lambda m: f"seed={seed} {spec.describe()}: {m}")


def test_reference_is_causal_and_uses_context():
    # Changing a key the query cannot see leaves its output unchanged; a key it sees changes it.
    seed = random.randrange(2**31)
    spec = BatchSpec.build(2, 1, 64, prefill=[(4, 3)])
    batch = make_batch(spec, "cpu", seed)
    before, _ = reference(batch)
    k = batch.k_cache
    k[6] += 3.0   # position 6 = the chunk's last query; queries 0..2 (positions 3..5) cannot see it
    after, _ = reference(batch)
    assert torch.equal(before[:3], after[:3]), seed
    assert not torch.allclose(before[3], after[3]), seed
    k[0] += 3.0   # context position 0: every query sees it
    again, _ = reference(batch)
    assert all(not torch.allclose(after[i], again[i]) for i in range(4)), seed


def test_paged_and_contiguous_give_the_same_reference():
    seed = random.randrange(2**31)
    kw = dict(prefill=[(5, 11)], decode=[7, 17, 1])
    paged = make_batch(BatchSpec.build(8, 2, 64, page_size=4, **kw), "cpu", seed)
    contig = make_batch(BatchSpec.build(8, 2, 64, **kw), "cpu", seed)
    # q is drawn first with the same shapes, so it agrees; K/V are laid out (and drawn) differently:
    # put the paged batch's sequences into the contiguous cache and compare.
    assert torch.equal(paged.q_prefill, contig.q_prefill) and torch.equal(paged.q_decode, contig.q_decode)
    seqs = [paged.sequence_kv(s) for s in range(4)]
    contig.k_cache = torch.cat([k for k, _ in seqs])
    contig.v_cache = torch.cat([v for _, v in seqs])
    for s in range(4):
        assert torch.equal(contig.sequence_kv(s)[0], seqs[s][0])
    for a, b in zip(reference(paged), reference(contig)):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=lambda m: f"seed={seed}: {m}")


def test_max_rel_error():
    ref = torch.tensor([[1.0, -4.0], [2.0, 0.0]])
    assert max_rel_error(ref.clone(), ref) == 0.0
    out = ref.clone()
    out[1, 1] = 0.5
    assert max_rel_error(out, ref) == pytest.approx(0.5 / 4.0)
    assert max_rel_error(out.to(torch.bfloat16), ref) == pytest.approx(0.125)
    out[0, 0] = float("nan")
    assert max_rel_error(out, ref) == math.inf
    out[0, 0] = float("inf")
    assert max_rel_error(out, ref) == math.inf
    assert max_rel_error(None, ref) == 0.0
    assert max_rel_error(torch.empty(0, 2), torch.empty(0, 2)) == 0.0


@pytest.mark.parametrize("heads, page_size", [((8, 2, 64), 4), ((4, 4, 64), None), ((4, 1, 64), 16)])
def test_batched_decode_reference_matches_naive_loop(heads, page_size):
    # Decodes of equal length are computed together, in chunks of max_bytes: repeated and ragged lengths,
    # chunks of one and of several decodes, paged and contiguous, GQA / MHA / MQA.
    from pod.reference import reference_decode
    seed = random.randrange(2**31)
    rng = random.Random(seed)
    lens = [rng.choice([1, 5, 9, 16, 17]) for _ in range(9)]
    spec = BatchSpec.build(*heads, prefill=[(3, 4)], decode=lens, page_size=page_size)
    batch = make_batch(spec, "cpu", seed)
    _, want = naive(batch)
    want = torch.stack(want)
    per_decode = 17 * heads[1] * heads[2] * 4 * 2
    for max_bytes in (1, 2 * per_decode, 1 << 30):
        got = reference_decode(batch, max_bytes=max_bytes)
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5,
                                   msg=lambda m: f"seed={seed} max_bytes={max_bytes} {lens}: {m}")


def test_sequences_kv_gathers_like_sequence_kv():
    seed = random.randrange(2**31)
    for page_size in (4, None):
        batch = make_batch(BatchSpec.build(4, 2, 64, decode=[6, 9, 6, 6], page_size=page_size), "cpu", seed)
        k, v = batch.sequences_kv([0, 2, 3])
        for i, s in enumerate([0, 2, 3]):
            ks, vs = batch.sequence_kv(s)
            assert torch.equal(k[i], ks) and torch.equal(v[i], vs), (seed, page_size)
        with pytest.raises(ValueError):
            batch.sequences_kv([0, 1])
