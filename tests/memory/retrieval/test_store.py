"""The datastore: search against brute force on every backend, online insert / delete /
compaction, namespaces, persistence, and refusal of bad input with the store unchanged."""
from __future__ import annotations

import json

import pytest
import torch

import memstack.memory.retrieval.store_io as store_io
from memstack.memory.retrieval.config import StoreConfig
from memstack.memory.retrieval.store import Datastore, DatastoreError
from memstack.ops.knn import knn_search_ref

BACKENDS = ["exact", "faiss_flat", "faiss_ivf", "faiss_hnsw"]
D = 16


def cfg(backend: str, **kw) -> StoreConfig:
    base = dict(dim=D, backend=backend, nlist=4, nprobe=4, train_min=64, hnsw_m=16, ef_search=64, compact_at=0.0)
    return StoreConfig(**{**base, **kw})


def make(backend: str, n: int = 200, **kw) -> tuple[Datastore, torch.Tensor]:
    s = Datastore(cfg(backend, **kw), "test-embedder:1", payload={"token": ("int64", ())})
    keys = torch.randn(n, D)
    s.add(keys, {"token": torch.arange(n)}, doc=torch.arange(n) // 10)
    return s, keys


def brute(keys, q, k, metric="l2", valid=None):
    return knn_search_ref(q, keys, k, metric, valid)


@pytest.mark.parametrize("metric", ["l2", "ip"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_search_matches_brute_force(backend, metric):
    s, keys = make(backend, metric=metric)
    q = torch.randn(12, D)
    res = s.search(q, 5)
    bs, bi = brute(keys, q, 5, metric)
    if backend in ("exact", "faiss_flat"):
        assert torch.equal(res.ids, bi)
    else:  # approximate stage 1 (nprobe = nlist here / a well-connected small graph): near-perfect recall
        recall = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(res.ids, bi)) / bi.numel()
        assert recall >= 0.95
    # two-stage: whatever came back carries its exact score
    exact = -((q[:, None] - keys[res.ids.clamp(min=0)]) ** 2).sum(-1) if metric == "l2" else (q[:, None] * keys[res.ids]).sum(-1)
    torch.testing.assert_close(res.scores, exact, atol=1e-4, rtol=1e-5)
    assert bool((res.scores[:, :-1] >= res.scores[:, 1:]).all())
    assert torch.equal(s.payload("token")[res.rows], res.ids)   # payload rides along with the row


@pytest.mark.parametrize("backend", BACKENDS)
def test_delete_compact_keep_ids_and_results(backend):
    s, keys = make(backend)
    q = torch.randn(8, D)
    gone = torch.arange(0, 200, 3)
    s.delete(gone)
    assert len(s) == 200 - len(gone)
    alive = torch.ones(200, dtype=torch.bool)
    alive[gone] = False
    _, bi = brute(keys, q, 6, valid=alive)
    res = s.search(q, 6)
    assert not set(res.ids.flatten().tolist()) & set(gone.tolist())
    if backend in ("exact", "faiss_flat"):
        assert torch.equal(res.ids, bi)
    expect_tomb = len(gone) if s.caps.remove == "tombstone" else len(gone)
    assert s.n_tombstones == expect_tomb
    s.compact()
    assert s.n_tombstones == 0 and s.n_rows == len(s) == 200 - len(gone)
    after = s.search(q, 6)
    if backend in ("exact", "faiss_flat"):
        assert torch.equal(after.ids, bi)                         # ids survive compaction
    assert torch.equal(s.payload("token")[after.rows.clamp(min=0)], after.ids)
    new = s.add(torch.randn(3, D), {"token": torch.tensor([7, 8, 9])})
    assert new.tolist() == [200, 201, 202]                        # ids never reused


def test_auto_compaction_by_tombstone_fraction():
    s, _ = make("faiss_hnsw", compact_at=0.2)
    s.delete(torch.arange(30))
    assert s.n_tombstones == 30
    s.delete(torch.arange(30, 50))                                # 50 / 200 > 0.2
    assert s.n_tombstones == 0 and s.n_rows == 150


def test_ivf_buffers_until_trained_then_indexes():
    s = Datastore(cfg("faiss_ivf", train_min=100), "e", payload={})
    k1 = torch.randn(60, D)
    s.add(k1)
    idx = s._index[0]
    assert not idx.trained and idx.ntotal == 60
    q = torch.randn(4, D)
    assert torch.equal(s.search(q, 3).ids, brute(k1, q, 3)[1])   # the tail is searched exactly
    s.add(torch.randn(60, D))
    assert idx.trained and idx.ntotal == 120


@pytest.mark.parametrize("backend", BACKENDS)
def test_namespaces_never_mix(backend):
    s = Datastore(cfg(backend, train_min=40), "e", payload={"token": ("int64", ())})
    alice, bob = torch.randn(80, D), torch.randn(80, D)
    ida = s.add(alice, {"token": torch.zeros(80, dtype=torch.long)}, namespace="alice")
    idb = s.add(bob, {"token": torch.ones(80, dtype=torch.long)}, namespace="bob")
    # queries that sit exactly on Bob's entries, asked in Alice's namespace
    res = s.search(bob[:10], 20, namespace="alice")
    assert set(res.ids.flatten().tolist()) <= set(ida.tolist())
    assert bool((s.payload("token")[res.rows] == 0).all())
    mixed = s.search(torch.cat([bob[:3], alice[:3]]), 5, namespace=["alice"] * 3 + ["bob"] * 3)
    assert set(mixed.ids[:3].flatten().tolist()) <= set(ida.tolist())
    assert set(mixed.ids[3:].flatten().tolist()) <= set(idb.tolist())
    assert bool((s.search(alice[:2], 3, namespace="carol").ids == -1).all())   # unknown namespace: nothing
    with pytest.raises(DatastoreError, match="do not belong to namespace 'alice'"):
        s.delete(idb[:2], namespace="alice")
    assert len(s) == 160


@pytest.mark.parametrize("backend", BACKENDS)
def test_exclude_document(backend):
    s, keys = make(backend)
    q = keys[:4] + 0.01 * torch.randn(4, D)                       # each query sits on an entry of doc 0
    res = s.search(q, 5, exclude_doc=torch.tensor([0, 0, -1, 3]))
    doc = s.doc[res.rows]
    assert not bool((doc[:2] == 0).any()) and not bool((doc[3] == 3).any())
    assert res.ids[2, 0] == 2                                      # -1: no exclusion


@pytest.mark.parametrize("backend", BACKENDS)
def test_save_open_round_trip(backend, tmp_path):
    s, keys = make(backend)
    s.delete(torch.arange(5))
    q = torch.randn(6, D)
    before = s.search(q, 4)
    s.save(tmp_path / "st")
    t = Datastore.open(tmp_path / "st", expect_fingerprint="test-embedder:1")
    after = t.search(q, 4)
    assert torch.equal(before.ids, after.ids) and torch.equal(before.scores, after.scores)
    assert (len(t), t.next_id, t.n_tombstones) == (len(s), s.next_id, s.n_tombstones)
    assert t.add(torch.randn(1, D), {"token": torch.tensor([1])}).tolist() == [200]


def test_text_payload_round_trip(tmp_path):
    s = Datastore(cfg("exact"), "e", payload={"passage": ("int64", ())}, text=True)
    texts = ["Tour Eiffel — Paris", "", "naïve café ✓"]
    s.add(torch.randn(3, D), {"passage": torch.arange(3)}, texts=texts)
    s.delete([1])
    s.compact()
    s.save(tmp_path / "t")
    t = Datastore.open(tmp_path / "t")
    assert [t.text(i) for i in range(t.n_rows)] == [texts[0], texts[2]]


def test_store_from_another_model_is_refused(tmp_path):
    s, _ = make("exact")
    s.save(tmp_path / "st")
    with pytest.raises(DatastoreError, match="another model or embedder"):
        Datastore.open(tmp_path / "st", expect_fingerprint="test-embedder:2")


def test_corrupted_file_is_refused(tmp_path):
    s, _ = make("faiss_hnsw")
    s.save(tmp_path / "st")
    f = next((tmp_path / "st").glob("store-*.safetensors"))
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(DatastoreError, match="SHA-256"):
        Datastore.open(tmp_path / "st")
    (tmp_path / "st" / "manifest.json").write_text("{not json")
    with pytest.raises(DatastoreError, match="corrupted"):
        Datastore.open(tmp_path / "st")


def test_crash_mid_save_keeps_last_good_version(tmp_path, monkeypatch):
    s, _ = make("faiss_flat")
    s.save(tmp_path / "st")
    q = torch.randn(3, D)
    good = s.search(q, 3).ids
    s.add(torch.randn(50, D), {"token": torch.zeros(50, dtype=torch.long)})

    def crash(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(store_io, "write_sealed", crash)
    with pytest.raises(OSError):
        s.save(tmp_path / "st")
    t = Datastore.open(tmp_path / "st")
    assert len(t) == 200 and torch.equal(t.search(q, 3).ids, good)


def _snapshot(s: Datastore, q):
    r = s.search(q, 5)
    return len(s), s.n_rows, s.next_id, s.n_tombstones, r.ids.clone(), r.scores.clone()


def _same(a, b):
    assert a[:4] == b[:4] and torch.equal(a[4], b[4]) and torch.equal(a[5], b[5])


@pytest.mark.parametrize("backend", ["exact", "faiss_ivf"])
def test_bad_add_lists_every_reason_and_changes_nothing(backend):
    s, _ = make(backend)
    q = torch.randn(4, D)
    snap = _snapshot(s, q)
    with pytest.raises(DatastoreError) as e:
        s.add(torch.randn(3, D + 1), {"tokn": torch.zeros(3)}, doc=[0.5, 1.5, 2.5])
    msg = str(e.value)
    assert len(e.value.reasons) == 4, msg       # dimension, missing column, unknown column, float doc ids
    assert f"(n, {D})" in msg and "'token' is missing" in msg and "'tokn' is not a column" in msg
    with pytest.raises(DatastoreError, match="floating point"):
        s.add(torch.zeros(2, D, dtype=torch.long), {"token": torch.zeros(2, dtype=torch.long)})
    bad = torch.randn(2, D)
    bad[1, 3] = float("nan")
    with pytest.raises(DatastoreError, match="NaN"):
        s.add(bad, {"token": torch.zeros(2, dtype=torch.long)})
    with pytest.raises(DatastoreError, match="must be int64"):
        s.add(torch.randn(2, D), {"token": torch.zeros(2, dtype=torch.int32)})
    with pytest.raises(DatastoreError, match="shape"):
        s.search(torch.randn(2, D - 1), 3)
    _same(snap, _snapshot(s, q))


def test_bad_delete_lists_every_reason_and_deletes_nothing():
    s, _ = make("faiss_flat")
    q = torch.randn(4, D)
    s.delete([3])
    snap = _snapshot(s, q)
    with pytest.raises(DatastoreError) as e:
        s.delete([1, 2, 999, 3, 2])
    assert len(e.value.reasons) == 3, str(e.value)   # unknown 999, 3 already deleted, duplicate 2
    assert "999" in str(e.value) and "already deleted [3]" in str(e.value)
    _same(snap, _snapshot(s, q))
    with pytest.raises(DatastoreError, match="integers"):
        s.delete(torch.tensor([1.0]))


def test_bad_store_configs_list_every_reason():
    from memstack.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        StoreConfig(dim=0, backend="annoy", nlist=0, compact_at=1.5)
    assert len(e.value.reasons) == 4
    with pytest.raises(DatastoreError) as e:
        Datastore(StoreConfig(dim=4), "", payload={"x": ("float8", ())})
    assert len(e.value.reasons) == 2


def test_manifest_of_another_format_is_refused(tmp_path):
    s, _ = make("exact")
    s.save(tmp_path / "st")
    mf = tmp_path / "st" / "manifest.json"
    meta = json.loads(mf.read_text())
    meta["format"] = 99
    mf.write_text(json.dumps(meta))
    with pytest.raises(DatastoreError, match="format 99"):
        Datastore.open(tmp_path / "st")


# ------------------------------------------------------------------------------- the fast search path
@pytest.mark.parametrize("metric", ["l2", "ip"])
@pytest.mark.parametrize("backend", ["faiss_flat", "faiss_ivf", "faiss_hnsw"])
@pytest.mark.parametrize("case", ["plain", "tombstones", "exclude", "namespaces", "float16", "candidates", "short"])
def test_fast_search_equals_the_reference_path(backend, metric, case):
    """`search` on one namespace takes the numpy fast path; the torch path (`_search_faiss`,
    over-fetching 4k candidates and re-scoring them on the stored keys) is its reference."""
    kw = {"dtype": "float16"} if case == "float16" else {}
    s, keys = make(backend, n=60 if case == "short" else 200, metric=metric, **kw)
    if case == "namespaces":
        s.add(torch.randn(50, D), {"token": torch.arange(50)}, namespace="other")
    if case == "tombstones":
        s.delete(torch.arange(0, 200, 3))
    q = torch.randn(7, D)
    excl = torch.tensor([0, 3, -1, 5, 19, 2, 7]) if case == "exclude" else None
    k = 50 if case == "short" else 5
    cand = 13 if case == "candidates" else None
    got = s.search(q, k, exclude_doc=excl, candidates=cand)
    codes = torch.zeros(7, dtype=torch.long)
    ref = s._search_faiss(q, k, codes, excl, cand)
    assert torch.equal(got.ids, ref.ids) and torch.equal(got.rows, ref.rows)
    torch.testing.assert_close(got.scores, ref.scores, atol=1e-4, rtol=1e-5)
    assert got.scores.dtype == torch.float32 and got.ids.dtype == torch.int64
    if case == "tombstones":
        assert not bool(torch.isin(got.ids, torch.arange(0, 200, 3)).any())
    if case == "exclude":
        docs = s.doc[got.rows.clamp(min=0)]
        assert not bool(((docs == excl[:, None]) & (got.rows >= 0)).any())


def test_fast_search_falls_back_to_validation_on_bad_input():
    s, _ = make("faiss_hnsw")
    bad = torch.randn(2, D)
    bad[1, 3] = float("nan")
    with pytest.raises(DatastoreError, match="NaN"):
        s.search(bad, 3)
    with pytest.raises(DatastoreError, match="k must be"):
        s.search(torch.randn(2, D), 0)
    with pytest.raises(DatastoreError, match="exclude_doc must have shape"):
        s.search(torch.randn(2, D), 3, exclude_doc=torch.tensor([1, 2, 3]))
    # float64 queries and per-query namespaces take the validating torch path and agree with the fast one
    q = torch.randn(3, D)
    fast = s.search(q, 4)
    assert torch.equal(s.search(q.double(), 4).ids, fast.ids)
    assert torch.equal(s.search(q, 4, namespace=["default"] * 3).ids, fast.ids)
    assert s.search(q, 4, namespace="nobody").ids.eq(-1).all()
