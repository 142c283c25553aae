"""List scheduling for the planners: longest processing time first (LPT) onto equal bins.

`lpt` hands items (heaviest first) to the least-loaded bin and returns each bin's list (`list_schedule`:
the same in an order of the caller's, e.g. tiles that share data next to each other); `lpt_makespan`
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
from bisect import bisect_left
from collections import Counter
from itertools import accumulate

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
    if start and len(set(start)) == bins:                 # no two bins alike: no groups to keep
        return list_schedule(costs, bins, order_np.tolist(), start)
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


def list_schedule(costs, bins: int, order, start: list[float] | None = None) -> tuple[list[list[int]], float]:
    """Graham's list scheduling: items in the given `order` (indices), each to the least-loaded bin (ties
    to the lowest bin; `start`: each bin's load before these items). Returns each bin's items in the order
    it runs them, and the makespan (without start loads at most total / bins + the largest cost: the item
    that ends last started when every bin was busy)."""
    if bins <= 0:
        return [], 0.0
    heap = [(float(start[b]) if start else 0.0, b) for b in range(bins)]
    heapq.heapify(heap)
    lists: list[list[int]] = [[] for _ in range(bins)]
    for i in order:
        load, b = heap[0]
        lists[b].append(i)
        heapq.heapreplace(heap, (load + costs[i], b))
    return lists, max(load for load, _ in heap)


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
    """The makespan `lpt(costs, bins, start)` returns for non-negative costs (the planners' times; 0 with no
    bins or items and no start loads), in
    O(runs x groups x log) rather than O(items x log bins): heap entries are [load, bins at that load].
    `costs`: a list of item costs, or its runs ({cost: count}, runs_of).
    Groups that reach one load by different paths are not merged: a run meets them one after the other,
    which hands its items to bins of that load all the same (the same loads, one more heap step)."""
    if bins <= 0:
        return max(start or [0])
    heap = sorted([load, m] for load, m in Counter(start).items()) if start else [[0, bins]]
    runs = costs if isinstance(costs, dict) else Counter(costs)
    replace, push = heapq.heapreplace, heapq.heappush
    for cost in sorted(runs, reverse=True):
        n = runs[cost]
        while n:
            top = heap[0]
            load, m = top
            if m <= n:                                   # the whole group takes one item each
                replace(heap, [load + cost, m])
                n -= m
            else:                                        # n of its bins do; the rest stay the lightest
                top[1] = m - n
                push(heap, [load + cost, n])
                n = 0
    return max(heap)[0]


# Relative slack on the bounds below: lpt_makespan adds float costs in its own order, so a bound computed
# from the same costs in another order may sit an ulp on the wrong side of it.
_BOUND_SLACK = 1e-9


class RunBounds:
    """Bounds on lpt_makespan(runs, bins) (empty bins, every cost + `extra`) without running LPT: what the
    planners' searches use to decide a comparison where the bounds suffice (a split of the SMs: a few of
    its candidates need LPT itself). With n items, p_1 >= p_2 >= ... their costs and m bins:
      n <= m: exactly p_1 (each item gets a bin of its own);
      lower:  max(p_1, total / m, p_m + p_(m+1))   (every schedule: two of the m + 1 largest share a bin);
      upper:  max(p_1, total / m + (1 - 1/m) p_(m+1))   (the item that ends last either started at 0, or
              was not among the first m, which LPT puts one a bin, so it costs at most p_(m+1) and started
              when every bin was busy: by (total - it) / m; Graham's list-scheduling argument)."""

    def __init__(self, runs: dict):
        self.costs = sorted(runs, reverse=True)
        self.cum = list(accumulate(runs[c] for c in self.costs))   # items costing >= costs[i]
        self.n = self.cum[-1] if self.cum else 0
        self.total = sum(c * n for c, n in runs.items())

    def nth(self, q: int) -> float:
        """The q-th largest cost (1-based)."""
        return self.costs[bisect_left(self.cum, q)]

    def bounds(self, bins: int, extra: float = 0.0) -> tuple[float, float]:
        if not self.n:
            return 0.0, 0.0
        p1 = self.costs[0] + extra
        if self.n <= bins:
            return p1 * (1 - _BOUND_SLACK), p1 * (1 + _BOUND_SLACK)
        p_m, p_m1 = self.nth(bins) + extra, self.nth(bins + 1) + extra
        mean = (self.total + extra * self.n) / bins
        lo = max(p1, mean, p_m + p_m1)
        hi = max(p1, mean + (1 - 1 / bins) * p_m1)
        return lo * (1 - _BOUND_SLACK), hi * (1 + _BOUND_SLACK)
