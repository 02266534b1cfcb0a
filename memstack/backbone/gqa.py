"""Converting multi-head attention into grouped-query / multi-query attention (Ainslie et al.,
"GQA: Training Generalized Multi-Query Transformer Models from Multi-Head Checkpoints",
arXiv 2305.13245).

A checkpoint whose K and V projections have H heads becomes one with G KV heads (G divides H;
G = 1 is MQA, Shazeer arXiv 1911.02150), each KV head shared by the H / G consecutive query heads
of its group -- the backbone's layout: query head h reads KV head h // (H / G)
(ops/attention/sdpa.py). The paper builds each group's K and V projection by **mean-pooling**
the projection matrices of the heads in the group, then "uptrains" the converted model for a
small fraction alpha of the original pre-training steps (alpha = 5% in the paper). It compares
mean pooling with keeping the **first** head of each group and with **random** initialisation
(mean > first > random, its Figure 4); all three are offered here (`method`), for that ablation.

What is converted: only wk and wv of every layer; every other tensor is copied unchanged (the
query and output projections keep their H heads). A model whose KV heads are already grouped
(G0 < H) converts to any G dividing G0 by pooling the G0 / G source KV heads of each new group
(equal group sizes, so this equals pooling the original heads).

RoPE: the backbone rotates keys after the projection; the rotation is linear and the same for
every head, so the pooled head's rotated keys are exactly the mean of the group's rotated keys
(tests/backbone/test_gqa.py checks it).

Memories: a memory's parameters are copied when their shapes do not depend on the KV head count
(memory tokens, tables, ...); a memory whose parameters do (a prefix: one per KV head) is refused
with the tensors named -- train it again on the converted backbone.

Deviations: none in the conversion. The paper's uptraining runs the original pre-training recipe
for alpha of its steps; `benchmarks/gqa/uptrain.py` does the same with a learning-rate choice on
validation data (see docs/benchmarks/gqa.md).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Literal

import torch
from torch import Tensor

from memstack.config import ModelConfig
from memstack.errors import ConfigError

METHODS = ("mean", "first", "random")


def pool_kv_weight(w: Tensor, n_src: int, n_kv: int, method: str = "mean", init_std: float = 0.02,
                   generator: torch.Generator | None = None) -> Tensor:
    """A K or V projection weight (n_src * head_dim, d_model) with n_src heads -> the weight
    (n_kv * head_dim, d_model) of n_kv heads; new head g pools source heads g*r .. g*r + r - 1
    (r = n_src / n_kv): their mean, the first of them, or a fresh N(0, init_std) draw."""
    rows, d = w.shape
    hd = rows // n_src
    groups = w.reshape(n_kv, n_src // n_kv, hd, d)                    # (G, r, hd, D)
    if method == "mean":
        out = groups.float().mean(1).to(w.dtype)                       # (G, hd, D)
    elif method == "first":
        out = groups[:, 0]
    elif method == "random":
        out = torch.randn(n_kv, hd, d, generator=generator, dtype=torch.float32).mul_(init_std).to(w.dtype)
    else:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    return out.reshape(n_kv * hd, d).to(w.device).contiguous()


def conversion_reasons(cfg: ModelConfig, n_kv_heads: int, method: str) -> list[str]:
    """Every reason the model of `cfg` cannot be converted to `n_kv_heads` KV heads by `method`."""
    b = cfg.backbone
    r = []
    if not isinstance(n_kv_heads, int) or isinstance(n_kv_heads, bool) or n_kv_heads < 1:
        r.append(f"n_kv_heads must be an integer >= 1, got {n_kv_heads!r}")
    elif b.kv_heads % n_kv_heads:
        r.append(f"n_kv_heads ({n_kv_heads}) must divide the model's KV head count ({b.kv_heads}; "
                 f"{b.n_heads} query heads): each new KV head pools a whole group of the old ones")
    if method not in METHODS:
        r.append(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    return r


def convert_kv_heads(model, n_kv_heads: int, method: Literal["mean", "first", "random"] = "mean", seed: int = 0):
    """A new MemoryModel equal to `model` except that its attention has `n_kv_heads` KV heads,
    each the pooled K/V projection of its group (arXiv 2305.13245). `model` is left unchanged."""
    from memstack.backbone.model import build_model

    reasons = conversion_reasons(model.cfg, n_kv_heads, method)
    if reasons:
        raise ConfigError(reasons, what="KV-head conversion")
    b = model.cfg.backbone
    cfg = ModelConfig(replace(b, n_kv_heads=n_kv_heads), model.cfg.memories)
    new = build_model(cfg).to(device=model.device, dtype=model.tok_emb.weight.dtype)
    src, dst = model.state_dict(), new.state_dict()
    gen = torch.Generator().manual_seed(seed)
    problems = [f"{k}: shape {tuple(src[k].shape)} depends on the KV head count (the converted model has "
                f"{tuple(v.shape)}); train this memory again on the converted backbone"
                for k, v in dst.items() if k.startswith("memory.") and k in src and src[k].shape != v.shape]
    if problems:
        raise ConfigError(problems, what="KV-head conversion (memory parameters)")
    with torch.no_grad():
        for k, t in dst.items():
            if k.endswith(("attn.wk.weight", "attn.wv.weight")) and not k.startswith("memory."):
                t.copy_(pool_kv_weight(src[k], b.kv_heads, n_kv_heads, method, b.init_std, gen))
            else:
                t.copy_(src[k])
    return new.train(model.training)


def kv_bytes_per_token(b, dtype_bytes: int = 4) -> int:
    """KV cache bytes one token costs in every layer: 2 (K, V) x layers x KV heads x head_dim x element size."""
    return 2 * b.n_layers * b.kv_heads * b.head_dim * dtype_bytes


__all__ = ["METHODS", "convert_kv_heads", "conversion_reasons", "kv_bytes_per_token", "pool_kv_weight"]
