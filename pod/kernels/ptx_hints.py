"""L2 eviction hints on TMA copies, a PTX pass: what Triton 3.6 cannot express in Gluon.

A Hopper TMA copy (`cp.async.bulk.tensor`) can carry an L2 cache policy (`.L2::cache_hint` with a 64-bit
policy from `createpolicy`), e.g. evict-first for a stream read once, so it does not push out lines other
CTAs still reuse. Triton 3.6's TMA-load lowering refuses an eviction policy and Gluon's
`tma.async_copy_global_to_shared` takes none. So a kernel tags the copies it wants hinted through one of
their coordinates:

    col = l2_tag_evict_first(col)            # an identity mov, tagged with a PTX comment
    tma.async_copy_global_to_shared(desc, [row, col], bar, dst)

and `apply` (run on the PTX by a compile-stage hook, `install`) gives every bulk tensor copy that reads a
tagged register, directly or through plain movs, the tag's policy. Copies without a tagged coordinate are
left as they are; a kernel without tags compiles byte-identical. The tag text carries a version: the pass
is not in Triton's cache key, the kernel source (and so the tag) is.

Used by pod/kernels/pod_sm90.py (`PodSm90Config.decode_l2`): the decode role's K/V stream read evict-first
beside prefill tiles whose K/V are re-read from L2 by every query tile of a kv head.
"""
from __future__ import annotations

import re
import warnings

from triton.experimental import gluon
from triton.experimental.gluon import language as gl

TAG = "pod:l2"
POLICIES = ("evict_first", "evict_last")
_VERSION = "v1"

_TAGGED = re.compile(r"mov\.b32 \t?(%r\d+), (%r\d+);\s*// " + re.escape(TAG) + r"::(\w+):" + _VERSION)
_MOV = re.compile(r"^\s*mov\.(?:b32|u32|s32)\s+(%r\d+),\s*(%r\d+);", re.M)
_COPY = re.compile(r"^(?P<indent>[ \t]*)(?P<pred>(?:@!?%p\d+[ \t]+)?)(?P<op>cp\.async\.bulk\.tensor\.\dd\.shared::cluster\.global"
                   r"(?:\.tile)?\.mbarrier::complete_tx::bytes) (?P<dst>\[[^\]]+\]), \[(?P<map>%rd\d+), "
                   r"\{(?P<coords>[^}]*)\}\], (?P<bar>\[[^\]]+\]);", re.M)


@gluon.jit
def l2_tag_evict_first(x):
    """`x` (an int32 scalar: a TMA coordinate), tagged: the copies that read it stream evict-first in L2."""
    return gl.inline_asm_elementwise("mov.b32 $0, $1; // pod:l2::evict_first:v1", "=r,r", [x], dtype=gl.int32,
                                     is_pure=True, pack=1)


@gluon.jit
def l2_tag_evict_last(x):
    """`x` tagged: the copies that read it stay in L2 past evict-normal lines."""
    return gl.inline_asm_elementwise("mov.b32 $0, $1; // pod:l2::evict_last:v1", "=r,r", [x], dtype=gl.int32,
                                     is_pure=True, pack=1)


def apply(ptx: str) -> tuple[str, dict[str, int]]:
    """The PTX with every tagged copy hinted, and how many copies each policy got."""
    tagged = {out: pol for out, _, pol in _TAGGED.findall(ptx)}
    if not tagged:
        return ptx, {}
    bad = set(tagged.values()) - set(POLICIES)
    if bad:
        raise ValueError(f"unknown L2 policy tag(s) {sorted(bad)} (known: {POLICIES})")
    movs = _MOV.findall(ptx)
    grew = True
    while grew:                              # plain register copies carry the tag (phi moves, hoisting)
        grew = False
        for dst, src in movs:
            if src in tagged and dst not in tagged:
                tagged[dst] = tagged[src]
                grew = True
    counts = dict.fromkeys(POLICIES, 0)

    def hint(m: re.Match) -> str:
        pols = {tagged[c.strip()] for c in m["coords"].split(",") if c.strip() in tagged}
        if not pols:
            return m[0]
        if len(pols) > 1:
            raise ValueError(f"a TMA copy with two L2 policies {sorted(pols)}: {m[0].strip()}")
        pol = pols.pop()
        counts[pol] += 1
        # A block of its own: the policy register is local, made next to the copy (one ALU op in the
        # producer warp); the copy keeps its predicate.
        return (f"{m['indent']}{{ .reg .b64 %pod_l2p; createpolicy.fractional.L2::{pol}.b64 %pod_l2p, 1.0;\n"
                f"{m['indent']}{m['pred']}{m['op']}.L2::cache_hint {m['dst']}, [{m['map']}, {{{m['coords']}}}], "
                f"{m['bar']}, %pod_l2p; }}")

    out = _COPY.sub(hint, ptx)
    if not any(counts.values()):
        warnings.warn("pod.kernels.ptx_hints: L2 tags found but no TMA copy reads them (Triton's PTX changed?); "
                      "the kernel runs without the hints", RuntimeWarning, stacklevel=2)
    return out, {k: v for k, v in counts.items() if v}


LAST_COUNTS: dict[str, dict[str, int]] = {}   # kernel name -> copies hinted per policy, at its last compile


def install() -> None:
    """Run `apply` on every kernel's PTX from now on (Triton's add_stages_inspection_hook; a hook already
    there runs first). Idempotent."""
    from triton import knobs
    prev = knobs.runtime.add_stages_inspection_hook
    if getattr(prev, "_pod_l2_hints", False):
        return

    def hook(backend, stages, options, language, capability):
        if prev is not None:
            prev(backend, stages, options, language, capability)
        make_ptx = stages.get("ptx")
        if make_ptx is None:
            return

        def ptx_stage(src, metadata):
            ptx, counts = apply(make_ptx(src, metadata))
            if counts:
                LAST_COUNTS[metadata.get("name", "?")] = counts
            return ptx
        stages["ptx"] = ptx_stage

    hook._pod_l2_hints = True
    knobs.runtime.add_stages_inspection_hook = hook
