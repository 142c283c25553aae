"""Sarathi-Serve-style scheduling: chunked prefills and decodes in one hybrid batch per iteration.

Each iteration has a token budget `chunk_size` (Sarathi-Serve's chunk size: 512/1024/2048). In order:
  1. every running request in its decode phase gets its one token (oldest first). A decode whose
     next token starts a new KV page takes one; if none is free, the most recently admitted running
     request is *preempted* (recompute: its pages are freed and it goes back to the head of the
     waiting queue with its prompt + generated tokens as its new prompt).
  2. running requests still in prefill get the next chunk, min(remaining, budget left), oldest first.
  3. waiting requests are admitted FCFS while budget is left, fewer than `max_num_seqs` run, and the
     KV pages of their whole (prompt) tokens fit with `watermark` of the pool kept free; the first
     chunk is scheduled at once. Admission reserves the prompt's pages, so a prefill never stalls
     half-way; decodes grow page by page.
A request's remaining tokens are `tokens[num_computed:]` (tokens = prompt + generated output); it is
a decode when exactly one token remains after it has produced output, else a prefill. The token
processed last in a sequence produces the next output token (greedy sampling in the engine).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from experiments.serving.kv_cache import PageAllocator, pages_for
from experiments.serving.workload import RequestSpec


@dataclass(frozen=True)
class SchedulerConfig:
    chunk_size: int = 1024          # token budget of one iteration (decode tokens count too)
    max_num_seqs: int = 256         # running requests at most
    watermark: float = 0.01         # fraction of KV pages admission leaves free for decodes to grow

    def __post_init__(self):
        if self.chunk_size < 1:
            raise ValueError(f"SchedulerConfig.chunk_size={self.chunk_size} must be >= 1")
        if self.max_num_seqs < 1:
            raise ValueError(f"SchedulerConfig.max_num_seqs={self.max_num_seqs} must be >= 1")
        if not 0.0 <= self.watermark < 1.0:
            raise ValueError(f"SchedulerConfig.watermark={self.watermark} must be in [0, 1)")


@dataclass(eq=False)
class Request:
    spec: RequestSpec
    tokens: list[int]                      # prompt + generated output
    num_computed: int = 0                  # tokens whose K/V are in the cache
    pages: list[int] = field(default_factory=list)
    output: list[int] = field(default_factory=list)
    token_times_s: list[float] = field(default_factory=list)   # when each output token was ready
    finish_s: float | None = None
    num_preemptions: int = 0

    @classmethod
    def from_spec(cls, spec: RequestSpec) -> "Request":
        return cls(spec=spec, tokens=list(spec.prompt))

    @property
    def request_id(self) -> int:
        return self.spec.request_id

    @property
    def remaining(self) -> int:
        return len(self.tokens) - self.num_computed

    @property
    def in_decode(self) -> bool:
        return bool(self.output) and self.remaining == 1

    @property
    def finished(self) -> bool:
        return len(self.output) >= self.spec.output_len


@dataclass(frozen=True)
class ScheduledChunk:
    request: Request
    start: int          # context_len: tokens of the sequence already in the cache
    length: int         # chunk_len

    @property
    def completes(self) -> bool:
        """The chunk reaches the sequence's last token, so it samples the next one."""
        return self.start + self.length == len(self.request.tokens)


@dataclass
class IterationPlan:
    prefills: list[ScheduledChunk] = field(default_factory=list)
    decodes: list[Request] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(c.length for c in self.prefills) + len(self.decodes)

    @property
    def empty(self) -> bool:
        return not self.prefills and not self.decodes

    def sampling(self) -> list[tuple[Request, int]]:
        """(request, row) for every request that samples a token this iteration; rows index the
        iteration's tokens (prefill chunks packed first, then one row per decode)."""
        out, row = [], 0
        for c in self.prefills:
            row += c.length
            if c.completes:
                out.append((c.request, row - 1))
        for j, r in enumerate(self.decodes):
            out.append((r, row + j))
        return out


class Scheduler:
    def __init__(self, config: SchedulerConfig, allocator: PageAllocator, page_size: int):
        self.config, self.allocator, self.page_size = config, allocator, page_size
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []             # admission order
        self.finished: list[Request] = []
        self.num_preemptions = 0

    def add(self, request: Request) -> None:
        need = pages_for(len(request.tokens) + request.spec.output_len, self.page_size)
        if need > self.allocator.num_pages:
            raise ValueError(f"request {request.request_id} needs {need} KV pages "
                             f"({len(request.tokens)} prompt + {request.spec.output_len} output tokens) "
                             f"but the cache has only {self.allocator.num_pages}")
        self.waiting.append(request)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _preempt(self, r: Request) -> None:
        self.running.remove(r)
        self.allocator.free(r.pages)
        r.pages, r.num_computed = [], 0
        r.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(r)

    def schedule(self) -> IterationPlan:
        cfg, plan = self.config, IterationPlan()
        budget = cfg.chunk_size
        # 1. decodes, oldest first; preempt the newest running request when a page is missing.
        for r in list(self.running):
            if budget == 0:
                break
            if r not in self.running or not r.in_decode:
                continue
            need = pages_for(r.num_computed + 1, self.page_size) - len(r.pages)
            while need > self.allocator.num_free and r in self.running:
                victim = self.running[-1]
                self._preempt(victim)
                plan.preempted.append(victim)
            if r not in self.running:
                break                                   # r itself was the newest: nothing after it
            r.pages += self.allocator.allocate(need)
            plan.decodes.append(r)
            budget -= 1
        # 2. prefills in progress, oldest first.
        for r in self.running:
            if budget == 0:
                break
            if not r.in_decode:
                n = min(r.remaining, budget)
                plan.prefills.append(ScheduledChunk(r, r.num_computed, n))
                budget -= n
        # 3. admission, FCFS, bounded by the budget, max_num_seqs and the free KV pages.
        keep_free = int(cfg.watermark * self.allocator.num_pages)
        while self.waiting and budget > 0 and len(self.running) < cfg.max_num_seqs:
            r = self.waiting[0]
            need = pages_for(len(r.tokens), self.page_size)
            if need + keep_free > self.allocator.num_free and self.running:
                break
            if need > self.allocator.num_free:
                break
            self.waiting.popleft()
            r.pages = self.allocator.allocate(need)
            self.running.append(r)
            n = min(r.remaining, budget)
            plan.prefills.append(ScheduledChunk(r, r.num_computed, n))
            budget -= n
        return plan

    def complete(self, plan: IterationPlan, sampled: list[int], now_s: float) -> list[Request]:
        """Advance the requests of `plan` by its iteration; `sampled[i]` is the token of
        plan.sampling()[i]. Returns the requests that finished (their pages are freed)."""
        for c in plan.prefills:
            c.request.num_computed += c.length
        for r in plan.decodes:
            r.num_computed += 1
        done = []
        for (r, _row), tok in zip(plan.sampling(), sampled, strict=True):
            r.output.append(int(tok))
            r.tokens.append(int(tok))
            r.token_times_s.append(now_s)
            if r.finished:
                r.finish_s = now_s
                done.append(r)
        for r in done:
            self.running.remove(r)
            self.allocator.free(r.pages)
            r.pages = []
            self.finished.append(r)
        return done
