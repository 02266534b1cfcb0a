"""The table substrate: namespaces make cross-namespace access impossible, identity addressing
admits by frequency and expires by TTL, access recording counts lookups."""
from __future__ import annotations

import pytest
import torch

from memstack.memory.sparse.identity import IdentityIndex
from memstack.memory.sparse.table import NamespaceError, NamespaceSpec, SparseTable, record_accesses


def users_table() -> SparseTable:
    return SparseTable([NamespaceSpec("knowledge", 10, "hashed"), NamespaceSpec("user:alice", 4, "identity", write_quota=2),
                        NamespaceSpec("user:bob", 4, "identity"), NamespaceSpec("task:qa", 3, "product_key")], dim=5)


def test_namespaces_are_disjoint_ranges_and_reads_stay_inside():
    t = users_table()
    assert t.n_rows == 21 and t.weight.shape == (21, 5)
    alice, bob = t.namespace("user:alice"), t.namespace("user:bob")
    assert (alice.offset, bob.offset) == (10, 14)
    assert torch.equal(alice.read(torch.arange(4)), t.weight.detach()[10:14])
    assert torch.equal(bob.gather(torch.tensor([0, -1]))[1], torch.zeros(5))        # -1: a miss reads zeros
    for bad in ([4], [-2], [0, 17]):                                                 # bob's rows through alice: refused
        with pytest.raises(NamespaceError, match="outside namespace 'user:alice'"):
            alice.gather(torch.tensor(bad))
    with pytest.raises(NamespaceError):
        alice.read(torch.tensor([-1]))                                               # no miss where a row is required


def test_writes_through_one_namespace_never_touch_another():
    t = users_table()
    before = t.weight.detach().clone()
    t.namespace("user:alice").write_(torch.tensor([3, 0]), torch.ones(2, 5))
    after = t.weight.detach()
    assert torch.equal(after[[13, 10]], torch.ones(2, 5))
    changed = (after != before).any(1).nonzero().flatten().tolist()
    assert changed == [10, 13]
    with pytest.raises(NamespaceError):
        t.namespace("user:alice").write_(torch.tensor([4]), torch.ones(1, 5))       # = bob's row 0
    assert t.namespace_of(torch.tensor([0, 9, 10, 14, 20])) == ["knowledge", "knowledge", "user:alice", "user:bob", "task:qa"]


def test_bad_namespace_layouts_list_every_reason():
    with pytest.raises(NamespaceError) as e:
        SparseTable([NamespaceSpec("people", 0, "hashed"), NamespaceSpec("user:x y", 3, "magic"),
                     NamespaceSpec("task:a", 2), NamespaceSpec("task:a", 2)], dim=0)
    msg = str(e.value)
    for part in ("'people'", "rows must be >= 1", "'user:x y'", "'magic'", "appears 2 times", "dim must be >= 1"):
        assert part in msg
    with pytest.raises(NamespaceError, match="no namespace 'user:carol'"):
        users_table().namespace("user:carol")


def test_identity_admission_by_frequency_and_ttl_expiry():
    idx = IdentityIndex(rows=2, admit_after=2, ttl=3)
    assert idx.lookup([7, 7, 8], now=0).tolist() == [-1, -1, -1]       # one sighting each per call
    assert idx.lookup([7], now=1).tolist() == [0]                       # second sighting: admitted, slot 0
    assert idx.lookup([8, 9], now=1).tolist() == [1, -1]
    assert idx.lookup([9], now=2).tolist() == [-1]                      # full, nothing expired: refused
    assert idx.refused == 1
    idx.lookup([8], now=4)                                              # keeps 8 alive; 7 last seen at 1
    assert idx.lookup([9], now=5).tolist() == [0]                       # 7 expired (5 - 1 > 3): 9 takes slot 0
    assert idx.lookup([7], now=5, admit=False).tolist() == [-1]
    again = IdentityIndex.from_state_dict(idx.state_dict())
    assert again.lookup([8, 9], now=5, admit=False).tolist() == [1, 0]
    assert idx.forget(9) == 0 and idx.lookup([9], now=6, admit=False).tolist() == [-1]


def test_identity_keys_are_collision_free():
    idx = IdentityIndex(rows=1000)
    keys = torch.randint(0, 2**62, (1000,)).unique()
    slots = idx.lookup(keys)
    assert slots.min() >= 0 and slots.unique().numel() == keys.numel()


def test_access_recorder_counts_lookups_and_documents():
    t = users_table()
    ns = t.namespace("knowledge")
    with record_accesses(t) as rec:
        ns.gather(torch.tensor([1, 1, 2, -1]))
        rec.next_doc()
        ns.gather(torch.tensor([2]))
    assert rec.counts[:3].tolist() == [0, 2, 2] and int(rec.counts.sum()) == 4
    assert rec.docs[:3].tolist() == [0, 1, 2] and rec.n_docs == 2
    ns.gather(torch.tensor([5]))                                        # outside the block: not counted
    assert int(rec.counts.sum()) == 4
