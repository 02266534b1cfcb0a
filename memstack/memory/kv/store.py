"""The KV tensors of a paged cache: a spec (what one block holds) and the physical pool.

Layout: one tensor `kv` of shape (num_blocks, n_layers, 2, kv_heads, block_size, head_dim).
A block is contiguous *across all layers* (K and V of every layer for its block_size tokens),
so the unit a tier moves is one large contiguous run of bytes -- the layout change that made
vLLM's CPU offload an order of magnitude faster (kv-runtime-memory.md, section 1). Per layer,
`layer(l)` gives strided views k, v of shape (num_blocks, kv_heads, block_size, head_dim):
GQA/MQA-native (kv_heads, never repeated to the query heads), what the paged attention ops read.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from memstack.memory.base import dtype_bytes


@dataclass(frozen=True)
class KVSpec:
    """What one layer stack's KV needs per block (vLLM's AttentionSpec, for every layer at once)."""

    n_layers: int
    kv_heads: int
    head_dim: int
    block_size: int = 16
    dtype: torch.dtype = torch.float32

    @classmethod
    def of(cls, backbone, block_size: int = 16, dtype: torch.dtype = torch.float32) -> "KVSpec":
        return cls(backbone.n_layers, backbone.kv_heads, backbone.head_dim, block_size, dtype)

    @property
    def block_shape(self) -> tuple[int, ...]:
        return (self.n_layers, 2, self.kv_heads, self.block_size, self.head_dim)

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.n_layers * self.kv_heads * self.head_dim * dtype_bytes(self.dtype)

    @property
    def block_bytes(self) -> int:
        return self.bytes_per_token * self.block_size

    def blocks_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block_size)


class PagedKVCache:
    """The physical blocks. Who owns which block is the BlockPool's business, not this class's."""

    def __init__(self, spec: KVSpec, num_blocks: int, device: torch.device | str = "cpu"):
        self.spec, self.num_blocks = spec, num_blocks
        # zeros, not empty: a block is only read where it was written, but a stray read of a
        # never-written block must not be NaN garbage in a benchmark
        self.kv = torch.zeros((num_blocks, *spec.block_shape), dtype=spec.dtype, device=device)

    @property
    def device(self) -> torch.device:
        return self.kv.device

    def layer(self, l: int) -> tuple[Tensor, Tensor]:
        """(k, v) views of layer l, each (num_blocks, kv_heads, block_size, head_dim)."""
        return self.kv[:, l, 0], self.kv[:, l, 1]

    def write(self, l: int, slots: Tensor, k: Tensor, v: Tensor) -> None:
        """Write k, v (N, kv_heads, head_dim) of layer l at physical slots (N,) = block * bs + offset."""
        bs = self.spec.block_size
        blk, off = slots // bs, slots % bs
        self.kv[blk, l, :, :, off] = torch.stack([k, v], 1).to(self.kv.dtype)   # (N, 2, Hkv, hd) at (blk, :, :, off)

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy whole blocks src -> dst (copy-on-write)."""
        if pairs:
            src = torch.tensor([p[0] for p in pairs], device=self.device)
            dst = torch.tensor([p[1] for p in pairs], device=self.device)
            self.kv[dst] = self.kv[src]

    def read_blocks(self, ids: list[int]) -> Tensor:
        """Blocks `ids` gathered into one contiguous tensor (n, *block_shape): one transfer unit."""
        return self.kv[torch.tensor(ids, dtype=torch.long, device=self.device)]

    def write_blocks(self, ids: list[int], data: Tensor) -> None:
        self.kv[torch.tensor(ids, dtype=torch.long, device=self.device)] = data.to(self.device, self.spec.dtype)
