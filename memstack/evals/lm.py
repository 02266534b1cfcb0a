"""Language modelling on a real corpus; the metric is bits per byte (vocabulary-independent).

Training reads the corpus's train split as B parallel document streams (data/packing.py), with
`n_segments` consecutive segments per step and the memory state carried from step to step.
Evaluation streams the eval split's documents the same way, from a fresh state, predicting
every token once with "the document so far" as context (as far as the memory reaches):

    bpb = sum over predicted tokens of -log2 p(token) / sum of their UTF-8 bytes
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar, Literal

import numpy as np
import torch
from torch import nn

from memstack.backbone.model import cross_entropy
from memstack.data.packing import IGNORE, DocumentStream
from memstack.evals.task import Task, TaskConfig, tokenizer_reasons, tokenizer_vocab
from memstack.memory.base import Step


@dataclass(frozen=True)
class LMTaskConfig(TaskConfig):
    kind: ClassVar[str] = "lm"
    corpus: Literal["sotu", "austen", "moby_dick"] = "sotu"
    tokenizer: str = "bpe512"
    eval_split: Literal["val", "test"] = "test"
    eval_tokens: int | None = None     # evaluate on the first documents of the split up to this many tokens
    eval_rows: int = 8                 # documents evaluated in parallel

    def vocab_size(self) -> int:
        return tokenizer_vocab(self.tokenizer)

    def context_tokens(self) -> int:
        return 4096

    def check(self) -> list[str]:
        r = tokenizer_reasons(self.tokenizer)
        if self.eval_tokens is not None and self.eval_tokens < 1:
            r.append(f"eval_tokens must be >= 1 or null, got {self.eval_tokens}")
        if self.eval_rows < 1:
            r.append(f"eval_rows must be >= 1, got {self.eval_rows}")
        return r


def corpus_split(corpus: str, split: str) -> list[str]:
    """Texts of a corpus split. SOTU splits by year; the novels split each book 90/5/5 by position."""
    from memstack.data import corpora

    if corpus == "sotu":
        return [d.text for d in corpora.sotu(split)]
    docs = corpora.austen() if corpus == "austen" else [corpora.moby_dick()]
    lo, hi = {"train": (0.0, 0.9), "val": (0.9, 0.95), "test": (0.95, 1.0)}[split]
    return [d.text[int(lo * len(d.text)):int(hi * len(d.text))] for d in docs]


class LMTask(Task):
    primary = "bpb"
    higher_is_better = False

    @cached_property
    def tokenizer(self):
        from memstack.data.tokenizers import get_tokenizer

        return get_tokenizer(self.cfg.tokenizer)

    def _docs(self, split: str) -> list[np.ndarray]:
        return [np.asarray(self.tokenizer.encode(t), dtype=np.int64) for t in corpus_split(self.cfg.corpus, split)]

    @cached_property
    def eval_docs(self) -> list[np.ndarray]:
        docs = self._docs(self.cfg.eval_split)
        if self.cfg.eval_tokens is not None:
            out, n = [], 0
            for d in docs:
                if n >= self.cfg.eval_tokens:
                    break
                out.append(d[: self.cfg.eval_tokens - n])
                n += len(out[-1])
            docs = out
        return docs

    @cached_property
    def train_docs(self) -> list[np.ndarray]:
        """The train split, tokenized once per task (every cell of a suite trains on it)."""
        return self._docs("train")

    def train_source(self, rows: int, seed: int, rank: int = 0, world: int = 1) -> DocumentStream:
        return DocumentStream(self.train_docs, rows, self.seg_len, self.tokenizer.eot_id, seed=seed,
                              rank=rank, world=world)

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        dev = model.device
        stream = DocumentStream(self.eval_docs, self.cfg.eval_rows, self.seg_len, self.tokenizer.eot_id,
                                shuffle=False, loop=False)
        nbytes = torch.as_tensor(self.tokenizer.token_bytes(), device=dev)
        state = model.init_state(self.cfg.eval_rows, dev)
        nll = torch.zeros((), dtype=torch.float64, device=dev)
        n_tok = n_bytes = 0
        while True:
            b = stream.next(1).to(dev)
            if b.n_targets == 0 and stream.exhausted:
                break
            out, state = model(b.tokens[:, 0], state, Step(reset=b.reset[:, 0]))
            tgt = b.targets[:, 0]
            nll += cross_entropy(out.logits, tgt, reduction="sum").double()
            keep = tgt != IGNORE
            n_tok += int(keep.sum())
            n_bytes += int(nbytes[tgt[keep]].sum())
        loss = float(nll) / max(n_tok, 1)
        return {"bpb": float(nll) / math.log(2) / max(n_bytes, 1), "loss": loss, "ppl": math.exp(min(loss, 50.0)),
                "eval_tokens": n_tok, "eval_bytes": n_bytes}
