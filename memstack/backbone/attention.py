"""Attention backends: where the past keys/values of a forward call live.

`MemoryModel.forward(..., attn=None)` attends the way every memory expects: over the K/V blocks
memories supply (a KV-cache memory returns its buffer) and, causally, the chunk itself
(backbone/model.py `_attend`). A serving engine keeps the K/V of every request in one paged pool
instead and passes a backend (vLLM v1's model runner hands `AttentionMetadata` to the model the
same way): the model runs its own blocks, and at each layer the backend writes the chunk's K/V
into the pool and attends over [memory blocks, the row's visible past in the pool, the chunk
(causal)]. The protocol is two calls:

    begin(ctx)                                 once per forward, when the extended chunk's layout
                                               (positions, per-token validity) is known
    attend(layer, q, k, v, extras, ctx) -> o   per layer: q (B, H, T', hd), k/v (B, Hkv, T', hd),
                                               extras: memories' KVBlocks; returns (B, H, T', hd)

The paged implementation is memstack/engine/attention.py (it knows block tables); the backbone
only knows this protocol.
"""
from __future__ import annotations

from typing import Protocol

from torch import Tensor

from memstack.memory.base import KVBlock, StepContext


class AttentionBackend(Protocol):
    def begin(self, ctx: StepContext) -> None: ...

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, extras: list[KVBlock], ctx: StepContext) -> Tensor: ...


__all__ = ["AttentionBackend"]
