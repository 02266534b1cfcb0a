"""RETRO: chunked cross-attention over retrieved neighbours (Borgeaud et al., arXiv 2112.04426).

What it stores: a database of chunks, key = a frozen embedding of a `chunk`-token chunk, value =
that chunk and its continuation (2 * chunk tokens). Either a corpus datastore (`store`, built
by `memstack datastore build --kind retro`) or -- without one -- the document's own past chunks
(kept in the model state, FIFO over `db_len`), so the memory also works with no build step.
Read (BLOCK site, at each CCA layer): the document is split into chunks at multiples of
`chunk`; when chunk u is complete its key retrieves k neighbours, a small bidirectional
encoder encodes each neighbour, and every later token p with (p + 1) // chunk - 1 == u -- the
last token of chunk u and the first chunk - 1 tokens of chunk u + 1 -- cross-attends to the
encoded neighbours of chunk u (the paper's shifted CCA: no position sees retrieval results
computed from tokens after it). The result is added to the residual stream.
Write: document mode appends entry u - 1 = [chunk u - 1, chunk u] once chunk u is complete.

Deviations from the paper:
- chunk key: the mean of frozen *random* token vectors (seeded, never trained; L2-normalised;
  cosine search) -- a bag-of-tokens key standing in for the frozen BERT time-average, with no
  model download and identical at build and query time (the store records its fingerprint);
- the neighbour encoder does not cross-attend to the query chunk's activations (the paper's
  encoder does); it has its own token and position embeddings; 1 layer by default;
- CCA layers default to the upper half of the backbone (the paper: every 3rd from layer 6 or 9);
  attention inside CCA has no relative position bias;
- same-document exclusion identifies a document by a hash of its first chunk (the segment
  protocol passes no document ids); with a corpus store from another split nothing is excluded.
- `retrieval: false` withholds every neighbour: the same model and parameters without
  retrieval, the paper's RETRO[OFF] baseline.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from memstack.backbone.layers import RMSNorm, SwiGLU
from memstack.config import BackboneConfig
from memstack.memory.base import Memory, MemorySpec, Site, StepContext, dtype_bytes
from memstack.memory.retrieval.config import RetroConfig
from memstack.ops.attention import attention

HASH_P, HASH_M = 1_000_003, 2_147_483_647


def key_table(vocab: int, dim: int, seed: int) -> Tensor:
    """The frozen token vectors behind chunk keys (vocab, dim): seeded Gaussian."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(vocab, dim, generator=g)


def chunk_keys(tokens: Tensor, table: Tensor) -> Tensor:
    """tokens (..., m) -> unit keys (..., dim): the normalised mean of the chunk's token vectors."""
    return F.normalize(table.to(tokens.device)[tokens].mean(-2), dim=-1)


def key_fingerprint(vocab: int, dim: int, seed: int, chunk: int) -> str:
    return f"retro-bag-of-tokens:v{vocab}:d{dim}:seed{seed}:m{chunk}"


def doc_signature(first_chunk: Tensor) -> Tensor:
    """(B, m) -> (B,) int64 hash of a document's first chunk (its id for same-document exclusion)."""
    m = first_chunk.shape[-1]
    pw = torch.tensor([pow(HASH_P, i, HASH_M) for i in range(m)], dtype=torch.long, device=first_chunk.device)
    return (first_chunk.long() * pw).sum(-1) % HASH_M


class NeighbourEncoder(nn.Module):
    """Bidirectional transformer over each neighbour's 2 * chunk tokens."""

    def __init__(self, cfg: RetroConfig, b: BackboneConfig):
        super().__init__()
        self.n_heads, D = b.n_heads, b.d_model
        self.emb = nn.Embedding(b.vocab_size, D)
        self.pos = nn.Parameter(torch.zeros(2 * cfg.chunk, D))
        self.layers = nn.ModuleList(nn.ModuleDict({"n1": RMSNorm(D, b.norm_eps), "qkv": nn.Linear(D, 3 * D, bias=False),
                                                   "o": nn.Linear(D, D, bias=False), "n2": RMSNorm(D, b.norm_eps),
                                                   "mlp": SwiGLU(D, b.ff_dim)}) for _ in range(cfg.enc_layers))
        self.norm = RMSNorm(D, b.norm_eps)
        for p in self.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, 0.0, b.init_std)

    def forward(self, nb: Tensor) -> Tensor:
        """nb (N, r) token ids -> (N, r, D)."""
        N, r = nb.shape
        x = self.emb(nb) + self.pos[:r]
        H = self.n_heads
        full = torch.ones(N, r, r, dtype=torch.bool, device=nb.device)
        for L in self.layers:
            q, k, v = L["qkv"](L["n1"](x)).view(N, r, 3, H, -1).permute(2, 0, 3, 1, 4)     # 3 x (N, H, r, hd)
            x = x + L["o"](attention(q, k, v, full).transpose(1, 2).reshape(N, r, -1))
            x = x + L["mlp"](L["n2"](x))
        return self.norm(x)


@dataclass
class RetroState:
    buf: Tensor        # (B, m) the current, incomplete chunk: its first pos % m tokens (a fixed capacity,
                       # so a reset row's stale tokens are never read: its position says how many count)
    enc: Tensor        # (B, k * 2m, D) encoded neighbours of the last completed chunk (empty if none)
    enc_ok: Tensor     # (B, k * 2m) bool: real neighbour tokens
    call_enc: Tensor   # (B, U, k * 2m, D) this call's chunks' neighbours (shared by the CCA layers of one call)
    call_ok: Tensor    # (B, U, k * 2m) bool
    sig: Tensor        # (B,) int64 document signature (-1 until the first chunk is complete)
    last: Tensor       # (B, m) the last completed chunk (document mode: waits for its continuation)
    has_last: Tensor   # (B,) bool
    db_keys: Tensor    # (B, N, key_dim) document mode: keys of past chunks
    db_tok: Tensor     # (B, N, 2m) their chunk + continuation
    db_ok: Tensor      # (B, N) bool


class Retro(Memory):
    sites: ClassVar[frozenset[Site]] = frozenset({Site.BLOCK})

    def __init__(self, cfg: RetroConfig, backbone: BackboneConfig):
        super().__init__(cfg, backbone)
        D, H = backbone.d_model, backbone.n_heads
        self.cca = cfg.cca_layers(backbone.n_layers)
        self.first = self.cca[0]
        self.last_layer = self.cca[-1]
        self.encoder = NeighbourEncoder(cfg, backbone)
        self.xattn = nn.ModuleDict({str(l): nn.ModuleDict({
            "norm": RMSNorm(D, backbone.norm_eps), "q": nn.Linear(D, D, bias=False), "k": nn.Linear(D, D, bias=False),
            "v": nn.Linear(D, D, bias=False), "o": nn.Linear(D, D, bias=False)}) for l in self.cca})
        for p in self.xattn.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, 0.0, backbone.init_std)
        self.register_buffer("table", key_table(backbone.vocab_size, cfg.key_dim, cfg.key_seed), persistent=False)
        self.fingerprint = key_fingerprint(backbone.vocab_size, cfg.key_dim, cfg.key_seed, cfg.chunk)
        self.n_heads = H
        self.store = None
        if cfg.store is not None:
            from memstack.memory.retrieval.store import Datastore, DatastoreError

            self.store = Datastore.open(cfg.store, expect_fingerprint=self.fingerprint)
            if self.store.schema.get("tokens", (None, ()))[1] != (2 * cfg.chunk,):
                raise DatastoreError(f"{cfg.store} holds no {2 * cfg.chunk}-token neighbours", "RETRO cannot use this datastore")

    def applies_to(self, layer: int) -> bool:
        return layer in self.cca

    # -- state ---------------------------------------------------------------------------------
    def init_state(self, batch: int, device: torch.device, dtype: torch.dtype) -> RetroState:
        m, D, kr = self.cfg.chunk, self.backbone.d_model, self.cfg.k * 2 * self.cfg.chunk
        n_db = self.cfg.db_len if self.store is None else 0
        z = lambda *s, dt=torch.long: torch.zeros(batch, *s, dtype=dt, device=device)  # noqa: E731
        return RetroState(z(m), z(kr, D, dt=dtype), z(kr, dt=torch.bool), z(0, kr, D, dt=dtype), z(0, kr, dt=torch.bool),
                          z().fill_(-1), z(m), z(dt=torch.bool), z(n_db, self.cfg.key_dim, dt=dtype), z(n_db, 2 * m),
                          z(n_db, dt=torch.bool))

    def reset(self, state: RetroState, mask: Tensor) -> RetroState:
        keep = ~mask
        return RetroState(state.buf * keep[:, None], state.enc, state.enc_ok & keep[:, None], state.call_enc, state.call_ok,
                          torch.where(mask, -1, state.sig), state.last, state.has_last & keep, state.db_keys, state.db_tok,
                          state.db_ok & keep[:, None])

    def _fixed_bytes(self, dtype: torch.dtype) -> int:
        """Constant-size state: encoded neighbours of the last chunk, signature, last chunk, a
        chunk buffer (held as its capacity, m tokens) and, in document mode, the chunk database."""
        m, D, kr = self.cfg.chunk, self.backbone.d_model, self.cfg.k * 2 * self.cfg.chunk
        db = self.cfg.db_len * (self.cfg.key_dim * dtype_bytes(dtype) + 2 * m * 8 + 1) if self.store is None else 0
        return kr * (D * dtype_bytes(dtype) + 1) + 8 + m * 8 + 1 + m * 8 + db

    def spec(self, dtype: torch.dtype = torch.float32) -> MemorySpec:
        return MemorySpec(fixed_bytes=self._fixed_bytes(dtype), dtype_bytes=dtype_bytes(dtype))

    def make_identity(self) -> bool:
        with torch.no_grad():
            for x in self.xattn.values():
                x["o"].weight.zero_()
        return True

    @classmethod
    def contract_configs(cls) -> list[dict]:
        return [{"chunk": 4, "k": 2, "db_len": 8, "key_dim": 16},
                {"chunk": 8, "k": 1, "layers": [0, 1], "db_len": 3, "key_dim": 8, "exclude_own_doc": False}]

    # -- retrieval at the first CCA layer -------------------------------------------------------
    def _retrieve(self, chunks: Tensor, sig: Tensor, st: dict) -> tuple[Tensor, Tensor]:
        """chunks (B, m) completed now -> neighbour tokens (B, k, 2m), ok (B, k)."""
        B, m, k = chunks.shape[0], self.cfg.chunk, self.cfg.k
        q = chunk_keys(chunks, self.table)                                               # (B, key_dim)
        if self.store is not None:
            if self.store.device != chunks.device:
                self.store.to(chunks.device)
            excl = sig if self.cfg.exclude_own_doc else None
            res = self.store.search(q.float(), k, self.cfg.namespace, exclude_doc=excl)
            ok = res.rows >= 0
            return self.store.payload("tokens")[res.rows.clamp(min=0)], ok
        keys, ok_db = st["db_keys"], st["db_ok"]
        s = (keys.float() @ q.float()[:, :, None]).squeeze(-1).masked_fill(~ok_db, float("-inf"))   # (B, N)
        kk = min(k, s.shape[1])
        nb = torch.zeros(B, k, 2 * m, dtype=torch.long, device=chunks.device)
        ok = torch.zeros(B, k, dtype=torch.bool, device=chunks.device)
        if kk:
            ts, ti = s.topk(kk, dim=1)
            nb[:, :kk] = st["db_tok"].gather(1, ti[..., None].expand(-1, -1, 2 * m))
            ok[:, :kk] = ts > float("-inf")
        return nb, ok

    def _complete(self, chunks: Tensor, st: dict, first_chunk: Tensor) -> tuple[Tensor, Tensor]:
        """A chunk completed in every row: signature, document database, retrieval, encoding."""
        B, m = chunks.shape
        st["sig"] = torch.where(first_chunk, doc_signature(chunks), st["sig"])
        if self.store is None:   # entry [last, chunk] becomes complete; then `chunks` waits for its continuation
            entry = torch.cat([st["last"], chunks], 1)
            key = chunk_keys(st["last"], self.table).to(st["db_keys"].dtype)
            # FIFO of constant size (fresh tensors: a view would pin the longer buffer)
            st["db_keys"] = torch.cat([st["db_keys"][:, 1:], key[:, None]], 1)
            st["db_tok"] = torch.cat([st["db_tok"][:, 1:], entry[:, None]], 1)
            st["db_ok"] = torch.cat([st["db_ok"][:, 1:], st["has_last"][:, None]], 1)
        st["last"], st["has_last"] = chunks, torch.ones_like(st["has_last"])
        nb, ok = self._retrieve(chunks, st["sig"], st)                                  # (B, k, 2m)
        if not self.cfg.retrieval:
            ok = torch.zeros_like(ok)
        enc = self.encoder(nb.reshape(-1, 2 * m)).reshape(B, -1, self.backbone.d_model)  # (B, k*2m, D)
        return enc, ok[:, :, None].expand(-1, -1, 2 * m).reshape(B, -1)

    def _prepare(self, h: Tensor, state: RetroState, ctx: StepContext) -> RetroState:
        """Process this call's tokens chunk by chunk (at the first CCA layer, once per call)."""
        m = self.cfg.chunk
        st = {f: getattr(state, f) for f in ("sig", "last", "has_last", "db_keys", "db_tok", "db_ok")}
        tokens = ctx.tokens
        held = ctx.pos.remainder(m)                                                      # (B,) tokens of the open chunk
        nb = int(held[0]) if held.numel() else 0
        if bool((held != nb).any()):
            raise NotImplementedError(f"RETRO: rows at different offsets inside a {m}-token chunk "
                                      f"({sorted(set(held.tolist()))}) in one call are not supported yet")
        buf = torch.cat([state.buf[:, :nb], tokens], 1)                                  # (B, nb + T)
        encs, oks = [], []
        for a in range(0, buf.shape[1] - m + 1, m):
            first = (ctx.pos - nb + a) == 0                                              # (B,) the document's first chunk
            e, o = self._complete(buf[:, a:a + m], st, first)
            encs.append(e)
            oks.append(o)
        n_done = len(encs) * m
        B, kr, D = h.shape[0], self.cfg.k * 2 * m, self.backbone.d_model
        call_enc = torch.stack(encs, 1) if encs else h.new_zeros(B, 0, kr, D)
        call_ok = torch.stack(oks, 1) if oks else torch.zeros(B, 0, kr, dtype=torch.bool, device=h.device)
        rest = buf[:, n_done:]                                                           # (B, < m) the open chunk
        return RetroState(torch.cat([rest, rest.new_zeros(B, m - rest.shape[1])], 1), state.enc, state.enc_ok, call_enc,
                          call_ok, st["sig"], st["last"],
                          st["has_last"], st["db_keys"], st["db_tok"], st["db_ok"])

    # -- chunked cross-attention ------------------------------------------------------------------
    def block(self, layer: int, h: Tensor, state: RetroState, ctx: StepContext) -> tuple[Tensor, RetroState]:
        m = self.cfg.chunk
        if layer == self.first:
            state = self._prepare(h, state, ctx)
        B, T, D = h.shape[0], ctx.n_tokens, self.backbone.d_model
        # slot 0: neighbours of the last chunk completed before this call; then this call's chunks
        E = torch.cat([state.enc[:, None], state.call_enc], 1)                           # (B, U, kr, D)
        ok = torch.cat([state.enc_ok[:, None], state.call_ok], 1)                        # (B, U, kr)
        U, kr = E.shape[1], E.shape[2]
        pos = ctx.pos[:, None] + torch.arange(T, device=h.device)                         # (B, T) document positions
        u = torch.div(pos + 1, m, rounding_mode="floor") - 1                              # the chunk each token reads
        first_done = torch.div(ctx.pos + T, m, rounding_mode="floor") - state.call_enc.shape[1]   # chunk in call slot 0
        slot = u - first_done[:, None] + 1                                                # (B, T); u < 0: no chunk
        slot = torch.where(u >= 0, slot, -1)
        sel = slot[:, :, None] == torch.arange(U, device=h.device)                       # (B, T, U)
        mask = (sel[..., None] & ok[:, None]).reshape(B, T, U * kr)                       # (B, T, U*kr)
        has = mask.any(-1)                                                                 # (B, T)
        x = self.xattn[str(layer)]
        H = self.n_heads
        hr = h[:, ctx.real]                                                                # (B, T, D)
        q = x["q"](x["norm"](hr)).view(B, T, H, -1).transpose(1, 2)                       # (B, H, T, hd)
        Ef = E.reshape(B, U * kr, D)
        kx = x["k"](Ef).view(B, U * kr, H, -1).transpose(1, 2)                            # (B, H, S, hd)
        vx = x["v"](Ef).view(B, U * kr, H, -1).transpose(1, 2)
        safe = mask | ~has[..., None]                     # a token with nothing to read attends anywhere; zeroed below
        o = attention(q, kx, vx, safe).transpose(1, 2).reshape(B, T, D)
        o = x["o"](o) * has[..., None].to(o.dtype)
        if h.shape[1] == T:
            h = h + o
        else:   # memory tokens of other memories around the chunk: only the real tokens read neighbours
            h = torch.cat([h[:, :ctx.n_prefix], hr + o, h[:, ctx.n_prefix + T:]], 1)
        if layer == self.last_layer:   # keep the newest completed chunk's neighbours for the next call
            if state.call_enc.shape[1]:
                # copies: views would keep this call's whole neighbour stack alive in the state
                state = RetroState(state.buf.clone(), state.call_enc[:, -1].clone(), state.call_ok[:, -1].clone(),
                                   state.call_enc.new_zeros(B, 0, kr, D), state.call_ok.new_zeros(B, 0, kr), state.sig,
                                   state.last.clone(), state.has_last, state.db_keys, state.db_tok, state.db_ok)
        return h, state


def build_retro_store(docs, vocab_size: int, cfg: RetroConfig, eot_id: int, out=None, backend: str = "exact",
                      namespace: str = "default", progress: bool = True):
    """Chunk every document as the model reads it (`[<eot>] + tokens`, chunks at multiples of
    `cfg.chunk`), store key(chunk) -> chunk + continuation with the document's signature.
    Returns the Datastore (saved to `out` when given)."""
    import numpy as np

    from memstack.memory.retrieval.config import StoreConfig
    from memstack.memory.retrieval.store import Datastore

    m = cfg.chunk
    table = key_table(vocab_size, cfg.key_dim, cfg.key_seed)
    store = Datastore(StoreConfig(dim=cfg.key_dim, metric="ip", backend=backend), key_fingerprint(vocab_size, cfg.key_dim,
                      cfg.key_seed, m), payload={"tokens": ("int64", (2 * m,))})
    it = docs
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(docs, desc="retro datastore", unit="doc", dynamic_ncols=True)
    for d in it:
        seq = torch.as_tensor(np.concatenate([[eot_id], np.asarray(d)]), dtype=torch.long)
        n = len(seq) // m
        if n < 2:
            continue
        chunks = seq[: n * m].view(n, m)
        sig = doc_signature(chunks[:1])
        vals = torch.cat([chunks[:-1], chunks[1:]], 1)                                    # (n-1, 2m)
        store.add(chunk_keys(chunks[:-1], table), {"tokens": vals}, doc=sig.expand(n - 1), namespace=namespace)
    if out is not None:
        store.save(out)
    return store
