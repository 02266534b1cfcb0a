"""Tenants: API keys from a file or the environment, every bad entry listed; the tenant -- never
the client -- decides the cache salt; pins are unguessable, owned and under quota; requests are
under per-tenant KV and concurrency quotas; an exposed host without keys refuses to start."""
from __future__ import annotations

import hashlib
import json
import logging
import threading
import time

import openai
import pytest

from memstack.errors import ConfigError
from memstack.server import ServerConfig, Tenants
from memstack.server.app import fastapi_of
from memstack.server.run import Server, check_exposure
from tests.server.conftest import KEYS, TOK, raw, request, responses, start, tiny


def keys_file(tmp_path, text: str):
    p = tmp_path / "keys.yaml"
    p.write_text(text)
    return p


def test_keys_from_file_and_environment(tmp_path):
    digest = hashlib.sha256(b"sk-hashed-0123456789abcdef").hexdigest()
    p = keys_file(tmp_path, f"""tenants:
  - name: acme
    keys: ["{KEYS['acme']}"]
    pin_quota_blocks: 3
  - name: gamma
    key_sha256: ["{digest}"]
    kv_quota_blocks: 100
    max_concurrent: 2
""")
    t = Tenants.load(p, environ={"MEMSTACK_API_KEYS": f"beta={KEYS['beta']}"})
    assert t.names == ["acme", "beta", "gamma"] and t.required
    assert t.authenticate(f"Bearer {KEYS['acme']}").pin_quota_blocks == 3
    assert t.authenticate(f"bearer {KEYS['beta']}").name == "beta"
    g = t.authenticate("Bearer sk-hashed-0123456789abcdef")
    assert (g.name, g.kv_quota_blocks, g.max_concurrent) == ("gamma", 100, 2)
    for bad in [None, "", "Bearer", "Bearer wrong-key-0123456789", f"Basic {KEYS['acme']}", KEYS["acme"]]:
        assert t.authenticate(bad) is None
    assert Tenants.load(None, environ={}).authenticate(None).name == "default"    # no keys: one anonymous tenant


def test_bad_key_files_list_every_reason(tmp_path):
    p = keys_file(tmp_path, """tenants:
  - name: "bad name!"
    keys: ["short"]
    pin_quota_blocks: -1
    colour: blue
  - name: ok
    keys: ["sk-dup-0123456789abcdef"]
  - name: ok2
    keys: ["sk-dup-0123456789abcdef"]
  - name: nokey
""")
    with pytest.raises(ConfigError) as e:
        Tenants.load(p, environ={"MEMSTACK_API_KEYS": "missing-separator"})
    text = "\n".join(e.value.reasons)
    for want in ["name must match", "keys[0] must be a string of >= 16", "pin_quota_blocks must be", "unknown field",
                 "also given to another entry", "give at least one key", "expected TENANT=KEY"]:
        assert want in text, want
    assert "sk-dup" not in str(e.value) and "'short'" not in text            # keys are not echoed


@pytest.fixture(scope="module")
def mt(tmp_path_factory):
    p = tmp_path_factory.mktemp("keys") / "keys.yaml"
    p.write_text(f"""tenants:
  - name: acme
    keys: ["{KEYS['acme']}"]
    pin_quota_blocks: 16
  - name: beta
    keys: ["{KEYS['beta']}"]
    pin_quota_blocks: 12
  - name: small
    keys: ["sk-small-0123456789abcdef"]
    pin_quota_blocks: 2
    kv_quota_blocks: 12
    max_concurrent: 1
""")
    s = start(tenants=Tenants.load(p, environ={}), log_level="debug", access_log=True)
    yield s
    s.stop()


def client(srv, who: str):
    key = KEYS.get(who, "sk-small-0123456789abcdef")
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=key, max_retries=0, timeout=30)


def test_requests_need_a_valid_key(mt, caplog):
    with caplog.at_level(logging.DEBUG):
        for key in ["wrong-key-0123456789abcd", ""]:
            with pytest.raises(openai.AuthenticationError) as e:
                openai.OpenAI(base_url=mt.url + "/v1", api_key=key or "x", max_retries=0).models.list()
            assert e.value.body["code"] == "invalid_api_key"
        assert [m.id for m in client(mt, "acme").models.list().data] == ["tiny"]
        out = responses(raw(mt.port, request("GET", "/health", headers={"Connection": "close"})))
        assert out[0][0] == 200                                              # health needs no key
    assert not any(k in caplog.text for k in [*KEYS.values(), "wrong-key-0123456789abcd"])   # keys are never logged


def test_the_tenant_decides_the_cache_salt(mt):
    prompt = "Secret question of tenant acme, asked twice. " * 2
    n = len(TOK.encode(prompt))
    cached = lambda who: client(mt, who).completions.create(model="tiny", prompt=prompt, max_tokens=1, temperature=0) \
        .usage.prompt_tokens_details.cached_tokens
    assert cached("acme") == 0
    assert cached("acme") == (n - 1) // 4 * 4           # acme hits its own cache
    assert cached("beta") == 0                          # beta learns nothing about acme's prompt
    assert cached("beta") == (n - 1) // 4 * 4


def test_pins_are_unguessable_owned_and_scoped(mt):
    def call(method, path, who, body=None):
        h = {"Authorization": f"Bearer {KEYS[who]}", "Connection": "close"}
        status, data = responses(raw(mt.port, request(method, path, body, h)))[0]
        return status, json.loads(data)

    prefix = "A shared system prompt, pinned."             # 31 bytes: 7 blocks of 4
    status, pin = call("POST", "/v1/prefixes", "acme", {"prompt": prefix, "ttl": 60})
    assert status == 200 and pin["tokens"] == 28 and pin["blocks"] == 7
    assert pin["id"].startswith("pfx_") and len(pin["id"]) == 4 + 32
    status, other = call("POST", "/v1/prefixes", "acme", {"prompt": prefix, "ttl": 60})
    assert other["id"] != pin["id"]
    assert call("GET", f"/v1/prefixes/{pin['id']}", "beta")[0] == 404          # not beta's: not found
    assert call("DELETE", f"/v1/prefixes/{pin['id']}", "beta")[0] == 404
    assert call("GET", "/v1/prefixes", "beta")[1]["data"] == []
    assert {p["id"] for p in call("GET", "/v1/prefixes", "acme")[1]["data"]} == {pin["id"], other["id"]}
    use = lambda who: client(mt, who).completions.create(model="tiny", prompt=prefix + " And then?", max_tokens=1) \
        .usage.prompt_tokens_details.cached_tokens
    assert use("acme") == 28 and use("beta") == 0
    status, q = call("POST", "/v1/prefixes", "acme", {"prompt": prefix})               # 7 + 7 + 7 > 16
    assert status == 429 and q["error"]["code"] == "insufficient_quota"
    assert call("DELETE", f"/v1/prefixes/{pin['id']}", "acme")[1]["deleted"] is True
    assert call("DELETE", f"/v1/prefixes/{pin['id']}", "acme")[0] == 404
    assert call("DELETE", f"/v1/prefixes/{other['id']}", "acme")[0] == 200
    assert not mt.loop.engine.sessions.pins                                              # released in the engine


def test_pin_ttl_expires_and_frees_the_quota(mt):
    h = {"Authorization": f"Bearer {KEYS['beta']}", "Connection": "close"}
    status, data = responses(raw(mt.port, request("POST", "/v1/prefixes", {"prompt": "expiring prefix!", "ttl": 0.5}, h)))[0]
    pid = json.loads(data)["id"]
    assert status == 200 and fastapi_of(mt.app).state.memstack.pins.held("beta") == 4
    deadline = time.time() + 10
    while time.time() < deadline and responses(raw(mt.port, request("GET", f"/v1/prefixes/{pid}", headers=h)))[0][0] == 200:
        time.sleep(0.2)
    assert responses(raw(mt.port, request("GET", f"/v1/prefixes/{pid}", headers=h)))[0][0] == 404
    # the engine thread releases the expired pin's blocks on its next turn: wait for it, no timing guess
    state = fastapi_of(mt.app).state.memstack
    while time.time() < deadline and (state.pins.held("beta") or mt.loop.engine.sessions.pins):
        time.sleep(0.05)
    assert state.pins.held("beta") == 0 and not mt.loop.engine.sessions.pins


def test_request_quotas(mt):
    c = client(mt, "small")
    with pytest.raises(openai.BadRequestError) as e:                         # 70 tokens: 18 blocks of 4 > 12
        c.completions.create(model="tiny", prompt="x" * 30, max_tokens=40)
    assert "quota of 12" in e.value.body["message"]
    run = mt.loop.engine.runner.run
    running, release = threading.Event(), threading.Event()

    def held(items):                         # keep the first request in flight until the second was refused
        running.set()
        release.wait(60)
        return run(items)

    first = threading.Thread(target=lambda: c.completions.create(model="tiny", prompt="slow one", max_tokens=30))
    mt.loop.engine.runner.run = held
    try:
        first.start()
        assert running.wait(60)              # admitted and in the engine (no timing guess on a loaded machine)
        with pytest.raises(openai.RateLimitError) as e:                      # max_concurrent: 1
            c.completions.create(model="tiny", prompt="second", max_tokens=2)
        assert e.value.body["code"] == "rate_limit_exceeded"
    finally:
        release.set()
        first.join()
        mt.loop.engine.runner.run = run
    assert c.completions.create(model="tiny", prompt="second", max_tokens=2).choices[0].finish_reason


def test_an_exposed_host_without_keys_refuses_to_start():
    assert check_exposure(ServerConfig(host="0.0.0.0"), Tenants())
    assert check_exposure(ServerConfig(host="::"), Tenants())
    assert not check_exposure(ServerConfig(host="0.0.0.0", allow_unauthenticated=True), Tenants())
    assert not check_exposure(ServerConfig(host="127.0.0.1"), Tenants())
    assert not check_exposure(ServerConfig(host="0.0.0.0"), Tenants.load(None, {"MEMSTACK_API_KEYS": f"a={KEYS['acme']}"}))
    from memstack.engine import Engine, EngineConfig

    with pytest.raises(ConfigError, match="--allow-unauthenticated"):
        Server(Engine(tiny(), EngineConfig(block_size=4, num_blocks=16)), TOK, ServerConfig(host="0.0.0.0", port=0))
