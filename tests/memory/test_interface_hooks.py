"""The two generic interface additions used by the learned-memory family:

- `Memory.block_in` (BLOCK site, before each block): it sees exactly the residual stream entering
  the block, its result is what the block processes, and it honours `layers`;
- `StepContext.encode` (the backbone's blocks with no memory attached): equals the plain model's
  pre-norm hidden states, and is independent of the memories in the stack.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import pytest
import torch
from torch import Tensor, nn

from memstack.backbone.model import build_model
from memstack.config import BackboneConfig, MemoryConfig, ModelConfig
from memstack.memory.base import Memory, Site, StepContext
from memstack.registry import MEMORIES, register_memory
from tolerances import assert_close

B, T = 2, 12
BACKBONE = BackboneConfig(vocab_size=53, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, seg_len=T)


@dataclass(frozen=True)
class ShiftConfig(MemoryConfig):
    kind: ClassVar[str] = "test_shift"
    where: str = "in"                         # "in": block_in of `layer`; "out": block of `layer`
    layer: int = 1
    layers: tuple[int, ...] | None = None


class Shift(Memory):
    """Adds a learned vector to the residual stream before (block_in) or after (block) one layer,
    and records what it saw (in the state: a tuple of the streams it was handed)."""

    sites: ClassVar[frozenset[Site]] = frozenset({Site.BLOCK})

    def __init__(self, cfg: ShiftConfig, backbone: BackboneConfig):
        super().__init__(cfg, backbone)
        self.c = nn.Parameter(torch.randn(backbone.d_model))

    def init_state(self, batch: int, device: torch.device, dtype: torch.dtype) -> Any:
        return ()

    def block_in(self, layer: int, h: Tensor, state: Any, ctx: StepContext) -> tuple[Tensor, Any]:
        state = state + (("in", layer, h.detach().clone()),)
        return (h + self.c if self.cfg.where == "in" and layer == self.cfg.layer else h), state

    def block(self, layer: int, h: Tensor, state: Any, ctx: StepContext) -> tuple[Tensor, Any]:
        state = state + (("out", layer, h.detach().clone()),)
        return (h + self.c if self.cfg.where == "out" and layer == self.cfg.layer else h), state


@pytest.fixture
def shift_registered():
    register_memory("test_shift", config=ShiftConfig, replace=True)(Shift)
    yield
    MEMORIES.remove("test_shift")


def _model(cfg):
    torch.manual_seed(0)
    return build_model(ModelConfig(BACKBONE, (cfg,))).eval()


def test_block_in_sees_the_stream_entering_each_block(shift_registered):
    model = _model(ShiftConfig(where="in", layer=1))
    seen_by_block = []
    hooks = [blk.attn_norm.register_forward_hook(lambda m, inp, out: seen_by_block.append(inp[0].detach().clone()))
             for blk in model.blocks]
    tokens = torch.randint(0, 53, (B, T))
    with torch.no_grad():
        _, state = model(tokens)
    for h in hooks:
        h.remove()
    rec = state.memories[0]
    assert [(w, l) for w, l, _ in rec] == [("in", 0), ("out", 0), ("in", 1), ("out", 1), ("in", 2), ("out", 2)]
    ins = [h for w, _, h in rec if w == "in"]
    outs = [h for w, _, h in rec if w == "out"]
    assert torch.equal(seen_by_block[0], ins[0])                      # layer 0: untouched
    assert_close(seen_by_block[1], ins[1] + model.memory.memories[0].c)  # layer 1 got block_in's result
    assert torch.equal(ins[1], outs[0])                                # the stream entering 1 left 0
    assert torch.equal(seen_by_block[2], ins[2])


def test_block_in_before_layer_l_equals_block_after_layer_l_minus_1(shift_registered):
    tokens = torch.randint(0, 53, (B, T))
    a, b = _model(ShiftConfig(where="in", layer=2)), _model(ShiftConfig(where="out", layer=1))
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        la, lb = a(tokens)[0].logits, b(tokens)[0].logits
        plain = build_model(ModelConfig(BACKBONE, ())).eval()
        plain.load_state_dict(a.state_dict(), strict=False)
        lp = plain(tokens)[0].logits
    assert_close(la, lb)
    assert (la - lp).abs().max() > 1e-3   # and the shift does change the output


def test_block_in_honours_layers(shift_registered):
    model = _model(ShiftConfig(where="in", layer=1, layers=(0, 2)))
    with torch.no_grad():
        _, state = model(torch.randint(0, 53, (B, T)))
    assert [(w, l) for w, l, _ in state.memories[0]] == [("in", 0), ("out", 0), ("in", 2), ("out", 2)]


def test_encode_equals_the_plain_models_prenorm_hidden(shift_registered):
    """encode runs the blocks with no memory: equal to a memory-less model, whatever the stack holds."""
    model = _model(ShiftConfig(where="in", layer=1))
    plain = build_model(ModelConfig(BACKBONE, ())).eval()
    plain.load_state_dict(model.state_dict(), strict=False)
    tokens = torch.randint(0, 53, (B, T))
    captured = {}
    hook = plain.norm.register_forward_hook(lambda m, inp, out: captured.update(h=inp[0].detach().clone()))
    with torch.no_grad():
        ref = plain(tokens)[0]
        pos = torch.arange(T).expand(B, T)
        h = model.encode(model.tok_emb(tokens), pos)
    hook.remove()
    assert_close(h, captured["h"])
    assert_close(model.lm_head(model.norm(h)).float(), ref.logits)
    # positions are RoPE positions: shifting them all leaves a causal pass unchanged (relative)
    with torch.no_grad():
        h2 = model.encode(model.tok_emb(tokens), pos + 1000)
    assert_close(h2, h, dtype=torch.float16)


def test_memories_see_encode_in_their_context(shift_registered):
    got = {}

    class Peek(Shift):
        def block_in(self, layer, h, state, ctx):
            got["encode"] = ctx.encode
            return h, state

    register_memory("test_shift", config=ShiftConfig, replace=True)(Peek)
    model = _model(ShiftConfig())
    with torch.no_grad():
        model(torch.randint(0, 53, (B, T)))
    assert got["encode"] is not None and got["encode"].__self__ is model


@dataclass(frozen=True)
class SlotsAConfig(MemoryConfig):
    kind: ClassVar[str] = "test_slots_a"
    p: int = 2
    q: int = 3


@dataclass(frozen=True)
class SlotsBConfig(SlotsAConfig):
    kind: ClassVar[str] = "test_slots_b"


class Slots(Memory):
    """Adds p prefix and q suffix tokens (distinct constants); records, at the last block, the
    stream at the slots `ctx.slots_of(self)` names, and in embed_out what the stack hands over."""

    sites: ClassVar[frozenset[Site]] = frozenset({Site.EMBED, Site.BLOCK})

    def __init__(self, cfg, backbone):
        super().__init__(cfg, backbone)
        self.pre = nn.Parameter(torch.randn(cfg.p, backbone.d_model))
        self.suf = nn.Parameter(torch.randn(cfg.q, backbone.d_model))

    def init_state(self, batch, device, dtype):
        return {}

    def embed(self, x, state, ctx):
        B = x.shape[0]
        return self.pre.expand(B, -1, -1), self.suf.expand(B, -1, -1), state

    def block(self, layer, h, state, ctx):
        if layer == self.backbone.n_layers - 1:
            pre, suf = ctx.slots_of(self)
            state = {**state, "pre": h[:, pre].clone(), "suf": h[:, suf].clone()}
        return h, state

    def embed_out(self, h_prefix, h_suffix, state, ctx):
        return {**state, "out_pre": h_prefix.clone(), "out_suf": h_suffix.clone()}


def test_embed_slots_locate_each_memorys_own_tokens():
    register_memory("test_slots_a", config=SlotsAConfig, replace=True)(Slots)
    register_memory("test_slots_b", config=SlotsBConfig, replace=True)(Slots)
    try:
        torch.manual_seed(0)
        model = build_model(ModelConfig(BACKBONE, (SlotsAConfig(p=2, q=3), SlotsBConfig(p=1, q=4)))).eval()
        with torch.no_grad():
            _, state = model(torch.randint(0, 53, (B, T)))
    finally:
        MEMORIES.remove("test_slots_a")
        MEMORIES.remove("test_slots_b")
    for st, (p, q) in zip(state.memories, [(2, 3), (1, 4)]):
        assert st["pre"].shape[1] == p and st["suf"].shape[1] == q
        assert torch.equal(st["pre"], st["out_pre"]) and torch.equal(st["suf"], st["out_suf"])
    a, b = state.memories
    assert not torch.equal(a["suf"][:, :1], b["suf"][:, :1])   # different slots, different tokens
