"""Seeded synthetic requests: prompt/output length distributions and arrival times.

A length distribution is one of
    fixed      every request `value` tokens
    uniform    integers in [low, high], uniform
    lognormal  round(exp(N(log(median), sigma))) clipped to [low, high]  (the heavy-tailed shape of
               real chat/summarisation traces)
Offline mode: every request arrives at t = 0. Online mode: Poisson arrivals at `qps` requests/s
(exponential inter-arrival gaps, the first request at its first gap). Prompt tokens are uniform
over the vocabulary. Everything is drawn from one numpy Generator seeded with `seed`: the same
config gives the same requests on any machine.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

LENGTH_KINDS = ("fixed", "uniform", "lognormal")


@dataclass(frozen=True)
class LengthDist:
    kind: str = "fixed"
    value: int = 0          # fixed
    low: int = 1            # uniform bounds; lognormal clip
    high: int = 1
    median: float = 0.0     # lognormal
    sigma: float = 1.0

    def __post_init__(self):
        if self.kind not in LENGTH_KINDS:
            raise ValueError(f"LengthDist.kind={self.kind!r} is invalid: one of {LENGTH_KINDS}")
        if self.kind == "fixed" and self.value < 1:
            raise ValueError(f"LengthDist.value={self.value!r} is invalid: a fixed length must be >= 1")
        if self.kind in ("uniform", "lognormal") and not 1 <= self.low <= self.high:
            raise ValueError(f"LengthDist.low/high=({self.low}, {self.high}) are invalid: "
                             f"need 1 <= low <= high")
        if self.kind == "lognormal" and (self.median <= 0 or self.sigma < 0):
            raise ValueError(f"LengthDist.median/sigma=({self.median}, {self.sigma}) are invalid: "
                             f"need median > 0 and sigma >= 0")

    @property
    def max(self) -> int:
        return self.value if self.kind == "fixed" else self.high

    def sample(self, n: int, rng: np.random.Generator) -> list[int]:
        if self.kind == "fixed":
            return [self.value] * n
        if self.kind == "uniform":
            return rng.integers(self.low, self.high + 1, size=n).tolist()
        x = np.exp(rng.normal(math.log(self.median), self.sigma, size=n))
        return np.clip(np.rint(x), self.low, self.high).astype(np.int64).tolist()


@dataclass(frozen=True)
class RequestSpec:
    request_id: int
    arrival_s: float
    prompt: tuple[int, ...]
    output_len: int         # tokens to generate (the first comes from the prompt's last position)


@dataclass(frozen=True)
class WorkloadConfig:
    num_requests: int
    prompt_len: LengthDist
    output_len: LengthDist
    vocab_size: int
    qps: float | None = None      # None or 0: offline (all at t = 0); > 0: Poisson arrivals
    seed: int = 0

    def __post_init__(self):
        if self.num_requests < 1:
            raise ValueError(f"WorkloadConfig.num_requests={self.num_requests} must be >= 1")
        if self.qps is not None and self.qps < 0:
            raise ValueError(f"WorkloadConfig.qps={self.qps} must be >= 0 (0/None: offline)")
        if self.vocab_size < 1:
            raise ValueError(f"WorkloadConfig.vocab_size={self.vocab_size} must be >= 1")

    @property
    def online(self) -> bool:
        return bool(self.qps)


def generate(cfg: WorkloadConfig) -> list[RequestSpec]:
    """The workload's requests, ordered by arrival."""
    rng = np.random.default_rng(cfg.seed)
    n = cfg.num_requests
    prompt_lens = cfg.prompt_len.sample(n, rng)
    output_lens = cfg.output_len.sample(n, rng)
    if cfg.online:
        arrivals = np.cumsum(rng.exponential(1.0 / cfg.qps, size=n)).tolist()
    else:
        arrivals = [0.0] * n
    tokens = rng.integers(0, cfg.vocab_size, size=sum(prompt_lens)).tolist()
    out, at = [], 0
    for i in range(n):
        out.append(RequestSpec(i, float(arrivals[i]), tuple(tokens[at:at + prompt_lens[i]]),
                               int(output_lens[i])))
        at += prompt_lens[i]
    return out
