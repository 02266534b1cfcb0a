"""Memory ablation: evaluate a trained model with its memory switched off, to show the memory is
actually used (the evaluation drops when it is gone).

Each memory says how it is switched off (`Memory.ablate`, memory/base.py), so this applies to
every registered memory, present and future. By default:

- "identity" -- a memory whose output can be closed (`make_identity()`): the model equals the
                backbone without it (Engram, PKM, RETRO, kNN-LM, the gated attention memories);
- "reset"    -- a memory that cannot be closed but carries state: its state is reset at the start
                of every segment (`Memory.reset` with a mask of all rows), so each segment starts
                from the memory's fresh state and nothing crosses a segment boundary through it.
                Learned initial states (the latents' Z0) stay: they carry no information about the
                document. The document position is not touched;
- "zero"     -- a stateless memory that cannot be closed (memory tokens, prefix-tuning): every
                parameter of the memory is set to 0. The slots remain and still take a share of
                the attention (score 0) but bring no content.

The ablated model is a copy; the original is left as it was.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from memstack.memory.base import Ablation, Step
from memstack.memory.state import ModelState

RESET, IDENTITY, ZERO = Ablation.RESET.value, Ablation.IDENTITY.value, Ablation.ZERO.value


class AblatedModel(nn.Module):
    """A copy of `model` whose memories are switched off (see the module docstring). Call it like
    the model: `out, state = ablated(tokens, state, step)`."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = copy.deepcopy(model)
        self.modes: list[str] = []
        for mem in self.model.memory.memories:
            self.modes.append(Ablation(mem.ablate()).value)
        self._reset_any = RESET in self.modes

    @property
    def ablation(self) -> dict[str, str]:
        """memory kind -> how it was switched off."""
        return dict(zip(self.model.memory.kinds, self.modes))

    @property
    def cfg(self):
        return self.model.cfg

    @property
    def memory(self):
        return self.model.memory

    @property
    def device(self) -> torch.device:
        return self.model.device

    def init_state(self, batch: int, device: torch.device | str | None = None) -> ModelState:
        return self.model.init_state(batch, device)

    def forward(self, tokens: Tensor, state: ModelState | None = None, step: Step | None = None) -> tuple[Any, ModelState]:
        step = step or Step()
        if self._reset_any and step.seg_start:
            if state is None:
                state = self.model.init_state(tokens.shape[0], tokens.device)
            mask = torch.ones(tokens.shape[0], dtype=torch.bool, device=tokens.device)
            memories = tuple(m.reset(s, mask) if mode == RESET else s
                             for m, s, mode in zip(self.model.memory.memories, state.memories, self.modes))
            state = ModelState(state.pos, memories)
        return self.model(tokens, state, step)


def ablated(model: nn.Module) -> AblatedModel:
    """The model with every memory switched off (evaluation mode, like the model given)."""
    return AblatedModel(model).train(model.training)


def evaluate_with_ablation(task: Any, model: nn.Module) -> dict:
    """{"metrics": task metrics, "ablated": metrics with the memory switched off, "ablation": how each
    memory was switched off, "delta": {primary: ablated - normal}}."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            normal = task.evaluate(model)
            off_model = ablated(model)
            off = task.evaluate(off_model)
    finally:
        model.train(was)
    primary = getattr(task, "primary", "")
    out = {"metrics": normal, "ablated": off, "ablation": off_model.ablation}
    if primary in normal and primary in off:
        out["delta"] = {primary: off[primary] - normal[primary]}
    return out
