"""Per-request user namespaces for sparse tables, and learning while serving (engine/user_memory.py).

A request's namespace (the engine's per-row one) selects the user rows an Engram reads; one
user's learned rows change that user's logits and leave every other row of the same packed step
bit-identical. Learning is refused whole by the safety policy, rate-limited, versioned, guarded
against drift, exported/imported, and forgotten."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from memstack.backbone.model import build_model
from memstack.config import BackboneConfig, ModelConfig
from memstack.engine import Engine, EngineConfig
from memstack.engine.user_memory import LearnConfig, MemoryRefused, UserMemory
from memstack.errors import ConfigError
from memstack.generate import SamplingConfig
from memstack.memory.learned.config import PrefixConfig
from memstack.memory.sparse.config import EngramConfig, PKMConfig
from memstack.memory.sparse.table import namespace_reasons

V = 256
A, B, C = "tenant:acme/user:alice", "tenant:acme/user:bob", "tenant:beta/user:alice"


def model(seed: int = 0, **kw):
    torch.manual_seed(seed)
    b = BackboneConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, seg_len=64, init_std=0.3)
    cfg = EngramConfig(layers=(0,), heads=2, head_dim=8, rows_per_head=31, user_rows_per_head=13, **kw)
    return build_model(ModelConfig(b, (cfg,))).eval()


def pkm_model(seed: int = 0):
    torch.manual_seed(seed)
    b = BackboneConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, seg_len=64, init_std=0.3)
    cfg = PKMConfig(layers=(1,), n_keys=8, k_dim=8, heads=2, knn=4, user_values=True, out_init_std=0.3)
    return build_model(ModelConfig(b, (cfg,))).eval()


def prefix_model(seed: int = 0, **kw):
    torch.manual_seed(seed)
    b = BackboneConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, seg_len=64, init_std=0.3)
    cfg = PrefixConfig(**{"n_prefix": 0, "user_prefix": 4, "layers": (0, 1), **kw})
    return build_model(ModelConfig(b, (cfg,))).eval()


MODELS = {"engram": model, "pkm": pkm_model, "prefix": prefix_model}
FACT = [0] + list(b"my dog is called Rex.")
CANARY = [[0] + list(b"the quick brown fox jumps over the lazy dog"), [0] + list(b"a b c d e f g h i j")]


def memory(m, tmp_path, **kw):
    cfg = {"lr": 0.1, "steps": 6, "max_row_update_norm": 10.0, "drift_threshold": 10.0, **kw}
    return UserMemory(m, tmp_path / "users", LearnConfig(**cfg), CANARY)


def run_step_logits(eng, prompts, names):
    """Logits of one packed step: every prompt prefilled in the same forward call."""
    eng.record_logits = True
    ids = [eng.add_request(p, SamplingConfig(max_new_tokens=1), namespace=n) for p, n in zip(prompts, names)]
    eng.calls.clear()
    outs = eng.step()
    assert {o.request_id for o in outs} == set(ids) and eng.calls == [len(ids)]   # one forward, every row
    rows = [eng.requests[i].logits[-1].clone() for i in ids]
    for i in ids:
        eng.requests.pop(i)
    return rows


@pytest.fixture(params=list(MODELS))
def engine(request):
    """Hashed N-gram user rows (Engram), user value rows under product keys (PKM) and a user's
    identity rows read as a key/value prefix (Prefix): the engine and the learner name none."""
    # no prefix cache: a repeated prompt would reuse its own K/V (another computation path, equal
    # only to rounding); the cache is checked per namespace in its own test below
    eng = Engine(MODELS[request.param](),
                 EngineConfig(block_size=4, num_blocks=64, enable_prefix_caching=False))
    real = eng.runner.call
    eng.calls = []

    def counted(work, *a, **k):
        eng.calls.append(len(work))
        return real(work, *a, **k)
    eng.runner.call = counted
    return eng


def test_tenant_scoped_namespaces_are_table_namespaces():
    assert namespace_reasons(A) == [] and namespace_reasons("user:x") == [] and namespace_reasons("tenant:t/task:q") == []
    assert namespace_reasons("tenant:a/knowledge") and namespace_reasons("tenant:/user:x") and namespace_reasons("user:")


def test_one_users_rows_change_exactly_that_users_logits_in_a_packed_step(engine, tmp_path):
    mem = memory(engine.serving, tmp_path)
    p = [0] + list(b"my dog is called")
    prompts, names = [p, p, p, p], [A, B, None, C]       # alice, bob, no user, another tenant's "alice"
    before = run_step_logits(engine, prompts, names)
    assert all(torch.equal(before[0], r) for r in before[1:])   # nobody has rows yet: all read the same
    out = mem.learn(A, [FACT], mem.rows.install)
    assert out["version"] == 2 and out["rows_written"] > 0 and not out["rolled_back"]
    assert out["loss_last"] < out["loss_first"]
    after = run_step_logits(engine, prompts, names)
    assert not torch.equal(after[0], before[0])                  # alice's next request reads her new rows
    for r in (1, 2, 3):                                           # everyone else: exactly zero difference
        assert torch.equal(after[r], before[r]), names[r]
    # learning made alice's fact more likely for alice only
    rex = [0] + list(b"my dog is called R")
    lp = run_step_logits(engine, [rex, rex], [A, B])
    assert lp[0].log_softmax(-1)[ord("e")] > lp[1].log_softmax(-1)[ord("e")]


def test_cached_prefixes_are_never_shared_across_namespaces():
    eng = Engine(pkm_model(), EngineConfig(block_size=4, num_blocks=64))     # stateless: prefix caching on
    assert eng.prefix_caching
    p = [0] + list(b"my dog is called Rex and")
    hits = {}
    for who in (A, A, B, None, None):
        rid = eng.add_request(p, SamplingConfig(max_new_tokens=1), namespace=who)
        while not eng.requests[rid].finished:
            eng.step()
        hits.setdefault(who, []).append(eng.requests.pop(rid).cached_tokens)
    assert hits[A][0] == 0 and hits[A][1] > 0          # alice reuses her own K/V ...
    assert hits[B] == [0] and hits[None][0] == 0        # ... and nobody else does
    assert hits[None][1] > 0


def test_cached_prefixes_are_not_reused_across_versions_of_a_users_rows(tmp_path):
    """A user prefix at layer 0 changes the K/V of layer 1: blocks cached before the user's rows
    changed must not be read after (they would mix old and new rows)."""
    eng = Engine(prefix_model(), EngineConfig(block_size=4, num_blocks=64))     # stateless: prefix caching on
    assert eng.prefix_caching
    mem = memory(eng.serving, tmp_path, lr=1.0)
    p = [0] + list(b"my dog is called Rex and")

    def served(who):
        eng.record_logits = True
        rid = eng.add_request(p, SamplingConfig(max_new_tokens=1), namespace=who)
        while not eng.requests[rid].finished:
            eng.step()
        r = eng.requests.pop(rid)
        return r.cached_tokens, r.logits[-1].clone()
    assert served(A)[0] == 0 and served(A)[0] > 0           # unchanged rows: alice reuses her K/V
    mem.learn(A, [FACT], mem.rows.install)
    hits, got = served(A)
    assert hits == 0                                         # new rows: nothing cached under the old ones
    assert served(A)[0] > 0                                  # ... and the new version caches again
    fresh = Engine(eng.serving, EngineConfig(block_size=4, num_blocks=64, enable_prefix_caching=False))
    fresh.record_logits = True
    rid = fresh.add_request(p, SamplingConfig(max_new_tokens=1), namespace=A)
    while not fresh.requests[rid].finished:
        fresh.step()
    assert torch.allclose(got, fresh.requests[rid].logits[-1], atol=1e-5)
    mem.forget(A, lambda ns: {"tables_dropped": int(mem.rows.drop(ns))})
    assert mem.rows.version(A) == 0                          # forgotten: reads (and caches) as a user with no rows


def test_policy_refusal_changes_nothing(tmp_path):
    m = model()
    mem = memory(m, tmp_path, max_row_update_norm=1e-6)
    with pytest.raises(MemoryRefused) as e:
        mem.learn(A, [FACT], mem.rows.install)
    assert any("norm cap" in r for r in e.value.reasons)
    assert mem.rows.table(A) is None and not mem.store(A).exists     # nothing installed, nothing stored


def test_per_user_write_quota_refuses_the_whole_update(tmp_path):
    m = model(user_write_quota=5)                          # rows one update may write in a user's table
    mem = memory(m, tmp_path)
    with pytest.raises(MemoryRefused) as e:
        mem.learn(A, [FACT], mem.rows.install)
    assert any("write quota of 5" in r and A in r for r in e.value.reasons)
    assert mem.rows.table(A) is None and not mem.store(A).exists
    out = memory(model(user_write_quota=10_000), tmp_path / "big").learn(A, [FACT], lambda ns, t: None)
    assert 5 < out["rows_written"] <= 10_000


def test_bad_texts_and_rate_limit_are_refused_with_every_reason(tmp_path):
    m = model()
    mem = memory(m, tmp_path, rate_per_min=2, max_tokens=30, max_texts=2)
    with pytest.raises(MemoryRefused) as e:
        mem.learn(A, [[1], [0] * 31, [5, V + 3]], mem.rows.install)
    msg = " | ".join(e.value.reasons)
    assert "at most 2 texts" in msg and "at least 2 tokens" in msg and "exceeds max_tokens" in msg and "in [0, 256)" in msg
    mem.learn(A, [FACT], mem.rows.install)
    mem.learn(A, [FACT], mem.rows.install)
    with pytest.raises(MemoryRefused) as e:
        mem.learn(A, [FACT], mem.rows.install)
    assert e.value.status == 429 and "rate limit" in e.value.reasons[0]
    mem.learn(B, [FACT], mem.rows.install)                         # another user's budget is its own
    with pytest.raises(ConfigError):
        LearnConfig(lr=float("nan"), steps=0)


def test_drift_guard_rolls_back_the_users_rows(tmp_path):
    m = model()
    mem = UserMemory(m, tmp_path / "u", LearnConfig(lr=2.0, steps=6, max_row_update_norm=1000.0,
                                                    drift_threshold=0.01), CANARY)
    out = mem.learn(A, [[0] + list(b"z" * 25)], mem.rows.install)   # a degenerate text at a high lr: "z" everywhere
    assert out["canary_after"] > out["canary_before"] and out["rolled_back"]
    assert mem.rows.table(A) is None                                 # never installed
    log = mem.log(A)
    assert log["head"] == 1 and [v["version"] for v in log["versions"]] == [1, 2]   # v2 kept in the log, HEAD back


def test_log_rollback_export_import_forget(tmp_path):
    m = model()
    mem = memory(m, tmp_path)
    mem.learn(A, [FACT], mem.rows.install)
    w2 = mem.rows.table(A).weight.detach().clone()
    mem.learn(A, [[0] + list(b"my cat is called Tom.")], mem.rows.install)
    assert mem.log(A)["head"] == 3
    mem.rollback(A, 2, mem.rows.install)
    assert torch.equal(mem.rows.table(A).weight, w2)
    with pytest.raises(MemoryRefused):
        mem.rollback(A, 9, mem.rows.install)
    delta = mem.export(A)
    other = memory(model(), tmp_path / "other")                     # another server, same model
    got = other.import_(B, delta["data"], other.rows.install)
    assert got["head"] == 2 and torch.equal(other.rows.table(B).weight, w2)
    with pytest.raises(MemoryRefused):                              # HEAD is no longer the delta's base
        other.import_(B, delta["data"], other.rows.install)
    with pytest.raises(MemoryRefused):
        other.import_(C, delta["data"][:-8] + "AAAAAAA=", other.rows.install)
    out = mem.forget(A, lambda ns: {"tables_dropped": int(mem.rows.drop(ns))})
    assert out["tables_dropped"] == 1 and out["versions_removed"] == 3 and out["store_exists"] is False
    assert mem.rows.table(A) is None and mem.log(A) == {"head": None, "versions": []}
    assert not mem._dir(A).exists()


def test_restart_reads_what_was_learned_and_a_crash_leaves_the_last_version(tmp_path):
    m = model()
    mem = memory(m, tmp_path)
    mem.learn(A, [FACT], mem.rows.install)
    w = mem.rows.table(A).weight.detach().clone()
    script = (
        "import sys, torch; sys.path.insert(0, %r)\n"
        "from test_user_memory import model, memory, A\n"
        "from pathlib import Path\n"
        "mem = memory(model(), Path(%r)); mem.restore(mem.rows.install)\n"
        "mem.learn(A, [[0] + list(b'my cat is called Tom.')], mem.rows.install)\n"
    ) % (os.path.dirname(__file__), str(tmp_path))
    env = {**os.environ, "MEMSTACK_STORE_CRASH": "manifest"}
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, timeout=300)
    assert r.returncode == 86, r.stderr.decode()[-2000:]
    fresh = memory(model(), tmp_path)                                 # a restarted server
    assert fresh.restore(fresh.rows.install) == [A]
    assert torch.equal(fresh.rows.table(A).weight, w) and fresh.log(A)["head"] == 2
