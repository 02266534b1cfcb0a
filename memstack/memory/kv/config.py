"""Configs of the runtime-memory (KV cache) family."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from memstack.config import BackboneConfig, Checked, KVCacheSemantics, MemoryConfig, _layers_reasons


def _scope_reasons(scope: str, window: int | None) -> list[str]:
    """Reasons a KV cache's scope/window pair is invalid (dense and paged caches share them)."""
    r = []
    if scope not in ("segment", "document"):
        r.append(f"scope must be 'segment' or 'document', got {scope!r}")
    if window is not None and scope != "document":
        r.append("window applies to scope='document' only")
    if window is not None and window < 1:
        r.append(f"window must be >= 1 or null, got {window}")
    return r


@dataclass(frozen=True)
class DenseKVConfig(MemoryConfig):
    """A dense KV cache.

    scope="segment": holds the keys/values of the current segment only and is cleared when the
    next segment starts -- the decode cache that makes token-by-token generation equal to a
    one-shot forward over the segment (generation adds one automatically when needed).
    scope="document": keeps past segments' keys/values too (stop-gradient in training): full
    attention over the document, or a sliding window of `window` tokens (trimmed at segment ends).
    """

    kind: ClassVar[str] = "kv_dense"
    scope: Literal["segment", "document"] = "document"
    window: int | None = None        # document scope: past tokens kept at segment ends; None = all
    initial_capacity: int = 64       # inference buffers start here and double when full

    @property
    def holds_context(self) -> bool:
        return self.scope == "document"

    @property
    def kv_cache(self) -> KVCacheSemantics:
        return KVCacheSemantics(self.scope, self.window)

    def check(self) -> list[str]:
        r = _scope_reasons(self.scope, self.window)
        if self.initial_capacity < 1:
            r.append(f"initial_capacity must be >= 1, got {self.initial_capacity}")
        return r


@dataclass(frozen=True)
class CompressionConfig(Checked):
    """How a paged KV cache shrinks the past at each segment end (memory/kv/compress/).

    policy:      none | streaming (StreamingLLM sinks + recent window) | h2o (heavy hitters +
                 recent) | snapkv (observation-window scores, pooled, + the window) | learned (a
                 trained scorer's predicted future attention, + sinks and the recent window) |
                 kivi (2/4-bit quantization of blocks older than a full-precision residual window)
    keep_ratio:  token policies keep ceil(keep_ratio * tokens seen); 1.0 = no compression.
                 kvpress' "compression ratio" is 1 - keep_ratio.
    sink_tokens: streaming, learned: first tokens always kept (attention sinks)
    recent:      h2o/snapkv/learned: the most recent tokens always kept (snapkv's observation window);
                 kivi: the full-precision residual window
    pool_kernel: snapkv: width of the average pooling over key positions
    bits:        kivi: 2 or 4
    scorer:      learned: the scorer file (safetensors, checksummed; python -m memstack.train.kv_scorer)
    """

    policy: Literal["none", "streaming", "h2o", "snapkv", "learned", "kivi"] = "none"
    keep_ratio: float = 1.0
    sink_tokens: int = 4
    recent: int = 8
    pool_kernel: int = 7
    bits: int = 2
    scorer: str = ""

    def check(self) -> list[str]:
        r = []
        if self.policy not in ("none", "streaming", "h2o", "snapkv", "learned", "kivi"):
            r.append(f"policy must be none, streaming, h2o, snapkv, learned or kivi, got {self.policy!r}")
        if not isinstance(self.scorer, str):
            r.append(f"scorer must be a path (string), got {type(self.scorer).__name__}")
        elif self.policy == "learned" and not self.scorer:
            r.append("policy 'learned' needs scorer= the scorer file (python -m memstack.train.kv_scorer)")
        if not 0 < self.keep_ratio <= 1:
            r.append(f"keep_ratio must be in (0, 1], got {self.keep_ratio}")
        if self.sink_tokens < 0:
            r.append(f"sink_tokens must be >= 0, got {self.sink_tokens}")
        if self.recent < 1:
            r.append(f"recent must be >= 1, got {self.recent}")
        if self.pool_kernel < 1 or self.pool_kernel % 2 == 0:
            r.append(f"pool_kernel must be odd and >= 1, got {self.pool_kernel}")
        if self.bits not in (2, 4):
            r.append(f"bits must be 2 or 4, got {self.bits}")
        return r


@dataclass(frozen=True)
class PagedKVConfig(MemoryConfig):
    """A paged KV cache: keys/values in fixed-size blocks reached through a block table, freed
    whole (window trimming, compression), optionally compressed at segment ends. Same scopes as
    `kv_dense`; with compression off it equals `kv_dense` (the contract suite checks it)."""

    kind: ClassVar[str] = "kv_paged"
    scope: Literal["segment", "document"] = "document"
    window: int | None = None        # document scope: past tokens kept at segment ends; None = all
    block_size: int = 16
    initial_blocks: int = 4          # physical blocks per row to start with; doubles when full
    compression: CompressionConfig = CompressionConfig()

    @property
    def holds_context(self) -> bool:
        return self.scope == "document"

    @property
    def kv_cache(self) -> KVCacheSemantics:
        # compressed or quantized blocks are not "the K/V of exactly these tokens": not plain
        return KVCacheSemantics(self.scope, self.window, plain=self.compression.policy == "none")

    def check(self) -> list[str]:
        r = _scope_reasons(self.scope, self.window)
        if self.block_size < 1:
            r.append(f"block_size must be >= 1, got {self.block_size}")
        if self.initial_blocks < 1:
            r.append(f"initial_blocks must be >= 1, got {self.initial_blocks}")
        if self.compression.policy != "none" and (self.scope != "document" or self.window is not None):
            r.append("compression applies to scope='document' without a window")
        return r

    def check_with(self, backbone) -> list[str]:
        c = self.compression
        if c.policy == "kivi" and backbone.head_dim * c.bits % 8:
            return [f"kivi needs head_dim * bits divisible by 8, got {backbone.head_dim} * {c.bits}"]
        return []


@dataclass(frozen=True)
class TrellisConfig(MemoryConfig):
    """Trellis learned bounded KV memory (arXiv 2512.23852): per layer and KV head, `slots` key
    and value slots written by test-time gradient steps with a learned forget gate, read by every
    query and added to the attention output through a learned per-head gate; beside it an exact
    window of the last `window` past tokens (0: only the current segment is exact). Tokens leave
    the exact window into the slots. The state is fixed in size, whatever the context length."""

    kind: ClassVar[str] = "trellis"
    slots: int = 32                          # m: key/value slots per layer and KV head
    window: int = 0                          # exact past tokens kept beyond the current segment
    layers: tuple[int, ...] | None = None    # layers with a memory; None: all
    init_alpha: float = 0.02                 # forget gate alpha_t at initialisation (bias of its sigmoid)
    init_theta: float = 0.3                  # inner step size theta_t at initialisation
    init_key_std: float = 1.0                # std of the learned initial key slots
    gate_init: float = 0.0                   # output gate per query head (0: starts as the identity)
    write_chunk: int = 16                    # tokens whose pass-1 addresses share one state (1: per token)

    @property
    def holds_context(self) -> bool:
        return self.window > 0

    def check(self) -> list[str]:
        r = []
        if self.slots < 1:
            r.append(f"slots must be >= 1, got {self.slots}")
        if self.window < 0:
            r.append(f"window must be >= 0, got {self.window}")
        for name in ("init_alpha", "init_theta"):
            if not 0 < getattr(self, name) < 1:
                r.append(f"{name} must be in (0, 1), got {getattr(self, name)}")
        if self.write_chunk < 1:
            r.append(f"write_chunk must be >= 1, got {self.write_chunk}")
        if self.init_key_std <= 0:
            r.append(f"init_key_std must be > 0, got {self.init_key_std}")
        return r

    def check_with(self, backbone: BackboneConfig) -> list[str]:
        return _layers_reasons(self.layers, backbone)
