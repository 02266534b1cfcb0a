"""The dense decoder-only backbone, and the one place memories are called.

Notable features
- Llama-style block: pre-RMSNorm, rotary positions (RoPE), SwiGLU MLP, no biases.
- Grouped-query attention: `n_kv_heads` from 1 (MQA) to `n_heads` (MHA); repeated KV heads are
  never materialised (ops/attention/sdpa.py folds the query groups instead).
- PyTorch SDPA, with the plain reference (ops/attention/reference.py) beside it.
- Optional tied input/output embeddings.
- Memory sites: EMBED before the first block, ATTN inside every attention, BLOCK before
  (`block_in`) and after (`block`) every block, LOGITS after the head. The backbone knows `Site` and `MemoryStack`, and no family.

Positions. Each example carries `state.pos`, the number of tokens of its document seen so far;
the chunk's tokens get RoPE positions pos, pos+1, ...; memory tokens prepended by EMBED memories
take the positions just before (pos-P .. pos-1) and appended ones the positions just after.
Attention: every query may see every valid extra key a memory supplies (all of them precede
the chunk) and, causally, the chunk itself.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from memstack.backbone.layers import RMSNorm, SwiGLU, apply_rope, fused_weight, rope_tables
from memstack.config import BackboneConfig, MemoryConfig, ModelConfig
from memstack.memory.base import AttnIO, KVBlock, Step, StepContext, row_flags
from memstack.memory.stack import MemoryStack
from memstack.memory.state import ModelState
from memstack.ops.attention import attention

if TYPE_CHECKING:
    from memstack.backbone.attention import AttentionBackend


@dataclass
class ModelOutput:
    logits: Tensor   # (B, T, vocab) float32
    hidden: Tensor   # (B, T, d_model) final hidden states after the last norm
    aux_losses: dict[str, Tensor] = field(default_factory=dict)  # memories' auxiliary losses (StepContext.add_loss)

    @property
    def aux_loss(self) -> Tensor | float:
        """Sum of the auxiliary losses (0.0 when there are none)."""
        return sum(self.aux_losses.values()) if self.aux_losses else 0.0


class Attention(nn.Module):
    def __init__(self, cfg: BackboneConfig):
        super().__init__()
        self.n_heads, self.kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.d_model, cfg.kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.d_model, cfg.kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)

    def _heads(self, x: Tensor, n: int) -> Tensor:
        B, T, _ = x.shape
        return x.view(B, T, n, self.head_dim).transpose(1, 2)         # (B, n, T, head_dim)

    def q(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        return apply_rope(self._heads(self.wq(x), self.n_heads), cos, sin)

    def kv(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        k = apply_rope(self._heads(self.wk(x), self.kv_heads), cos, sin)
        return k, self._heads(self.wv(x), self.kv_heads)

    def qkv(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v of x; at inference one GEMM for the three projections and one rotation for q
        and k (a decode step of a small model is dominated by the number of ops, not their size)."""
        w = fused_weight(self, self.wq, self.wk, self.wv)
        if w is None:
            return (self.q(x, cos, sin), *self.kv(x, cos, sin))
        B, T, _ = x.shape
        H, Hk, hd = self.n_heads, self.kv_heads, self.head_dim
        y = F.linear(x, w).view(B, T, H + 2 * Hk, hd).transpose(1, 2)  # (B, H + 2Hkv, T, hd)
        qk = apply_rope(y[:, :H + Hk], cos, sin)                       # (B, H + Hkv, T, hd)
        return qk[:, :H], qk[:, H:], y[:, H + Hk:]


def _attend(q: Tensor, k: Tensor, v: Tensor, extras: list[KVBlock], valid: Tensor | None = None) -> Tensor:
    """Attention of the chunk's queries over [memory blocks..., chunk (causal)]. valid (B, T):
    which chunk tokens exist per row (None: all); a query always sees itself, so a row's invalid
    tokens compute something finite that nobody reads."""
    if not extras and valid is None:
        return attention(q, k, v)                                     # causal, no mask tensor
    B, T = q.shape[0], q.shape[2]
    tail = [e for e in extras if e.includes_chunk]
    if len(tail) > 1:
        raise RuntimeError("two memories returned a KV block that includes the chunk; only one cache may")
    blocks = [e for e in extras if not e.includes_chunk] + tail       # the chunk-holding block goes last
    ones = lambda n: torch.ones(B, n, dtype=torch.bool, device=q.device)  # noqa: E731
    past_valid = [e.valid if e.valid is not None else ones(e.k.shape[2]) for e in blocks]
    if tail:
        ks, vs = [e.k for e in blocks], [e.v for e in blocks]
        past_valid[-1] = past_valid[-1][:, : past_valid[-1].shape[1] - T]  # the chunk part is causal, below
    else:
        ks, vs = [e.k for e in blocks] + [k], [e.v for e in blocks] + [v]
    K = ks[0] if len(ks) == 1 else torch.cat(ks, dim=2)               # (B, Hkv, S, hd)
    V = vs[0] if len(vs) == 1 else torch.cat(vs, dim=2)
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril().expand(B, T, T)
    if valid is not None:
        causal = (causal & valid[:, None, :]) | torch.eye(T, dtype=torch.bool, device=q.device)
    if not past_valid:
        return attention(q, K, V, causal)
    past = torch.cat(past_valid, dim=1) if len(past_valid) > 1 else past_valid[0]    # (B, S - T)
    mask = torch.cat([past[:, None, :].expand(B, T, past.shape[1]), causal], dim=2)  # (B, T, S)
    return attention(q, K, V, mask)


def extended_positions(pos: Tensor, n_prefix: int, n_tokens: int, n_suffix: int, valid: Tensor | None) -> Tensor:
    """RoPE positions (B, P+T+Q) of the extended chunk: the real tokens at pos, pos+1, ...; a row's
    *valid* prefix tokens take the positions just before (pos-p..pos-1) and its valid suffix
    tokens those just after, whatever the other rows got."""
    ar = torch.arange(-n_prefix, n_tokens + n_suffix, device=pos.device)
    positions = pos[:, None] + ar                                     # (B, P+T+Q)
    if valid is None:
        return positions
    P, T = n_prefix, n_tokens
    pre = valid[:, :P].long()
    after = pre.flip(1).cumsum(1).flip(1)                             # valid prefix tokens at or after j
    suf = valid[:, P + T:].long().cumsum(1)                           # valid suffix tokens up to j
    return torch.cat([pos[:, None] - after, positions[:, P:P + T], pos[:, None] + T - 1 + suf], dim=1)


class Block(nn.Module):
    def __init__(self, cfg: BackboneConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg.d_model, cfg.ff_dim)
        self.rope_theta = cfg.rope_theta

    def project_kv(self, h: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        """K/V of hidden states h (B,S,D) at positions (B,S), as this layer would compute them."""
        cos, sin = rope_tables(positions, self.attn.head_dim, self.rope_theta, h.dtype)
        return self.attn.kv(self.attn_norm(h), cos, sin)

    def forward(self, h: Tensor, cos: Tensor, sin: Tensor, stack: MemoryStack, states: list, ctx: StepContext,
                attn: "AttentionBackend | None" = None) -> Tensor:
        B, T, D = h.shape
        if len(stack):
            h = stack.block_in(self.layer, h, states, ctx)
        x = self.attn_norm(h)
        q, k, v = self.attn.qkv(x, cos, sin)                          # (B, H, T, hd), (B, Hkv, T, hd) x 2
        extras = stack.attn(AttnIO(self.layer, h, q, k, v, self.project_kv), states, ctx) if len(stack) else []
        if attn is None:
            o = _attend(q, k, v, extras, ctx.valid)                   # (B, H, T, hd)
        else:  # the caller's K/V store (a serving engine's paged pool) holds the past and this chunk
            o = attn.attend(self.layer, q, k, v, extras, ctx)
        if len(stack):
            o = stack.attn_out(self.layer, q, o, states, ctx)
        h = h + self.attn.wo(o.transpose(1, 2).reshape(B, T, D))
        h = h + self.mlp(self.mlp_norm(h))
        return stack.block(self.layer, h, states, ctx) if len(stack) else h


class MemoryModel(nn.Module):
    """`out, state = model(tokens, state=state, step=Step(...))` -- see memory/base.py."""

    def __init__(self, cfg: ModelConfig, _shared: "MemoryModel | None" = None, _stack: MemoryStack | None = None):
        super().__init__()
        self.cfg = cfg
        b = cfg.backbone
        if _shared is None:
            self.tok_emb = nn.Embedding(b.vocab_size, b.d_model)
            self.blocks = nn.ModuleList(Block(b, i) for i in range(b.n_layers))
            self.norm = RMSNorm(b.d_model, b.norm_eps)
            self.lm_head = nn.Linear(b.d_model, b.vocab_size, bias=False)
            self.memory = MemoryStack((), b)
            self.reset_parameters()
            # memories are built after the backbone is initialised, so the backbone's weights do
            # not depend on which memories are attached (same seed -> same backbone: a fair start)
            self.memory = MemoryStack(cfg.memories, b)
        else:  # share every module with an existing model (see `with_memories`)
            self.tok_emb, self.blocks, self.norm, self.lm_head = _shared.tok_emb, _shared.blocks, _shared.norm, _shared.lm_head
            self.memory = _stack

    def reset_parameters(self) -> None:
        b = self.cfg.backbone
        for name, p in self.named_parameters():
            if name.endswith("norm.weight") or name.startswith("memory."):
                continue  # norms start at 1; memories initialise themselves
            std = b.init_std / math.sqrt(2 * b.n_layers) if name.endswith(("wo.weight", "w_down.weight")) else b.init_std
            nn.init.normal_(p, 0.0, std)
        if b.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight

    def with_memories(self, extra: list[MemoryConfig]) -> "MemoryModel":
        """A model sharing every parameter with this one, with `extra` memories appended to the
        stack (e.g. a decode cache or a retrieval memory added to a trained model)."""
        cfg = ModelConfig(self.cfg.backbone, self.cfg.memories + tuple(extra))
        added = MemoryStack(extra, cfg.backbone)
        stack = MemoryStack(cfg.memories, cfg.backbone, modules=list(self.memory.memories) + list(added.memories))
        model = MemoryModel(cfg, _shared=self, _stack=stack).to(self.tok_emb.weight.device)
        return model.train(self.training)

    def without_memories(self, drop: list[int]) -> "MemoryModel":
        """A model sharing every parameter with this one, without the memories at positions
        `drop` of the stack (a serving engine drops the KV caches its own pool replaces)."""
        keep = [i for i in range(len(self.memory)) if i not in set(drop)]
        cfg = ModelConfig(self.cfg.backbone, tuple(self.cfg.memories[i] for i in keep))
        stack = MemoryStack(cfg.memories, cfg.backbone, modules=[self.memory.memories[i] for i in keep])
        return MemoryModel(cfg, _shared=self, _stack=stack).train(self.training)

    @property
    def device(self) -> torch.device:
        return self.tok_emb.weight.device

    def num_params(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.tok_emb.weight.numel() if exclude_embeddings else n

    def init_state(self, batch: int, device: torch.device | str | None = None) -> ModelState:
        device = torch.device(device) if device is not None else self.device
        dtype = self.tok_emb.weight.dtype
        return ModelState(torch.zeros(batch, dtype=torch.long, device=device), self.memory.init_state(batch, device, dtype))

    def reset_state(self, state: ModelState, mask: Tensor) -> ModelState:
        """Wipe rows where mask (B,) is True: position back to 0, every memory's rows reset."""
        mask = mask.to(device=state.pos.device, dtype=torch.bool)
        return ModelState(state.pos.masked_fill(mask, 0), self.memory.reset(state.memories, mask))

    def encode(self, x: Tensor, positions: Tensor) -> Tensor:
        """The backbone's blocks over embeddings x (B,L,D) at RoPE positions (B,L), causal, with no
        memory attached; returns the last block's output (B,L,D), before the final norm. Memories
        reach it as `StepContext.encode` (HMT summarises a segment with the backbone itself)."""
        b = self.cfg.backbone
        bare = MemoryStack((), b)
        B, L = positions.shape
        ctx = StepContext(positions.new_zeros(B, 0), positions[:, 0], positions.new_zeros(B, dtype=torch.bool),
                          True, True, self.training, positions=positions)   # no memory reads these phases
        cos, sin = rope_tables(positions, b.head_dim, b.rope_theta, x.dtype)
        h = x
        for block in self.blocks:
            h = block(h, cos, sin, bare, [], ctx)
        return h

    def forward(self, tokens: Tensor, state: ModelState | None = None, step: Step | None = None,
                attn: "AttentionBackend | None" = None, namespaces: tuple | None = None,
                logits: str | Tensor = "all") -> tuple[ModelOutput, ModelState]:
        """One chunk of every row. `attn`: an attention backend holding the past keys/values
        outside the model (a serving engine's paged pool, see backbone/attention.py); None: the
        memories' own caches. `namespaces`: per-row memory namespaces, a name or a tuple read together (StepContext).
        logits="last": only each row's last position goes through the head, or a (B,) tensor: that
        position of each row (serving; allowed when no memory changes logits: a LOGITS memory
        reads every position)."""
        run = self._begin(tokens, state, step, namespaces, logits, attn)
        return self._finish(self._blocks(run, len(self.blocks), attn), logits)

    # -- a forward call in stages: what `run_until` / `resume` split ------------------------------
    def _begin(self, tokens: Tensor, state: ModelState | None, step: Step | None,
               namespaces: tuple | None, logits: str | Tensor, attn=None) -> "PartialRun":
        """Checks, the context, memory `prepare` and EMBED: a run standing before block 0."""
        if tokens.dim() != 2:
            raise ValueError(f"tokens must have shape (batch, length), got {tuple(tokens.shape)}")
        B, T = tokens.shape
        V = self.cfg.backbone.vocab_size
        if tokens.dtype not in (torch.int64, torch.int32) or (T and (int(tokens.min()) < 0 or int(tokens.max()) >= V)):
            bad = tokens[(tokens < 0) | (tokens >= V)] if tokens.dtype in (torch.int64, torch.int32) else tokens.flatten()[:3]
            raise ValueError(f"token ids must be integers in [0, {V}); got {bad[:5].tolist()} (dtype {tokens.dtype})")
        if not isinstance(logits, Tensor) and logits not in ("all", "last"):
            raise ValueError(f"logits must be 'all', 'last' or a (B,) tensor of positions, got {logits!r}")
        step = step or Step()
        if state is None:
            state = self.init_state(B, tokens.device)
        elif state.batch_size != B:
            raise ValueError(f"state is for batch {state.batch_size}, tokens have batch {B}")
        reset = step.reset if step.reset is not None else torch.zeros(B, dtype=torch.bool, device=tokens.device)
        if not isinstance(reset, Tensor):                                 # a bool (or per-row bools): broadcast
            reset = row_flags(reset, B, tokens.device)
        ctx = StepContext(tokens, state.pos, reset.bool(), step.seg_start, step.seg_end, self.training,
                          encode=self.encode, embed=self.tok_emb, namespaces=namespaces)
        if step.reset is not None:
            if reset.shape != (B,):
                raise ValueError(f"step.reset must have shape ({B},), got {tuple(reset.shape)}")
            if bool((reset.bool() & ~ctx.seg_start.to(reset.device)).any()):
                raise ValueError("a row can only start a new document at a segment start (step.seg_start=True for it)")
            state = self.reset_state(state, reset)
            ctx = ctx.with_(pos=state.pos)
        states = list(state.memories)
        if len(self.memory):
            self.memory.prepare(states, ctx)   # e.g. start fetching offloaded table rows

        x = self.tok_emb(tokens)                                      # (B, T, D)
        prefixes, suffixes, spans = self.memory.embed(x, states, ctx) if len(self.memory) else ([], [], [])
        P, Q = sum(p.shape[1] for p in prefixes), sum(s.shape[1] for s in suffixes)
        valid = self.memory.token_valid(spans, P, T, B, tokens.device) if spans else None
        positions = extended_positions(state.pos, P, T, Q, valid)    # (B, P+T+Q)
        ctx = ctx.with_(n_prefix=P, n_suffix=Q, positions=positions, valid=valid,
                        embed_slots=self.memory.slots(spans, P, T) if spans else {})
        h = torch.cat(prefixes + [x] + suffixes, dim=1) if P or Q else x
        cos, sin = rope_tables(positions, self.cfg.backbone.head_dim, self.cfg.backbone.rope_theta, h.dtype)
        if attn is not None:
            attn.begin(ctx)
        return PartialRun(0, h, cos, sin, ctx, states, state, spans)

    def _blocks(self, run: "PartialRun", until: int, attn=None) -> "PartialRun":
        """Blocks run.layer .. until - 1 (and the memories' hooks there), in place."""
        h = run.h
        for block in self.blocks[run.layer:until]:
            h = block(h, run.cos, run.sin, self.memory, run.states, run.ctx, attn)
        run.h, run.layer = h, max(run.layer, until)
        return run

    def _finish(self, run: "PartialRun", logits: str | Tensor) -> tuple[ModelOutput, ModelState]:
        """After the last block: EMBED outputs, the final norm, the head and LOGITS memories."""
        ctx, states, h = run.ctx, run.states, run.h
        P, T = ctx.n_prefix, ctx.n_tokens
        B = h.shape[0]
        if run.spans:
            self.memory.embed_out(h, run.spans, states, ctx)
        h = self.norm(h[:, P:P + T])                                  # (B, T, D) real tokens only
        if isinstance(logits, Tensor):
            if self.memory.changes_logits:
                raise ValueError("logits at chosen positions with a memory that changes the logits (it reads every position)")
            sel = h.gather(1, logits.to(h.device)[:, None, None].expand(B, 1, h.shape[2]))   # (B, 1, D)
        elif logits == "last":
            if self.memory.changes_logits:
                raise ValueError("logits='last' with a memory that changes the logits (it reads every position)")
            sel = h[:, -1:]
        else:
            sel = h
        out = self.lm_head(sel).float()                               # (B, T | 1, V)
        if len(self.memory):
            out = self.memory.logits(out, h, states, ctx)
        return ModelOutput(out, h, ctx.losses), ModelState(run.state.pos + T, tuple(states))

    # -- the shortcut of a learner that changes only what is read from some layer on -------------
    def namespace_layer(self) -> int:
        """The first block from which a row's output can depend on its namespace: the least
        `Memory.namespace_layer()` of the stack (n_layers when no memory depends on it). Hidden
        states entering this block are the same for every user (`run_until` / `resume`)."""
        at = [m.namespace_layer() for m in self.memory.memories]
        return min([l for l in at if l is not None], default=len(self.blocks))

    def run_until(self, tokens: Tensor, layer: int, state: ModelState | None = None, step: Step | None = None,
                  namespaces: tuple | None = None) -> "PartialRun":
        """The forward call of `tokens` stopped before block `layer` (0 <= layer <= n_layers): its
        hidden states, memory states and context, for `resume` to finish -- any number of times,
        e.g. once per update of rows read only from `layer` on (`namespace_layer()`). Run it under
        torch.no_grad() when nothing below `layer` is learned."""
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer <= len(self.blocks):
            raise ValueError(f"layer must be an integer in [0, {len(self.blocks)}], got {layer!r}")
        run = self._begin(tokens, state, step, namespaces, "all")
        run.prepared = tuple(run.state.memories)
        return self._blocks(run, layer)

    def resume(self, run: "PartialRun", namespaces: tuple | None = None,
               logits: str | Tensor = "all") -> tuple[ModelOutput, ModelState]:
        """Finish a `run_until` call from its layer on, each row read as `namespaces` (None: as the
        run was started). Equals `forward(tokens, state, step, namespaces=namespaces)` whenever
        nothing the blocks below `run.layer` read differs from when the run was stopped (every
        memory's `namespace_layer()` >= run.layer, for a change of namespaces or of their rows).
        The run is left as it was: each resume starts again from its stored hidden states and
        memory states (hooks return new states, as the interface asks; one writing a state tensor
        in place would leak into the next resume). No attention backend: the memories' own caches."""
        if not isinstance(run, PartialRun) or run.prepared is None:
            raise TypeError("resume takes what run_until returned")
        if not isinstance(logits, Tensor) and logits not in ("all", "last"):
            raise ValueError(f"logits must be 'all', 'last' or a (B,) tensor of positions, got {logits!r}")
        if namespaces is not None and tuple(namespaces) != run.ctx.namespaces:
            if len(namespaces) != run.h.shape[0]:
                raise ValueError(f"namespaces must name one namespace per row ({run.h.shape[0]}), got {len(namespaces)}")
            if not 0 < run.layer <= self.namespace_layer():
                raise ValueError(f"the run stopped before block {run.layer}, but rows' namespaces may be read from "
                                 f"block {self.namespace_layer()} on (0: anywhere): resume it as it was started")
        ctx = run.ctx.with_(namespaces=run.ctx.namespaces if namespaces is None else tuple(namespaces),
                            scratch={}, losses=dict(run.ctx.losses))   # per-call scratch: nothing of the stop kept
        if len(self.memory):
            self.memory.prepare(list(run.prepared), ctx)
        again = PartialRun(run.layer, run.h, run.cos, run.sin, ctx, list(run.states), run.state, run.spans)
        return self._finish(self._blocks(again, len(self.blocks)), logits)


@dataclass
class PartialRun:
    """A forward call stopped before block `layer` (MemoryModel.run_until)."""

    layer: int
    h: Tensor                   # (B, P+T+Q, D) the residual stream entering block `layer`
    cos: Tensor                 # RoPE tables of the extended chunk
    sin: Tensor
    ctx: StepContext
    states: list                # every memory's state after the blocks below `layer`
    state: ModelState           # the call's starting state (after any reset)
    spans: list                 # EMBED spans (MemoryStack.embed)
    prepared: tuple | None = None   # memory states `prepare` saw (resume prepares again with them)


def build_model(cfg: ModelConfig | BackboneConfig, memories: list[MemoryConfig] | None = None) -> MemoryModel:
    """`build_model(ModelConfig(...))` or `build_model(BackboneConfig(...), [XLConfig(...)])`."""
    if isinstance(cfg, BackboneConfig):
        cfg = ModelConfig(cfg, tuple(memories or ()))
    elif memories:
        raise TypeError("pass memories inside the ModelConfig, or pass a BackboneConfig")
    return MemoryModel(cfg)


def cross_entropy(logits: Tensor, targets: Tensor, reduction: str = "mean") -> Tensor:
    """Next-token loss; targets == -100 are ignored."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction=reduction)
