"""Hugging Face PEFT prefix-tuning adapters <-> memstack's `prefix` memory.

PEFT's layout (read from peft 0.21.2's source: tuners/prefix_tuning/model.py, peft_model.py
`get_prompt`, utils/other.py `_prepare_prompt_learning_config`, tuners_utils.py
`BasePromptEncoder._get_adapter_state_dict`):

    adapter_config.json        {"peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM",
                                "num_virtual_tokens": P, "num_layers": L, "token_dim": Hkv * hd,
                                "num_attention_heads": Hkv, "num_transformer_submodules": 1,
                                "prefix_projection": ..., "encoder_hidden_size": ..., ...}
    adapter_model.safetensors  {"prompt_embeddings": (P, L * 2 * Hkv * hd)}

`prompt_embeddings` is the prefix itself (the MLP's output when the adapter was trained with
`prefix_projection`: PEFT saves the projected prefix), laid out so that
`view(P, L, 2, Hkv, hd)` gives, per layer, the keys (index 0) and values (index 1) of every
virtual token and KV head; under GQA PEFT sizes the prefix by the KV heads (token_dim =
head_dim * num_key_value_heads). Transformers puts these keys into the KV cache as they are --
never rotated -- and gives the real tokens the positions P, P+1, ... after them.

memstack's prefix stores keys *before* rotation and rotates key i at the position i - P relative
to the segment's first token (memory/learned/prefix.py). Both give the same attention scores iff
    peft_key_i = RoPE(i) applied to memstack_key_i
(score = <R(t) q, R(i - P) k'> = <R(P + t) q, R(i) k'>: the token at P + t against a key fixed at
rotation i), so export rotates each key by its index and import rotates back; values are copied.
tests/hf/test_peft.py checks the logits of a PEFT-wrapped `LlamaForCausalLM` against memstack's on
the same weights, both ways.

What does not convert (refused with every reason): a prefix on a subset of layers (PEFT's spans
all), a backbone that is not a plain Llama (hf/convert.py's rules), and any PEFT adapter other
than single-module causal-LM prefix tuning. The MLP reparameterisation is not exported: PEFT
stores the projected prefix, and so does the export (`prefix_projection: false`); an imported
prefix is a direct one (`reparam: false`).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from memstack.backbone.layers import apply_rope, rope_tables
from memstack.config import BackboneConfig
from memstack.errors import CheckpointError, ConfigError
from memstack.memory.learned.config import PrefixConfig

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
PEFT_VERSION = "0.21.2"   # the version whose layout this follows (pinned in the `peft` extra)


def _rotate(kv: Tensor, b: BackboneConfig, sign: int) -> Tensor:
    """kv (L, 2, Hkv, P, hd): keys rotated by +i (sign 1) or -i (sign -1) at virtual token i."""
    P = kv.shape[3]
    pos = (sign * torch.arange(P)).view(1, P)
    cos, sin = rope_tables(pos, b.head_dim, b.rope_theta, torch.float32)      # (1, 1, P, hd/2)
    k = apply_rope(kv[:, 0].float(), cos, sin).to(kv.dtype)                    # (L, Hkv, P, hd)
    return torch.stack([k, kv[:, 1]], dim=1)


def peft_config_dict(b: BackboneConfig, n_prefix: int, base_model: str | None = None) -> dict[str, Any]:
    return {"peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "auto_mapping": None, "peft_version": PEFT_VERSION,
            "base_model_name_or_path": base_model, "revision": None, "inference_mode": True,
            "num_virtual_tokens": n_prefix, "token_dim": b.kv_heads * b.head_dim, "num_transformer_submodules": 1,
            "num_attention_heads": b.kv_heads, "num_layers": b.n_layers, "modules_to_save": None, "init_weights": None,
            "encoder_hidden_size": b.kv_heads * b.head_dim, "prefix_projection": False}


def export_peft_prefix(model, out: str | Path, base_model: str | None = None) -> Path:
    """Write the `prefix` memory of `model` as a PEFT prefix-tuning adapter in directory `out`."""
    from safetensors.torch import save_file

    from memstack.atomic import write_json_atomic
    from memstack.hf.convert import hf_config_from_backbone, hf_config_reasons

    b = model.cfg.backbone
    prefixes = [m for m in model.memory.memories if m.cfg.kind == "prefix"]
    reasons = []
    if len(prefixes) != 1:
        reasons.append(f"the model must have exactly one prefix memory to export, it has {len(prefixes)} "
                       f"(memories: {list(model.memory.kinds) or 'none'})")
    others = [k for k in model.memory.kinds if k != "prefix"]
    if others:
        reasons.append(f"memories {others} have no PEFT prefix-tuning counterpart")
    if prefixes and prefixes[0].cfg.layers is not None:
        reasons.append(f"the prefix covers layers {list(prefixes[0].cfg.layers)}; a PEFT prefix covers every layer")
    try:
        reasons += hf_config_reasons(hf_config_from_backbone(b))
    except ImportError as e:
        reasons.append(str(e))
    if reasons:
        raise ConfigError(reasons, what="PEFT prefix-tuning export")
    with torch.no_grad():
        kv = _rotate(prefixes[0].prefix_kv().detach().float().cpu(), b, +1)   # (L, 2, Hkv, P, hd)
    L, _, H, P, hd = kv.shape
    emb = kv.permute(3, 0, 1, 2, 4).reshape(P, L * 2 * H * hd).contiguous()   # PEFT: view(P, L, 2, Hkv, hd)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({"prompt_embeddings": emb}, str(out / WEIGHTS))
    write_json_atomic(out / CONFIG, peft_config_dict(b, P, base_model))
    return out


def read_peft_prefix(path: str | Path, b: BackboneConfig) -> Tensor:
    """The prefix of a PEFT prefix-tuning adapter as memstack stores it, (L, 2, Hkv, P, hd) with
    keys not yet rotated; refuses an adapter that does not fit backbone `b`, listing every reason."""
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / CONFIG).is_file() or not (path / WEIGHTS).is_file():
        raise CheckpointError(f"{path} is not a PEFT adapter directory (expected {CONFIG} and {WEIGHTS})")
    try:
        cfg = json.loads((path / CONFIG).read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path / CONFIG} is corrupted: {e}") from None
    r = []
    want = {"peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "num_transformer_submodules": 1,
            "num_layers": b.n_layers, "num_attention_heads": b.kv_heads, "token_dim": b.kv_heads * b.head_dim}
    for k, v in want.items():
        if cfg.get(k) != v:
            r.append(f"{k} is {cfg.get(k)!r}, the backbone needs {v!r}")
    P = cfg.get("num_virtual_tokens")
    if not isinstance(P, int) or P < 1:
        r.append(f"num_virtual_tokens must be an integer >= 1, got {P!r}")
    emb = load_file(str(path / WEIGHTS)).get("prompt_embeddings")
    if emb is None:
        r.append(f"{WEIGHTS} has no 'prompt_embeddings' tensor")
    elif isinstance(P, int) and tuple(emb.shape) != (P, b.n_layers * 2 * b.kv_heads * b.head_dim):
        r.append(f"prompt_embeddings has shape {tuple(emb.shape)}, expected {(P, b.n_layers * 2 * b.kv_heads * b.head_dim)}")
    elif emb is not None and not torch.isfinite(emb).all():
        r.append("prompt_embeddings holds NaN or infinite values")
    if r:
        raise ConfigError(r, what=f"PEFT prefix-tuning adapter {path}")
    kv = emb.float().view(P, b.n_layers, 2, b.kv_heads, b.head_dim).permute(1, 2, 3, 0, 4)   # (L, 2, Hkv, P, hd)
    return _rotate(kv.contiguous(), b, -1)


def import_peft_prefix(path: str | Path, backbone_model):
    """A MemoryModel: `backbone_model`'s backbone (weights shared) plus the PEFT adapter at `path`
    as a direct `prefix` memory."""
    b = backbone_model.cfg.backbone
    kv = read_peft_prefix(path, b)
    cfg = PrefixConfig(n_prefix=kv.shape[3], reparam=False)
    model = backbone_model.with_memories([cfg]) if not len(backbone_model.memory) else None
    if model is None:
        raise ConfigError([f"the backbone model already has memories {list(backbone_model.memory.kinds)}; "
                           "pass a model without memories"], what="PEFT prefix-tuning import")
    with torch.no_grad():
        model.memory.memories[-1].kv.copy_(kv.to(model.memory.memories[-1].kv.dtype))
    return model


__all__ = ["export_peft_prefix", "import_peft_prefix", "read_peft_prefix", "peft_config_dict"]
