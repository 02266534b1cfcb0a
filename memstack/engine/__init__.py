"""The generation engine: continuous batching over paged KV, prefix reuse, tiers, sessions (HTTP: memstack.server)."""
from memstack.engine.config import EngineConfig
from memstack.engine.engine import Engine, EngineError
from memstack.engine.request import RequestOutput

__all__ = ["Engine", "EngineConfig", "EngineError", "RequestOutput"]
