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

Chunk keys (`key`, retro_keys.py): "minilm" is the paper's frozen pretrained embedder -- the
shipped all-MiniLM-L6-v2 over the chunk decoded to text (mean of its token states, as the paper
time-averages frozen BERT); "bag" (the default, for tiny models and older checkpoints) is a
normalised mean of frozen random token vectors. The store records the keyer's fingerprint.
Neighbour encoder (`enc_query`, the paper's default): a bidirectional transformer over each
neighbour's 2m tokens whose every layer also cross-attends to the retrieving chunk's activations
(the backbone's hidden states of that chunk at the first CCA layer, kept in the state while a
chunk is open so decoding one token at a time gives the same encodings).
RETRO-fitting (paper section 4): a pretrained backbone stays frozen (`train.trainable: memory`)
and only the CCA layers and the encoder train; `share_embedding` embeds neighbours with the
backbone's own (frozen) token embedding, so the retrofit adds no vocabulary-sized table.

Deviations from the paper:
- MiniLM (22M parameters) instead of BERT-base for keys; "bag" keys are no pretrained embedder;
- the encoder has its own token + position embeddings unless `share_embedding`; 1 layer by
  default; `enc_query: false` gives the earlier encoder that reads the neighbour alone;
- CCA layers default to the upper half of the backbone (the paper: every 3rd from layer 6 or 9);
  CCA scores see no positions by default; `cca_rope` rotates each token's query by its place
  p - u*m in the [chunk u; continuation] frame and each neighbour key by its own place, so
  scores depend on the relative offset (the paper uses relative position encodings in CCA;
  ours are RoPE with the backbone's theta);
- same-document exclusion identifies a document by a hash of its first chunk (the segment
  protocol passes no document ids); with a corpus store from another split nothing is excluded.
- `retrieval: false` withholds every neighbour: the same model and parameters without
  retrieval, the paper's RETRO[OFF] baseline; `random_neighbours: true` reads k store entries
  chosen by a hash of the chunk instead of its nearest keys (the "are the neighbours used?" ablation).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from memstack.backbone.layers import RMSNorm, SwiGLU, apply_rope, rope_tables
from memstack.config import BackboneConfig
from memstack.memory.base import Memory, MemorySpec, Site, StepContext, dtype_bytes
from memstack.memory.retrieval.config import RetroConfig
from memstack.memory.retrieval.namespaces import ForgetsEntries, query_names
from memstack.memory.retrieval.retro_keys import chunk_keys, key_fingerprint, key_table, make_keyer  # noqa: F401
from memstack.ops.attention import attention

HASH_P, HASH_M = 1_000_003, 2_147_483_647


def doc_signature(first_chunk: Tensor) -> Tensor:
    """(B, m) -> (B,) int64 hash of a document's first chunk (its id for same-document exclusion)."""
    m = first_chunk.shape[-1]
    pw = torch.tensor([pow(HASH_P, i, HASH_M) for i in range(m)], dtype=torch.long, device=first_chunk.device)
    return (first_chunk.long() * pw).sum(-1) % HASH_M


class NeighbourEncoder(nn.Module):
    """Bidirectional transformer over each neighbour's 2 * chunk tokens; with `enc_query` every
    layer also cross-attends to the retrieving chunk's activations (paper, section 2.4)."""

    def __init__(self, cfg: RetroConfig, b: BackboneConfig):
        super().__init__()
        self.n_heads, D = b.n_heads, b.d_model
        self.emb = None if cfg.share_embedding else nn.Embedding(b.vocab_size, D)
        self.pos = nn.Parameter(torch.zeros(2 * cfg.chunk, D))
        self.query = cfg.enc_query

        def layer() -> nn.ModuleDict:
            d = {"n1": RMSNorm(D, b.norm_eps), "qkv": nn.Linear(D, 3 * D, bias=False), "o": nn.Linear(D, D, bias=False),
                 "n2": RMSNorm(D, b.norm_eps), "mlp": SwiGLU(D, b.ff_dim)}
            if cfg.enc_query:
                d.update({"nx": RMSNorm(D, b.norm_eps), "nh": RMSNorm(D, b.norm_eps), "xq": nn.Linear(D, D, bias=False),
                          "xkv": nn.Linear(D, 2 * D, bias=False), "xo": nn.Linear(D, D, bias=False)})
            return nn.ModuleDict(d)

        self.layers = nn.ModuleList(layer() for _ in range(cfg.enc_layers))
        self.norm = RMSNorm(D, b.norm_eps)
        for p in self.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, 0.0, b.init_std)

    def forward(self, nb: Tensor, hq: Tensor | None = None, embed=None) -> Tensor:
        """nb (N, r) token ids, hq (N, m, D) the retrieving chunk's activations (each neighbour's
        own query chunk; required with `enc_query`), embed: the backbone's token embedding (with
        `share_embedding`) -> (N, r, D)."""
        N, r = nb.shape
        x = (self.emb(nb) if self.emb is not None else embed(nb)) + self.pos[:r]       # (N, r, D)
        H = self.n_heads
        full = torch.ones(N, r, r, dtype=torch.bool, device=nb.device)
        if self.query:
            if hq is None:
                raise ValueError("this encoder attends to the query chunk: pass its activations")
            xfull = torch.ones(N, r, hq.shape[1], dtype=torch.bool, device=nb.device)
        for L in self.layers:
            q, k, v = L["qkv"](L["n1"](x)).view(N, r, 3, H, -1).permute(2, 0, 3, 1, 4)     # 3 x (N, H, r, hd)
            x = x + L["o"](attention(q, k, v, full).transpose(1, 2).reshape(N, r, -1))
            if self.query:   # every neighbour token attends to every token of the query chunk
                qx = L["xq"](L["nx"](x)).view(N, r, H, -1).transpose(1, 2)                 # (N, H, r, hd)
                kx, vx = L["xkv"](L["nh"](hq.to(x.dtype))).view(N, -1, 2, H, qx.shape[-1]).permute(2, 0, 3, 1, 4)
                x = x + L["xo"](attention(qx, kx, vx, xfull).transpose(1, 2).reshape(N, r, -1))
            x = x + L["mlp"](L["n2"](x))
        return self.norm(x)


@dataclass
class RetroState:
    buf: Tensor        # (B, chunk) the document's last chunk tokens, right-aligned (0 before the document):
                       # a row's open chunk is its last pos % chunk of them (its position says how many)
    hbuf: Tensor       # (B, chunk, D) their activations at the first CCA layer (the encoder's query), aligned with buf
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


class Retro(ForgetsEntries, Memory):
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
        self.keys = make_keyer(cfg, backbone.vocab_size)          # frozen; holds no parameters of this module
        self.key_dim = self.keys.dim
        self.fingerprint = self.keys.fingerprint
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
        return RetroState(z(m), z(m, D, dt=dtype), z(kr, D, dt=dtype), z(kr, dt=torch.bool), z(0, kr, D, dt=dtype),
                          z(0, kr, dt=torch.bool), z().fill_(-1), z(m), z(dt=torch.bool), z(n_db, self.key_dim, dt=dtype),
                          z(n_db, 2 * m), z(n_db, dt=torch.bool))

    def reset(self, state: RetroState, mask: Tensor) -> RetroState:
        keep = ~mask
        return RetroState(state.buf * keep[:, None], state.hbuf, state.enc, state.enc_ok & keep[:, None], state.call_enc, state.call_ok,
                          torch.where(mask, -1, state.sig), state.last, state.has_last & keep, state.db_keys, state.db_tok,
                          state.db_ok & keep[:, None])

    def _fixed_bytes(self, dtype: torch.dtype) -> int:
        """Constant-size state: encoded neighbours of the last chunk, signature, last chunk, a
        chunk buffer (held as its capacity, m tokens and their m activations) and, in document
        mode, the chunk database."""
        m, D, kr = self.cfg.chunk, self.backbone.d_model, self.cfg.k * 2 * self.cfg.chunk
        db = self.cfg.db_len * (self.key_dim * dtype_bytes(dtype) + 2 * m * 8 + 1) if self.store is None else 0
        return kr * (D * dtype_bytes(dtype) + 1) + 8 + m * 8 + 1 + m * 8 + m * D * dtype_bytes(dtype) + db

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
                {"chunk": 8, "k": 1, "layers": [0, 1], "db_len": 3, "key_dim": 8, "exclude_own_doc": False},
                {"chunk": 4, "k": 1, "db_len": 4, "key_dim": 8, "enc_query": False, "share_embedding": True,
                 "cca_rope": True}]

    # -- retrieval at the first CCA layer -------------------------------------------------------
    def _retrieve(self, chunks: Tensor, q: Tensor, sig: Tensor, st: dict,
                  namespace: str | list | None = None) -> tuple[Tensor, Tensor]:
        """chunks (B, m) completed now, their keys q (B, key_dim) -> neighbour tokens (B, k, 2m), ok (B, k)."""
        B, m, k = chunks.shape[0], self.cfg.chunk, self.cfg.k
        if self.store is not None:
            if self.store.device != chunks.device:
                self.store.to(chunks.device)
            tokens = self.store.payload("tokens")
            if self.cfg.random_neighbours:   # k rows chosen by a hash of the chunk: stateless, repeatable
                salt = torch.arange(1, k + 1, device=chunks.device) * 7919
                rows = (doc_signature(chunks)[:, None] * salt + salt) % max(tokens.shape[0], 1)
                return tokens[rows], torch.full((B, k), tokens.shape[0] > 0, device=chunks.device)
            excl = sig if self.cfg.exclude_own_doc else None
            res = self.store.search(q.float(), k, namespace or self.cfg.namespace, exclude_doc=excl)
            ok = res.rows >= 0
            return tokens[res.rows.clamp(min=0)], ok
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

    def _complete(self, chunks: Tensor, key: Tensor, last_key: Tensor, hq: Tensor, st: dict, first_chunk: Tensor,
                  done: Tensor, ctx: StepContext, namespace: str | list | None = None) -> tuple[Tensor, Tensor]:
        """Chunks completed now (B, m) with their keys (B, key_dim), the previous chunk's keys and
        their activations hq (B, m, D), in the rows `done` (B,) bool: signature, document
        database, retrieval, encoding. The other rows' state is left as it was."""
        B, m = chunks.shape
        d1, d2 = done[:, None], done[:, None, None]
        st["sig"] = torch.where(first_chunk & done, doc_signature(chunks), st["sig"])
        if self.store is None:   # entry [last, chunk] becomes complete; then `chunks` waits for its continuation
            entry = torch.cat([st["last"], chunks], 1)
            # FIFO of constant size (fresh tensors: a view would pin the longer buffer)
            st["db_keys"] = torch.where(d2, torch.cat([st["db_keys"][:, 1:], last_key.to(st["db_keys"].dtype)[:, None]], 1),
                                        st["db_keys"])
            st["db_tok"] = torch.where(d2, torch.cat([st["db_tok"][:, 1:], entry[:, None]], 1), st["db_tok"])
            st["db_ok"] = torch.where(d1, torch.cat([st["db_ok"][:, 1:], st["has_last"][:, None]], 1), st["db_ok"])
        st["last"] = torch.where(d1, chunks, st["last"])
        st["has_last"] = st["has_last"] | done
        nb, ok = self._retrieve(chunks, key, st["sig"], st, namespace)                  # (B, k, 2m)
        if not self.cfg.retrieval:
            ok = torch.zeros_like(ok)
        ok = ok & d1
        k = nb.shape[1]
        hq = hq.repeat_interleave(k, 0) if self.cfg.enc_query else None                 # (B*k, m, D)
        enc = self.encoder(nb.reshape(-1, 2 * m), hq, ctx.embed).reshape(B, -1, self.backbone.d_model)  # (B, k*2m, D)
        return enc, ok[:, :, None].expand(-1, -1, 2 * m).reshape(B, -1)

    def _prepare(self, h: Tensor, state: RetroState, ctx: StepContext) -> RetroState:
        """Process this call's tokens chunk by chunk (at the first CCA layer, once per call). Rows
        may be at different positions: row r completes a chunk where (pos_r + t + 1) % m == 0.
        Every chunk completed in this call is keyed in one batch (one embedder call), then the
        chunks are retrieved and encoded in order (document mode: each one's entry is in the
        database before the next chunk searches it)."""
        m = self.cfg.chunk
        st = {f: getattr(state, f) for f in ("sig", "last", "has_last", "db_keys", "db_tok", "db_ok")}
        B, T = ctx.tokens.shape
        W = state.buf.shape[1]
        hr = h[:, ctx.real]                                                              # (B, T, D)
        ext = torch.cat([state.buf, ctx.tokens], 1)                                      # (B, W+T); token t at W+t
        ext_h = torch.cat([state.hbuf.to(hr.dtype), hr], 1)                              # (B, W+T, D)
        nb = ctx.pos.remainder(m)                                                        # (B,) tokens of the open chunk
        n_done = torch.div(nb + T, m, rounding_mode="floor")                             # (B,) chunks completed now
        U = int(n_done.max()) if B else 0
        encs, oks = [], []
        if U:
            ar = torch.arange(m, device=ext.device)
            starts = W - nb[:, None] + torch.arange(U, device=ext.device) * m             # (B, U) first column of each chunk
            cols = (starts[..., None] + ar).clamp(max=ext.shape[1] - 1).view(B, U * m)  # (B, U*m)
            chunks = ext.gather(1, cols).view(B, U, m)                                   # (B, U, m)
            hq = ext_h.gather(1, cols[..., None].expand(-1, -1, ext_h.shape[-1])).view(B, U, m, -1)  # (B, U, m, D)
            need_last = self.store is None
            keys = self.keys(torch.cat([st["last"][:, None], chunks], 1) if need_last else chunks)  # (B, U(+1), dk)
            keys, last_key = (keys[:, 1:], keys[:, 0]) if need_last else (keys, None)
            ns = query_names(ctx.reads_of(self.cfg.namespace))
            for c in range(U):
                first = (ctx.pos - nb + c * m) == 0                                      # the document's first chunk
                done = n_done > c
                lk = None
                if need_last:   # the previous chunk: this call's chunk c - 1 for rows that completed it, else the state's
                    lk = last_key if c == 0 else torch.where(done[:, None], keys[:, c - 1], last_key)
                e, o = self._complete(chunks[:, c], keys[:, c], lk, hq[:, c], st, first, done, ctx, ns)
                encs.append(e)
                oks.append(o)
        kr, D = self.cfg.k * 2 * m, self.backbone.d_model
        call_enc = torch.stack(encs, 1) if encs else h.new_zeros(B, 0, kr, D)
        call_ok = torch.stack(oks, 1) if oks else torch.zeros(B, 0, kr, dtype=torch.bool, device=h.device)
        buf = ext[:, ext.shape[1] - m:].clone()
        hbuf = ext_h[:, ext_h.shape[1] - m:].to(state.hbuf.dtype, copy=True)   # a copy: a view would pin ext_h
        return RetroState(buf, hbuf, state.enc, state.enc_ok, call_enc, call_ok, st["sig"], st["last"],
                          st["has_last"], st["db_keys"], st["db_tok"], st["db_ok"])

    # -- chunked cross-attention ------------------------------------------------------------------
    def block(self, layer: int, h: Tensor, state: RetroState, ctx: StepContext) -> tuple[Tensor, RetroState]:
        m = self.cfg.chunk
        if layer == self.first:
            state = self._prepare(h, state, ctx)
        B, T, D = h.shape[0], ctx.n_tokens, self.backbone.d_model
        # slot 0: neighbours of the last chunk completed before this call; slot c + 1: the row's
        # c-th chunk completed in this call
        E = torch.cat([state.enc[:, None], state.call_enc], 1)                           # (B, U+1, kr, D)
        ok = torch.cat([state.enc_ok[:, None], state.call_ok], 1)                        # (B, U+1, kr)
        U, kr = E.shape[1], E.shape[2]
        pos = ctx.pos[:, None] + torch.arange(T, device=h.device)                         # (B, T) document positions
        u = torch.div(pos + 1, m, rounding_mode="floor") - 1                              # the chunk each token reads
        slot = u - torch.div(ctx.pos, m, rounding_mode="floor")[:, None] + 1              # (B, T)
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
        if self.cfg.cca_rope:   # relative positions: token p sits at p - u*m in the [chunk u; continuation] frame
            hd, theta = q.shape[-1], self.backbone.rope_theta
            aligned = pos - u.clamp(min=0) * m                                               # (B, T) in [m - 1, 2m - 2]
            q = apply_rope(q, *rope_tables(aligned, hd, theta, q.dtype))
            j = (torch.arange(U * kr, device=h.device) % (2 * m)).expand(B, -1)               # (B, S) position in its neighbour
            kx = apply_rope(kx, *rope_tables(j, hd, theta, kx.dtype))
        safe = mask | ~has[..., None]                     # a token with nothing to read attends anywhere; zeroed below
        o = attention(q, kx, vx, safe).transpose(1, 2).reshape(B, T, D)
        o = x["o"](o) * has[..., None].to(o.dtype)
        if h.shape[1] == T:
            h = h + o
        else:   # memory tokens of other memories around the chunk: only the real tokens read neighbours
            h = torch.cat([h[:, :ctx.n_prefix], hr + o, h[:, ctx.n_prefix + T:]], 1)
        if layer == self.last_layer:   # keep each row's newest completed chunk's neighbours for the next call
            n_call = state.call_enc.shape[1]
            if n_call:
                n_done = torch.div(ctx.pos.remainder(m) + T, m, rounding_mode="floor")   # (B,)
                last = (n_done - 1).clamp(min=0)
                pick = last[:, None, None, None].expand(B, 1, kr, D)
                newest = state.call_enc.gather(1, pick)[:, 0]                               # (B, kr, D) fresh
                newest_ok = state.call_ok.gather(1, last[:, None, None].expand(B, 1, kr))[:, 0]
                got = (n_done > 0)
                state = RetroState(state.buf, state.hbuf, torch.where(got[:, None, None], newest, state.enc),
                                   torch.where(got[:, None], newest_ok, state.enc_ok),
                                   state.call_enc.new_zeros(B, 0, kr, D), state.call_ok.new_zeros(B, 0, kr), state.sig,
                                   state.last.clone(), state.has_last, state.db_keys, state.db_tok, state.db_ok)
        return h, state


def build_retro_store(docs, vocab_size: int, cfg: RetroConfig, eot_id: int, out=None, backend: str = "exact",
                      namespace: str = "default", progress: bool = True, batch_chunks: int = 1024,
                      device: str | torch.device = "cpu"):
    """Chunk every document as the model reads it (`[<eot>] + tokens`, chunks at multiples of
    `cfg.chunk`), store key(chunk) -> chunk + continuation with the document's signature; keys
    from the keyer `cfg.key` names (retro_keys.py), computed `batch_chunks` at a time on `device`.
    Returns the Datastore (saved to `out` when given)."""
    import numpy as np

    from memstack.memory.retrieval.config import StoreConfig
    from memstack.memory.retrieval.store import Datastore

    m = cfg.chunk
    keyer = make_keyer(cfg, vocab_size)
    store = Datastore(StoreConfig(dim=keyer.dim, metric="ip", backend=backend), keyer.fingerprint,
                      payload={"tokens": ("int64", (2 * m,))})
    it = docs
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(docs, desc="retro datastore", unit="doc", dynamic_ncols=True)
    pending: list[tuple[Tensor, Tensor, Tensor]] = []   # (chunks, values, doc signatures) awaiting keys

    def flush():
        if pending:
            ch, vals, sig = (torch.cat(x) for x in zip(*pending))
            store.add(keyer(ch.to(device)).cpu(), {"tokens": vals}, doc=sig, namespace=namespace)
            pending.clear()

    for d in it:
        seq = torch.as_tensor(np.concatenate([[eot_id], np.asarray(d)]), dtype=torch.long)
        n = len(seq) // m
        if n < 2:
            continue
        chunks = seq[: n * m].view(n, m)
        sig = doc_signature(chunks[:1])
        pending.append((chunks[:-1], torch.cat([chunks[:-1], chunks[1:]], 1), sig.expand(n - 1)))   # values (n-1, 2m)
        if sum(len(p[0]) for p in pending) >= batch_chunks:
            flush()
    flush()
    if out is not None:
        store.save(out)
    return store
