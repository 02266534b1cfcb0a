"""Starting a frozen-backbone memory from real text instead of noise.

Prefix-tuning (Li & Liang, arXiv 2101.00190, section 7.2) found that initialising the prefix with
the activations of real words ("summarize", "table-to-text") trains faster and better than a
random start, and prompt tuning (Lester et al., arXiv 2104.08691) initialises its soft tokens
from vocabulary embeddings. On a pretrained model this matters more than on a small one trained
with its prefix: measured on frozen SmolLM2-135M, a randomly initialised 16-token prefix raised
SOTU test bits per byte from 1.03 to 3.47 after 2 steps (docs/benchmarks/adapters.md) -- random
keys and values are far out of the distribution the pretrained layers expect.

- `init_prefix_from_text`: a direct prefix (`reparam: false`) becomes the keys and values the
  frozen backbone computes for the text's first n_prefix tokens at every layer, un-rotated so
  the prefix sits, relative to each segment, where the text would sit right before it
  (memory/learned/prefix.py rotates key i at position i - n_prefix before the segment).
- `init_memory_tokens_from_text`: memory tokens become the text's token embeddings.
Both are exact: with them, a segment's logits equal those of the text followed by the segment
(tests/test_adapter_init.py).
"""
from __future__ import annotations

import torch
from torch import Tensor

from memstack.backbone.layers import apply_rope, rope_tables


def _ids(ids: Tensor | list[int], n: int) -> Tensor:
    ids = torch.as_tensor(ids, dtype=torch.long).flatten()
    if ids.numel() < n:
        raise ValueError(f"the text has {ids.numel()} tokens; the memory needs {n}")
    return ids[:n]


@torch.no_grad()
def text_kv(model, ids: Tensor | list[int]) -> list[tuple[Tensor, Tensor]]:
    """Per layer, the (k, v) (Hkv, P, hd) the backbone (no memory) computes for token ids at
    positions 0..P-1; keys rotated at those positions."""
    ids = torch.as_tensor(ids, dtype=torch.long, device=model.device).flatten()[None]   # (1, P)
    pos = torch.arange(ids.shape[1], device=ids.device)[None]
    seen: list[Tensor] = []
    hooks = [blk.register_forward_pre_hook(lambda mod, args: seen.append(args[0])) for blk in model.blocks]
    try:
        model.encode(model.tok_emb(ids), pos)
    finally:
        for h in hooks:
            h.remove()
    return [(k[0], v[0]) for k, v in (blk.project_kv(h, pos) for blk, h in zip(model.blocks, seen))]


@torch.no_grad()
def init_prefix_from_text(model, ids: Tensor | list[int], memory_index: int | None = None) -> None:
    """Set a direct (`reparam: false`) prefix memory of `model` to the backbone's keys/values of
    the text `ids` (its first n_prefix tokens)."""
    idx = memory_index if memory_index is not None else model.memory.kinds.index("prefix")
    mem = model.memory.memories[idx]
    if mem.cfg.reparam:
        raise ValueError("init_prefix_from_text sets the prefix itself: use a direct prefix (reparam: false); "
                         "an MLP-reparameterised prefix has no parameters that hold the activations")
    P, b = mem.cfg.n_prefix, model.cfg.backbone
    kv = text_kv(model, _ids(ids, P))
    cos, sin = rope_tables(-torch.arange(P, device=model.device)[None], b.head_dim, b.rope_theta, torch.float32)
    for j, layer in enumerate(mem.layers_used):
        k, v = kv[layer]                                                   # (Hkv, P, hd), key i rotated by +i
        mem.kv[j, 0] = apply_rope(k.float()[None], cos, sin)[0].to(mem.kv.dtype)   # undo: rotated by -i
        mem.kv[j, 1] = v.to(mem.kv.dtype)


@torch.no_grad()
def init_memory_tokens_from_text(model, ids: Tensor | list[int], memory_index: int | None = None) -> None:
    """Set a memory_tokens memory of `model` to the token embeddings of the text `ids`."""
    idx = memory_index if memory_index is not None else model.memory.kinds.index("memory_tokens")
    mem = model.memory.memories[idx]
    ids = _ids(ids, mem.cfg.n_tokens).to(model.device)
    mem.tokens.copy_(model.tok_emb(ids).to(mem.tokens.dtype))


__all__ = ["text_kv", "init_prefix_from_text", "init_memory_tokens_from_text"]
