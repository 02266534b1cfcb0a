"""Transformer-XL: recurrence equals full attention while nothing is evicted, the FIFO keeps
exactly the last mem_len states at their positions, and no gradient reaches past segments."""
from __future__ import annotations

import pytest
import torch

from memstack.backbone.model import build_model, cross_entropy
from memstack.config import BackboneConfig, ModelConfig
from memstack.memory.base import Step
from memstack.memory.learned.config import XLConfig
from tolerances import assert_close

S = 16


def backbone(seg_len=S, **kw) -> BackboneConfig:
    return BackboneConfig(vocab_size=101, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, seg_len=seg_len, **kw)


def xl_model(mem_len: int, layers=None):
    torch.manual_seed(0)
    return build_model(ModelConfig(backbone(), (XLConfig(mem_len=mem_len, layers=layers),)))


@pytest.mark.parametrize("n_seg", [2, 4])
def test_xl_with_unbounded_memory_equals_one_pass_over_the_document(n_seg):
    """RoPE at absolute positions + cached states = full causal attention over the document."""
    model = xl_model(mem_len=n_seg * S).eval()
    plain = build_model(ModelConfig(backbone(seg_len=n_seg * S), ())).eval()
    plain.load_state_dict(model.state_dict())
    tokens = torch.randint(0, 101, (2, n_seg * S))
    with torch.no_grad():
        full = plain(tokens)[0].logits
        state, outs = None, []
        for s in range(n_seg):
            out, state = model(tokens[:, s * S:(s + 1) * S], state)
            outs.append(out.logits)
    assert_close(torch.cat(outs, 1), full)


def test_xl_differs_from_one_pass_once_memory_evicts():
    model = xl_model(mem_len=S).eval()
    plain = build_model(ModelConfig(backbone(seg_len=3 * S), ())).eval()
    plain.load_state_dict(model.state_dict())
    tokens = torch.randint(0, 101, (1, 3 * S))
    with torch.no_grad():
        full = plain(tokens)[0].logits
        state, outs = None, []
        for s in range(3):
            out, state = model(tokens[:, s * S:(s + 1) * S], state)
            outs.append(out.logits)
    got = torch.cat(outs, 1)
    assert_close(got[:, :2 * S], full[:, :2 * S])           # segment 2 still sees all of segment 1
    assert (got[:, 2 * S:] - full[:, 2 * S:]).abs().max() > 1e-3  # segment 3 no longer sees segment 1


@pytest.mark.parametrize("mem_len", [5, 16, 20, 40])
def test_fifo_keeps_exactly_the_last_mem_len_states_and_positions(mem_len):
    model = xl_model(mem_len=mem_len).eval()
    tokens = torch.randint(0, 101, (2, 3 * S))
    state = None
    with torch.no_grad():
        for s in range(3):
            _, state = model(tokens[:, s * S:(s + 1) * S], state)
    xs = state.memories[0]
    keep = min(mem_len, 3 * S)
    assert xs.mems[0].shape == (2, keep, 32)
    assert torch.equal(xs.pos, torch.arange(3 * S - keep, 3 * S).expand(2, -1))
    assert bool(xs.valid.all())
    # the layer-0 memory holds the inputs of layer 0: the token embeddings of the last tokens
    assert_close(xs.mems[0], model.tok_emb(tokens[:, 3 * S - keep:]))
    assert all(p.shape[1] == 0 for p in xs.pending)


def test_chunked_segment_waits_in_pending_until_the_segment_ends():
    model = xl_model(mem_len=32).eval()
    tokens = torch.randint(0, 101, (1, S))
    with torch.no_grad():
        _, st = model(tokens[:, :5], None, Step(seg_start=True, seg_end=False))
        assert st.memories[0].mems[0].shape[1] == 0 and st.memories[0].pending[0].shape[1] == 5
        _, st = model(tokens[:, 5:], st, Step(seg_start=False, seg_end=True))
        assert st.memories[0].mems[0].shape[1] == S and st.memories[0].pending[0].shape[1] == 0


def test_memory_is_stop_gradient_but_projections_learn_through_it():
    model = xl_model(mem_len=S).train()
    tokens = torch.randint(0, 101, (2, 2 * S))
    embeds = []

    def keep(module, inputs, out):
        out.retain_grad()
        embeds.append(out)

    model.tok_emb.register_forward_hook(keep)
    _, state = model(tokens[:, :S])
    out, _ = model(tokens[:, S:], state)
    cross_entropy(out.logits[:, :-1], tokens[:, S + 1:]).backward()
    assert embeds[0].grad is None or embeds[0].grad.abs().max() == 0    # segment 1 gets nothing
    assert embeds[1].grad.abs().max() > 0
    wk_with = model.blocks[1].attn.wk.weight.grad.clone()
    model.zero_grad()
    out, _ = model(tokens[:, S:], None)                                  # same segment, no memory
    cross_entropy(out.logits[:, :-1], tokens[:, S + 1:]).backward()
    assert (wk_with - model.blocks[1].attn.wk.weight.grad).abs().max() > 1e-6


def test_layers_subset_only_touches_those_layers():
    model = xl_model(mem_len=S, layers=(2,)).eval()
    _, st = model(torch.randint(0, 101, (1, S)))
    assert len(st.memories[0].mems) == 1
    assert model.memory._attn_at == [[], [], [0]]


def test_reset_row_invalidates_its_memory():
    model = xl_model(mem_len=S).eval()
    with torch.no_grad():
        _, st = model(torch.randint(0, 101, (2, S)))
        _, st = model(torch.randint(0, 101, (2, S)), st, Step(reset=torch.tensor([True, False])))
    # row 0's old slots (the first S of 2S held before truncation) are gone; it holds only the new segment
    assert st.memories[0].valid[0].sum() == S and st.memories[0].valid[1].sum() == S
    assert torch.equal(st.pos, torch.tensor([S, 2 * S]))


def test_invalid_layers_are_reported_with_the_others():
    from memstack.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        ModelConfig(backbone(), (XLConfig(mem_len=4, layers=(0, 7, 7)),))
    text = str(e.value)
    assert "out of range" in text and "duplicates" in text
