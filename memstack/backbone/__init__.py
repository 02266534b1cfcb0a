"""The dense decoder every memory plugs into."""
from memstack.backbone.model import MemoryModel, ModelOutput, build_model

__all__ = ["MemoryModel", "ModelOutput", "build_model"]
