"""Language modelling on a real corpus; the metric is bits per byte (vocabulary-independent).

Training reads the corpus's train split as B parallel document streams (data/packing.py), with
`n_segments` consecutive segments per step and the memory state carried from step to step.
Evaluation streams the eval split's documents the same way, from a fresh state, predicting
every token once with "the document so far" as context (as far as the memory reaches):

    bpb = sum over predicted tokens of -log2 p(token) / sum of their UTF-8 bytes
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar, Literal

import numpy as np
import torch
from torch import nn

from memstack.backbone.model import cross_entropy
from memstack.data.packing import IGNORE, DocumentStream
from memstack.evals.task import Task, TaskConfig, check_split, tokenizer_reasons, tokenizer_vocab
from memstack.memory.base import Step


@dataclass(frozen=True)
class LMTaskConfig(TaskConfig):
    kind: ClassVar[str] = "lm"
    # a built-in corpus (sotu, austen, moby_dick) or a path: a text file, a folder of text files,
    # JSONL / Parquet with a text field, a saved Hugging Face dataset (memstack/data/user.py)
    corpus: str = "sotu"
    text_field: str = "text"           # the field / column holding the text (JSONL, Parquet, datasets)
    tokenizer: str = "bpe512"
    eval_split: Literal["val", "test"] = "test"
    eval_tokens: int | None = None     # evaluate on the first documents of the split up to this many tokens
    eval_rows: int = 8                 # documents evaluated in parallel

    def vocab_size(self) -> int:
        return tokenizer_vocab(self.tokenizer)

    def context_tokens(self) -> int:
        return 4096

    def check(self) -> list[str]:
        from memstack.data.user import is_path_corpus, path_reasons

        r = tokenizer_reasons(self.tokenizer)
        if is_path_corpus(self.corpus):
            r += path_reasons(self.corpus, self.text_field)
        if self.eval_split not in ("val", "test"):
            r.append(f"eval_split must be val or test, got {self.eval_split!r}")
        if self.eval_tokens is not None and self.eval_tokens < 1:
            r.append(f"eval_tokens must be >= 1 or null, got {self.eval_tokens}")
        if self.eval_rows < 1:
            r.append(f"eval_rows must be >= 1, got {self.eval_rows}")
        return r


def corpus_split(corpus: str, split: str, text_field: str = "text") -> list[str]:
    """Texts of a corpus split. SOTU splits by year; the novels split each book 90/5/5 by position;
    a user corpus (a path) as memstack/data/user.py says."""
    from memstack.data import corpora
    from memstack.data.user import is_path_corpus

    if is_path_corpus(corpus):
        return user_corpus(corpus, text_field).split(split)
    if corpus == "sotu":
        return [d.text for d in corpora.sotu(split)]
    docs = corpora.austen() if corpus == "austen" else [corpora.moby_dick()]
    lo, hi = {"train": (0.0, 0.9), "val": (0.9, 0.95), "test": (0.95, 1.0)}[split]
    return [d.text[int(lo * len(d.text)):int(hi * len(d.text))] for d in docs]


def user_corpus(path: str, text_field: str):
    """The user corpus at `path`, read and checked once per process (re-read when a file changes)."""
    from pathlib import Path

    p = Path(path).expanduser()
    stamp = tuple(sorted((str(f), f.stat().st_mtime_ns, f.stat().st_size) for f in ([p] if p.is_file() else p.rglob("*"))
                         if f.is_file())) if p.exists() else ()
    return _user_corpus(str(p), text_field, stamp)


@functools.lru_cache(maxsize=4)
def _user_corpus(path: str, text_field: str, stamp: tuple):
    from memstack.data.user import read_corpus

    del stamp   # part of the memo key only
    return read_corpus(path, text_field)


class LMTask(Task):
    primary = "bpb"
    higher_is_better = False

    @cached_property
    def tokenizer(self):
        from memstack.data.tokenizers import get_tokenizer

        return get_tokenizer(self.cfg.tokenizer)

    def _docs(self, split: str) -> list[np.ndarray]:
        from memstack.data.tokenizers import encode_many

        texts = corpus_split(self.cfg.corpus, split, self.cfg.text_field)
        docs = [np.asarray(ids, dtype=np.int64) for ids in encode_many(self.tokenizer, texts)]
        if split == "train" and not any(len(d) for d in docs):
            from memstack.errors import ConfigError

            raise ConfigError([f"corpus {self.cfg.corpus!r}: its train split has no text to train on"], what="corpus")
        return docs

    @cached_property
    def eval_docs(self) -> list[np.ndarray]:
        """The documents `evaluate` reads by default (the `eval_split`)."""
        return self.split_docs(self.cfg.eval_split)

    def split_docs(self, split: str) -> list[np.ndarray]:
        """The first documents of a split, capped at `eval_tokens` tokens in all."""
        cache = self.__dict__.setdefault("_split_docs", {})
        if split not in cache:
            docs = self._docs(split)
            if self.cfg.eval_tokens is not None:
                out, n = [], 0
                for d in docs:
                    if n >= self.cfg.eval_tokens:
                        break
                    out.append(d[: self.cfg.eval_tokens - n])
                    n += len(out[-1])
                docs = out
            cache[split] = docs
        return cache[split]

    @cached_property
    def train_docs(self) -> list[np.ndarray]:
        """The train split, tokenized once per task (every cell of a suite trains on it)."""
        return self._docs("train")

    def train_source(self, rows: int, seed: int, rank: int = 0, world: int = 1) -> DocumentStream:
        return DocumentStream(self.train_docs, rows, self.seg_len, self.tokenizer.eot_id, seed=seed,
                              rank=rank, world=world)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str | None = None) -> dict[str, float]:
        """Bits per byte on the split (default `eval_split`), and `bpb_se`: its standard error
        from the spread of the per-token losses (tokens taken as independent, so a lower bound)."""
        docs = self.split_docs(check_split(split, self.cfg.eval_split))
        dev = model.device
        stream = DocumentStream(docs, self.cfg.eval_rows, self.seg_len, self.tokenizer.eot_id,
                                shuffle=False, loop=False)
        nbytes = torch.as_tensor(self.tokenizer.token_bytes(), device=dev)
        state = model.init_state(self.cfg.eval_rows, dev)
        nll = torch.zeros((), dtype=torch.float64, device=dev)
        nll2 = torch.zeros((), dtype=torch.float64, device=dev)
        n_tok = n_bytes = 0
        while True:
            b = stream.next(1).to(dev)
            if b.n_targets == 0 and stream.exhausted:
                break
            out, state = model(b.tokens[:, 0], state, Step(reset=b.reset[:, 0]))
            tgt = b.targets[:, 0]
            tok_nll = cross_entropy(out.logits, tgt, reduction="none").double()    # (B, S), 0 where ignored
            nll += tok_nll.sum()
            nll2 += (tok_nll * tok_nll).sum()
            keep = tgt != IGNORE
            n_tok += int(keep.sum())
            n_bytes += int(nbytes[tgt[keep]].sum())
        loss = float(nll) / max(n_tok, 1)
        var = max(float(nll2) / max(n_tok, 1) - loss * loss, 0.0)
        se = math.sqrt(var * n_tok) / math.log(2) / max(n_bytes, 1)     # sd of the sum of n_tok losses, per byte
        return {"bpb": float(nll) / math.log(2) / max(n_bytes, 1), "bpb_se": se, "loss": loss,
                "ppl": math.exp(min(loss, 50.0)), "eval_tokens": n_tok, "eval_bytes": n_bytes}

    def data_arrays(self):
        for i, d in enumerate(self.train_docs):
            yield f"train[{i}]", d
        for split in ("val", "test"):
            for i, d in enumerate(self.split_docs(split)):
                yield f"{split}[{i}]", d
