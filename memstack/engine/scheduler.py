"""Continuous batching: which requests run this step, and how many of their tokens.

Every step (Orca-style iteration-level scheduling, vLLM's v1 scheduler in spirit):
1. running requests first, in arrival order: a decode token each, or the next chunk of a
   prompt; when the pool cannot hold a request's next slots, the most recently admitted other
   request is *preempted* (its blocks freed; it goes back to the front of the queue and is
   recomputed later, mostly from the prefix cache) -- never a block of a running request is
   overwritten;
2. then waiting requests, in order, while the token budget, the batch size and the pool allow:
   the longest cached prefix is taken from the pool (and, through the tiers, from host/disk),
   and only the rest is computed.
A chunk never crosses a segment boundary (policy.py) nor exceeds the step's token budget.
A request that could never fit was refused when it was added (Engine.add_request).
K/V slots: a chunk of n tokens takes n slots plus the memory tokens its phases add
(`extra_slots`); the visible range is kept in slots (policy.visible_slot), from the slot where the
request's current segment began.
"""
from __future__ import annotations

from collections import deque
from typing import Callable

from memstack.engine.policy import ContextPolicy
from memstack.engine.request import Request, Status
from memstack.memory.kv.manager import KVCacheManager


class Scheduler:
    def __init__(self, manager: KVCacheManager, policy: ContextPolicy, max_num_seqs: int, max_tokens: int,
                 new_seq: Callable[[Request], bool | None], extra_slots: Callable[[int, int], int] = lambda pos, n: 0):
        self.manager, self.policy = manager, policy
        self.max_num_seqs, self.max_tokens = max_num_seqs, max_tokens
        self.new_seq = new_seq                      # takes cached prefixes for a fresh request
        self.extra_slots = extra_slots              # memory tokens a chunk (pos0, n) adds
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.failed: list[tuple[Request, str]] = []  # requests refused at scheduling, with the reason

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def _chunk(self, req: Request, budget: int) -> int:
        """Tokens of req to compute now: within the budget and the current segment."""
        t0 = req.n_computed
        to_seg_end = self.policy.seg_len - t0 % self.policy.seg_len
        return min(req.remaining, budget, to_seg_end)

    def slots(self, req: Request, n: int) -> int:
        """K/V slots the next chunk of n tokens of req writes."""
        return n + self.extra_slots(req.seq.n_tokens, n)

    def _prepare(self, req: Request) -> None:
        """Hide what a query at the next token can no longer see (frees whole blocks)."""
        seq = req.seq
        bs = self.manager.block_size
        if seq.n_tokens % self.policy.seg_len == 0:                # the next chunk opens a segment
            req.seg_slot0 = seq.n_slots + seq.n_dropped * bs
        if req.compression is None:  # slots in order (no compression has dropped blocks in the middle)
            self.manager.set_start(seq, self.policy.visible_slot(req.seg_slot0) - seq.n_dropped * bs)

    def preempt(self, req: Request) -> None:
        self.manager.free(req.seq)
        req.seq = None
        req.state = None                            # recomputed from the document's first token
        req.status = Status.WAITING
        req.preemptions += 1
        self.running.remove(req)
        self.waiting.appendleft(req)

    def schedule(self) -> tuple[list[tuple[Request, int]], list[tuple[int, int]]]:
        """(work: [(request, n tokens)], block copies to do first)."""
        budget, work, copies = self.max_tokens, [], []
        for req in list(self.running):
            if req.status is not Status.RUNNING or budget <= 0:
                continue
            self._prepare(req)
            n = self._chunk(req, budget)
            ns = self.slots(req, n)
            while self.manager.blocks_needed(req.seq, ns) > self.manager.pool.num_free:
                victims = [r for r in self.running if r is not req and r.status is Status.RUNNING
                           and all(r is not w for w, _ in work)]
                if not victims:
                    break
                self.preempt(victims[-1])
            if self.manager.blocks_needed(req.seq, ns) > self.manager.pool.num_free:
                self.preempt(req)                   # nothing left to take from: retry later
                continue
            copies += self.manager.allocate(req.seq, ns)
            work.append((req, n))
            budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            if req.seq is None and self.new_seq(req) is False:   # its session's K/V does not fit now
                if not self.running and not work:
                    self.waiting.popleft()
                    self.failed.append((req, "its session's K/V does not fit in the pool's free blocks"))
                    continue
                break
            self._prepare(req)
            n = self._chunk(req, budget)
            ns = self.slots(req, n)
            if self.manager.blocks_needed(req.seq, ns) > self.manager.pool.num_free:
                self.release_waiting(req)           # give back what it took (cached prefix); admit later
                if not self.running and not work:   # alone and still short: pinned blocks hold the pool
                    self.waiting.popleft()
                    self.failed.append((req, f"needs {self.manager.blocks_needed(self.manager.new_seq(b''), ns)} "
                                        f"free KV blocks but only {self.manager.pool.num_free} of "
                                        f"{self.manager.pool.num_blocks} are not pinned or in use"))
                    continue
                break
            copies += self.manager.allocate(req.seq, ns)
            self.waiting.popleft()
            req.status = Status.RUNNING
            self.running.append(req)
            work.append((req, n))
            budget -= n
        return work, copies

    def release_waiting(self, req: Request) -> None:
        """A request that could not be admitted gives back the blocks it took (a prefix hit)."""
        self.manager.free(req.seq)
        req.seq = None

    def finish(self, req: Request) -> None:
        if req.seq is not None:
            self.manager.free(req.seq)
            req.seq = None
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        req.status = Status.FINISHED
