"""Hugging Face Llama models <-> memstack backbones (config and weights, both ways).

memstack's backbone is Llama-shaped (pre-RMSNorm, RoPE in the HF rotate-half layout, SwiGLU,
GQA/MQA, no biases, optional tied embeddings), so a `LlamaForCausalLM` maps onto it weight for
weight, with no permutation:

    model.embed_tokens              -> tok_emb
    model.layers.i.input_layernorm  -> blocks.i.attn_norm
    model.layers.i.self_attn.{q,k,v,o}_proj -> blocks.i.attn.{wq,wk,wv,wo}
    model.layers.i.post_attention_layernorm -> blocks.i.mlp_norm
    model.layers.i.mlp.{gate,up,down}_proj  -> blocks.i.mlp.{w_gate,w_up,w_down}
    model.norm                      -> norm
    lm_head                         -> lm_head (tied to tok_emb when tie_word_embeddings)

`from_hf` refuses a config it cannot reproduce exactly, listing every reason (RoPE scaling,
biases, another activation, a head_dim that is not hidden/heads, ...). `transformers` is imported
only inside these functions (the optional `hf` extra). Nothing here downloads: a path must be a
local directory (or a GGUF file beside one), and loading runs with `local_files_only=True`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from memstack.config import BackboneConfig, MemoryConfig, ModelConfig
from memstack.errors import ConfigError

HF_HINT = "install the optional extra: pip install 'memstack[hf]'"


def _require_transformers():
    try:
        import transformers  # noqa: F401
    except ImportError as e:
        raise ImportError(f"memstack.hf needs transformers; {HF_HINT}") from e
    return transformers


def _rope(cfg: Any) -> dict:
    """RoPE parameters from a transformers 4.x (rope_theta, rope_scaling) or 5.x (rope_parameters) config."""
    params = getattr(cfg, "rope_parameters", None)
    if isinstance(params, dict) and params:
        return dict(params)
    scaling = getattr(cfg, "rope_scaling", None) or {}
    return {"rope_type": scaling.get("rope_type", scaling.get("type", "default")), "rope_theta": getattr(cfg, "rope_theta", 10000.0),
            **{k: v for k, v in scaling.items() if k not in ("rope_type", "type")}}


def hf_config_reasons(cfg: Any) -> list[str]:
    """Every reason a Hugging Face config cannot be reproduced exactly by memstack's backbone."""
    r = []
    mt = getattr(cfg, "model_type", None)
    if mt != "llama":
        r.append(f"model_type is {mt!r}; only 'llama' (LlamaForCausalLM) is supported")
    rope = _rope(cfg)
    if rope.get("rope_type", "default") != "default":
        r.append(f"rope type {rope.get('rope_type')!r} (RoPE scaling) is not supported; only plain RoPE ('default')")
    if getattr(cfg, "partial_rotary_factor", 1.0) not in (None, 1.0):
        r.append(f"partial_rotary_factor={cfg.partial_rotary_factor}: memstack rotates the whole head")
    for name in ("attention_bias", "mlp_bias"):
        if getattr(cfg, name, False):
            r.append(f"{name}=True: memstack's projections have no biases")
    act = getattr(cfg, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        r.append(f"hidden_act={act!r}: memstack's MLP is SwiGLU (silu)")
    hidden, heads = getattr(cfg, "hidden_size", 0), getattr(cfg, "num_attention_heads", 0)
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    if heads and hidden % heads:
        r.append(f"hidden_size {hidden} is not a multiple of num_attention_heads {heads}")
    hd = getattr(cfg, "head_dim", None)
    if heads and hd is not None and hd != hidden // heads:
        r.append(f"head_dim={hd} differs from hidden_size/num_attention_heads={hidden // heads}; memstack derives it")
    if heads and (hidden // heads) % 2:
        r.append(f"head dim {hidden // heads} is odd; RoPE needs an even head dim")
    if heads and kv and heads % kv:
        r.append(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}")
    if getattr(cfg, "pretraining_tp", 1) not in (None, 1):
        r.append(f"pretraining_tp={cfg.pretraining_tp}: sliced projections are not supported")
    if getattr(cfg, "attention_dropout", 0.0):
        r.append(f"attention_dropout={cfg.attention_dropout}: memstack's attention has no dropout")
    if getattr(cfg, "sliding_window", None):
        r.append(f"sliding_window={cfg.sliding_window}: memstack's attention within a segment is full")
    return r


def backbone_config_from_hf(cfg: Any, seg_len: int | None = None) -> BackboneConfig:
    """The BackboneConfig reproducing a supported HF Llama config. seg_len defaults to the
    model's max_position_embeddings capped at 2048 (memstack's own context window per segment)."""
    reasons = hf_config_reasons(cfg)
    if reasons:
        raise ConfigError(reasons, what=f"Hugging Face config ({getattr(cfg, 'model_type', '?')})")
    heads = cfg.num_attention_heads
    return BackboneConfig(
        vocab_size=cfg.vocab_size, d_model=cfg.hidden_size, n_layers=cfg.num_hidden_layers, n_heads=heads,
        n_kv_heads=getattr(cfg, "num_key_value_heads", None) or heads, d_ff=cfg.intermediate_size,
        seg_len=seg_len or min(getattr(cfg, "max_position_embeddings", 2048) or 2048, 2048),
        rope_theta=float(_rope(cfg)["rope_theta"]), norm_eps=float(cfg.rms_norm_eps),
        tie_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
        init_std=float(getattr(cfg, "initializer_range", 0.02) or 0.02))


def _weight_map(n_layers: int) -> dict[str, str]:
    """memstack parameter name -> HF LlamaForCausalLM parameter name."""
    m = {"tok_emb.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight", "lm_head.weight": "lm_head.weight"}
    for i in range(n_layers):
        a, h = f"blocks.{i}.", f"model.layers.{i}."
        m.update({a + "attn_norm.weight": h + "input_layernorm.weight", a + "mlp_norm.weight": h + "post_attention_layernorm.weight",
                  a + "attn.wq.weight": h + "self_attn.q_proj.weight", a + "attn.wk.weight": h + "self_attn.k_proj.weight",
                  a + "attn.wv.weight": h + "self_attn.v_proj.weight", a + "attn.wo.weight": h + "self_attn.o_proj.weight",
                  a + "mlp.w_gate.weight": h + "mlp.gate_proj.weight", a + "mlp.w_up.weight": h + "mlp.up_proj.weight",
                  a + "mlp.w_down.weight": h + "mlp.down_proj.weight"})
    return m


def load_hf_model(path: str | Path, gguf_file: str | None = None, dtype: torch.dtype = torch.float32):
    """A LlamaForCausalLM from a local directory (or a GGUF file in it), never from the hub."""
    transformers = _require_transformers()
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        path, gguf_file = path.parent, path.name
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a local model directory (memstack never downloads from a hub)")
    kw = {"gguf_file": gguf_file} if gguf_file else {}
    return transformers.AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, dtype=dtype, **kw)


def from_hf(model_or_path: Any, *, memories: tuple[MemoryConfig, ...] | list[MemoryConfig] = (), seg_len: int | None = None,
            gguf_file: str | None = None, dtype: torch.dtype = torch.float32):
    """A memstack MemoryModel with the weights of a HF LlamaForCausalLM (an instance or a local path),
    plus `memories` (initialised as they initialise themselves). Refuses unsupported configs with
    every reason."""
    from memstack.backbone.model import build_model

    hf = model_or_path if hasattr(model_or_path, "config") else load_hf_model(model_or_path, gguf_file, dtype)
    backbone = backbone_config_from_hf(hf.config, seg_len)
    model = build_model(ModelConfig(backbone, tuple(memories)))
    src = hf.state_dict()
    wmap = _weight_map(backbone.n_layers)
    if backbone.tie_embeddings:
        wmap.pop("lm_head.weight")
    missing = [h for h in wmap.values() if h not in src]
    if missing:
        raise ValueError(f"the HF model lacks {len(missing)} expected weights, e.g. {missing[:3]}")
    own = dict(model.named_parameters())
    with torch.no_grad():
        for ours, theirs in wmap.items():
            if own[ours].shape != src[theirs].shape:
                raise ValueError(f"{theirs} has shape {tuple(src[theirs].shape)}, memstack's {ours} expects {tuple(own[ours].shape)}")
            own[ours].copy_(src[theirs].to(own[ours].dtype))
    return model.to(dtype)


def hf_config_from_backbone(b: BackboneConfig, max_position_embeddings: int | None = None):
    """The LlamaConfig of a memstack backbone."""
    transformers = _require_transformers()
    kw = dict(vocab_size=b.vocab_size, hidden_size=b.d_model, intermediate_size=b.ff_dim, num_hidden_layers=b.n_layers,
              num_attention_heads=b.n_heads, num_key_value_heads=b.kv_heads, head_dim=b.head_dim, hidden_act="silu",
              max_position_embeddings=max_position_embeddings or max(b.seg_len, 2048), rms_norm_eps=b.norm_eps,
              tie_word_embeddings=b.tie_embeddings, attention_bias=False, mlp_bias=False, initializer_range=b.init_std,
              bos_token_id=None, eos_token_id=None, pad_token_id=None)
    cfg = transformers.LlamaConfig(**kw)
    if hasattr(cfg, "rope_parameters"):          # transformers >= 5
        cfg.rope_parameters = {"rope_type": "default", "rope_theta": b.rope_theta}
    else:
        cfg.rope_theta = b.rope_theta
    return cfg


def to_hf(model, *, drop_memories: bool = False, max_position_embeddings: int | None = None):
    """A HF LlamaForCausalLM with the backbone weights of a memstack model. A model with memories
    is refused (they have no HF counterpart) unless drop_memories=True."""
    transformers = _require_transformers()
    if len(model.memory) and not drop_memories:
        raise ValueError(f"the model has memories {model.memory.kinds}, which a LlamaForCausalLM cannot hold; "
                         "pass drop_memories=True to export the backbone alone")
    b = model.cfg.backbone
    hf = transformers.LlamaForCausalLM(hf_config_from_backbone(b, max_position_embeddings))
    wmap = _weight_map(b.n_layers)
    own = dict(model.named_parameters())
    dst = dict(hf.named_parameters())
    if b.tie_embeddings:
        wmap.pop("lm_head.weight")
    with torch.no_grad():
        for ours, theirs in wmap.items():
            dst[theirs].copy_(own[ours])
    if b.tie_embeddings:
        hf.tie_weights()
    dtype = next(model.parameters()).dtype
    return hf.to(dtype=dtype, device=model.device).eval()
