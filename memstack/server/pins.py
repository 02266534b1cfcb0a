"""Pinned prefixes owned by tenants, and the KV a tenant may hold.

The engine pins prefixes by handle (`engine.sessions.pin/unpin`); this layer puts a tenant and a
secret in front of every handle:
  - a pin's id is `pfx_` + 24 random bytes (`secrets`), unguessable; ids are looked up only among
    the calling tenant's own pins, so another tenant's id is "not found", never "forbidden";
  - each tenant's pins hold at most its `pin_quota_blocks` KV blocks, and all pins together at
    most `pinned_share` of the pool -- so the rest of the pool always fits any request the server
    admits (`Quotas.check` refuses requests larger than that), and one tenant cannot take the pool;
  - TTLs are finite (bounded by the server) and expire here, not in the engine, so the quota
    accounting is exact.
A tenant's `kv_quota_blocks` bounds everything of its own in the pool together: the blocks its
requests in flight may still allocate (reserved at admission), the blocks its memory sessions
hold (device or host; `engine.memory_sessions.held`, kept by the engine thread) and the blocks its
pins hold. Over it, a request, a session import or a pin is a 429 that says what holds what.
All state lives on the event loop's thread; engine calls go through the engine loop.
"""
from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import dataclass

from memstack.engine import EngineError
from memstack.generate import SamplingConfig
from memstack.server.errors import APIError
from memstack.server.loop import EngineLoop, Stream
from memstack.server.tenants import Tenant


@dataclass(eq=False)
class Pin:
    id: str
    tenant: str
    handle: object                      # the engine's PrefixHandle
    tokens: int
    blocks: int
    created: float
    expires: float                      # time.time() deadline

    def public(self) -> dict:
        return {"id": self.id, "object": "prefix", "tokens": self.tokens, "blocks": self.blocks,
                "created": int(self.created), "expires_at": int(self.expires)}


class Quotas:
    """Per-tenant accounting of requests in flight and the KV blocks they, its sessions and its pins hold."""

    def __init__(self, engine, pinned_cap: int):
        self.engine, self.pinned_cap = engine, pinned_cap
        self.inflight: dict[str, int] = {}
        self.reserved: dict[str, int] = {}
        self.pins: "Pins | None" = None              # set by the app: its pins count against the quota too

    def holding(self, tenant: Tenant) -> dict[str, int]:
        """KV blocks the tenant holds or may allocate now: {requests, sessions, pins}."""
        return {"requests": self.reserved.get(tenant.name, 0),
                "sessions": self.engine.memory_sessions.held.get(tenant.name, 0),
                "pins": self.pins.held(tenant.name) if self.pins is not None else 0}

    def check_room(self, tenant: Tenant, blocks: int, what: str) -> None:
        """429 unless `blocks` more fit in the tenant's KV quota beside what it holds."""
        quota = tenant.kv_quota_blocks
        if quota is None:
            return
        h = self.holding(tenant)
        if sum(h.values()) + blocks > quota:
            raise APIError(429, f"{what} needs {blocks} more KV blocks, and your quota is {quota}: your sessions hold "
                                f"{h['sessions']}, your pinned prefixes {h['pins']}, your requests in flight reserve "
                                f"{h['requests']} (close a session with DELETE /v1/sessions/{{id}}, unpin a prefix, or "
                                "retry when requests finish)", code="kv_quota")

    def reserve(self, tenant: Tenant, blocks: int, what: str) -> None:
        """Hold `blocks` of the quota while something not yet counted anywhere arrives (an import)."""
        self.check_room(tenant, blocks, what)
        self.reserved[tenant.name] = self.reserved.get(tenant.name, 0) + blocks

    def unreserve(self, tenant: Tenant, blocks: int) -> None:
        self.reserved[tenant.name] -= blocks

    def session_need(self, session: tuple[str, str], prompt_len: int, max_tokens: int) -> tuple[int, int]:
        """(blocks the whole document may hold, new blocks a request continuing `session` may
        allocate): the session's own blocks are counted where they are held, once; its fork shares
        them (plus a copy of a partly filled last block). Read from the event loop while the
        engine may move the session: a number for admission only -- the engine checks the rest."""
        s = self.engine.memory_sessions.sessions.get(session)
        have = len(s.tokens) if s is not None else 0
        whole = self.need(have + prompt_len, max_tokens)
        held = self.engine.memory_sessions.blocks_of(s) if s is not None else 0
        return whole, max(1, whole - held + 1) if held else whole

    @property
    def request_cap(self) -> int:
        """Most blocks one request may need: what pins can never take."""
        return self.engine.num_blocks - self.pinned_cap

    def need(self, prompt_len: int, max_tokens: int) -> int:
        return self.engine.max_blocks(prompt_len + max_tokens)

    def acquire(self, tenant: Tenant, needs: list[int], peaks: list[int] | None = None) -> int:
        """Reserve blocks for a request's choices; raises APIError (400 never fits, 429 not now).
        `needs`: new blocks each may allocate; `peaks`: blocks each may hold at once (default: needs)."""
        each, total = max(peaks or needs), sum(needs)
        if each > self.request_cap:
            raise APIError(400, f"this request needs up to {each} KV blocks, more than the {self.request_cap} a "
                                "request may use on this server (shorten the prompt or max_tokens)", "max_tokens")
        quota = tenant.kv_quota_blocks
        if quota is not None and total > quota:
            raise APIError(400, f"this request needs up to {total} KV blocks, more than your quota of {quota}",
                           "max_tokens", code="kv_quota")
        n = self.inflight.get(tenant.name, 0)
        if tenant.max_concurrent is not None and n + 1 > tenant.max_concurrent:
            raise APIError(429, f"too many requests in flight (your limit is {tenant.max_concurrent})",
                           code="rate_limit_exceeded")
        self.check_room(tenant, total, "this request")
        held = self.reserved.get(tenant.name, 0)
        self.inflight[tenant.name] = n + 1
        self.reserved[tenant.name] = held + total
        return total

    def release(self, tenant: Tenant, total: int) -> None:
        self.inflight[tenant.name] -= 1
        self.reserved[tenant.name] -= total


class Pins:
    def __init__(self, loop: EngineLoop, pinned_cap: int, default_quota: int, ttl_default: float, ttl_max: float):
        self.loop, self.cap, self.default_quota = loop, pinned_cap, default_quota
        self.ttl_default, self.ttl_max = ttl_default, ttl_max
        self.block_size = loop.engine.cfg.block_size
        self._pins: dict[str, Pin] = {}
        self.quotas: Quotas | None = None            # set by the app: a pin counts against the tenant's KV quota
        self._pending: dict[str, int] = {}           # blocks of pins being computed, per tenant

    def quota(self, tenant: Tenant) -> int:
        return self.default_quota if tenant.pin_quota_blocks is None else tenant.pin_quota_blocks

    def held(self, tenant: str | None = None) -> int:
        pins = sum(p.blocks for p in self._pins.values() if tenant is None or p.tenant == tenant)
        return pins + sum(v for k, v in self._pending.items() if tenant is None or k == tenant)

    def of(self, tenant: Tenant) -> list[Pin]:
        return [p for p in self._pins.values() if p.tenant == tenant.name]

    def get(self, tenant: Tenant, pin_id: str) -> Pin:
        p = self._pins.get(pin_id)
        if p is None or p.tenant != tenant.name:                  # another tenant's pin is not found either
            raise APIError(404, "no such prefix", "id", code="prefix_not_found")
        return p

    async def create(self, tenant: Tenant, tokens: list[int], ttl: float | None) -> Pin:
        ttl = self.ttl_default if ttl is None else ttl
        if not self.loop.engine.prefix_caching:   # a model with memory state: its K/V alone is not the prefix
            raise APIError(400, "prefix pins need prefix reuse, which is off for this model (its memories carry "
                                "state between tokens)", "prompt")
        if ttl > self.ttl_max:
            raise APIError(400, f"ttl: at most {self.ttl_max:g} s on this server, got {ttl:g}", "ttl")
        blocks = len(tokens) // self.block_size
        if blocks < 1:
            raise APIError(400, f"prompt: a pinned prefix needs at least one full block ({self.block_size} tokens), "
                                f"got {len(tokens)}", "prompt")
        quota, mine = self.quota(tenant), self.held(tenant.name)
        if mine + blocks > quota:
            raise APIError(429, f"pinning {blocks} more KV blocks exceeds your pin quota ({mine} of {quota} held)",
                           code="insufficient_quota", type_="insufficient_quota")
        if self.held() + blocks > self.cap:
            raise APIError(429, f"the server's pinned-prefix capacity ({self.cap} KV blocks) is full",
                           code="insufficient_quota", type_="insufficient_quota")
        if self.quotas is not None:
            self.quotas.check_room(tenant, blocks, "this pin")
        self._pending[tenant.name] = self._pending.get(tenant.name, 0) + blocks
        try:
            handle = await self._pin(tokens, tenant.salt)
        finally:
            self._pending[tenant.name] -= blocks
        now = time.time()
        pin = Pin("pfx_" + secrets.token_urlsafe(24), tenant.name, handle, handle.n_tokens, len(handle.blocks),
                  now, now + ttl)
        self._pins[pin.id] = pin
        return pin

    async def _pin(self, tokens: list[int], salt: str):
        """Compute the prefix as an ordinary 1-token request in the batch, then pin its blocks in
        the engine thread right when it finishes (no step in between: nothing can evict them)."""
        stream = Stream(asyncio.get_running_loop(), on_finish=lambda _: self._pin_cached(tokens, salt))
        rid = "pin-" + secrets.token_hex(8)
        try:
            await self.loop.call(self.loop.submit, rid, tokens, SamplingConfig(max_new_tokens=1), salt, stream)
        except EngineError as e:
            raise APIError(400, "; ".join(e.reasons), "prompt") from None
        try:
            async for ev in stream.events():
                if ev.done:
                    if ev.error or ev.result is None:
                        raise APIError(500, f"pinning failed: {ev.error or 'no handle'}", code="engine_error")
                    return ev.result
        finally:
            self.loop.post(self.loop.abort, rid)                  # a no-op unless the client left mid-way

    def _pin_cached(self, tokens: list[int], salt: str):
        """Engine thread: pin the prefix, whose blocks the request that just finished cached."""
        eng = self.loop.engine
        have = eng.manager.cached_prefix(eng.namespace.root(salt), tokens, len(tokens))
        if len(have) < len(tokens) // self.block_size:      # never compute here: that would step the engine
            raise RuntimeError("the prefix's KV blocks are not cached (is prefix caching off?)")
        return eng.sessions.pin(tokens, None, salt)

    async def delete(self, tenant: Tenant, pin_id: str) -> Pin:
        pin = self.get(tenant, pin_id)
        del self._pins[pin.id]
        await self.loop.call(self.loop.engine.sessions.unpin, pin.handle)
        return pin

    async def expire(self) -> int:
        now = time.time()
        gone = [p for p in self._pins.values() if p.expires <= now]
        for p in gone:
            del self._pins[p.id]
            await self.loop.call(self.loop.engine.sessions.unpin, p.handle)
        return len(gone)
