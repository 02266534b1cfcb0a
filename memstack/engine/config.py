"""Engine configuration (frozen, checked: every reason at once)."""
from __future__ import annotations

from dataclasses import dataclass

from memstack.config import Checked


@dataclass(frozen=True)
class EngineConfig(Checked):
    """How the engine lays out and schedules KV memory.

    num_blocks:             KV blocks in the device pool; None: kv_memory_mb / block bytes
    max_model_len:          longest request (prompt + new tokens); None: bounded by the pool only
    max_num_seqs:           requests decoded together (the batch)
    max_num_batched_tokens: tokens per step; longer prompts are prefilled in chunks
    host_cache_blocks:      blocks kept in host memory after they leave the device pool (0: off)
    disk_cache_dir:         persistent tier: full prefix blocks written here and reused by later
                            processes (None: off)
    """

    block_size: int = 16
    num_blocks: int | None = None
    kv_memory_mb: float = 64.0
    max_model_len: int | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    enable_prefix_caching: bool = True
    host_cache_blocks: int = 0
    disk_cache_dir: str | None = None
    device: str = "auto"

    def check(self) -> list[str]:
        r = []
        if self.block_size < 1:
            r.append(f"block_size must be >= 1, got {self.block_size}")
        if self.num_blocks is not None and self.num_blocks < 1:
            r.append(f"num_blocks must be >= 1 or null, got {self.num_blocks}")
        if self.kv_memory_mb <= 0:
            r.append(f"kv_memory_mb must be > 0, got {self.kv_memory_mb}")
        if self.max_model_len is not None and self.max_model_len < 2:
            r.append(f"max_model_len must be >= 2 or null, got {self.max_model_len}")
        if self.max_num_seqs < 1:
            r.append(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            r.append(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if self.host_cache_blocks < 0:
            r.append(f"host_cache_blocks must be >= 0, got {self.host_cache_blocks}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            r.append(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        return r
