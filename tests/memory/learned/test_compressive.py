"""Compressive Transformer: what is evicted is exactly what is compressed, each compression
function computes what it says, rate 1 equals Transformer-XL with the same attention span, and
the attention-reconstruction loss trains the compressor -- and nothing else -- with the value
and gradient of a plain reference."""
from __future__ import annotations

import math

import pytest
import torch

from memstack.backbone.model import build_model, cross_entropy
from memstack.config import BackboneConfig, ModelConfig
from memstack.errors import ConfigError
from memstack.memory.base import Step
from memstack.memory.learned.config import CompressiveConfig, XLConfig
from memstack.memory.learned.xl import Evicted
from tolerances import assert_close

S = 8


def backbone(**kw) -> BackboneConfig:
    return BackboneConfig(vocab_size=61, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, seg_len=S, **kw)


def model_with(cfg, seed=0):
    torch.manual_seed(seed)
    return build_model(ModelConfig(backbone(), (cfg,)))


def run(model, tokens, state=None):
    outs = []
    for s in range(tokens.shape[1] // S):
        out, state = model(tokens[:, s * S:(s + 1) * S], state)
        outs.append(out)
    return outs, state


@pytest.mark.parametrize("kind", ["mean", "max"])
def test_evicted_segment_is_pooled_into_the_compressed_memory(kind):
    """mem_len = one segment: after 3 segments, segments 1 and 2 were evicted in turn; at layer 0
    the compressed memory holds their token embeddings pooled in groups of `rate`."""
    r = 4
    model = model_with(CompressiveConfig(mem_len=S, cmem_len=8, rate=r, compression=kind)).eval()
    tokens = torch.randint(0, 61, (2, 3 * S))
    with torch.no_grad():
        _, st = run(model, tokens)
        emb = model.tok_emb(tokens[:, :2 * S])                         # (B, 2S, D): layer 0's inputs
    cs = st.memories[0]
    groups = emb.view(2, 2 * S // r, r, 32)
    want = groups.mean(2) if kind == "mean" else groups.amax(2)
    n = 2 * S // r                                                     # 4 slots filled of 8
    assert_close(cs.cmem[0][:, -n:], want)
    assert torch.equal(cs.cpos[:, -n:], torch.arange(2 * S).view(n, r).sum(1).div(r, rounding_mode="floor").expand(2, -1))
    assert cs.cvalid[:, -n:].all() and not cs.cvalid[:, :-n].any()
    assert_close(cs.xl.mems[0], model.tok_emb(tokens[:, 2 * S:]).detach())   # XL part: the last segment


def test_compressed_fifo_keeps_the_last_cmem_len_slots():
    model = model_with(CompressiveConfig(mem_len=S, cmem_len=3, rate=4, compression="mean")).eval()
    tokens = torch.randint(0, 61, (1, 5 * S))
    with torch.no_grad():
        _, st = run(model, tokens)
        emb = model.tok_emb(tokens[:, :4 * S])                         # segments 1-4 were evicted
    want = emb.view(1, 4 * S // 4, 4, 32).mean(2)[:, -3:]
    assert_close(st.memories[0].cmem[0], want)
    assert st.memories[0].cvalid.all()


def test_conv_starts_as_mean_pooling():
    model = model_with(CompressiveConfig(mem_len=S, cmem_len=4, rate=4, compression="conv"))
    mem = model.memory.memories[0]
    ev = Evicted(torch.randn(3, 8, 32), torch.arange(8).expand(3, -1), torch.ones(3, 8, dtype=torch.bool))
    got, pos, valid = mem.compress(0, ev)
    assert_close(got, ev.h.view(3, 2, 4, 32).mean(2))
    assert torch.equal(pos, torch.tensor([[1, 5]]).expand(3, -1)) and valid.all()


def test_most_used_keeps_the_most_attended_states_in_time_order():
    model = model_with(CompressiveConfig(mem_len=S, cmem_len=4, rate=4, compression="most_used"))
    mem = model.memory.memories[0]
    h = torch.randn(2, 8, 32)
    usage = torch.tensor([[0.1, 5.0, 0.2, 0.3, 4.0, 0.0, 0.5, 0.4],
                          [9.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 8.0]])
    ev = Evicted(h, torch.arange(10, 18).expand(2, -1), torch.ones(2, 8, dtype=torch.bool))
    got, pos, valid = mem.compress(0, ev, usage)
    assert torch.equal(got[0], h[0, [1, 4]]) and torch.equal(got[1], h[1, [0, 7]])
    assert torch.equal(pos, torch.tensor([[11, 14], [10, 17]])) and valid.all()


def test_most_used_usage_is_the_memory_only_softmax_summed_over_heads_queries_and_segments():
    cfg = CompressiveConfig(mem_len=2 * S, cmem_len=4, rate=4, compression="most_used")
    model = model_with(cfg).eval()
    tokens = torch.randint(0, 61, (2, 2 * S))
    captured = []
    block = model.blocks[1]
    block.attn.wq.register_forward_hook(lambda m, i, o: captured.append(o))
    with torch.no_grad():
        _, st = run(model, tokens)
        # reference: segment 2's queries at layer 1 against the memory's keys (segment 1)
        mems = st.memories[0].xl.mems[1][:, :S]                       # layer-1 inputs of segment 1
        k, _ = block.project_kv(mems, torch.arange(S).expand(2, -1))    # (B, Hkv, S, hd)
        from memstack.backbone.layers import apply_rope, rope_tables

        q = captured[1].view(2, S, 4, 8).transpose(1, 2)
        cos, sin = rope_tables(torch.arange(S, 2 * S).expand(2, -1), 8, 10000.0, q.dtype)
        q = apply_rope(q, cos, sin)
        want = torch.zeros(2, S)
        for b in range(2):
            for hh in range(4):
                for t in range(S):
                    sc = torch.tensor([float(q[b, hh, t] @ k[b, hh // 2, s]) / math.sqrt(8) for s in range(S)])
                    want[b] += torch.softmax(sc, 0)
    usage = st.memories[0].usage[1]                                    # (B, 2S): segment 1's slots, then 2's
    assert_close(usage[:, :S], want)
    assert torch.equal(usage[:, S:], torch.zeros(2, S))                # segment 2's slots: not attended yet


def test_rate_one_equals_xl_with_the_same_attention_span():
    """Compression at rate 1 (mean of one state) is lossless: m memory + c compressed slots
    equals Transformer-XL with mem_len = m + c, at every segment."""
    comp = model_with(CompressiveConfig(mem_len=S, cmem_len=2 * S, rate=1, compression="mean")).eval()
    xl = model_with(XLConfig(mem_len=3 * S)).eval()
    xl.load_state_dict(comp.state_dict())
    tokens = torch.randint(0, 61, (2, 6 * S))
    with torch.no_grad():
        a, _ = run(comp, tokens)
        b, _ = run(xl, tokens)
    for x, y in zip(a, b):
        assert_close(x.logits, y.logits)


def test_compression_extends_the_reach_beyond_the_memory():
    """One layer (no indirect path through deeper memories): a token evicted from the XL memory
    still changes later predictions through the compressed memory; with XL alone it cannot."""
    for cfg, reaches in ((CompressiveConfig(mem_len=S, cmem_len=4, rate=4, compression="mean"), True),
                         (XLConfig(mem_len=S), False)):
        torch.manual_seed(0)
        m = build_model(ModelConfig(BackboneConfig(vocab_size=61, d_model=32, n_layers=1, n_heads=4, seg_len=S), (cfg,))).eval()
        tokens = torch.randint(0, 61, (1, 3 * S))
        other = tokens.clone()
        other[0, 0] = (tokens[0, 0] + 1) % 61
        with torch.no_grad():
            a, _ = run(m, tokens)
            b, _ = run(m, other)
        diff = float((a[2].logits - b[2].logits).abs().max())   # segment 3 vs a change in segment 1
        assert (diff > 1e-4) if reaches else diff == 0.0


# ----------------------------------------------------------------------------- the reconstruction loss

def _recon_reference(block, q, old_h, old_pos, comp_h, comp_pos):
    """Plain attention-reconstruction loss: MSE between attention over the old states and over
    their compression, heads repeated explicitly, fp32."""
    from memstack.ops.attention import attention_ref

    k, v = block.project_kv(old_h, old_pos)
    kc, vc = block.project_kv(comp_h, comp_pos)
    B, T = q.shape[0], q.shape[2]
    full = lambda n: torch.ones(B, T, n, dtype=torch.bool)  # noqa: E731
    return (attention_ref(q, k, v, full(k.shape[2])) - attention_ref(q, kc, vc, full(kc.shape[2]))).pow(2).mean()


def test_reconstruction_loss_value_and_gradient_match_the_reference():
    cfg = CompressiveConfig(mem_len=S, cmem_len=4, rate=4, compression="conv", layers=(1,))
    model = model_with(cfg).train()
    mem = model.memory.memories[0]
    with torch.no_grad():
        for p in mem.conv.parameters():
            p.add_(0.1 * torch.randn_like(p))                          # off the mean-pool start
    tokens = torch.randint(0, 61, (2, 2 * S))
    captured = []
    model.blocks[1].attn.wq.register_forward_hook(lambda m, i, o: captured.append(o.detach()))
    out1, st = model(tokens[:, :S])
    old_h = st.memories[0].xl.mems[0].clone()                          # layer-1 inputs of segment 1 (evicted next)
    out2, _ = model(tokens[:, S:], st)
    assert set(out2.aux_losses) == {"compressive_recon"}
    loss = out2.aux_losses["compressive_recon"]
    # reference, with the compressor's output as the only thing that carries gradient
    from memstack.backbone.layers import apply_rope, rope_tables

    q = captured[1].view(2, S, 4, 8).transpose(1, 2)
    cos, sin = rope_tables(torch.arange(S, 2 * S).expand(2, -1), 8, 10000.0, q.dtype)
    q = apply_rope(q, cos, sin)
    old_pos = torch.arange(S).expand(2, -1)
    comp = mem.conv[0](old_h.transpose(1, 2)).transpose(1, 2)
    comp_pos = torch.tensor([[1, 5]]).expand(2, -1)
    block = model.blocks[1]
    # the reference treats the block's weights as constants: only the compressor is differentiated
    saved = [p.requires_grad for p in block.parameters()]
    for p in block.parameters():
        p.requires_grad_(False)
    ref = _recon_reference(block, q, old_h, old_pos, comp, comp_pos)
    for p, s in zip(block.parameters(), saved):
        p.requires_grad_(s)
    assert_close(loss.detach(), ref.detach())
    g_ref = torch.autograd.grad(ref, list(mem.conv.parameters()))
    model.zero_grad()
    loss.backward()
    for p, g in zip(mem.conv.parameters(), g_ref):
        assert_close(p.grad, g)
    # nothing outside the compressor learns from it
    for n, p in model.named_parameters():
        if not n.startswith("memory."):
            assert p.grad is None or p.grad.abs().max() == 0, n


def test_lm_loss_never_reaches_the_compressor():
    cfg = CompressiveConfig(mem_len=S, cmem_len=4, rate=4, compression="conv")
    model = model_with(cfg).train()
    tokens = torch.randint(0, 61, (2, 4 * S))
    outs, _ = run(model, tokens)
    ce = sum(cross_entropy(o.logits[:, :-1], tokens[:, i * S + 1:(i + 1) * S]) for i, o in enumerate(outs))
    ce.backward()
    for p in model.memory.memories[0].conv.parameters():
        assert p.grad is None or p.grad.abs().max() == 0
    assert model.blocks[0].attn.wk.weight.grad.abs().max() > 0


def test_no_reconstruction_loss_at_evaluation_or_for_parameter_free_compressors():
    tokens = torch.randint(0, 61, (1, 3 * S))
    conv = model_with(CompressiveConfig(mem_len=S, cmem_len=4, rate=4, compression="conv"))
    with torch.no_grad():
        outs, _ = run(conv.train(), tokens)
    assert all(not o.aux_losses for o in outs)
    outs, _ = run(model_with(CompressiveConfig(mem_len=S, cmem_len=4, rate=4, compression="mean")).train(), tokens)
    assert all(not o.aux_losses for o in outs)


def test_reset_invalidates_both_memories_of_a_row():
    model = model_with(CompressiveConfig(mem_len=S, cmem_len=4, rate=4, compression="mean")).eval()
    with torch.no_grad():
        _, st = run(model, torch.randint(0, 61, (2, 3 * S)))
        _, st = model(torch.randint(0, 61, (2, S)), st, Step(reset=torch.tensor([True, False])))
    cs = st.memories[0]
    assert not cs.cvalid[0].any() and cs.cvalid[1].sum() == 4
    assert cs.xl.valid[0].sum() == S and cs.xl.valid[1].sum() == S


def test_config_reasons():
    with pytest.raises(ConfigError) as e:
        CompressiveConfig(mem_len=10, cmem_len=0, rate=4, recon_weight=-1)
    text = str(e.value)
    assert "cmem_len" in text and "multiple of rate" in text and "recon_weight" in text
    with pytest.raises(ConfigError, match="seg_len"):
        ModelConfig(BackboneConfig(vocab_size=61, d_model=32, n_layers=2, n_heads=4, seg_len=10),
                    (CompressiveConfig(mem_len=8, rate=4),))
