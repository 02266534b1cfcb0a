"""RAG pipeline: the real embedder and the real Wikipedia extracts on tiny slices; BM25, fusion,
re-ranking and the metrics against hand-computed values; passages in the generator's prompt."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from memstack.data.wiki import retrieval_eval_set, wiki_articles
from memstack.errors import AssetError
from memstack.memory.retrieval.rag import (BM25Retriever, DenseRetriever, RAGPipeline, Ranked, build_passage_store, rerank,
                                           retrieval_metrics, rrf)
from memstack.memory.retrieval.store import DatastoreError


@pytest.fixture(scope="module")
def embedder():
    from memstack.memory.retrieval.embedder import Embedder

    return Embedder()


@pytest.fixture(scope="module")
def slice_(embedder):
    passages, queries, gold = retrieval_eval_set()
    # 24 articles: the first 24 queries' targets and nothing else (the full set is a benchmark)
    sel = gold[:24]
    psg = [passages[i] for i in sel]
    store = build_passage_store(psg, embedder, progress=False)
    return psg, queries[:24], list(range(24)), store


def test_wiki_extracts_are_pinned_and_complete():
    arts = wiki_articles()
    assert len(arts) == 10_033
    passages, queries, gold = retrieval_eval_set()
    assert len(queries) == 9_862 and len(passages) == 10_033
    assert all(arts[g].description == q for g, q in zip(gold[:50], queries[:50]))


def test_embedder_is_real_and_refuses_other_weights(embedder):
    assert embedder.dim == 384 and "53aa51172d142c89" in embedder.fingerprint
    v = embedder.encode(["Tower in Paris, France", "Eiffel Tower is a wrought-iron lattice tower in Paris.",
                         "A genus of flowering plants."])
    assert torch.allclose(v.norm(dim=1), torch.ones(3), atol=1e-5)
    assert float(v[0] @ v[1]) > float(v[0] @ v[2]) + 0.2
    from memstack.memory.retrieval.embedder import Embedder, minilm_path

    with pytest.raises(AssetError, match="refusing other weights"):
        Embedder(minilm_path(), expect_sha256="0" * 64)


def test_dense_retrieval_on_a_real_slice(slice_, embedder):
    psg, queries, gold, store = slice_
    dense = DenseRetriever(store, embedder)
    m = retrieval_metrics(dense.search(queries, 10), gold)
    assert m["recall@10"] >= 0.9 and m["recall@1"] >= 0.5      # 48 candidates: far easier than 10,033
    other = build_passage_store(psg[:3], embedder, progress=False)
    other.fingerprint = "sentence-transformers:another-model"
    with pytest.raises(DatastoreError, match="not comparable"):
        DenseRetriever(other, embedder)


def test_bm25_ranks_by_rare_shared_terms():
    bm = BM25Retriever(["the cat sat on the mat", "dogs bark at night", "a cat and a dog", "quantum chromodynamics"])
    r = bm.search(["cat dog", "chromodynamics", "zebra"], 4)
    assert r.idx[0].tolist() == [2, 0, -1, -1]                   # both terms, then "cat"; no stemming: dogs != dog
    assert r.scores[0, 0] > r.scores[0, 1] > 0
    assert r.idx[1, 0] == 3 and (r.idx[1, 1:] == -1).all()       # nothing else matches
    assert (r.idx[2] == -1).all()


def test_rrf_and_rerank_hand_computed():
    a = Ranked(np.array([[0.9, 0.5, 0.1]]), np.array([[3, 1, 2]]))
    b = Ranked(np.array([[7.0, 2.0, -np.inf]]), np.array([[1, 4, -1]]))
    f = rrf([a, b], 3)
    # 1: 1/62 + 1/61; 3: 1/61; 4: 1/62; 2: 1/63
    assert f.idx[0].tolist() == [1, 3, 4]
    assert np.isclose(f.scores[0, 0], 1 / 62 + 1 / 61)
    pool = np.array([[3, 1, 2, 4]])
    ds = np.array([[0.9, 0.5, 0.1, 0.3]])
    bs = np.array([[0.0, 7.0, -np.inf, 2.0]])
    assert rerank(ds, bs, pool, 1.0, 4).idx[0].tolist() == [3, 1, 4, 2]     # dense order
    assert rerank(ds, bs, pool, 0.0, 2).idx[0].tolist() == [1, 4]           # BM25 order
    m = retrieval_metrics(Ranked(np.zeros((3, 3)), np.array([[5, 1, 2], [0, 7, 1], [1, 2, 3]])), [7, 7, 7])
    assert m["recall@1"] == 0 and np.isclose(m["recall@10"], 1 / 3) and np.isclose(m["mrr"], 1 / 6)


def test_pipeline_puts_passages_in_the_prompt_and_generates(slice_, embedder):
    from memstack.backbone.model import build_model
    from memstack.config import BackboneConfig, ModelConfig
    from memstack.data.tokenizers import get_tokenizer

    psg, queries, gold, store = slice_
    pipe = RAGPipeline(DenseRetriever(store, embedder), BM25Retriever(psg), pool=10, alpha=0.6)
    for method in ("dense", "bm25", "hybrid", "rerank"):
        r = pipe.retrieve(queries[:8], 5, method)
        assert r.idx.shape == (8, 5) and retrieval_metrics(r, gold[:8])["recall@10"] >= 0.6, method
    prompt = pipe.prompt(queries[0], k=2)
    top = pipe.retrieve([queries[0]], 2).idx[0]
    assert f"Passage 1: {psg[top[0]][:1500]}" in prompt and prompt.endswith(f"Question: {queries[0]}\nAnswer:")
    tok = get_tokenizer("byte")
    torch.manual_seed(0)
    model = build_model(ModelConfig(BackboneConfig(vocab_size=257, d_model=32, n_layers=1, n_heads=2, seg_len=64)))
    text = pipe.generate(model, tok, queries[0], k=1, max_new_tokens=5)
    assert isinstance(text, str)


def test_rag_memory_prepends_the_retrieved_passage(slice_, embedder, tmp_path):
    """The segment after a query reads [passage tokens; segment] exactly as a plain model reading
    that concatenation (RoPE is relative); the first segment gets <eot> padding."""
    from memstack.backbone.model import build_model
    from memstack.config import BackboneConfig, ModelConfig
    from memstack.data.tokenizers import get_tokenizer
    from memstack.memory.retrieval.config import RAGConfig

    psg, queries, gold, store = slice_
    store.save(tmp_path / "psg")
    tok = get_tokenizer("byte")
    bb = BackboneConfig(vocab_size=257, d_model=32, n_layers=2, n_heads=2, seg_len=32)
    torch.manual_seed(0)
    cfg = RAGConfig(store=str(tmp_path / "psg"), tokenizer="byte", k=1, passage_tokens=24, query_tokens=32)
    model = build_model(ModelConfig(bb, (cfg,))).eval()
    plain = build_model(ModelConfig(bb)).eval()
    plain.load_state_dict(model.state_dict(), strict=False)
    q = queries[3].encode()[:32].ljust(32, b" ")
    seg1, seg2 = torch.tensor([list(q)]), torch.randint(0, 256, (1, 32))
    mem = model.memory.memories[0]
    with torch.no_grad():
        out1, st = model(seg1)
        out2, _ = model(seg2, st)
        pids = mem.passage_ids([tok.decode(list(q))])[0]
        assert pids == mem.passage_ids([queries[3].ljust(32)[:32]])[0]
        ref2 = plain(torch.cat([torch.tensor([pids]), seg2], 1))[0].logits[:, 24:]
        ref1 = plain(torch.cat([torch.full((1, 24), tok.eot_id), seg1], 1))[0].logits[:, 24:]
    top = mem.pipeline.retrieve([tok.decode(list(q))], 1, "dense").idx[0, 0]
    assert pids[:24] == tok.encode(psg[top])[:24]
    torch.testing.assert_close(out2.logits, ref2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out1.logits, ref1, atol=1e-5, rtol=1e-5)
