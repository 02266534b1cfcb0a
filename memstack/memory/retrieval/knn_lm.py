"""kNN-LM (Khandelwal et al., "Generalization through Memorization", arXiv 1911.00172).

What it stores: a datastore of (key = the LM's context vector at a position, value = the token
that followed), built by one pass of a trained LM over a corpus (`build_knnlm_store`, CLI
`memstack datastore build --kind knn_lm`), and -- with `cache_len` > 0 -- a per-document cache of
the same pairs for the document being read (kept in the model state, FIFO over `cache_len`).
Read (LOGITS site): the query is the current context vector; its k nearest entries by squared
L2 distance give p_kNN(w) = sum over neighbours with value w of softmax(-d / temperature), and
p = lambda * p_kNN + (1 - lambda) * p_LM. The returned logits are log p (a valid logit vector).
Write: nothing at read time; the document cache appends each position's (vector, next token)
once the next token is known (the last position of a chunk waits for the next chunk).

Deviations from the paper:
- key: the final hidden state after the last RMSNorm (the vector the output layer reads), not
  the input of the last layer's FFN: our hook sits after the head; it is the choice several
  re-implementations make (neulab/knn-transformers for some models).
- the document cache (the paper's "+ continuous cache", Grave et al. 2017) is not a third
  interpolation term: its entries join the datastore's candidates and one top-k is taken over
  both, with the same distance and temperature.
- search: exact by default (torch, batched), FAISS IVF/HNSW with exact re-scoring optional;
  the paper uses IVFPQ with exact re-scoring from full-precision keys.
The datastore records the fingerprint of the model that built it; `attach_knnlm` refuses a
store from another model (the memory itself can only check the key dimension: a memory never
sees the backbone's weights).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Iterable, Sequence

import torch
from torch import Tensor

from memstack.config import BackboneConfig
from memstack.memory.base import Memory, MemorySpec, Site, StepContext, dtype_bytes
from memstack.memory.retrieval.config import KNNLMConfig, StoreConfig
from memstack.memory.retrieval.namespaces import ForgetsEntries, query_names

PENDING, GONE = -1, -2   # value codes of cache slots: next token not seen yet / row was reset


@dataclass
class KNNLMState:
    keys: Tensor    # (B, M, D) context vectors of the document's last M positions (detached)
    vals: Tensor    # (B, M) int64 next token; PENDING for the newest slot until it is known
    valid: Tensor   # (B, M) bool: slot usable as a neighbour


class KNNLM(ForgetsEntries, Memory):
    sites: ClassVar[frozenset[Site]] = frozenset({Site.LOGITS})

    def __init__(self, cfg: KNNLMConfig, backbone: BackboneConfig):
        super().__init__(cfg, backbone)
        # lambda lives in a buffer so that `make_identity` can close the interpolation; it is
        # not saved with checkpoints (the config is the source of truth)
        self.register_buffer("lmbda", torch.tensor(float(cfg.lmbda)), persistent=False)
        self.store = None
        if cfg.store is not None:
            from memstack.memory.retrieval.store import Datastore, DatastoreError

            store = Datastore.open(cfg.store)
            r = []
            if store.cfg.dim != backbone.d_model:
                r.append(f"{cfg.store} holds {store.cfg.dim}-d keys; this backbone's hidden states are {backbone.d_model}-d")
            if "token" not in store.schema:
                r.append(f"{cfg.store} is not a kNN-LM datastore (no 'token' payload; it holds {sorted(store.schema)})")
            if r:
                raise DatastoreError(r, "kNN-LM cannot use this datastore")
            self.store = store

    # -- state ---------------------------------------------------------------------------------
    def init_state(self, batch: int, device: torch.device, dtype: torch.dtype) -> KNNLMState:
        D = self.backbone.d_model
        return KNNLMState(torch.zeros(batch, 0, D, device=device, dtype=dtype),
                          torch.zeros(batch, 0, dtype=torch.long, device=device),
                          torch.zeros(batch, 0, dtype=torch.bool, device=device))

    def reset(self, state: KNNLMState, mask: Tensor) -> KNNLMState:
        return KNNLMState(state.keys, state.vals.masked_fill(mask[:, None], GONE), state.valid & ~mask[:, None])

    def spec(self, dtype: torch.dtype = torch.float32) -> MemorySpec:
        per_tok = self.backbone.d_model * dtype_bytes(dtype) + 8 + 1
        return MemorySpec(bytes_per_token=per_tok, max_tokens=self.cfg.cache_len, dtype_bytes=dtype_bytes(dtype))

    def make_identity(self) -> bool:
        self.lmbda.fill_(0.0)
        return True

    @classmethod
    def contract_configs(cls) -> list[dict]:
        return [{"cache_len": 40, "k": 4, "temperature": 8.0}, {"cache_len": 7, "k": 16, "lmbda": 0.5}]

    # -- read ----------------------------------------------------------------------------------
    def logits(self, logits: Tensor, h: Tensor, state: KNNLMState, ctx: StepContext) -> tuple[Tensor, KNNLMState]:
        B, T, D = h.shape
        k, temp = self.cfg.k, self.cfg.temperature
        tokens = ctx.tokens
        cache = self.cfg.cache_len > 0
        if cache:
            # the newest slot of each row waits for the token that follows it: this chunk's first
            vals, valid = state.vals, state.valid
            if vals.shape[1]:
                fill = vals[:, -1] == PENDING
                vals = torch.cat([vals[:, :-1], torch.where(fill, tokens[:, 0], vals[:, -1])[:, None]], 1)
                valid = torch.cat([valid[:, :-1], (valid[:, -1] | fill)[:, None]], 1)
            hd = h.detach()
            nxt = torch.cat([tokens[:, 1:], tokens.new_full((B, 1), PENDING)], 1)           # (B, T)
        cand_s, cand_v = [], []
        if cache:
            M = vals.shape[1]
            keys = torch.cat([state.keys, hd.to(state.keys.dtype)], 1)                      # (B, M+T, D)
            kv = torch.cat([vals, nxt], 1)                                                  # (B, M+T)
            # position t reads the last cache_len entries before it: j in [M+t-cap, M+t) of the
            # concatenation, the same window whether the chunk is whole or one token at a time
            j = torch.arange(M + T, device=h.device)
            at = M + torch.arange(T, device=h.device)[:, None]
            window = (j[None] < at) & (j[None] >= at - self.cfg.cache_len)                 # (T, M+T)
            mask = torch.cat([valid, torch.ones(B, T, dtype=torch.bool, device=h.device)], 1)[:, None, :] & window
            d = torch.cdist(h.detach().float(), keys.float()).pow(2)                       # (B, T, M+T)
            s = (-d).masked_fill(~mask, float("-inf"))
            kk = min(k, s.shape[2])
            ts, ti = s.topk(kk, dim=2)
            cand_s.append(ts)
            cand_v.append(kv[:, None, :].expand(B, T, -1).gather(2, ti))
        if self.store is not None:
            if self.store.device != h.device:
                self.store.to(h.device)
            names = query_names(ctx.reads_of(self.cfg.namespace), T)                       # per query: its row's
            res = self.store.search(h.detach().reshape(B * T, D).float(), k, names)
            tok = self.store.payload("token")[res.rows.clamp(min=0)]
            cand_s.append(res.scores.reshape(B, T, k))
            cand_v.append(tok.reshape(B, T, k))
        s = torch.cat(cand_s, 2) if len(cand_s) > 1 else cand_s[0]
        v = torch.cat(cand_v, 2) if len(cand_v) > 1 else cand_v[0]
        if s.shape[2] > k:
            s, pick = s.topk(k, dim=2)
            v = v.gather(2, pick)
        has = s[..., 0] > float("-inf")                                                      # (B, T)
        w = torch.softmax(s / temp, dim=2).nan_to_num(0.0)                                  # (B, T, k)
        p_knn = torch.zeros_like(logits).scatter_add_(2, v.clamp(min=0), w.masked_fill(v < 0, 0.0))
        lam = self.lmbda.to(logits.dtype)
        mixed = torch.logaddexp(torch.log(lam) + torch.log(p_knn), torch.log1p(-lam) + torch.log_softmax(logits, -1))
        out = torch.where(has[..., None] & (lam > 0), mixed, logits)
        if cache:
            cap = self.cfg.cache_len
            keys_new, vals_new = keys[:, -cap:], kv[:, -cap:]
            valid_new = torch.cat([valid, torch.ones(B, T, dtype=torch.bool, device=h.device)], 1)[:, -cap:]
            valid_new = valid_new & (vals_new >= 0)
            if keys.shape[1] > cap:   # own the kept slots (a view would keep the whole buffer alive)
                keys_new, vals_new, valid_new = keys_new.clone(), vals_new.clone(), valid_new.clone()
            state = KNNLMState(keys_new, vals_new, valid_new)
        return out, state


# ------------------------------------------------------------------------------------ building

def attach_knnlm(model: torch.nn.Module, cfg: KNNLMConfig) -> torch.nn.Module:
    """`model` with a kNN-LM memory appended, after checking that `cfg.store` was built by this
    model (same backbone weights): a store from another model is refused."""
    from memstack.memory.retrieval.store import Datastore, model_fingerprint

    if cfg.store is not None:
        Datastore.open(cfg.store, expect_fingerprint=model_fingerprint(model, "final_hidden"))
    return model.with_memories([cfg])


@torch.no_grad()
def build_knnlm_store(model: torch.nn.Module, docs: Sequence, out: str | Path | None, store_cfg: StoreConfig | None = None,
                      rows: int = 8, eot_id: int = 0, namespace: str = "default", progress: bool = True,
                      max_tokens: int | None = None):
    """One pass of `model` over `docs` (token arrays) storing (final hidden state, next token)
    for every predicted position, in the same document-stream protocol as training and
    evaluation. Returns the Datastore (saved to `out` when given)."""
    from memstack.data.packing import IGNORE, DocumentStream
    from memstack.memory.base import Step
    from memstack.memory.retrieval.store import Datastore, model_fingerprint

    model.eval()
    dev = model.device
    D = model.cfg.backbone.d_model
    store_cfg = store_cfg or StoreConfig(dim=D)
    if store_cfg.dim != D:
        raise ValueError(f"store dim {store_cfg.dim} != the model's hidden size {D}")
    store = Datastore(store_cfg, model_fingerprint(model, "final_hidden"), payload={"token": ("int64", ())})
    total = sum(len(d) for d in docs)
    if max_tokens is not None:
        total = min(total, max_tokens)
    stream = DocumentStream(list(docs), rows, model.cfg.backbone.seg_len, eot_id, shuffle=False, loop=False)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="datastore", unit="tok", dynamic_ncols=True)
    state = model.init_state(rows, dev)
    doc_of_row = torch.full((rows,), -1, dtype=torch.long)
    n_doc = 0
    try:
        while len(store) < total:
            b = stream.next(1).to(dev)
            if b.n_targets == 0 and stream.exhausted:
                break
            reset = b.reset[:, 0].cpu()
            for r in reset.nonzero().flatten().tolist():
                doc_of_row[r] = n_doc
                n_doc += 1
            res, state = model(b.tokens[:, 0], state, Step(reset=b.reset[:, 0]))
            tgt = b.targets[:, 0]
            keep = tgt != IGNORE
            if not bool(keep.any()):
                continue
            take = min(int(keep.sum()), total - len(store))
            h = res.hidden[keep][:take]
            docs_ = doc_of_row.to(dev)[:, None].expand_as(tgt)[keep][:take]
            store.add(h.float(), {"token": tgt[keep][:take]}, doc=docs_.cpu(), namespace=namespace)
            if bar:
                bar.update(take)
    finally:
        if bar:
            bar.close()
    if out is not None:
        store.save(out)
    return store


def interpolation_sweep(p_lm_logp: Tensor, p_knn: Tensor, lambdas: Iterable[float]) -> dict[float, float]:
    """Mean NLL of lambda * p_kNN + (1 - lambda) * p_LM for each lambda, given per-token log p_LM
    (N,) and p_kNN (N,) of the target: tunes lambda on validation without re-running the model."""
    out = {}
    for lam in lambdas:
        p = lam * p_knn + (1 - lam) * p_lm_logp.exp()
        out[lam] = float(-torch.log(p.clamp_min(1e-30)).mean())
    return out


__all__ = ["KNNLM", "KNNLMState", "attach_knnlm", "build_knnlm_store", "interpolation_sweep"]
