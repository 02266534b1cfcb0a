"""Open-domain QA harness: the pinned WikiQA-templates set, EM/F1, and RAG-Sequence / RAG-Token /
ATLAS on a tiny random backbone with the real MiniLM retriever over a slice of the real
extracts -- losses against brute force from plain forward passes, gradient into the query
encoder only where it should go, k = 1 collapsing RAG-Token onto RAG-Sequence."""
from __future__ import annotations

import math

import pytest
import torch

from memstack.backbone.model import build_model
from memstack.config import BackboneConfig
from memstack.data.wiki import wiki_articles
from memstack.data.wiki_qa import WIKI_QA_SHA256, build_wiki_qa, first_sentence, qa_sha256, qa_split, split_of, wiki_qa
from memstack.errors import ConfigError
from memstack.evals.open_qa import OpenQA, OpenQAConfig, score
from memstack.evals.qa_metrics import exact_match, f1_score, normalize_answer
from memstack.memory.retrieval import marginal


# ------------------------------------------------------------------------------ the question set
def test_question_set_is_pinned_and_every_answer_is_a_span_of_its_passage():
    items = wiki_qa()
    assert qa_sha256(list(items)) == WIKI_QA_SHA256 and len(items) == 1071
    arts = wiki_articles()
    for it in items:
        text = arts[it.passage].extract
        assert text[it.offset:it.offset + len(it.answers[0])] == it.answers[0]
        assert it.offset < len(first_sentence(text))                 # built from the first sentence
        assert it.split == split_of(it.title)
        assert it.answers[0].lower() not in it.question.lower().split()
    by_split = {s: [it for it in items if it.split == s] for s in ("train", "validation", "test")}
    assert {s: len(v) for s, v in by_split.items()} == {"train": 656, "validation": 167, "test": 248}
    titles = {s: {it.title for it in v} for s, v in by_split.items()}
    assert not (titles["train"] & titles["test"]) and not (titles["validation"] & titles["test"])   # split by article
    assert [it.id for it in qa_split("test", 5)] == [it.id for it in qa_split("test")[:5]]


def test_templates_on_handwritten_sentences():
    from memstack.data.wiki import WikiArticle

    arts = [WikiArticle("Argon", "Argon is a chemical element; it has symbol Ar and atomic number 18. It is a gas.", "", "Physical sciences"),
            WikiArticle("Jaws (film)", "Jaws is a 1975 American thriller film directed by Steven Spielberg. It was a hit.", "", "Arts"),
            WikiArticle("Nobody", "Nobody is a word.", "", "Everyday life")]
    got = {(it.template, it.question, it.answers[0]) for it in build_wiki_qa(arts)}
    assert got == {("element_number", "What is the atomic number of Argon?", "18"),
                   ("element_symbol", "What is the chemical symbol of Argon?", "Ar"),
                   ("element_by_number", "Which chemical element has atomic number 18?", "Argon"),
                   ("element_by_symbol", "Which chemical element has the symbol Ar?", "Argon"),
                   ("director", "Who directed the film Jaws?", "Steven Spielberg"),
                   ("film_year", "In what year was the film Jaws released?", "1975"),
                   ("film_by_director", "Which 1975 film was directed by Steven Spielberg?", "Jaws")}


def test_metrics_follow_squad_normalisation():
    assert normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
    assert exact_match("the Paris.", ["Paris"]) == 1.0 and exact_match("Paris France", ["Paris"]) == 0.0
    assert math.isclose(f1_score("Paris France", ["Paris"]), 2 * 0.5 * 1.0 / 1.5)
    assert f1_score("", ["Paris"]) == 0.0 and f1_score("x", ["y", "x"]) == 1.0
    s = score(wiki_qa()[:2], [wiki_qa()[0].answers[0], "nothing"], [[wiki_qa()[0].passage], [0]])
    assert s["em"] == 50.0 and s["recall_at_k"] == 50.0 and s["questions"] == 2


def test_config_lists_every_reason():
    with pytest.raises(ConfigError) as e:
        OpenQAConfig(system="x", k=0, temperature=float("nan"), train_layers=-1)
    msg = str(e.value)
    assert all(s in msg for s in ("system must be", "k must be", "temperature must be", "train_layers must be"))
    with pytest.raises(ConfigError, match="retrieves nothing"):
        OpenQAConfig(system="oracle", retriever="query")


# ------------------------------------------------------------------------------ systems on a tiny backbone
@pytest.fixture(scope="module")
def embedder():
    from memstack.memory.retrieval.embedder import Embedder

    return Embedder()


@pytest.fixture(scope="module")
def world(embedder):
    """A store of 24 real passages: the gold passages of 8 test questions and 16 others."""
    from memstack.memory.retrieval.config import StoreConfig
    from memstack.memory.retrieval.store import Datastore

    items = qa_split("test", 8)
    arts = wiki_articles()
    pids = sorted({it.passage for it in items} | set(range(16)))
    store = Datastore(StoreConfig(dim=embedder.dim, metric="ip"), embedder.fingerprint, payload={"passage": ("int64", ())}, text=True)
    texts = [arts[p].extract for p in pids]
    store.add(embedder.encode(texts), {"passage": torch.tensor(pids)}, texts=texts)
    from memstack.data.tokenizers import get_tokenizer

    return items, store, get_tokenizer("bpe512"), (lambda p: arts[p].extract)


def _system(world, embedder, **kw):
    from memstack.memory.retrieval.trainable import TrainableRetriever

    items, store, tok, text = world
    torch.manual_seed(0)
    model = build_model(BackboneConfig(vocab_size=512, d_model=32, n_layers=2, n_heads=2, seg_len=256)).eval()
    cfg = OpenQAConfig(passage_tokens=24, **kw)
    ret = TrainableRetriever(store, embedder, mode=cfg.retriever if cfg.retriever != "frozen" else "query",
                             candidates=cfg.candidates) if cfg.retrieves else None
    return OpenQA(cfg, model, tok, text, ret), items


def _plain_answer_lp(qa: OpenQA, question: str, pid, answer: str) -> float:
    """log p(answer | block) from ONE plain forward over [block; Answer:; answer] -- the brute force."""
    blk = qa.fmt.block(question, pid, qa.text)
    tgt = qa.fmt.target(answer)
    ids = blk + qa.fmt.prompt + tgt
    with torch.no_grad():
        out, _ = qa.model(torch.tensor([ids]))
    lp = torch.log_softmax(out.logits[0], -1)
    start = len(blk) + len(qa.fmt.prompt)
    return sum(float(lp[start - 1 + i, t]) for i, t in enumerate(tgt))


@pytest.mark.parametrize("system", ["rag_sequence", "rag_token"])
def test_rag_loss_equals_the_marginal_of_plain_forwards(world, embedder, system):
    qa, items = _system(world, embedder, system=system, k=3)
    batch = items[:2]
    with torch.no_grad():
        loss, _ = qa.loss(batch)
        got = qa.retriever.retrieve([it.question for it in batch], 3)
    want = []
    for b, it in enumerate(batch):
        tgt = qa.fmt.target(it.answers[0])
        per_tok = torch.zeros(3, len(tgt))
        for z, pid in enumerate(got.passages[b].tolist()):        # token-level log-probs, by plain forwards
            blk = qa.fmt.block(it.question, pid, qa.text)
            with torch.no_grad():
                out, _ = qa.model(torch.tensor([blk + qa.fmt.prompt + tgt]))
            lp = torch.log_softmax(out.logits[0], -1)
            s = len(blk) + len(qa.fmt.prompt)
            per_tok[z] = torch.stack([lp[s - 1 + i, t] for i, t in enumerate(tgt)])
        pz = torch.softmax(got.logits[b], -1)
        if system == "rag_sequence":
            want.append(math.log(sum(float(pz[z]) * math.exp(float(per_tok[z].sum())) for z in range(3))))
        else:
            want.append(sum(math.log(sum(float(pz[z]) * math.exp(float(per_tok[z, t])) for z in range(3)))
                            for t in range(len(tgt))))
    assert math.isclose(float(loss), -sum(want) / 2, rel_tol=1e-5)


def test_gradient_reaches_the_query_encoder_not_the_document_vectors(world, embedder):
    qa, items = _system(world, embedder, system="rag_sequence", k=3, retriever="query")
    keys = qa.retriever.store.keys.clone()
    qa.parameters_to_train()
    loss, _ = qa.loss(items[:2])
    loss.backward()
    g = [p.grad for p in qa.retriever.encoder.parameters() if p.grad is not None]
    assert g and sum(float(x.abs().sum()) for x in g) > 0
    assert torch.equal(qa.retriever.store.keys, keys) and not qa.retriever.store.keys.requires_grad
    assert all(p.grad is None for p in embedder.model.parameters())            # the frozen copy is untouched
    frozen, _ = _system(world, embedder, system="rag_sequence", k=3, retriever="frozen")
    frozen.parameters_to_train()
    frozen.loss(items[:2])[0].backward()
    assert all(p.grad is None for p in frozen.retriever.encoder.parameters())


def test_k1_rag_token_equals_rag_sequence(world, embedder):
    seq, items = _system(world, embedder, system="rag_sequence", k=1, max_answer_tokens=4)
    tok, _ = _system(world, embedder, system="rag_token", k=1, max_answer_tokens=4)
    with torch.no_grad():
        assert math.isclose(float(seq.loss(items[:3])[0]), float(tok.loss(items[:3])[0]), rel_tol=1e-6)
    assert seq.predict(items[:3])[0] == tok.predict(items[:3])[0]


def test_oracle_and_closed_book_losses_are_plain_likelihoods(world, embedder):
    for system, pid in (("oracle", "gold"), ("closed_book", None)):
        qa, items = _system(world, embedder, system=system, retriever="frozen")
        with torch.no_grad():
            loss, _ = qa.loss(items[:2])
        want = [_plain_answer_lp(qa, it.question, it.passage if pid else None, it.answers[0]) for it in items[:2]]
        assert math.isclose(float(loss), -sum(want) / 2, rel_tol=1e-5)


def test_atlas_loss_is_fid_nll_plus_pdist_and_trains_both(world, embedder):
    from memstack import fid

    qa, items = _system(world, embedder, system="atlas", k=3, retriever="rerank", candidates=5)
    batch = items[:2]
    torch.manual_seed(1)
    loss, parts = qa.loss(batch)
    assert qa.retriever.stats.reembedded == 2 * (5 + 3)
    # recompute both terms independently
    with torch.no_grad():
        got = qa.retriever.retrieve([it.question for it in batch], 3)
        seqs = [qa.fmt.block(it.question, p, qa.text) for it, ps in zip(batch, got.passages.tolist()) for p in ps]
        kv = fid.encode(qa.model, fid.pack(seqs, qa.fmt.tok.eot_id))
        tgts = [qa.fmt.target(it.answers[0]) for it in batch]
        lp, m = fid.answer_logprobs(qa.model, kv.fuse(3), qa.fmt.prompt, tgts)
        reader = -(lp * m).sum(-1).mean()
        per = torch.tensor([[_plain_answer_lp(qa, it.question, p, it.answers[0]) for p in ps]
                            for it, ps in zip(batch, got.passages.tolist())])
        ret = marginal.pdist_loss(got.logits, per)
    assert math.isclose(parts["reader"], float(reader), rel_tol=1e-5)
    assert math.isclose(parts["retriever"], float(ret), rel_tol=1e-4, abs_tol=1e-6)
    qa.parameters_to_train()
    loss.backward()
    assert sum(float(p.grad.abs().sum()) for p in qa.retriever.encoder.parameters() if p.grad is not None) > 0
    assert float(qa.model.blocks[0].attn.wq.weight.grad.abs().sum()) > 0


def test_training_changes_what_it_trains_and_nothing_else(world, embedder):
    qa, items = _system(world, embedder, system="rag_token", k=2, steps=2, batch=2, lr_reader=1e-2, lr_retriever=1e-3,
                        train_layers=1)
    before = {n: p.detach().clone() for n, p in qa.model.named_parameters()}
    enc = [p.detach().clone() for p in qa.retriever.encoder.parameters()]
    hist = qa.train(items[:4])
    assert len(hist) == 2 and all(math.isfinite(h["loss"]) for h in hist)
    changed = {n for n, p in qa.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.startswith(("blocks.1.", "norm.")) for n in changed)     # top layer + final norm only
    assert any(not torch.equal(a, b) for a, b in zip(enc, qa.retriever.encoder.parameters()))
    res = qa.evaluate(items[:3])
    assert res["questions"] == 3 and 0 <= res["recall_at_k"] <= 100 and len(res["predictions"]) == 3
