"""The dispatcher: from a batch's shape, pick how POD runs it (see docs/dispatcher.md).

`choose_config(spec, num_sms, prefill_kernel=...)` returns a `PodConfig`: the variant (fused
one-tile-per-CTA, or serial = prefill launch then decode launch), CTAs per SM, the
prefill:decode role policy, tile sizes and the decode KV-split count. It is a pure function of the shape
and of the facts it is handed by name (the SM count, which prefill kernel pod.prefill would run): no
device query, no timing, so `plan()` can call it and tests can check it.

The decision rests on a two-number cost model, estimated_ms(): prefill attention is compute bound
(prefill_flops / PREFILL_TFLOPS), decode attention is bandwidth bound (decode_bytes / DECODE_GBPS).
Fusion hides the smaller of the two under the larger; when the smaller is a negligible share of the
larger (or absent) there is nothing to hide and the fused kernel's costs (two roles' registers in one
kernel, the scheduling atomics) are pure loss, so we run serial.

Every threshold is a named constant below, to be set from H100 measurements (docs/dispatcher.md says how).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

from pod.batch import BatchSpec

# ---- cost model: sustained throughput of our kernels alone on the target GPU (H100 SXM, bf16) ----------
PREFILL_TFLOPS = 350.0        # prefill attention alone, TFLOP/s (causal FLOPs of BatchSpec.prefill_flops)
DECODE_GBPS = 2800.0          # decode attention alone, GB/s (BatchSpec.decode_bytes)
# ---- when to fuse ------------------------------------------------------------------------------------
MIN_OVERLAP_SHARE = 0.05      # fuse only if min(t_prefill, t_decode) >= this share of max(...)
# ---- Hopper (the prefill kernel is the sm90 tile): the fused Hopper kernel (pod/kernels/pod_sm90.py) -----
SM90_PREFILL_TFLOPS = 568.0   # the Hopper prefill tile alone on an H200 (4.3 TFLOP/s an SM x 132)
SM90_DECODE_GBPS = 4300.0     # decode alone: HBM
SM90_MIN_OVERLAP_SHARE = 0.10 # fuse on Hopper only if min(t_prefill, t_decode) >= this share of max(...):
                              # measured over the paper sweep's 46 points (docs/hopper_pod.md, "dispatcher")
SM90_MHA_MIN_OVERLAP_SHARE = 0.20  # ... and this for MHA (one q head a KV head: the swap-AB decode pads
                              # 1 column to 16). Fused / triton_serial at the kv-head prefill order (H200,
                              # 01fc38b, paper + serving_shapes points): 1.04-1.21x at all 11 points with
                              # shares 0.22-0.97; 0.90-1.07x at 0.12-0.19; 0.97-1.03x below 0.1 (hopper_split,
                              # 1ffa7d7, LPT order: 0.98x at 0.27). The LPT order had lost 0.96-1.00x at
                              # 0.41-0.60: 0.7 until then.
SM90_PREFILL_HEAVY_MIN_SHARE = 0.40  # ... and this where prefill is the larger role: inside the fused launch
                              # the prefill tiles run 1.1-1.4x slower than alone (beside a decode stream),
                              # which a small decode share cannot pay back. Three paper sweeps (H200): decode
                              # / prefill 0.23 lost (0.91-0.93x), 0.24 at parity (0.98-1.03x), >= 0.64 won
SM90_LARGE_DECODE_MS = 0.6    # ... but GQA batches whose decode alone takes >= this (ms at SM90_DECODE_GBPS) fuse
                              # whatever the prefill's share: the decode saturates HBM from part of the GPU
                              # and the prefill tiles run on the rest. Paper grid (H200, 55ae7e2, 204 GQA points
                              # with share < 0.1, decode 0.7-1.0 ms): fused / triton_serial 1.069x geomean
                              # (0.965-1.25, 97% faster); at 0.25-0.52 ms (paper, per_chunk) 0.77-1.06x
# ---- role policy ---------------------------------------------------------------------------------------
PROPORTIONAL_ABOVE = 3.0      # if one role's estimated time is > this x the other's: proportional policy
POLICY_PERIOD = 8             # proportional shares are k/POLICY_PERIOD, k in 1..POLICY_PERIOD-1
OCCUPANCY_ROLES = True        # after the first ctas_per_sm arrivals, role by what runs on the SM (not
                              # the paper: pod_paper turns it off)
# ---- occupancy -------------------------------------------------------------------------------------------
CTAS_PER_SM = 2               # scheduling slots per SM (the arrivals that take their role from the slot)
RESIDENT_CTAS_PER_SM = 2      # a prefill and a decode CTA must be co-resident: cap registers for this many
REGISTERS_PER_SM = 65536      # sm_80 / sm_90
CONTIGUOUS_NUM_STAGES = 3     # software-pipeline depth of both roles' KV loops (64 KB smem at D=128)
PAGED_NUM_STAGES = 5          # (82 KB smem at D=128: still 2 CTAs per SM)
# ---- decode split-KV -------------------------------------------------------------------------------------
DECODE_CTAS_PER_SM_TARGET = 2 # split decode KV until #decode tiles >= this x #SMs ...
MIN_SPLIT_TOKENS = 512        # ... but never below this many keys per split ...
MAX_KV_SPLITS = 16            # ... nor more splits than this per request

VARIANTS = ("fused", "serial", "fused_sm90")   # fused_sm90: one launch of the Hopper POD kernel
POLICIES = ("alternating", "proportional")
PREFILL_KERNELS = ("portable", "sm90")   # pod.prefill.resolve_prefill_kernel's answers


@dataclass(frozen=True)
class PodConfig:
    """Knobs of one POD launch. `plan()` fills the `None`s from the batch shape via `choose_config`."""

    variant: str = "fused"               # fused | serial
    ctas_per_sm: int = CTAS_PER_SM       # scheduling slots per SM (occupancy roles: the first arrivals)
    policy: str = "alternating"          # alternating (1:1) | proportional (share of estimated time)
    prefill_share: int | None = None     # explicit policy: prefill gets prefill_share of policy_period
    policy_period: int | None = None     #   arrival slots on every SM (overrides `policy`)
    occupancy_roles: bool = OCCUPANCY_ROLES  # replacement CTAs pick the role under its share on their SM
    block_m: int = 128                   # prefill query rows per tile
    block_n: int = 32                    # prefill keys per inner step (32: fits 128 regs, see docs)
    block_n_decode: int = 64             # decode keys per inner step
    kv_splits: int = 1                   # most KV splits of one decode request (merged in-launch)
    num_warps: int = 8
    num_stages: int | None = None        # None: 3 contiguous, 5 paged (the block-table load takes a
                                         # pipeline stage: 5 keeps two K/V buffers in flight)
    maxnreg: int | None = 0              # registers/thread cap; 0: auto (RESIDENT_CTAS_PER_SM fit), None: no cap
    num_sms: int | None = None           # None: pod.env.device_num_sms (off the GPU: SIMULATED_NUM_SMS)

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"PodConfig.variant={self.variant!r}: allowed {VARIANTS}")
        if self.policy not in POLICIES:
            raise ValueError(f"PodConfig.policy={self.policy!r}: allowed {POLICIES}")
        if self.ctas_per_sm < 1:
            raise ValueError(f"PodConfig.ctas_per_sm={self.ctas_per_sm}: must be >= 1")
        for name in ("block_m", "block_n", "block_n_decode"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"PodConfig.{name}={v}: must be a power of two >= 16 (tensor-core dot)")
        if self.kv_splits < 1:
            raise ValueError(f"PodConfig.kv_splits={self.kv_splits}: must be >= 1")
        if (self.prefill_share is None) != (self.policy_period is None):
            raise ValueError("PodConfig.prefill_share and policy_period go together")
        if self.policy_period is not None and not 0 <= self.prefill_share <= self.policy_period:
            raise ValueError(f"PodConfig.prefill_share={self.prefill_share}: must be in "
                             f"[0, policy_period={self.policy_period}]")

    def as_dict(self) -> dict:
        return asdict(self)

    def resolved_num_stages(self, paged: bool) -> int:
        if self.num_stages is not None:
            return self.num_stages
        return PAGED_NUM_STAGES if paged else CONTIGUOUS_NUM_STAGES

    def resolved_maxnreg(self) -> int | None:
        """The register cap passed to the compiler: auto = the most that lets RESIDENT_CTAS_PER_SM
        CTAs of num_warps warps share an SM's 64K registers (128 for 2 x 8 warps), None if >= 255."""
        if self.maxnreg != 0:
            return self.maxnreg
        cap = REGISTERS_PER_SM // (RESIDENT_CTAS_PER_SM * self.num_warps * 32) // 8 * 8
        return cap if cap < 255 else None


SMEM_PER_SM = 228 * 1024          # H100: 228 KB shared memory per SM, 1 KB of it reserved per CTA
SMEM_RESERVED_PER_CTA = 1024
MAX_THREADS_PER_SM = 2048


def max_ctas_per_sm(n_regs: int, shared_bytes: int, num_warps: int) -> int:
    """Occupancy limit of one kernel on an H100 SM from its registers, shared memory and threads
    (registers are allocated per warp in units of 256)."""
    regs_per_warp = -(-n_regs * 32 // 256) * 256
    by_regs = REGISTERS_PER_SM // max(1, regs_per_warp * num_warps)
    by_smem = SMEM_PER_SM // (shared_bytes + SMEM_RESERVED_PER_CTA)
    by_threads = MAX_THREADS_PER_SM // (32 * num_warps)
    return min(by_regs, by_smem, by_threads, 32)


def estimated_ms(spec: BatchSpec) -> tuple[float, float]:
    """(prefill ms, decode ms) of each role run alone, from the cost model above."""
    t_prefill = spec.prefill_flops() / (PREFILL_TFLOPS * 1e12) * 1e3
    t_decode = spec.decode_bytes() / (DECODE_GBPS * 1e9) * 1e3 if spec.num_decode else 0.0
    return t_prefill, t_decode


def sm90_estimated_ms(prefill_flops: float, decode_bytes: float) -> tuple[float, float]:
    """(prefill ms, decode ms) of each role alone under the Hopper rule's cost model (H200 rates)."""
    return prefill_flops / (SM90_PREFILL_TFLOPS * 1e12) * 1e3, decode_bytes / (SM90_DECODE_GBPS * 1e9) * 1e3


def sm90_rule(t_prefill_ms: float, t_decode_ms: float, group_size: int) -> bool:
    """The Hopper rule on a hybrid batch's estimated role times (sm90_estimated_ms): fuse where the smaller
    role's time is at least SM90_MIN_OVERLAP_SHARE of the larger's (MHA, group_size 1:
    SM90_MHA_MIN_OVERLAP_SHARE; prefill the larger: SM90_PREFILL_HEAVY_MIN_SHARE), or where a GQA decode
    outweighs the prefill and alone takes >= SM90_LARGE_DECODE_MS. analysis.dispatch_evidence applies it to
    measured rows."""
    if group_size > 1 and t_decode_ms > t_prefill_ms and t_decode_ms >= SM90_LARGE_DECODE_MS:
        return True
    need = SM90_MIN_OVERLAP_SHARE if group_size > 1 else SM90_MHA_MIN_OVERLAP_SHARE
    if t_prefill_ms > t_decode_ms:
        need = max(need, SM90_PREFILL_HEAVY_MIN_SHARE)
    return min(t_prefill_ms, t_decode_ms) >= need * max(t_prefill_ms, t_decode_ms)


def sm90_fuses(spec: BatchSpec, supported: bool = True) -> bool:
    """Hopper: one launch of pod_sm90 (else the two standalone launches) when it handles the batch
    (`supported`: pod.api passes pod_sm90_supports' answer, a fact like prefill_kernel), both roles are
    there and sm90_rule says so."""
    if not (supported and spec.num_prefill and spec.num_decode):
        return False
    return sm90_rule(*sm90_estimated_ms(spec.prefill_flops(), spec.decode_bytes()), spec.heads.group_size)


def role_policy(spec: BatchSpec, config: PodConfig) -> tuple[int, int]:
    """(prefill_share, policy_period): a CTA whose arrival slot s on its SM has
    floor((s+1)*share/period) - floor(s*share/period) == 1 starts as a prefill CTA."""
    if config.prefill_share is not None:
        return config.prefill_share, config.policy_period
    if not spec.num_decode:
        return 1, 1
    if not spec.num_prefill:
        return 0, 1
    if config.policy == "alternating":
        return 1, 2
    t_prefill, t_decode = estimated_ms(spec)
    share = round(POLICY_PERIOD * t_prefill / (t_prefill + t_decode))
    return min(max(share, 1), POLICY_PERIOD - 1), POLICY_PERIOD


def decode_kv_splits(spec: BatchSpec, num_sms: int, block_n_decode: int = 64) -> int:
    """Most splits per decode request: enough decode tiles to cover DECODE_CTAS_PER_SM_TARGET per SM,
    each split >= MIN_SPLIT_TOKENS keys, at most MAX_KV_SPLITS."""
    if not spec.num_decode:
        return 1
    items = spec.num_decode * spec.heads.num_kv_heads
    want = math.ceil(DECODE_CTAS_PER_SM_TARGET * num_sms / items)
    longest = max(spec.decode_context_lens)
    room = max(1, longest // max(MIN_SPLIT_TOKENS, block_n_decode))
    return max(1, min(want, room, MAX_KV_SPLITS))


def choose_config(spec: BatchSpec, num_sms: int, base: PodConfig | None = None, *,
                  prefill_kernel: str = "portable", sm90_supported: bool = True,
                  hopper: bool = False) -> PodConfig:
    """The dispatcher. `base` supplies the knobs it does not decide (tile sizes, warps, ...);
    `prefill_kernel` is the standalone prefill kernel the batch would get ("sm90": the Hopper tile;
    pod.prefill.resolve_prefill_kernel decides it from the device); `sm90_supported`: whether the Hopper
    POD kernel handles the batch (pod.kernels.pod_sm90.pod_sm90_supports; pod.api passes it); `hopper`: the
    batch runs on a Hopper GPU (pod.env.on_hopper; pod.api passes it): where the Hopper POD kernel handles
    the batch its rule applies even if the standalone prefill is the portable tile (a prefill under
    pod.prefill.SM90_MIN_PREFILL_FLOPS); a layout it does not handle keeps the portable rule below."""
    if prefill_kernel not in PREFILL_KERNELS:
        raise ValueError(f"prefill_kernel={prefill_kernel!r}: allowed {PREFILL_KERNELS}")
    base = base or PodConfig()
    # 1. the standalone prefill is the Hopper tile: the portable fused kernel (BLOCK_N 32 under a register
    # cap for two CTAs an SM) cannot beat it (docs/hopper_prefill.md); the Hopper POD kernel, built on that
    # tile, runs the batch in one launch where the Hopper rule says so (measured on the H200). The rule has
    # its own shares, on Hopper rates: the portable share test below would send a large decode beside a
    # small prefill serial before the rule's large-decode clause is asked. It holds on any Hopper GPU: a
    # prefill too small for the standalone Hopper tile (a 512-token chunk without context beside 1767
    # decodes of 4K) is one more tile of the fused launch, and at the grid's 27 such points `pod` ran serial
    # (0.92-1.00x the fastest serial path) where the fused launch ran 0.96-1.12x (H200, ff9fb15).
    if prefill_kernel == "sm90" or (hopper and sm90_supported):
        return replace(base, variant="fused_sm90" if sm90_fuses(spec, sm90_supported) else "serial")
    # 2. one role only, or one role negligible next to the other: nothing to overlap.
    t_prefill, t_decode = estimated_ms(spec)
    if min(t_prefill, t_decode) < MIN_OVERLAP_SHARE * max(t_prefill, t_decode):
        return replace(base, variant="serial")   # the standalone decode plan picks its own splits
    # 3. both roles matter: fuse. Policy by imbalance of the estimated times.
    ratio = max(t_prefill, t_decode) / min(t_prefill, t_decode)
    policy = "proportional" if ratio > PROPORTIONAL_ABOVE else "alternating"
    return replace(base, variant="fused", ctas_per_sm=CTAS_PER_SM, policy=policy,
                   kv_splits=decode_kv_splits(spec, num_sms, base.block_n_decode))
