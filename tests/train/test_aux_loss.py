"""Auxiliary losses: a memory adds a weighted scalar through `StepContext.add_loss`; the model
returns it in `ModelOutput.aux_losses`; the segment loop adds it to the loss it backpropagates,
counted once per target token (so its gradient equals the gradient of the mean-like term),
while the logged LM loss stays the cross-entropy alone."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import pytest
import torch
from torch import Tensor, nn

from memstack.backbone.model import build_model, cross_entropy
from memstack.config import BackboneConfig, MemoryConfig, ModelConfig
from memstack.data.packing import IGNORE, Batch
from memstack.memory.base import Memory, Site, StepContext
from memstack.registry import MEMORIES, register_memory
from memstack.train.segments import SegmentLoop

KIND = "toy_aux"


@dataclass(frozen=True)
class ToyAuxConfig(MemoryConfig):
    kind: ClassVar[str] = KIND
    weight: float = 0.25


class ToyAux(Memory):
    """Adds w * (p - 3)^2 per layer call as an auxiliary loss; does not touch the residual stream."""

    sites: ClassVar[frozenset[Site]] = frozenset({Site.BLOCK})

    def __init__(self, cfg: ToyAuxConfig, backbone: BackboneConfig):
        super().__init__(cfg, backbone)
        self.p = nn.Parameter(torch.tensor(1.0))

    def block(self, layer: int, h: Tensor, state: Any, ctx: StepContext) -> tuple[Tensor, Any]:
        ctx.add_loss("toy", self.cfg.weight * (self.p - 3.0) ** 2)
        return h, state


@pytest.fixture
def model():
    register_memory(KIND, config=ToyAuxConfig, replace=True)(ToyAux)
    try:
        torch.manual_seed(0)
        yield build_model(ModelConfig(BackboneConfig(vocab_size=50, d_model=16, n_layers=2, n_heads=2, seg_len=8),
                                      (ToyAuxConfig(),)))
    finally:
        MEMORIES.remove(KIND)


def test_model_output_carries_the_accumulated_aux_loss(model):
    out, _ = model(torch.randint(0, 50, (2, 8)))
    # called at both layers: 2 * 0.25 * (1 - 3)^2 = 2.0
    assert set(out.aux_losses) == {"toy"}
    assert out.aux_loss.item() == pytest.approx(2.0)


def test_segment_loop_backprops_aux_once_per_target_and_logs_ce_only(model):
    B, N, S = 2, 3, 8
    tokens = torch.randint(0, 50, (B, N, S))
    targets = torch.randint(0, 50, (B, N, S))
    targets[0, 1, :5] = IGNORE                                    # uneven target counts per segment
    batch = Batch(tokens, targets, torch.zeros(B, N, dtype=torch.bool))
    count = int((targets != IGNORE).sum())
    loop = SegmentLoop(model)
    loss, logged, _ = loop(batch, model.init_state(B), "full", 1, 1.0 / count)
    loss.backward()
    # d/dp of sum_n aux_n * n_tgt_n / count = 2 layers * 2w(p - 3) = 2 * 2 * 0.25 * (-2) = -2
    assert model.memory.memories[0].p.grad.item() == pytest.approx(-2.0)
    with torch.no_grad():
        ce, state = 0.0, model.init_state(B)
        for n in range(N):
            out, state = model(tokens[:, n], state)
            ce += float(cross_entropy(out.logits, targets[:, n], reduction="sum"))
    assert float(logged) == pytest.approx(ce, rel=1e-5)
    assert float(loss) == pytest.approx((ce + 2.0 * count) / count, rel=1e-5)


def test_add_loss_refuses_a_non_scalar(model):
    ctx = StepContext(torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, dtype=torch.long),
                      torch.zeros(1, dtype=torch.bool), True, True, True)
    with pytest.raises(ValueError, match="must be a scalar"):
        ctx.add_loss("x", torch.ones(3))
