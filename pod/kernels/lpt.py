"""List scheduling for the planners: longest processing time first (LPT) onto equal bins.

`lpt` hands items (heaviest first) to the least-loaded bin and returns each bin's list; `lpt_makespan`
returns only the finish time, which is all the planners' searches need (a split of the SMs, a decode
chunk length: tens of candidates a plan, and a serving engine plans every iteration).

`lpt_makespan` works on runs of equal costs and groups of equally loaded bins. A planner's costs come in
runs (a prefill tile's cost repeats for every q head, a decode split's for every kv head and request), so
a run of n items onto m equally loaded bins is one heap step instead of n. It returns what the item-by-item
LPT returns, exactly: which of several equally loaded bins takes an item changes which bin is which, never
the multiset of loads, so the same additions happen in the same order on every bin's load.
"""
from __future__ import annotations

import heapq
from collections import Counter

import numpy as np


def lpt(costs: list[float], bins: int, start: list[float] | None = None) -> tuple[list[list[int]], float]:
    """Longest processing time first: items (by index, heaviest first, ties in index order) onto the
    least-loaded of `bins` bins (`start`: each bin's load before these items; ties to the lowest bin).
    Returns each bin's items in the order it runs them, and the makespan.

    Grouped like lpt_makespan: a run of n equal costs meets a group of m equally loaded bins (kept in bin
    order) and its first min(m, n) items go to those bins in order - exactly what the item-by-item heap
    of (load, bin) pops give, in O(runs x groups x log) heap steps."""
    if bins <= 0 or not costs:
        return [[] for _ in range(max(bins, 0))], max(start or [0.0])
    c = np.asarray(costs)
    order_np = np.argsort(-c, kind="stable")              # heaviest first, ties in index order
    sorted_c = c[order_np]
    bounds = [0, *(np.flatnonzero(sorted_c[1:] != sorted_c[:-1]) + 1).tolist(), len(costs)]
    order = order_np.tolist()
    if start:
        by_load: dict = {}
        for b in range(bins):
            by_load.setdefault(start[b], []).append(b)
        heap = [(load, bs[0], bs) for load, bs in by_load.items()]
        heapq.heapify(heap)
    else:
        heap = [(0.0, 0, list(range(bins)))]
    lists: list[list[int]] = [[] for _ in range(bins)]
    for j, end in zip(bounds[:-1], bounds[1:]):         # a run of equal costs: items order[j:end]
        cost = costs[order[j]]
        n = end - j
        while n:
            load, _, bs = heapq.heappop(heap)
            if heap and heap[0][0] == load:              # bins that reached this load by other paths
                bs = list(bs)
                while heap and heap[0][0] == load:
                    bs += heapq.heappop(heap)[2]
                bs.sort()
            take = min(len(bs), n)
            for b, i in zip(bs, order[j:j + take]):
                lists[b].append(i)
            heapq.heappush(heap, (load + cost, bs[0], bs[:take]))
            if take < len(bs):
                heapq.heappush(heap, (load, bs[take], bs[take:]))
            j += take
            n -= take
    return lists, max(load for load, _, _ in heap)


def runs_of(costs) -> dict:
    """{cost: how many items cost that}: what lpt_makespan works on (a planner that evaluates many bin
    counts over the same items builds it once)."""
    return Counter(costs)


def shifted_runs(runs: dict, extra: float) -> dict:
    """The runs of every item's cost + extra."""
    if not extra:
        return runs
    out: Counter = Counter()
    for cost, n in runs.items():
        out[cost + extra] += n
    return out


def lpt_makespan(costs, bins: int, start: list[float] | None = None):
    """The makespan `lpt(costs, bins, start)` returns (0 with no bins or items and no start loads), in
    O(runs x groups x log) rather than O(items x log bins): heap entries are [load, bins at that load].
    `costs`: a list of item costs, or its runs ({cost: count}, runs_of)."""
    if bins <= 0:
        return max(start or [0])
    heap = sorted([load, m] for load, m in Counter(start).items()) if start else [[0, bins]]
    runs = costs if isinstance(costs, dict) else Counter(costs)
    for cost in sorted(runs, reverse=True):
        n = runs[cost]
        while n:
            load, m = heapq.heappop(heap)
            while heap and heap[0][0] == load:          # bins that reached the same load by other paths
                m += heapq.heappop(heap)[1]
            take = min(m, n)
            heapq.heappush(heap, [load + cost, take])
            if m > take:
                heapq.heappush(heap, [load, m - take])
            n -= take
    return max(load for load, _ in heap)
