"""Memories: the one interface (base.py), composition (stack.py), state utilities (state.py), and
the families: kv/ (runtime), learned/ (memory state inside the model)."""
from memstack.memory.base import AttnIO, KVBlock, Memory, MemorySpec, Site, Step, StepContext
from memstack.memory.state import ModelState

__all__ = ["AttnIO", "KVBlock", "Memory", "MemorySpec", "ModelState", "Site", "Step", "StepContext"]
