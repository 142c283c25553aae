"""pod/kernels/ptx_hints.py: the PTX pass that gives tagged TMA copies an L2 cache policy (the compiled
kernels are checked in tests/test_prefill_sm90.py)."""
import pytest

from pod.kernels import ptx_hints as H

COPY = ("\t{p}cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%r10], "
        "[%rd5, {{{c0}, {c1}}}], [%r11];")
PTX = "\n".join([
    "\tpod.l2tag.v1.evict_first.b32 %r3, %r2;",
    "\tmov.b32 \t%r4, %r3;",                               # a plain copy of the tagged register
    "\tadd.s32 \t%r8, %r3, 64;",                           # the second half of a 256-byte row
    COPY.format(p="@%p1 ", c0="%r3", c1="%r7"),            # tagged directly
    COPY.format(p="@!%p2 ", c0="%r4", c1="%r7"),           # through the mov, negated predicate
    COPY.format(p="", c0="%r8", c1="%r7"),                 # through the offset, no predicate
    COPY.format(p="@%p3 ", c0="%r2", c1="%r7"),            # the untagged source: left alone
])


def test_tagged_copies_get_the_policy_and_keep_their_predicate():
    out, counts = H.apply(PTX)
    assert counts == {"evict_first": 3}
    lines = out.splitlines()
    assert lines[0] == "\tmov.b32 %r3, %r2;"              # the tag is a mov again
    hinted = [ln for ln in lines if ".L2::cache_hint" in ln]
    assert [h.strip()[:6] for h in hinted] == ["@%p1 c", "@!%p2 ", "cp.asy"]
    assert all(h.endswith("[%r11], %pod_l2p; }") for h in hinted)
    # the policy is made in the copy's own block, unpredicated
    i = lines.index(hinted[0])
    assert lines[i - 1].strip() == "{ .reg .b64 %pod_l2p; createpolicy.fractional.L2::evict_first.b64 %pod_l2p, 1.0;"
    assert COPY.format(p="@%p3 ", c0="%r2", c1="%r7") in lines                # untouched
    assert "pod.l2tag" not in out


def test_without_tags_the_ptx_is_unchanged():
    plain = PTX.replace("pod.l2tag.v1.evict_first.b32", "mov.b32")
    assert H.apply(plain) == (plain, {})


@pytest.mark.parametrize("ptx,match", [
    ("\tpod.l2tag.v1.evict_first.b32 %r3, %r2;\n\tpod.l2tag.v1.evict_last.b32 %r5, %r6;\n"
     + COPY.format(p="@%p1 ", c0="%r3", c1="%r5"), "copy with two L2 policies"),
    ("\tpod.l2tag.v1.evict_first.b32 %r3, %r2;\n\tpod.l2tag.v1.evict_last.b32 %r5, %r6;\n"
     "\tmov.b32 %r9, %r3;\n\tmov.b32 %r9, %r5;\n", "carries two L2 policies"),      # a phi of both
    ("\tpod.l2tag.v1.evict_never.b32 %r3, %r2;\n", "unknown L2 policy"),
])
def test_conflicting_or_unknown_policies_are_refused(ptx, match):
    with pytest.raises(ValueError, match=match):
        H.apply(ptx)


def test_a_tag_no_copy_reads_warns():
    with pytest.warns(RuntimeWarning, match="no TMA copy reads them"):
        out, counts = H.apply("\tpod.l2tag.v1.evict_first.b32 %r3, %r2;\n" + COPY.format(p="", c0="%r9", c1="%r7"))
    assert counts == {} and "pod.l2tag" not in out


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
    assert stages["ptx"](None, {}).count(".L2::cache_hint") == 3
