"""L2 eviction hints on TMA copies, a PTX pass: what Triton 3.6 cannot express in Gluon.

A Hopper TMA copy (`cp.async.bulk.tensor`) can carry an L2 cache policy (`.L2::cache_hint` with a 64-bit
policy from `createpolicy`), e.g. evict-first for a stream read once, so it does not push out lines other
CTAs still reuse. Triton 3.6's TMA-load lowering refuses an eviction policy and Gluon's
`tma.async_copy_global_to_shared` takes none. So a kernel tags the copies it wants hinted through one of
their coordinates:

    col = l2_tag_evict_first(col)            # a tag instruction on the coordinate
    tma.async_copy_global_to_shared(desc, [row, col], bar, dst)

and `apply` (run on the PTX by a compile-stage hook, `install`) turns each tag back into a plain `mov` and
gives every bulk tensor copy that reads a tagged register the tag's policy. A register derived from a tagged
one by a `mov` or by adding a constant is tagged too: Triton splits a copy whose rows are wider than the
128-byte swizzle into several, at `col + 64`, `col + 128`, ... (head_dim 128: two a tile). Copies without a
tagged coordinate are left as they are; a kernel without tags compiles byte-identical.

The tag is not PTX (`pod.l2tag.v1.<policy>.b32`): a kernel compiled without the pass (the hook removed, a
Triton that changed its stages) fails in ptxas instead of running silently unhinted, and since the pass is
not in Triton's cache key, the tag's text (its version) is, through the kernel source.

Used by pod/kernels/pod_sm90.py (`PodSm90Config.decode_l2` / `prefill_l2`; docs/hopper_pod.md, Session 11).
"""
from __future__ import annotations

import re
import warnings
from collections import Counter

from triton.experimental import gluon
from triton.experimental.gluon import language as gl

POLICIES = ("evict_first", "evict_last")
_POLICY = re.compile(r"createpolicy\.fractional\.L2::(\w+)\.b64 %pod_l2p")   # one a hinted copy (`apply`)

_TAG = re.compile(r"pod\.l2tag\.v1\.(\w+)\.b32(\s+)(%r\d+),(\s*)(%r\d+);")
# dst <- src (+ constant): what carries a tag on from a tagged register
_DERIVED = re.compile(r"^\s*(?:mov\.(?:b32|u32|s32)\s+(%r\d+),\s*(%r\d+)|add\.(?:s32|u32)\s+(%r\d+),\s*(%r\d+),\s*-?\d+)\s*;",
                      re.M)
_COPY = re.compile(r"^(?P<indent>[ \t]*)(?P<pred>(?:@!?%p\d+\s+)?)(?P<op>cp\.async\.bulk\.tensor\.\dd\.shared::cluster"
                   r"\.global(?:\.tile)?\.mbarrier::complete_tx::bytes)\s+(?P<dst>\[[^\]]+\]),\s*\[(?P<map>%rd\d+),\s*"
                   r"\{(?P<coords>[^}]*)\}\],\s*(?P<bar>\[[^\]]+\]);", re.M)


@gluon.jit
def l2_tag_evict_first(x):
    """`x` (an int32 scalar: a TMA coordinate), tagged: the copies that read it stream evict-first in L2."""
    return gl.inline_asm_elementwise("pod.l2tag.v1.evict_first.b32 $0, $1;", "=r,r", [x], dtype=gl.int32,
                                     is_pure=True, pack=1)


@gluon.jit
def l2_tag_evict_last(x):
    """`x` tagged: the copies that read it stay in L2 past evict-normal lines."""
    return gl.inline_asm_elementwise("pod.l2tag.v1.evict_last.b32 $0, $1;", "=r,r", [x], dtype=gl.int32,
                                     is_pure=True, pack=1)


def apply(ptx: str) -> tuple[str, dict[str, int]]:
    """The PTX with every tag a mov again and every tagged copy hinted, and how many copies each policy
    got. A register that could carry two policies is refused (ValueError)."""
    tagged = {dst: pol for pol, _, dst, _, _ in _TAG.findall(ptx)}
    if not tagged:
        return ptx, {}
    bad = set(tagged.values()) - set(POLICIES)
    if bad:
        raise ValueError(f"unknown L2 policy tag(s) {sorted(bad)} (known: {POLICIES})")
    edges = [(m[0] or m[2], m[1] or m[3]) for m in _DERIVED.findall(ptx)]
    grew = True
    while grew:                              # movs (phi moves, hoisting) and constant offsets carry the tag
        grew = False
        for dst, src in edges:
            if src not in tagged:
                continue
            if dst not in tagged:
                tagged[dst] = tagged[src]
                grew = True
            elif tagged[dst] != tagged[src]:
                raise ValueError(f"register {dst} carries two L2 policies ({tagged[dst]}, {tagged[src]})")
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

    out = _COPY.sub(hint, _TAG.sub(r"mov.b32\2\3,\4\5;", ptx))
    if not any(counts.values()):
        warnings.warn("pod.kernels.ptx_hints: L2 tags found but no TMA copy reads them (Triton's PTX changed?); "
                      "the kernel runs without the hints", RuntimeWarning, stacklevel=2)
    return out, {k: v for k, v in counts.items() if v}


def hinted_copies(ptx: str) -> dict[str, int]:
    """How many copies of this PTX `apply` gave each policy (the compile checks count them)."""
    return dict(Counter(_POLICY.findall(ptx)))


def install() -> None:
    """Run `apply` on every kernel's PTX from now on (Triton's add_stages_inspection_hook; a hook already
    there runs first). Idempotent: call it before compiling a tagged kernel (pod_sm90.launch_args does, for
    a config that asks for hints)."""
    from triton import knobs
    prev = knobs.runtime.add_stages_inspection_hook
    if getattr(prev, "_pod_l2_hints", False):
        return

    def hook(backend, stages, options, language, capability):
        if prev is not None:
            prev(backend, stages, options, language, capability)
        make_ptx = stages.get("ptx")
        if make_ptx is not None:
            stages["ptx"] = lambda src, metadata: apply(make_ptx(src, metadata))[0]

    hook._pod_l2_hints = True
    knobs.runtime.add_stages_inspection_hook = hook
