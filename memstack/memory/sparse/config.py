"""Configs of the sparse-table family (kept import-light: reading a YAML file imports no torch
module of the family)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from memstack.config import BackboneConfig, MemoryConfig, _layers_reasons


@dataclass(frozen=True)
class EngramConfig(MemoryConfig):
    """Engram: hashed token N-gram memory added to the residual stream at chosen layers.

    The table holds layers x orders x heads hashed tables of ~rows_per_head rows (distinct
    primes), each row head_dim wide; a token reads one row per (order, head) per layer, so the
    memory's width is d_mem = len(orders) * heads * head_dim.
    """

    kind: ClassVar[str] = "engram"
    layers: tuple[int, ...] = (0,)          # BLOCK after these blocks (= the paper's Engram before block l + 1)
    orders: tuple[int, ...] = (2, 3)        # suffix N-gram orders
    heads: int = 8                          # hash heads per order
    head_dim: int = 16                      # width of one row
    rows_per_head: int = 1021               # rows per head table (the first prime >= this; 1: one row, the control)
    tokenizer: str | None = None            # compress token ids by this tokenizer's texts; None: ids as they are
    compress: bool = True                   # tokenizer compression on/off (ablation)
    kernel_size: int = 4                    # short causal depthwise conv (dilation = max order); 1: no conv
    conv_zero_init: bool = True
    gate_sqrt: bool = False                 # the demo's signed square root of the gate score (not in the paper)
    table_init_std: float = 0.02
    seed: int = 0                           # hash multipliers
    # per-namespace rows (the converged system): each `user:<id>` / `task:<id>` namespace that has
    # learned gets its own hashed table of ~user_rows_per_head rows per head (same hashes, its own
    # primes), read by the rows of a forward call that belong to it and added to the knowledge
    # rows; 0: none. user_write_quota: rows one online update may write in such a table.
    user_rows_per_head: int = 0
    user_write_quota: int | None = None
    # std of W_V's init; None: init_std / sqrt(2 n_layers) (a fresh Engram barely touches the
    # residual stream). Retrofitting user rows onto a frozen pretrained model without training
    # W_V first needs a larger one (the converged preset), or the rows' reads are too faint to learn.
    value_init_std: float | None = None

    @property
    def d_mem(self) -> int:
        return len(self.orders) * self.heads * self.head_dim

    def check(self) -> list[str]:
        r = []
        if not self.orders or any(o < 1 for o in self.orders) or len(set(self.orders)) != len(self.orders):
            r.append(f"orders must be distinct N-gram orders >= 1, got {list(self.orders)}")
        for name in ("heads", "head_dim", "rows_per_head", "kernel_size"):
            if getattr(self, name) < 1:
                r.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if not isinstance(self.user_rows_per_head, int) or isinstance(self.user_rows_per_head, bool) \
                or self.user_rows_per_head < 0:
            r.append(f"user_rows_per_head must be an integer >= 0 (0: no per-user rows), got {self.user_rows_per_head!r}")
        if self.user_write_quota is not None and (not isinstance(self.user_write_quota, int)
                                                  or isinstance(self.user_write_quota, bool) or self.user_write_quota < 1):
            r.append(f"user_write_quota must be a positive integer or null, got {self.user_write_quota!r}")
        if not self.layers:
            r.append("layers must name at least one layer")
        if self.value_init_std is not None and not (isinstance(self.value_init_std, (int, float))
                                                    and 0 < self.value_init_std < float("inf")):
            r.append(f"value_init_std must be a finite number > 0 or null, got {self.value_init_std!r}")
        if self.table_init_std <= 0:
            r.append(f"table_init_std must be > 0, got {self.table_init_std}")
        if self.seed < 0:
            r.append(f"seed must be >= 0, got {self.seed}")
        if self.tokenizer is not None:
            from memstack.data.tokenizers import tokenizer_reasons

            r += [f"tokenizer: {x}" for x in tokenizer_reasons(self.tokenizer)]
        return r

    def check_with(self, backbone: BackboneConfig) -> list[str]:
        r = _layers_reasons(self.layers, backbone)
        if self.tokenizer is not None and not self.check():
            from memstack.data.tokenizers import tokenizer_vocab

            if tokenizer_vocab(self.tokenizer) != backbone.vocab_size:
                r.append(f"tokenizer {self.tokenizer!r} has {tokenizer_vocab(self.tokenizer)} ids but the backbone's "
                         f"vocab_size is {backbone.vocab_size}")
        return r


@dataclass(frozen=True)
class PKMConfig(MemoryConfig):
    """Product-key memory (Lample et al.) and its Memory+ variant (Berges et al.).

    n_keys sub-keys per half give n_keys**2 value rows; each of `heads` query heads picks `knn`
    rows. memory_plus: SiLU-gated output projection and one value pool shared by all layers.
    """

    kind: ClassVar[str] = "pkm"
    layers: tuple[int, ...] = (0,)
    n_keys: int = 32                        # sub-keys per half; value rows = n_keys ** 2
    k_dim: int = 32                         # query / product-key width (two halves of k_dim / 2)
    heads: int = 4
    knn: int = 8                            # rows read per head (top-k of the product keys)
    value_dim: int | None = None            # None: d_model
    memory_plus: bool = True                # SiLU-gated output (Memory+) instead of the plain read
    shared_values: bool = True              # one value pool for all layers (Memory+); else one per layer
    value_init_std: float = 0.02
    # per-namespace value rows (the converged system): each `user:<id>` / `task:<id>` namespace that
    # has learned owns a value pool of its own, read at the same product-key addresses and added to
    # the shared values; off by default. out_init_std: W_o's init (None: zero, so a fresh memory is
    # the identity -- but then no gradient reaches user values on a frozen model).
    user_values: bool = False
    user_write_quota: int | None = None
    out_init_std: float | None = None

    def check(self) -> list[str]:
        r = []
        if self.out_init_std is not None and not (isinstance(self.out_init_std, (int, float)) and self.out_init_std > 0):
            r.append(f"out_init_std must be a number > 0 or null, got {self.out_init_std!r}")
        if self.user_write_quota is not None and (not isinstance(self.user_write_quota, int)
                                                  or isinstance(self.user_write_quota, bool) or self.user_write_quota < 1):
            r.append(f"user_write_quota must be a positive integer or null, got {self.user_write_quota!r}")
        for name in ("n_keys", "k_dim", "heads", "knn"):
            if getattr(self, name) < 1:
                r.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.k_dim % 2:
            r.append(f"k_dim must be even (two halves), got {self.k_dim}")
        if self.knn > self.n_keys:
            r.append(f"knn ({self.knn}) must be <= n_keys ({self.n_keys}): each half keeps its top knn sub-keys")
        if self.value_dim is not None and self.value_dim < 1:
            r.append(f"value_dim must be >= 1 or null, got {self.value_dim}")
        if not self.layers:
            r.append("layers must name at least one layer")
        if self.value_init_std <= 0:
            r.append(f"value_init_std must be > 0, got {self.value_init_std}")
        return r

    def check_with(self, backbone: BackboneConfig) -> list[str]:
        return _layers_reasons(self.layers, backbone)
