"""RETRO's chunk keys (Borgeaud et al., arXiv 2112.04426, section 2.3): a frozen function of a
chunk's tokens, identical when the datastore is built and when the model queries it.

Two keyers, chosen by `RetroConfig.key`:
- "minilm" -- the paper's way: a frozen *pretrained* text embedder. The paper time-averages a
  frozen BERT's token states over the chunk; here the chunk's token ids are decoded with the
  model's tokenizer and embedded by the shipped all-MiniLM-L6-v2 (a 6-layer BERT whose sentence
  vector is the mean of its token states, L2-normalised: the same time-average, 384-d).
  Deviations: MiniLM (22M parameters, tuned for sentence similarity) instead of BERT-base; the
  chunk is decoded to text and re-tokenised with MiniLM's WordPiece vocabulary.
- "bag" -- the store-free stand-in kept for tiny models and old checkpoints: the normalised mean
  of seeded frozen random token vectors (a bag of tokens; no model to load).

Each keyer names itself (`fingerprint`); a datastore records the fingerprint of the keyer that
wrote it and `Retro` refuses a store written by another.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

MINILM_DIM = 384


def key_table(vocab: int, dim: int, seed: int) -> Tensor:
    """The frozen token vectors behind bag-of-token keys (vocab, dim): seeded Gaussian."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(vocab, dim, generator=g)


def chunk_keys(tokens: Tensor, table: Tensor) -> Tensor:
    """tokens (..., m) -> unit keys (..., dim): the normalised mean of the chunk's token vectors."""
    return F.normalize(table.to(tokens.device)[tokens].mean(-2), dim=-1)


def key_fingerprint(vocab: int, dim: int, seed: int, chunk: int) -> str:
    return f"retro-bag-of-tokens:v{vocab}:d{dim}:seed{seed}:m{chunk}"


class BagKeys:
    """Bag-of-token keys over a frozen random table (the stand-in)."""

    def __init__(self, vocab: int, dim: int, seed: int, chunk: int):
        self.table = key_table(vocab, dim, seed)
        self.dim = dim
        self.fingerprint = key_fingerprint(vocab, dim, seed, chunk)

    def __call__(self, tokens: Tensor) -> Tensor:
        return chunk_keys(tokens, self.table)


class MiniLMKeys:
    """Frozen MiniLM over the decoded chunk text: tokens (..., m) -> unit keys (..., 384).

    The embedder and the tokenizer load on first use (a model that never completes a chunk never
    loads them); the embedder follows the tokens' device. Never trained, never in a state dict."""

    def __init__(self, tokenizer: str, chunk: int, batch_size: int = 256):
        from memstack.memory.retrieval.embedder import MINILM_SHA256

        self.tokenizer_name, self.chunk, self.batch_size = tokenizer, chunk, batch_size
        self.dim = MINILM_DIM
        self.fingerprint = f"retro-minilm:sha256={MINILM_SHA256[:16]}:tok={tokenizer}:m{chunk}"
        self._emb = self._tok = None
        self._device = None

    def _load(self, device: torch.device):
        if self._tok is None:
            from memstack.data.tokenizers import get_tokenizer

            self._tok = get_tokenizer(self.tokenizer_name)
        if self._emb is None or self._device != device:
            from memstack.memory.retrieval.embedder import Embedder

            if self._emb is None:
                self._emb = Embedder(device=str(device))
            else:
                self._emb.model.to(device)
            self._device = device

    def texts(self, tokens: Tensor) -> list[str]:
        """(N, m) ids -> N strings (the chunk as text)."""
        return [self._tok.decode(row) for row in tokens.tolist()]

    @torch.no_grad()
    def __call__(self, tokens: Tensor) -> Tensor:
        lead, m = tokens.shape[:-1], tokens.shape[-1]
        flat = tokens.reshape(-1, m)
        self._load(flat.device)
        if flat.shape[0] == 0:
            return torch.zeros(*lead, self.dim, device=tokens.device)
        with torch.autocast(flat.device.type, enabled=False):
            e = self._emb.encode(self.texts(flat), batch_size=self.batch_size)                # (N, 384) fp32, cpu
        return e.to(tokens.device).reshape(*lead, self.dim)


def make_keyer(cfg, vocab: int):
    """The keyer a RetroConfig names."""
    if cfg.key == "minilm":
        return MiniLMKeys(cfg.tokenizer, cfg.chunk)
    return BagKeys(vocab, cfg.key_dim, cfg.key_seed, cfg.chunk)
