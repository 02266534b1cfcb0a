"""Trellis: a learned, bounded KV memory (Karami, Behrouz, Kacham, Mirrokni; "Trellis: Learning to
Compress Key-Value Memory in Attention Models", arXiv 2512.23852, COLM 2025).

What it stores, per example, for every layer with a memory and every KV head: a key memory K and
a value memory V of `slots` rows each (m x head_dim, fp32 whatever the model's dtype), plus an
exact window of the last `window` past tokens' keys/values (post-RoPE, as a KV cache). The
state's size does not depend on how long the document is (MemorySpec: fixed bytes plus at most
`window` tokens).

Read. Each query q of the chunk (pre-RoPE, see below) addresses the slots with a normalized SiLU
instead of a softmax, phi(s) = silu(s) / ||silu(s)||, s = K q / sqrt(d), and reads o_mem = V^T
phi(K q). The attention output becomes out + g_h * o_mem with a learned gate g_h per query head
(0 at initialisation, so a fresh memory leaves the backbone unchanged). The exact part -- the
current segment (causal) and the window -- is the backbone's ordinary softmax attention.

Write (the test-time update, ops/trellis/). When a segment ends, the tokens that leave the exact
window (with window 0: the whole segment) are written in order, each by two online gradient steps:
  pass 1  a_t = phi(K k_t);  K <- (1 - alpha_t) K + theta_t a_t (k_t - K^T a_t)^T
  pass 2  b_t = phi(K k_t) with the *updated* K;  V <- (1 - alpha_t) V + theta_t b_t (v_t - V^T b_t)^T
i.e. gradient steps on 1/2||K^T a - k||^2 and 1/2||V^T b - v||^2 with a forget gate alpha_t and a
step size theta_t computed from the token, alpha_t = sigmoid(w_a . [k_t; v_t] + c_a) and
theta_t = sigmoid(w_t . [k_t; v_t] + c_t), learned per layer and KV head. The initial slots
(K_0 learned, V_0 learned from zero) are what a reset row returns to. Gradients flow through the
writes (into the gates, the initial slots, and the backbone's K/V projections) within the
trainer's BPTT window.

Segments and decoding. The memory is written only at segment ends, so a segment that arrives in
chunks (prefill, then token by token) reads the same memory as one processed whole; its tokens
wait in `pending` until the segment ends (the contract tests hold it to this).

Deviations from the paper (the full text was not available to us; the formulation follows its
abstract and the public descriptions of its Eqs. 13-14 -- see docs/benchmarks/trellis.md):
- Trellis is a standalone recurrent layer in the paper; here it is a memory attached to an
  ordinary softmax attention layer (exact current segment + optional exact window), sharing the
  layer's Q/K/V projections, so it can be put on any backbone (and a frozen pretrained one).
- the memory reads and writes RoPE-free keys and queries (the backbone's post-RoPE q/k rotated back
  by their positions): slots mix tokens from many positions, where a relative rotation means
  nothing (as Infini-attention does for its compressive memory).
- the inner gradients hold the address (a_t, b_t) fixed (no gradient through phi inside the
  inner step); the L2 retention term is folded into the forget gate alpha_t.
- theta_t uses a sigmoid (in (0, 1)) rather than a softplus: with ||a_t|| = 1 the per-token map
  (1 - alpha) I - theta a a^T then has spectral radius < 1, so the state stays bounded over any
  number of segments (tested over thousands).
- writes happen per segment (at segment ends), not per token: within a segment every token is
  seen exactly, so the memory only needs what has left the exact context.
- `write_chunk` (default 16): pass-1 addresses of the tokens of one chunk are computed from the key
  memory at the chunk's start (mini-batch test-time gradient descent, as in Titans), which makes
  the whole write parallel inside a chunk; gates, steps and pass 2 stay per token. write_chunk=1
  is the strict per-token recurrence (pass 1 then runs token by token, ~3x slower on CPU).
- normalisation of phi is by the L2 norm (one public reimplementation does the same); the
  paper's exact normalisation constant was not verified.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from memstack.backbone.layers import apply_rope, rope_tables
from memstack.config import BackboneConfig
from memstack.memory.base import AttnIO, KVBlock, Memory, MemorySpec, Site, StepContext, dtype_bytes, segment_so_far
from memstack.memory.kv.config import TrellisConfig
from memstack.ops.trellis import trellis_read, trellis_write


@dataclass
class TrellisState:
    K: tuple[Tensor, ...]          # per memory layer (B, Hkv, m, hd) fp32 key slots
    V: tuple[Tensor, ...]          # per memory layer (B, Hkv, m, hd) fp32 value slots
    win_k: tuple[Tensor, ...]      # per memory layer (B, Hkv, W, hd) exact window keys (post-RoPE)
    win_v: tuple[Tensor, ...]      # per memory layer (B, Hkv, W, hd)
    win_pos: Tensor                # (B, W) int64 positions of the window's tokens
    win_valid: Tensor              # (B, W) bool
    pend_k: tuple[Tensor, ...]     # per memory layer (B, Hkv, Tp, hd): this segment's keys so far (post-RoPE)
    pend_v: tuple[Tensor, ...]     # per memory layer (B, Hkv, Tp, hd)
    pend_pos: Tensor               # (B, Tp)


def _unrotate(x: Tensor, positions: Tensor, theta: float) -> Tensor:
    """Undo RoPE: x (B, H, T, hd) rotated at positions (B, T) -> the unrotated vectors."""
    cos, sin = rope_tables(positions, x.shape[-1], theta, x.dtype)
    return apply_rope(x, cos, -sin)


class Trellis(Memory):
    sites: ClassVar[frozenset[Site]] = frozenset({Site.ATTN})

    def __init__(self, cfg: TrellisConfig, backbone: BackboneConfig):
        super().__init__(cfg, backbone)
        self.mem_layers = [l for l in range(backbone.n_layers) if self.applies_to(l)]
        self.slot = {l: i for i, l in enumerate(self.mem_layers)}
        self.first, self.last = self.mem_layers[0], self.mem_layers[-1]
        L, Hkv, H, m, hd = len(self.mem_layers), backbone.kv_heads, backbone.n_heads, cfg.slots, backbone.head_dim
        logit = lambda p: math.log(p / (1 - p))  # noqa: E731
        self.k_init = nn.Parameter(torch.randn(L, Hkv, m, hd) * cfg.init_key_std)   # learned initial key slots
        self.v_init = nn.Parameter(torch.zeros(L, Hkv, m, hd))                      # learned initial value slots
        self.w_alpha = nn.Parameter(torch.zeros(L, Hkv, 2 * hd))                    # forget gate from [k; v]
        self.b_alpha = nn.Parameter(torch.full((L, Hkv), logit(cfg.init_alpha)))
        self.w_theta = nn.Parameter(torch.zeros(L, Hkv, 2 * hd))                    # step size from [k; v]
        self.b_theta = nn.Parameter(torch.full((L, Hkv), logit(cfg.init_theta)))
        self.gate = nn.Parameter(torch.full((L, H), cfg.gate_init))                 # output gate per query head

    # -- state ---------------------------------------------------------------------------------
    def init_state(self, batch: int, device: torch.device, dtype: torch.dtype) -> TrellisState:
        b, L = self.backbone, len(self.mem_layers)
        kv = lambda: torch.zeros(batch, b.kv_heads, 0, b.head_dim, device=device, dtype=dtype)  # noqa: E731
        pos = torch.zeros(batch, 0, dtype=torch.long, device=device)
        return TrellisState(
            tuple(self.k_init[j].float().expand(batch, -1, -1, -1).to(device) for j in range(L)),
            tuple(self.v_init[j].float().expand(batch, -1, -1, -1).to(device) for j in range(L)),
            tuple(kv() for _ in range(L)), tuple(kv() for _ in range(L)), pos, pos.bool(),
            tuple(kv() for _ in range(L)), tuple(kv() for _ in range(L)), pos)

    def reset(self, state: TrellisState, mask: Tensor) -> TrellisState:
        m = mask[:, None, None, None]
        K = tuple(torch.where(m, self.k_init[j].float(), K) for j, K in enumerate(state.K))
        V = tuple(torch.where(m, self.v_init[j].float(), V) for j, V in enumerate(state.V))
        return TrellisState(K, V, state.win_k, state.win_v, state.win_pos, state.win_valid & ~mask[:, None],
                            state.pend_k, state.pend_v, state.pend_pos)

    def spec(self, dtype: torch.dtype = torch.float32) -> MemorySpec:
        b, L = self.backbone, len(self.mem_layers)
        fixed = 2 * L * b.kv_heads * self.cfg.slots * b.head_dim * 4               # K and V slots, fp32
        per_tok = 2 * L * b.kv_heads * b.head_dim * dtype_bytes(dtype) + 8 + 1      # window K, V, pos, valid
        # slack: a segment's keys/values wait in `pending` until it ends (decoding in pieces)
        return MemorySpec(bytes_per_token=per_tok, fixed_bytes=fixed, max_tokens=self.cfg.window,
                          slack_tokens=b.seg_len, dtype_bytes=4)

    def make_identity(self) -> bool:
        if self.cfg.window:
            return False  # the exact window changes the output by itself
        with torch.no_grad():
            self.gate.zero_()
        return True

    # -- sites ---------------------------------------------------------------------------------
    def attn(self, io: AttnIO, state: TrellisState, ctx: StepContext) -> tuple[KVBlock | None, TrellisState]:
        j = self.slot[io.layer]
        block = KVBlock(state.win_k[j], state.win_v[j], state.win_valid) if state.win_pos.shape[1] else None
        pk, pv = list(state.pend_k), list(state.pend_v)
        pk[j] = segment_so_far(state.pend_k[j], io.k[:, :, ctx.real], ctx, dim=2)  # (B, Hkv, Tp+T, hd)
        pv[j] = segment_so_far(state.pend_v[j], io.v[:, :, ctx.real], ctx, dim=2)
        pend_pos = state.pend_pos
        if io.layer == self.first:  # shared by all layers: extended once, before any layer ends the segment
            pend_pos = segment_so_far(state.pend_pos, ctx.positions[:, ctx.real], ctx)
        return block, TrellisState(state.K, state.V, state.win_k, state.win_v, state.win_pos, state.win_valid,
                                   tuple(pk), tuple(pv), pend_pos)

    def attn_out(self, layer: int, q: Tensor, out: Tensor, state: TrellisState, ctx: StepContext) -> tuple[Tensor, TrellisState]:
        j = self.slot[layer]
        theta = self.backbone.rope_theta
        q0 = _unrotate(q, ctx.positions, theta)                                     # (B, H, T', hd) RoPE-free
        o_mem = trellis_read(state.K[j], state.V[j], q0)                            # (B, H, T', hd) fp32
        out = out + (self.gate[j][None, :, None, None] * o_mem).to(out.dtype)
        if ctx.seg_end:
            state = self._end_segment(j, layer, state)
        return out, state

    def _end_segment(self, j: int, layer: int, state: TrellisState) -> TrellisState:
        """Move this layer's pending tokens into the window; write what leaves it into the slots."""
        W = self.cfg.window
        # win_pos / win_valid / pend_pos are shared by all layers: every layer sees the old window
        # and the whole pending segment here; the last memory layer updates them
        pos_all = torch.cat([state.win_pos, state.pend_pos], dim=1)                  # (B, N)
        n_tok = pos_all.shape[1]
        n_out = max(n_tok - W, 0)
        ones = torch.ones(pos_all.shape[0], n_tok - state.win_pos.shape[1], dtype=torch.bool, device=pos_all.device)
        valid_all = torch.cat([state.win_valid, ones], dim=1)
        k_all = torch.cat([state.win_k[j], state.pend_k[j]], dim=2)                   # (B, Hkv, N, hd)
        v_all = torch.cat([state.win_v[j], state.pend_v[j]], dim=2)
        K, V = list(state.K), list(state.V)
        if n_out:
            k0 = _unrotate(k_all[:, :, :n_out], pos_all[:, :n_out], self.backbone.rope_theta).float()
            v0 = v_all[:, :, :n_out].float()
            ok = valid_all[:, None, :n_out, None]
            if not bool((torch.isfinite(k0) | ~ok).all() and (torch.isfinite(v0) | ~ok).all()):
                raise FloatingPointError(f"trellis: refusing to write non-finite keys/values into the memory of "
                                         f"layer {layer}; the state passed in is left as it was")
            alpha, th = self._gates(j, k0, v0)
            K[j], V[j] = trellis_write(state.K[j], state.V[j], k0, v0, alpha, th, valid_all[:, :n_out],
                                       chunk=self.cfg.write_chunk)
        # the kept window is copied out: a view would keep the whole segment's buffer alive
        wk, wv, pk, pv = list(state.win_k), list(state.win_v), list(state.pend_k), list(state.pend_v)
        wk[j], wv[j] = k_all[:, :, n_out:].clone(), v_all[:, :, n_out:].clone()
        pk[j], pv[j] = k_all.new_zeros(k_all[:, :, :0].shape), v_all.new_zeros(v_all[:, :, :0].shape)
        win_pos, win_valid, pend_pos = state.win_pos, state.win_valid, state.pend_pos
        if layer == self.last:  # bookkeeping shared by all layers: once, at the last
            win_pos, win_valid = pos_all[:, n_out:].clone(), valid_all[:, n_out:].clone()
            pend_pos = pos_all.new_zeros(pos_all.shape[0], 0)
        return TrellisState(tuple(K), tuple(V), tuple(wk), tuple(wv), win_pos, win_valid, tuple(pk), tuple(pv), pend_pos)

    def _gates(self, j: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """alpha_t, theta_t (B, Hkv, N) from the token's RoPE-free key and value (B, Hkv, N, hd)."""
        x = torch.cat([k, v], dim=-1)                                                # (B, Hkv, N, 2hd)
        za = (x * self.w_alpha[j][None, :, None]).sum(-1) + self.b_alpha[j][None, :, None]
        zt = (x * self.w_theta[j][None, :, None]).sum(-1) + self.b_theta[j][None, :, None]
        # alpha < 1 - 1e-6 keeps log(1 - alpha) finite in the chunked update
        return torch.sigmoid(za).clamp(max=1 - 1e-6), torch.sigmoid(zt)

    @classmethod
    def contract_configs(cls) -> list[dict]:
        return [{"slots": 8}, {"slots": 4, "window": 20, "write_chunk": 1}, {"slots": 6, "layers": [1], "window": 7, "write_chunk": 5}]
