"""Configs of the learned-memory family (kept apart from the modules so that reading a YAML
file imports nothing heavy)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from memstack.config import BackboneConfig, MemoryConfig, _layers_reasons


@dataclass(frozen=True)
class MemoryTokensConfig(MemoryConfig):
    """Learned tokens prepended to every segment (non-recurrent)."""

    kind: ClassVar[str] = "memory_tokens"
    n_tokens: int = 8          # memory tokens per segment
    init_std: float = 0.02

    def check(self) -> list[str]:
        r = []
        if self.n_tokens < 1:
            r.append(f"n_tokens must be >= 1, got {self.n_tokens}")
        if self.init_std <= 0:
            r.append(f"init_std must be > 0, got {self.init_std}")
        return r


# ---- recurrent memory tokens and associative memories (RMT, ARMT, Infini-attention, HMT) --------

@dataclass(frozen=True)
class RMTConfig(MemoryConfig):
    """Recurrent Memory Transformer: read tokens before, write tokens after every segment."""

    kind: ClassVar[str] = "rmt"
    n_tokens: int = 8          # memory tokens (read = write = the carried memory)
    init_std: float = 0.02     # the learned initial memory

    def check(self) -> list[str]:
        r = [] if self.n_tokens >= 1 else [f"n_tokens must be >= 1, got {self.n_tokens}"]
        if self.init_std <= 0:
            r.append(f"init_std must be > 0, got {self.init_std}")
        return r


@dataclass(frozen=True)
class ARMTConfig(MemoryConfig):
    """Associative Recurrent Memory Transformer: a per-layer associative matrix written by delta rule."""

    kind: ClassVar[str] = "armt"
    n_tokens: int = 4                       # write tokens appended to every segment (learned, constant)
    d_mem: int = 16                         # key/query projection width before the DPFP feature map
    nu: int = 3                             # DPFP order: feature width = 2 * nu * d_mem
    correction: bool = True                 # the paper's new-information normaliser update (gamma)
    eps: float = 1e-5
    init_std: float = 0.02
    layers: tuple[int, ...] | None = None   # layers with an associative memory; None: all

    def check(self) -> list[str]:
        r = []
        for name in ("n_tokens", "d_mem", "nu"):
            if getattr(self, name) < 1:
                r.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.nu >= 1 and self.d_mem >= 1 and self.nu > 2 * self.d_mem:
            r.append(f"nu ({self.nu}) must be <= 2 * d_mem ({2 * self.d_mem}) (DPFP rolls the 2*d_mem features)")
        if self.eps <= 0:
            r.append(f"eps must be > 0, got {self.eps}")
        if self.init_std <= 0:
            r.append(f"init_std must be > 0, got {self.init_std}")
        return r

    def check_with(self, backbone: BackboneConfig) -> list[str]:
        return _layers_reasons(self.layers, backbone)


@dataclass(frozen=True)
class InfiniConfig(MemoryConfig):
    """Infini-attention: per-head compressive memory (linear attention) gated with local attention."""

    kind: ClassVar[str] = "infini"
    rule: Literal["linear", "delta"] = "delta"
    gate_init: float = -3.0                 # sigmoid(-3) = 0.047: start close to local attention
    eps: float = 1e-6
    layers: tuple[int, ...] | None = None   # layers with memory; None: all

    def check(self) -> list[str]:
        r = [] if self.rule in ("linear", "delta") else [f"rule must be 'linear' or 'delta', got {self.rule!r}"]
        if self.eps <= 0:
            r.append(f"eps must be > 0, got {self.eps}")
        return r

    def check_with(self, backbone: BackboneConfig) -> list[str]:
        return _layers_reasons(self.layers, backbone)


@dataclass(frozen=True)
class HMTConfig(MemoryConfig):
    """Hierarchical Memory Transformer: sensory tokens, a recalled memory token, a memory cache."""

    kind: ClassVar[str] = "hmt"
    n_sensory: int = 8          # last tokens of the previous segment prepended (sensory memory)
    n_summary: int = 8          # last tokens of the previous segment the summary pass reads
    cache_size: int = 16        # past memory embeddings kept for recall (FIFO)
    d_recall: int | None = None  # width of the recall attention's query/key projections; None: d_model
    init_std: float = 0.02

    def check(self) -> list[str]:
        r = []
        for name in ("n_sensory", "n_summary", "cache_size"):
            if getattr(self, name) < 0 or (name != "n_sensory" and getattr(self, name) < 1):
                r.append(f"{name} must be >= {0 if name == 'n_sensory' else 1}, got {getattr(self, name)}")
        if self.d_recall is not None and self.d_recall < 1:
            r.append(f"d_recall must be >= 1 or null, got {self.d_recall}")
        if self.init_std <= 0:
            r.append(f"init_std must be > 0, got {self.init_std}")
        return r

    def check_with(self, backbone: BackboneConfig) -> list[str]:
        keep = max(self.n_sensory, self.n_summary)
        return [] if keep <= backbone.seg_len else [
            f"n_sensory and n_summary ({keep}) must be <= seg_len ({backbone.seg_len}): they are read from the previous segment"]


@dataclass(frozen=True)
class XLConfig(MemoryConfig):
    """Transformer-XL segment recurrence."""

    kind: ClassVar[str] = "xl"
    mem_len: int = 64                       # hidden states kept per layer (FIFO over tokens)
    layers: tuple[int, ...] | None = None   # layers with memory; None: all

    @property
    def holds_context(self) -> bool:
        return True

    def check(self) -> list[str]:
        return [] if self.mem_len >= 1 else [f"mem_len must be >= 1, got {self.mem_len}"]

    def check_with(self, backbone: BackboneConfig) -> list[str]:
        return _layers_reasons(self.layers, backbone)


# ----------------------------------------------------------------------------- learned family, part B
# (Compressive Transformer, LM2, Perceiver-style latents, prefix-tuning)

COMPRESSIONS = ("mean", "max", "conv", "dilated_conv", "most_used")


@dataclass(frozen=True)
class CompressiveConfig(XLConfig):
    """Compressive Transformer: Transformer-XL memory plus a compressed memory of evicted states."""

    kind: ClassVar[str] = "compressive"
    cmem_len: int = 32                      # compressed slots kept per layer (FIFO)
    rate: int = 4                           # evicted states per compressed slot
    compression: Literal["mean", "max", "conv", "dilated_conv", "most_used"] = "conv"
    recon_weight: float = 1.0               # weight of the attention-reconstruction loss (conv, dilated_conv)

    def check(self) -> list[str]:
        r = super().check()
        if self.cmem_len < 1:
            r.append(f"cmem_len must be >= 1, got {self.cmem_len}")
        if self.rate < 1:
            r.append(f"rate must be >= 1, got {self.rate}")
        if self.compression not in COMPRESSIONS:
            r.append(f"compression must be one of {', '.join(COMPRESSIONS)}, got {self.compression!r}")
        if self.recon_weight < 0:
            r.append(f"recon_weight must be >= 0, got {self.recon_weight}")
        if self.rate >= 1 and self.mem_len >= 1 and self.mem_len % self.rate:
            r.append(f"mem_len ({self.mem_len}) must be a multiple of rate ({self.rate}) so evicted states "
                     "fill whole compressed slots")
        if self.compression == "dilated_conv" and self.rate >= 1 and self.rate & (self.rate - 1):
            r.append(f"compression dilated_conv needs a power-of-two rate (dilations 1, 2, ..., rate/2), got {self.rate}")
        return r

    def check_with(self, backbone: BackboneConfig) -> list[str]:
        r = super().check_with(backbone)
        if self.rate >= 1 and backbone.seg_len % self.rate:
            r.append(f"the backbone's seg_len ({backbone.seg_len}) must be a multiple of rate ({self.rate}) so "
                     "evicted states fill whole compressed slots")
        return r


@dataclass(frozen=True)
class LM2Config(MemoryConfig):
    """LM2: a gated memory bank per layer, read by cross-attention, written with input/forget gates."""

    kind: ClassVar[str] = "lm2"
    n_slots: int = 16                       # memory slots per layer (each a d_model vector)
    n_heads: int = 4                        # heads of the read and write cross-attention
    layers: tuple[int, ...] | None = None   # layers with a memory bank; None: all
    forget_bias: float = 1.0                # initial forget-gate bias (>0: keep by default)
    init_std: float = 0.02

    def check(self) -> list[str]:
        r = []
        if self.n_slots < 1:
            r.append(f"n_slots must be >= 1, got {self.n_slots}")
        if self.n_heads < 1:
            r.append(f"n_heads must be >= 1, got {self.n_heads}")
        if self.init_std <= 0:
            r.append(f"init_std must be > 0, got {self.init_std}")
        return r

    def check_with(self, backbone: BackboneConfig) -> list[str]:
        r = _layers_reasons(self.layers, backbone)
        if self.n_slots > backbone.d_model:
            r.append(f"n_slots ({self.n_slots}) must be <= d_model ({backbone.d_model}): the bank starts as "
                     "rows of the identity matrix")
        if self.n_heads >= 1 and backbone.d_model % self.n_heads:
            r.append(f"d_model ({backbone.d_model}) must be divisible by n_heads ({self.n_heads})")
        return r


@dataclass(frozen=True)
class LatentConfig(MemoryConfig):
    """Perceiver-style latent memory: latents that cross-attend to each segment, carried onward."""

    kind: ClassVar[str] = "latents"
    n_latents: int = 16                     # latent vectors (each d_model wide)
    n_heads: int = 4                        # heads of the write cross-attention / latent self-attention
    self_layers: int = 1                    # latent self-attention blocks after the cross-attention
    layers: tuple[int, ...] | None = None   # layers that read the latents as extra keys/values; None: all
    init_std: float = 0.02

    def check(self) -> list[str]:
        r = []
        if self.n_latents < 1:
            r.append(f"n_latents must be >= 1, got {self.n_latents}")
        if self.n_heads < 1:
            r.append(f"n_heads must be >= 1, got {self.n_heads}")
        if self.self_layers < 0:
            r.append(f"self_layers must be >= 0, got {self.self_layers}")
        if self.init_std <= 0:
            r.append(f"init_std must be > 0, got {self.init_std}")
        return r

    def check_with(self, backbone: BackboneConfig) -> list[str]:
        r = _layers_reasons(self.layers, backbone)
        if self.n_heads >= 1 and backbone.d_model % self.n_heads:
            r.append(f"d_model ({backbone.d_model}) must be divisible by n_heads ({self.n_heads})")
        return r


@dataclass(frozen=True)
class PrefixConfig(MemoryConfig):
    """Prefix-tuning: a learned key/value prefix at every layer (optionally MLP-reparameterised)."""

    kind: ClassVar[str] = "prefix"
    n_prefix: int = 8                       # prefix length (virtual tokens) per layer; 0: per-user rows only
    reparam: bool = True                    # P = MLP(P'), as the paper trains it
    reparam_hidden: int = 256               # hidden width of the reparameterisation MLP
    layers: tuple[int, ...] | None = None   # layers with a prefix; None: all
    init_std: float = 0.02
    # per-namespace identity rows (the converged system, memory/learned/user_prefix.py): a
    # `user:<id>` / `task:<id>` namespace that learns gets `user_prefix` key/value rows per layer,
    # read by that namespace's rows only; 0: none. user_gate: the fixed gate of their read;
    # user_key_init_std: std of a fresh table's keys (its values start at zero);
    # user_write_quota: rows one online update may write in such a table (null: no quota)
    user_prefix: int = 0
    user_gate: float = 1.0
    user_key_init_std: float = 1.0
    user_write_quota: int | None = None

    def check(self) -> list[str]:
        r = []
        if not isinstance(self.user_prefix, int) or isinstance(self.user_prefix, bool) or self.user_prefix < 0:
            r.append(f"user_prefix must be an integer >= 0 (0: no per-user rows), got {self.user_prefix!r}")
        elif self.n_prefix < (0 if self.user_prefix else 1):
            r.append(f"n_prefix must be >= 1 (or 0 with user_prefix > 0: per-user rows only), got {self.n_prefix}")
        if not (isinstance(self.user_gate, (int, float)) and not isinstance(self.user_gate, bool)
                and 0 < self.user_gate < float("inf")):
            r.append(f"user_gate must be a finite number > 0, got {self.user_gate!r}")
        if not (isinstance(self.user_key_init_std, (int, float)) and not isinstance(self.user_key_init_std, bool)
                and 0 < self.user_key_init_std < float("inf")):
            r.append(f"user_key_init_std must be a finite number > 0, got {self.user_key_init_std!r}")
        if self.user_write_quota is not None and (not isinstance(self.user_write_quota, int)
                                                  or isinstance(self.user_write_quota, bool) or self.user_write_quota < 1):
            r.append(f"user_write_quota must be a positive integer or null, got {self.user_write_quota!r}")
        if self.reparam_hidden < 1:
            r.append(f"reparam_hidden must be >= 1, got {self.reparam_hidden}")
        if self.init_std <= 0:
            r.append(f"init_std must be > 0, got {self.init_std}")
        return r

    def check_with(self, backbone: BackboneConfig) -> list[str]:
        return _layers_reasons(self.layers, backbone)
