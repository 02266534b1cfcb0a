"""Every attack of issue 11 as a regression test, over real sockets: the engine survives, bad
input is a 4xx naming the field, nothing hangs, nothing is smuggled, disconnects cancel work,
slow or lying clients are cut off, and /health tells the truth."""
from __future__ import annotations

import json
import socket
import threading
import time

import openai
import pytest

from tests.server.conftest import raw, request, responses, start, wait_idle

POISON = 254          # a byte id: the fault-injected runner fails any step that feeds it


@pytest.fixture(scope="module")
def srv():
    s = start(body_timeout_s=1.0, head_timeout_s=1.0, max_body_bytes=256 * 1024)
    run = s.loop.engine.runner.run
    s.slow = 0.0

    def faulty(items):                    # fault injection: a failing model call and a slow one
        if any(POISON in it.tokens for it in items):
            raise RuntimeError("injected failure")
        if s.slow:
            time.sleep(s.slow)
        return run(items)

    s.loop.engine.runner.run = faulty
    yield s
    s.stop()


def post(port, path, body=None, raw_body=None, headers=None):
    out = responses(raw(port, request("POST", path, body, {"Connection": "close", **(headers or {})}, raw_body)))
    status, data = out[0]
    return status, json.loads(data)


def healthy(port) -> dict:
    status, data = responses(raw(port, request("GET", "/health", headers={"Connection": "close"})))[0]
    assert status == 200, data
    return json.loads(data)


def test_bad_sampling_values_are_400s_or_well_defined_and_never_stop_the_engine(srv):
    p = srv.port
    base = {"prompt": "hello", "max_tokens": 5}
    greedy = post(p, "/v1/completions", {**base, "temperature": 0, "return_token_ids": True})[1]
    status, tiny = post(p, "/v1/completions", {**base, "temperature": 1e-300, "return_token_ids": True})
    assert status == 200 and tiny["choices"][0]["token_ids"] == greedy["choices"][0]["token_ids"]   # counts as greedy
    for field, value, why in [("temperature", "NaN", "finite"), ("temperature", "Infinity", "finite"),
                              ("top_k", "2.5", "valid integer"), ("seed", str(2**70), "less than or equal"),
                              ("top_p", "0", "greater than 0"), ("max_tokens", "0", "greater than or equal to 1"),
                              ("n", "true", "valid integer"), ("temperature", '"0.5"', "valid number")]:
        text = json.dumps(base)[:-1] + f', "{field}": {value}}}'
        status, err = post(p, "/v1/completions", raw_body=text.encode())
        assert status == 400, (field, value, err)
        assert err["error"]["param"] == field and why in err["error"]["message"], (field, err)
    assert healthy(p)["status"] == "ok"
    again = post(p, "/v1/completions", {**base, "temperature": 0, "return_token_ids": True})[1]
    assert again["choices"][0]["token_ids"] == greedy["choices"][0]["token_ids"]      # the engine serves on, unchanged


def test_max_tokens_zero_answers_at_once_and_leaks_no_thread(srv):
    before = threading.active_count()
    t0 = time.time()
    for _ in range(20):
        status, err = post(srv.port, "/v1/completions", {"prompt": "x", "max_tokens": 0})
        assert status == 400 and err["error"]["param"] == "max_tokens"
    assert time.time() - t0 < 10
    assert threading.active_count() <= before


def test_unknown_routes_discard_their_body_no_smuggling(srv):
    smuggled = request("GET", "/v1/models", headers={"Connection": "keep-alive"})
    for method, path in [("POST", "/nope"), ("GET", "/health"), ("PUT", "/v1/completions"), ("POST", "/v1/models")]:
        data = request(method, path, raw_body=smuggled, headers={"Content-Type": "text/plain"}) + \
            request("GET", "/health", headers={"Connection": "close"})
        out = responses(raw(srv.port, data))
        assert len(out) == 2, (method, path, out)               # the smuggled request got no response
        assert out[1][0] == 200 and json.loads(out[1][1])["status"] == "ok"
        assert b'"object": "list"' not in out[0][1] and b'"data"' not in out[0][1]


def test_malformed_bodies_are_400s_naming_the_field(srv):
    p = srv.port
    deep = b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    status, err = post(p, "/v1/completions", raw_body=deep)
    assert status == 400 and "nested" in err["error"]["message"]
    status, err = post(p, "/v1/prefixes", {"handle": [1]})
    assert status == 400 and "handle" in err["error"]["message"] and "prompt" in err["error"]["message"]
    for ttl, why in [('"10"', "valid number"), ("NaN", "finite"), ("-1", "greater than 0"), ("1e308", "at most")]:
        status, err = post(p, "/v1/prefixes", raw_body=b'{"prompt": "a long enough prefix!", "ttl": ' + ttl.encode() + b"}")
        assert status == 400 and err["error"]["param"] == "ttl" and why in err["error"]["message"], (ttl, err)
    status, err = post(p, "/v1/completions", {"prompt": "x", "salt": "tenant:beta"})
    assert status == 400 and "salt" in err["error"]["message"]          # the client never picks a salt
    status, err = post(p, "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]})
    assert status == 400 and err["error"]["param"].startswith("messages.0.role")
    status, err = post(p, "/v1/completions", raw_body=b"[1, 2]")
    assert status == 400
    status, err = post(p, "/v1/completions", raw_body=b'{"prompt": "x"', headers={"Content-Type": "application/json"})
    assert status == 400 and "invalid JSON" in err["error"]["message"]
    status, err = post(p, "/v1/completions", raw_body=b'{"prompt": ' + b"9" * 5000 + b"}")
    assert status == 400
    assert healthy(p)["status"] == "ok"


def test_oversized_and_slow_bodies_are_cut_off(srv):
    p = srv.port
    t0 = time.time()
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 10000000000\r\n\r\n"
    out = raw(p, head + b'{"prompt"', timeout=5)
    assert out.startswith(b"HTTP/1.1 413") and b"connection: close" in out.lower() and time.time() - t0 < 2
    t0 = time.time()
    lying = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 500\r\n\r\n{}"
    out = raw(p, lying, timeout=10)                              # 498 bytes never come
    assert out.startswith(b"HTTP/1.1 408") and 0.9 < time.time() - t0 < 5      # body_timeout_s=1, then closed
    chunked = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunk = b"x" * 8192
    body = b"".join(b"%x\r\n" % len(chunk) + chunk + b"\r\n" for _ in range(40)) + b"0\r\n\r\n"
    out = raw(p, chunked + body, timeout=5)
    assert out.startswith(b"HTTP/1.1 413")


def test_slowloris_headers_are_cut_off(srv):
    t0 = time.time()
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        closed = False
        for i in range(40):                                  # a header line every 0.1 s, for up to 4 s
            try:
                s.sendall(b"X-Slow-%d: y\r\n" % i)
                s.settimeout(0.1)
                if s.recv(1024) == b"":
                    closed = True
                    break
            except socket.timeout:
                continue
            except (ConnectionResetError, BrokenPipeError):
                closed = True
                break
    assert closed and time.time() - t0 < 3                    # head_timeout_s=1


def test_many_concurrent_connections_are_all_answered(srv):
    results = []

    def one():
        try:
            results.append(responses(raw(srv.port, request("GET", "/health", headers={"Connection": "close"})))[0][0])
        except OSError as e:
            results.append(repr(e))

    ts = [threading.Thread(target=one) for _ in range(64)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert results == [200] * 64


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_leaves_cancels_its_request(srv, stream):
    srv.slow = 0.02                                        # 20 ms a step: 190 tokens would take ~4 s
    try:
        steps0 = srv.loop.steps
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
            s.sendall(request("POST", "/v1/completions", {"prompt": "leave", "max_tokens": 190, "stream": stream,
                                                          "temperature": 0}))
            if stream:
                assert s.recv(4096).startswith(b"HTTP/1.1 200")   # it is streaming
            else:
                time.sleep(0.2)
        stats = wait_idle(srv, timeout=5)
        assert stats["running"] == 0 and stats["waiting"] == 0
        assert srv.loop.steps - steps0 < 100                   # stopped long before 190 tokens
        assert not srv.loop.engine.requests
    finally:
        srv.slow = 0.0


def test_one_failing_request_fails_alone_and_health_tells_the_truth(srv):
    p = srv.port
    status, err = post(p, "/v1/completions", {"prompt": [1, 2, POISON], "max_tokens": 3})
    assert status == 500 and "injected failure" in err["error"]["message"]
    out = raw(p, request("POST", "/v1/completions", {"prompt": [1, POISON], "max_tokens": 3, "stream": True},
                         {"Connection": "close"}))
    events = [e for e in out.decode().split("\n") if e.startswith("data: ")]
    assert "injected failure" in events[0] and events[-1] == "data: [DONE]"
    status, ok = post(p, "/v1/completions", {"prompt": [1, 2, 3], "max_tokens": 3})
    assert status == 200 and ok["choices"][0]["finish_reason"] in ("length", "stop")
    h = healthy(p)
    assert h["status"] == "ok" and "injected failure" in h["last_error"]


def test_a_dead_engine_loop_is_reported_and_refuses_work():
    s = start()
    try:
        def broken():
            raise RuntimeError("scheduler corrupted")

        s.loop.engine.step = broken                                 # every step fails: nothing can progress
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0, timeout=20)
        with pytest.raises(openai.InternalServerError):
            c.completions.create(model="tiny", prompt="a", max_tokens=2)
        deadline = time.time() + 10
        while s.loop.alive and time.time() < deadline:
            try:
                c.completions.create(model="tiny", prompt="a", max_tokens=2)
            except openai.APIError:
                pass
        status, data = responses(raw(s.port, request("GET", "/health", headers={"Connection": "close"})))[0]
        body = json.loads(data)
        assert status == 503 and body["status"] == "dead" and "scheduler corrupted" in body["engine"]
        with pytest.raises(openai.APIStatusError) as e:
            c.completions.create(model="tiny", prompt="a", max_tokens=2)
        assert e.value.status_code == 503
    finally:
        s.stop()
