"""Task namespaces and forgetting everywhere, over real HTTP: a request's tenant, user and task
select every namespace it reads (its user's rows AND its task's); another tenant cannot name a
task; forgetting a user removes its table rows, its datastore entries (persisted) and versions,
and the user then reads exactly like a never-taught user while everyone else is bit for bit
unchanged."""
from __future__ import annotations

import hashlib

import openai
import pytest
import torch
from conftest import KEYS, TOK
from test_user_memory_api import CANARY, http

from memstack.backbone.model import build_model
from memstack.config import BackboneConfig, ModelConfig
from memstack.engine import Engine, EngineConfig
from memstack.engine.user_memory import LearnConfig, UserMemory
from memstack.memory.retrieval.config import KNNLMConfig, StoreConfig
from memstack.memory.retrieval.store import Datastore
from memstack.memory.sparse.config import EngramConfig
from memstack.server import Server, ServerConfig, Tenants
from memstack.server.tenants import Tenant

ALICE = "tenant:acme/user:alice"


def serve(tmp_path, knn: bool = False):
    def d(k):
        return hashlib.sha256(k.encode()).digest()
    tenants = Tenants([(d(KEYS["acme"]), Tenant("acme", users=("alice", "bob", "mallory"), tasks=("support", "billing"))),
                       (d(KEYS["beta"]), Tenant("beta", users=("carol",), tasks=("support",)))])
    torch.manual_seed(0)
    b = BackboneConfig(vocab_size=TOK.vocab_size, d_model=32, n_layers=2, n_heads=2, seg_len=64, init_std=0.3)
    mems = [EngramConfig(layers=(0,), heads=2, head_dim=8, rows_per_head=31, user_rows_per_head=29)]
    if knn:          # a served datastore with entries per user (alice's say "x", bob's say "y")
        st = Datastore(StoreConfig(dim=32), "test-keys", payload={"token": ("int64", ())})
        g = torch.Generator().manual_seed(0)
        for ns, tok in ((ALICE, ord("x")), ("tenant:acme/user:bob", ord("y"))):
            st.add(torch.randn(48, 32, generator=g) * 2, {"token": torch.full((48,), tok)}, namespace=ns)
        st.save(tmp_path / "store")
        mems.append(KNNLMConfig(store=str(tmp_path / "store"), k=8, lmbda=0.5, temperature=20.0, cache_len=0))
    model = build_model(ModelConfig(b, tuple(mems))).eval()
    eng = Engine(model, EngineConfig(block_size=4, num_blocks=128, max_model_len=200), tokenizer="byte")
    learn = LearnConfig(lr=0.1, steps=8, max_row_update_norm=10.0, drift_threshold=0.5)
    mem = UserMemory(eng.serving, tmp_path / "users", learn, [[TOK.eot_id] + TOK.encode(t) for t in CANARY])
    return Server(eng, TOK, ServerConfig(port=0, log_level="warning", access_log=False, model_name="tiny"),
                  tenants, mem).start()


@pytest.fixture
def srv(tmp_path):
    s = serve(tmp_path)
    yield s
    s.stop()


def lp(s, user=None, task=None, tenant="acme", prompt="my dog is called"):
    c = openai.OpenAI(base_url=s.url + "/v1", api_key=KEYS[tenant], max_retries=0)
    r = c.completions.create(model="tiny", prompt=prompt, max_tokens=4, temperature=0, logprobs=5, user=user,
                             extra_body={"task": task} if task else None)
    return r.choices[0].logprobs.token_logprobs


def test_a_request_reads_its_users_and_its_tasks_rows(srv):
    base = lp(srv, "alice")
    assert lp(srv, "alice", "support") == lp(srv, None, "support") == lp(srv, "carol", "support", "beta") == base
    r = http(srv, "POST", "/v1/memory/learn", json={"task": "support", "facts": ["my dog is called Rex."]})
    assert r.status_code == 200 and r.json()["task"] == "support" and r.json()["version"] == 2, r.text
    task_only, alice_task, bob_task = lp(srv, None, "support"), lp(srv, "alice", "support"), lp(srv, "bob", "support")
    assert task_only != base and alice_task == bob_task == task_only      # nobody's user rows yet: the task's
    assert lp(srv, "alice") == base and lp(srv, "alice", "billing") == base   # without the task: unchanged
    assert lp(srv, "carol", "support", "beta") == base                   # beta's "support" is its own namespace
    r = http(srv, "POST", "/v1/memory/learn", json={"user": "alice", "facts": ["my cat is called Tom."]})
    assert r.status_code == 200, r.text
    alice, both = lp(srv, "alice"), lp(srv, "alice", "support")
    assert len({tuple(base), tuple(alice), tuple(task_only), tuple(both)}) == 4    # each reads what it names
    c = openai.OpenAI(base_url=srv.url + "/v1", api_key=KEYS["acme"], max_retries=0)

    def chat(task):
        r = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "my dog is called"}],
                                      max_tokens=3, temperature=0, logprobs=True, user="alice",
                                      extra_body={"task": task} if task else None)
        return [t.logprob for t in r.choices[0].logprobs.content]
    assert chat("support") != chat(None) and chat("support") == chat("support")   # chat reads the task too
    assert lp(srv, "bob", "support") == task_only and lp(srv, "bob") == base        # bob: exactly unchanged
    # the task's versions: log, rollback, export into another task, forget
    log = http(srv, "GET", "/v1/memory/log", params={"task": "support"}).json()
    assert log["task"] == "support" and [v["version"] for v in log["versions"]] == [1, 2]
    delta = http(srv, "POST", "/v1/memory/export", json={"task": "support"}).json()
    assert http(srv, "POST", "/v1/memory/import", json={"task": "billing", "data": delta["data"]}).status_code == 200
    assert lp(srv, "alice", "billing") == both
    assert http(srv, "POST", "/v1/memory/rollback", json={"task": "support", "version": 1}).status_code == 200
    assert lp(srv, "alice", "support") == alice
    f = http(srv, "POST", "/v1/memory/forget", json={"task": "billing"}).json()
    assert f["task"] == "billing" and f["tables_dropped"] == 1 and f["versions_removed"] == 2
    assert f["left"] == {"requests": 0, "memory_entries": 0, "sessions": 0, "cached_blocks": 0, "stored_versions": 0}
    assert lp(srv, "alice", "billing") == alice and lp(srv, "alice") == alice


def test_tasks_are_the_tenants_own_and_bad_bodies_list_every_reason(srv):
    c = openai.OpenAI(base_url=srv.url + "/v1", api_key=KEYS["beta"], max_retries=0)
    for task in ("billing", "nope"):                 # acme's task, an unknown one: the same 404
        with pytest.raises(openai.NotFoundError) as e:
            c.completions.create(model="tiny", prompt="hi", max_tokens=1, user="carol", extra_body={"task": task})
        assert e.value.body["code"] == "task_not_found"
        r = http(srv, "POST", "/v1/memory/learn", "beta", json={"task": task, "facts": ["x y"]})
        assert r.status_code == 404 and r.json()["error"]["code"] == "task_not_found"
        assert http(srv, "POST", "/v1/memory/forget", "beta", json={"task": task}).status_code == 404
        assert http(srv, "GET", "/v1/memory/log", "beta", params={"task": task}).status_code == 404
    r = http(srv, "POST", "/v1/memory/learn", json={"user": "alice", "task": "support", "facts": []})
    msg = r.json()["error"]["message"]
    assert r.status_code == 400 and "exactly one of user or task" in msg and "facts" in msg
    r = http(srv, "POST", "/v1/memory/learn", json={"facts": ["x y"], "messages": [{"role": "user", "content": "x"}]})
    msg = r.json()["error"]["message"]
    assert r.status_code == 400 and "exactly one of user or task" in msg and "exactly one of facts" in msg
    assert http(srv, "POST", "/v1/memory/forget", json={}).status_code == 400
    assert http(srv, "GET", "/v1/memory/log", params={"user": "alice", "task": "support"}).status_code == 400
    r = http(srv, "POST", "/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 1, "task": ""})
    assert r.status_code == 400


def test_forget_removes_a_user_from_every_tier_and_nobody_else_moves(tmp_path):
    s = serve(tmp_path, knn=True)
    try:
        never = lp(s, "mallory")
        alice0, bob0 = lp(s, "alice"), lp(s, "bob")
        assert alice0 != never and bob0 != never and alice0 != bob0       # their datastore entries are read
        assert http(s, "POST", "/v1/memory/learn", json={"user": "alice", "facts": ["my dog is called Rex."]}
                    ).status_code == 200
        assert lp(s, "alice") != alice0 and lp(s, "bob") == bob0 and lp(s, "mallory") == never
        f = http(s, "POST", "/v1/memory/forget", json={"user": "alice"}).json()
        assert f["user"] == "alice" and f["tables_dropped"] == 1 and f["datastore_entries_removed"] == 48
        assert f["versions_removed"] == 2 and f["store_exists"] is False and f["requests_aborted"] == 0
        assert f["left"] == {"requests": 0, "memory_entries": 0, "sessions": 0, "cached_blocks": 0, "stored_versions": 0}
        assert lp(s, "alice") == never                                     # like a user never taught, bit for bit
        assert lp(s, "bob") == bob0 and lp(s, "mallory") == never         # everyone else: unchanged
        on_disk = Datastore.open(tmp_path / "store")
        assert on_disk.count(ALICE) == 0 and ALICE not in on_disk.namespaces and on_disk.count("tenant:acme/user:bob") == 48
        assert not (tmp_path / "users").joinpath("tenant%3Aacme%2Fuser%3Aalice").exists()
        again = http(s, "POST", "/v1/memory/forget", json={"user": "alice"}).json()       # idempotent
        assert again["tables_dropped"] == again["datastore_entries_removed"] == again["versions_removed"] == 0
    finally:
        s.stop()


def test_broken_bodies_are_400_with_the_fields_named(srv):
    for body in ({"user": 3, "facts": "x"}, {"task": "support", "messages": [{"role": "user"}], "facts": [""]},
                 {"user": "alice", "messages": "hi"}, [1, 2], {"user": "alice", "task": None, "version": "2"}):
        r = http(srv, "POST", "/v1/memory/learn", json=body)
        assert r.status_code == 400, (body, r.text)
    r = http(srv, "POST", "/v1/memory/rollback", json={"version": 0})
    msg = r.json()["error"]["message"]
    assert r.status_code == 400 and "version" in msg and "exactly one of user or task" in msg


def test_a_forget_that_fails_part_way_says_so_and_a_retry_finishes_it(tmp_path, monkeypatch):
    import memstack.memory.retrieval.store_io as io

    s = serve(tmp_path, knn=True)
    try:
        never = lp(s, "mallory")
        real = io.save_tensors_versioned

        def crash(*a, **k):
            raise OSError("disk full")
        monkeypatch.setattr(io, "save_tensors_versioned", crash)
        r = http(s, "POST", "/v1/memory/forget", json={"user": "alice"})
        assert r.status_code == 500 and "retry the forget" in r.json()["error"]["message"]
        assert Datastore.open(tmp_path / "store").count(ALICE) == 48          # the last good version on disk
        monkeypatch.setattr(io, "save_tensors_versioned", real)
        f = http(s, "POST", "/v1/memory/forget", json={"user": "alice"}).json()
        assert f["left"]["memory_entries"] == 0 and Datastore.open(tmp_path / "store").count(ALICE) == 0
        assert lp(s, "alice") == never
    finally:
        s.stop()
