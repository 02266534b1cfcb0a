"""The Compressive Transformer's dilated-conv compressor: starts as mean pooling, equals its
group-by-group reference, reads exactly its own group, and is trained by the reconstruction loss
only (the language-model loss never reaches it)."""
from __future__ import annotations

import pytest
import torch

from memstack.backbone.model import build_model, cross_entropy
from memstack.config import BackboneConfig, ModelConfig
from memstack.errors import ConfigError
from memstack.memory.learned.config import CompressiveConfig
from memstack.memory.learned.dilated import DilatedCompressor, dilated_reference, dilations
from memstack.memory.learned.xl import Evicted
from tolerances import assert_close

S = 8


def model(rate=4, **kw):
    torch.manual_seed(0)
    b = BackboneConfig(vocab_size=61, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, seg_len=S)
    return build_model(ModelConfig(b, (CompressiveConfig(mem_len=S, cmem_len=4, rate=rate,
                                                         compression="dilated_conv", **kw),)))


def test_dilations():
    assert dilations(1) == [] and dilations(2) == [1] and dilations(8) == [1, 2, 4]
    with pytest.raises(ValueError, match="power-of-two"):
        dilations(6)


@pytest.mark.parametrize("rate", [2, 4, 8])
def test_starts_as_mean_pooling(rate):
    mem = model(rate=rate).memory.memories[0]
    E = 2 * rate
    ev = Evicted(torch.randn(3, E, 32), torch.arange(E).expand(3, -1), torch.ones(3, E, dtype=torch.bool))
    got, pos, valid = mem.compress(0, ev)
    assert_close(got, ev.h.view(3, 2, rate, 32).mean(2))
    assert valid.all() and pos.shape == (3, 2)


@pytest.mark.parametrize("rate", [2, 4, 8])
def test_matches_the_group_by_group_reference(rate):
    torch.manual_seed(rate)
    comp = DilatedCompressor(16, rate)
    with torch.no_grad():
        for p in comp.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    x = torch.randn(2, 16, 3 * rate)
    assert_close(comp(x), dilated_reference(comp, x).float())


def test_each_slot_reads_exactly_its_group():
    torch.manual_seed(1)
    comp = DilatedCompressor(8, 4)
    with torch.no_grad():
        for p in comp.parameters():
            p.copy_(torch.randn_like(p))
    x = torch.randn(1, 8, 12)
    base = comp(x)
    for t in range(12):
        y = x.clone()
        y[:, :, t] += 1.0
        changed = (comp(y) - base).abs().amax(1)[0] > 1e-6                 # (3,) slots that moved
        assert changed.tolist() == [g == t // 4 for g in range(3)], t


def test_trained_by_the_reconstruction_loss_only():
    m = model().train()
    comp = m.memory.memories[0].conv
    tokens = torch.randint(0, 61, (2, 3 * S))
    state, outs = None, []
    for s in range(3):
        out, state = m(tokens[:, s * S:(s + 1) * S], state)
        outs.append(out)
    assert "compressive_recon" in outs[-1].aux_losses
    ce = sum(cross_entropy(o.logits[:, :-1], tokens[:, i * S + 1:(i + 1) * S]) for i, o in enumerate(outs))
    ce.backward(retain_graph=True)
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in comp.parameters())
    sum(o.aux_loss for o in outs).backward()
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in comp.parameters())


def test_needs_a_power_of_two_rate():
    with pytest.raises(ConfigError, match="power-of-two rate"):
        CompressiveConfig(mem_len=12, rate=6, compression="dilated_conv")
    CompressiveConfig(mem_len=12, rate=6, compression="conv")           # the plain conv takes any rate
