"""Memory sessions moved over HTTP (export / import, the library's sealed documents) and counted in
the tenant's KV quota: a session continues after a round trip exactly as before it; another
tenant's, unknown, tampered, other-model or malformed documents are refused with every reason and
change nothing; a tenant whose sessions fill its quota gets a 429 that says so, others go on."""
from __future__ import annotations

import base64
import json

import openai
import pytest
import torch
from conftest import KEYS, TOK, raw, request, responses, start

from memstack.backbone.model import build_model
from memstack.config import BackboneConfig
from memstack.generate import SamplingConfig, generate
from memstack.memory.learned.config import RMTConfig
from memstack.server import Tenants

SMALL = "sk-small-0123456789abcdef"
QUOTA = 17          # an RMT session here holds 3 blocks of 4 (its K/V beyond a segment is dropped)


def rmt(seed=0):
    torch.manual_seed(seed)
    b = BackboneConfig(vocab_size=TOK.vocab_size, d_model=32, n_layers=2, n_heads=2, seg_len=16, init_std=0.3)
    return build_model(b, [RMTConfig(n_tokens=2)]).eval()


def keys(tmp_path_factory):
    p = tmp_path_factory.mktemp("keys") / "keys.yaml"
    p.write_text(f'tenants:\n  - name: acme\n    keys: ["{KEYS["acme"]}"]\n  - name: beta\n    keys: ["{KEYS["beta"]}"]\n'
                 f'  - name: small\n    keys: ["{SMALL}"]\n    kv_quota_blocks: {QUOTA}\n')
    return Tenants.load(p, environ={})


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    s = start(rmt(), tenants=keys(tmp_path_factory), max_sessions=8)
    yield s
    s.stop()


def client(srv, who="acme"):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{srv.port}/v1", api_key=KEYS.get(who, SMALL), max_retries=0,
                         timeout=60)


def ids(c, prompt, n, session):
    r = c.completions.create(model="tiny", prompt=prompt, max_tokens=n, temperature=0, extra_body={
        "session": session, "return_token_ids": True, "ignore_eos": True})
    return r.choices[0].token_ids


def sessions(c) -> dict:
    return {x["id"]: x for x in c.get("/sessions", cast_to=dict)["data"]}


def test_export_import_round_trip_continues_the_document(srv):
    c = client(srv)
    c.post("/sessions", body={"id": "trip"}, cast_to=dict)
    p1, p2 = TOK.encode("The state of the Union is "), TOK.encode(" and so on, ")
    out1 = ids(c, p1, 7, "trip")
    exp = c.post("/sessions/trip/export", cast_to=dict)
    assert exp["object"] == "session.export" and exp["tokens"] == len(p1) + 7 and exp["blocks"] >= 1
    assert json.loads(exp["manifest"])["kind"] == "memstack-memory-session"
    c.delete("/sessions/trip", cast_to=dict)
    back = c.post("/sessions/import", body={"manifest": exp["manifest"], "tensors": exp["tensors"]}, cast_to=dict)
    assert (back["id"], back["tokens"], back["where"], back["blocks"]) == ("trip", len(p1) + 7, "host", exp["blocks"])
    copy = c.post("/sessions/import", body={"manifest": exp["manifest"], "tensors": exp["tensors"], "id": "trip-2"},
                  cast_to=dict)
    assert copy["id"] == "trip-2"
    model = srv.loop.engine.model
    want = [int(t) for t in generate(model, p1 + out1 + p2, SamplingConfig(max_new_tokens=9))]
    assert ids(c, p2, 9, "trip") == want                        # imported: continues as if never moved
    assert ids(c, p2, 9, "trip-2") == want                      # a second copy, independent of the first
    for sid in ("trip", "trip-2"):
        c.delete(f"/sessions/{sid}", cast_to=dict)


def test_export_and_import_are_owned_and_refused_with_every_reason(srv, tmp_path_factory):
    a, b = client(srv, "acme"), client(srv, "beta")
    a.post("/sessions", body={"id": "own"}, cast_to=dict)
    ids(a, TOK.encode("A private conversation of acme."), 5, "own")
    for who, sid in ((b, "own"), (a, "nobody")):                # another tenant's id is unknown, never "forbidden"
        with pytest.raises(openai.NotFoundError, match="no session"):
            who.post(f"/sessions/{sid}/export", cast_to=dict)
    exp = a.post("/sessions/own/export", cast_to=dict)
    before = (sessions(a), sessions(b))

    def refused(c, body, *reasons, status=openai.BadRequestError):
        with pytest.raises(status) as e:
            c.post("/sessions/import", body=body, cast_to=dict)
        msg = e.value.body["message"]
        for r in reasons:
            assert r in msg, (r, msg)
        assert "/tmp" not in msg and "memstack-import" not in msg         # no server paths leak
        return msg

    refused(b, {"manifest": exp["manifest"], "tensors": exp["tensors"]}, "belongs to another namespace than 'beta'")
    doc = json.loads(exp["manifest"])
    doc["tokens"][0] = (doc["tokens"][0] + 1) % 256                  # an edited token: the seal breaks
    refused(a, {"manifest": json.dumps(doc, indent=1) + "\n", "tensors": exp["tensors"], "id": "x1"},
            "fails its checksum")
    kv = bytearray(base64.b64decode(exp["tensors"]))
    kv[-1] ^= 0xFF                                                      # a flipped K/V byte
    refused(a, {"manifest": exp["manifest"], "tensors": base64.b64encode(bytes(kv)).decode(), "id": "x2"},
            "checksum mismatch")
    refused(a, {"manifest": "{not json", "tensors": "%%%"}, "tensors: not valid base64", "manifest: not valid JSON")
    refused(a, {"manifest": exp["manifest"], "tensors": exp["tensors"], "id": "../x"}, "id")
    refused(a, {"manifest": exp["manifest"]}, "tensors")
    refused(a, {"manifest": exp["manifest"], "tensors": exp["tensors"]}, "already exists", status=openai.ConflictError)
    assert (sessions(a), sessions(b)) == before                        # nothing changed by any refusal
    other = start(rmt(seed=1), tenants=keys(tmp_path_factory))        # another model (other weights)
    try:
        msg = refused(client(other, "acme"), {"manifest": exp["manifest"], "tensors": exp["tensors"]},
                      "came from another model or engine: model_fingerprint")
        assert sessions(client(other, "acme")) == {}, msg
    finally:
        other.stop()
    a.delete("/sessions/own", cast_to=dict)


def test_import_body_limits(srv):
    h = {"Authorization": f"Bearer {KEYS['acme']}", "Connection": "close"}
    big = request("POST", "/v1/sessions/import", headers={**h, "Content-Length": str((64 << 20) + 1)}, raw_body=b"")
    status, body = responses(raw(srv.port, big.replace(b"Content-Length: 0\r\n", b"")))[0]
    assert status == 413 and b"67108864" in body                      # its own bound, refused before reading
    payload = {"manifest": "{}", "tensors": "A" * (2 << 20)}            # 2 MiB: over the general 1 MiB bound ...
    status, body = responses(raw(srv.port, request("POST", "/v1/sessions/import", payload, h)))[0]
    assert status == 400 and b"manifest" in body                       # ... but within the import's: judged, refused
    other = request("POST", "/v1/sessions", headers={**h, "Content-Length": str(2 << 20)}, raw_body=b"")
    status, body = responses(raw(srv.port, other.replace(b"Content-Length: 0\r\n", b"")))[0]
    assert status == 413 and b"1048576" in body                        # every other route keeps 1 MiB


def test_sessions_count_against_the_tenant_kv_quota(srv):
    s, a = client(srv, "small"), client(srv, "acme")
    eng = srv.loop.engine
    prompt = TOK.encode("Twenty-four bytes of it.")
    refusal, made = None, []
    for i in range(8):
        sid = f"q{i}"
        s.post("/sessions", body={"id": sid}, cast_to=dict)
        made.append(sid)
        try:
            ids(s, prompt, 16, sid)
        except openai.RateLimitError as e:
            refusal = e
            break
        held = sum(x["blocks"] for x in sessions(s).values())
        assert held == eng.memory_sessions.held["small"] <= QUOTA      # the quota bounds what its sessions hold
    assert refusal is not None, "the sessions never reached the quota"
    held = eng.memory_sessions.held["small"]
    assert refusal.body["code"] == "kv_quota" and f"your quota is {QUOTA}: your sessions hold {held}" in \
        refusal.body["message"]
    refused_sid = made[-1]
    assert sessions(s)[refused_sid]["tokens"] == 0                    # the refused request changed nothing
    # another tenant is not affected: plain requests and its own sessions go on
    assert len(a.completions.create(model="tiny", prompt="hello there", max_tokens=20, temperature=0,
                                    extra_body={"ignore_eos": True, "return_token_ids": True}).choices[0].token_ids) == 20
    a.post("/sessions", body={"id": "free"}, cast_to=dict)
    assert len(ids(a, prompt, 16, "free")) == 16
    # an import is counted too: accepted while it fits, then refused, nothing changed
    exp = s.post(f"/sessions/{made[0]}/export", cast_to=dict)
    for j in range(8):
        try:
            s.post("/sessions/import", body={"manifest": exp["manifest"], "tensors": exp["tensors"], "id": f"again{j}"},
                   cast_to=dict)
        except openai.RateLimitError as e:
            assert f"importing this session needs {exp['blocks']} more KV blocks" in e.body["message"]
            assert eng.memory_sessions.held["small"] + exp["blocks"] > QUOTA and f"again{j}" not in sessions(s)
            break
        made.append(f"again{j}")
        assert eng.memory_sessions.held["small"] <= QUOTA
    else:
        raise AssertionError("imports never reached the quota")
    held = eng.memory_sessions.held["small"]
    for sid in made[:2]:                                                # room again: the refused request now runs
        s.delete(f"/sessions/{sid}", cast_to=dict)
    assert eng.memory_sessions.held["small"] == held - 2 * exp["blocks"]
    assert len(ids(s, prompt, 16, refused_sid)) == 16
    for sid in made[2:]:
        s.delete(f"/sessions/{sid}", cast_to=dict)
    a.delete("/sessions/free", cast_to=dict)
    assert "small" not in eng.memory_sessions.held


def test_a_tenant_holds_at_most_max_sessions(srv):
    b = client(srv, "beta")
    for i in range(8):
        b.post("/sessions", body={"id": f"m{i}"}, cast_to=dict)
    with pytest.raises(openai.RateLimitError) as e:
        b.post("/sessions", body={"id": "m8"}, cast_to=dict)
    assert e.value.body["code"] == "session_quota" and len(sessions(b)) == 8
    assert client(srv, "acme").post("/sessions", body={"id": "m8"}, cast_to=dict)["id"] == "m8"   # others unaffected
    for i in range(8):
        b.delete(f"/sessions/m{i}", cast_to=dict)
    client(srv, "acme").delete("/sessions/m8", cast_to=dict)
