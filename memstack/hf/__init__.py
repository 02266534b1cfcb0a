"""Hugging Face models as memstack backbones, and back.

`from_hf(model_or_path)` turns a HF `LlamaForCausalLM` into a memstack `MemoryModel` (weights
copied, config checked with every reason it cannot be reproduced); `to_hf(model)` exports the
backbone back. Memories then attach to the converted model like to any other (see
docs/benchmarks/hf.md for SmolLM2-135M with a memory on the frozen backbone). Needs the optional
extra `memstack[hf]` (transformers, gguf); nothing is downloaded from a hub.
"""
from __future__ import annotations

from memstack.hf.convert import backbone_config_from_hf, from_hf, hf_config_from_backbone, hf_config_reasons, load_hf_model, to_hf

__all__ = ["backbone_config_from_hf", "from_hf", "hf_config_from_backbone", "hf_config_reasons", "load_hf_model", "to_hf"]
