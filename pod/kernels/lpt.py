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


def lpt(costs: list[float], bins: int, start: list[float] | None = None) -> tuple[list[list[int]], float]:
    """Longest processing time first: items (by index, heaviest first, ties in index order) onto the
    least-loaded of `bins` bins (`start`: each bin's load before these items). Returns each bin's items in
    the order it runs them, and the makespan."""
    if bins <= 0 or not costs:
        return [[] for _ in range(max(bins, 0))], max(start or [0.0])
    order = sorted(range(len(costs)), key=lambda i: (-costs[i], i))
    heap = [(start[b] if start else 0.0, b) for b in range(bins)]
    heapq.heapify(heap)
    lists: list[list[int]] = [[] for _ in range(bins)]
    for i in order:
        load, b = heapq.heappop(heap)
        lists[b].append(i)
        heapq.heappush(heap, (load + costs[i], b))
    return lists, max(load for load, _ in heap)


def lpt_makespan(costs, bins: int, start: list[float] | None = None):
    """The makespan `lpt(costs, bins, start)` returns (0 with no bins or items and no start loads), in
    O(runs x groups x log) rather than O(items x log bins): heap entries are [load, bins at that load]."""
    if bins <= 0:
        return max(start or [0])
    heap = sorted([load, m] for load, m in Counter(start).items()) if start else [[0, bins]]
    runs = Counter(costs)
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
