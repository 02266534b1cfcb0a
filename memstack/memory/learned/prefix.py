"""Prefix-tuning (Li & Liang, arXiv 2101.00190): a learned key/value prefix at every layer.

What it stores: parameters only -- for each layer in `layers`, `n_prefix` keys and values per KV
head (the "virtual tokens'" activations). Nothing is carried from one segment to the next, so the
model state is None; the prefix is a static, persistent memory (the same object as all-attention
persistent memory, Sukhbaatar et al. 2019, and x-transformers' `attn_num_mem_kv`).
Read: every query of the layer may attend to the prefix (it precedes the segment).
Write: none at run time; the prefix is trained by gradient. Its purpose is to be trained alone
on a frozen backbone (`TrainConfig.trainable: memory`), adapting the model to a task or domain
with a small fraction of the parameters; `configs/train/prefix_tune_tiny.yaml` shows it end to
end (a backbone trained on one corpus, then prefix-tuned on another with the backbone frozen).

Reparameterisation (`reparam: true`, the paper's training recipe, which it found more stable
than optimising the prefix directly): P = MLP(P') with P' (n_prefix, d_model) and
MLP = Linear(d_model, reparam_hidden) -> tanh -> Linear(reparam_hidden, layers * 2 * kv_heads * head_dim).
After training only P is needed; `prefix_kv()` computes it (drop the MLP by storing that).

Deviations from the paper:
- positions: the backbone uses RoPE, where the paper's GPT-2/BART used absolute position
  embeddings added to the inputs, so its prefix activations carry no position. Here the prefix
  keys are rotated at the n_prefix positions just before the segment (start - n_prefix ..
  start - 1, start = the seg_len-aligned start of the chunk's segment), so every segment sees
  the prefix at the same relative distance, and decoding token by token reads exactly what a
  whole segment reads. Values carry no position.
- GQA: one prefix per KV head (the paper's models have n_kv_heads = n_heads).
- init: direct prefixes ~ N(0, init_std); P' ~ N(0, 1), nn.Linear's default init for the MLP's
  first layer and N(0, init_std) weights with zero bias for its last, so the prefix keys/values
  start at the scale of the backbone's own (with nn.Linear's default there, the prefix's keys
  came out ~3x the norm of the tokens' and took over half of every layer's attention from the
  first steps of joint training -- measured, and 0.2 bits/byte worse than no prefix on SOTU).
  The paper tuned a pretrained GPT-2/BART, whose activations are large; it also tries
  initialising from real words' activations -- not implemented.
`make_identity` is not supported: prefix keys always take part of the attention's mass; the
memory ablation (evals/ablation.py) zeroes the prefix instead.

Per-user prefixes (`user_prefix` > 0, the converged system): each `user:<id>` / `task:<id>`
namespace that learns gets its own `user_prefix` identity key/value rows per layer, read by that
namespace's rows only, with their own softmax and gate (memory/learned/user_prefix.py). With
`n_prefix: 0` there is no shared prefix: a row without a table computes the plain model exactly.
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from memstack.backbone.layers import apply_rope, rope_tables
from memstack.config import BackboneConfig
from memstack.memory.base import AttnIO, KVBlock, Memory, MemorySpec, Site, StepContext, dtype_bytes
from memstack.memory.learned.config import PrefixConfig
from memstack.memory.learned.user_prefix import UserPrefixRows


class Prefix(Memory):
    sites: ClassVar[frozenset[Site]] = frozenset({Site.ATTN})

    def __init__(self, cfg: PrefixConfig, backbone: BackboneConfig):
        super().__init__(cfg, backbone)
        self.layers_used = [l for l in range(backbone.n_layers) if self.applies_to(l)]
        self.slot = {l: i for i, l in enumerate(self.layers_used)}
        L, H, P, hd = len(self.layers_used), backbone.kv_heads, cfg.n_prefix, backbone.head_dim
        self.kv_shape = (L, 2, H, P, hd)
        # per-namespace identity rows (not parameters: per-user data, created and forgotten while serving)
        self.user = UserPrefixRows(backbone, L, cfg.user_prefix, cfg.user_gate, cfg.user_key_init_std,
                                   cfg.user_write_quota) \
            if cfg.user_prefix else None
        if P == 0:
            pass                                                                           # per-user rows only
        elif cfg.reparam:
            self.emb = nn.Parameter(torch.randn(P, backbone.d_model))                      # P' (P, D)
            self.mlp = nn.Sequential(nn.Linear(backbone.d_model, cfg.reparam_hidden), nn.Tanh(),
                                     nn.Linear(cfg.reparam_hidden, L * 2 * H * hd))
            # the prefix starts at the scale of the backbone's own keys/values (see the docstring)
            nn.init.normal_(self.mlp[2].weight, 0.0, cfg.init_std)
            nn.init.zeros_(self.mlp[2].bias)
        else:
            self.kv = nn.Parameter(torch.randn(*self.kv_shape) * cfg.init_std)           # (L, 2, Hkv, P, hd)

    def optim_group(self, name: str) -> str | None:
        return "no_decay" if name in ("emb", "kv") else None   # learned activations: no pull to zero

    def prefix_kv(self) -> Tensor:
        """The prefix of every layer used, (L, 2, kv_heads, n_prefix, head_dim); keys not yet rotated."""
        if not self.cfg.reparam:
            return self.kv
        L, _, H, P, hd = self.kv_shape
        out = self.mlp(self.emb)                                                   # (P, L*2*H*hd)
        return out.view(P, L, 2, H, hd).permute(1, 2, 3, 0, 4)                     # (L, 2, H, P, hd)

    def _layer_kv(self, j: int) -> Tensor:
        """Layer slot j's (2, kv_heads, n_prefix, head_dim), computing only that slice of the MLP."""
        if not self.cfg.reparam:
            return self.kv[j]
        _, _, H, P, hd = self.kv_shape
        hid = self.mlp[1](self.mlp[0](self.emb))                                   # (P, hidden)
        lin = self.mlp[2]
        rows = slice(j * 2 * H * hd, (j + 1) * 2 * H * hd)
        out = nn.functional.linear(hid, lin.weight[rows], lin.bias[rows])          # (P, 2*H*hd)
        return out.view(P, 2, H, hd).permute(1, 2, 0, 3)                           # (2, H, P, hd)

    def spec(self, dtype: torch.dtype = torch.float32) -> MemorySpec:
        return MemorySpec(dtype_bytes=dtype_bytes(dtype))   # no state: parameters only

    def namespace_rows(self):
        return self.user.rows if self.user is not None else None

    def namespace_layer(self) -> int | None:
        """User rows are read from the first prefixed layer's attention on; nothing else reads a namespace."""
        return self.layers_used[0] if self.user is not None and self.layers_used else None

    def user_layout_fingerprint(self) -> str | None:
        return self.user.fingerprint() if self.user is not None else None

    def attn_out(self, layer: int, q: Tensor, out: Tensor, state: Any, ctx: StepContext) -> tuple[Tensor, Any]:
        if self.user is None:
            return out, state
        return self.user.add(self.slot[layer], q, out, ctx), state                 # (B, H, T', hd)

    def attn(self, io: AttnIO, state: Any, ctx: StepContext) -> tuple[KVBlock | None, Any]:
        if self.cfg.n_prefix == 0:
            return None, state
        kv = self._layer_kv(self.slot[io.layer]).to(io.k.dtype)                   # (2, Hkv, P, hd)
        B, P = io.k.shape[0], self.cfg.n_prefix
        S = self.backbone.seg_len
        start = ctx.pos - ctx.pos.remainder(S)                                     # (B,) segment start
        pos = start[:, None] - P + torch.arange(P, device=start.device)           # (B, P)
        cos, sin = rope_tables(pos, self.backbone.head_dim, self.backbone.rope_theta, io.k.dtype)
        k = apply_rope(kv[0].expand(B, -1, -1, -1), cos, sin)                     # (B, Hkv, P, hd)
        return KVBlock(k, kv[1].expand(B, -1, -1, -1)), state

    @classmethod
    def contract_configs(cls) -> list[dict]:
        return [{"n_prefix": 4, "reparam_hidden": 32}, {"n_prefix": 3, "reparam": False, "init_std": 0.5, "layers": [1]},
                {"n_prefix": 2, "reparam": False, "user_prefix": 3}]
