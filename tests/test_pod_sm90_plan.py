"""The Hopper POD kernel's host-side plan (pod/kernels/pod_sm90.py, no GPU): every prefill tile and decode
pair runs exactly once, a CTA runs its decode pairs before its prefill tiles (the producer's ring drain
relies on that order when a decode CTA takes prefill tiles), and the stealing choice follows its rules."""
import pytest

from pod.batch import BatchSpec
from pod.kernels.pod_sm90 import PodSm90Config, lpt, plan_pod_sm90

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
}


def _lists(work):
    ptr = work.cta_ptr.tolist()
    items = work.cta_items.tolist()
    return [items[ptr[c]:ptr[c + 1]] for c in range(work.grid)]


@pytest.mark.parametrize("cfg", CONFIGS, ids=list(CONFIGS))
@pytest.mark.parametrize("spec", SPECS, ids=list(SPECS))
def test_every_item_once_and_decode_first(spec, cfg):
    work = plan_pod_sm90(SPECS[spec], CONFIGS[cfg], num_sms=132, device="cpu")
    lists = _lists(work)
    flat = [x for lst in lists for x in lst]
    assert sorted(x for x in flat if x >= 0) == list(range(work.n_prefill_tiles))
    assert sorted(-x - 1 for x in flat if x < 0) == list(range(work.n_decode_pairs))
    for lst in lists:
        n_dec = sum(x < 0 for x in lst)
        assert all(x < 0 for x in lst[:n_dec]), lst      # decode pairs first, then prefill tiles


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


def test_lpt_starts_from_given_loads():
    # 3 -> bin 1 (0), 2 -> bin 1 (3 < 4), 2 -> bin 0 (4 < 5)
    lists, span = lpt([3.0, 2.0, 2.0], 2, start=[4.0, 0.0])
    assert lists == [[2], [0, 1]] and span == 6.0
    lists, span = lpt([], 3, start=[1.0, 5.0, 2.0])
    assert span == 5.0
