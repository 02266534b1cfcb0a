"""Perceiver IO output queries (Jaegle et al., arXiv 2107.14795): decoding a structured output of
any size from a latent array.

Perceiver IO adds a decoder to the Perceiver: an *output query array* of O vectors -- one per
output element, built from that element's features (a position, a task or field embedding) or
learned -- cross-attends to the latent array, and each attended query goes through an MLP and a
head. The cost is O(O x N) for N latents, independent of the input's size, and the output can
have any shape: the queries decide what is decoded and how many outputs there are.

Here the latent array is the `latents` memory's state (memory/learned/latents.py: the latents
cross-attend to each segment and are carried onward); `OutputQueries` decodes from
`LatentState.z`, so this is an extension of `latents` that reads its state, not a memory of its
own (it touches no site of the backbone, holds no state, and therefore is not in the registry or
the contract suite). What it computes, for latents Z (B, N, D) and queries Q (B, O, D):

    U = XAttn(norm_q(Q), norm_z(Z))            (multi-head, no mask: every query sees every latent;
                                                 + Q only with query_residual=True)
    U = U + MLP(norm_u(U))                      (SwiGLU)
    out = norm_out(U)                           (B, O, D) -> any head (the backbone's LM head here)

No query residual by default, as the official implementation's decoder (deepmind-research
perceiver.py: `BasicDecoder(use_query_residual=False)`; the encoder keeps it). Measured
(docs/benchmarks/perceiver-io.md): with the residual the decoder's output starts as the query
itself (the field's embedding), and on record extraction it never left chance in 600 steps
(loss flat at ln 16); without it, the same run learned (0.255 field accuracy, chance 0.0625).

`output_queries_reference` is the same computation written with explicit per-head loops (tests
compare them). The queries are either the decoder's own learned array (`n_queries` > 0) or given
per call -- e.g. the token embeddings of the field ids to decode, so one decoder answers any
subset of fields (benchmarks/learned/perceiver_io.py).

Deviations from the paper: one decoder cross-attention (the paper also uses one) with a SwiGLU
MLP and RMSNorm (the backbone's blocks) instead of GELU and LayerNorm; the query features are
token embeddings of the fields rather than Fourier or learned position features.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from memstack.backbone.layers import RMSNorm, SwiGLU


class OutputQueries(nn.Module):
    """Perceiver IO's decoder: output queries cross-attend to a latent array (see the module docstring)."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int, *, n_queries: int = 0, eps: float = 1e-5,
                 init_std: float = 0.02, query_residual: bool = False):
        super().__init__()
        self.query_residual = query_residual
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.n_heads = n_heads
        self.queries = nn.Parameter(torch.randn(n_queries, d_model) * init_std) if n_queries else None  # (O, D)
        self.norm_q, self.norm_z, self.norm_u, self.norm_out = (RMSNorm(d_model, eps) for _ in range(4))
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(d_model, d_model, bias=False) for _ in range(4))
        self.mlp = SwiGLU(d_model, d_ff)
        for p in [self.wq.weight, self.wk.weight, self.wv.weight, self.wo.weight, *self.mlp.parameters()]:
            nn.init.normal_(p, 0.0, init_std)

    def forward(self, z: Tensor, queries: Tensor | None = None) -> Tensor:
        """z (B, N, D) latents; queries (B, O, D), or None for the learned array -> (B, O, D)."""
        B, N, D = z.shape
        if queries is None:
            if self.queries is None:
                raise ValueError("this decoder has no learned queries (n_queries=0): pass queries")
            queries = self.queries.to(z.dtype).expand(B, -1, -1)
        O, H = queries.shape[1], self.n_heads
        heads = lambda t, n: t.view(B, n, H, D // H).transpose(1, 2)        # noqa: E731  (B, H, n, D/H)
        q = heads(self.wq(self.norm_q(queries)), O)
        zn = self.norm_z(z)
        k, v = heads(self.wk(zn), N), heads(self.wv(zn), N)
        a = F.scaled_dot_product_attention(q, k, v)                           # (B, H, O, D/H)
        u = self.wo(a.transpose(1, 2).reshape(B, O, D))
        if self.query_residual:
            u = queries + u
        u = u + self.mlp(self.norm_u(u))
        return self.norm_out(u)                                                # (B, O, D)


def output_queries_reference(dec: OutputQueries, z: Tensor, queries: Tensor) -> Tensor:
    """The decoder written out: per example, query and head, softmax over the latents (fp64)."""
    B, N, D = z.shape
    O, H = queries.shape[1], dec.n_heads
    d = D // H
    rms = lambda x, norm: x / torch.sqrt((x * x).mean(-1, keepdim=True) + norm.eps) * norm.weight.double()  # noqa: E731
    zd, qd = z.double(), queries.double()
    W = {n: getattr(dec, n).weight.double() for n in ("wq", "wk", "wv", "wo")}
    out = torch.zeros(B, O, D, dtype=torch.float64)
    for b in range(B):
        zn = rms(zd[b], dec.norm_z)
        qn = rms(qd[b], dec.norm_q)
        for o in range(O):
            heads = []
            for h in range(H):
                sl = slice(h * d, (h + 1) * d)
                qv = W["wq"][sl] @ qn[o]                                       # (d,)
                scores = torch.stack([qv @ (W["wk"][sl] @ zn[n]) for n in range(N)]) / math.sqrt(d)
                p = torch.softmax(scores, 0)
                heads.append(sum(p[n] * (W["wv"][sl] @ zn[n]) for n in range(N)))
            u = W["wo"] @ torch.cat(heads) + (qd[b, o] if dec.query_residual else 0.0)
            m = dec.mlp
            un = rms(u, dec.norm_u)
            g = F.silu(m.w_gate.weight.double() @ un) * (m.w_up.weight.double() @ un)
            u = u + m.w_down.weight.double() @ g
            out[b, o] = rms(u, dec.norm_out)
    return out


__all__ = ["OutputQueries", "output_queries_reference"]
