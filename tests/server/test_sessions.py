"""Memory sessions over HTTP: a tenant's session continues its document across requests (the next
tokens equal one decode of the whole document), is owned by its tenant, and is refused clearly."""
from __future__ import annotations

import openai
import pytest
import torch
from conftest import KEYS, TOK, start

from memstack.backbone.model import build_model
from memstack.config import BackboneConfig
from memstack.generate import SamplingConfig, generate
from memstack.memory.learned.config import RMTConfig
from memstack.server import Tenants


def rmt():
    torch.manual_seed(0)
    b = BackboneConfig(vocab_size=TOK.vocab_size, d_model=32, n_layers=2, n_heads=2, seg_len=16, init_std=0.3)
    return build_model(b, [RMTConfig(n_tokens=2)]).eval()


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    p = tmp_path_factory.mktemp("keys") / "keys.yaml"
    p.write_text(f'tenants:\n  - name: acme\n    keys: ["{KEYS["acme"]}"]\n  - name: beta\n    keys: ["{KEYS["beta"]}"]\n')
    s = start(rmt(), tenants=Tenants.load(p, environ={}))
    yield s
    s.stop()


def client(srv, who="acme"):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{srv.port}/v1", api_key=KEYS[who], max_retries=0)


def ids(c, prompt, n, session):
    r = c.completions.create(model="tiny", prompt=prompt, max_tokens=n, temperature=0, extra_body={"session": session,
                             "return_token_ids": True, "ignore_eos": True})
    return r.choices[0].token_ids


def test_a_session_continues_its_document_across_requests(srv):
    c = client(srv)
    s = c.post("/sessions", body={"id": "chat-1"}, cast_to=dict)
    assert s["id"] == "chat-1" and s["tokens"] == 0 and not s["busy"]
    p1, p2 = TOK.encode("The state of the Union is "), TOK.encode(" and so on, ")   # segments of 16: a memory write
    out1 = ids(c, p1, 7, "chat-1")
    out2 = ids(c, p2, 9, "chat-1")
    model = srv.loop.engine.model
    whole = [int(t) for t in generate(model, p1, SamplingConfig(max_new_tokens=7))]
    assert out1 == whole
    doc = p1 + out1 + p2
    assert out2 == [int(t) for t in generate(model, doc, SamplingConfig(max_new_tokens=9))]
    assert out2 != [int(t) for t in generate(model, p2, SamplingConfig(max_new_tokens=9))]   # not the prompt alone
    info = c.get("/sessions/chat-1", cast_to=dict)
    assert info["tokens"] == len(doc) + 9
    assert [x["id"] for x in c.get("/sessions", cast_to=dict)["data"]] == ["chat-1"]


def test_sessions_are_owned_and_refused_with_reasons(srv):
    a, b = client(srv, "acme"), client(srv, "beta")
    a.post("/sessions", body={"id": "mine"}, cast_to=dict)
    for call in (lambda: b.get("/sessions/mine", cast_to=dict), lambda: b.delete("/sessions/mine", cast_to=dict),
                 lambda: ids(b, TOK.encode("hello"), 2, "mine") and None):
        with pytest.raises((openai.NotFoundError, openai.BadRequestError)) as e:
            call()
        assert "no session 'mine'" in str(e.value)             # another tenant's id is unknown, never "forbidden"
    assert b.get("/sessions", cast_to=dict)["data"] == []
    with pytest.raises(openai.ConflictError, match="already exists"):
        a.post("/sessions", body={"id": "mine"}, cast_to=dict)
    with pytest.raises(openai.BadRequestError, match="n must be 1"):
        a.completions.create(model="tiny", prompt="x", max_tokens=2, n=2, extra_body={"session": "mine"})
    with pytest.raises(openai.BadRequestError):
        a.post("/sessions", body={"id": "../etc"}, cast_to=dict)
    assert a.delete("/sessions/mine", cast_to=dict) == {"id": "mine", "object": "session", "deleted": True}
    with pytest.raises(openai.NotFoundError):
        a.get("/sessions/mine", cast_to=dict)
    gen = a.post("/sessions", body={}, cast_to=dict)["id"]       # a random, unguessable id by default
    assert gen.startswith("sess_") and len(gen) > 20
