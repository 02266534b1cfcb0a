"""RAG's marginalisation over retrieved passages (Lewis et al., arXiv 2005.11401) and ATLAS's
retriever objectives (Izacard et al., arXiv 2208.03299): the probability math only, on
per-passage log-probabilities that any generator produced (fid.py computes them on the backbone).

Notation: B questions, k retrieved passages each, T answer tokens.
- doc_logits (B, k): retriever scores s(z, x) / tau; p(z | x) = softmax over the k retrieved.
- tok_lp (B, k, T): log p(y_t | x, z, y_<t) under the generator with passage z in its context.
- mask (B, T): real answer tokens (answers of different lengths are right-padded).

RAG-Sequence: one latent passage for the whole answer
    p(y | x) = sum_z p(z | x) prod_t p(y_t | x, z, y_<t)
RAG-Token: a latent passage per token, the prior p(z | x) fixed for the answer
    p(y | x) = prod_t sum_z p(z | x) p(y_t | x, z, y_<t)
Both are computed in log space (logsumexp). With k = 1 they coincide. The gradient reaches the
query encoder through p(z | x) (the document encoder stays frozen, as in the paper).

Decoding: RAG-Token decodes greedily from the per-token mixture (`rag_token_next`); RAG-Sequence
uses the paper's "thorough decoding" with beam size 1: every passage's greedy answer is a
candidate, each candidate is scored under every passage, and the best marginal p(y | x) wins
(`rag_sequence_pick`).

ATLAS objectives (the retriever is trained from the reader's signal; all targets are
stop-gradient):
- PDist (perplexity distillation, the paper's default): target p_t(z) ∝ exp(log p(y | x, z) / theta),
  loss KL(p_t || p_retriever). log p(y | x, z) is the reader's answer likelihood with passage z
  alone; `theta` = 1 is the paper's equation.
- EMDR² (end-to-end, treating passages as latent): loss -log sum_z p_retriever(z) p(y | x, z) with
  p(y | x, z) stop-gradient -- the RAG-Sequence marginal with a frozen generator, differentiated
  only through the retriever.
Deviation: the retriever softmax is over the k passages the reader saw, with a temperature on
cosine scores (MiniLM vectors are unit length; DPR/Contriever inner products are not).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _check(doc_logits: Tensor, tok_lp: Tensor, mask: Tensor) -> None:
    B, k = doc_logits.shape
    if tok_lp.shape[:2] != (B, k) or mask.shape != (B, tok_lp.shape[2]):
        raise ValueError(f"shapes disagree: doc_logits {tuple(doc_logits.shape)}, tok_lp {tuple(tok_lp.shape)}, "
                         f"mask {tuple(mask.shape)}; expected (B, k), (B, k, T), (B, T)")


def sequence_logprob(tok_lp: Tensor, mask: Tensor) -> Tensor:
    """log p(y | x, z) (B, k): the answer's log-likelihood under each passage."""
    return (tok_lp * mask[:, None, :].to(tok_lp.dtype)).sum(-1)


def rag_sequence_logprob(doc_logits: Tensor, tok_lp: Tensor, mask: Tensor) -> Tensor:
    """log p_RAG-Sequence(y | x) (B,)."""
    _check(doc_logits, tok_lp, mask)
    return torch.logsumexp(F.log_softmax(doc_logits.float(), -1) + sequence_logprob(tok_lp.float(), mask), dim=-1)


def rag_token_logprob(doc_logits: Tensor, tok_lp: Tensor, mask: Tensor) -> Tensor:
    """log p_RAG-Token(y | x) (B,)."""
    _check(doc_logits, tok_lp, mask)
    per_tok = torch.logsumexp(F.log_softmax(doc_logits.float(), -1)[:, :, None] + tok_lp.float(), dim=1)  # (B, T)
    return (per_tok * mask.to(per_tok.dtype)).sum(-1)


def rag_token_next(doc_logits: Tensor, logits: Tensor) -> Tensor:
    """RAG-Token's next-token log-distribution (B, V) from each passage's logits (B, k, V)."""
    return torch.logsumexp(F.log_softmax(doc_logits.float(), -1)[:, :, None] + F.log_softmax(logits.float(), -1), dim=1)


def rag_sequence_pick(doc_logits: Tensor, cand_lp: Tensor, cand_valid: Tensor) -> tuple[Tensor, Tensor]:
    """Thorough decoding's choice. cand_lp (B, C, k): log p(y_c | x, z) of each candidate answer
    under each passage; cand_valid (B, C). Returns (best candidate index (B,), its log p(y | x) (B,))."""
    score = torch.logsumexp(F.log_softmax(doc_logits.float(), -1)[:, None, :] + cand_lp.float(), dim=-1)  # (B, C)
    score = score.masked_fill(~cand_valid, float("-inf"))
    best = score.argmax(-1)
    return best, score.gather(1, best[:, None])[:, 0]


def pdist_loss(doc_logits: Tensor, seq_lp: Tensor, theta: float = 1.0) -> Tensor:
    """ATLAS perplexity distillation: mean over questions of KL(p_target || p_retriever), with
    p_target = softmax(log p(y | x, z) / theta) (stop-gradient) and p_retriever = softmax(doc_logits)."""
    target = F.softmax(seq_lp.detach().float() / theta, dim=-1)                       # (B, k)
    return F.kl_div(F.log_softmax(doc_logits.float(), -1), target, reduction="batchmean")


def emdr2_loss(doc_logits: Tensor, seq_lp: Tensor) -> Tensor:
    """ATLAS EMDR²: -log sum_z p_retriever(z | x) p(y | x, z), the reader's likelihoods stop-gradient; mean over questions."""
    return -torch.logsumexp(F.log_softmax(doc_logits.float(), -1) + seq_lp.detach().float(), dim=-1).mean()
