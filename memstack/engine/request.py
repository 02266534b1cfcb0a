"""Requests and what the engine streams back for them."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from memstack.generate import SamplingConfig
from memstack.memory.kv.manager import SeqKV


class Status(str, enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class RequestOutput:
    request_id: str
    new_tokens: list[int]
    finished: bool = False
    finish_reason: str | None = None   # "stop" | "length" | "aborted" | "error"
    error: str | None = None


@dataclass(eq=False)
class Request:
    id: str
    prompt: list[int]
    params: SamplingConfig
    salt: str | None = None
    output: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    seq: SeqKV | None = None
    generator: torch.Generator | None = None
    finish_reason: str | None = None
    arrival: float = field(default_factory=time.perf_counter)
    first_token_time: float | None = None
    cached_tokens: int = 0                # prompt tokens whose KV came from a cache (any tier)
    preemptions: int = 0
    compression: Any = None                       # CompressionConfig (streaming) or None
    logits: list = field(default_factory=list)   # the rows tokens were sampled from (Engine.record_logits)
    state: Any = None                             # memory state row (ModelState, batch 1); None: fresh
    seg_slot0: int = 0                            # absolute K/V slot where the current segment began
    namespace: str | tuple[str, ...] | None = None   # memory namespace(s) its rows read (None: the memories' own)
    error: str | None = None                      # why it finished with finish_reason "error"
    session: Any = None                           # its MemorySession (memory_sessions.py) or None

    @property
    def tokens(self) -> list[int]:
        """The document so far: prompt, then generated tokens."""
        return self.prompt + self.output

    @property
    def n_computed(self) -> int:
        return self.seq.n_tokens if self.seq is not None else 0

    @property
    def remaining(self) -> int:
        """Tokens whose KV must still be computed before the next token can be sampled."""
        return len(self.prompt) + len(self.output) - self.n_computed

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED
