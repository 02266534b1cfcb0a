"""Per-user identity rows read as a key/value prefix: the third way to address user memory.

The converged system (issue 12) compares ways to address a user's memory: hashed N-gram rows
(Engram's `user_rows_per_head`), user value rows under product keys (PKM's `user_values`), and
this one -- a few *identity* rows per user, read as keys and values by every query of that
user's rows. It is prefix-tuning (Li & Liang, arXiv 2101.00190) per user, read the way
LLaMA-Adapter reads its adaption prompts (Zhang et al., arXiv 2303.16199, "zero-init attention"):
the prefix gets its own softmax and a gate, and its read is added to the layer's attention output

    o_b  <-  o_b + gate * softmax([q0_b K_u^T / sqrt(hd), 0])[:K] V_u     for the rows b of user u only

instead of entering the softmax of the context (plain prefix-tuning). That keeps the read of a
row without a table exactly the plain model's attention, computed by the same kernels (a shared
softmax would move every row's normalisation -- or give masked rows another reduction shape,
equal only to rounding), so one user's rows change no other row's output by a single bit.

What it stores: per namespace that has learned, one `SparseTable` (memory/sparse/namespace_rows.py,
addressing `identity`) of `layers used x user_prefix` rows; row j * K + p holds slot p's key and
value at layer slot j for every KV head, width 2 * kv_heads * head_dim. Nothing per example.
Read (ATTN site, `attn_out`, after the layer's attention): the rows of the call whose namespace
(StepContext.namespaces, set by the serving engine from the request's tenant and user) has a
table read their own K rows of that layer; other rows are returned untouched. A row that reads
two namespaces (a user's and a task's, StepContext.namespaces holding a tuple) reads each one's
prefix with its own softmax and adds both.
Write: only by the online updater (memory/sparse/online.py, lazy Adam on the rows the gradient
touched, through the namespace's WriteGrant, under the safety policy). A fresh table has zero
values -- it reads as exactly nothing, so a user who has learned nothing sees the plain model --
and random keys, N(0, user_key_init_std), drawn from a fixed seed (the same for every
namespace, so a user's exported delta means the same on another server): with all-zero keys
every slot would get the same gradient forever (uniform softmax, equal values) and the K slots
would stay one; distinct keys let different queries write and read different slots.

Deviations:
- a null slot: the prefix softmax has one more entry, a fixed score 0 with a zero value (an
  attention sink; "softmax plus one"), so a query can read (almost) nothing -- without it the
  weights over the K slots always sum to 1 and every token of the user's requests would read a
  mix of the user's values, general text included;
- the read is position-free: the query is un-rotated (RoPE at its own position undone), so the
  prefix keys sit at relative distance 0 from every query and a fact reads the same at any
  position (LLaMA-Adapter leaves the adapter keys unrotated against rotated queries, which makes
  the read depend on the query's absolute position);
- keys and values are stored directly per KV head (no MLP reparameterisation, no projection of
  prompt embeddings through the frozen W_K / W_V), and the gate is a fixed number (`user_gate`):
  the shared parameters stay frozen in the converged system, so a zero-initialised learned gate
  would never open.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from memstack.backbone.layers import apply_rope, rope_tables
from memstack.config import BackboneConfig
from memstack.memory.base import StepContext
from memstack.memory.sparse.namespace_rows import NamespaceRows


class UserPrefixRows:
    """`rows_per_layer` identity key/value rows per layer slot and namespace (see the module docstring)."""

    def __init__(self, backbone: BackboneConfig, n_layers: int, rows_per_layer: int, gate: float,
                 key_init_std: float, write_quota: int | None = None, seed: int = 0):
        self.backbone, self.n_layers, self.K, self.gate = backbone, n_layers, rows_per_layer, float(gate)
        self.key_init_std, self.seed = float(key_init_std), seed
        self.width = 2 * backbone.kv_heads * backbone.head_dim
        self.rows = NamespaceRows(n_layers * rows_per_layer, self.width, "identity", write_quota, init=self._init)

    def _init(self, weight: Tensor) -> None:
        """A fresh table: random keys from the fixed seed, zero values (reads as nothing)."""
        g = torch.Generator().manual_seed(self.seed)
        half = self.width // 2
        keys = torch.randn(weight.shape[0], half, generator=g) * self.key_init_std      # (rows, Hkv * hd)
        weight.view(weight.shape[0], 2, half)[:, 0].copy_(keys.to(weight.dtype))
        weight.view(weight.shape[0], 2, half)[:, 1].zero_()

    def fingerprint(self) -> str:
        """What decides which row a read uses and how a fresh table starts (a store of user rows records it)."""
        b = self.backbone
        return (f"identity-kv-v1:layers={self.n_layers}:rows={self.K}:kv_heads={b.kv_heads}:head_dim={b.head_dim}:"
                f"key_std={self.key_init_std!r}:seed={self.seed}")

    def add(self, j: int, q: Tensor, out: Tensor, ctx: StepContext) -> Tensor:
        """out (B, H, T', hd) of layer slot j plus, for each row, the gated read of the prefix rows
        of every namespace it reads that has a table (a user's and a task's: each its own prefix,
        both added) by q (B, H, T', hd, RoPE applied); rows reading no table are left untouched."""
        if ctx.namespaces is None:
            return out
        B, H, _, hd = q.shape
        local = (j * self.K + torch.arange(self.K, device=q.device)).expand(B, self.K)        # (B, K)
        for at, kv in self.rows.read(list(ctx.namespaces), local):     # (b,), (b, K, 2 * Hkv * hd)
            out = out.index_put((at.to(out.device),), out[at] + self.gate * self._read(q[at], kv, at, ctx))
        return out                                                     # out of place: others keep bits and strides

    def _read(self, q: Tensor, kv: Tensor, at: Tensor, ctx: StepContext) -> Tensor:
        """q (b, H, T', hd) of rows `at`, their prefix rows kv (b, K, 2 * Hkv * hd) -> (b, H, T', hd)."""
        b, H, T, hd = q.shape
        Hkv = self.backbone.kv_heads
        kv = kv.to(q.dtype).view(b, self.K, 2, Hkv, hd)
        k = kv[:, :, 0].transpose(1, 2).repeat_interleave(H // Hkv, 1)  # (b, H, K, hd)
        v = kv[:, :, 1].transpose(1, 2).repeat_interleave(H // Hkv, 1)
        pos = ctx.positions[at.to(ctx.positions.device)] if ctx.positions is not None else \
            (ctx.pos[at.to(ctx.pos.device)][:, None] + torch.arange(T, device=q.device))
        cos, sin = rope_tables(pos.to(q.device), hd, self.backbone.rope_theta, q.dtype)
        q0 = apply_rope(q, cos, -sin)                                  # (b, H, T', hd): RoPE undone
        s = (q0 @ k.transpose(-1, -2)).float() / math.sqrt(hd)         # (b, H, T', K)
        w = torch.softmax(torch.cat([s, s.new_zeros(s.shape[:-1] + (1,))], -1), dim=-1)[..., :-1].to(q.dtype)  # null slot
        return w @ v                                                   # (b, H, T', hd)


__all__ = ["UserPrefixRows"]
