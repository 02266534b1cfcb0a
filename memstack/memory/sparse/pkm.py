"""Product-key memory (Lample et al., arXiv 1907.05242) and Memory+ (Berges et al., "Memory
Layers at Scale", arXiv 2412.09764).

What it stores: a value pool -- a `SparseTable` of n_keys**2 rows (namespace `knowledge`,
product-key addressing), shared by all memory layers under Memory+ (one pool per layer
otherwise) -- and, per layer, a query projection and two sets of n_keys sub-keys per head.
It is stateless across tokens: nothing is carried per example.

Read (at each chosen layer, BLOCK site, every position of the extended chunk):
    x        = RMSNorm(h)
    q        = RMSNorm(W_q x) per head, split in halves q1, q2            (k_dim / 2 each)
    s1, s2   = q1 . K1, q2 . K2; top-knn of each                          (n_keys sub-keys per half)
    cand     = s1[i] + s2[j] over the knn x knn pairs; top-knn of them -> rows i * n_keys + j
    w        = softmax over the knn scores
    read     = sum over heads and the knn rows of w * V[row]              (only these rows get gradient)
    out      = W_o (read * SiLU(W_g x))      (Memory+)   |   W_o read   (plain PKM)
    h       <- h + out
Write: training only, by sparse row gradients (optimizer group `pkm_values`, by default Adam at
10x the base learning rate without weight decay, the Memory+ recipe's values LR 1e-3 vs 1e-4).

Deviations from the papers:
- the query is normalised by RMSNorm (Memory+'s qk-norm) instead of PKM's BatchNorm, whose
  batch statistics would make one example's output depend on the others in its batch;
- the memory is added after a block (BLOCK site) instead of replacing the block's FFN;
- values are read by gather + weighted sum (ops/gather) rather than a fused EmbeddingBag
  kernel, and column sharding of values is not implemented (row sharding is, memory/sparse/shard.py);
- W_o is zero-initialised, so a fresh memory leaves the backbone unchanged (`out_init_std`: random);
- `user_values` (the converged system): a namespace's own value pool, read at the same product-key
  addresses and added to the shared values, for the rows of a call in that namespace only.
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from memstack.backbone.layers import RMSNorm
from memstack.config import BackboneConfig
from memstack.memory.base import Memory, Site, StepContext
from memstack.memory.sparse.config import PKMConfig
from memstack.memory.sparse.namespace_rows import NamespaceRows
from memstack.memory.sparse.table import NamespaceSpec, SparseTable

VALUES_GROUP = "pkm_values"


def product_key_topk(q: Tensor, keys: Tensor, knn: int) -> tuple[Tensor, Tensor]:
    """q (..., heads, k_dim), keys (heads, 2, n_keys, k_dim/2) -> (scores (..., heads, knn), rows
    (..., heads, knn) in [0, n_keys**2)), scores sorted descending."""
    n_keys = keys.shape[2]
    half = q.shape[-1] // 2
    s1 = torch.einsum("...hd,hnd->...hn", q[..., :half], keys[:, 0])      # (..., heads, n_keys)
    s2 = torch.einsum("...hd,hnd->...hn", q[..., half:], keys[:, 1])
    v1, i1 = s1.topk(knn, dim=-1)                                          # (..., heads, knn)
    v2, i2 = s2.topk(knn, dim=-1)
    cand = (v1[..., :, None] + v2[..., None, :]).flatten(-2)              # (..., heads, knn*knn)
    rows = (i1[..., :, None] * n_keys + i2[..., None, :]).flatten(-2)
    best, at = cand.topk(knn, dim=-1)                                      # (..., heads, knn)
    return best, rows.gather(-1, at)


class ProductKeyMemory(Memory):
    sites: ClassVar[frozenset[Site]] = frozenset({Site.BLOCK})

    def __init__(self, cfg: PKMConfig, backbone: BackboneConfig):
        super().__init__(cfg, backbone)
        D = backbone.d_model
        self.mem_layers = sorted(cfg.layers)
        self.slot = {l: i for i, l in enumerate(self.mem_layers)}
        L = len(self.mem_layers)
        self.value_dim = cfg.value_dim or D
        self.pool_rows = cfg.n_keys ** 2
        pools = 1 if cfg.shared_values else L
        self.values = SparseTable([NamespaceSpec("knowledge", pools * self.pool_rows, "product_key")], self.value_dim,
                                  init_std=cfg.value_init_std)
        self.user_rows = NamespaceRows(pools * self.pool_rows, self.value_dim, "product_key", cfg.user_write_quota) \
            if cfg.user_values else None    # per-namespace value pools (not parameters)
        std = backbone.init_std
        self.norm_x = nn.ModuleList(RMSNorm(D, backbone.norm_eps) for _ in range(L))
        self.w_q = nn.ModuleList(nn.Linear(D, cfg.heads * cfg.k_dim, bias=False) for _ in range(L))
        self.norm_q = nn.ModuleList(RMSNorm(cfg.k_dim, backbone.norm_eps) for _ in range(L))
        # sub-keys: uniform on the sphere-ish, like PKM's init (scaled by 1/sqrt(k_dim/2))
        self.keys = nn.ParameterList(nn.Parameter(torch.randn(cfg.heads, 2, cfg.n_keys, cfg.k_dim // 2) / (cfg.k_dim / 2) ** 0.5)
                                     for _ in range(L))
        self.w_o = nn.ModuleList(nn.Linear(self.value_dim, D, bias=False) for _ in range(L))
        self.w_g = nn.ModuleList(nn.Linear(D, self.value_dim, bias=False) for _ in range(L)) if cfg.memory_plus else None
        with torch.no_grad():
            for lin in self.w_q:
                nn.init.normal_(lin.weight, 0.0, std)
            for lin in self.w_o:
                if cfg.out_init_std is None:
                    lin.weight.zero_()
                else:
                    nn.init.normal_(lin.weight, 0.0, cfg.out_init_std)
            for lin in self.w_g or []:
                nn.init.normal_(lin.weight, 0.0, std)

    def optim_group(self, name: str) -> str | None:
        if name == "values.weight":
            return VALUES_GROUP
        return "no_decay" if name.startswith("keys.") else None

    def optim_defaults(self) -> dict[str, Any]:
        from memstack.config import GroupConfig

        return {VALUES_GROUP: GroupConfig(optimizer="adam", lr_scale=10.0, weight_decay=0.0)}

    def namespace_rows(self) -> NamespaceRows | None:
        return self.user_rows

    def namespace_layer(self) -> int | None:
        """User rows are read from the first memory layer's hook on (nothing else reads a namespace)."""
        return self.mem_layers[0] if self.user_rows is not None else None

    def make_identity(self) -> bool:
        with torch.no_grad():
            for lin in self.w_o:
                lin.weight.zero_()
        return True

    def lookup(self, j: int, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (..., D) normed input of layer slot j -> (weights (..., heads, knn), local rows (..., heads, knn))."""
        c = self.cfg
        q = self.norm_q[j](self.w_q[j](x).unflatten(-1, (c.heads, c.k_dim)))  # (..., heads, k_dim)
        scores, rows = product_key_topk(q, self.keys[j], c.knn)
        pool = 0 if c.shared_values else j
        return F.softmax(scores.float(), dim=-1).to(x.dtype), rows + pool * self.pool_rows

    def block(self, layer: int, h: Tensor, state: Any, ctx: StepContext) -> tuple[Tensor, Any]:
        j = self.slot[layer]
        x = self.norm_x[j](h)                                                # (B, T', D)
        w, rows = self.lookup(j, x)                                          # (B, T', heads, knn)
        vals = self.values.namespace("knowledge").gather(rows).to(x.dtype)   # (B, T', heads, knn, Dv)
        if self.user_rows is not None and ctx.namespaces is not None:    # each row's own values, same addresses
            vals = self.user_rows.add_to(vals, list(ctx.namespaces), rows)  # (B, T', heads, knn, Dv)
        read = (w[..., None] * vals).sum(dim=(-3, -2))                       # (B, T', Dv)
        if self.w_g is not None:
            read = read * F.silu(self.w_g[j](x))
        return h + self.w_o[j](read), state

    @classmethod
    def contract_configs(cls) -> list[dict]:
        return [{"layers": (0,), "n_keys": 6, "k_dim": 8, "heads": 2, "knn": 3},
                {"layers": (0, 1), "n_keys": 5, "k_dim": 6, "heads": 1, "knn": 5, "memory_plus": False,
                 "shared_values": False, "value_dim": 12}]
