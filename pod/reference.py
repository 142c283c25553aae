"""fp32 reference attention for a whole hybrid batch: the ground truth every backend is checked against.

Prefill chunk c of sequence s: its queries are the last chunk_len positions of a sequence of
kv_len = context_len + chunk_len tokens; query i (0-based) sits at position context_len + i and
attends causally to keys 0..context_len + i. A decode query attends to all kv_len keys of its
sequence. GQA: query head h reads KV head h // (num_q_heads // num_kv_heads).
"""
from __future__ import annotations

import torch

from pod.batch import HybridBatch


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos0: int, sm_scale: float,
            block_q: int = 512, lse: torch.Tensor | None = None) -> torch.Tensor:
    """q [Lq, Hq, D], k/v [Lk, Hkv, D]; query row i sits at position q_pos0 + i. Returns fp32 [Lq, Hq, D];
    if `lse` ([Lq, Hq] fp32) is given, the natural-log log-sum-exp of each row's scores goes there.

    Processes queries in blocks so the [Hq, block_q, Lk] score matrix stays small at 16K contexts.
    """
    lq, hq, _ = q.shape
    lk, hkv, _ = k.shape
    group = hq // hkv
    kf = k.float().repeat_interleave(group, dim=1).transpose(0, 1)   # [Hq, Lk, D]
    vf = v.float().repeat_interleave(group, dim=1).transpose(0, 1)
    out = torch.empty(lq, hq, q.shape[-1], dtype=torch.float32, device=q.device)
    key_pos = torch.arange(lk, device=q.device)
    for a in range(0, lq, block_q):
        b = min(a + block_q, lq)
        qf = q[a:b].float().transpose(0, 1)                          # [Hq, bq, D]
        s = torch.matmul(qf, kf.transpose(1, 2)) * sm_scale           # [Hq, bq, Lk]
        q_pos = q_pos0 + torch.arange(a, b, device=q.device)
        s.masked_fill_(key_pos[None, None, :] > q_pos[None, :, None], float("-inf"))
        out[a:b] = torch.matmul(torch.softmax(s, dim=-1), vf).transpose(0, 1)
        if lse is not None:
            lse[a:b] = torch.logsumexp(s, dim=-1).transpose(0, 1)
    return out


def reference_prefill(batch: HybridBatch, lse: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 [total_chunk_tokens, Hq, D]; with `lse` ([total_chunk_tokens, Hq] fp32), also each query
    row's natural-log log-sum-exp."""
    spec = batch.spec
    out = torch.empty(batch.q_prefill.shape, dtype=torch.float32, device=batch.device)
    for i, c in enumerate(spec.prefill_chunks):
        a, b = int(batch.q_indptr[i]), int(batch.q_indptr[i + 1])
        k, v = batch.sequence_kv(i)
        out[a:b] = _attend(batch.q_prefill[a:b], k, v, c.context_len, batch.sm_scale,
                           lse=None if lse is None else lse[a:b])
    return out


def reference_decode(batch: HybridBatch, max_bytes: int = 1 << 30) -> torch.Tensor:
    """fp32 [num_decodes, Hq, D]. Decodes of one kv length are computed together (one gather, two
    batched matmuls, `max_bytes` of fp32 K and V at a time, about twice that at the peak): a paper-grid
    batch holds ~2000 of them, and one launch chain per decode would cost seconds a point."""
    spec = batch.spec
    hq, hkv, d, group = spec.heads.num_q_heads, spec.heads.num_kv_heads, spec.heads.head_dim, spec.heads.group_size
    out = torch.empty(batch.q_decode.shape, dtype=torch.float32, device=batch.device)
    by_len: dict[int, list[int]] = {}
    for j, n in enumerate(spec.decode_context_lens):
        by_len.setdefault(n, []).append(j)
    for n, js in by_len.items():
        step = max(1, max_bytes // (n * hkv * d * 4 * 2))
        for a in range(0, len(js), step):
            jj = js[a:a + step]
            k, v = batch.sequences_kv([spec.num_prefill + j for j in jj])      # [B, n, Hkv, D]
            # Query head h reads KV head h // group: view the heads as [Hkv, group]. The decode query is
            # the sequence's last position, so it sees all n keys (no mask).
            q = batch.q_decode[jj].float().view(len(jj), hkv, group, d)
            s = torch.einsum("bhgd,bnhd->bhgn", q, k.float()) * batch.sm_scale
            o = torch.einsum("bhgn,bnhd->bhgd", torch.softmax(s, dim=-1), v.float())
            out[jj] = o.reshape(len(jj), hq, d)
    return out


def reference(batch: HybridBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(prefill output, decode output), both fp32."""
    return reference_prefill(batch), reference_decode(batch)


def max_rel_error(out: torch.Tensor | None, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref| over the tensor (NaN anywhere in `out` gives inf).

    Normalised by the largest reference magnitude rather than element-wise, so near-zero outputs
    (which attention produces routinely) do not blow the measure up.
    """
    if out is None or ref.numel() == 0:
        return 0.0
    o = out.float()
    if not torch.isfinite(o).all():
        return float("inf")
    denom = ref.abs().max().clamp_min(1e-6)
    return float((o - ref).abs().max() / denom)
