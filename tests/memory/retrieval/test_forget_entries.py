"""Forgetting a namespace's datastore entries (Datastore.forget, retrieval/namespaces.py) and reading
several namespaces at once (a user's and a task's): the forgotten entries are gone from memory
and from disk (crash-safe, retried), searches in that namespace return nothing, a served
retrieval memory's logits for it equal a never-taught namespace's, and every other namespace's
results are bit for bit what they were."""
from __future__ import annotations

import pytest
import torch

from memstack.backbone.model import build_model
from memstack.config import BackboneConfig, ModelConfig
from memstack.memory.retrieval.config import KNNLMConfig, StoreConfig
from memstack.memory.retrieval.store import Datastore

A, B, C = "tenant:acme/user:alice", "tenant:acme/user:bob", "tenant:acme/task:support"
NEVER = "tenant:acme/user:nobody"
D = 16


def store_of(backend: str) -> tuple[Datastore, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    st = Datastore(StoreConfig(dim=D, backend=backend), "test-keys", payload={"token": ("int64", ())}, text=True)
    keys = {}
    for ns, n, tok in ((A, 20, 5), (B, 20, 7), (C, 6, 9)):
        keys[ns] = torch.randn(n, D, generator=g)
        st.add(keys[ns], {"token": torch.full((n,), tok)}, namespace=ns, texts=[f"{ns} fact {i}" for i in range(n)])
    st.delete(st.ids[20:23])                                    # a few of bob's are tombstones already
    return st, keys


def same(r1, r2) -> bool:
    return torch.equal(r1.scores, r2.scores) and torch.equal(r1.ids, r2.ids) and torch.equal(r1.rows, r2.rows)


@pytest.mark.parametrize("backend", ["exact", "faiss_flat", "faiss_hnsw"])
def test_forget_removes_a_namespace_for_good_and_nobody_else_moves(backend, tmp_path):
    st, keys = store_of(backend)
    q = torch.randn(8, D, generator=torch.Generator().manual_seed(1))
    before = {ns: st.search(q, 5, ns) for ns in (B, C)}
    before_mixed = st.search(q, 5, [B, C] * 4)
    assert (st.search(q, 5, A).ids >= 0).all()
    assert st.forget(A) == 20
    assert st.count(A) == 0 and A not in st.namespaces and (st.search(q, 5, A).ids == -1).all()
    assert all(same(st.search(q, 5, ns), r) for ns, r in before.items()) and same(st.search(q, 5, [B, C] * 4), before_mixed)
    assert not st.keys[:20].any() and not st.payload("token")[:20].any() and not st.alive[:20].any()
    assert all(st.text(i) == "" for i in range(20))
    st.save(tmp_path / "s")
    back = Datastore.open(tmp_path / "s")
    assert back.count(A) == 0 and (back.search(q, 5, A).ids == -1).all() and len(back) == len(st)
    assert all(same(back.search(q, 5, ns), r) for ns, r in before.items())
    for k in keys[A]:                                           # not one of alice's keys or texts is on disk
        assert not (back.keys == k).all(-1).any()
    assert not any(A in back.text(i) for i in range(back.n_rows))
    assert st.forget(A) == 0                                    # nothing left to forget
    with pytest.raises(ValueError, match="forgotten"):
        st.add(torch.ones(1, D), {"token": torch.tensor([3])}, namespace=st.namespaces[0], texts=["x"])
    new = st.add(torch.ones(1, D), {"token": torch.tensor([3])}, namespace=A, texts=["again"])
    assert st.search(torch.ones(1, D), 3, A).ids[0].tolist() == [int(new[0]), -1, -1]   # a fresh namespace


def test_a_query_reads_the_union_of_its_namespaces():
    st, keys = store_of("exact")
    q = torch.randn(6, D, generator=torch.Generator().manual_seed(2))
    reads = [(A, C), A, (C,), (C, A), (B, C, A), (A, A)]
    got = st.search(q, 4, reads)
    live = st.alive
    ns_of = torch.tensor([st.namespaces.index(n) for n in [A] * 20 + [B] * 20 + [C] * 6])
    for i, r in enumerate(reads):
        r = (r,) if isinstance(r, str) else r
        ok = live & torch.isin(ns_of, torch.tensor([st.namespaces.index(n) for n in r]))
        s = (-((st.keys - q[i]) ** 2).sum(-1)).masked_fill(~ok, float("-inf"))
        ref_s, ref_rows = s.topk(4)
        assert got.rows[i].tolist() == ref_rows.tolist(), r
        torch.testing.assert_close(got.scores[i], ref_s, rtol=1e-5, atol=1e-4)
    assert torch.equal(got.ids[1], st.search(q[1:2], 4, A).ids[0])     # one name: exactly the plain search


def knn_model(path: str):
    torch.manual_seed(0)
    b = BackboneConfig(vocab_size=64, d_model=D, n_layers=2, n_heads=2, seg_len=32)
    cfg = KNNLMConfig(store=path, k=8, lmbda=0.9, temperature=50.0, cache_len=0)
    return build_model(ModelConfig(b, (cfg,))).eval()


def test_a_served_knn_lm_forgets_persistently_and_a_failed_save_is_retried(tmp_path, monkeypatch):
    g = torch.Generator().manual_seed(0)
    st = Datastore(StoreConfig(dim=D), "test-keys", payload={"token": ("int64", ())})
    for ns, tok in ((A, 5), (B, 7), (C, 9)):
        st.add(torch.randn(64, D, generator=g) * 3, {"token": torch.full((64,), tok)}, namespace=ns)
    st.save(tmp_path / "store")
    model = knn_model(str(tmp_path / "store"))
    mem = model.memory.memories[0]
    x = torch.randint(0, 64, (1, 12), generator=g).repeat(4, 1)             # one text, read as four namespaces

    def logits(names):
        with torch.no_grad():
            return model(x, None, namespaces=names)[0].logits

    names = (A, NEVER, B, (B, C))
    before = logits(names)
    assert not torch.equal(before[0], before[1]) and mem.holds(A) == 64
    assert mem.forget(A) == 64 and mem.holds(A) == 0
    after = logits(names)
    assert torch.equal(after[0], after[1])                     # alice reads like a user never taught
    assert torch.equal(after[1:], before[1:])                  # everyone else: bit for bit
    assert Datastore.open(tmp_path / "store").count(A) == 0 and A not in Datastore.open(tmp_path / "store").namespaces
    # a crash while writing the store back: the last good version stays readable; the retry persists
    import memstack.memory.retrieval.store_io as io

    real = io.save_tensors_versioned

    def crash(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(io, "save_tensors_versioned", crash)
    with pytest.raises(OSError):
        mem.forget(B)
    assert Datastore.open(tmp_path / "store").count(B) == 64 and mem.holds(B) == 0
    monkeypatch.setattr(io, "save_tensors_versioned", real)
    assert mem.forget(B) == 0                                  # already gone in memory ...
    assert Datastore.open(tmp_path / "store").count(B) == 0    # ... and now on disk
    assert Datastore.open(tmp_path / "store").count(C) == 64


def test_rag_keeps_lexical_walls_between_namespaces_and_forgets_its_passages(tmp_path):
    from memstack.data.tokenizers import get_tokenizer
    from memstack.memory.retrieval.config import RAGConfig
    from memstack.memory.retrieval.embedder import Embedder

    emb, tok = Embedder(), get_tokenizer("byte")
    texts = {A: ["Alice keeps a parrot named Kiwi.", "Alice lives in Lisbon by the river."],
             B: ["Bob studies zebra migration in Kenya.", "Bob plays the cello on Sundays."]}
    st = Datastore(StoreConfig(dim=emb.dim, metric="ip"), emb.fingerprint, payload={"passage": ("int64", ())}, text=True)
    for i, (ns, ts) in enumerate(texts.items()):
        st.add(emb.encode(ts), {"passage": torch.arange(2 * i, 2 * i + 2)}, namespace=ns, texts=ts)
    st.save(tmp_path / "psg")
    b = BackboneConfig(vocab_size=257, d_model=32, n_layers=2, n_heads=2, seg_len=32)
    eot = [tok.eot_id] * 24

    def prefix(mem, q, ns):
        return mem.passage_ids([q], [ns])[0]

    for method in ("bm25", "hybrid", "dense"):
        cfg = RAGConfig(store=str(tmp_path / "psg"), tokenizer="byte", k=1, passage_tokens=24, query_tokens=32,
                        method=method)
        mem = build_model(ModelConfig(b, (cfg,))).memory.memories[0]
        zebra = tok.encode(texts[B][0])[:24]
        assert prefix(mem, "zebra migration", B) == zebra
        assert prefix(mem, "zebra migration", A) != zebra                # alice never reads bob's passages
        assert prefix(mem, "zebra migration", (A, B)) == zebra           # a user + task row reads both
        assert prefix(mem, "parrot named Kiwi", A) == tok.encode(texts[A][0])[:24]
    assert mem.forget(A) == 2 and mem.holds(A) == 0
    assert prefix(mem, "parrot named Kiwi", A) == eot and prefix(mem, "zebra migration", B) == zebra
    assert not any(tok.decode(ids).startswith("Alice") for ids in mem._ids.values())
    cfg = RAGConfig(store=str(tmp_path / "psg"), tokenizer="byte", k=1, passage_tokens=24, query_tokens=32, method="bm25")
    again = build_model(ModelConfig(b, (cfg,))).memory.memories[0]            # a restarted server
    assert prefix(again, "parrot named Kiwi", A) == eot and prefix(again, "zebra migration", B) == zebra
