"""Hybrid batch model: what a batch of prefill chunks and decode requests is, and its tensors.

A *hybrid batch* holds prefill chunks (a chunk of `chunk_len` new tokens whose sequence already has
`context_len` tokens in the KV cache) and decode requests (one new query over `context_len` cached
tokens, the new token's own K/V included). `BatchSpec` describes one and validates it; `make_batch`
materialises it on a device with a seeded generator.

Sequence order everywhere: the prefill chunks first (sequence ids 0..P-1), then the decode requests
(ids P..P+D-1). The KV cache holds all sequences; each part reads its own rows of the index tensors.

Layouts (NHD, as FlashInfer and FlashAttention use):
  q_prefill : [total_chunk_tokens, num_q_heads, head_dim]   packed, rows q_indptr[i]:q_indptr[i+1]
  q_decode  : [num_decodes, num_q_heads, head_dim]
  contiguous KV: k_cache, v_cache [total_kv_tokens, num_kv_heads, head_dim],
                 sequence s holds rows kv_indptr[s]:kv_indptr[s+1]
  paged KV:      k_cache, v_cache [num_pages, page_size, num_kv_heads, head_dim],
                 block_table[s, j] is the page holding tokens j*page_size..(j+1)*page_size-1 of s;
                 the CSR form (page_indptr, page_indices, last_page_len) is what FlashInfer takes.
The prefill chunk's own K/V are already in the cache: the chunk's queries are the last `chunk_len`
positions of a sequence of kv_len = context_len + chunk_len tokens.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch

SUPPORTED_HEAD_DIMS = (64, 128)
SUPPORTED_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ModelHeads:
    num_q_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def group_size(self) -> int:
        """Query heads per KV head (the GQA ratio)."""
        return self.num_q_heads // self.num_kv_heads


@dataclass(frozen=True)
class PrefillChunk:
    chunk_len: int
    context_len: int = 0

    @property
    def kv_len(self) -> int:
        return self.context_len + self.chunk_len


def _bad(field_name: str, value, allowed: str) -> ValueError:
    return ValueError(f"BatchSpec.{field_name}={value!r} is invalid: {allowed}")


def as_count(field_name: str, value, positive: bool = False) -> int:
    """`value` as an int count, or a ValueError naming `field_name`: negative numbers, fractions
    (1.5), booleans and strings are rejected, never truncated; an integral float (2.0) is accepted."""
    allowed = "must be a positive integer" if positive else "must be a non-negative integer"
    if isinstance(value, bool):
        raise _bad(field_name, value, allowed)
    if isinstance(value, numbers.Integral):
        n = int(value)
    elif isinstance(value, numbers.Real) and math.isfinite(value) and float(value).is_integer():
        n = int(value)
    else:
        raise _bad(field_name, value, allowed)
    if n < 0 or (positive and n == 0):
        raise _bad(field_name, value, allowed)
    return n


@dataclass(frozen=True)
class BatchSpec:
    """A hybrid batch: model heads, dtype, prefill chunks, decode requests, KV layout."""

    heads: ModelHeads
    prefill_chunks: tuple[PrefillChunk, ...] = ()
    decode_context_lens: tuple[int, ...] = ()
    dtype: str = "bfloat16"
    page_size: int | None = None  # None: contiguous KV; else paged with this many tokens a page

    def __post_init__(self):
        # Normalise sequences to tuples so a spec hashes and compares by value.
        object.__setattr__(self, "prefill_chunks", tuple(self.prefill_chunks))
        object.__setattr__(self, "decode_context_lens",
                           tuple(as_count(f"decode_context_lens[{i}]", x, positive=True)
                                 for i, x in enumerate(self.decode_context_lens)))
        self.validate()

    # -- validation: every field checked here, once, before anything is allocated ------------------
    def validate(self) -> None:
        h = self.heads
        for name in ("num_q_heads", "num_kv_heads", "head_dim"):
            v = getattr(h, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise _bad(f"heads.{name}", v, "must be a positive integer")
        if h.num_q_heads % h.num_kv_heads:
            raise _bad("heads.num_kv_heads", h.num_kv_heads,
                       f"must divide num_q_heads={h.num_q_heads} (GQA groups)")
        if h.head_dim not in SUPPORTED_HEAD_DIMS:
            raise _bad("heads.head_dim", h.head_dim, f"supported: {SUPPORTED_HEAD_DIMS}")
        if self.dtype not in SUPPORTED_DTYPES:
            raise _bad("dtype", self.dtype, f"supported: {tuple(SUPPORTED_DTYPES)}")
        if self.page_size is not None:
            p = self.page_size
            if not isinstance(p, int) or isinstance(p, bool) or p <= 0 or p & (p - 1):
                raise _bad("page_size", p, "must be a power of two (or None for contiguous KV)")
        for i, c in enumerate(self.prefill_chunks):
            if not isinstance(c, PrefillChunk):
                raise _bad(f"prefill_chunks[{i}]", c, "must be a PrefillChunk")
            if not isinstance(c.chunk_len, int) or c.chunk_len <= 0:
                raise _bad(f"prefill_chunks[{i}].chunk_len", c.chunk_len, "must be a positive integer")
            if not isinstance(c.context_len, int) or c.context_len < 0:
                raise _bad(f"prefill_chunks[{i}].context_len", c.context_len,
                           "must be a non-negative integer")
        for i, n in enumerate(self.decode_context_lens):
            if n <= 0:
                raise _bad(f"decode_context_lens[{i}]", n, "must be a positive integer")
        if not self.prefill_chunks and not self.decode_context_lens:
            raise _bad("prefill_chunks/decode_context_lens", (), "the batch is empty: give at least "
                       "one prefill chunk or one decode request")

    # -- construction helpers ---------------------------------------------------------------------
    @classmethod
    def build(cls, num_q_heads: int, num_kv_heads: int, head_dim: int,
              prefill: Iterable[tuple[int, int]] = (), decode: Iterable[int] = (),
              dtype: str = "bfloat16", page_size: int | None = None) -> "BatchSpec":
        """`prefill` as (chunk_len, context_len) pairs, `decode` as context lengths."""
        chunks = tuple(PrefillChunk(as_count(f"prefill_chunks[{i}].chunk_len", c, positive=True),
                                    as_count(f"prefill_chunks[{i}].context_len", x))
                       for i, (c, x) in enumerate(prefill))
        return cls(heads=ModelHeads(num_q_heads, num_kv_heads, head_dim), prefill_chunks=chunks,
                   decode_context_lens=tuple(decode), dtype=dtype, page_size=page_size)

    @classmethod
    def from_counts(cls, heads: ModelHeads, num_prefill=1, chunk_len=0, prefill_context_len=0,
                    num_decode=0, decode_context_len=0, dtype: str = "bfloat16",
                    page_size=None) -> "BatchSpec":
        """A batch of `num_prefill` equal chunks (`chunk_len` tokens over `prefill_context_len`) and
        `num_decode` decodes of `decode_context_len`: the flat keys of a config (conf/batch/*.yaml, a
        sweep's grid). chunk_len=0 or num_prefill=0: no prefill; num_decode=0: no decode;
        page_size None / 0 / "null" / "none": contiguous KV. Every count is checked before anything is
        built: a negative or fractional one (`num_decode=-3`, `chunk_len=1.5`) is a ValueError naming
        its field, never a truncated or empty part."""
        n_pre = as_count("num_prefill", num_prefill)
        chunk = as_count("chunk_len", chunk_len)
        context = as_count("prefill_context_len", prefill_context_len)
        n_dec = as_count("num_decode", num_decode)
        dec_len = as_count("decode_context_len", decode_context_len)
        if n_dec and not dec_len:
            raise _bad("decode_context_len", decode_context_len,
                       f"must be a positive integer when num_decode={n_dec}")
        if isinstance(page_size, str) and page_size.strip().lower() in ("null", "none", ""):
            page_size = None
        page = None if page_size is None else as_count("page_size", page_size)
        prefill = [(chunk, context)] * (n_pre if chunk else 0)
        return cls.build(heads.num_q_heads, heads.num_kv_heads, heads.head_dim, prefill=prefill,
                         decode=[dec_len] * n_dec, dtype=str(dtype), page_size=page or None)

    # -- shape facts --------------------------------------------------------------------------------
    @property
    def torch_dtype(self) -> torch.dtype:
        return SUPPORTED_DTYPES[self.dtype]

    @property
    def paged(self) -> bool:
        return self.page_size is not None

    @property
    def num_prefill(self) -> int:
        return len(self.prefill_chunks)

    @property
    def num_decode(self) -> int:
        return len(self.decode_context_lens)

    @property
    def kv_lens(self) -> tuple[int, ...]:
        """KV length of every sequence: prefill chunks (context + chunk) first, then decodes."""
        return tuple(c.kv_len for c in self.prefill_chunks) + self.decode_context_lens

    @property
    def num_prefill_tokens(self) -> int:
        return sum(c.chunk_len for c in self.prefill_chunks)

    # -- counting helpers: the work each part must do, for TFLOP/s, GB/s and the roofline ----------
    def prefill_flops(self) -> int:
        """Matmul FLOPs of the prefill part: QK^T and PV over the causal (unmasked) pairs.

        Query i of a chunk (0-based) sits at position context_len + i and sees context_len + i + 1
        keys; each (query, key, q-head) pair costs 2*head_dim for QK^T and 2*head_dim for PV.
        """
        h = self.heads
        pairs = sum(c.chunk_len * c.context_len + c.chunk_len * (c.chunk_len + 1) // 2
                    for c in self.prefill_chunks)
        return 4 * h.head_dim * h.num_q_heads * pairs

    def decode_flops(self) -> int:
        h = self.heads
        return 4 * h.head_dim * h.num_q_heads * sum(self.decode_context_lens)

    def decode_bytes(self) -> int:
        """Fewest bytes the decode part must move: K and V of every decode context read once,
        q read once, output written once."""
        h = self.heads
        elt = torch.finfo(self.torch_dtype).bits // 8
        kv = 2 * sum(self.decode_context_lens) * h.num_kv_heads * h.head_dim * elt
        qo = 2 * self.num_decode * h.num_q_heads * h.head_dim * elt
        return kv + qo

    def prefill_bytes(self) -> int:
        h = self.heads
        elt = torch.finfo(self.torch_dtype).bits // 8
        kv = 2 * sum(c.kv_len for c in self.prefill_chunks) * h.num_kv_heads * h.head_dim * elt
        qo = 2 * self.num_prefill_tokens * h.num_q_heads * h.head_dim * elt
        return kv + qo

    def describe(self) -> str:
        h = self.heads
        pre = ",".join(f"{c.chunk_len}@{c.context_len}" for c in self.prefill_chunks) or "-"
        if self.decode_context_lens:
            lens = set(self.decode_context_lens)
            dec = (f"{self.num_decode}x{self.decode_context_lens[0]}" if len(lens) == 1
                   else f"{self.num_decode}x[{min(lens)}..{max(lens)}]")
        else:
            dec = "-"
        layout = f"paged{self.page_size}" if self.paged else "contig"
        return f"q{h.num_q_heads}kv{h.num_kv_heads}d{h.head_dim} P[{pre}] D[{dec}] {self.dtype} {layout}"


@dataclass
class HybridBatch:
    """The tensors of one hybrid batch on a device. Index tensors are int32."""

    spec: BatchSpec
    q_prefill: torch.Tensor            # [total_chunk_tokens, Hq, D]
    q_decode: torch.Tensor             # [num_decodes, Hq, D]
    k_cache: torch.Tensor              # contiguous [total_kv, Hkv, D] | paged [pages, page, Hkv, D]
    v_cache: torch.Tensor
    q_indptr: torch.Tensor             # [P+1] prefill query rows
    kv_lens: torch.Tensor              # [P+D] kv length of every sequence
    kv_indptr: torch.Tensor | None = None      # contiguous: [P+D+1] rows of the cache
    block_table: torch.Tensor | None = None    # paged: [P+D, max_pages] page ids (0-padded)
    page_indptr: torch.Tensor | None = None    # paged CSR: [P+D+1]
    page_indices: torch.Tensor | None = None   # paged CSR: [total_pages_used]
    last_page_len: torch.Tensor | None = None  # paged CSR: [P+D] tokens in each last page
    sm_scale: float = field(default=0.0)

    @property
    def device(self) -> torch.device:
        return self.k_cache.device

    # Per-part views of the index tensors (no copies): sequence rows [0, P) and [P, P+D).
    def prefill_rows(self) -> slice:
        return slice(0, self.spec.num_prefill)

    def decode_rows(self) -> slice:
        return slice(self.spec.num_prefill, self.spec.num_prefill + self.spec.num_decode)

    def sequence_kv(self, s: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of sequence s as [kv_len, Hkv, D] (a gather for paged; used by references)."""
        n = int(self.kv_lens[s])
        if self.block_table is None:
            a = int(self.kv_indptr[s])
            return self.k_cache[a:a + n], self.v_cache[a:a + n]
        p = self.spec.page_size
        pages = self.block_table[s, : (n + p - 1) // p].long()
        k = self.k_cache[pages].reshape(-1, *self.k_cache.shape[2:])[:n]
        v = self.v_cache[pages].reshape(-1, *self.v_cache.shape[2:])[:n]
        return k, v

    def sequences_kv(self, seqs: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of sequences of one kv length as [len(seqs), kv_len, Hkv, D]: one gather for all of
        them, lengths read from the spec (no device sync); used by references."""
        lens = self.spec.kv_lens
        n = lens[seqs[0]]
        if any(lens[s] != n for s in seqs):
            raise ValueError(f"sequences_kv: sequences {list(seqs)} differ in kv length")
        idx = torch.tensor(list(seqs), dtype=torch.long, device=self.k_cache.device)
        if self.block_table is None:
            rows = self.kv_indptr[idx].long()[:, None] + torch.arange(n, device=idx.device)   # [B, n]
            return self.k_cache[rows], self.v_cache[rows]
        p = self.spec.page_size
        pages = self.block_table[idx, : (n + p - 1) // p].long()                            # [B, pages]
        shape = (len(seqs), -1, *self.k_cache.shape[2:])
        return self.k_cache[pages].reshape(shape)[:, :n], self.v_cache[pages].reshape(shape)[:, :n]

    def empty_outputs(self, fill: float = float("nan")) -> tuple[torch.Tensor, torch.Tensor]:
        """Output buffers shaped like the queries, poisoned (NaN by default) so unwritten rows show."""
        return (torch.full_like(self.q_prefill, fill), torch.full_like(self.q_decode, fill))


def _int32(xs: Sequence[int], device) -> torch.Tensor:
    return torch.tensor(list(xs), dtype=torch.int32, device=device)


def make_batch(spec: BatchSpec, device: str | torch.device = "cpu", seed: int = 0,
               scale: float = 1.0) -> HybridBatch:
    """Materialise `spec` on `device`: q and the KV cache ~ N(0, scale^2), seeded; pages of a paged
    cache are handed out in a random order so kernels cannot rely on neighbouring pages."""
    spec.validate()
    device = torch.device(device)
    h, dt = spec.heads, spec.torch_dtype
    gen = torch.Generator(device=device).manual_seed(seed)
    perm_gen = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*shape):
        # Drawn on the target device's generator: fast for GPU-sized caches, seeded per device.
        # Drawn straight in the batch dtype: no fp32 copy of a multi-GB cache.
        x = torch.randn(*shape, generator=gen, dtype=dt, device=device)
        return x.mul_(scale) if scale != 1.0 else x

    q_prefill = randn(spec.num_prefill_tokens, h.num_q_heads, h.head_dim)
    q_decode = randn(spec.num_decode, h.num_q_heads, h.head_dim)
    q_indptr = [0]
    for c in spec.prefill_chunks:
        q_indptr.append(q_indptr[-1] + c.chunk_len)
    kv_lens = spec.kv_lens

    common = dict(spec=spec, q_prefill=q_prefill, q_decode=q_decode,
                  q_indptr=_int32(q_indptr, device), kv_lens=_int32(kv_lens, device),
                  sm_scale=1.0 / math.sqrt(h.head_dim))
    if not spec.paged:
        kv_indptr = [0]
        for n in kv_lens:
            kv_indptr.append(kv_indptr[-1] + n)
        k = randn(kv_indptr[-1], h.num_kv_heads, h.head_dim)
        v = randn(kv_indptr[-1], h.num_kv_heads, h.head_dim)
        return HybridBatch(k_cache=k, v_cache=v, kv_indptr=_int32(kv_indptr, device), **common)

    p = spec.page_size
    pages_per_seq = [(n + p - 1) // p for n in kv_lens]
    total_pages = sum(pages_per_seq)
    perm = torch.randperm(total_pages, generator=perm_gen).tolist()
    max_pages = max(pages_per_seq)
    table = torch.zeros(len(kv_lens), max_pages, dtype=torch.int32)
    page_indptr, page_indices, at = [0], [], 0
    for s, n_pages in enumerate(pages_per_seq):
        ids = perm[at: at + n_pages]
        at += n_pages
        table[s, :n_pages] = torch.tensor(ids, dtype=torch.int32)
        page_indices.extend(ids)
        page_indptr.append(page_indptr[-1] + n_pages)
    last_page_len = [n - (k - 1) * p for n, k in zip(kv_lens, pages_per_seq)]
    k = randn(total_pages, p, h.num_kv_heads, h.head_dim)
    v = randn(total_pages, p, h.num_kv_heads, h.head_dim)
    return HybridBatch(k_cache=k, v_cache=v, block_table=table.to(device),
                       page_indptr=_int32(page_indptr, device),
                       page_indices=_int32(page_indices, device),
                       last_page_len=_int32(last_page_len, device), **common)
