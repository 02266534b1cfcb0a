"""Memory sessions: a conversation's memory state and K/V kept between requests, through an
offload to host memory and an export / import across a real process restart; the next tokens
equal decoding the whole document at once. Bad input: unknown / another tenant's / busy
sessions, files of another tenant or model, corrupted files -- refused with reasons."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from served import V, make

from memstack.engine import Engine, EngineConfig
from memstack.engine.memory_sessions import SessionError
from memstack.generate import SamplingConfig, generate
from memstack.registry import MEMORIES

HERE = Path(__file__).parent


def lib(model, doc, n):
    return [int(t) for t in generate(model, doc, SamplingConfig(max_new_tokens=n))]


def turn(eng, key, prompt, n):
    """One request on a session, run to its end; its new tokens."""
    rid = eng.add_request(prompt, SamplingConfig(max_new_tokens=n), session=key)
    while not eng.requests[rid].finished:
        for o in eng.step():
            assert o.error is None, o.error
    return eng.requests.pop(rid).output


def prompts(*lens, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (n,), generator=g).tolist() for n in lens]


@pytest.mark.parametrize("offload", [False, True])
def test_a_session_continues_the_document(offload):
    model = make("rmt")
    eng = Engine(model, EngineConfig(block_size=4, num_blocks=64))
    key = ("tenant-a", "chat")
    eng.memory_sessions.create(*key)
    p1, p2, p3 = prompts(11, 7, 20)
    out1 = turn(eng, key, p1, 9)
    assert out1 == lib(model, p1, 9)
    if offload:
        assert eng.memory_sessions.offload(*key) > 0 and eng.memory_sessions.info(*key)["where"] == "host"
        assert eng.pool.num_free == 64
    out2 = turn(eng, key, p2, 12)
    assert out2 == lib(model, p1 + out1 + p2, 12)
    out3 = turn(eng, key, p3, 5)
    assert out3 == lib(model, p1 + out1 + p2 + out2 + p3, 5)
    # other requests meanwhile are not affected, and the session's own blocks survive them
    other = prompts(13, seed=9)[0]
    assert eng.generate([other], SamplingConfig(max_new_tokens=6)) == [lib(model, other, 6)]
    eng.memory_sessions.close(*key)
    assert eng.pool.num_free == 64


def test_a_failed_request_leaves_the_session_as_it_was():
    model = make("xl")
    eng = Engine(model, EngineConfig(block_size=4, num_blocks=64))
    key = ("t", "s")
    eng.memory_sessions.create(*key)
    p1, p2 = prompts(9, 6)
    out1 = turn(eng, key, p1, 7)
    rid = eng.add_request(p2, SamplingConfig(max_new_tokens=30), session=key)
    for _ in range(3):
        eng.step()
    eng.abort(rid)                                              # half-way: nothing of it is kept
    assert turn(eng, key, p2, 8) == lib(model, p1 + out1 + p2, 8)


def test_bad_session_requests_are_refused():
    eng = Engine(make("armt"), EngineConfig(block_size=4, num_blocks=64))
    ms = eng.memory_sessions
    ms.create("a", "s1")
    with pytest.raises(SessionError, match="already exists"):
        ms.create("a", "s1")
    for key in (("a", "nope"), ("b", "s1")):                   # unknown, and another tenant's: the same answer
        with pytest.raises(Exception, match=f"no session {key[1]!r} in namespace {key[0]!r}"):
            eng.add_request([1, 2], SamplingConfig(max_new_tokens=2), session=key)
    with pytest.raises(Exception, match="tenant must be a non-empty string"):
        eng.add_request([1, 2], SamplingConfig(max_new_tokens=2), session=("", "s1"))
    eng.add_request([1, 2], SamplingConfig(max_new_tokens=5), session=("a", "s1"))
    with pytest.raises(Exception, match="is in use by request"):
        eng.add_request([3], SamplingConfig(max_new_tokens=5), session=("a", "s1"))
    while eng.has_unfinished():
        eng.step()
    assert ms.info("a", "s1")["tokens"] == 7 and ms.info("a", "s1")["busy"] is None


def test_export_import_refusals(tmp_path):
    model = make("infini")
    eng = Engine(model, EngineConfig(block_size=4, num_blocks=64))
    eng.memory_sessions.create("a", "s")
    turn(eng, ("a", "s"), prompts(10)[0], 4)
    path = eng.memory_sessions.export("a", "s", tmp_path / "s.session")
    fresh = Engine(model, EngineConfig(block_size=4, num_blocks=64))
    with pytest.raises(SessionError, match="belongs to another namespace"):
        fresh.memory_sessions.import_(path, "b")
    other = Engine(make("infini", seed=1), EngineConfig(block_size=4, num_blocks=64))
    with pytest.raises(SessionError, match="came from another model or engine: model_fingerprint"):
        other.memory_sessions.import_(path, "a")
    wrong_block = Engine(model, EngineConfig(block_size=8, num_blocks=64))
    with pytest.raises(SessionError, match="block_size"):
        wrong_block.memory_sessions.import_(path, "a")
    manifest = path.with_name(path.name + ".json")
    meta = json.loads(manifest.read_text())
    meta["tokens"][0] = (meta["tokens"][0] + 1) % V                # an edited manifest
    manifest.write_text(json.dumps(meta))
    with pytest.raises(SessionError, match="fails its checksum"):
        fresh.memory_sessions.import_(path, "a")
    path = eng.memory_sessions.export("a", "s", tmp_path / "s.session")
    tensors = tmp_path / json.loads(manifest.read_text())["tensors"]
    data = bytearray(tensors.read_bytes())
    data[-1] ^= 0xFF                                                # a flipped bit in the tensors
    tensors.write_bytes(bytes(data))
    with pytest.raises(SessionError, match="checksum mismatch"):
        fresh.memory_sessions.import_(path, "a")
    with pytest.raises(SessionError, match="is missing"):
        fresh.memory_sessions.import_(tmp_path / "missing", "a")
    assert not fresh.memory_sessions.sessions


CHILD = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import torch
torch.set_num_threads(1)
from served import make
from memstack.engine import Engine, EngineConfig
from memstack.generate import SamplingConfig
from memstack.registry import MEMORIES
job = json.loads(sys.argv[2])
out = {}
for name in job["names"]:
    eng = Engine(make(name), EngineConfig(block_size=4, num_blocks=96))
    eng.memory_sessions.import_(f"{job['dir']}/{name}.session", "tenant-a")
    rid = eng.add_request(job["p2"], SamplingConfig(max_new_tokens=job["n2"]), session=("tenant-a", "chat"))
    while eng.has_unfinished():
        eng.step()
    out[name] = eng.requests[rid].output
print(json.dumps(out))
"""


def test_every_memory_session_survives_a_restart(tmp_path):
    """Export each memory's session after one request, import it in a new process, continue: the
    next tokens equal one uninterrupted run over the whole document."""
    p1, p2 = prompts(21, 9)
    n1, n2 = 8, 10
    want, names = {}, MEMORIES.names()
    for name in names:
        model = make(name)
        eng = Engine(model, EngineConfig(block_size=4, num_blocks=96))
        eng.memory_sessions.create("tenant-a", "chat")
        out1 = turn(eng, ("tenant-a", "chat"), p1, n1)
        eng.memory_sessions.export("tenant-a", "chat", tmp_path / f"{name}.session")
        want[name] = lib(model, p1 + out1 + p2, n2)
    job = json.dumps({"names": names, "dir": str(tmp_path), "p2": p2, "n2": n2})
    res = subprocess.run([sys.executable, "-c", CHILD, str(HERE), job], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got == want


def test_session_requests_survive_preemption_and_prefix_pins_are_refused():
    model = make("lm2")
    p1, p2, *others = prompts(10, 6, 14, 9, 12, seed=3)
    ref = Engine(model, EngineConfig(block_size=4, num_blocks=64))
    ref.memory_sessions.create("t", "s")
    out1 = turn(ref, ("t", "s"), p1, 6)
    eng = Engine(model, EngineConfig(block_size=4, num_blocks=14, max_num_batched_tokens=8))
    eng.memory_sessions.create("t", "s")
    assert turn(eng, ("t", "s"), p1, 6) == out1
    rid = eng.add_request(p2, SamplingConfig(max_new_tokens=12), session=("t", "s"))
    ids = [eng.add_request(p, SamplingConfig(max_new_tokens=12)) for p in others]
    while eng.has_unfinished():
        for o in eng.step():
            assert o.error is None, o.error
    assert sum(eng.requests[i].preemptions for i in ids + [rid]) >= 1
    assert eng.requests[rid].output == lib(model, p1 + out1 + p2, 12)
    assert [eng.requests[i].output for i in ids] == [lib(model, p, 12) for p in others]
    with pytest.raises(ValueError, match="memory state: use engine.memory_sessions"):
        eng.sessions.pin(list(range(8)))
