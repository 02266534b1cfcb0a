"""Server configuration (frozen, checked: every reason at once).

Limits are the server's defence against bad or hostile clients: every one of them bounds a
resource a single connection could otherwise hold (bytes, nesting, seconds, KV blocks, slots).
"""
from __future__ import annotations

import ipaddress
import math
from dataclasses import dataclass

from memstack.config import Checked


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost; anything else is reachable from other machines."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False                                 # a hostname: assume it is reachable


@dataclass(frozen=True)
class ServerConfig(Checked):
    """How the HTTP layer listens, authenticates and bounds requests.

    model_name:             the id clients pass as `model` (GET /v1/models lists it)
    allow_unauthenticated:  serve a non-loopback host without API keys (refused otherwise)
    max_body_bytes:         request bodies larger than this get 413 (Content-Length checked first)
    max_import_bytes:       the same bound for POST /v1/sessions/import (a session's K/V travels in it)
    max_sessions:           memory sessions one tenant may hold (create / import beyond: 429)
    stream_interval_s:      streamed tokens are handed from the engine thread to the HTTP layer at most
                            this often (a request's first token and its end at once; 0: every step)
    max_json_depth:         JSON nested deeper gets 400 (before it is parsed)
    body_timeout_s:         a request body must arrive within this (slow bodies get 408, closed)
    head_timeout_s:         a request's headers must arrive within this of the connection being idle
    backlog:                the listen backlog (connections the kernel queues before accept)
    max_connections:        open connections + requests in flight beyond this get 503
    max_n:                  most choices one request may ask for (n x prompts)
    default_max_tokens:     a chat completion without max_tokens generates at most this many
    max_stop:               most stop strings
    max_top_logprobs:       most alternatives per token in logprobs
    pin_ttl_default_s:      TTL of a pinned prefix when the request gives none
    pin_ttl_max_s:          longest TTL a pin may ask for
    pinned_share:           share of the KV pool pins may hold, all tenants together
    """

    model_name: str = "memstack"
    host: str = "127.0.0.1"
    port: int = 8000
    allow_unauthenticated: bool = False
    max_body_bytes: int = 1 << 20
    max_import_bytes: int = 64 << 20
    max_sessions: int = 256
    stream_interval_s: float = 0.05
    max_json_depth: int = 32
    body_timeout_s: float = 30.0
    head_timeout_s: float = 30.0
    keep_alive_s: float = 5.0
    backlog: int = 2048
    max_connections: int = 1024
    max_n: int = 16
    default_max_tokens: int = 512
    max_stop: int = 4
    max_top_logprobs: int = 20
    pin_ttl_default_s: float = 3600.0
    pin_ttl_max_s: float = 86400.0
    pinned_share: float = 0.5
    log_level: str = "info"
    access_log: bool = True

    def check(self) -> list[str]:
        r = []
        if not self.model_name or len(self.model_name) > 256:
            r.append(f"model_name must be 1..256 characters, got {self.model_name!r}")
        if not 0 <= self.port <= 65535:
            r.append(f"port must be in [0, 65535] (0 picks a free port), got {self.port}")
        for name in ("max_body_bytes", "max_import_bytes", "max_sessions", "max_json_depth", "backlog", "max_connections", "max_n", "default_max_tokens", "max_stop",
                     "max_top_logprobs"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                r.append(f"{name} must be an integer >= 1, got {v!r}")
        for name in ("body_timeout_s", "head_timeout_s", "keep_alive_s", "pin_ttl_default_s", "pin_ttl_max_s"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                r.append(f"{name} must be a finite number of seconds > 0, got {v!r}")
        v = self.stream_interval_s
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or not 0 <= v <= 1:
            r.append(f"stream_interval_s must be a number of seconds in [0, 1], got {v!r}")
        if not r and self.pin_ttl_default_s > self.pin_ttl_max_s:
            r.append(f"pin_ttl_default_s ({self.pin_ttl_default_s}) exceeds pin_ttl_max_s ({self.pin_ttl_max_s})")
        if not (isinstance(self.pinned_share, (int, float)) and 0 <= self.pinned_share < 1):
            r.append(f"pinned_share must be in [0, 1) (pins must leave room for requests), got {self.pinned_share!r}")
        if self.log_level not in ("critical", "error", "warning", "info", "debug"):
            r.append(f"log_level must be critical|error|warning|info|debug, got {self.log_level!r}")
        return r
