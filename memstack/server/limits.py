"""Bounds on what one connection can hold: body bytes, body read time, JSON nesting, head time.

`BodyLimits` (ASGI middleware, outermost) reads every request body before any route runs:
  - a Content-Length above `max_bytes` (or the route's own bound in `larger`, e.g. a session
    import, whose body carries K/V) gets 413 at once, and the connection is closed (nothing
    of that body is read);
  - a body that grows past `max_bytes` (chunked) gets 413, closed;
  - a body that has not fully arrived within `timeout_s` (a slow body, or a Content-Length larger
    than what is sent) gets 408, closed -- it never holds the connection forever;
  - JSON nested deeper than `max_depth` gets 400 before anything parses it (Python's json module
    would raise RecursionError, pydantic would recurse).
It then replays the body to the app and passes every later receive() (disconnect detection)
through. Responses of these errors carry `Connection: close`: the rest of a body the server did
not read is never parsed as the next request (no smuggling).

`guarded_h11(head_timeout_s)`: uvicorn's h11 protocol, with a deadline for each request's head.
uvicorn closes connections idle between requests (`timeout_keep_alive`), but a client that sends
a header byte every few seconds (slowloris) cancels that timer with each byte; here the whole head
must arrive within the deadline. Framing (Content-Length / chunked, pipelining, unread bodies)
stays h11's: it discards a body a response did not read, by its framing, before the next request.
"""
from __future__ import annotations

import asyncio
import socket

from pydantic_core import from_json
from uvicorn.protocols.http.h11_impl import H11Protocol

from memstack.server.errors import error_bytes

DEEP = 1 << 30                       # "deeper than any limit": the parser's own recursion guard fired


def json_depth(body: bytes) -> int:
    """Deepest nesting of arrays/objects in a JSON text (0 for scalars and for text that is not
    JSON -- the app reports that). Parsed by pydantic-core's Rust parser (linear, its own recursion
    limit of ~200), then measured without recursion."""
    try:
        obj = from_json(body, allow_inf_nan=True)
    except ValueError as e:
        return DEEP if "recursion limit" in str(e) else 0
    depth, stack = 0, [(obj, 1)]
    while stack:
        o, d = stack.pop()
        if isinstance(o, dict):
            o = o.values()
        elif not isinstance(o, list):
            continue
        depth = max(depth, d)
        stack.extend((v, d + 1) for v in o if isinstance(v, (dict, list)))
    return depth


class BodyLimits:
    def __init__(self, app, max_bytes: int, timeout_s: float, max_depth: int, larger: dict[str, int] | None = None):
        self.app, self.max_bytes, self.timeout_s, self.max_depth = app, max_bytes, timeout_s, max_depth
        self.larger = dict(larger or {})          # (method path) -> its own bound

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length, limit = None, self.larger.get(f"{scope['method']} {scope['path']}", self.max_bytes)
        for k, v in scope["headers"]:
            if k == b"content-length" and v.isdigit():   # h11 has already refused a malformed one
                length = int(v)
        if length is not None and length > limit:
            return await _reply(send, 413, f"request body of {length} bytes exceeds the limit of {limit}")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        body, more = bytearray(), True
        while more:
            try:
                msg = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                return await _reply(send, 408, f"the request body did not arrive within {self.timeout_s:g} s")
            if msg["type"] == "http.disconnect":
                return                             # the client left; nobody to answer
            body += msg.get("body", b"")
            if len(body) > limit:
                return await _reply(send, 413, f"request body exceeds the limit of {limit} bytes")
            more = msg.get("more_body", False)
        if body and (depth := json_depth(bytes(body))) > self.max_depth:
            deep = "more than 200" if depth == DEEP else str(depth)
            return await _reply(send, 400, f"JSON nested {deep} deep exceeds the limit of {self.max_depth}",
                                close=False)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()              # after the body: disconnect detection

        await self.app(scope, replay, send)


async def _reply(send, status: int, message: str, close: bool = True) -> None:
    data = error_bytes(status, message)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data, "more_body": False})


class _GuardedH11(H11Protocol):
    head_timeout_s: float = 30.0

    def connection_made(self, transport) -> None:
        self._head_timer = None
        _no_delay(transport)
        super().connection_made(transport)
        self._arm()

    def _arm(self) -> None:
        self._disarm()
        self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_expired)

    def _disarm(self) -> None:
        if getattr(self, "_head_timer", None) is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def handle_events(self) -> None:
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not cycle:                # a request head arrived
            self._disarm()

    def on_response_complete(self) -> None:
        self._arm()                                # the next head (if any) is on the clock
        super().on_response_complete()

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _head_expired(self) -> None:
        self._head_timer = None
        if (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
            self.transport.close()


def _no_delay(transport) -> None:
    """TCP_NODELAY on the connection. asyncio sets it only on sockets created with
    proto=IPPROTO_TCP, and `socket.create_server` makes proto-0 sockets, whose accepted connections
    inherit that: Nagle then holds a stream's first event until the client ACKs the response head,
    and the client's delayed ACK makes that ~40 ms of TTFT (measured: first event sent 12 ms after
    the request arrived, read by the client at 47-55 ms)."""
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:                           # not TCP after all: nothing to turn off
            pass


def guarded_h11(head_timeout_s: float) -> type[H11Protocol]:
    return type("GuardedH11Protocol", (_GuardedH11,), {"head_timeout_s": float(head_timeout_s)})
