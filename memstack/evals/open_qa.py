"""Open-domain QA on WikiQA-templates (data/wiki_qa.py): one harness for five systems, trained on
the same few-shot questions with the same budget and scored with EM / F1 on the same questions.

| system        | reader input                                   | trained                                  | paper |
|---------------|------------------------------------------------|------------------------------------------|-------|
| closed_book   | the question alone                             | reader                                   | T5 closed-book baseline of RAG / ATLAS |
| oracle        | the gold passage + question (in context)       | reader                                   | an upper bound on retrieval |
| rag_sequence  | each of the top-k passages separately; p(y|x) = sum_z p(z|x) prod_t p(y_t|x,z,..) | reader + query encoder | RAG-Sequence, arXiv 2005.11401 |
| rag_token     | same; p(y|x) = prod_t sum_z p(z|x) p(y_t|x,z,..) | reader + query encoder               | RAG-Token |
| atlas         | FiD: all k blocks read at once (memstack/fid.py) | reader + retriever by PDist or EMDR²   | ATLAS, arXiv 2208.03299 |

Every block is "<first passage_tokens tokens of the passage>\\nQuestion: <q>\\n" (closed book:
"Question: <q>\\n"); the reader continues "Answer:" with " <answer>\\n". Loss: the answer's negative
log-likelihood summed over its tokens (marginal for RAG), mean over the batch's questions; ATLAS
adds the retriever objective. Decoding is greedy up to the newline (RAG-Sequence: thorough
decoding with beam 1, marginalised over passages). The retriever is trainable.TrainableRetriever
("frozen": never updated; "query": the query tower learns; "rerank": both towers learn over the
stale index, re-ranked). `train_layers` (top reader layers trained; None = all) is the one
knob this harness adds for CPU budgets; every system shares it.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import torch

from memstack import fid
from memstack.config import Checked
from memstack.data.wiki_qa import QAItem
from memstack.evals.qa_metrics import exact_match, f1_score
from memstack.memory.retrieval import marginal

SYSTEMS = ("closed_book", "oracle", "rag_sequence", "rag_token", "atlas")
RETRIEVERS = ("frozen", "query", "rerank")
OBJECTIVES = ("pdist", "emdr2")


@dataclass(frozen=True)
class OpenQAConfig(Checked):
    system: str = "rag_token"
    k: int = 4                      # passages per question
    passage_tokens: int = 48        # the reader sees the first N tokens of each passage
    retriever: str = "query"        # frozen | query | rerank (trainable.py)
    candidates: int = 12            # rerank: passages over-retrieved from the stale index
    temperature: float = 0.05       # retriever softmax over cosine scores
    objective: str = "pdist"        # atlas: the retriever's training signal
    theta: float = 1.0              # pdist: temperature of the reader's posterior
    steps: int = 32                 # optimizer steps (0: evaluate untrained)
    batch: int = 2                  # questions per step
    lr_reader: float = 1e-5
    lr_retriever: float = 1e-5
    train_layers: int | None = None  # top reader layers trained; None = all (embeddings too); 0 = frozen reader
    max_answer_tokens: int = 12
    seed: int = 0

    def check(self) -> list[str]:
        r = []
        for name, allowed in (("system", SYSTEMS), ("retriever", RETRIEVERS), ("objective", OBJECTIVES)):
            if getattr(self, name) not in allowed:
                r.append(f"{name} must be one of {list(allowed)}, got {getattr(self, name)!r}")
        for name in ("k", "passage_tokens", "candidates", "batch", "max_answer_tokens"):
            if getattr(self, name) < 1:
                r.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.steps < 0:
            r.append(f"steps must be >= 0, got {self.steps}")
        for name in ("temperature", "theta"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                r.append(f"{name} must be a finite number > 0, got {v}")
        for name in ("lr_reader", "lr_retriever"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                r.append(f"{name} must be a finite number >= 0, got {v}")
        if self.train_layers is not None and self.train_layers < 0:
            r.append(f"train_layers must be >= 0 or null, got {self.train_layers}")
        if self.system in ("closed_book", "oracle") and self.retriever != "frozen":
            r.append(f"system {self.system} retrieves nothing: use retriever=frozen")
        return r

    @property
    def retrieves(self) -> bool:
        return self.system in ("rag_sequence", "rag_token", "atlas")


class QAFormat:
    """The prompt layout in one tokenizer's ids."""

    def __init__(self, tok, passage_tokens: int):
        self.tok, self.P = tok, passage_tokens
        nl = tok.encode("\n")
        if len(nl) != 1:
            raise ValueError(f"the tokenizer encodes a newline as {len(nl)} ids; the answer format needs one")
        self.nl = nl[0]
        self.prompt = tok.encode("Answer:")
        self.stop = {self.nl, tok.eot_id}
        self._psg: dict[int, list[int]] = {}

    def block(self, question: str, pid: int | None, text: Callable[[int], str]) -> list[int]:
        if pid is None:
            return self.tok.encode(f"Question: {question}\n")
        if pid not in self._psg:
            self._psg[pid] = self.tok.encode(text(pid))[: self.P]
        return self._psg[pid] + self.tok.encode(f"\nQuestion: {question}\n")

    def target(self, answer: str) -> list[int]:
        return self.tok.encode(" " + answer) + [self.nl]

    def text(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids)).strip()


class OpenQA:
    """A reader (memstack backbone + tokenizer), a passage text source (passage id -> text; ids are
    wiki_articles() indices) and, for retrieving systems, a TrainableRetriever."""

    def __init__(self, cfg: OpenQAConfig, model, tok, passage_text: Callable[[int], str], retriever=None):
        if cfg.retrieves and retriever is None:
            raise ValueError(f"system {cfg.system} needs a retriever")
        self.cfg, self.model, self.text, self.retriever = cfg, model, passage_text, retriever
        self.fmt = QAFormat(tok, cfg.passage_tokens)
        n = model.cfg.backbone.n_layers
        self.train_from = 0 if cfg.train_layers is None else n - min(cfg.train_layers, n)
        self.timing = {"train_s": 0.0, "eval_s": 0.0}

    # ------------------------------------------------------------------------ one forward
    def _retrieve(self, items: Sequence[QAItem]) -> tuple[list[list[int | None]], torch.Tensor | None]:
        """Passage ids per question (B lists of k, or of 1 for closed_book/oracle) and the
        retriever's logits (B, k) (None when nothing is retrieved)."""
        c = self.cfg
        if c.system == "closed_book":
            return [[None] for _ in items], None
        if c.system == "oracle":
            return [[it.passage] for it in items], None
        with torch.set_grad_enabled(torch.is_grad_enabled() and c.retriever != "frozen"):
            got = self.retriever.retrieve([it.question for it in items], c.k)
        return got.passages.tolist(), got.logits

    def _kv(self, items, pids) -> tuple[fid.BlockKV, int]:
        seqs = [self.fmt.block(it.question, p, self.text) for it, ps in zip(items, pids) for p in ps]
        blocks = fid.pack(seqs, self.fmt.tok.eot_id, self.model.device)
        return fid.encode(self.model, blocks, self.train_from), len(pids[0])

    def loss(self, items: Sequence[QAItem]) -> tuple[torch.Tensor, dict]:
        c = self.cfg
        pids, doc = self._retrieve(items)
        kv, k = self._kv(items, pids)
        targets = [self.fmt.target(it.answers[0]) for it in items]
        B = len(items)
        if c.system == "atlas":
            tok_lp, mask = fid.answer_logprobs(self.model, kv.fuse(k), self.fmt.prompt, targets, self.train_from)
            reader = -(tok_lp * mask).sum(-1).mean()
            with torch.no_grad():   # PDist / EMDR² targets: each passage alone (stop-gradient)
                lp, m = fid.answer_logprobs(self.model, kv, self.fmt.prompt, [t for t in targets for _ in range(k)])
                seq_lp = marginal.sequence_logprob(lp.view(B, k, -1), m.view(B, k, -1)[:, 0])
            if c.objective == "pdist":
                ret = marginal.pdist_loss(doc, seq_lp, c.theta)
            else:
                ret = marginal.emdr2_loss(doc, seq_lp)
            return reader + ret, {"reader": float(reader.detach()), "retriever": float(ret.detach())}
        rows = [t for t in targets for _ in range(k)]
        tok_lp, mask = fid.answer_logprobs(self.model, kv, self.fmt.prompt, rows, self.train_from)
        tok_lp, mask = tok_lp.view(B, k, -1), mask.view(B, k, -1)[:, 0]
        if c.system == "rag_token":
            lp = marginal.rag_token_logprob(doc, tok_lp, mask)
        elif c.system == "rag_sequence":
            lp = marginal.rag_sequence_logprob(doc, tok_lp, mask)
        else:                                           # one block, no latent passage
            lp = marginal.sequence_logprob(tok_lp, mask)[:, 0]
        return -lp.mean(), {"reader": float(-lp.detach().mean())}

    @torch.no_grad()
    def predict(self, items: Sequence[QAItem]) -> tuple[list[str], list[list[int | None]]]:
        c = self.cfg
        pids, doc = self._retrieve(items)
        kv, k = self._kv(items, pids)
        B, fmt = len(items), self.fmt
        if c.system == "atlas":
            out = fid.greedy(self.model, kv.fuse(k), fmt.prompt, c.max_answer_tokens, fmt.stop)
        elif c.system == "rag_token":
            def mix(logits):                                                   # (B*k, V) -> same token per question
                return marginal.rag_token_next(doc, logits.view(B, k, -1)).argmax(-1).repeat_interleave(k)

            out = fid.greedy(self.model, kv, fmt.prompt, c.max_answer_tokens, fmt.stop, choose=mix)[::k]
        elif c.system == "rag_sequence":
            out = self._thorough(kv, doc, fid.greedy(self.model, kv, fmt.prompt, c.max_answer_tokens, fmt.stop), B, k)
        else:
            out = fid.greedy(self.model, kv, fmt.prompt, c.max_answer_tokens, fmt.stop)
        return [fmt.text(o) for o in out], pids

    def _thorough(self, kv: fid.BlockKV, doc: torch.Tensor, greedy: list[list[int]], B: int, k: int) -> list[list[int]]:
        """RAG-Sequence thorough decoding (beam 1): each passage's greedy answer is a candidate;
        every candidate is scored under every passage; the best marginal wins."""
        cands = [list(dict.fromkeys(tuple(g) for g in greedy[b * k:(b + 1) * k])) for b in range(B)]
        C = max(len(c) for c in cands)
        rows, answers = [], []
        for b in range(B):
            for c in range(C):
                cand = list(cands[b][min(c, len(cands[b]) - 1)]) + [self.fmt.nl]
                for z in range(k):
                    rows.append(b * k + z)
                    answers.append(cand)
        lp, m = fid.answer_logprobs(self.model, kv.rows(torch.tensor(rows, device=kv.valid.device)), self.fmt.prompt, answers)
        cand_lp = marginal.sequence_logprob(lp[:, None], m)[:, 0].view(B, C, k)
        valid = torch.tensor([[c < len(cands[b]) for c in range(C)] for b in range(B)], device=cand_lp.device)
        best, _ = marginal.rag_sequence_pick(doc, cand_lp, valid)
        return [list(cands[b][int(best[b])]) for b in range(B)]

    # ------------------------------------------------------------------------ loops
    def parameters_to_train(self) -> list[dict]:
        c, groups = self.cfg, []
        m = self.model
        m.requires_grad_(False)
        if c.train_layers is None:
            m.requires_grad_(True)
        else:
            for blk in m.blocks[self.train_from:]:
                blk.requires_grad_(True)
            if c.train_layers:
                m.norm.requires_grad_(True)
        reader = [p for p in m.parameters() if p.requires_grad]
        if reader and c.lr_reader > 0:
            groups.append({"params": reader, "lr": c.lr_reader})
        if c.retrieves and c.retriever != "frozen" and c.lr_retriever > 0:
            groups.append({"params": list(self.retriever.encoder.parameters()), "lr": c.lr_retriever})
        elif self.retriever is not None:
            self.retriever.encoder.requires_grad_(False)
        return groups

    def train(self, items: Sequence[QAItem], progress: bool = False, log: Callable[[dict], None] | None = None) -> list[dict]:
        c = self.cfg
        if c.steps == 0 or not items:
            return []
        groups = self.parameters_to_train()
        if not groups:
            return []
        opt = torch.optim.AdamW(groups, weight_decay=0.0)
        rng = random.Random(c.seed)
        order: list[QAItem] = []
        hist = []
        self.model.train()
        if self.retriever is not None:
            self.retriever.train()
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=c.steps, desc=f"train {c.system}", unit="step", dynamic_ncols=True)
        t0 = time.perf_counter()
        try:
            for step in range(c.steps):
                if len(order) < c.batch:
                    perm = list(items)
                    rng.shuffle(perm)
                    order += perm
                batch, order = order[: c.batch], order[c.batch:]
                loss, parts = self.loss(batch)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                rec = {"step": step + 1, "loss": float(loss.detach()), **parts}
                hist.append(rec)
                if log:
                    log(rec)
                if bar:
                    bar.update(1)
                    bar.set_postfix(loss=f"{float(loss):.3f}")
        finally:
            if bar:
                bar.close()
            self.model.eval()
            if self.retriever is not None:
                self.retriever.eval()
            self.model.requires_grad_(False)
            self.timing["train_s"] += time.perf_counter() - t0
        return hist

    def evaluate(self, items: Sequence[QAItem], batch: int = 4, progress: bool = False) -> dict:
        self.model.eval()
        if self.retriever is not None:
            self.retriever.eval()
        t0 = time.perf_counter()
        preds, rows = [], []
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(items), desc=f"eval {self.cfg.system}", unit="q", dynamic_ncols=True)
        for a in range(0, len(items), batch):
            chunk = items[a:a + batch]
            p, pids = self.predict(chunk)
            preds += p
            rows += pids
            if bar:
                bar.update(len(chunk))
        if bar:
            bar.close()
        self.timing["eval_s"] += time.perf_counter() - t0
        return score(items, preds, rows if self.cfg.retrieves else None)


def score(items: Sequence[QAItem], preds: Sequence[str], retrieved: Sequence[Sequence[int]] | None = None) -> dict:
    """EM / F1 (percent), per template, retrieval recall (gold passage among the retrieved), the predictions."""
    em = [exact_match(p, it.answers) for p, it in zip(preds, items)]
    f1 = [f1_score(p, it.answers) for p, it in zip(preds, items)]
    per: dict[str, list[float]] = {}
    for it, e in zip(items, em):
        per.setdefault(it.template, []).append(e)
    out = {"questions": len(items), "em": 100 * sum(em) / max(len(em), 1), "f1": 100 * sum(f1) / max(len(f1), 1),
           "em_by_template": {t: round(100 * sum(v) / len(v), 1) for t, v in sorted(per.items())}}
    if retrieved is not None:
        out["recall_at_k"] = 100 * sum(it.passage in r for it, r in zip(items, retrieved)) / max(len(items), 1)
    out["predictions"] = [{"id": it.id, "pred": p, "gold": it.answers[0], "em": e} for it, p, e in zip(items, preds, em)]
    return out


def config_record(cfg: OpenQAConfig) -> dict:
    return asdict(cfg)


def run(cfg: OpenQAConfig, store: str | None = None, pretrained: str = "smollm2", train_questions: int = 64,
        eval_split: str = "test", eval_questions: int | None = None, eval_batch: int = 4, progress: bool = False,
        model=None, tok=None, embedder=None, datastore=None) -> dict:
    """Train one system few-shot on the first `train_questions` training questions, evaluate it on
    `eval_questions` of `eval_split`; returns the JSON record. `model`/`tok`/`embedder`/`datastore`
    may be passed in (tests, benchmark loops); otherwise the pretrained backbone, its tokenizer, the
    MiniLM embedder and the passage store at `store` are loaded."""
    from memstack.data.wiki import wiki_articles
    from memstack.data.wiki_qa import qa_split

    torch.manual_seed(cfg.seed)
    if model is None:
        from memstack.hf.pretrained import PRETRAINED, load_pretrained

        model = load_pretrained(pretrained).eval()
        if tok is None and pretrained in PRETRAINED:
            from memstack.data.tokenizers import get_tokenizer

            tok = get_tokenizer(PRETRAINED[pretrained].tokenizer)
    if tok is None:
        raise ValueError("a tokenizer is needed (pass tok, or a registered pretrained backbone)")
    retriever = None
    if cfg.retrieves:
        from memstack.memory.retrieval.embedder import Embedder
        from memstack.memory.retrieval.store import Datastore
        from memstack.memory.retrieval.trainable import TrainableRetriever

        embedder = embedder or Embedder()
        if datastore is None:
            if store is None:
                raise ValueError(f"system {cfg.system} retrieves: give the passage store (memstack datastore build --kind rag)")
            datastore = Datastore.open(store, expect_fingerprint=embedder.fingerprint)
        mode = "rerank" if cfg.retriever == "rerank" else "query"
        retriever = TrainableRetriever(datastore, embedder, mode=mode, candidates=cfg.candidates, temperature=cfg.temperature)
    arts = wiki_articles()
    qa = OpenQA(cfg, model, tok, lambda p: arts[p].extract, retriever)
    train_items = qa_split("train", train_questions) if cfg.steps else []
    hist = qa.train(train_items, progress=progress)
    res = qa.evaluate(qa_split(eval_split, eval_questions), batch=eval_batch, progress=progress)
    return {"config": config_record(cfg), "pretrained": pretrained, "store": store,
            "passages": len(datastore) if datastore is not None else None, "train_questions": len(train_items),
            "eval_split": eval_split, "history": hist, "timing": dict(qa.timing),
            "retriever_stats": asdict(retriever.stats) if retriever is not None else None, **res}
