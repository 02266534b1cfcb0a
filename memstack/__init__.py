"""memstack: memory for transformer language models.

Every memory architecture on one backbone, through one interface (sites, explicit state,
MemorySpec), compared on the same budget, and runnable: train, evaluate, generate.

    from memstack import BackboneConfig, ModelConfig, build_model, memory_config
    model = build_model(ModelConfig(BackboneConfig(), (memory_config("xl", mem_len=128),)))
    out, state = model(tokens, state=state, step=Step(reset=...))
"""
from memstack.backbone.model import MemoryModel, ModelOutput, build_model
from memstack.checkpoint import load_checkpoint, save_checkpoint
from memstack.config import BackboneConfig, MemoryConfig, ModelConfig
from memstack.errors import AssetError, CheckpointError, ConfigError, MemstackError, UnknownNameError
from memstack.memory.base import Memory, MemorySpec, Site, Step
from memstack.memory.state import ModelState
from memstack.registry import MEMORIES, TASKS, memory_config, register_memory, register_task, validate

__version__ = "0.1.0"

__all__ = [
    "AssetError", "BackboneConfig", "CheckpointError", "ConfigError", "MEMORIES", "Memory", "MemoryConfig",
    "MemoryModel", "MemorySpec", "MemstackError", "ModelConfig", "ModelOutput", "ModelState", "Site", "Step",
    "TASKS", "UnknownNameError", "build_model", "load_checkpoint", "memory_config", "register_memory",
    "register_task", "save_checkpoint", "validate", "__version__",
]
