"""RAG-Sequence / RAG-Token marginals and ATLAS's retriever objectives against brute force:
RAG-Token enumerates every assignment of a passage to each token (k^T latent paths), RAG-Sequence
sums products per passage with plain Python loops; gradients are compared with autograd through
the references; k = 1 makes the two RAG variants identical."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from memstack.memory.retrieval import marginal as M


def _case(B=3, k=3, T=4):
    doc = torch.randn(B, k, dtype=torch.float64) * 2
    tok = torch.log_softmax(torch.randn(B, k, T, 11, dtype=torch.float64), -1)[..., 0]   # real log-probs
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 2:] = False
    mask[1, 3:] = False
    return doc, tok, mask


def _ref_sequence(doc, tok, mask):
    out = []
    for b in range(doc.shape[0]):
        pz = [math.exp(x) for x in torch.log_softmax(doc[b], -1).tolist()]
        T = int(mask[b].sum())
        out.append(math.log(sum(pz[z] * math.exp(sum(float(tok[b, z, t]) for t in range(T))) for z in range(len(pz)))))
    return torch.tensor(out, dtype=torch.float64)


def _ref_token(doc, tok, mask):
    """sum over every assignment z_1..z_T of prod_t p(z_t) p(y_t | z_t): the latent-per-token model."""
    out = []
    for b in range(doc.shape[0]):
        pz = torch.softmax(doc[b], -1).tolist()
        T, k = int(mask[b].sum()), doc.shape[1]
        total = 0.0
        for path in itertools.product(range(k), repeat=T):
            total += math.prod(pz[z] * math.exp(float(tok[b, z, t])) for t, z in enumerate(path))
        out.append(math.log(total))
    return torch.tensor(out, dtype=torch.float64)


def test_rag_sequence_and_token_equal_brute_force():
    doc, tok, mask = _case()
    assert torch.allclose(M.rag_sequence_logprob(doc, tok, mask).double(), _ref_sequence(doc, tok, mask), atol=1e-5)
    assert torch.allclose(M.rag_token_logprob(doc, tok, mask).double(), _ref_token(doc, tok, mask), atol=1e-5)
    # they differ in general (the case above is not degenerate)
    assert not torch.allclose(M.rag_sequence_logprob(doc, tok, mask), M.rag_token_logprob(doc, tok, mask), atol=1e-3)


def test_k1_makes_rag_token_equal_rag_sequence():
    doc, tok, mask = _case(k=1)
    seq, token = M.rag_sequence_logprob(doc, tok, mask), M.rag_token_logprob(doc, tok, mask)
    assert torch.allclose(seq, token, atol=1e-6)
    assert torch.allclose(seq.double(), (tok * mask[:, None]).sum((1, 2)), atol=1e-6)   # p(z)=1: plain likelihood


def test_gradients_into_the_retriever_match_the_reference():
    doc, tok, mask = _case()
    for fn, ref in ((M.rag_sequence_logprob, _ref_sequence_t), (M.rag_token_logprob, _ref_token_t)):
        d1 = doc.clone().float().requires_grad_()
        d2 = doc.clone().requires_grad_()
        fn(d1, tok.float(), mask).sum().backward()
        ref(d2, tok, mask).sum().backward()
        assert torch.allclose(d1.grad.double(), d2.grad, atol=1e-5)
        assert float(d1.grad.abs().sum()) > 0


def _ref_sequence_t(doc, tok, mask):      # differentiable loop reference
    lp = torch.log_softmax(doc, -1)
    return torch.stack([torch.logsumexp(lp[b] + (tok[b] * mask[b]).sum(-1), 0) for b in range(doc.shape[0])])


def _ref_token_t(doc, tok, mask):
    lp = torch.log_softmax(doc, -1)
    rows = []
    for b in range(doc.shape[0]):
        rows.append(sum(torch.log(sum(torch.exp(lp[b, z] + tok[b, z, t]) for z in range(doc.shape[1])))
                        for t in range(int(mask[b].sum()))))
    return torch.stack(rows)


def test_rag_token_next_is_the_prior_weighted_mixture():
    doc = torch.randn(2, 3)
    logits = torch.randn(2, 3, 7)
    got = M.rag_token_next(doc, logits).exp()
    want = (torch.softmax(doc, -1)[:, :, None] * torch.softmax(logits, -1)).sum(1)
    assert torch.allclose(got, want, atol=1e-6) and torch.allclose(got.sum(-1), torch.ones(2), atol=1e-6)


def test_rag_sequence_pick_takes_the_best_marginal():
    doc = torch.log(torch.tensor([[0.7, 0.3]]))
    # candidate 0: likely under passage 0 only; candidate 1: fairly likely under both
    cand = torch.log(torch.tensor([[[0.5, 0.01], [0.4, 0.6]]]))
    best, score = M.rag_sequence_pick(doc, cand, torch.ones(1, 2, dtype=torch.bool))
    assert int(best) == 1 and math.isclose(float(score.exp()), 0.7 * 0.4 + 0.3 * 0.6, rel_tol=1e-5)
    best, _ = M.rag_sequence_pick(doc, cand, torch.tensor([[True, False]]))
    assert int(best) == 0


def test_pdist_is_kl_to_the_reader_posterior_and_emdr2_the_marginal():
    doc = torch.randn(2, 4, requires_grad=True)
    seq = torch.randn(2, 4)
    t = torch.softmax(seq, -1)
    want = (t * (t.log() - torch.log_softmax(doc, -1))).sum(-1).mean()
    assert torch.allclose(M.pdist_loss(doc, seq), want, atol=1e-6)
    M.pdist_loss(doc, seq).backward()
    # at the optimum (retriever = target) the gradient vanishes
    d2 = seq.clone().requires_grad_()
    M.pdist_loss(d2, seq).backward()
    assert float(d2.grad.abs().max()) < 1e-6 and float(doc.grad.abs().max()) > 1e-3
    e = M.emdr2_loss(doc, seq)
    assert torch.allclose(e, -torch.logsumexp(torch.log_softmax(doc, -1) + seq, -1).mean(), atol=1e-6)


def test_shapes_are_checked():
    with pytest.raises(ValueError, match="shapes disagree"):
        M.rag_token_logprob(torch.zeros(2, 3), torch.zeros(2, 2, 4), torch.ones(2, 4, dtype=torch.bool))
