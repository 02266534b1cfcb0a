"""LM2: Large Memory Models (Kang et al., arXiv 2502.06049), implemented from the paper only
(the authors' code is CC BY-NC and was not read).

What it stores: per layer with memory, a memory bank M of `n_slots` vectors of width d_model,
initialised to rows of the identity matrix (the paper's identity initialisation) and carried
from segment to segment (with gradients across the segments of a training step, under the
trainer's BPTT policy).

Read (every token, after the block -- see deviations): the tokens query the bank by multi-head
cross-attention and an output gate scales what comes back before it joins the residual stream,
which keeps the original information flow and adds a memory pathway:
    x = RMSNorm(h);  E_mem = softmax((x W_q)(M W_k)^T / sqrt(d_h)) (M W_v)      (B, T, D)
    g_out = sigmoid(E_mem W_out + b_out);  h <- h + g_out * E_mem
Write (at each segment end, from the whole segment): LSTM-style input and forget gates,
    C = softmax((M W_q')(x W_k')^T / sqrt(d_h)) (x W_v')                         (B, N, D)
    g_in = sigmoid(C W_in + b_in);  g_forget = sigmoid(C W_f + b_f)
    M <- g_in * tanh(C) + g_forget * M
Tokens of a segment read the bank as it was when the segment started, so nothing leaks from a
token to earlier tokens, and a segment decoded token by token reads and writes exactly what it
would whole (the segment's normalised inputs wait in `pending` until it ends).

Deviations from the paper (whose equations are per token, and whose description leaves the
slot/token alignment of the write open):
- the bank is updated once per segment, not per token. The paper's update
  M <- g_in * tanh(E_mem) + g_forget * M mixes token-aligned E_mem into slot-aligned M; we make it
  slot-aligned by letting each slot query the segment (C above: the slot's own "E_mem"), and
  compute both gates from C (the paper takes g_in from the input and g_forget from E_mem, which
  in slot space are both C).
- the read joins the residual stream after the block's MLP (the BLOCK site), not between the
  attention and the MLP of the same block; the next block sees it.
- the gated output is g_out * E_mem (the paper writes the gate applied to the memory output).
- no output projection after the read heads; separate projections for read and write.
- forget-gate bias starts at `forget_bias` (1.0: keep by default, common LSTM practice); the
  paper gives no initialisation. n_slots <= d_model (identity rows); the paper's 2048 slots are
  a large-model setting.
- state is explicit and reset per document (the authors' code keeps a buffer across batches).
`make_identity` zeroes the read values (W_v), which makes E_mem = 0 and the block unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from memstack.backbone.layers import RMSNorm
from memstack.config import BackboneConfig
from memstack.memory.base import Memory, MemorySpec, Site, StepContext, dtype_bytes, segment_so_far
from memstack.memory.learned.config import LM2Config


@dataclass
class LM2State:
    mem: tuple[Tensor, ...]        # per memory layer (B, N, D): the bank
    pending: tuple[Tensor, ...]    # per memory layer (B, Tp, D): this segment's normalised inputs so far


class LM2Layer(nn.Module):
    """Read and write weights of one layer's memory bank."""

    def __init__(self, cfg: LM2Config, backbone: BackboneConfig):
        super().__init__()
        D = backbone.d_model
        self.n_heads = cfg.n_heads
        self.norm = RMSNorm(D, backbone.norm_eps)
        lin = lambda bias=False: nn.Linear(D, D, bias=bias)  # noqa: E731
        self.read_q, self.read_k, self.read_v, self.gate_out = lin(), lin(), lin(), lin(True)
        self.write_q, self.write_k, self.write_v = lin(), lin(), lin()
        self.gate_in, self.gate_forget = lin(True), lin(True)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, cfg.init_std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.constant_(self.gate_forget.bias, cfg.forget_bias)

    def _heads(self, x: Tensor) -> Tensor:
        B, T, D = x.shape
        return x.view(B, T, self.n_heads, D // self.n_heads).transpose(1, 2)   # (B, nh, T, hd)

    def _cross(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Multi-head attention of every query over every key (no mask): (B, Tq, D)."""
        o = F.scaled_dot_product_attention(self._heads(q), self._heads(k), self._heads(v))
        return o.transpose(1, 2).reshape(q.shape)

    def read(self, x: Tensor, mem: Tensor) -> Tensor:
        """x (B, T, D) normalised inputs, mem (B, N, D) -> gated memory output (B, T, D)."""
        e = self._cross(self.read_q(x), self.read_k(mem), self.read_v(mem))   # (B, T, D)
        return torch.sigmoid(self.gate_out(e)) * e

    def write(self, x: Tensor, mem: Tensor) -> Tensor:
        """x (B, T, D) the segment's normalised inputs, mem (B, N, D) -> the new bank (B, N, D)."""
        c = self._cross(self.write_q(mem), self.write_k(x), self.write_v(x))  # (B, N, D)
        return torch.sigmoid(self.gate_in(c)) * torch.tanh(c) + torch.sigmoid(self.gate_forget(c)) * mem


class LM2(Memory):
    sites: ClassVar[frozenset[Site]] = frozenset({Site.BLOCK})

    def __init__(self, cfg: LM2Config, backbone: BackboneConfig):
        super().__init__(cfg, backbone)
        self.mem_layers = [l for l in range(backbone.n_layers) if self.applies_to(l)]
        self.slot = {l: i for i, l in enumerate(self.mem_layers)}
        self.banks = nn.ModuleList(LM2Layer(cfg, backbone) for _ in self.mem_layers)

    def _initial(self, batch: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        eye = torch.eye(self.cfg.n_slots, self.backbone.d_model, device=device, dtype=dtype)   # (N, D)
        return eye.expand(batch, -1, -1)

    def init_state(self, batch: int, device: torch.device, dtype: torch.dtype) -> LM2State:
        empty = torch.zeros(batch, 0, self.backbone.d_model, device=device, dtype=dtype)
        return LM2State(tuple(self._initial(batch, device, dtype).clone() for _ in self.mem_layers),
                        tuple(empty for _ in self.mem_layers))

    def reset(self, state: LM2State, mask: Tensor) -> LM2State:
        m = mask[:, None, None]
        return LM2State(tuple(torch.where(m, self._initial(M.shape[0], M.device, M.dtype), M) for M in state.mem),
                        state.pending)

    def spec(self, dtype: torch.dtype = torch.float32) -> MemorySpec:
        db = dtype_bytes(dtype)
        return MemorySpec(fixed_bytes=len(self.mem_layers) * self.cfg.n_slots * self.backbone.d_model * db, dtype_bytes=db)

    def block(self, layer: int, h: Tensor, state: LM2State, ctx: StepContext) -> tuple[Tensor, LM2State]:
        j = self.slot[layer]
        bank = self.banks[j]
        x = bank.norm(h)                                               # (B, T', D)
        mem = state.mem[j]
        out = h + bank.read(x, mem).to(h.dtype)
        pend, mems = list(state.pending), list(state.mem)
        seg = segment_so_far(state.pending[j], x[:, ctx.real], ctx)    # (B, Tp + T, D)
        if ctx.seg_end:
            mems[j] = bank.write(seg, mem).to(mem.dtype)                # the bank keeps its dtype (fp32)
            pend[j] = seg.new_zeros(seg.shape[0], 0, seg.shape[2])
        else:
            pend[j] = seg
        return out, LM2State(tuple(mems), tuple(pend))

    def make_identity(self) -> bool:
        with torch.no_grad():
            for bank in self.banks:
                bank.read_v.weight.zero_()
        return True

    @classmethod
    def contract_configs(cls) -> list[dict]:
        return [{"n_slots": 8, "n_heads": 2}, {"n_slots": 4, "n_heads": 1, "layers": [0]}]
