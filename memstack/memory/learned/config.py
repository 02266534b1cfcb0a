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

COMPRESSIONS = ("mean", "max", "conv", "most_used")


@dataclass(frozen=True)
class CompressiveConfig(XLConfig):
    """Compressive Transformer: Transformer-XL memory plus a compressed memory of evicted states."""

    kind: ClassVar[str] = "compressive"
    cmem_len: int = 32                      # compressed slots kept per layer (FIFO)
    rate: int = 4                           # evicted states per compressed slot
    compression: Literal["mean", "max", "conv", "most_used"] = "conv"
    recon_weight: float = 1.0               # weight of the attention-reconstruction loss (conv only)

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
    n_prefix: int = 8                       # prefix length (virtual tokens) per layer
    reparam: bool = True                    # P = MLP(P'), as the paper trains it
    reparam_hidden: int = 256               # hidden width of the reparameterisation MLP
    layers: tuple[int, ...] | None = None   # layers with a prefix; None: all
    init_std: float = 0.02

    def check(self) -> list[str]:
        r = []
        if self.n_prefix < 1:
            r.append(f"n_prefix must be >= 1, got {self.n_prefix}")
        if self.reparam_hidden < 1:
            r.append(f"reparam_hidden must be >= 1, got {self.reparam_hidden}")
        if self.init_std <= 0:
            r.append(f"init_std must be > 0, got {self.init_std}")
        return r

    def check_with(self, backbone: BackboneConfig) -> list[str]:
        return _layers_reasons(self.layers, backbone)
