"""Forgetting a namespace in the engine (engine/forget.py), tier by tier, and task namespaces read
together with a user's: a forgotten user's cached K/V (device pool, host and disk tiers),
requests and sessions are gone while every other user's stay bit for bit; a row reading
(user, task) reads both tables and nobody else changes."""
from __future__ import annotations

import pytest
import torch

from memstack.backbone.model import build_model
from memstack.config import BackboneConfig, ModelConfig
from memstack.engine import Engine, EngineConfig
from memstack.generate import SamplingConfig
from memstack.memory.kv.tiers import DiskTier
from memstack.memory.sparse.config import EngramConfig, PKMConfig

V = 256
A, B = "tenant:acme/user:alice", "tenant:acme/user:bob"
T, U = "tenant:acme/task:support", "tenant:beta/task:support"
P = [0] + list(b"my dog is called Rex and my cat is Tom")


def backbone():
    return BackboneConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, seg_len=64,
                          init_std=0.3)


def pkm_model():
    torch.manual_seed(0)
    cfg = PKMConfig(layers=(1,), n_keys=8, k_dim=8, heads=2, knn=4, user_values=True, out_init_std=0.3)
    return build_model(ModelConfig(backbone(), (cfg,))).eval()


def engram_model():
    torch.manual_seed(0)
    cfg = EngramConfig(layers=(0,), heads=2, head_dim=8, rows_per_head=31, user_rows_per_head=13)
    return build_model(ModelConfig(backbone(), (cfg,))).eval()


def run(eng, prompt, ns, n=1):
    rid = eng.add_request(prompt, SamplingConfig(max_new_tokens=n), namespace=ns)
    while not eng.requests[rid].finished:
        eng.step()
    return eng.requests.pop(rid)


def tagged(eng, ns):
    return {k: b.id for k, b in eng.pool.cached.items() if b.tag is not None and ns in b.tag}


def test_forget_drops_only_that_users_cached_blocks_in_every_tier(tmp_path):
    cfg = EngineConfig(block_size=4, num_blocks=64, host_cache_blocks=64, disk_cache_dir=str(tmp_path / "kv"))
    eng = Engine(pkm_model(), cfg)                         # stateless: prefix caching (and tiers) on
    assert eng.prefix_caching
    for ns in (A, B, None, (B, T)):
        run(eng, P, ns)
    eng.tiers.flush()
    mine, bobs, shared = tagged(eng, A), tagged(eng, B), {k: b.id for k, b in eng.pool.cached.items() if b.tag is None}
    assert len(mine) == len(P) // 4 and len(bobs) == 2 * (len(P) // 4) and len(shared) == len(P) // 4
    kv_bob = eng.cache.read_blocks(sorted(bobs.values())).clone()
    host_bob = {k: eng.tiers.host.buf[s].clone() for k, s in eng.tiers.host.where.items() if k in bobs}
    assert all(k in eng.tiers.host.where and k in eng.tiers.disk.index for k in mine)

    out = eng.forget(A)
    assert out["cached_blocks_dropped"] == len(mine) and out["kv_blocks_zeroed"] == len(mine)
    assert out["host_blocks_dropped"] == len(mine) and out["disk_blocks_dropped"] == len(mine)
    assert out["left"] == {"requests": 0, "memory_entries": 0, "sessions": 0, "cached_blocks": 0, "tier_blocks": 0}
    eng.pool.check()
    assert not any(k in eng.pool.cached or k in eng.tiers.host.where or k in eng.tiers.disk.index for k in mine)
    assert not eng.cache.read_blocks(sorted(mine.values())).any()          # its K/V bytes are zero
    # bob's (and the unsalted) blocks: the same blocks, the same bytes, still found
    assert tagged(eng, B) == bobs and {k: b.id for k, b in eng.pool.cached.items() if b.tag is None} == shared
    assert torch.equal(eng.cache.read_blocks(sorted(bobs.values())), kv_bob)
    assert all(torch.equal(eng.tiers.host.buf[eng.tiers.host.where[k]], v) for k, v in host_bob.items())
    # on disk: another process opening the tier finds bob's chunks and nothing of alice's (checked
    # before alice runs again below: her new blocks are cached and written to the tiers afresh)
    disk = DiskTier(tmp_path / "kv", eng.namespace, eng.spec.block_shape)
    assert all(k in disk.index for k in bobs) and not any(k in disk.index for k in mine) and not disk.refused
    assert run(eng, P, B).cached_tokens > 0 and run(eng, P, A).cached_tokens == 0


def sessions_and_requests(forget: bool):
    """Three sessions (alice's, bob's, bob's with a task), then alice and bob in flight; alice is
    forgotten (or, for the reference, merely aborted) after two steps; bob runs to the end."""
    eng = Engine(pkm_model(), EngineConfig(block_size=4, num_blocks=64, enable_prefix_caching=False))
    eng.record_logits = True
    ms = eng.memory_sessions
    for sid, ns in (("s-alice", A), ("s-bob", B), ("s-task", (B, T))):
        ms.create("acme", sid)
        run_on = eng.add_request(P[:9], SamplingConfig(max_new_tokens=2), namespace=ns, session=("acme", sid))
        while not eng.requests[run_on].finished:
            eng.step()
        eng.requests.pop(run_on)
    kept = ms.info("acme", "s-bob")
    ra = eng.add_request(P, SamplingConfig(max_new_tokens=12), namespace=A)
    rb = eng.add_request(P, SamplingConfig(max_new_tokens=12), namespace=B)
    eng.step()
    eng.step()
    out = eng.forget(A) if forget else eng.abort(ra)
    assert eng.requests[ra].finish_reason == "aborted" and not eng.requests[rb].finished
    while not eng.requests[rb].finished:
        eng.step()
    return eng, out, kept, eng.requests[rb].logits


def test_forget_aborts_that_users_requests_and_closes_its_sessions_only():
    _, _, _, ref = sessions_and_requests(forget=False)
    eng, out, kept, got = sessions_and_requests(forget=True)
    ms = eng.memory_sessions
    assert out["requests_aborted"] == 1 and out["sessions_closed"] == 1 and out["kv_blocks_zeroed"] > 0
    assert out["left"] == {"requests": 0, "memory_entries": 0, "sessions": 0, "cached_blocks": 0}
    assert set(ms.sessions) == {("acme", "s-bob"), ("acme", "s-task")} and ms.info("acme", "s-bob") == kept
    assert ms.get("acme", "s-task").namespaces == {B, T}
    assert len(got) == len(ref) == 12 and all(torch.equal(x, y) for x, y in zip(got, ref))   # bob: bit for bit
    assert eng.forget(T)["sessions_closed"] == 1 and set(ms.sessions) == {("acme", "s-bob")}


def step_logits(eng, prompts, names):
    eng.record_logits = True
    ids = [eng.add_request(p, SamplingConfig(max_new_tokens=1), namespace=n) for p, n in zip(prompts, names)]
    outs = eng.step()
    assert {o.request_id for o in outs} == set(ids)           # one step, every row
    rows = [eng.requests[i].logits[-1].clone() for i in ids]
    for i in ids:
        eng.requests.pop(i)
    return rows


@pytest.mark.parametrize("make", [engram_model, pkm_model])
def test_a_row_reads_its_users_and_its_tasks_rows_and_nobody_else_changes(make):
    eng = Engine(make(), EngineConfig(block_size=4, num_blocks=96, enable_prefix_caching=False))
    rows = next(m.namespace_rows() for m in eng.serving.memory.memories if m.namespace_rows() is not None)
    names = [(A, T), A, T, B, None, (B, U)]
    before = step_logits(eng, [P] * len(names), names)
    assert all(torch.equal(before[0], r) for r in before[1:])           # no tables yet: everyone reads the same
    g = torch.Generator().manual_seed(3)
    for ns in (A, T):
        rows.install(ns, torch.randn(rows.rows, rows.dim, generator=g))
    after = step_logits(eng, [P] * len(names), names)
    both, alice, task = after[:3]
    assert not torch.equal(both, alice) and not torch.equal(both, task) and not torch.equal(alice, task)
    assert not torch.equal(alice, before[1]) and not torch.equal(task, before[2])
    for r in (3, 4, 5):                            # bob, no user, bob with another tenant's task: exactly unchanged
        assert torch.equal(after[r], before[r]), names[r]
    rows.install(T, torch.zeros(rows.rows, rows.dim))              # an empty task table adds exactly nothing
    both, alice = step_logits(eng, [P, P], [(A, T), B])[0], step_logits(eng, [P, P], [A, B])[0]   # same row, step
    assert torch.equal(both, alice)
    # the add itself: base + user rows + task rows for the row reading both; others untouched
    base = torch.randn(3, 5, rows.dim, generator=g)
    local = torch.randint(0, rows.rows, (3, 5), generator=g)
    rows.install(T, torch.randn(rows.rows, rows.dim, generator=g))
    got = rows.add_to(base, [(A, T), None, B], local)
    want0 = base[0] + rows.table(A).weight[local[0]] + rows.table(T).weight[local[0]]
    assert torch.allclose(got[0], want0, atol=1e-6) and torch.equal(got[1], base[1]) and torch.equal(got[2], base[2])


def test_bad_namespaces_are_refused_with_every_reason():
    eng = Engine(pkm_model(), EngineConfig(block_size=4, num_blocks=32))
    for bad in ("", (), (A, ""), (A, 3), [A]):
        with pytest.raises(ValueError, match="namespace must be"):
            eng.add_request(P, SamplingConfig(max_new_tokens=1), namespace=bad)
    assert not eng.requests
