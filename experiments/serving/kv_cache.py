"""Paged KV cache of the serving engine: one page pool per layer, a page allocator, slot writes.

Memory layout (NHD pages, exactly HybridBatch's paged layout, so a layer's pool is passed to the
attention backends as is):
    k_pages, v_pages : [num_layers, num_pages, page_size, num_kv_heads, head_dim]
    layer l's pool   : k_pages[l]  -> [num_pages, page_size, Hkv, D]   (a contiguous view)
Token at position p of a request lives in page pages[p // page_size], row p % page_size; its *slot*
is page * page_size + row, the row of the layer's pool flattened to [num_pages * page_size, Hkv, D].

Every layer uses the same page ids for a request (the allocator is shared), so one block table
serves all layers of an iteration. Pages are handed out in a seeded random order so block tables
are not accidentally contiguous (a kernel that assumes neighbouring pages fails the tests).
"""
from __future__ import annotations

import os
from typing import Iterable

import torch

from pod.batch import ModelHeads


def pages_for(num_tokens: int, page_size: int) -> int:
    return -(-num_tokens // page_size)


def pages_to_hold(token_counts: Iterable[int], page_size: int, watermark: float = 0.0) -> int:
    """Pages a pool needs to hold sequences of these lengths all at once with `watermark` of it still
    free: the scheduler never waits for pages, nor preempts, with this many (more change no schedule)."""
    total = sum(pages_for(n, page_size) for n in token_counts)
    return int(total / (1.0 - watermark)) + 1


def free_memory_bytes(device: str | torch.device) -> tuple[int, str]:
    """(bytes new tensors can take on `device` now, where that number comes from): a GPU's free memory
    (torch.cuda.mem_get_info); on the CPU the memory the OS can give without swapping (psutil's
    `available`, else MemAvailable of /proc/meminfo, else the free physical pages)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free), "free GPU memory"
    try:
        import psutil
        return int(psutil.virtual_memory().available), "available RAM"
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "MemAvailable"
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "free RAM"


class PageAllocator:
    """Free list of page ids (pure Python; no tensors). allocate/free are O(pages)."""

    def __init__(self, num_pages: int, seed: int = 0):
        if num_pages <= 0:
            raise ValueError(f"num_pages={num_pages} must be positive")
        self.num_pages = num_pages
        gen = torch.Generator().manual_seed(seed)
        self._free: list[int] = torch.randperm(num_pages, generator=gen).tolist()

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise MemoryError(f"asked for {n} KV pages, {len(self._free)} free")
        out = self._free[len(self._free) - n:]
        del self._free[len(self._free) - n:]
        return out

    def free(self, pages: list[int]) -> None:
        self._free.extend(pages)


class PagedKVCache:
    """The page pools of every layer plus the allocator that hands their pages to requests."""

    def __init__(self, num_layers: int, num_pages: int, page_size: int, heads: ModelHeads,
                 dtype: torch.dtype, device: str | torch.device, seed: int = 0, fill: float = 0.0):
        if page_size <= 0 or page_size & (page_size - 1):
            raise ValueError(f"page_size={page_size} must be a power of two")
        self.page_size, self.heads, self.num_layers = page_size, heads, num_layers
        shape = (num_layers, num_pages, page_size, heads.num_kv_heads, heads.head_dim)
        # `fill` = NaN in tests: a backend reading a row no token was written to shows up as NaN.
        self.k_pages = torch.full(shape, fill, dtype=dtype, device=device)
        self.v_pages = torch.full(shape, fill, dtype=dtype, device=device)
        self.allocator = PageAllocator(num_pages, seed)

    @staticmethod
    def page_bytes(num_layers: int, page_size: int, heads: ModelHeads, dtype: torch.dtype) -> int:
        """Bytes of one page id across the pools: K and V of `page_size` tokens in every layer."""
        elt = torch.finfo(dtype).bits // 8
        return 2 * num_layers * page_size * heads.num_kv_heads * heads.head_dim * elt

    @staticmethod
    def num_pages_for_bytes(budget_bytes: int, num_layers: int, page_size: int, heads: ModelHeads,
                            dtype: torch.dtype) -> int:
        per_page = PagedKVCache.page_bytes(num_layers, page_size, heads, dtype)
        return max(1, int(budget_bytes // per_page))

    @property
    def num_pages(self) -> int:
        return self.allocator.num_pages

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(k, v) pools of one layer: [num_pages, page_size, Hkv, D] views."""
        return self.k_pages[layer], self.v_pages[layer]

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Scatter the new tokens' k, v [T, Hkv, D] to their slots [T] (int64) of layer `layer`."""
        kf = self.k_pages[layer].view(-1, self.heads.num_kv_heads, self.heads.head_dim)
        vf = self.v_pages[layer].view(-1, self.heads.num_kv_heads, self.heads.head_dim)
        kf.index_copy_(0, slots, k)
        vf.index_copy_(0, slots, v)
