"""Readers over separately encoded passage blocks, on the decoder-only backbone: Fusion-in-Decoder
(Izacard & Grave, arXiv 2007.01282; ATLAS's reader, arXiv 2208.03299) and RAG's per-passage
generator (Lewis et al., arXiv 2005.11401).

How FiD maps onto a decoder-only model. FiD's T5 encoder encodes each (question, passage) pair
separately; the decoder cross-attends to the concatenation of all their encoder states. Here:
1. encode: every block "passage + question" runs through the backbone ALONE (causal attention
   inside the block, RoPE positions 0 .. len-1, batched as rows of a right-padded batch); the
   keys and values of every layer are kept (`BlockKV`). Nothing of one block sees another.
2. read: the answer tokens run through the same backbone and attend, at every layer, to the
   kept keys/values (through the ATTN site: `KVBlock` with a validity mask that hides padding)
   plus, causally, to themselves.
   - FiD read (`BlockKV.fuse`): an answer row attends to all k blocks of its question at once
     -- the decoder-only counterpart of cross-attention over the concatenated encoder outputs.
     Its positions continue after the longest block (max_b len_b, ..), as in Parallel Context
     Windows (Ratner et al., arXiv 2212.10947): every block sits at positions 0..len_b-1.
   - per-passage read: an answer row attends to ONE block at positions len_b, len_b+1, ..: exactly
     the ordinary forward pass over [block; answer] (tested), i.e. RAG's p(y | x, z) and ATLAS's
     PDist target log p(y | x, z).
Deviations from FiD: (a) one set of weights is both "encoder" and "decoder" (the backbone), so
the blocks' states are per-layer keys/values, not a last-layer output read by separate
cross-attention weights; (b) block attention is causal (the question, placed after the passage,
sees the passage; the passage does not see the question) where T5's encoder is bidirectional;
(c) RoPE: the answer's distance to a block's tokens depends on the longest block (PCW), not on
its own length; (d) gradient flows from the answer into the blocks' keys/values (as FiD's
encoder is trained through cross-attention) only in the layers being trained (`train_from`).

`train_from`: layers below it run without gradient (frozen, cheaper); 0 trains everything,
n_layers freezes the reader. Decoding (`greedy`) is incremental: the blocks are encoded once and
each step runs one new token per row, the answer's own keys/values appended to the blocks'.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from memstack.backbone.layers import rope_tables
from memstack.memory.base import AttnIO, KVBlock, Memory, Site, StepContext
from memstack.memory.stack import MemoryStack


@dataclass
class Blocks:
    ids: Tensor        # (N, L) int64, right-padded
    lengths: Tensor    # (N,) int64, >= 1


def pack(seqs: list[list[int]], pad_id: int, device: torch.device | str = "cpu") -> Blocks:
    """Right-pad token sequences into one batch."""
    if not seqs or any(len(s) == 0 for s in seqs):
        raise ValueError("every block needs at least one token")
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return Blocks(ids.to(device), torch.tensor([len(s) for s in seqs], device=device))


@dataclass
class BlockKV:
    """Per-layer keys/values of encoded blocks (a row = one block, or k fused blocks)."""

    k: list[Tensor]    # per layer (R, kv_heads, S, head_dim), RoPE applied
    v: list[Tensor]
    valid: Tensor      # (R, S) bool: real tokens (padding hidden)
    start: Tensor      # (R,) int64: the position the answer starts at

    def rows(self, idx: Tensor) -> "BlockKV":
        """A BlockKV of the given rows (e.g. every block repeated per candidate answer)."""
        return BlockKV([t[idx] for t in self.k], [t[idx] for t in self.v], self.valid[idx], self.start[idx])

    def fuse(self, k: int) -> "BlockKV":
        """FiD: rows (B*k) -> (B) rows each holding its k blocks side by side (B, Hkv, k*S, hd);
        the answer starts after the longest of them."""
        R, S = self.valid.shape
        if R % k:
            raise ValueError(f"{R} blocks do not group into questions of {k}")
        B = R // k
        cat = lambda t: t.view(B, k, t.shape[1], S, t.shape[3]).transpose(1, 2).reshape(B, t.shape[1], k * S, t.shape[3])  # noqa: E731
        return BlockKV([cat(t) for t in self.k], [cat(t) for t in self.v], self.valid.view(B, k * S),
                       self.start.view(B, k).max(1).values)


@dataclass
class _TapState:
    read: BlockKV | None                 # what every layer attends to besides the chunk
    keep: bool                           # record this pass's keys/values
    k: dict[int, Tensor]
    v: dict[int, Tensor]


class _KVTap(Memory):
    """ATTN-site helper of this module (not a registered memory): supplies the blocks' keys/values
    to each layer and records a pass's own keys/values."""

    sites: ClassVar[frozenset[Site]] = frozenset({Site.ATTN})

    def attn(self, io: AttnIO, state: _TapState, ctx: StepContext) -> tuple[KVBlock | None, _TapState]:
        if state.keep:
            state.k[io.layer], state.v[io.layer] = io.k, io.v
        if state.read is None:
            return None, state
        return KVBlock(state.read.k[io.layer], state.read.v[io.layer], state.read.valid), state


def _run(model, ids: Tensor, positions: Tensor, tap: _TapState, train_from: int, head: bool) -> Tensor | None:
    """The backbone's blocks over ids (R, T) at positions (R, T) with the tap attached; logits
    (R, T, V) if `head`. Layers below `train_from` run without gradient."""
    b = model.cfg.backbone
    stack = MemoryStack((), b, modules=[_KVTap(None, b)])
    states = [tap]
    R, T = ids.shape
    ctx = StepContext(ids, positions[:, 0], torch.zeros(R, dtype=torch.bool, device=ids.device), True, True,
                      model.training, positions=positions)
    with torch.set_grad_enabled(torch.is_grad_enabled() and train_from <= 0):
        h = model.tok_emb(ids)                                          # (R, T, D)
        cos, sin = rope_tables(positions, b.head_dim, b.rope_theta, h.dtype)
    for i, block in enumerate(model.blocks):
        with torch.set_grad_enabled(torch.is_grad_enabled() and i >= train_from):
            h = block(h, cos, sin, stack, states, ctx)
    if not head:
        return None
    return model.lm_head(model.norm(h)).float()


def encode(model, blocks: Blocks, train_from: int = 0) -> BlockKV:
    """Each block alone (causal, positions 0..len-1): every layer's keys/values. The last layer's
    MLP and the head are not needed (only keys/values are read) but run through the block as is."""
    N, L = blocks.ids.shape
    positions = torch.arange(L, device=blocks.ids.device).expand(N, L)
    tap = _TapState(None, True, {}, {})
    _run(model, blocks.ids, positions, tap, train_from, head=False)
    n = model.cfg.backbone.n_layers
    valid = torch.arange(L, device=blocks.ids.device)[None] < blocks.lengths[:, None]
    return BlockKV([tap.k[i] for i in range(n)], [tap.v[i] for i in range(n)], valid, blocks.lengths.clone())


def read(model, kv: BlockKV, ids: Tensor, train_from: int = 0, offset: int = 0) -> Tensor:
    """Logits (R, T, V) of tokens ids (R, T) that attend to kv's rows (R) and causally to themselves;
    they sit at positions kv.start + offset + (0..T-1)."""
    positions = kv.start[:, None] + offset + torch.arange(ids.shape[1], device=ids.device)
    return _run(model, ids, positions, _TapState(kv, False, {}, {}), train_from, head=True)


def _read_and_keep(model, kv: BlockKV, ids: Tensor, offset: int) -> tuple[Tensor, BlockKV]:
    """`read` (no gradient) that also returns kv extended by these tokens' own keys/values, so the
    next tokens attend to them without recomputing them (incremental decoding)."""
    positions = kv.start[:, None] + offset + torch.arange(ids.shape[1], device=ids.device)
    tap = _TapState(kv, True, {}, {})
    logits = _run(model, ids, positions, tap, model.cfg.backbone.n_layers, head=True)
    n = model.cfg.backbone.n_layers
    ones = torch.ones(ids.shape, dtype=torch.bool, device=ids.device)
    grown = BlockKV([torch.cat([kv.k[i], tap.k[i]], 2) for i in range(n)], [torch.cat([kv.v[i], tap.v[i]], 2) for i in range(n)],
                    torch.cat([kv.valid, ones], 1), kv.start)
    return logits, grown


def token_logprobs(logits: Tensor, targets: Tensor) -> Tensor:
    """log p(target_t) (R, T) from logits (R, T, V); targets < 0 give 0."""
    lp = F.log_softmax(logits.float(), -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    return lp.masked_fill(targets < 0, 0.0)


def answer_logprobs(model, kv: BlockKV, prompt: list[int], answers: list[list[int]], train_from: int = 0) -> tuple[Tensor, Tensor]:
    """Teacher-forced log-probs of answers after `prompt` (e.g. "Answer:"), one answer per kv row.
    Returns (tok_lp (R, T), mask (R, T)) over the answer tokens."""
    R = kv.valid.shape[0]
    if len(answers) != R:
        raise ValueError(f"{len(answers)} answers for {R} rows")
    T = max(len(a) for a in answers)
    P = len(prompt)
    ids = torch.zeros(R, P + T, dtype=torch.long, device=kv.valid.device)
    tgt = torch.full((R, T), -1, dtype=torch.long, device=ids.device)
    ids[:, :P] = torch.tensor(prompt, dtype=torch.long)
    for r, a in enumerate(answers):
        ids[r, P:P + len(a)] = torch.tensor(a, dtype=torch.long)
        tgt[r, : len(a)] = torch.tensor(a, dtype=torch.long)
    logits = read(model, kv, ids[:, :-1], train_from)[:, P - 1:]                  # (R, T, V) predicts answer tokens
    return token_logprobs(logits, tgt), tgt >= 0


@torch.no_grad()
def greedy(model, kv: BlockKV, prompt: list[int], max_new: int, stop: set[int],
           choose: Callable[[Tensor], Tensor] | None = None) -> list[list[int]]:
    """Greedy answers, one per kv row. `choose(logits (R, V)) -> tokens (R,)` lets rows share a
    decision (RAG-Token mixes the k passages of a question); default: each row's argmax. Each
    step runs one token per row: the answer's own keys/values join the blocks' as it grows."""
    R = kv.valid.shape[0]
    ids = torch.tensor(prompt, dtype=torch.long, device=kv.valid.device).expand(R, len(prompt))
    out: list[list[int]] = [[] for _ in range(R)]
    done = [False] * R
    offset = 0
    for _ in range(max_new):
        logits, kv = _read_and_keep(model, kv, ids, offset)
        offset += ids.shape[1]
        logits = logits[:, -1]                                                 # (R, V)
        nxt = choose(logits) if choose is not None else logits.argmax(-1)
        for r, t in enumerate(nxt.tolist()):
            if not done[r]:
                if t in stop:
                    done[r] = True
                else:
                    out[r].append(t)
        if all(done):
            break
        ids = nxt[:, None]
    return out
