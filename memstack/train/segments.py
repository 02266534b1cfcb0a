"""The segment loop: one training step over N consecutive segments, with a BPTT policy.

Backprop-through-time policies (the state entering segment n is what gets detached):
- "full":      gradients flow through every segment boundary of the step
- "truncated": the state is detached every k segments (n % k == 0), so a loss reaches back
               through at most k - 1 boundaries -- into at most k segments, its own included
- "detached":  the state is detached at every boundary (k = 1)
Between steps the carried state is always detached (the step is the outer truncation).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from memstack.backbone.model import cross_entropy
from memstack.data.packing import Batch
from memstack.memory.base import Step
from memstack.memory.state import ModelState, detach


def detach_before(n: int, policy: str, k: int) -> bool:
    """Whether the state entering segment n (0-based, within a step) is detached."""
    if n == 0 or policy == "detached":
        return True
    if policy == "truncated":
        return n % k == 0
    if policy == "full":
        return False
    raise ValueError(f"unknown bptt policy {policy!r}; valid: full, truncated, detached")


class SegmentLoop(nn.Module):
    """Wraps the model so one call runs a whole step (what DDP needs: one forward per backward)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: Batch, state: ModelState, policy: str, k: int, loss_scale: float) -> tuple[Tensor, Tensor, ModelState]:
        """Returns (loss to backprop: (sum of token losses + auxiliary losses) * loss_scale, the
        detached sum of token losses alone (what is logged as the LM loss), state)."""
        total: Tensor = batch.tokens.new_zeros((), dtype=torch.float32)
        aux: Tensor = batch.tokens.new_zeros((), dtype=torch.float32)
        for n in range(batch.tokens.shape[1]):
            if detach_before(n, policy, k):
                state = detach(state)
            out, state = self.model(batch.tokens[:, n], state, Step(reset=batch.reset[:, n]))
            ce = cross_entropy(out.logits, batch.targets[:, n], reduction="sum")
            total = total + ce
            if out.aux_losses:  # mean-like auxiliary losses count once per target token, as the LM loss
                n_tgt = (batch.targets[:, n] != -100).sum()
                aux = aux + out.aux_loss * n_tgt
        return (total + aux) * loss_scale, total.detach(), state
