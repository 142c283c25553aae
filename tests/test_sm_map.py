"""The GPC map (pod/kernels/sm_map.py): grouping cluster co-residence into GPCs, the SM orders built on a
map, the planner's use of them, and the probe kernel compiled for sm_90a as clusters (no GPU here)."""
import random

import pytest

from pod.batch import BatchSpec
from pod.kernels.pod_sm90 import SM_SLOTS, PodSm90Config, plan_pod_sm90, sm_map_for, sm_order
from pod.kernels.sm_map import gpc_order, groups_from_clusters

# A made-up 132-SM chip: 8 GPCs of 16-18 SMs whose ids interleave (TPC t = ids 2t, 2t+1 sits in GPC t % 8,
# with a few TPCs missing), so neither "ids in order" nor "stride" follows the GPCs.
SIZES = (18, 18, 16, 16, 16, 16, 16, 16)


def fake_gpcs():
    gpcs, t = [[] for _ in SIZES], 0
    while sum(map(len, gpcs)) < 132:
        g = t % 8
        if len(gpcs[g]) < SIZES[g]:
            gpcs[g] += [len(sum(gpcs, [])), len(sum(gpcs, [])) + 1]
        t += 1
    return tuple(tuple(sorted(g)) for g in gpcs)


def test_groups_from_clusters_recover_the_gpcs():
    """Random clusters (2-8 SMs of one GPC each, as the hardware places them) merge into exactly the GPCs;
    clusters never seen leave an SM alone rather than guessing."""
    gpcs = fake_gpcs()
    rng = random.Random(0)
    clusters = [rng.sample(g, rng.choice((2, 4, 8))) for _ in range(400) for g in gpcs]
    got = groups_from_clusters(clusters, 132)
    assert sorted(map(tuple, got)) == sorted(gpcs)
    assert groups_from_clusters([[3, 5], [5, 9]], 10) == [[0], [1], [2], [3, 5, 9], [4], [6], [7], [8]]


def block_gpcs():
    """GPCs on contiguous id blocks (18, 18, 16 x 6): ids in order would put the first k SMs on one or two."""
    out, start = [], 0
    for n in SIZES:
        out.append(tuple(range(start, start + n)))
        start += n
    return tuple(out)


@pytest.mark.parametrize("gpcs", [fake_gpcs(), block_gpcs()], ids=["interleaved", "blocks"])
@pytest.mark.parametrize("k", [1, 16, 48, 64, 131])
def test_gpc_orders(k, gpcs):
    gpc_of = {s: i for i, g in enumerate(gpcs) for s in g}
    for layout in ("gpc_spread", "gpc_pack"):
        order = gpc_order(layout, gpcs, 132, k)
        assert sorted(order) == list(range(132))
        per = [0] * 8
        for s in order[:k]:
            per[gpc_of[s]] += 1
        if layout == "gpc_spread":             # TPC pairs dealt round-robin: GPCs differ by at most one TPC
            assert max(per) - min(per) <= 2
            pairs = [order[i:i + 2] for i in range(0, k - 1, 2)]
            assert all(b == a + 1 and a % 2 == 0 for a, b in pairs)
        else:                                  # whole GPCs, the largest first: at most one GPC shared
            assert sum(1 for g, n in enumerate(per) if 0 < n < len(gpcs[g])) <= 1
            assert per[:2] == [min(k, 18), min(max(k - 18, 0), 18)]    # the two 18-SM GPCs first
    with pytest.raises(ValueError):
        gpc_order("gpc", gpcs, 132, k)


def test_gpc_order_on_fewer_sms_than_the_map():
    """A map probed on a larger chip: ids past num_sms are dropped before the order is built, so the spread
    still takes TPCs from every group that has SMs here."""
    order = gpc_order("gpc_spread", block_gpcs(), 64, 32)
    assert sorted(order) == list(range(64))
    groups = {s: i for i, g in enumerate(block_gpcs()) for s in g}
    assert sorted({groups[s] for s in order[:32]}) == [0, 1, 2, 3]   # ids 0-63 lie in the first four blocks


def test_gpc_binds_in_the_plan():
    """bind "gpc_*" takes its map from the config (off the GPU) and lays decode lists 0..k-1 on the order's
    first k SMs; without a map and without a GPU it refuses instead of guessing."""
    gpcs = fake_gpcs()
    spec = BatchSpec.build(32, 8, 128, prefill=[(1024, 12288)], decode=[8192] * 64, page_size=16)
    for bind in ("gpc_spread", "gpc_pack"):
        work = plan_pod_sm90(spec, PodSm90Config(bind=bind, gpcs=gpcs), num_sms=132, device="cpu")
        m = work.sm_map.tolist()
        order = sm_order(bind, 132, work.decode_ctas, gpcs)
        assert m == sm_map_for(bind, 132, work.decode_ctas, work.grid, gpcs) and len(m) == SM_SLOTS
        assert sorted(m[s] for s in order[:work.decode_ctas]) == list(range(work.decode_ctas))
        with pytest.raises(ValueError, match="gpcs"):
            plan_pod_sm90(spec, PodSm90Config(bind=bind), num_sms=132, device="cpu")


PROBE_COMPILE = """
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile as triton_compile
from pod.kernels.sm_map import _WARPS, _cluster_sms
k = triton_compile(ASTSource(fn=_cluster_sms, signature={"out": "*i32", "spin_ns": "i64", "N": "constexpr"},
                             constexprs={"N": 8 * 32 * _WARPS}),
                   target=GPUTarget("cuda", 90, 32), options=dict(num_warps=_WARPS, num_ctas=8))
ptx = k.asm["ptx"]
print(".reqnctapercluster 8" in ptx, "%smid" in ptx, "%globaltimer" in ptx)
"""


def test_probe_kernel_compiles_as_clusters():
    """The probe runs as clusters of 8 CTAs (a cluster never leaves its GPC) and reads %smid: compiled for
    sm_90a in a subprocess (the tests' interpreter mode has no compiler)."""
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", PROBE_COMPILE], env=env, capture_output=True, text=True,
                         timeout=300, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split() == ["True", "True", "True"]
