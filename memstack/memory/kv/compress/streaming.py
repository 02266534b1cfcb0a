"""StreamingLLM (Xiao et al., arXiv 2309.17453): keep the first `sink_tokens` tokens (attention
sinks) and the most recent ones. Scores are recency; `keep_indices` forces the sinks.

Deviation: the budget is keep_ratio * tokens seen (the kvpress protocol), not a fixed cache
size; keys are stored after RoPE with their original positions (the paper re-assigns positions
inside the cache; kept here as kvpress does for pre-trained models without rerotation).
"""
from __future__ import annotations

import torch
from torch import Tensor


def streaming_scores(B: int, L: int, H: int, S: int, device: torch.device) -> Tensor:
    return torch.arange(S, device=device, dtype=torch.float32).expand(B, L, H, S)
