"""Which SMs share a GPC, probed with thread-block clusters, and SM orders built on that map.

A cluster's CTAs always run in one GPC (Hopper's guarantee that makes distributed shared memory work), so
every SM id that ever shares a cluster with another is in its GPC. `probe_gpcs` launches clusters of 2, 4
and 8 CTAs (1024 threads each, so at most two a SM) many times, each CTA records its `%smid`, and a
union-find over those pairs leaves one group of SM ids a GPC (an H100 / H200 has 7-8 GPCs of 16-18 SMs;
which ids they hold is not documented and may differ between chips of one model, since each chip has its
own disabled TPCs). Nothing in a plan depends on this unless `PodSm90Config.bind` asks for a GPC layout.

What it found on the H200 (docs/hopper_pod.md, Session 10): 17 groups, not 8. Ids 2t and 2t+1 always
share a group (one TPC); ids 0-63 deal their TPCs round-robin over 8 groups (4 TPCs each); ids 64-123
deal theirs over 7 groups, two of which are groups of the first 64 ids (grown to 18 SMs: two whole GPCs),
and 124-131 stay in pairs. Clusters of <= 8 CTAs never joined the other groups of 4 TPCs across the two id
ranges, so a group is a GPC or a part of one (18 + 18 + 6 x 16 = 132 if each 16-SM GPC is two of them).
So the default binding's decode lists on ids 0..k-1 (k <= 64) already sit evenly on the 8 GPCs, two
SMs of a TPC together; measured against it, "gpc_spread" (over the 17 groups) lost 2% and "gpc_pack" 11%.

The orders (`gpc_order`) say on which SM each CTA list of the Hopper POD kernel is planned; the decode
lists come first. "gpc_spread": the decode lists on SM pairs of consecutive ids (one TPC, if ids 2i and
2i+1 share one) taken from each group in turn, so the decode stream's traffic is spread over every group;
"gpc_pack": the decode lists fill whole groups, the largest first (at most one group shared with prefill
SMs; a whole GPC only where the map's groups are whole GPCs, which the H200's were not, below). The default binding ("smid": decode lists on the lowest ids) is neither unless the
ids happen to follow the GPCs.
"""
from __future__ import annotations

import functools
import random

import torch
import triton
import triton.language as tl

CLUSTER_SIZES = (2, 4, 8)             # 8: the largest portable cluster (16 needs a non-portable opt-in)
_WARPS = 32                           # 1024 threads a CTA: at most two CTAs an SM, so a cluster spans SMs


# One thread: spin until %globaltimer has moved $2 ns, then read %smid (labels are local to the braces).
_SPIN_SMID = tl.constexpr("""{
 .reg .u64 t0, t1;
 .reg .pred p;
 mov.u64 t0, %globaltimer;
 SPIN:
 mov.u64 t1, %globaltimer;
 sub.u64 t1, t1, t0;
 setp.lt.u64 p, t1, $2;
 @p bra SPIN;
 mov.u32 $0, %smid;
}""")


@triton.jit
def _cluster_sms(out, spin_ns, N: tl.constexpr):
    """out[cluster, i] = %smid of the thread holding element i (N = one element a thread of the cluster's
    CTAs); each thread first spins `spin_ns` so that the clusters of a launch are resident together."""
    pid = tl.program_id(0)
    offs = tl.arange(0, N)
    spin = offs.to(tl.int64) * 0 + spin_ns
    sm = tl.inline_asm_elementwise(_SPIN_SMID, "=r,r,l", [offs, spin], dtype=tl.int32, is_pure=False, pack=1)
    tl.store(out + pid * N + offs, sm)


def groups_from_clusters(clusters, num_sms: int) -> list[list[int]]:
    """Union-find: SM ids that shared a cluster (each item an iterable of SM ids) end up in one group;
    groups sorted by their smallest id, ids sorted within a group. An SM never seen alone forms its own."""
    parent = list(range(num_sms))

    def find(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for sms in clusters:
        sms = [int(s) for s in sms]
        for s in sms[1:]:
            a, b = find(sms[0]), find(s)
            if a != b:
                parent[max(a, b)] = min(a, b)
    groups: dict[int, list[int]] = {}
    for s in range(num_sms):
        groups.setdefault(find(s), []).append(s)
    return sorted(groups.values(), key=lambda g: g[0])


@functools.lru_cache(maxsize=None)
def probe_gpcs(device_index: int = 0, launches: int = 48, seed: int = 0) -> tuple[tuple[int, ...], ...]:
    """The GPCs of CUDA device `device_index` as groups of SM ids (cached for the process). Launches
    clusters of CLUSTER_SIZES at several grid sizes; a few ms of GPU time."""
    from pod.env import device_num_sms
    num_sms = device_num_sms(torch.device("cuda", device_index))
    rng = random.Random(seed)
    seen = []
    with torch.cuda.device(device_index):
        for i in range(launches):
            size = CLUSTER_SIZES[i % len(CLUSTER_SIZES)]
            n = size * 32 * _WARPS
            grid = rng.randint(1, 2 * num_sms // size)
            out = torch.full((grid, n), -1, dtype=torch.int32, device=f"cuda:{device_index}")
            _cluster_sms[(grid,)](out, rng.choice((0, 2000, 20000)), N=n, num_warps=_WARPS, num_ctas=size)
            seen.append(out.cpu())
    clusters = [torch.unique(row).tolist() for o in seen for row in o]
    if any(min(c) < 0 or max(c) >= num_sms for c in clusters):
        raise RuntimeError("probe_gpcs: a CTA reported an SM id outside [0, num_sms)")
    return tuple(tuple(g) for g in groups_from_clusters(clusters, num_sms))


def gpcs_of(device: torch.device):
    """probe_gpcs for a plan's device; off the GPU there is nothing to probe (give the map instead)."""
    if device.type != "cuda":
        raise ValueError("a gpc_* bind off the GPU needs PodSm90Config.gpcs (no GPCs to probe)")
    return probe_gpcs(device.index if device.index is not None else torch.cuda.current_device())


def _pairs(ids: list[int]) -> list[list[int]]:
    """Sorted ids as runs of 2i, 2i+1 (one TPC on NVIDIA's numbering, as far as we know) and singles."""
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and ids[i] % 2 == 0 and ids[i + 1] == ids[i] + 1:
            out.append(ids[i:i + 2])
            i += 2
        else:
            out.append([ids[i]])
            i += 1
    return out


def gpc_order(layout: str, gpcs, num_sms: int, first: int) -> list[int]:
    """Every SM id once: the `first` SMs of the order chosen by `layout` ("gpc_spread" or "gpc_pack", module
    docstring), then the rest in id order. `gpcs`: groups of SM ids (probe_gpcs); ids missing from it
    (a map probed on another chip) come last."""
    groups = [g for g in (sorted(s for s in g if s < num_sms) for g in gpcs) if g]
    if layout == "gpc_spread":
        queues = [_pairs(g) for g in groups]
        head: list[int] = []
        while len(head) < first and any(queues):
            for q in queues:
                if q and len(head) < first:
                    head += q.pop(0)
    elif layout == "gpc_pack":
        head = [s for g in sorted(groups, key=lambda g: (-len(g), g[0])) for s in g]
    else:
        raise ValueError(f"gpc_order: layout 'gpc_spread' or 'gpc_pack', not {layout!r}")
    head = head[:first]
    taken = set(head)
    return head + [s for s in range(num_sms) if s not in taken]
