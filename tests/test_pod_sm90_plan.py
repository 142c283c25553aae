"""The Hopper POD kernel's host-side plan (pod/kernels/pod_sm90.py, no GPU): every prefill tile and decode
pair runs exactly once, a static list's roles change at most once (a decode CTA's pairs before the tiles
it steals, a prefill CTA's tiles before the pairs it fills its end with; the producer's ring bookkeeping
takes either order), the stealing choice follows its rules, and the dynamic
schedule's queues, first items and take-minima are what the kernel reads."""
import math
import random
from dataclasses import replace

import pytest

from pod.batch import BatchSpec
from pod.kernels.lpt import RunBounds, list_schedule, lpt, lpt_makespan, runs_of
from pod.kernels.pod_sm90 import PodSm90Config, plan_pod_sm90, split_sms

L3 = dict(num_q_heads=32, num_kv_heads=8, head_dim=128)
SPECS = {
    "centre": BatchSpec.build(**L3, prefill=[(1024, 12288)], decode=[8192] * 64, page_size=16),
    "prefill-heavy": BatchSpec.build(**L3, prefill=[(2048, 16384)], decode=[8192] * 32, page_size=16),
    "ragged": BatchSpec.build(**L3, prefill=[(300, 700), (77, 0), (1, 50)], decode=[1000, 37, 513, 2049, 1],
                              page_size=16),
}
CONFIGS = {
    "default": PodSm90Config(),
    "auto": PodSm90Config(steal="auto"),
    "never": PodSm90Config(steal="never"),
    "always": PodSm90Config(num_ctas=6, decode_ctas=2, steal="always"),
    "ctas4": PodSm90Config(num_ctas=4),
    "cost": PodSm90Config(prefill_order="cost"),
}


def _lists(work):
    ptr = work.cta_ptr.tolist()
    items = work.cta_items.tolist()
    return [items[ptr[c]:ptr[c + 1]] for c in range(work.grid)]


@pytest.mark.parametrize("cfg", CONFIGS, ids=list(CONFIGS))
@pytest.mark.parametrize("spec", SPECS, ids=list(SPECS))
def test_every_item_once_and_roles_change_once(spec, cfg):
    work = plan_pod_sm90(SPECS[spec], CONFIGS[cfg], num_sms=132, device="cpu")
    lists = _lists(work)
    flat = [x for lst in lists for x in lst]
    assert sorted(x for x in flat if x >= 0) == list(range(work.n_prefill_tiles))
    assert sorted(-x - 1 for x in flat if x < 0) == list(range(work.n_decode_pairs))
    for c, lst in enumerate(lists):
        roles = [x < 0 for x in lst]
        assert sum(a != b for a, b in zip(roles, roles[1:])) <= 1, lst   # one run of each role
        if c < work.decode_ctas:                                      # a decode CTA: pairs first (steal)
            assert roles == sorted(roles, reverse=True), lst
        else:                                                         # a prefill CTA: tiles first (fill)
            assert roles == sorted(roles), lst


@pytest.mark.parametrize("order", ["kv_head", "cost"])
@pytest.mark.parametrize("spec", SPECS, ids=list(SPECS))
def test_dynamic_plan_is_two_queues_in_the_static_orders(spec, order):
    """balance="dynamic": cta_items holds the decode queue (every pair once, longest first: pair order) and
    then the prefill queue (every tile once, in the order the static plan lists them by); `queue` bounds
    them and holds zeroed claim counters; the grid and the split are the static plan's."""
    static = plan_pod_sm90(SPECS[spec], PodSm90Config(prefill_order=order, static_tail_keys=None), num_sms=132,
                           device="cpu")
    work = plan_pod_sm90(SPECS[spec], PodSm90Config(prefill_order=order, balance="dynamic"), num_sms=132,
                         device="cpu")
    assert (work.grid, work.decode_ctas) == (static.grid, static.decode_ctas)
    q = work.queue.tolist()
    n_dec, n_all = q[4:6]
    items = work.cta_items.tolist()
    assert q[:4] == [0, 0, 0, 0] and static.queue is None
    assert n_dec == work.n_decode_pairs and n_all == n_dec + work.n_prefill_tiles
    assert items[:n_dec] == [-(p + 1) for p in range(n_dec)]
    pre = items[n_dec:n_all]
    assert sorted(pre) == list(range(work.n_prefill_tiles))
    # First items (no atomic): the i-th CTA of a role takes item i of its queue (the static plan's first
    # round), CLAIM (2^31 - 2) where the queue is shorter; the claims on a queue start past that round.
    k, g = work.decode_ctas, work.grid
    first = work.cta_ptr.tolist()[:g]
    claim = 2 ** 31 - 2
    assert first[:k] == (items[:n_dec] + [claim] * k)[:k]
    assert first[k:] == (pre + [claim] * g)[:g - k]
    assert q[8:10] == [k, g - k]
    if order == "kv_head":    # static lists fill in this order (list scheduling): each list is a subsequence
        pos = {t: i for i, t in enumerate(pre)}
        for lst in _lists(static)[static.decode_ctas:]:
            assert [pos[t] for t in lst] == sorted(pos[t] for t in lst)


@pytest.mark.parametrize("rounds", [0.0, 1.0, 1.5])
def test_dynamic_take_minima_count_the_other_roles_ctas(rounds):
    """A CTA takes the other role's item only while that queue holds cross_rounds items for each of that
    role's CTAs: queue[6] for the decode queue (its owners: the decode CTAs), queue[7] for the prefill one;
    a role without CTAs of its own is always taken from."""
    cfg = PodSm90Config(balance="dynamic", cross_rounds=rounds)
    work = plan_pod_sm90(SPECS["centre"], cfg, num_sms=132, device="cpu")
    k, g = work.decode_ctas, work.grid
    assert 0 < k < g
    assert work.queue.tolist()[6:10] == [math.ceil(rounds * k), math.ceil(rounds * (g - k)), k, g - k]
    dec_only = BatchSpec.build(**L3, prefill=[], decode=[4096] * 8, page_size=16)
    w = plan_pod_sm90(dec_only, cfg, num_sms=132, device="cpu")
    assert w.queue.tolist()[7] == 0 or w.n_prefill_tiles == 0


def test_auto_balance_queues_only_decode_heavy_hybrids():
    """balance="auto" (the default): the queues where both roles run and the plan's decode estimate is at
    least auto_decode_ratio x its prefill's; the planned lists elsewhere (single-role batches included)."""
    heavy = BatchSpec.build(**L3, prefill=[(512, 4096)], decode=[8192] * 64, page_size=16)
    for spec in (*SPECS.values(), heavy, BatchSpec.build(**L3, prefill=[], decode=[4096] * 64, page_size=16),
                 BatchSpec.build(**L3, prefill=[(2048, 4096)], decode=[], page_size=16)):
        work = plan_pod_sm90(spec, PodSm90Config(), num_sms=132, device="cpu")
        est = work.estimate_us
        want = bool(work.n_prefill_tiles and work.n_decode_pairs and est["decode"] >= 1.5 * est["prefill"])
        assert (work.queue is not None) == want, (spec, est)
        assert work.describe()["schedule"] == ("dynamic" if want else "static")
    assert plan_pod_sm90(heavy, PodSm90Config(), num_sms=132, device="cpu").queue is not None
    assert plan_pod_sm90(heavy, PodSm90Config(balance="static"), num_sms=132, device="cpu").queue is None


@pytest.mark.parametrize("spec", ["centre", "ragged"])
def test_decode_tail_keys_splits_the_shortest_requests_to_the_queue_end(spec):
    """decode_tail_keys (dynamic): the shortest requests, about the decode work left past the prefill's
    estimate (tail_chunks), get items of at most that many keys; every key of every (request, kv head) is
    still in exactly one item, a split request's items own its partial rows, and the queue stays longest
    first, so the short items end it."""
    from pod.kernels.pod_sm90 import tail_chunks
    s_ = SPECS[spec]
    w0 = plan_pod_sm90(s_, PodSm90Config(balance="dynamic"), num_sms=132, device="cpu")
    w = plan_pod_sm90(s_, PodSm90Config(balance="dynamic", decode_tail_keys=1024), num_sms=132, device="cpu")
    est = w0.estimate_us
    lens = s_.decode_context_lens
    chunks = tail_chunks(lens, w0.decode.kv_chunk_len, 1024, 1 - est["prefill"] / est["decode"]) \
        if est["decode"] > est["prefill"] else [w0.decode.kv_chunk_len] * len(lens)
    rows = [r for r in w.dec_items.tolist() if r[0] >= 0]
    ptr = w.decode.part_indptr.tolist()
    for req, n in enumerate(lens):
        for g in range(s_.heads.num_kv_heads):
            mine = sorted((r[3], r[4], r[5]) for r in rows if r[1] == req and r[2] == g)
            assert mine[0][0] == 0 and mine[-1][1] == n and all(a[1] == b[0] for a, b in zip(mine, mine[1:]))
            assert all(e - s0 <= chunks[req] for s0, e, _ in mine)
            parts = [p for _, _, p in mine]
            assert parts == (list(range(ptr[req], ptr[req + 1])) if len(mine) > 1 else [-1])
    lengths = [r[4] - r[3] for r in w.dec_items.tolist()[:2 * w.n_decode_pairs] if r[0] >= 0]
    assert lengths == sorted(lengths, reverse=True)
    if spec == "centre":                  # decode-heavy by the estimate: its last requests were split
        assert est["decode"] > est["prefill"] and w.n_decode_pairs > w0.n_decode_pairs
    with pytest.raises(ValueError, match="decode_tail_keys"):
        plan_pod_sm90(s_, PodSm90Config(balance="dynamic", decode_tail_keys=100), num_sms=132, device="cpu")
    # decode only: nothing to balance against, the split stays whole (no partials for nothing)
    dec = BatchSpec.build(**L3, prefill=[], decode=[4096] * 8, page_size=16)
    w1 = plan_pod_sm90(dec, PodSm90Config(balance="dynamic", decode_tail_keys=128), num_sms=132, device="cpu")
    w2 = plan_pod_sm90(dec, PodSm90Config(balance="dynamic"), num_sms=132, device="cpu")
    assert w1.n_decode_pairs == w2.n_decode_pairs


def test_tail_chunks_take_the_shortest_requests_first():
    from pod.kernels.pod_sm90 import tail_chunks
    assert tail_chunks([8192, 100, 4096, 4096], 2048, 512, 0.2).tolist() == [2048, 512, 2048, 512]
    assert tail_chunks([8192, 100, 4096, 4096], 2048, 512, 0.3).tolist() == [2048, 512, 512, 512]
    assert tail_chunks([1000, 1000], 1024, 256, 0.0).tolist() == [1024, 1024]
    assert tail_chunks([1000, 1000], 1024, 4096, 1.0).tolist() == [1024, 1024]


def test_balance_setting_is_checked():
    with pytest.raises(ValueError, match="balance"):
        plan_pod_sm90(SPECS["centre"], PodSm90Config(balance="sometimes"), num_sms=132, device="cpu")
    with pytest.raises(ValueError, match="steal"):
        plan_pod_sm90(SPECS["centre"], PodSm90Config(balance="dynamic", steal="always"), num_sms=132,
                      device="cpu")


def _mixed(work):
    return sum(any(x < 0 for x in lst) and any(x >= 0 for x in lst) for lst in _lists(work))


def test_always_steal_mixes_roles_and_never_does_not():
    spec = SPECS["ragged"]
    assert _mixed(plan_pod_sm90(spec, CONFIGS["always"], num_sms=132, device="cpu")) > 0
    assert _mixed(plan_pod_sm90(spec, PodSm90Config(num_ctas=6, decode_ctas=2, steal="never"),
                                num_sms=132, device="cpu")) == 0


@pytest.mark.parametrize("spec", SPECS, ids=list(SPECS))
def test_auto_steals_only_with_hbm_left_over(spec):
    """Prefill tiles beside a decode stream that saturates HBM ran far slower than modelled (H200): a plan
    that steals keeps its decode CTAs under hbm_gbps / decode_gbps_per_sm."""
    cfg = PodSm90Config(steal="auto")
    work = plan_pod_sm90(SPECS[spec], cfg, num_sms=132, device="cpu")
    if _mixed(work):
        assert work.decode_ctas * cfg.decode_gbps_per_sm <= cfg.hbm_gbps


def test_steal_setting_is_checked():
    with pytest.raises(ValueError, match="steal"):
        plan_pod_sm90(SPECS["centre"], PodSm90Config(steal="sometimes"), num_sms=132, device="cpu")


def test_prefill_order_setting_is_checked():
    with pytest.raises(ValueError, match="prefill_order"):
        plan_pod_sm90(SPECS["centre"], PodSm90Config(prefill_order="random"), num_sms=132, device="cpu")


@pytest.mark.parametrize("seed", range(20))
def test_list_schedule_partitions_within_grahams_bound(seed):
    rng = random.Random(seed)
    costs = [rng.choice([1.0, 2.5, 3.0, 7.25]) * rng.randint(1, 4) for _ in range(rng.randint(1, 60))]
    bins = rng.randint(1, 12)
    order = list(range(len(costs)))
    rng.shuffle(order)
    lists, span = list_schedule(costs, bins, order)
    assert sorted(i for lst in lists for i in lst) == list(range(len(costs)))
    for lst in lists:                                    # each bin runs its items in the given order
        assert lst == sorted(lst, key=order.index)
    assert span == pytest.approx(max(sum(costs[i] for i in lst) for lst in lists))
    assert span <= sum(costs) / bins + max(costs) + 1e-9
    # in LPT's own order it is LPT
    lpt_order = sorted(range(len(costs)), key=lambda i: (-costs[i], i))
    assert list_schedule(costs, bins, lpt_order) == lpt(costs, bins)


@pytest.mark.parametrize("heads", [dict(num_q_heads=32, num_kv_heads=8), dict(num_q_heads=32, num_kv_heads=32)])
def test_kv_head_order_starts_one_kv_heads_tiles_together(heads):
    """prefill_order="kv_head": the first tile of every prefill CTA reads one of as few kv heads as the
    wave allows (the tiles sharing a kv head's K/V run side by side), where LPT's order starts every kv
    head at once; the same tiles in all, and a prefill makespan within one tile of LPT's."""
    spec = BatchSpec.build(**heads, head_dim=128, prefill=[(1024, 12288)], decode=[8192] * 64, page_size=16)
    group = heads["num_q_heads"] // heads["num_kv_heads"]
    tiles_per_kv = (1024 // 128) * group
    spans = {}
    for order in ("cost", "kv_head"):
        work = plan_pod_sm90(spec, PodSm90Config(prefill_order=order), num_sms=132, device="cpu")
        pre = [lst for lst in _lists(work) if lst and lst[0] >= 0]
        firsts = {(lst[0] % heads["num_q_heads"]) // group for lst in pre}
        if order == "kv_head":
            assert len(firsts) == -(-len(pre) // tiles_per_kv)
        else:
            assert len(firsts) == min(heads["num_kv_heads"], len(pre))
        # tile cost ~ its KV tiles (a causal chunk over 12288: 97..104 of 128 keys)
        cost = {t: 12288 // 128 + (t // heads["num_q_heads"]) + 1 for lst in pre for t in lst}
        spans[order] = max(sum(cost[t] for t in lst) for lst in pre)
    assert spans["kv_head"] <= spans["cost"] + max(cost.values())


def test_lpt_starts_from_given_loads():
    # 3 -> bin 1 (0), 2 -> bin 1 (3 < 4), 2 -> bin 0 (4 < 5)
    lists, span = lpt([3.0, 2.0, 2.0], 2, start=[4.0, 0.0])
    assert lists == [[2], [0, 1]] and span == 6.0
    lists, span = lpt([], 3, start=[1.0, 5.0, 2.0])
    assert span == 5.0


def _lpt_item_by_item(costs, bins, start=None):
    """LPT as written in every textbook: each item (heaviest first, ties in index order) onto the
    least-loaded bin (ties to the lowest bin), one heap step an item."""
    import heapq
    if bins <= 0 or not costs:
        return [[] for _ in range(max(bins, 0))], max(start or [0.0])
    heap = [(start[b] if start else 0.0, b) for b in range(bins)]
    heapq.heapify(heap)
    lists = [[] for _ in range(bins)]
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        load, b = heapq.heappop(heap)
        lists[b].append(i)
        heapq.heappush(heap, (load + costs[i], b))
    return lists, max(load for load, _ in heap)


@pytest.mark.parametrize("seed", range(4))
def test_grouped_lpt_is_exactly_item_by_item_lpt(seed):
    # lpt hands runs of equal costs to groups of equally loaded bins: the same lists, bin by bin and in the
    # same order, and the same makespan as one heap step an item; the planners' searches call lpt_makespan,
    # which must return that makespan to the last bit. With runs, ties, start loads, more bins than items
    # and loads that meet by different paths (integer costs).
    rng = random.Random(seed)
    for _ in range(400):
        bins = rng.randint(1, 48)
        values = rng.choice([[1.5, 2.25, 3.0], [rng.random() for _ in range(6)], [1, 2, 3, 4, 5]])
        costs = [rng.choice(values) for _ in range(rng.randint(0, 150))]
        start = [rng.choice([0.0, 1.5, 2.0, rng.random()]) for _ in range(bins)] if rng.random() < 0.3 else None
        assert lpt(costs, bins, start) == _lpt_item_by_item(costs, bins, start)
        assert lpt_makespan(costs, bins, start) == lpt(costs, bins, start)[1]
    assert lpt_makespan([], 0) == 0 and lpt_makespan([2.0], 3, start=[1.0, 5.0, 0.0]) == 5.0


@pytest.mark.parametrize("bind", ["smid", "stride"])
@pytest.mark.parametrize("k", [1, 46, 64, 131])
def test_sm_binding_puts_every_list_on_one_sm(bind, k):
    """sm_map: each of the grid's lists is planned on exactly one SM id (decode lists 0..k-1 first, on the
    lowest ids for "smid", spread over the ids for "stride"); every other entry is -1."""
    from pod.kernels.pod_sm90 import SM_SLOTS, sm_map_for, sm_order
    order = sm_order(bind, 132, k)
    assert sorted(order) == list(range(132))
    if bind == "smid":
        assert order[:k] == list(range(k))
    else:
        gaps = [b - a for a, b in zip(order[:k], order[1:k])]
        assert all(g >= 132 // k for g in gaps)             # decode SMs spread over the ids
    m = sm_map_for(bind, 132, k, 132)
    assert len(m) == SM_SLOTS and sorted(x for x in m if x >= 0) == list(range(132))
    assert all(m[order[i]] == i for i in range(132))
    small = sm_map_for(bind, 132, min(k, 11), 12)           # a 12-CTA grid: 12 SMs asked for, the rest -1
    assert sorted(x for x in small if x >= 0) == list(range(12)) and small.count(-1) == SM_SLOTS - 12


def test_plans_carry_their_binding_workspace():
    work = plan_pod_sm90(SPECS["centre"], PodSm90Config(), num_sms=132, device="cpu")
    assert work.sm_map is not None and work.claim.tolist() == [0] * (work.grid + 2)
    assert plan_pod_sm90(SPECS["centre"], PodSm90Config(bind="block"), num_sms=132, device="cpu").sm_map is None
    collide = plan_pod_sm90(SPECS["ragged"], PodSm90Config(num_ctas=12, bind="collide"), num_sms=132, device="cpu")
    assert set(collide.sm_map.tolist()) == {0}              # every SM asks for list 0: the fallback path
    for bad in (dict(bind="gpc"), dict(prefill_tail="zero")):
        with pytest.raises(ValueError):
            plan_pod_sm90(SPECS["centre"], PodSm90Config(**bad), num_sms=132, device="cpu")


def test_decode_heavy_batches_keep_prefill_off_a_handful_of_sms():
    """Past HBM saturation the planner stops adding decode CTAs (plateau_tol) and charges prefill items for
    the decode's HBM traffic (item_us_hbm): 512 new tokens beside 64 x 8192 decodes got 130 decode CTAs
    and 2 prefill CTAs before (0.61x of serial on the H200), now about the 64 that saturate HBM."""
    spec = BatchSpec.build(**L3, prefill=[(512, 0)], decode=[8192] * 64, page_size=16)
    k = plan_pod_sm90(spec, PodSm90Config(), num_sms=132, device="cpu").decode_ctas
    assert 55 <= k <= 80
    old = PodSm90Config(plateau_tol=None, item_us_hbm=0.0, decode_gbps_per_sm=70.0)
    assert plan_pod_sm90(spec, old, num_sms=132, device="cpu").decode_ctas >= 120


@pytest.mark.parametrize("decode_ctas", [None, 48])
def test_describe_reports_the_split_it_ran(decode_ctas):
    # describe() is the harness row's backend_config: a forced split (the hopper_split sweep's
    # backend_options.pod_sm90_decode_ctas) and a planned one both say how many decode CTAs ran.
    spec = BatchSpec.build(32, 8, 128, prefill=[(1024, 12288)], decode=[8192] * 64, page_size=16)
    w = plan_pod_sm90(spec, PodSm90Config(decode_ctas=decode_ctas), num_sms=132, device="cpu")
    d = w.describe()
    assert d["decode_ctas"] == w.decode_ctas and d["kernel"] == "pod_sm90"
    if decode_ctas is not None:
        assert w.decode_ctas == decode_ctas


@pytest.mark.parametrize("seed", range(3))
def test_run_bounds_hold_lpt(seed):
    """RunBounds: lower <= LPT's makespan <= upper, and exact with no more items than bins (what lets the
    split search and the decode chunk search skip LPT without changing their answers)."""
    rng = random.Random(seed)
    for _ in range(300):
        costs = [rng.choice([rng.random() * 10, 1.5, 3.0, float(rng.randint(1, 9))])
                 for _ in range(rng.randint(1, 120))]
        bins, extra = rng.randint(1, 64), rng.choice([0.0, 0.0, rng.random()])
        lo, hi = RunBounds(runs_of(costs)).bounds(bins, extra)
        got = lpt_makespan([c + extra for c in costs], bins)
        assert lo <= got <= hi
        if len(costs) <= bins:
            assert hi - lo <= 1e-8 * got
    assert RunBounds({}).bounds(4) == (0.0, 0.0)


def _split_sms_plain(prefill_costs, decode_costs, grid, slowdown, plateau_tol, extra):
    """split_sms as a bisection that runs LPT at every step (what the bounded search must agree with)."""
    def times(k):
        return (lpt_makespan([c + extra(k) for c in prefill_costs], grid - k),
                lpt_makespan(decode_costs, k) * slowdown(k))
    lo, hi = 1, grid - 1
    while lo < hi:
        mid = (lo + hi) // 2
        tp, td = times(mid)
        lo, hi = (lo, mid) if td <= tp else (mid + 1, hi)
    best = min({max(1, lo - 1), lo}, key=lambda k: (max(times(k)), k))
    tp, td = times(best)
    if plateau_tol is not None and slowdown(best) > 1.0:
        bound = (1.0 + plateau_tol) * max(tp, td)
        lo, hi = 1, best
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if lpt_makespan(decode_costs, mid) * slowdown(mid) <= bound else (mid + 1, hi)
        if lo < best:
            best = lo
            tp, td = times(best)
    return best, tp, td


@pytest.mark.parametrize("seed", range(3))
def test_split_search_with_bounds_is_the_plain_bisection(seed):
    rng = random.Random(seed)
    for _ in range(150):
        grid = rng.choice([8, 40, 132])
        prefill = [rng.choice([rng.random() * 50, 12.5, 30.0]) for _ in range(rng.randint(1, 300))]
        decode = [rng.choice([rng.random() * 40, 20.0]) for _ in range(rng.randint(1, 400))]
        rate = rng.choice([(67.0, 4300.0), (30.0, 1000.0)])
        slowdown = lambda k, r=rate: max(1.0, k * r[0] / r[1])
        extra = lambda k, r=rate: 20.0 * min(1.0, k * r[0] / r[1])
        tol = rng.choice([None, 0.02, 0.1])
        assert split_sms(prefill, decode, grid, slowdown, tol, extra) == \
            _split_sms_plain(prefill, decode, grid, slowdown, tol, extra)



def test_head_dim_64_plans_with_its_own_decode_rate():
    """A head_dim-64 stage carries half the bytes for about the same consumer work, so its decode CTAs stream
    fewer GB/s (H200: 48 vs 67 an SM): the lower rate buys more decode CTAs there, and head_dim 128 plans
    ignore it."""
    hd64 = BatchSpec.build(32, 8, 64, prefill=[(1024, 12288)], decode=[8192] * 64, page_size=16)
    hd128 = BatchSpec.build(32, 8, 128, prefill=[(1024, 12288)], decode=[8192] * 64, page_size=16)
    cfg = PodSm90Config()
    assert cfg.decode_gbps(64) < cfg.decode_gbps(128) == cfg.decode_gbps_per_sm

    def k(spec, **kw):
        return plan_pod_sm90(spec, PodSm90Config(**kw), num_sms=132, device="cpu").decode_ctas

    assert k(hd64) > k(hd64, decode_gbps_per_sm_d64=cfg.decode_gbps_per_sm)
    assert k(hd64) == k(hd64, decode_gbps_per_sm=10.0)          # hd64 reads only its own rate
    assert k(hd128) == k(hd128, decode_gbps_per_sm_d64=10.0)


def test_head_dim_64_rate_sets_the_hbm_saturation_point():
    """Past HBM saturation the planner keeps the fewest decode CTAs that saturate it: hbm_gbps / rate, 64 at
    head_dim 128's 67 GB/s an SM, about 90 at head_dim 64's 48 (the slowdown and the stealing bound read
    the same rate). A decode-heavy head_dim 64 batch lands between the two."""
    cfg = PodSm90Config()
    heavy64 = BatchSpec.build(32, 8, 64, prefill=[(512, 0)], decode=[8192] * 128, page_size=16)
    heavy128 = BatchSpec.build(32, 8, 128, prefill=[(512, 0)], decode=[8192] * 128, page_size=16)
    k64 = plan_pod_sm90(heavy64, cfg, num_sms=132, device="cpu").decode_ctas
    k128 = plan_pod_sm90(heavy128, cfg, num_sms=132, device="cpu").decode_ctas
    assert k128 * cfg.decode_gbps(128) <= 1.1 * cfg.hbm_gbps < k64 * cfg.decode_gbps(128)
    assert k64 * cfg.decode_gbps(64) <= 1.1 * cfg.hbm_gbps
    for steal in ("auto", "always"):     # stealing keeps to decode CTAs that leave HBM unsaturated
        w = plan_pod_sm90(heavy64, PodSm90Config(steal=steal), num_sms=132, device="cpu")
        assert cfg.hbm_gbps // cfg.decode_gbps(128) < w.decode_ctas
        assert w.decode_ctas * cfg.decode_gbps(64) <= cfg.hbm_gbps + cfg.decode_gbps(64)


def test_fluid_span_shares_hbm_among_streaming_ctas():
    """fluid_span: CTAs that stream together share `parallel` CTAs' worth of HBM; a CTA streams after its
    prefill load; the span is never under the longest prefill load."""
    from pod.kernels.pod_sm90 import fluid_span
    assert fluid_span([0.0], [10.0], 4) == pytest.approx(10.0)
    assert fluid_span([0.0] * 8, [10.0] * 8, 4) == pytest.approx(20.0)        # 8 CTAs at half rate
    assert fluid_span([0.0, 50.0], [10.0, 0.0], 4) == pytest.approx(50.0)     # a prefill CTA ends last
    # four stream alone for 5 us, then eight share: all the work (80) at 4 CTAs' rate from then on
    assert fluid_span([0.0] * 4 + [5.0] * 4, [10.0] * 8, 4) == pytest.approx(20.0)
    assert fluid_span([], [], 4) == 0.0


@pytest.mark.parametrize("spec", ["centre", "ragged"])
@pytest.mark.parametrize("fill", ["always", "never"])
def test_static_tail_keys_lists(spec, fill):
    """static_tail_keys: every decode pair and prefill tile runs exactly once; every key of every (request,
    kv head) is in exactly one item; the decode CTAs (the first k) hold pairs only; with static_fill
    "always" prefill CTAs run their tiles first and then decode pairs (some do), with "never" tiles only."""
    s_ = SPECS[spec]
    cfg = PodSm90Config(balance="static", static_tail_keys=128, static_tail_frac=0.5, static_tail_gain=-1.0,
                        static_fill=fill)
    w = plan_pod_sm90(s_, cfg, num_sms=132, device="cpu")
    lists = _lists(w)
    flat = [x for lst in lists for x in lst]
    assert sorted(flat) == sorted(list(range(w.n_prefill_tiles)) + [-(p + 1) for p in range(w.n_decode_pairs)])
    k = w.decode_ctas
    assert all(x < 0 for lst in lists[:k] for x in lst)
    mixed = 0
    for lst in lists[k:]:
        roles = [x < 0 for x in lst]
        assert roles == sorted(roles)                       # tiles, then pairs
        mixed += any(roles)
    assert (mixed > 0) == (fill == "always")
    assert w.describe()["static_tails"] == 1 + mixed
    rows = [r for r in w.dec_items.tolist() if r[0] >= 0]
    for req, n in enumerate(s_.decode_context_lens):
        for g in range(s_.heads.num_kv_heads):
            mine = sorted((r[3], r[4]) for r in rows if r[1] == req and r[2] == g)
            assert mine[0][0] == 0 and mine[-1][1] == n and all(a[1] == b[0] for a, b in zip(mine, mine[1:]))
    assert w.describe()["schedule"] == "static"


def test_static_tail_keys_pays_where_decode_ctas_end_a_pair_apart():
    """The centre point: 256 equal pairs on 46 decode CTAs end 5 or 6 pairs in; split tails bring the
    model's makespan down by more than static_tail_gain, so the plan takes them; bad settings are refused."""
    s_ = SPECS["centre"]
    w0 = plan_pod_sm90(s_, PodSm90Config(balance="static", static_tail_keys=None), num_sms=132, device="cpu")
    w = plan_pod_sm90(s_, PodSm90Config(balance="static", static_tail_keys=1024), num_sms=132, device="cpu")
    assert not plan_pod_sm90(s_, PodSm90Config(balance="static"), num_sms=132, device="cpu").needs_merge   # default off
    assert w.n_decode_pairs > w0.n_decode_pairs and w.needs_merge and not w0.needs_merge
    assert max(w.estimate_us.values()) < 0.98 * max(w0.estimate_us.values())
    # a gain no plan reaches keeps the plain lists
    w2 = plan_pod_sm90(s_, PodSm90Config(balance="static", static_tail_keys=1024, static_tail_gain=0.5),
                       num_sms=132, device="cpu")
    assert w2.cta_items.tolist() == w0.cta_items.tolist() and w2.tails == w0.tails == 0 < w.tails
    with pytest.raises(ValueError, match="static_tail_keys"):
        plan_pod_sm90(s_, PodSm90Config(balance="static", static_tail_keys=100), num_sms=132, device="cpu")
    with pytest.raises(ValueError, match="static_fill"):
        plan_pod_sm90(s_, PodSm90Config(balance="static", static_tail_keys=128, static_fill="maybe"),
                      num_sms=132, device="cpu")


def test_static_tail_search_prunes_to_the_exhaustive_answer():
    """_best_fill_plan builds only the plans whose lower bound does not exceed the best makespan so far: on
    random costs it returns what building every (decode CTA count, fill) plan and keeping the first shortest
    returns, bit for bit; the bounds it prunes with never exceed a plan's makespan."""
    from pod.kernels.pod_sm90 import (_best_fill_plan, _decode_lists, _fluid_floor, _list_sums, _prefill_lists,
                                      _kv_head_order, fluid_span)
    rng = random.Random(5)
    for trial in range(60):
        grid = rng.choice([8, 16, 33])
        pre = [rng.choice([40.0, 90.0, 150.0, 210.0]) * rng.choice([1, 1, 1.5]) for _ in range(rng.randint(4, 90))]
        dec = sorted((rng.choice([20.0, 55.0, 110.0]) for _ in range(rng.randint(2, 200))), reverse=True)
        parallel = rng.choice([3.0, 6.5, 100.0])
        order = _kv_head_order(pre, 8, 4) if trial % 2 else None
        cands = sorted({rng.randint(1, grid - 1) for _ in range(rng.randint(1, 5))})
        fills = rng.choice([(False, True), (True,), (False,)])
        extra = lambda kc: 0.25 * kc
        built = []
        for kc in cands:
            pre_lists, t_p, shifted = _prefill_lists(pre, grid, kc, extra(kc), order)
            loads = [0.0] * kc + [sum(shifted[i] for i in lst) for lst in pre_lists]
            for fill in fills:
                dec_lists = _decode_lists(dec, grid, kc, fill, loads)
                span = fluid_span(loads, [sum(dec[p] for p in lst) for lst in dec_lists], parallel)
                built.append((pre_lists, dec_lists, t_p, span, kc))
                assert _fluid_floor(loads, sum(dec), parallel) <= span * (1 + 1e-9) if fill else True
                assert t_p <= span
        want = min(built, key=lambda p: p[3])              # min keeps the first of equals
        assert _best_fill_plan(pre, dec, grid, cands, fills, parallel, extra, order) == want
    assert _list_sums([1.0, 2.0, 0.1, 0.2], [[3, 2, 0], [], [1]]) == [0.2 + 0.1 + 1.0, 0.0, 2.0]
    assert _fluid_floor([0.0, 0.0, 10.0], 10.0, 99) == 5.0          # two CTAs pour 10 us by t = 5
    assert _fluid_floor([0.0] * 8, 80.0, 4) == 20.0                   # HBM feeds 4 at the full rate
    assert _best_fill_plan(pre, dec, grid, [], (True,), 1.0, extra, None) is None


def test_static_tails_are_opt_in_for_pod_and_pod_sm90():
    """The static-tail search is off by default (its host time lost in serving); backend_options
    .pod_sm90_static_tails=true reaches the Hopper planner through both adapters (pod through pod.api.plan's
    sm90_config): at a point where the search pays in the model, the plan takes tails only then."""
    from baselines.ours import _sm90_config
    from baselines.registry import BackendOptions
    from pod.api import plan
    from pod.dispatch import PodConfig
    from pod.kernels.pod_sm90 import STATIC_TAIL_KEYS
    s_ = SPECS["centre"]
    assert PodSm90Config().static_tail_keys is None and _sm90_config(BackendOptions()).static_tail_keys is None
    on = _sm90_config(BackendOptions(pod_sm90_static_tails=True))
    assert on.static_tail_keys == STATIC_TAIL_KEYS
    fused = PodConfig(variant="fused_sm90", num_sms=132)
    on_plan = plan(s_, fused, device="cpu", sm90_config=replace(on, balance="static"))
    off_plan = plan(s_, fused, device="cpu", sm90_config=PodSm90Config(balance="static"))
    default = plan(s_, fused, device="cpu")
    assert on_plan.sm90.tails > 0 and off_plan.sm90.tails == 0 and default.sm90.tails == 0
