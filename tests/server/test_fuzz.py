"""Property-based fuzz of every endpoint: schemathesis draws requests from the OpenAPI schema the
server publishes -- valid ones (positive) and ones that break it (negative: wrong types, missing
fields, out-of-range values) -- and hypothesis draws arbitrary JSON for the generation routes.
Every answer must be a response (no dropped connection) below 500, and the engine must serve the
same greedy tokens afterwards."""
from __future__ import annotations

import json

import hypothesis
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from memstack.server.app import fastapi_of
from tests.server.conftest import KEYS, Tenants, start

AUTH = {"Authorization": f"Bearer {KEYS['acme']}"}
FUZZ = settings(max_examples=12, deadline=None, database=None, suppress_health_check=list(HealthCheck),
                derandomize=True)


@pytest.fixture(scope="module")
def srv():
    s = start(tenants=Tenants.load(None, {"MEMSTACK_API_KEYS": f"acme={KEYS['acme']}"}))
    yield s
    s.stop()


def greedy(srv) -> list[int]:
    r = requests.post(srv.url + "/v1/completions", headers=AUTH, timeout=30,
                      json={"prompt": "fuzz", "max_tokens": 8, "temperature": 0, "return_token_ids": True})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["token_ids"]


def test_schemathesis_over_every_endpoint(srv):
    before = greedy(srv)
    schema = schemathesis.openapi.from_dict(fastapi_of(srv.app).openapi())
    ops = [r.ok() for r in schema.get_all_operations()]
    assert {(o.method.upper(), o.path) for o in ops} >= {("GET", "/v1/models"), ("POST", "/v1/completions"),
                                                         ("POST", "/v1/chat/completions"), ("POST", "/v1/prefixes"),
                                                         ("DELETE", "/v1/prefixes/{pin_id}"), ("GET", "/health")}
    seen = []
    session = requests.Session()
    for op in ops:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @FUZZ
            @given(op.as_strategy(generation_mode=mode))
            def check(case):
                r = case.call(base_url=srv.url, headers=AUTH, session=session, timeout=30)
                seen.append(r.status_code)
                assert r.status_code < 500, (case.method, case.path, case.body, r.status_code, r.text[:500])
                if r.status_code >= 400:
                    assert "message" in r.json()["error"]                  # OpenAI's error shape, always
            try:
                check()
            except hypothesis.errors.Unsatisfiable:
                pass                                   # nothing to break (e.g. an operation without input)
    assert len(seen) > 100 and any(s == 200 for s in seen) and any(400 <= s < 500 for s in seen)
    assert greedy(srv) == before


JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**80, 2**80) | st.floats() | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=12)
FIELDS = ["model", "prompt", "messages", "max_tokens", "temperature", "top_p", "top_k", "n", "stop", "seed", "stream",
          "logprobs", "top_logprobs", "echo", "stream_options", "max_completion_tokens", "ttl", "user"]


@FUZZ
@given(path=st.sampled_from(["/v1/completions", "/v1/chat/completions", "/v1/prefixes"]),
       body=st.dictionaries(st.sampled_from(FIELDS), JSON, max_size=6) | JSON)
def test_arbitrary_json_never_breaks_a_route(srv, path, body):
    data = json.dumps(body, allow_nan=True)
    r = requests.post(srv.url + path, data=data, headers={**AUTH, "Content-Type": "application/json"}, timeout=30)
    assert r.status_code < 500, (path, data, r.text[:500])
    if r.status_code >= 400:
        assert r.json()["error"]["message"]
