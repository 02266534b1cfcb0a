"""LM2: the read and the gated write compute the paper's equations (checked against a plain
per-head loop), a segment reads the bank as it was when the segment began, gradients cross
segments through the bank, and the read values at zero close the memory exactly."""
from __future__ import annotations

import pytest
import torch

from memstack.backbone.model import build_model, cross_entropy
from memstack.config import BackboneConfig, ModelConfig
from memstack.errors import ConfigError
from memstack.memory.base import Step
from memstack.memory.learned.config import LM2Config
from memstack.memory.learned.lm2 import LM2Layer
from mha_ref import lin, mha_loop
from tolerances import assert_close

S = 8
B = BackboneConfig(vocab_size=61, d_model=16, n_layers=2, n_heads=2, seg_len=S)


def test_read_and_write_follow_the_equations():
    torch.manual_seed(0)
    cfg = LM2Config(n_slots=5, n_heads=2)
    lay = LM2Layer(cfg, B)
    with torch.no_grad():
        for p in lay.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x, mem = torch.randn(2, 7, 16), torch.randn(2, 5, 16)
    read, new = lay.read(x, mem), lay.write(x, mem)
    for b in range(2):
        xd, md = x[b].double(), mem[b].double()
        e = mha_loop(lin(lay.read_q, xd), lin(lay.read_k, md), lin(lay.read_v, md), 2)
        assert_close(read[b], torch.sigmoid(lin(lay.gate_out, e)) * e, torch.float32)
        c = mha_loop(lin(lay.write_q, md), lin(lay.write_k, xd), lin(lay.write_v, xd), 2)
        want = torch.sigmoid(lin(lay.gate_in, c)) * torch.tanh(c) + torch.sigmoid(lin(lay.gate_forget, c)) * md
        assert_close(new[b], want, torch.float32)


def model(seed=0, **kw):
    torch.manual_seed(seed)
    m = build_model(ModelConfig(B, (LM2Config(n_slots=6, n_heads=2, **kw),)))
    with torch.no_grad():
        for p in m.memory.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m


def test_bank_starts_as_identity_rows_and_is_written_from_the_whole_segment():
    m = model().eval()
    tokens = torch.randint(0, 61, (2, S))
    st0 = m.init_state(2)
    assert all(torch.equal(M, torch.eye(6, 16).expand(2, -1, -1)) for M in st0.memories[0].mem)
    xs = []
    m.memory.memories[0].banks[0].norm.register_forward_hook(lambda mod, i, o: xs.append(o))
    with torch.no_grad():
        _, st = m(tokens)
        want = m.memory.memories[0].banks[0].write(xs[0], torch.eye(6, 16).expand(2, -1, -1))
    assert_close(st.memories[0].mem[0], want)      # layer 0's bank after segment 1


def test_tokens_read_the_bank_as_it_was_at_the_segment_start():
    """Changing the last token of segment 2 changes the bank written at its end but no logit of
    segment 2 before it; it does change segment 3."""
    m = model().eval()
    tokens = torch.randint(0, 61, (1, 3 * S))
    other = tokens.clone()
    other[0, 2 * S - 1] = (tokens[0, 2 * S - 1] + 1) % 61
    with torch.no_grad():
        outs = [[], []]
        for i, t in enumerate((tokens, other)):
            st = None
            for s in range(3):
                o, st = m(t[:, s * S:(s + 1) * S], st)
                outs[i].append(o.logits)
    assert torch.equal(outs[0][1][:, :-1], outs[1][1][:, :-1])
    assert (outs[0][2] - outs[1][2]).abs().max() > 1e-5


def test_gradient_reaches_the_write_weights_only_through_a_later_segment():
    m = model().train()
    tokens = torch.randint(0, 61, (2, 2 * S))
    o1, st = m(tokens[:, :S])
    o2, _ = m(tokens[:, S:], st)
    write = m.memory.memories[0].banks[0].write_q.weight
    cross_entropy(o1.logits[:, :-1], tokens[:, 1:S]).backward(retain_graph=True)
    assert write.grad is None or write.grad.abs().max() == 0          # segment 1 reads the initial bank
    cross_entropy(o2.logits[:, :-1], tokens[:, S + 1:]).backward()
    assert write.grad.abs().max() > 0                                   # segment 2 reads what segment 1 wrote


def test_make_identity_closes_the_memory_exactly():
    m = model().eval()
    plain = build_model(ModelConfig(B, ())).eval()
    plain.load_state_dict(m.state_dict(), strict=False)
    assert m.memory.memories[0].make_identity()
    tokens = torch.randint(0, 61, (2, 3 * S))
    with torch.no_grad():
        st = None
        for s in range(3):
            o, st = m(tokens[:, s * S:(s + 1) * S], st)
            assert_close(o.logits, plain(tokens[:, s * S:(s + 1) * S])[0].logits)


def test_reset_restores_the_identity_bank_for_that_row_only():
    m = model().eval()
    with torch.no_grad():
        _, st = m(torch.randint(0, 61, (2, S)))
    st2 = m.reset_state(st, torch.tensor([True, False]))
    for M, M_old in zip(st2.memories[0].mem, st.memories[0].mem):
        assert torch.equal(M[0], torch.eye(6, 16)) and torch.equal(M[1], M_old[1])


def test_bank_stays_bounded_over_many_segments():
    m = model().eval()
    st = None
    with torch.no_grad():
        for _ in range(300):
            _, st = m(torch.randint(0, 61, (2, S)), st, Step())
    # |M| <= g_in + g_f |M| < 1 + |M|... with both gates < 1 the bank is bounded by 1/(1 - max g_f)
    for M in st.memories[0].mem:
        assert torch.isfinite(M).all() and M.abs().max() < 50


def test_config_reasons():
    with pytest.raises(ConfigError) as e:
        ModelConfig(B, (LM2Config(n_slots=32, n_heads=3, layers=(5,)),))
    text = str(e.value)
    assert "n_slots (32) must be <= d_model" in text and "divisible by n_heads" in text and "out of range" in text
