"""The fused POD-Attention kernel: the prefill tiles and the decode tiles of a hybrid batch in ONE launch.

Why one launch with SM-aware scheduling (POD-Attention, ASPLOS'25): a prefill tile is tensor-core bound,
a decode tile is HBM-bandwidth bound. If both kinds of CTA are resident on the *same* SM at once, each
uses the resource the other leaves idle. CTA index order does not give that (the hardware hands out
CTAs in blockIdx order, so an SM would get all-prefill or all-decode CTAs); instead every CTA decides
its role *after* it has landed on an SM:

  1. smid  = %smid (PTX; simulated as program_id % num_sms in the interpreter)
  2. slot  = atomic_add(sm_counter[smid], 1)          arrival order of this CTA on its SM
  3. role  = policy(slot): prefill for `prefill_share` slots out of every `policy_period` (spread
             evenly, Bresenham-style), so 1:1 gives D,P,D,P,... on every SM.
             OCCUPANCY_ROLES (beyond the paper): only the first `ctas_per_sm` arrivals on an SM use the
             slot; a later CTA replaces one that finished, so it looks at the roles *running* on its SM
             (per-SM per-role counters, +1 when a tile starts, -1 when it ends) and takes the role that
             is below its share there. With tiles of unequal length the arrival order alone drifts to
             P,P or D,D pairs on an SM; this keeps the mix.
  4. tile  = atomic_add(role_counter[role], 1)         next unclaimed tile of that role; if the role is
             exhausted, the CTA claims from the other role's counter instead
  5. run the tile;  6. atomic_add(done_counter, 1): the CTA that brings it to grid-1 resets every counter
     to zero, so the workspace is ready for the next launch without a memset launch.

One tile per CTA (the paper's scheme): grid = #prefill tiles + #decode tiles. Every CTA claims exactly
one tile: a CTA whose own role is exhausted finds a free tile of the other role, because the number of
successful claims equals the number of CTAs.

Tile bodies are the standalone kernels' own (one source of truth for the math):
  prefill tile t = pod.kernels.prefill.prefill_tile: BLOCK_M query rows of one chunk x one q head, work
      unit t // Hq of the prefill plan's list (chunk, q_block), heaviest first (LPT: the long causal
      tiles start early), q head t % Hq (GQA neighbours share K/V through L2).
  decode tile t = pod.kernels.decode.decode_tile: one (request, KV split) item t // Hkv for kv head
      t % Hkv, all GROUP q heads of that kv head packed as the rows of one tensor-core dot (K/V read
      once per group), longest split first. Called with FUSE_MERGE: a split CTA writes its fp32 partial
      and base-2 LSE, then (CTA barrier, acq_rel gpu-scope ticket on the (request, kv head) merge
      counter) the last split to arrive merges the partials (.cg loads) and resets its counter. So the
      split-KV merge happens inside the same launch.

Scheduling counter workspace, int32 [3 * SM_SLOTS + 4] (allocated by plan, all zeros between launches):
  [0, SM_SLOTS)                        per-SM arrival counters (indexed smid % SM_SLOTS)
  SM_SLOTS + CTR_PREFILL / CTR_DECODE  next prefill / decode tile
  SM_SLOTS + CTR_DONE                  CTAs finished
  RUNNING + 2 * sm + role              tiles of role (1 prefill, 0 decode) running on SM sm
(the decode plan's merge counters [num_decode * Hkv] are a separate tensor, also zero between launches)

Math conventions (exp2-domain scores, base-2 LSE, online softmax) are pod.kernels.common's.
"""
from __future__ import annotations

import triton
import triton.language as tl

from pod.kernels.decode import decode_tile
from pod.kernels.prefill import prefill_tile

# Host-side sizes, and the same values as constexpr globals for the jit code (Triton only lets kernels
# read globals that are tl.constexpr).
SM_SLOTS_HOST = 1024     # per-SM counters; %smid < %nsmid <= 1024 on every NVIDIA GPU so far
COUNTER_WORDS = 3 * SM_SLOTS_HOST + 4
SM_SLOTS = tl.constexpr(SM_SLOTS_HOST)
RUNNING = tl.constexpr(SM_SLOTS_HOST + 4)
CTR_PREFILL = tl.constexpr(0)
CTR_DECODE = tl.constexpr(1)
CTR_DONE = tl.constexpr(2)

# The order of each role's constexprs inside the P_CONST / D_CONST tuples (pod.api builds the tuples
# from the standalone plans' constexpr dicts in this order, and fails if a plan asks for another set).
PREFILL_TILE_CONSTEXPRS = ("GROUP", "HEAD_DIM", "BLOCK_M", "BLOCK_N", "PAGE_SIZE", "PAGED", "HAS_LSE")
DECODE_TILE_CONSTEXPRS = ("NUM_KV_HEADS", "GROUP", "HEAD_DIM", "BLOCK_M", "BLOCK_N", "PAGE_SIZE", "PAGED",
                          "FUSE_MERGE")


# ----------------------------------------------------------------------------------------------------
# Scheduling helpers
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _sm_id(num_sim_sms, SIMULATE_SMID: tl.constexpr):
    """The SM this CTA runs on. In the interpreter (no PTX) CTA i is said to run on SM i % num_sim_sms."""
    if SIMULATE_SMID:
        smid = tl.program_id(0) % num_sim_sms
    else:
        smid = tl.inline_asm_elementwise("mov.u32 $0, %smid;", "=r", [], dtype=tl.int32,
                                         is_pure=False, pack=1)
    return smid


@triton.jit
def _role_of_slot(slot, prefill_share, policy_period):
    """1 (prefill) for `prefill_share` of every `policy_period` arrival slots, spread evenly: slot s is
    prefill iff floor((s+1)*share/period) - floor(s*share/period) == 1 (1:1 -> D,P,D,P,...)."""
    s = slot % policy_period
    return ((s + 1) * prefill_share) // policy_period - (s * prefill_share) // policy_period


@triton.jit
def _claim(counters, want_prefill, n_prefill_tiles, n_decode_tiles):
    """Claim the next tile of the wanted role (1 prefill, 0 decode), else of the other role.
    Returns (is_prefill, tile); tile == -1 when both roles are exhausted. Relaxed atomics: only the
    uniqueness of the tickets matters. Counter of role r sits at SM_SLOTS + CTR_PREFILL + (1 - r)."""
    ctr_base = counters + SM_SLOTS + CTR_PREFILL
    n_first = tl.where(want_prefill == 1, n_prefill_tiles, n_decode_tiles)
    tile = tl.atomic_add(ctr_base + (1 - want_prefill), 1, sem="relaxed")
    is_prefill = want_prefill
    if tile >= n_first:
        is_prefill = 1 - want_prefill
        n_second = tl.where(is_prefill == 1, n_prefill_tiles, n_decode_tiles)
        tile = tl.atomic_add(ctr_base + want_prefill, 1, sem="relaxed")
        tile = tl.where(tile < n_second, tile, -1)
    return is_prefill, tile


@triton.jit
def _trace_first_claim(trace, smid, slot, want_prefill, is_prefill, tile):
    """Tests/debugging: trace int32 [grid, 5] row of this CTA = (smid, slot, wanted role, first claimed
    role, first tile)."""
    tr = trace + tl.program_id(0) * 5
    tl.store(tr, smid)
    tl.store(tr + 1, slot)
    tl.store(tr + 2, want_prefill)
    tl.store(tr + 3, is_prefill)
    tl.store(tr + 4, tile)


# ----------------------------------------------------------------------------------------------------
# The fused kernel. Tile bodies: pod.kernels.prefill.prefill_tile and pod.kernels.decode.decode_tile
# (with FUSE_MERGE: split-KV partials merged in-launch by the last split CTA). Each role's runtime
# arguments travel as one tuple (p_args: prefill_launch_args(), d_args: DecodeWork.tile_args()) and its
# constexprs as one constexpr tuple (P_CONST, D_CONST, ordered as *_TILE_CONSTEXPRS above).
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _run_tile(is_prefill, tile, p_args, d_args, P_CONST: tl.constexpr, D_CONST: tl.constexpr,
              HAS_PREFILL: tl.constexpr, HAS_DECODE: tl.constexpr):
    if is_prefill == 1:
        if HAS_PREFILL:
            prefill_tile(tile, p_args, P_CONST[0], P_CONST[1], P_CONST[2], P_CONST[3], P_CONST[4], P_CONST[5],
                         P_CONST[6])
    else:
        if HAS_DECODE:
            decode_tile(tile, d_args, D_CONST[0], D_CONST[1], D_CONST[2], D_CONST[3], D_CONST[4], D_CONST[5],
                        D_CONST[6], D_CONST[7])


@triton.jit
def pod_fused_kernel(p_args, d_args, n_prefill_tiles, n_decode_tiles, counters, prefill_share, policy_period,
                     ctas_per_sm, num_sim_sms, trace,
                     P_CONST: tl.constexpr, D_CONST: tl.constexpr,
                     HAS_PREFILL: tl.constexpr, HAS_DECODE: tl.constexpr,
                     OCCUPANCY_ROLES: tl.constexpr, SIMULATE_SMID: tl.constexpr, TRACE: tl.constexpr):
    smid = _sm_id(num_sim_sms, SIMULATE_SMID) % SM_SLOTS
    slot = tl.atomic_add(counters + smid, 1, sem="relaxed")
    want_prefill = _role_of_slot(slot, prefill_share, policy_period)
    running = counters + RUNNING + 2 * smid          # [decode, prefill] tiles running on this SM
    if OCCUPANCY_ROLES:
        if slot >= ctas_per_sm:
            # A replacement CTA: prefill iff, counting itself, the SM's prefill count stays within
            # its share: rp < (rp + rd + 1) * share / period.
            n_dec = tl.atomic_add(running, 0, sem="relaxed")
            n_pre = tl.atomic_add(running + 1, 0, sem="relaxed")
            want_prefill = (n_pre * policy_period < (n_pre + n_dec + 1) * prefill_share).to(tl.int32)
    # One tile per CTA: the grid has exactly one CTA per tile, so the claim always succeeds.
    is_prefill, tile = _claim(counters, want_prefill, n_prefill_tiles, n_decode_tiles)
    if OCCUPANCY_ROLES:
        tl.atomic_add(running + is_prefill, 1, sem="relaxed")
    if TRACE:
        _trace_first_claim(trace, smid, slot, want_prefill, is_prefill, tile)
    while tile >= 0:
        _run_tile(is_prefill, tile, p_args, d_args, P_CONST, D_CONST, HAS_PREFILL, HAS_DECODE)
        if OCCUPANCY_ROLES:
            tl.atomic_add(running + is_prefill, -1, sem="relaxed")
        tile = -1
    # Last CTA out resets the scheduling counters (merge counters reset themselves) for the next launch.
    tl.debug_barrier()
    done = tl.atomic_add(counters + SM_SLOTS + CTR_DONE, 1, sem="acq_rel", scope="gpu")
    if done == tl.num_programs(0) - 1:
        # (running counts are back to zero by construction; zeroed anyway, it costs nothing)
        tl.store(counters + tl.arange(0, SM_SLOTS), tl.zeros([SM_SLOTS], tl.int32))
        tl.store(counters + SM_SLOTS + tl.arange(0, 4), tl.zeros([4], tl.int32))
        tl.store(counters + RUNNING + tl.arange(0, 2 * SM_SLOTS), tl.zeros([2 * SM_SLOTS], tl.int32))
