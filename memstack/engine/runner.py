"""The model runner: one engine step as forward calls of the model's own `forward`.

The runner holds no copy of the model. It turns the scheduler's work -- each request's next chunk
(a prompt piece or one decode token) -- into forward calls of the serving model (the model
without the KV-cache memory that the engine's paged pool replaces), passing per call:

- the tokens (B, T) and each row's memory state, gathered from the requests' state slots
  (`Memory.cat_rows`) and scattered back after the call (`Memory.take_rows`), as vLLM gathers a
  Mamba layer's state by request;
- a per-row `Step`: each row opens / closes its own segments;
- a `PagedAttention` backend (engine/attention.py): block tables, the slot of the chunk's first
  token, the first visible slot.

Rows of one call share a chunk length T (decode rows T = 1); a call groups the rows with the same
T and the same memory-token layout (`MemoryStack.embed_tokens` of their phases), so memory tokens
added for one row never widen another row's chunk. Models whose memories keep no state and add no
tokens (a plain or KV-only model) put prompt chunks of different lengths into one call, padded
(padding is masked and never written), since nothing but attention can tell the rows apart.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from memstack.engine.attention import PagedAttention
from memstack.memory.base import Step
from memstack.memory.kv.store import PagedKVCache
from memstack.memory.state import ModelState


PAD_WASTE = 0.25      # most of a padded prompt call's tokens that may be padding (stateless models)


@dataclass(eq=False)
class Batch:
    """The memory state of the rows of one forward call, kept as one batch after the call: as long
    as the next call has the same rows, nothing is split or concatenated (decode steps)."""

    state: ModelState
    rows: int


@dataclass(eq=False)
class RowRef:
    """A request's memory state: row `row` of a Batch (see `ModelRunner.row_state`)."""

    batch: Batch
    row: int


@dataclass(eq=False)
class Work:
    """One request's share of a step."""

    tokens: list[int]          # the new tokens
    pos0: int                  # document position of tokens[0]
    slot0: int                 # slot of the chunk's first token in the sequence's block table
    start: int                 # first visible slot
    block_ids: list[int]       # the sequence's block table
    state: Any = None          # the request's memory state: None (fresh), a ModelState row or a RowRef; replaced by run()
    namespace: str | tuple[str, ...] | None = None   # the request's memory namespace(s) (None: the memories' own)
    written: int = 0           # slots the call wrote (real + memory tokens), set by run()

    @property
    def n(self) -> int:
        return len(self.tokens)


class ModelRunner:
    def __init__(self, model: torch.nn.Module, cache: PagedKVCache):
        self.model, self.cache = model, cache               # `model`: the serving model (no KV-cache memory)
        self.bs = cache.spec.block_size
        self.seg_len = model.cfg.backbone.seg_len
        self.stack = model.memory
        self.stateless = self.stack.stateless
        self.last_only = not self.stack.changes_logits           # only the last position needs the head

    def phases(self, w: Work) -> tuple[bool, bool]:
        return w.pos0 % self.seg_len == 0, (w.pos0 + w.n) % self.seg_len == 0

    def extra_slots(self, pos0: int, n: int) -> int:
        """Memory tokens a chunk of n tokens at document position pos0 adds (its K/V slots)."""
        if not self.stack.adds_tokens:
            return 0
        p, q = self.stack.embed_tokens(pos0 % self.seg_len == 0, (pos0 + n) % self.seg_len == 0)
        return p + q

    def groups(self, work: list[Work]) -> list[list[int]]:
        """Indices of the work items that go into one forward call each: rows with the same chunk
        length and memory-token layout; for a stateless model, decode rows together and prompt
        chunks in length buckets (padding at most PAD_WASTE of a call's tokens)."""
        key: dict[Any, list[int]] = {}
        prefill = []
        for i, w in enumerate(work):
            if self.stateless:
                if w.n == 1:
                    key.setdefault(("decode",), []).append(i)
                else:
                    prefill.append(i)
            else:
                k = (w.n, self.stack.embed_tokens(*self.phases(w)) if self.stack.adds_tokens else None)
                key.setdefault(k, []).append(i)
        out = list(key.values())
        bucket: list[int] = []
        for i in sorted(prefill, key=lambda i: work[i].n):                   # short to long
            rows = bucket + [i]
            real = sum(work[j].n for j in rows)
            if bucket and len(rows) * work[i].n - real > PAD_WASTE * len(rows) * work[i].n:
                out.append(bucket)
                rows = [i]
            bucket = rows
        if bucket:
            out.append(bucket)
        return out

    @torch.no_grad()
    def run(self, work: list[Work], all_logits: bool = False) -> Tensor | list[Tensor]:
        """Logits (n_work, V) after each request's last new token (fp32), or with all_logits a
        list of (n, V) per request. Each Work's `state` is replaced by its state after the call
        and `written` set to the slots it filled."""
        out: list[Tensor | None] = [None] * len(work)
        for idx in self.groups(work):
            logits = self.call([work[i] for i in idx], all_logits)
            for i, lg in zip(idx, logits):
                out[i] = lg
        return out if all_logits else torch.stack(out)

    def row_state(self, state: Any) -> ModelState | None:
        """A request's memory state as its own ModelState row (sessions keep it, exports write it)."""
        if isinstance(state, RowRef):
            idx = torch.tensor([state.row], device=state.batch.state.pos.device)
            b = state.batch.state
            return ModelState(b.pos[idx], self.stack.take_rows(b.memories, idx))
        return state

    def _gather_states(self, work: list[Work], dev) -> ModelState:
        """The call's batch state from its rows' slots: the previous call's batch as is when the rows
        are the same, one index_select per tensor when they are a subset of one batch, else rows
        taken from their batches and concatenated (ragged axes padded, Memory.cat_rows)."""
        refs = [w.state for w in work]
        first = refs[0]
        if isinstance(first, RowRef) and all(isinstance(r, RowRef) and r.batch is first.batch for r in refs):
            b = first.batch
            rows = [r.row for r in refs]
            if rows == list(range(b.rows)):
                return b.state
            idx = torch.tensor(rows, device=dev)
            return ModelState(b.state.pos[idx], self.stack.take_rows(b.state.memories, idx))
        parts = [self.row_state(r) if r is not None else self.model.init_state(1, dev) for r in refs]
        return ModelState(torch.cat([p.pos for p in parts]), self.stack.cat_rows([p.memories for p in parts]))

    def call(self, work: list[Work], all_logits: bool = False) -> list[Tensor]:
        """One forward call over rows that share a chunk length (or are padded, stateless)."""
        dev = self.cache.device
        B, T = len(work), max(w.n for w in work)
        ragged = any(w.n != T for w in work)
        toks = torch.tensor([w.tokens + [0] * (T - w.n) for w in work], dtype=torch.long, device=dev)
        nb = max(len(w.block_ids) for w in work)
        meta = torch.tensor([[w.pos0, w.slot0, w.start] + w.block_ids + [0] * (nb - len(w.block_ids)) for w in work],
                            dtype=torch.long, device=dev)                          # one host -> device transfer
        pos, slot0, start, tables = meta[:, 0], meta[:, 1], meta[:, 2], meta[:, 3:]
        attn = PagedAttention(self.cache, tables, slot0, start)
        if not self.stack.adds_tokens and not ragged:      # no memory tokens: every slot is known here
            bs, phys, need = self.bs, [], 0
            for w in work:
                ids = w.block_ids
                phys += [ids[(w.slot0 + t) // bs] * bs + (w.slot0 + t) % bs for t in range(w.n)]
                need = max(need, w.slot0 + w.n)
            attn.known = (torch.tensor(phys, device=dev), [w.n for w in work], need)
        if ragged:
            if not self.stateless:
                raise RuntimeError("rows of different lengths in one call need a stateless model")
            attn.pad_lengths = torch.tensor([w.n for w in work], device=dev)
        ph = [self.phases(w) for w in work]
        step = Step(seg_start=[a for a, _ in ph], seg_end=[b for _, b in ph])
        if self.stateless:
            state = ModelState(pos, tuple(None for _ in self.stack.memories))
        else:
            state = self._gather_states(work, dev)
            if not torch.equal(state.pos, pos):
                raise RuntimeError("a request's memory state is not at its document position (engine bug)")
        names = tuple(w.namespace for w in work)
        which: str | Tensor = "all"
        if self.last_only and not all_logits:
            which = torch.tensor([w.n - 1 for w in work], device=dev) if ragged else "last"
        res, new = self.model(toks, state, step, attn=attn, namespaces=None if all(n is None for n in names) else names,
                              logits=which)
        written = attn.written()
        batch = None if self.stateless else Batch(new, B)
        for r, w in enumerate(work):
            w.written = written[r]
            if batch is not None:
                w.state = RowRef(batch, r)
        if all_logits:
            return [res.logits[r, :w.n] for r, w in enumerate(work)]
        if res.logits.shape[1] == 1:
            return list(res.logits[:, 0])
        return [res.logits[r, w.n - 1] for r, w in enumerate(work)]
