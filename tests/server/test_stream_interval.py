"""Streamed tokens leave the engine thread in coalesced hand-offs (`stream_interval_s`): the first
token alone and at once, the end at once, everything in between at most once per interval; what
the client reads is the same text and usage whatever the interval."""
from __future__ import annotations

import openai
import pytest
from conftest import server, start  # noqa: F401 -- the module server fixture

N = 60


@pytest.mark.parametrize("interval", [0.0, 1.0])
def test_hand_offs_are_coalesced_and_the_stream_is_unchanged(interval):
    srv = start(stream_interval_s=interval)
    try:
        loop, sizes = srv.loop, []
        deliver = loop._deliver

        def counting(items):                       # the engine thread's hand-offs: events in each
            sizes.extend(len(evs) for _, evs in items)
            deliver(items)
        loop._deliver = counting
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=60)
        args = dict(model="tiny", prompt="Once upon a time", max_tokens=N, temperature=0)
        whole = c.completions.create(**args, extra_body={"ignore_eos": True}).choices[0].text
        sizes.clear()
        chunks = list(c.completions.create(**args, stream=True, stream_options={"include_usage": True},
                                           extra_body={"ignore_eos": True}))
        assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == whole
        assert chunks[-1].usage.completion_tokens == N
        assert sum(sizes) == N + 1                 # every token, and the end
        assert sizes[0] == 1                       # the first token is handed over alone, at its step
        if interval == 0:
            assert sizes == [1] * (N - 1) + [2]    # a hand-off per step (the last carries the end)
        else:
            assert len(sizes) < N // 2             # coalesced: at most one hand-off per second between
    finally:
        srv.stop()


def test_connections_are_tcp_nodelay(server):
    """Without TCP_NODELAY (asyncio sets it only for proto=IPPROTO_TCP sockets), Nagle holds a
    stream's first event until the client ACKs the response head: ~40 ms of TTFT."""
    import socket

    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert s.recv(65536).startswith(b"HTTP/1.1 200")
        conns = list(server.uvicorn.server_state.connections)
        assert conns
        for proto in conns:
            sock = proto.transport.get_extra_info("socket")
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
