"""The converged server: a request's tenant + user select that user's memory rows; /v1/memory/...
learns while serving (real uvicorn, the real `openai` client and raw HTTP)."""
from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request

import openai
import pytest
import torch
from conftest import KEYS, TOK

from memstack.backbone.model import build_model
from memstack.config import BackboneConfig, ModelConfig
from memstack.engine import Engine, EngineConfig
from memstack.engine.user_memory import LearnConfig, UserMemory
from memstack.memory.learned.config import PrefixConfig
from memstack.memory.sparse.config import EngramConfig
from memstack.server import Server, ServerConfig, Tenants
from memstack.server.tenants import Tenant

CANARY = ["the quick brown fox jumps over the lazy dog", "a stitch in time saves nine"]


def tenants() -> Tenants:
    import hashlib

    def d(k):
        return hashlib.sha256(k.encode()).digest()
    return Tenants([(d(KEYS["acme"]), Tenant("acme", users=("alice", "bob"))),
                    (d(KEYS["beta"]), Tenant("beta", users=("carol",)))])


# the user memory behind the server: hashed N-gram rows (Engram) or a few identity rows read as a
# key/value prefix (Prefix) -- the server and the learner name neither. (memory config, its learning rate:
# a prefix row is a raw key/value, whose Adam step per element needs a larger rate to move the read)
MEMORIES = {"engram": (EngramConfig(layers=(0,), heads=2, head_dim=8, rows_per_head=31, user_rows_per_head=29), 0.1),
            "prefix": (PrefixConfig(n_prefix=0, user_prefix=16, layers=(0, 1)), 1.0)}


def serve(tmp_path, memory="engram", **learn):
    torch.manual_seed(0)
    b = BackboneConfig(vocab_size=TOK.vocab_size, d_model=32, n_layers=2, n_heads=2, seg_len=64, init_std=0.3)
    mem_cfg, lr = MEMORIES[memory]
    model = build_model(ModelConfig(b, (mem_cfg,))).eval()
    eng = Engine(model, EngineConfig(block_size=4, num_blocks=128, max_model_len=200), tokenizer="byte")
    cfg = {"lr": lr, "steps": 8, "max_row_update_norm": 10.0, "drift_threshold": 0.5, **learn}
    mem = UserMemory(eng.serving, tmp_path / "users", LearnConfig(**cfg), [[TOK.eot_id] + TOK.encode(t) for t in CANARY])
    return Server(eng, TOK, ServerConfig(port=0, log_level="warning", access_log=False, model_name="tiny"),
                  tenants(), mem).start()


@pytest.fixture(params=list(MEMORIES))
def srv(tmp_path, request):
    s = serve(tmp_path, request.param)
    yield s
    s.stop()


def client(s, tenant="acme"):
    return openai.OpenAI(base_url=s.url + "/v1", api_key=KEYS[tenant], max_retries=0)


class Resp:
    def __init__(self, status: int, body: bytes):
        self.status_code, self.text = status, body.decode()

    def json(self):
        return json.loads(self.text)


def http(s, method, path, tenant="acme", json=None, params=None, auth=True):
    """Plain HTTP (urllib) for the memstack routes the openai client has no method for."""
    url = s.url + path + ("?" + urllib.parse.urlencode(params) if params else "")
    data = None if json is None else __import__("json").dumps(json).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={
        "Content-Type": "application/json", **({"Authorization": f"Bearer {KEYS[tenant]}"} if auth else {})})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return Resp(r.status, r.read())
    except urllib.error.HTTPError as e:
        return Resp(e.code, e.read())


PROMPT = "my dog is called"


def logprobs(s, user, tenant="acme", prompt=PROMPT):
    r = client(s, tenant).completions.create(model="tiny", prompt=prompt, max_tokens=4, temperature=0, logprobs=5,
                                             user=user)
    return r.choices[0].logprobs.token_logprobs, r.choices[0].text


def test_learn_is_visible_to_that_user_only_and_forget_removes_everything(srv, tmp_path):
    base_a, base_b, base_c = logprobs(srv, "alice"), logprobs(srv, "bob"), logprobs(srv, "carol", "beta")
    assert base_a == base_b == base_c                                   # nobody has learned yet
    t0 = time.perf_counter()
    r = http(srv, "POST", "/v1/memory/learn", json={"user": "alice", "facts": ["my dog is called Rex."]})
    visible = time.perf_counter() - t0
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["version"] == 2 and out["head"] == 2 and not out["rolled_back"] and out["loss_last"] < out["loss_first"]
    a = logprobs(srv, "alice")                                          # the very next request reads the new rows
    assert a != base_a
    assert logprobs(srv, "bob") == base_b and logprobs(srv, "carol", "beta") == base_c   # exactly unchanged
    # learning made the fact more likely for alice
    lp = lambda user: client(srv).completions.create(model="tiny", prompt="my dog is called Re", max_tokens=1,
                                                     temperature=0, logprobs=5, user=user)
    assert lp("alice").choices[0].logprobs.token_logprobs[0] >= lp("bob").choices[0].logprobs.token_logprobs[0]
    assert visible < 60                                                 # measured in the benchmark, bounded here
    # a conversation turn is learned too; log / rollback
    r = http(srv, "POST", "/v1/memory/learn", json={"user": "alice", "messages": [
        {"role": "user", "content": "I live in Lisbon."}, {"role": "assistant", "content": "Nice!"}]})
    assert r.status_code == 200 and r.json()["version"] == 3
    log = http(srv, "GET", "/v1/memory/log", params={"user": "alice"}).json()
    assert log["head"] == 3 and [v["version"] for v in log["versions"]] == [1, 2, 3]
    assert log["versions"][2]["meta"]["source"] == "messages"
    assert http(srv, "POST", "/v1/memory/rollback", json={"user": "alice", "version": 2}).json()["head"] == 2
    assert logprobs(srv, "alice") == a
    # export alice, import into bob: bob now answers like alice
    delta = http(srv, "POST", "/v1/memory/export", json={"user": "alice"}).json()
    assert delta["rows"] > 0
    r = http(srv, "POST", "/v1/memory/import", json={"user": "bob", "data": delta["data"]})
    assert r.status_code == 200, r.text
    assert logprobs(srv, "bob") == a
    # forget alice: rows, versions on disk -- and her requests read the base model again
    r = http(srv, "POST", "/v1/memory/forget", json={"user": "alice"})
    assert r.status_code == 200, r.text
    f = r.json()
    assert f["tables_dropped"] == 1 and f["store_exists"] is False and f["versions_removed"] == 3
    assert f["left"] == {"requests": 0, "memory_entries": 0, "sessions": 0, "cached_blocks": 0, "stored_versions": 0}
    left = [urllib.parse.unquote(p.name) for p in tmp_path.joinpath("users").iterdir()]
    assert left == ["tenant:acme/user:bob"]                              # nothing of alice's is on disk
    assert logprobs(srv, "alice") == base_a
    assert http(srv, "GET", "/v1/memory/log", params={"user": "alice"}).json()["versions"] == []
    assert logprobs(srv, "bob") == a                                    # bob's copy is his own


def test_users_of_other_tenants_and_unknown_users_are_refused(srv):
    for tenant, user in (("beta", "alice"), ("acme", "carol"), ("acme", "mallory")):
        r = http(srv, "POST", "/v1/memory/learn", tenant, json={"user": user, "facts": ["x y z"]})
        assert r.status_code == 404 and r.json()["error"]["code"] == "user_not_found", (tenant, user)
        with pytest.raises(openai.NotFoundError):
            client(srv, tenant).completions.create(model="tiny", prompt="hi", max_tokens=1, user=user)
        assert http(srv, "GET", "/v1/memory/log", tenant, params={"user": user}).status_code == 404
        assert http(srv, "POST", "/v1/memory/forget", tenant, json={"user": user}).status_code == 404
    assert http(srv, "POST", "/v1/memory/learn", json={"user": "alice", "facts": ["x"]}, auth=False).status_code == 401


def test_bad_learn_requests_are_refused_whole_with_every_reason(tmp_path):
    s = serve(tmp_path, max_row_update_norm=1e-6, rate_per_min=3)
    try:
        r = http(s, "POST", "/v1/memory/learn", json={"user": "alice", "facts": ["ok"], "messages": [
            {"role": "user", "content": "x"}]})
        assert r.status_code == 400 and "exactly one of facts" in r.json()["error"]["message"]
        r = http(s, "POST", "/v1/memory/learn", json={"user": "alice", "facts": [], "lr": 5})
        msg = r.json()["error"]["message"]
        assert r.status_code == 400 and "facts" in msg and "lr" in msg
        r = http(s, "POST", "/v1/memory/learn", json={"user": "alice", "facts": ["my dog is called Rex."]})
        assert r.status_code == 400 and "norm cap" in r.json()["error"]["message"]      # the safety policy
        assert http(s, "GET", "/v1/memory/log", params={"user": "alice"}).json()["versions"] == []   # nothing stored
        r = http(s, "POST", "/v1/memory/rollback", json={"user": "alice", "version": 1})
        assert r.status_code == 404
        r = http(s, "POST", "/v1/memory/import", json={"user": "alice", "data": "not base64!"})
        assert r.status_code == 400 and "base64" in r.json()["error"]["message"]
        codes = [http(s, "POST", "/v1/memory/learn", json={"user": "bob", "facts": ["a b"]}).status_code
                 for _ in range(4)]
        assert codes[-1] == 429                                          # the rate limit (3 per minute)
    finally:
        s.stop()


def test_other_users_are_served_while_one_learns(tmp_path):
    import threading

    s = serve(tmp_path, steps=400)                                  # a long update (seconds)
    try:
        base = logprobs(s, "bob")
        done = {}

        def learn():
            done["r"] = http(s, "POST", "/v1/memory/learn", json={"user": "alice", "facts": ["my dog is called Rex."]})
            done["t"] = time.perf_counter()
        th = threading.Thread(target=learn)
        th.start()
        time.sleep(0.3)
        served = []
        while th.is_alive() and len(served) < 3:
            served.append((logprobs(s, "bob"), time.perf_counter()))
        th.join()
        assert done["r"].status_code == 200
        assert served and all(t < done["t"] for _, t in served)       # answered while alice's update ran
        assert all(lp == base for lp, _ in served)                     # and never saw a half-written table
    finally:
        s.stop()
