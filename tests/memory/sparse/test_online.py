"""Online sparse updates: only table rows change (the backbone is frozen), SMF's TF-IDF slot
selection picks the rows, and the safety policy rejects NaN/Inf, over-norm and over-quota
updates whole -- table and optimizer state unchanged, every reason reported."""
from __future__ import annotations

import math

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
    res = up.write("user:alice", torch.tensor([0, 1, 2]), vals)
    assert not res.accepted and len(res.reasons) == 3
    assert "NaN/Inf" in res.reasons[0] and "norm cap 5.0" in res.reasons[1] and "write quota of 2" in res.reasons[2]
    assert torch.equal(t.weight.detach(), w0)
    ok = up.write("user:alice", torch.tensor([0, 1]), w0[8:10] + 0.1)
    assert ok.accepted and torch.allclose(t.weight.detach()[8:10], w0[8:10] + 0.1)
    assert not up.write("user:alice", torch.tensor([3]), w0[11:12]).accepted          # 3rd row since the last commit
    assert up.write("knowledge", torch.tensor([3]), w0[3:4] + 1).accepted             # other namespace: own quota
