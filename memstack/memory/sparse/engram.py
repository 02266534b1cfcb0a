"""Engram: conditional memory via scalable lookup (DeepSeek, arXiv 2601.07372).

What it stores: one `SparseTable` (namespace `knowledge`, hashed addressing) holding, for every
Engram layer, N-gram order and hash head, a prime-sized table of `head_dim`-wide rows
(memory/sparse/hashing.py). Per example it carries only the last max_order - 1 compressed token
ids of the document and the short conv's input history: N-grams and the conv reach across
segment and chunk boundaries, so a document gives the same output whole, in segments, or one
token at a time (the contract suite checks it).

Read (at each chosen layer, BLOCK site, on the real tokens of the chunk):
    g_{t,n}  = suffix N-gram of compressed ids ending at t, n in orders
    e_t      = concat over (n, head k) of  E[hash_k(g_{t,n})]                 (B, T, d_mem)
    k_t, v_t = W_K e_t, W_V e_t                                              (B, T, D)
    a_t      = sigmoid( RMSNorm(h_t) . RMSNorm(k_t) / sqrt(D) )             (B, T)
    V~       = a_t v_t
    Y        = SiLU( CausalDepthwiseConv_{kernel 4, dilation max order}( RMSNorm(V~) ) ) + V~
    h_t     <- h_t + Y
Write: only by training (sparse row gradients through ops/gather; the table is in optimizer
group `engram_tables`, by default Adam at 5x the base learning rate without weight decay, as the
paper) or by the online updater (memory/sparse/online.py).

Per-namespace rows (the converged system, `user_rows_per_head` > 0): a `user:<id>` / `task:<id>`
namespace that has learned owns a table with the same hashing and its own primes
(memory/sparse/namespace_rows.py); a row of the call whose namespace (StepContext.namespace_of,
the serving engine's per-request one) has a table reads E_ns[hash_k(g_{t,n})] there and adds it
to e_t. Rows of other namespaces add nothing -- they compute exactly the knowledge-only read.

Because the rows depend only on token ids, `prepare` computes them before the first block runs
and, when the table is offloaded (host memory or a memory-mapped file), starts gathering them
in the background (memory/sparse/offload.py); the layer picks them up when it runs.

Deviations from the paper:
- placement: memstack's BLOCK site adds after block l, so `layers: [l]` is the paper's Engram
  in front of block l + 1 (the paper's layer 2 of 30 is `layers: [1]` here);
- one residual stream (no mHC multi-branch fusion, so one W_K rather than one per branch);
- the hash heads of an order share one multiplicative-XOR mix and differ in their prime modulus,
  exactly as DeepSeek's demo (the paper's text suggests independent hashes);
- `gate_sqrt` (off by default) adds the demo's signed square root of the gate score;
- W_V starts at std init_std / sqrt(2 n_layers) (like the backbone's output projections) so
  a fresh Engram perturbs the residual stream as little as a fresh block does (`value_init_std`
  sets another std: user rows on a frozen pretrained model without a trained W_V need it); the conv is
  zero-initialised as in the paper;
- N-grams and conv history continue across segments of a document (the paper trains on whole
  4k-token sequences; here a document may span many segments) and restart at a document start,
  where the positions before it are the pad id V'.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from memstack.backbone.layers import RMSNorm
from memstack.config import BackboneConfig
from memstack.memory.base import Memory, MemorySpec, Site, StepContext, dtype_bytes
from memstack.memory.sparse.config import EngramConfig
from memstack.memory.sparse.hashing import HashLayout, build_layout, ngram_rows
from memstack.memory.sparse.namespace_rows import NamespaceRows
from memstack.memory.sparse.table import NamespaceSpec, SparseTable

TABLE_GROUP = "engram_tables"


@dataclass
class EngramState:
    history: Tensor               # (B, max_order - 1) int64 compressed ids before the chunk (pad = none)
    conv: tuple[Tensor, ...]      # per Engram layer (B, (kernel - 1) * dilation, D): conv inputs before the chunk


class Engram(Memory):
    sites: ClassVar[frozenset[Site]] = frozenset({Site.BLOCK})

    def __init__(self, cfg: EngramConfig, backbone: BackboneConfig):
        super().__init__(cfg, backbone)
        tok = None
        if cfg.tokenizer is not None:
            from memstack.data.tokenizers import get_tokenizer

            tok = get_tokenizer(cfg.tokenizer)
        self.engram_layers = sorted(cfg.layers)
        self.slot = {l: i for i, l in enumerate(self.engram_layers)}
        layout = build_layout(backbone.vocab_size, len(self.engram_layers), cfg.orders, cfg.heads, cfg.rows_per_head,
                              cfg.seed, tok, cfg.compress)
        for name, t in layout.tensors().items():   # saved with the weights; compared on load
            self.register_buffer(f"layout_{name}", t.clone(), persistent=True)
        self._layout = layout
        D, L = backbone.d_model, len(self.engram_layers)
        self.table = SparseTable([NamespaceSpec("knowledge", layout.total_rows, "hashed")], cfg.head_dim,
                                 init_std=cfg.table_init_std)
        self.user_rows = None          # per-namespace rows (user / task tables): not parameters
        if cfg.user_rows_per_head:
            self._user_layout = build_layout(backbone.vocab_size, len(self.engram_layers), cfg.orders, cfg.heads,
                                             cfg.user_rows_per_head, cfg.seed, tok, cfg.compress)
            self.user_rows = NamespaceRows(self._user_layout.total_rows, cfg.head_dim, "hashed", cfg.user_write_quota)
        self.dilation = max(cfg.orders)
        self.hist = (cfg.kernel_size - 1) * self.dilation
        std = backbone.init_std
        self.w_k = nn.ModuleList(nn.Linear(cfg.d_mem, D, bias=False) for _ in range(L))
        self.w_v = nn.ModuleList(nn.Linear(cfg.d_mem, D, bias=False) for _ in range(L))
        self.norm_h = nn.ModuleList(RMSNorm(D, backbone.norm_eps) for _ in range(L))
        self.norm_k = nn.ModuleList(RMSNorm(D, backbone.norm_eps) for _ in range(L))
        self.norm_v = nn.ModuleList(RMSNorm(D, backbone.norm_eps) for _ in range(L))
        self.conv = nn.ParameterList(nn.Parameter(torch.zeros(D, cfg.kernel_size)) for _ in range(L))  # (D, kernel)
        with torch.no_grad():
            for lin in self.w_k:
                nn.init.normal_(lin.weight, 0.0, std)
            v_std = cfg.value_init_std if cfg.value_init_std is not None else std / math.sqrt(2 * backbone.n_layers)
            for lin in self.w_v:
                nn.init.normal_(lin.weight, 0.0, v_std)
            if not cfg.conv_zero_init:
                for w in self.conv:
                    nn.init.normal_(w, 0.0, std)

    @property
    def layout(self) -> HashLayout:
        """The hash layout, with its tensors wherever the module's buffers are (its device)."""
        lay = self._layout
        if self.layout_token_map.device == lay.token_map.device:
            return lay
        return HashLayout(self.layout_token_map, lay.compressed_vocab, lay.orders, lay.heads, self.layout_multipliers,
                          self.layout_sizes, self.layout_offsets, lay.tokenizer_fingerprint, lay.version)

    # -- bookkeeping ---------------------------------------------------------------------------
    def optim_group(self, name: str) -> str | None:
        return TABLE_GROUP if name == "table.weight" else None

    def optim_defaults(self) -> dict[str, Any]:
        from memstack.config import GroupConfig

        return {TABLE_GROUP: GroupConfig(optimizer="adam", lr_scale=5.0, weight_decay=0.0)}

    def check_loaded(self, saved: dict[str, Tensor]) -> list[str]:
        r = []
        for name, mine in self._layout.tensors().items():
            theirs = saved.get(f"layout_{name}")
            if theirs is None:
                r.append(f"the checkpoint has no hash layout ({name}); it was not written by this Engram")
            elif theirs.shape != mine.shape or not torch.equal(theirs.to(mine.dtype), mine):
                what = {"token_map": "token map (a different tokenizer or compression)",
                        "meta": "layout version / compressed vocabulary / tokenizer fingerprint"}.get(name, name)
                r.append(f"hash layout differs in {what}: the table rows would be read at the wrong places; "
                         f"refusing to load (this model derives layout {self._layout.fingerprint()})")
        return r

    def namespace_rows(self) -> NamespaceRows | None:
        return self.user_rows

    def namespace_layer(self) -> int | None:
        """User rows are read from the first memory layer's hook on (nothing else reads a namespace)."""
        return self.engram_layers[0] if self.user_rows is not None else None

    def user_layout_fingerprint(self) -> str | None:
        """What decides which user row an N-gram reads (a store of user rows records it)."""
        return self._user_layout.fingerprint() if self.user_rows is not None else None

    def make_identity(self) -> bool:
        with torch.no_grad():
            for lin in self.w_v:
                lin.weight.zero_()
        return True

    def init_state(self, batch: int, device: torch.device, dtype: torch.dtype) -> EngramState:
        hist = torch.full((batch, self._layout.max_order - 1), self._layout.pad_id, dtype=torch.long, device=device)
        conv = tuple(torch.zeros(batch, self.hist, self.backbone.d_model, device=device, dtype=dtype)
                     for _ in self.engram_layers)
        return EngramState(hist, conv)

    def reset(self, state: EngramState, mask: Tensor) -> EngramState:
        hist = state.history.masked_fill(mask[:, None], self._layout.pad_id)
        return EngramState(hist, tuple(c.masked_fill(mask[:, None, None], 0.0) for c in state.conv))

    def spec(self, dtype: torch.dtype = torch.float32) -> MemorySpec:
        fixed = (self._layout.max_order - 1) * 8 + len(self.engram_layers) * self.hist * self.backbone.d_model * dtype_bytes(dtype)
        return MemorySpec(fixed_bytes=fixed, dtype_bytes=dtype_bytes(dtype))

    # -- reading -------------------------------------------------------------------------------
    def rows(self, tokens: Tensor, history: Tensor) -> Tensor:
        """Table rows for every Engram layer: (L, B, T, n_orders * heads), local to `knowledge`."""
        lay = self.layout
        comp = torch.cat([history, lay.compress(tokens)], dim=1)       # (B, H + T)
        return torch.stack([ngram_rows(lay, j, comp) for j in range(len(self.engram_layers))])

    def prepare(self, state: EngramState, ctx: StepContext) -> None:
        rows = self.rows(ctx.tokens, state.history)                   # (L, B, T, heads_total)
        ctx.scratch[(id(self), "rows")] = rows
        from memstack.memory.sparse.offload import maybe_prefetch

        fut = maybe_prefetch(self.table, self.table.namespace("knowledge").to_global(rows))
        if fut is not None:
            ctx.scratch[(id(self), "prefetch")] = fut

    def _embeddings(self, j: int, state: EngramState, ctx: StepContext) -> Tensor:
        rows = ctx.scratch.get((id(self), "rows"))
        if rows is None:  # prepare was not called (a caller driving the hooks by hand)
            rows = self.rows(ctx.tokens, state.history)
            ctx.scratch[(id(self), "rows")] = rows
        fut = ctx.scratch.get((id(self), "prefetch"))
        pre = fut.result()[j] if fut is not None else None             # (B, T, heads_total, head_dim)
        e = self.table.namespace("knowledge").gather(rows[j], prefetched=pre)  # (B, T, heads_total, head_dim)
        user = self._user_rows(state, ctx)
        if user is not None:                                           # each row's own namespace; others untouched
            e = self.user_rows.add_to(e, user[0], user[1][j])          # (B, T, heads_total, head_dim)
        return e.flatten(2)                                            # (B, T, d_mem)

    def _user_rows(self, state: EngramState, ctx: StepContext) -> tuple[list, Tensor] | None:
        """(each row's namespace, user-layout rows (L, B, T, heads_total)) when a row of this call
        belongs to a namespace with rows; None otherwise (computed once per call)."""
        if self.user_rows is None or ctx.namespaces is None:
            return None
        key = (id(self), "user_rows")
        if key not in ctx.scratch:
            names = list(ctx.namespaces)
            got = None
            if self.user_rows.any_for(names):
                lay = self._user_layout
                comp = torch.cat([state.history, lay.compress(ctx.tokens)], dim=1)   # (B, H + T)
                got = (names, torch.stack([ngram_rows(lay, j, comp) for j in range(len(self.engram_layers))]))
            ctx.scratch[key] = got
        return ctx.scratch[key]

    def block(self, layer: int, h: Tensor, state: EngramState, ctx: StepContext) -> tuple[Tensor, EngramState]:
        j = self.slot[layer]
        real = ctx.real
        x = h[:, real]                                                  # (B, T, D)
        e = self._embeddings(j, state, ctx).to(x.dtype)                 # (B, T, d_mem)
        k = self.w_k[j](e)                                              # (B, T, D)
        v = self.w_v[j](e)                                              # (B, T, D)
        score = (self.norm_h[j](x) * self.norm_k[j](k)).sum(-1) / math.sqrt(x.shape[-1])  # (B, T)
        if self.cfg.gate_sqrt:
            score = score.abs().clamp_min(1e-6).sqrt() * score.sign()
        vt = torch.sigmoid(score)[..., None] * v                        # (B, T, D)
        u = self.norm_v[j](vt)                                          # (B, T, D)
        conv_state = state.conv
        if self.hist:
            full = torch.cat([state.conv[j].to(u.dtype), u], dim=1)    # (B, hist + T, D)
            y = F.conv1d(full.transpose(1, 2), self.conv[j].flip(-1)[:, None, :].to(u.dtype),
                         dilation=self.dilation, groups=u.shape[-1])    # (B, D, T)
            y = F.silu(y.transpose(1, 2)) + vt                          # (B, T, D)
            conv_state = list(state.conv)
            conv_state[j] = full[:, -self.hist:].clone()   # a slice would keep `full` alive
            conv_state = tuple(conv_state)
        else:
            y = F.silu(u * self.conv[j][:, 0]) + vt
        out = torch.cat([h[:, :real.start], x + y, h[:, real.stop:]], dim=1) if (real.start or real.stop < h.shape[1]) else x + y
        history = state.history
        if j == len(self.engram_layers) - 1:   # once per call, after the last Engram layer used it
            comp = torch.cat([state.history, self.layout.compress(ctx.tokens)], dim=1)
            history = comp[:, comp.shape[1] - state.history.shape[1]:].clone()
        return out, EngramState(history, conv_state)

    @classmethod
    def contract_configs(cls) -> list[dict]:
        return [{"layers": (0,), "rows_per_head": 13, "heads": 2, "head_dim": 4},
                {"layers": (0, 1), "orders": (2, 3, 4), "rows_per_head": 7, "heads": 3, "head_dim": 2, "gate_sqrt": True},
                {"layers": (1,), "orders": (2,), "kernel_size": 1, "rows_per_head": 1, "heads": 1, "head_dim": 8}]
