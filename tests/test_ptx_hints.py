"""pod/kernels/ptx_hints.py: the PTX pass that gives tagged TMA copies an L2 cache policy (the compiled
kernels are checked in tests/test_prefill_sm90.py)."""
import pytest

from pod.kernels import ptx_hints as H

COPY = ("\t@%p{p} cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%r10], "
        "[%rd5, {{{c0}, {c1}}}], [%r11];")
PTX = "\n".join([
    "\tmov.b32 %r3, %r2; // pod:l2::evict_first:v1",
    "\tmov.b32 %r4, %r3;",                                # a plain copy of the tagged register
    COPY.format(p=1, c0="%r3", c1="%r7"),                 # tagged directly
    COPY.format(p=2, c0="%r4", c1="%r7"),                 # through the mov
    COPY.format(p=3, c0="%r2", c1="%r7"),                 # the untagged source: left alone
])


def test_tagged_copies_get_the_policy_and_keep_their_predicate():
    out, counts = H.apply(PTX)
    assert counts == {"evict_first": 2}
    lines = out.splitlines()
    hinted = [ln for ln in lines if ".L2::cache_hint" in ln]
    assert len(hinted) == 2
    assert hinted[0].strip().startswith("@%p1 cp.async.bulk.tensor.2d") and hinted[0].endswith("%pod_l2p; }")
    assert "@%p2" in hinted[1]
    # the policy is made in the copy's own block, unpredicated
    i = lines.index(hinted[0])
    assert lines[i - 1].strip() == "{ .reg .b64 %pod_l2p; createpolicy.fractional.L2::evict_first.b64 %pod_l2p, 1.0;"
    assert COPY.format(p=3, c0="%r2", c1="%r7") in lines                     # untouched
    assert out.count("{") == PTX.count("{") + 2 and out.count("}") == PTX.count("}") + 2


def test_without_tags_the_ptx_is_unchanged():
    plain = PTX.replace(" // pod:l2::evict_first:v1", "")
    assert H.apply(plain) == (plain, {})


def test_two_policies_on_one_copy_are_refused():
    ptx = "\n".join(["\tmov.b32 %r3, %r2; // pod:l2::evict_first:v1", "\tmov.b32 %r5, %r6; // pod:l2::evict_last:v1",
                     COPY.format(p=1, c0="%r3", c1="%r5")])
    with pytest.raises(ValueError, match="two L2 policies"):
        H.apply(ptx)


def test_a_tag_no_copy_reads_warns():
    with pytest.warns(RuntimeWarning, match="no TMA copy reads them"):
        out, counts = H.apply("\tmov.b32 %r3, %r2; // pod:l2::evict_first:v1\n" + COPY.format(p=1, c0="%r9", c1="%r7"))
    assert counts == {}


def test_install_is_idempotent_and_keeps_an_earlier_hook(monkeypatch):
    from triton import knobs
    seen = []

    def earlier(backend, stages, options, language, capability):
        seen.append(language)
    monkeypatch.setattr(knobs.runtime, "add_stages_inspection_hook", earlier)
    H.install()
    hook = knobs.runtime.add_stages_inspection_hook
    H.install()
    assert knobs.runtime.add_stages_inspection_hook is hook
    stages = {"ptx": lambda src, md: PTX}
    hook(None, stages, None, "gluon", 90)
    assert seen == ["gluon"]
    assert stages["ptx"](None, {"name": "k"}).count(".L2::cache_hint") == 2
    assert H.LAST_COUNTS["k"] == {"evict_first": 2}
