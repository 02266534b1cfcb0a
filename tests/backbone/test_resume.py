"""The learner's shortcut (MemoryModel.run_until / resume, Memory.namespace_layer) against the
plain full forward: on tiny random backbones of awkward sizes and fresh random inputs, the loss,
the logits, the returned state and the gradient of a user's rows through the shortcut equal the
full forward's; an online update and a whole `UserMemory.learn` give the same rows and canary
losses with and without it; the cached canary "before" loss equals a fresh one."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from memstack.backbone.model import build_model
from memstack.config import BackboneConfig, ModelConfig
from memstack.engine.user_memory import LearnConfig, UserMemory, batch_of
from memstack.memory.base import Step
from memstack.memory.kv.config import DenseKVConfig
from memstack.memory.learned.config import PrefixConfig
from memstack.memory.sparse.config import EngramConfig, PKMConfig
from memstack.memory.sparse.grants import NamespaceAuthority
from memstack.memory.sparse.online import OnlineUpdater, UpdatePolicy
from memstack.memory.state import tensors

V = 263                     # a prime vocabulary
A, B, TASK = "tenant:t/user:a", "tenant:t/user:b", "tenant:t/task:x"


def backbone(n_layers: int = 5) -> BackboneConfig:
    return BackboneConfig(vocab_size=V, d_model=36, n_layers=n_layers, n_heads=3, n_kv_heads=1, d_ff=52,
                          seg_len=64, init_std=0.3)


def engram(layers=(3,), seed: int = 0, n_layers: int = 5):
    torch.manual_seed(seed)
    cfg = EngramConfig(layers=layers, orders=(2, 3), heads=3, head_dim=5, rows_per_head=29, user_rows_per_head=11,
                       value_init_std=0.3)
    return build_model(ModelConfig(backbone(n_layers), (cfg,))).eval()


def pkm(seed: int = 0):
    torch.manual_seed(seed)
    cfg = PKMConfig(layers=(2, 4), n_keys=7, k_dim=6, heads=2, knn=3, user_values=True, out_init_std=0.3)
    return build_model(ModelConfig(backbone(), (cfg,))).eval()


def user_prefix(seed: int = 0):
    torch.manual_seed(seed)
    cfg = PrefixConfig(n_prefix=2, reparam=False, user_prefix=3, layers=(2, 4))
    return build_model(ModelConfig(backbone(), (cfg,))).eval()


def frozen(m):
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def random_tables(m, names, seed):
    """Install a random (non-zero) table for each namespace of `names`; returns them."""
    g = torch.Generator().manual_seed(seed)
    rows = m.memory.memories[0].namespace_rows()
    out = {}
    for n in names:
        t = rows.new_table(n)
        with torch.no_grad():
            t.weight.copy_(torch.randn(t.weight.shape, generator=g))
        rows.install(n, t)
        out[n] = t
    return out


def batch(seed: int, b: int = 3, t: int = 11):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, V, (b, t), generator=g)
    y = torch.randint(0, V, (b, t), generator=g)
    y[0, -3:] = -100                                     # padding, as batch_of makes it
    return x, y


def loss_of(out, y):
    lg = out.logits
    return F.cross_entropy(lg.reshape(-1, lg.shape[-1]), y.reshape(-1), ignore_index=-100)


def test_namespace_layer_is_the_first_block_reading_a_namespace():
    assert engram((3,)).namespace_layer() == 3
    assert engram((1, 3)).namespace_layer() == 1
    assert pkm().namespace_layer() == 2
    assert user_prefix().namespace_layer() == 2          # identity rows read as keys/values from layer 2
    torch.manual_seed(0)
    plain = build_model(ModelConfig(backbone(), (EngramConfig(layers=(2,), heads=2, head_dim=4, rows_per_head=7),)))
    assert plain.namespace_layer() == 5                  # no user rows: nothing reads a namespace
    both = engram((3,)).with_memories([PKMConfig(layers=(1,), n_keys=4, k_dim=4, heads=1, knn=2, user_values=True)])
    assert both.namespace_layer() == 1                   # the least over the stack
    assert engram((3,)).with_memories([DenseKVConfig()]).namespace_layer() == 0   # undeclared: "anywhere"


@pytest.mark.parametrize("make", [lambda: engram((3,)), lambda: engram((1, 3)), pkm, user_prefix],
                         ids=["engram", "engram2", "pkm", "user_prefix"])
@pytest.mark.parametrize("seed", [1, 2])
def test_resume_equals_the_full_forward_loss_logits_state_and_gradient(make, seed):
    m = frozen(make())
    tables = random_tables(m, [A, B, TASK], seed)
    x, y = batch(seed)
    names = ((A, TASK), None, B)                         # a user with a task, no rows, another user
    k = m.namespace_layer()
    with torch.no_grad():
        run = m.run_until(x, k)
    full, st_full = m(x, None, Step(), namespaces=names)
    for _ in range(2):                                   # the run is reusable: each resume starts again
        for t in tables.values():
            t.weight.requires_grad_(True)
            t.weight.grad = None
        short, st_short = m.resume(run, namespaces=names)
        assert torch.equal(short.logits, full.logits)
        assert torch.equal(short.hidden, full.hidden)
        torch.testing.assert_close(st_short.pos, st_full.pos, rtol=0, atol=0)
        got, want = tensors(st_short.memories), tensors(st_full.memories)
        assert len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(got, want))
        loss_of(short, y).backward()
        g_short = {n: t.weight.grad.to_dense().clone() for n, t in tables.items()}
        for t in tables.values():
            t.weight.grad = None
        loss_of(m(x, None, Step(), namespaces=names)[0], y).backward()
        for n, t in tables.items():
            g = t.weight.grad.to_dense()
            assert g.abs().sum() > 0                     # the rows were read and get gradient
            torch.testing.assert_close(g_short[n], g, rtol=1e-6, atol=1e-7)


def test_resume_continues_a_document_from_its_state():
    """A second chunk of a document (Engram's N-gram history and conv state carried in): run_until
    with the state, then resume, equals the full forward of that chunk."""
    m = frozen(engram((1, 3)))
    random_tables(m, [A], 5)
    x, _ = batch(5, b=2, t=9)
    x2, y2 = batch(6, b=2, t=4)
    names = (A, A)
    _, st = m(x, None, Step(), namespaces=names)
    full, st_full = m(x2, st, Step(seg_start=False), namespaces=names)
    with torch.no_grad():
        run = m.run_until(x2, 1, state=st, step=Step(seg_start=False))
    short, st_short = m.resume(run, namespaces=names)
    assert torch.equal(short.logits, full.logits)
    assert torch.equal(st_short.pos, st_full.pos)
    got, want = tensors(st_short.memories), tensors(st_full.memories)
    assert len(got) == len(want) > 0 and all(torch.equal(a, b) for a, b in zip(got, want))
    assert not torch.equal(st_full.memories[0].history, st.memories[0].history)   # the state moved on


def test_resume_from_every_layer_at_or_below_the_namespace_layer():
    m = frozen(engram((3,)))
    random_tables(m, [B], 9)
    x, _ = batch(9, b=2, t=13)
    full = m(x, None, Step(), namespaces=(B, B))[0].logits
    for k in range(1, 4):
        with torch.no_grad():
            run = m.run_until(x, k)
        assert torch.equal(m.resume(run, namespaces=(B, B))[0].logits, full)
    with torch.no_grad():                                # the head alone, rows as started
        run = m.run_until(x, 5, namespaces=(B, B))
    assert torch.equal(m.resume(run)[0].logits, full)


def test_resume_refuses_what_would_not_equal_the_full_forward():
    m = frozen(engram((3,)))
    x, _ = batch(3)
    with torch.no_grad():
        above = m.run_until(x, 4)                        # block 3 reads the namespace: too late to change it
        at0 = m.run_until(x, 0)
    with pytest.raises(ValueError, match="resume it as it was started"):
        m.resume(above, namespaces=(A, A, A))
    with pytest.raises(ValueError, match="resume it as it was started"):
        m.resume(at0, namespaces=(A, A, A))          # layer 0 is "anywhere": no shortcut
    with pytest.raises(ValueError, match="one namespace per row"):
        with torch.no_grad():
            m.resume(m.run_until(x, 2), namespaces=(A,))
    with pytest.raises(ValueError, match="layer must be"):
        m.run_until(x, 6)
    with pytest.raises(TypeError):
        m.resume(x)
    assert torch.equal(m.resume(above)[0].logits, m(x, None, Step())[0].logits)   # unchanged namespaces: fine


def _updater(m, table, seed):
    auth = NamespaceAuthority(b"k" * 32)
    return OnlineUpdater(m, table, lr=0.3, policy=UpdatePolicy(max_row_update_norm=None), authority=auth), auth


@pytest.mark.parametrize("make", [lambda: engram((2,)), pkm], ids=["engram", "pkm"])
def test_online_updates_through_the_shortcut_equal_the_full_forward(make):
    results = []
    x, y = batch(11, b=2, t=10)
    for shortcut in (False, True):
        m = frozen(make())
        rows = m.memory.memories[0].namespace_rows()
        cand = rows.new_table(A)
        up, auth = _updater(m, cand, 0)
        with torch.no_grad():
            start = m.run_until(x, m.namespace_layer()) if shortcut else None
        losses = []
        with rows.staged(A, cand):
            for _ in range(4):
                res = up.step(x, y, into=[auth.grant(A)], namespace=A, start=start)
                assert res.accepted and res.rows > 0
                losses.append(res.loss)
        results.append((losses, cand.weight.detach().clone()))
    (l0, w0), (l1, w1) = results
    assert l0[-1] < l0[0]                                # it learned
    torch.testing.assert_close(torch.tensor(l1), torch.tensor(l0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(w1, w0, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="other tokens"):
        m2 = frozen(make())
        t = m2.memory.memories[0].namespace_rows().new_table(A)
        up, auth = _updater(m2, t, 0)
        with torch.no_grad():
            start = m2.run_until(x, m2.namespace_layer())
        up.step(x.flip(0), y, into=[auth.grant(A)], namespace=A, start=start)


CANARY = [[0] + list(b"the quick brown fox jumps over the lazy dog"), [0] + list(b"a b c d e f g h i j k")]


def test_learn_with_the_shortcut_equals_learn_without_and_caches_the_canary(tmp_path):
    texts = [[0] + list(b"my dog is called Rex."), [0] + list(b"I live in Lyon")]
    outs, weights = [], []
    for shortcut in (True, False):
        m = engram((3,))
        mem = UserMemory(m, tmp_path / f"u{shortcut}", LearnConfig(lr=0.2, steps=3, max_row_update_norm=None,
                                                                   drift_threshold=10.0), CANARY, shortcut=shortcut)
        assert mem.layer == (3 if shortcut else 0)       # off: the whole forward every time (the reference)
        got = [mem.learn(A, texts, mem.rows.install), mem.learn(A, texts[:1], mem.rows.install)]
        outs.append(got)
        weights.append(mem.rows.table(A).weight.detach().clone())
        # the cached "before" of the second learn is the first learn's "after", and it equals the
        # canary loss of the installed table computed afresh (the full forward)
        assert got[1]["canary_before"] == got[0]["canary_after"]
        x, y = batch_of(CANARY)
        with torch.no_grad():
            lg = m(x, None, Step(), namespaces=(A, A))[0].logits
        fresh = float(F.cross_entropy(lg.reshape(-1, V), y.reshape(-1), ignore_index=-100))
        assert got[1]["canary_after"] == pytest.approx(fresh, rel=1e-6)
    (s1, s2), (f1, f2) = outs
    for a, b in ((s1, f1), (s2, f2)):
        for key in ("loss_first", "loss_last", "canary_before", "canary_after"):
            assert a[key] == pytest.approx(b[key], rel=1e-6), key
        assert a["rows_written"] == b["rows_written"] and a["rolled_back"] is b["rolled_back"] is False
    torch.testing.assert_close(weights[0], weights[1], rtol=1e-5, atol=1e-6)


def test_a_replaced_table_is_not_read_from_the_cache(tmp_path):
    """After a rollback the installed table is another object: its canary loss is computed again."""
    m = engram((3,))
    mem = UserMemory(m, tmp_path / "u", LearnConfig(lr=0.5, steps=3, max_row_update_norm=None, drift_threshold=10.0),
                     CANARY)
    first = mem.learn(A, [[0] + list(b"my dog is called Rex.")], mem.rows.install)
    mem.learn(A, [[0] + list(b"my cat is called Tom.")], mem.rows.install)
    mem.rollback(A, 2, mem.rows.install)                 # back to the first learn's rows
    third = mem.learn(A, [[0] + list(b"my cow is called Ida.")], mem.rows.install)
    assert third["canary_before"] == pytest.approx(first["canary_after"], rel=1e-6)


def test_the_drift_guard_rolls_back_through_the_shortcut(tmp_path):
    """User A first learns the canary's own text (its canary loss falls a lot); then a degenerate
    text at a high lr overwrites rows the canary reads: the canary loss (through the shortcut,
    "before" from the cache) rises past the threshold, the rows go back to the first learn's and
    nothing is installed -- with the same figures as the reference path."""
    outs = []
    for shortcut in (True, False):
        m = engram((1, 3), seed=1)
        mem = UserMemory(m, tmp_path / f"g{shortcut}", LearnConfig(lr=0.5, steps=6, max_row_update_norm=None,
                                                                   drift_threshold=10.0), CANARY, shortcut=shortcut)
        first = mem.learn(A, CANARY, mem.rows.install)
        kept = mem.rows.table(A)
        w = kept.weight.detach().clone()
        assert first["canary_after"] < 0.8 * first["canary_before"]
        mem.cfg = dataclasses.replace(mem.cfg, lr=2.0, drift_threshold=0.01)
        out = mem.learn(A, [[0] + list(b"z" * 31)], mem.rows.install)
        assert out["canary_before"] == first["canary_after"]            # the cached (or recomputed) "before"
        assert out["rolled_back"] and out["drift"] > 0.01 and out["canary_after"] > out["canary_before"]
        assert mem.rows.table(A) is kept and torch.equal(kept.weight, w)   # nothing installed
        log = mem.log(A)
        assert log["head"] == 2 and [v["version"] for v in log["versions"]] == [1, 2, 3]
        assert torch.equal(mem.store(A).load(), w)                       # the store is back at the first learn
        outs.append(out)
    for key in ("loss_first", "loss_last", "canary_before", "canary_after", "drift"):
        assert outs[0][key] == pytest.approx(outs[1][key], rel=1e-5), key
