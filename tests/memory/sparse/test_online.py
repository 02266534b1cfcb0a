"""Online sparse updates: only table rows change (the backbone is frozen), SMF's TF-IDF slot
selection picks the rows, and the safety policy rejects NaN/Inf, over-norm and over-quota
updates whole -- table and optimizer state unchanged, every reason reported."""
from __future__ import annotations

import math

import pytest

import torch

from memstack.backbone.model import build_model
from memstack.config import BackboneConfig, ModelConfig
from memstack.memory.sparse.config import EngramConfig
from memstack.memory.sparse.online import OnlineUpdater, UpdatePolicy, background_frequencies, tfidf_scores
from memstack.memory.sparse.store import TableStore
from memstack.memory.sparse.table import NamespaceSpec, SparseTable

BB = BackboneConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, seg_len=16)


def _model():
    torch.manual_seed(0)
    return build_model(ModelConfig(BB, (EngramConfig(rows_per_head=13, heads=2, head_dim=4),)))


def test_tfidf_hand_values():
    tf, df = torch.tensor([3, 1, 0, 2]), torch.tensor([9, 0, 0, 4])
    got = tfidf_scores(tf, df, 9)
    want = torch.tensor([3 * math.log(10 / 10), 1 * math.log(10), 0.0, 2 * math.log(10 / 5)])
    torch.testing.assert_close(got, want)


def test_update_changes_only_top_t_table_rows_and_nothing_else(tmp_path):
    model = _model()
    table = model.memory.memories[0].table
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    bg = [torch.randint(0, 97, (4, 16))]
    df, n_docs = background_frequencies(model, table, bg)
    assert n_docs == 4 and df.max() <= 4 and df.sum() > 0
    store = TableStore(tmp_path / "s")
    store.create(table.weight.detach(), [s.__dict__ for s in table.specs])
    up = OnlineUpdater(model, table, lr=1e-2, top_t=6, background=(df, n_docs), store=store,
                       policy=UpdatePolicy(max_row_update_norm=10.0))
    x = torch.randint(0, 97, (2, 17))
    res = up.step(x[:, :-1], x[:, 1:])
    assert res.accepted and res.rows == 6 and res.touched > 6
    w = table.weight.detach()
    changed = (w != before["memory.memories.0.table.weight"]).any(1).nonzero().flatten()
    assert changed.numel() == 6
    # the 6 rows are the touched rows with the highest TF-IDF
    from memstack.memory.sparse.table import record_accesses

    with torch.no_grad(), record_accesses(table) as rec:
        model(x[:, :-1])
    touched = rec.counts.nonzero().flatten()
    score = tfidf_scores(rec.counts[touched], df[touched], n_docs)
    assert score[torch.isin(touched, changed)].min() >= score[~torch.isin(touched, changed)].max()
    for n, p in model.named_parameters():
        if n != "memory.memories.0.table.weight":
            assert torch.equal(p.detach(), before[n]), n          # backbone and projections frozen
    v = up.commit({"note": "t"})
    assert v == 2 and store.version(2).touched == 6 and torch.equal(store.load(), w)


def test_rejected_updates_leave_table_and_optimizer_state_unchanged():
    model = _model()
    table = model.memory.memories[0].table
    x = torch.randint(0, 97, (2, 17))
    up = OnlineUpdater(model, table, lr=10.0, optimizer="sgd", policy=UpdatePolicy(max_row_update_norm=1e-6))
    w0 = table.weight.detach().clone()
    res = up.step(x[:, :-1], x[:, 1:])
    assert not res.accepted and res.rows == 0
    assert "exceed the norm cap 1e-06" in res.reasons[0]
    assert torch.equal(table.weight.detach(), w0)
    up2 = OnlineUpdater(model, table, lr=1e-2, optimizer="adam", policy=UpdatePolicy(max_row_update_norm=None))
    with torch.no_grad():
        table.weight[0, 0] = float("nan")                         # a NaN row poisons its update
    x2 = torch.zeros(1, 17, dtype=torch.long)
    res = up2.step(x2[:, :-1], x2[:, 1:])
    assert not res.accepted and any("NaN/Inf" in r for r in res.reasons)
    assert torch.equal(up2.m, torch.zeros_like(up2.m)) and int(up2.steps.sum()) == 0


def test_explicit_writes_obey_quota_and_report_every_reason():
    t = SparseTable([NamespaceSpec("knowledge", 8), NamespaceSpec("user:alice", 4, "identity", write_quota=2)], dim=3)
    model = _model()
    up = OnlineUpdater(model, t, policy=UpdatePolicy(max_row_update_norm=5.0))
    w0 = t.weight.detach().clone()
    vals = torch.zeros(3, 3)
    vals[0, 0] = float("inf")
    vals[1] = 100.0
    alice = up._authority.grant("user:alice")              # the test plays the server that owns the authority
    res = up.write(alice, torch.tensor([0, 1, 2]), vals)
    assert not res.accepted and len(res.reasons) == 3
    assert "NaN/Inf" in res.reasons[0] and "norm cap 5.0" in res.reasons[1] and "write quota of 2" in res.reasons[2]
    assert torch.equal(t.weight.detach(), w0)
    ok = up.write(alice, torch.tensor([0, 1]), w0[8:10] + 0.1)
    assert ok.accepted and torch.allclose(t.weight.detach()[8:10], w0[8:10] + 0.1)
    assert not up.write(alice, torch.tensor([3]), w0[11:12]).accepted          # 3rd row since the last commit
    assert up.write("knowledge", torch.tensor([3]), w0[3:4] + 1).accepted             # other namespace: own quota


def _user_table():
    return SparseTable([NamespaceSpec("knowledge", 8), NamespaceSpec("user:alice", 4, "identity"),
                        NamespaceSpec("user:bob", 4, "identity")], dim=3)


def test_user_namespaces_need_their_grant():
    """Only the holder of user:bob's grant writes bob's rows: a name, alice's grant, a grant from
    another authority, an edited or hand-made grant are all refused and nothing is written."""
    from memstack.memory.sparse.grants import NamespaceAccessError, NamespaceAuthority, WriteGrant

    t, auth = _user_table(), NamespaceAuthority()
    up = OnlineUpdater(_model(), t, authority=auth, policy=UpdatePolicy(max_row_update_norm=None))
    w0 = t.weight.detach().clone()
    vals = torch.ones(2, 3)
    bob, alice = auth.grant("user:bob"), auth.grant("user:alice")
    forged = [("user:bob", "name"), (alice, "alice's"), (NamespaceAuthority().grant("user:bob"), "other key"),
              (WriteGrant("user:bob", alice.token), "alice's token"), (WriteGrant("user:bob", "0" * 64), "made up"),
              (WriteGrant("user:bob", bob.token.upper()), "edited")]
    for into, why in forged:
        if into == alice:
            assert up.write(into, torch.tensor([0, 1]), vals).accepted        # alice's grant writes alice only
            assert torch.equal(t.weight.detach()[12:16], w0[12:16])           # bob's rows untouched
            continue
        with pytest.raises(NamespaceAccessError):
            up.write(into, torch.tensor([0, 1]), vals)
        assert torch.equal(t.weight.detach()[12:16], w0[12:16]), why
    assert up.write(bob, torch.tensor([0, 1]), vals).accepted
    assert torch.equal(t.weight.detach()[12:14], vals)
    assert up.write("knowledge", torch.tensor([0]), vals[:1]).accepted   # the shared namespace: by name
    assert bob.token not in repr(bob) and "user:bob" in repr(bob)
    with pytest.raises(ValueError, match="shared namespace"):
        auth.grant("knowledge")
    with pytest.raises(ValueError, match="not 'knowledge'"):
        auth.grant("user:")
    # an updater built without an authority cannot open any user namespace
    with pytest.raises(NamespaceAccessError):
        OnlineUpdater(_model(), t).write(bob, torch.tensor([0]), vals[:1])


def test_a_step_writes_only_the_namespaces_it_is_given():
    """A gradient step writes the rows of `into` and leaves every other touched row (reported)."""
    model = _model()
    table = model.memory.memories[0].table
    up = OnlineUpdater(model, table, lr=1e-2, policy=UpdatePolicy(max_row_update_norm=None))
    w0 = table.weight.detach().clone()
    x = torch.randint(0, 97, (2, 17))
    res = up.step(x[:, :-1], x[:, 1:], into=[])                           # nothing opened: nothing written
    assert res.accepted and res.rows == 0 and res.withheld == res.touched > 0
    assert torch.equal(table.weight.detach(), w0)
    res = up.step(x[:, :-1], x[:, 1:])                                    # default: the shared namespace
    assert res.accepted and res.rows == res.touched > 0 and res.withheld == 0


def test_policy_and_updater_arguments_are_checked_like_configs():
    from memstack.errors import ConfigError

    for bad in (dict(max_row_update_norm=float("nan")), dict(max_row_update_norm=float("inf")),
                dict(max_row_update_norm=0.0), dict(quotas={"knowledge": 0}), dict(quotas={"knowledge": -3}),
                dict(quotas={"knowledge": 1.5}), dict(quotas={"knowledge": True}), dict(quotas={"nobody": 2})):
        with pytest.raises(ConfigError):
            UpdatePolicy(**bad)
    assert UpdatePolicy(max_row_update_norm=None, quotas={"knowledge": None, "user:a": 3}).quotas["user:a"] == 3
    with pytest.raises(ConfigError) as e:
        OnlineUpdater(_model(), _user_table(), lr=float("nan"), optimizer="sgdd", betas=(0.9, 1.0), eps=0.0, top_t=0)
    assert len(e.value.reasons) == 5
    assert "write_quota must be a positive integer" in NamespaceSpec("user:a", 4, "identity", write_quota=0).reasons()[0]


def test_an_explicit_none_quota_lifts_a_namespace_quota():
    t = SparseTable([NamespaceSpec("knowledge", 8, write_quota=1)], dim=3)
    w0 = t.weight.detach().clone()
    assert not OnlineUpdater(_model(), t).write("knowledge", torch.tensor([0, 1]), w0[:2] + 0.1).accepted
    up = OnlineUpdater(_model(), t, policy=UpdatePolicy(quotas={"knowledge": None}))
    assert up.write("knowledge", torch.tensor([0, 1]), w0[:2] + 0.1).accepted
