"""Shared by the engine tests (and their subprocesses): the tiny model of every registered memory."""
from __future__ import annotations

import torch

from memstack.backbone.model import build_model
from memstack.config import BackboneConfig, ModelConfig
from memstack.registry import MEMORIES

S, V = 16, 97
BACKBONE = BackboneConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, seg_len=S, init_std=0.3)


def make(name: str, fields: dict | None = None, seed: int = 0):
    """The memory's first contract config (or `fields`) on the tiny backbone, parameters moved off
    any identity initialisation; deterministic in (name, fields, seed) -- a subprocess rebuilds it."""
    fields = MEMORIES.target_class(name).contract_configs()[0] if fields is None else fields
    torch.manual_seed(seed)
    model = build_model(ModelConfig(BACKBONE, (MEMORIES.config_class(name)(**fields),)))
    with torch.no_grad():
        for p in model.memory.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()
