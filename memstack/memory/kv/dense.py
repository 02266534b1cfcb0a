"""Dense KV cache: the keys and values of past tokens, per layer, in contiguous buffers.

What it stores: for every layer, K and V (after RoPE) of the tokens held, plus a per-example
validity mask (rows reset at a document boundary become invisible at once).
Read: every layer attends over [held K/V; chunk]. Write: the chunk's K/V are appended.

Two paths, one result (tests compare them):
- inference (no gradient): buffers with doubling capacity, written in place through the
  HF-style per-layer face `state.update(layer, k, v) -> (k_all, v_all)`; the returned block
  already ends with the chunk, so decoding a token copies nothing but that token's K/V.
- training: functional appends of *detached* K/V (stop-gradient into past segments, as
  Transformer-XL), because an in-place write would clobber tensors autograd saved earlier.

scope="segment" clears the cache when a segment starts: the decode cache. scope="document"
keeps everything (full attention over the document) or, with `window`, the last `window`
tokens at each segment end (sliding-window attention at segment granularity).

A state of this memory is updated in place on the inference path: do not reuse a state object
after passing it to the model (save it, or `memstack.memory.state.tree_map(torch.clone, s)`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from memstack.config import BackboneConfig
from memstack.memory.base import AttnIO, KVBlock, Memory, MemorySpec, Site, StepContext, dtype_bytes
from memstack.memory.kv.config import DenseKVConfig


@dataclass
class DenseKVState:
    k: list[Tensor]    # per layer (B, kv_heads, C, head_dim); slots [0, length) are filled
    v: list[Tensor]    # per layer (B, kv_heads, C, head_dim)
    valid: Tensor      # (B, C) bool
    length: int        # filled slots, shared by every row and layer

    @property
    def capacity(self) -> int:
        return self.valid.shape[1]

    def _grow(self, need: int) -> None:
        cap = max(2 * self.capacity, need)
        for store in (self.k, self.v):
            for i, buf in enumerate(store):
                # zeros, not empty: the spare capacity is part of the state -- saved to disk, compared
                # -- and must not carry whatever bytes the allocator had (NaN patterns included)
                new = buf.new_zeros(buf.shape[0], buf.shape[1], cap, buf.shape[3])
                new[:, :, : self.length] = buf[:, :, : self.length]
                store[i] = new
        valid = self.valid.new_zeros(self.valid.shape[0], cap)
        valid[:, : self.length] = self.valid[:, : self.length]
        self.valid = valid

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write this chunk's k, v (B, Hkv, T, hd) after the held slots of `layer`, in place, and
        return all of that layer's K/V including them (B, Hkv, length + T, hd). Call `advance(T)`
        after the last layer."""
        end = self.length + k.shape[2]
        if end > self.capacity:
            self._grow(end)
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        self.valid[:, self.length:end] = True
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, n: int) -> None:
        self.length += n

    def keep_last(self, n: int) -> None:
        """Drop all but the last n held slots. Copies into fresh buffers: the old ones may still be
        viewed by this call's attention (the last layer trims before its attention runs)."""
        if self.length <= n:
            return
        a = self.length - n
        for store in (self.k, self.v):
            for i, buf in enumerate(store):
                new = buf.new_zeros(buf.shape)
                new[:, :, :n] = buf[:, :, a:self.length]
                store[i] = new
        valid = self.valid.new_zeros(self.valid.shape)
        valid[:, :n] = self.valid[:, a:self.length]
        self.valid = valid
        self.length = n


class DenseKV(Memory):
    sites: ClassVar[frozenset[Site]] = frozenset({Site.ATTN})

    def __init__(self, cfg: DenseKVConfig, backbone: BackboneConfig):
        super().__init__(cfg, backbone)
        self.last_layer = backbone.n_layers - 1

    def init_state(self, batch: int, device: torch.device, dtype: torch.dtype) -> DenseKVState:
        b, C = self.backbone, self.cfg.initial_capacity
        buf = lambda: torch.zeros(batch, b.kv_heads, C, b.head_dim, device=device, dtype=dtype)  # noqa: E731
        return DenseKVState([buf() for _ in range(b.n_layers)], [buf() for _ in range(b.n_layers)],
                            torch.zeros(batch, C, dtype=torch.bool, device=device), 0)

    def reset(self, state: DenseKVState, mask: Tensor) -> DenseKVState:
        return DenseKVState(list(state.k), list(state.v), state.valid & ~mask[:, None], state.length)

    def _bytes_per_token(self, dtype: torch.dtype) -> int:
        b = self.backbone
        return 2 * b.n_layers * b.kv_heads * b.head_dim * dtype_bytes(dtype) + 1  # K, V and valid

    def spec(self, dtype: torch.dtype = torch.float32) -> MemorySpec:
        seg = self.backbone.seg_len
        held = seg if self.cfg.scope == "segment" else self.cfg.window
        return MemorySpec(bytes_per_token=self._bytes_per_token(dtype), max_tokens=held, slack=2.0,
                          slack_tokens=self.cfg.initial_capacity + seg, dtype_bytes=dtype_bytes(dtype))

    def held_bytes(self, state: DenseKVState) -> int:
        return state.valid.shape[0] * state.length * self._bytes_per_token(state.k[0].dtype)

    def attn(self, io: AttnIO, state: DenseKVState, ctx: StepContext) -> tuple[KVBlock | None, DenseKVState]:
        T = io.k.shape[2]
        if io.layer == 0 and ctx.seg_start and self.cfg.scope == "segment":
            state = DenseKVState(list(state.k), list(state.v), state.valid & False, 0)
        if io.k.requires_grad or io.v.requires_grad:
            block, state = self._functional(io, state, T)
        else:
            k_all, v_all = state.update(io.layer, io.k, io.v)
            block = KVBlock(k_all, v_all, state.valid[:, : state.length + T], includes_chunk=True)
        if io.layer == self.last_layer:
            state.advance(T)
            if ctx.seg_end and self.cfg.window is not None:
                state.keep_last(self.cfg.window)
        return block, state

    def _functional(self, io: AttnIO, state: DenseKVState, T: int) -> tuple[KVBlock | None, DenseKVState]:
        """Training path: the past is a detached prefix; the chunk is appended detached."""
        n, l = state.length, io.layer
        block = KVBlock(state.k[l][:, :, :n], state.v[l][:, :, :n], state.valid[:, :n]) if n else None
        k, v = list(state.k), list(state.v)
        k[l] = torch.cat([state.k[l][:, :, :n], io.k.detach()], dim=2)
        v[l] = torch.cat([state.v[l][:, :, :n], io.v.detach()], dim=2)
        valid = state.valid
        if l == 0:  # rows and slots are shared by all layers: extend the mask once
            valid = torch.cat([state.valid[:, :n], torch.ones_like(state.valid[:, :1]).expand(-1, T)], dim=1)
        return block, DenseKVState(k, v, valid, n)

    def make_identity(self) -> bool:
        # the segment cache only saves recomputation: whole-segment outputs never change
        return self.cfg.scope == "segment"

    @classmethod
    def contract_configs(cls) -> list[dict]:
        return [{"scope": "document"}, {"scope": "document", "window": 20, "initial_capacity": 8}, {"scope": "segment"}]
