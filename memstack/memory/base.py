"""The one memory interface.

Every memory family plugs into the same backbone through *sites*, the places a memory can
touch a forward pass:

    EMBED   add tokens before (prefix) or after (suffix) the chunk's tokens; see their outputs
    ATTN    supply extra keys/values to a layer's attention, or mix a second attention output
    BLOCK   change the residual stream entering a block (`block_in`) or leaving it (`block`)
    LOGITS  change the next-token distribution

A memory declares its sites; the backbone calls only those, and the defaults are no-ops.

State is explicit: each memory has a typed state dataclass that the model passes in and returns
(`out, state = model(tokens, state=state, step=step)`), never hidden in module attributes. A
per-example reset mask wipes the rows that start a new document. Every memory states its size
through `MemorySpec`, so the engine can plan memory and the leaderboard can plot quality against
state size.

Segments. The backbone processes a document as segments of `seg_len` tokens (its own context
window); memory is what carries information from one segment to the next. A forward call
processes one *chunk* of a segment: in training a chunk is the whole segment; when decoding, a
segment arrives as a prefill chunk and then one token at a time, with a segment-scoped KV cache
holding the tokens already seen. `Step.seg_start` / `Step.seg_end` tell memories where the
segment begins and ends, so a memory behaves identically whether a segment arrives whole or in
pieces -- the contract tests hold every memory to that.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any, Callable, ClassVar

import torch
from torch import Tensor, nn

from memstack.config import BackboneConfig, MemoryConfig


class Ablation(str, Enum):
    """How a memory was switched off for an ablation (`Memory.ablate`)."""

    IDENTITY = "identity"   # it now leaves the backbone's output unchanged: the model is the plain backbone
    RESET = "reset"         # its state is wiped at every segment start (by the caller): nothing crosses a
                            # segment through it; learned initial states, which hold no document, stay
    ZERO = "zero"           # its parameters are zero: its slots remain but bring no content


class Site(str, Enum):
    EMBED = "embed"
    ATTN = "attn"
    BLOCK = "block"
    LOGITS = "logits"


@dataclass(frozen=True)
class MemorySpec:
    """How much state a memory keeps, per example.

    bytes_per_token: logical state bytes per held token (a KV cache: 2 * layers * kv_heads * head_dim * dtype)
    fixed_bytes:     logical state bytes independent of the context (XL bookkeeping, an RMT memory, ...)
    max_tokens:      tokens held at most (a window, `mem_len`); None = grows with the context
    slack:           allocation may exceed the logical size by this factor (capacity doubling: 2.0)
    slack_tokens:    ... plus this many tokens of preallocated capacity
    dtype_bytes:     bytes per state element, to express `state_size` in elements as Zoology does
    """

    bytes_per_token: int = 0
    fixed_bytes: int = 0
    max_tokens: int | None = None
    slack: float = 1.0
    slack_tokens: int = 0
    dtype_bytes: int = 4

    def held_tokens(self, n_tokens: int) -> int:
        return n_tokens if self.max_tokens is None else min(n_tokens, self.max_tokens)

    def state_bytes(self, n_tokens: int, batch: int = 1) -> int:
        """Logical bytes of state after `n_tokens` tokens of one document."""
        return batch * (self.fixed_bytes + self.bytes_per_token * self.held_tokens(n_tokens))

    def max_bytes(self, n_tokens: int, batch: int = 1) -> int:
        """Upper bound on the bytes actually allocated (what an engine must plan for)."""
        per_tok = self.bytes_per_token * (self.held_tokens(n_tokens) + self.slack_tokens)
        return batch * (self.fixed_bytes + math.ceil(per_tok * self.slack))

    def state_size(self, n_tokens: int) -> int:
        """State size in elements for one example (the x-axis of the Zoology frontier)."""
        return self.state_bytes(n_tokens) // self.dtype_bytes


@dataclass(frozen=True)
class Step:
    """What the caller says about a chunk: which rows start a new document, segment edges.

    `seg_start` / `seg_end` are one bool for every row (rows in step, as in training) or a (B,)
    bool tensor: rows that are *not* in step (a serving engine's requests at different positions)
    each open or close their own segment. A memory that writes at a segment end does so for
    exactly the rows that reach one (the contract suite holds every memory to that)."""

    reset: Tensor | bool | None = None             # (B,) bool (or one bool for all rows): these rows start a new
                                                   # document; their state is wiped first
    seg_start: bool | Tensor | list[bool] = True   # this chunk opens a segment (all rows, or (B,) per row)
    seg_end: bool | Tensor | list[bool] = True     # this chunk closes a segment (all rows, or (B,) per row)


def row_reads(entry: str | tuple[str, ...] | list[str] | None) -> tuple[str, ...]:
    """The namespaces one row's `StepContext.namespaces` entry reads, in order, without repeats
    (() for None)."""
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(dict.fromkeys(entry))


def row_flags(flag: bool | Tensor | list[bool], batch: int, device: torch.device | str) -> Tensor:
    """A Step phase as a (batch,) bool tensor (a bool is broadcast to every row)."""
    if isinstance(flag, (list, tuple)):
        flag = torch.tensor(flag, dtype=torch.bool)
    if isinstance(flag, Tensor):
        if flag.shape != (batch,):
            raise ValueError(f"a per-row segment flag must have shape ({batch},), got {tuple(flag.shape)}")
        return flag.to(device=device, dtype=torch.bool)
    return torch.full((batch,), bool(flag), dtype=torch.bool, device=device)


@dataclass(frozen=True)
class StepContext:
    """What a memory may know about the chunk being processed. Built by the model per call.

    Phases are per row: `seg_start` / `seg_end` are (B,) bool tensors (a bool passed in is
    broadcast). `if ctx.seg_end:` therefore fails loudly for B > 1; use the Python flags
    `any_start` / `all_start` / `any_end` / `all_end` to skip work, and the tensors to decide per row.
    """

    tokens: Tensor          # (B, T) ids of this chunk's real tokens
    pos: Tensor             # (B,) document position of tokens[:, 0]
    reset: Tensor           # (B,) bool: rows whose state was wiped at the start of this chunk
    seg_start: Tensor       # (B,) bool: rows whose chunk opens a segment
    seg_end: Tensor         # (B,) bool: rows whose chunk closes a segment
    training: bool
    n_prefix: int = 0       # tokens memories prepended (EMBED), in front of the real tokens
    n_suffix: int = 0       # tokens memories appended (EMBED), after the real tokens
    positions: Tensor | None = None  # (B, n_prefix + T + n_suffix) RoPE positions of the extended chunk
    # auxiliary training losses memories add during this call (name -> scalar, already weighted);
    # one dict per forward call, shared by every copy of this context
    losses: dict[str, Tensor] = field(default_factory=dict)
    # encode(x (B,L,D) embeddings, positions (B,L)) -> (B,L,D): the backbone's blocks run over x
    # with NO memory attached, returning the last block's output (before the final norm). For
    # memories that summarise text with the backbone itself (HMT's representation pass). Set by
    # the model; None when a memory is driven outside a model.
    encode: Callable[[Tensor, Tensor], Tensor] | None = None
    # id(memory) -> (its prefix slice, its suffix slice) in the extended chunk, for EMBED memories
    # that read their own tokens at other sites (ARMT writes from its tokens after every block)
    embed_slots: dict[int, tuple[slice, slice]] = field(default_factory=dict)
    # per-call scratch space shared by every copy of this context (e.g. rows a memory started
    # fetching in `prepare`, picked up by its `block` hook); gone when the call returns
    scratch: dict[Any, Any] = field(default_factory=dict)
    # embed(ids (B, P) int64) -> (B, P, D): the backbone's own token embedding, for EMBED memories
    # that put real tokens (retrieved passages, cached prompts) in front of the chunk; None = not offered
    embed: Callable[[Tensor], Tensor] | None = None
    # (B, n_prefix + T + n_suffix) bool: which tokens of the extended chunk exist for each row.
    # None: all of them. Memory tokens added only for the rows that open (close) a segment are
    # invalid in the other rows: attention never reads them, caches do not store them.
    valid: Tensor | None = None
    # per-row namespaces (a serving engine's tenant / user / task): each row's entry is one name,
    # a tuple of names it reads together (its user's AND its task's rows / datastore entries; the
    # first is its own), or None (the memory's configured namespace); None: every row reads the
    # configured one. See `namespace_of` (each row's own) and `reads_of` (everything it reads).
    namespaces: tuple[str | tuple[str, ...] | None, ...] | None = None
    # Python summaries of the phases (set in __post_init__): skip work without a device sync
    any_start: bool = field(default=False, init=False)
    all_start: bool = field(default=False, init=False)
    any_end: bool = field(default=False, init=False)
    all_end: bool = field(default=False, init=False)
    phase: tuple[bool, bool, bool, bool] | None = None   # (any_start, all_start, any_end, all_end) when known

    def __post_init__(self) -> None:
        B, dev = self.tokens.shape[0], self.tokens.device
        known = self.phase
        flags = []
        for name in ("seg_start", "seg_end"):
            f = getattr(self, name)
            if not isinstance(f, Tensor):
                if isinstance(f, (list, tuple)):       # per-row Python bools: summaries without a sync
                    flags += [any(f), all(f)] if len(f) == B else [None, None]
                else:
                    flags += [bool(f), bool(f)]
            object.__setattr__(self, name, row_flags(f, B, dev))
        if known is None:
            if len(flags) != 4 or None in flags:
                n0, n1 = (int(getattr(self, n).sum()) if B else 0 for n in ("seg_start", "seg_end"))
                known = (n0 > 0, n0 == B, n1 > 0, n1 == B)
            else:
                known = tuple(flags)
        object.__setattr__(self, "phase", known)
        for name, value in zip(("any_start", "all_start", "any_end", "all_end"), known):
            object.__setattr__(self, name, value)

    @property
    def n_tokens(self) -> int:
        return self.tokens.shape[1]

    @property
    def real(self) -> slice:
        """Where the real tokens sit in the extended chunk."""
        return slice(self.n_prefix, self.n_prefix + self.n_tokens)

    def slots_of(self, memory: "Memory") -> tuple[slice, slice]:
        """Where `memory`'s own prefix and suffix tokens sit in the extended chunk (empty slices
        when it added none to this chunk). Rows for which they are not valid: `self.valid`."""
        empty = slice(self.n_prefix, self.n_prefix)
        return self.embed_slots.get(id(memory), (empty, empty))

    def namespace_of(self, default: str) -> list[str]:
        """Each row's own namespace (the first it reads): the engine's per-row one, else `default`."""
        return [r[0] for r in self.reads_of(default)]

    def reads_of(self, default: str) -> list[tuple[str, ...]]:
        """Every namespace each row reads, its own first (a user's and a task's: a memory reads
        the union of their rows / entries); `default` for rows the engine gave none."""
        if self.namespaces is None:
            return [(default,)] * self.tokens.shape[0]
        return [row_reads(n) or (default,) for n in self.namespaces]

    def with_(self, **kw: Any) -> "StepContext":
        if "seg_start" in kw or "seg_end" in kw:
            kw.setdefault("phase", None)                 # the summaries follow the new phases
        return replace(self, **kw)

    def add_loss(self, name: str, value: Tensor) -> None:
        """Add an auxiliary training loss (a weighted scalar, mean-like: it is counted once per
        target token of the chunk, like the LM loss). Repeated names accumulate (e.g. per layer)."""
        if value.dim() != 0:
            raise ValueError(f"auxiliary loss {name!r} must be a scalar, got shape {tuple(value.shape)}")
        self.losses[name] = self.losses[name] + value if name in self.losses else value


@dataclass
class KVBlock:
    """Extra keys/values a memory supplies to one layer's attention. Every query of the chunk may
    attend to every valid entry (they all precede the chunk); the chunk itself stays causal."""

    k: Tensor                   # (B, kv_heads, S, head_dim), RoPE already applied where wanted
    v: Tensor                   # (B, kv_heads, S, head_dim)
    valid: Tensor | None = None  # (B, S) bool; None: all valid
    # A cache may return its buffer with this chunk's own K/V already written at the end (its
    # last T entries), sparing a copy per decoded token; the backbone then does not append the
    # chunk again and keeps those last T entries causal. At most one such block per layer.
    includes_chunk: bool = False


@dataclass
class AttnIO:
    """What an ATTN-site memory sees at one layer."""

    layer: int
    h: Tensor   # (B, T', D) residual stream entering the layer (before its norm); T' = extended chunk
    q: Tensor   # (B, n_heads, T', head_dim) queries of the chunk, RoPE applied
    k: Tensor   # (B, kv_heads, T', head_dim) keys of the chunk, RoPE applied
    v: Tensor   # (B, kv_heads, T', head_dim)
    # project_kv(h (B,S,D), positions (B,S)) -> (k, v): this layer's norm, K/V projection and RoPE,
    # for memories that store hidden states and re-project them (Transformer-XL)
    project_kv: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


class Memory(nn.Module):
    """Base class of every memory. Override the hooks of the sites you declare in `sites`.

    Hooks receive this memory's own state and return the new one. State objects are dataclasses
    of tensors (see memory/state.py for the generic tree utilities: detach, save, load, nbytes).
    Every state tensor is batch-first (dim 0 = the example), so states can be split, gathered
    and concatenated across rows and processes without knowing the family.
    """

    sites: ClassVar[frozenset[Site]] = frozenset()

    def __init__(self, cfg: MemoryConfig, backbone: BackboneConfig):
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone

    # -- state ---------------------------------------------------------------------------------
    def init_state(self, batch: int, device: torch.device, dtype: torch.dtype) -> Any:
        """Fresh state for `batch` documents (None for stateless memories)."""
        return None

    def reset(self, state: Any, mask: Tensor) -> Any:
        """Wipe the rows where `mask` (B,) is True, as if they had just been created."""
        return state

    def spec(self, dtype: torch.dtype = torch.float32) -> MemorySpec:
        return MemorySpec(dtype_bytes=torch.empty((), dtype=dtype).element_size())

    def take_rows(self, state: Any, idx: Tensor) -> Any:
        """The rows `idx` (1-D int64) of a batch state (a serving engine keeps each request's row
        in its own slot). Default: every tensor indexed along dim 0 (memory/state.py)."""
        from memstack.memory.state import take_rows

        return take_rows(state, idx)

    def cat_rows(self, states: list[Any]) -> Any:
        """One batch state from row states (in order). Default: tensors concatenated along dim 0,
        a ragged axis left-padded with zeros / False -- i.e. *invalid, oldest* entries, which is
        right for buffers that keep their newest entries last with a validity mask. Override
        when that is not what padding means for your state."""
        from memstack.memory.state import cat_rows

        return cat_rows(states)

    def embed_tokens(self, seg_start: bool, seg_end: bool) -> tuple[int, int] | None:
        """EMBED: how many (prefix, suffix) tokens `embed` adds for a row whose chunk opens /
        closes a segment as given (0 for rows it adds none to). The model marks the tokens of the
        other rows invalid; a serving engine reserves K/V slots for them before the call.
        None (the default): not declared -- whatever `embed` returns is taken for every row (rows
        in step), and a serving engine refuses the model."""
        return None

    def held_bytes(self, state: Any) -> int:
        """Logical bytes of `state` (what `spec().state_bytes` predicts). Default: every tensor."""
        from memstack.memory.state import tensor_nbytes

        return tensor_nbytes(state)

    @classmethod
    def contract_configs(cls) -> list[dict]:
        """Config fields the contract tests (tests/contract) run this memory with, on a tiny
        backbone with seg_len 16. Add variants that exercise eviction, windows, layer subsets."""
        return [{}]

    def make_identity(self) -> bool:
        """Set parameters so the memory leaves the backbone's output unchanged (close its output
        gate) and return True; return False if the memory has no such setting."""
        return False

    def ablate(self) -> Ablation:
        """Switch this memory off for an ablation -- in place: callers ablate a copy -- and say how
        (`memstack eval --ablate-memory` and the bench's ablation ask every memory this). Default:
        close it (`make_identity`) when it can be closed; else, when it carries state, have its
        state reset at every segment start; else zero its parameters. Override when the family
        knows a truer "off" (the ablated model must differ from the full one whenever the memory
        has an effect; the contract tests check it for every registered memory)."""
        if self.make_identity():
            return Ablation.IDENTITY
        if self.init_state(1, torch.device("cpu"), torch.float32) is not None:
            return Ablation.RESET
        with torch.no_grad():
            for p in self.parameters():
                p.zero_()
        return Ablation.ZERO

    def prepare(self, state: Any, ctx: StepContext) -> None:
        """Called once per forward call, before the first block runs, for memories that override
        it: start work that depends only on the token ids (e.g. prefetching table rows from host
        memory or disk), leaving handles in `ctx.scratch` for the site hooks. Must not change state."""

    def check_loaded(self, saved: dict[str, Tensor]) -> list[str]:
        """Reasons a checkpoint's tensors for this memory (names relative to the memory) cannot be
        loaded into it, beyond shapes and dtypes (e.g. a hash layout derived differently). [] = fine."""
        return []

    def optim_defaults(self) -> dict[str, Any]:
        """Default `GroupConfig`s of the optimizer groups this memory's `optim_group` names (the
        paper's recipe); `TrainConfig.groups` overrides them."""
        return {}

    def namespace_rows(self) -> Any:
        """The per-namespace rows this memory reads beside its shared ones (`user:<id>` /
        `task:<id>` tables, memory/sparse/namespace_rows.py's `NamespaceRows`), or None (the
        default). A row of a forward call reads the rows of its own namespace
        (`StepContext.namespace_of`) and no other; a server learns into them per user."""
        return None

    def namespace_layer(self) -> int | None:
        """The first block from which this memory's effect on a row may depend on the row's
        namespace (`StepContext.namespaces`: per-namespace rows, datastore namespaces): its hooks
        at that block or later may read it, none below. None: it never does. Learners rely on it
        (`MemoryModel.namespace_layer`): the residual stream entering that block is the same for
        every user, so an update of one user's rows runs only the blocks from there on. Default 0:
        "anywhere, EMBED included" -- always safe; a memory that reads namespaces only at some
        layers says which."""
        return 0

    def forget(self, namespace: str) -> int:
        """Remove everything this memory holds for `namespace` (its per-namespace table, datastore
        entries -- persisted where the memory keeps them on disk); returns how many tables /
        entries were removed. Default: its per-namespace table, if any."""
        rows = self.namespace_rows()
        return int(rows.drop(namespace)) if rows is not None else 0

    def holds(self, namespace: str) -> int:
        """How many tables / entries this memory holds for `namespace` (0 after `forget`: a
        server's forget checks it for every memory)."""
        rows = self.namespace_rows()
        return int(rows is not None and namespace in rows.names)

    def applies_to(self, layer: int) -> bool:
        """ATTN / BLOCK memories: whether this layer is touched. Default: config `layers`, else all."""
        layers = getattr(self.cfg, "layers", None)
        return layers is None or layer in layers

    # -- sites (defaults are no-ops) -----------------------------------------------------------
    def embed(self, x: Tensor, state: Any, ctx: StepContext) -> tuple[Tensor | None, Tensor | None, Any]:
        """EMBED: given token embeddings x (B,T,D) return (prefix (B,P,D) | None, suffix (B,Q,D) | None, state).
        P / Q are what `embed_tokens` declares for the rows that get tokens (None when no row
        does); the rows that get none may hold anything there (they are masked)."""
        return None, None, state

    def embed_out(self, h_prefix: Tensor | None, h_suffix: Tensor | None, state: Any, ctx: StepContext) -> Any:
        """EMBED: final hidden states (before the last norm) at this memory's prefix/suffix slots."""
        return state

    def attn(self, io: AttnIO, state: Any, ctx: StepContext) -> tuple[KVBlock | None, Any]:
        """ATTN: extra keys/values for layer io.layer (or None)."""
        return None, state

    def attn_out(self, layer: int, q: Tensor, out: Tensor, state: Any, ctx: StepContext) -> tuple[Tensor, Any]:
        """ATTN: mix a second attention output into out (B, n_heads, T', head_dim)."""
        return out, state

    def block_in(self, layer: int, h: Tensor, state: Any, ctx: StepContext) -> tuple[Tensor, Any]:
        """BLOCK: h (B,T',D) entering block `layer` (before its attention norm); return the
        residual stream the block gets (ARMT reads its associative memory here)."""
        return h, state

    def block(self, layer: int, h: Tensor, state: Any, ctx: StepContext) -> tuple[Tensor, Any]:
        """BLOCK: h (B,T',D) after block `layer`; return the new residual stream."""
        return h, state

    def logits(self, logits: Tensor, h: Tensor, state: Any, ctx: StepContext) -> tuple[Tensor, Any]:
        """LOGITS: logits (B,T,V) fp32 and final hidden h (B,T,D) of the real tokens."""
        return logits, state

    def extra_repr(self) -> str:
        return f"sites={sorted(s.value for s in self.sites)}"


def segment_so_far(pending: Tensor, new: Tensor, ctx: StepContext, dim: int = 1,
                   valid: Tensor | None = None) -> Any:
    """The current segment's entries: `pending` (what earlier chunks of the segment left) then
    `new` -- entries still pending in a row whose chunk *opens* a segment belong to a segment that
    never ended (its document stopped mid-segment, then the row was reset) and must not be
    written into memory.

    valid=None (rows in step): returns `new` alone when every row opens a segment, else the
    concatenation (refused when only some rows open one: pass the validity). With `valid` (B, Tp),
    the pending buffer's per-row validity, returns (entries, validity (B, Tp + T)): the pending
    entries of the rows opening a segment are marked invalid, the new ones valid."""
    if valid is None:
        if ctx.all_start:
            return new
        if ctx.any_start:
            raise ValueError("rows open segments at different times: pass the pending buffer's validity")
        return torch.cat([pending, new], dim=dim)
    ones = torch.ones(new.shape[0], new.shape[dim], dtype=torch.bool, device=new.device)
    if ctx.all_start:
        return new, ones
    ok = valid & ~ctx.seg_start[:, None] if ctx.any_start else valid
    return torch.cat([pending, new], dim=dim), torch.cat([ok, ones], dim=1)


def dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
