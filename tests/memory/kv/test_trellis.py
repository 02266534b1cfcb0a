"""Trellis memory: what is written (which tokens, in which order, RoPE-free), what is read, the
exact window, a bounded state, gradients through the writes, refusal of non-finite writes."""
from __future__ import annotations

import math

import pytest
import torch

from memstack.backbone.layers import apply_rope, rope_tables
from memstack.backbone.model import build_model, cross_entropy
from memstack.config import BackboneConfig, ModelConfig
from memstack.errors import ConfigError
from memstack.memory.base import StepContext
from memstack.memory.kv.config import DenseKVConfig, TrellisConfig
from memstack.memory.kv.trellis import _unrotate
from memstack.memory.state import tree_map
from memstack.ops.trellis import trellis_read_ref, trellis_write_ref
from memstack.registry import validate_memories
from tolerances import assert_close

S = 16
BB = BackboneConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, seg_len=S, tie_embeddings=False)


def make(seed=0, **fields):
    torch.manual_seed(seed)
    model = build_model(ModelConfig(BB, (TrellisConfig(**fields),)))
    with torch.no_grad():
        model.memory.memories[0].gate.fill_(0.5)
        for name in ("w_alpha", "w_theta"):
            getattr(model.memory.memories[0], name).normal_(0, 0.1)
    return model


def run(model, tokens, state=None):
    outs = []
    for s in range(tokens.shape[1] // S):
        out, state = model(tokens[:, s * S:(s + 1) * S], state)
        outs.append(out.logits)
    return torch.cat(outs, 1), state


def layer0_kv(model, tokens):
    """RoPE-free keys/values of layer 0 computed straight from the weights: (B, Hkv, T, hd) each."""
    blk = model.blocks[0]
    x = blk.attn_norm(model.tok_emb(tokens))
    B, T, _ = x.shape
    heads = lambda y: y.view(B, T, BB.kv_heads, BB.head_dim).transpose(1, 2)  # noqa: E731
    return heads(blk.attn.wk(x)), heads(blk.attn.wv(x))


def test_unrotate_inverts_rope():
    x = torch.randn(2, 3, 9, 8)
    pos = torch.randint(0, 100_000, (2, 9))
    cos, sin = rope_tables(pos, 8, 10000.0, x.dtype)
    assert_close(_unrotate(apply_rope(x, cos, sin), pos, 10000.0), x)


def ref_writes(mem, k, v, calls):
    """The reference write of layer 0, one call per token range in `calls` (as the segment ends made them)."""
    K, V = mem.k_init[0].expand(k.shape[0], -1, -1, -1), mem.v_init[0].expand(k.shape[0], -1, -1, -1)
    for a, b in calls:
        alpha, theta = mem._gates(0, k[:, :, a:b], v[:, :, a:b])
        K, V = trellis_write_ref(K, V, k[:, :, a:b], v[:, :, a:b], alpha, theta, chunk=mem.cfg.write_chunk)
    return K, V


@pytest.mark.parametrize("write_chunk", [1, 5, 16])
def test_segment_is_written_in_order_rope_free(write_chunk):
    """Window 0: after two segments, layer 0's slots equal the reference write of each segment's
    RoPE-free keys/values, in order, from the learned initial slots."""
    model = make(slots=6, write_chunk=write_chunk).eval()
    tokens = torch.randint(0, 97, (2, 2 * S))
    with torch.no_grad():
        _, st = run(model, tokens)
        k, v = layer0_kv(model, tokens)
        K, V = ref_writes(model.memory.memories[0], k, v, [(0, S), (S, 2 * S)])
    assert_close(st.memories[0].K[0], K)
    assert_close(st.memories[0].V[0], V)


def test_window_holds_last_tokens_and_evicts_the_rest_into_slots():
    W = 20
    model = make(slots=5, window=W, write_chunk=8).eval()
    tokens = torch.randint(0, 97, (2, 3 * S))
    with torch.no_grad():
        _, st = run(model, tokens)
        k, v = layer0_kv(model, tokens)
        tr = st.memories[0]
        assert tr.win_pos.tolist() == [list(range(3 * S - W, 3 * S))] * 2 and bool(tr.win_valid.all())
        cos, sin = rope_tables(tr.win_pos, BB.head_dim, BB.rope_theta, k.dtype)
        assert_close(tr.win_k[0], apply_rope(k[:, :, -W:], cos, sin))   # the window is an exact KV cache
        assert_close(tr.win_v[0], v[:, :, -W:])
        # segment 1 ends: 16 tokens fit the window; segment 2: 12 leave it; segment 3: 16 more
        K, V = ref_writes(model.memory.memories[0], k, v, [(0, 12), (12, 28)])
    assert_close(tr.K[0], K)
    assert_close(tr.V[0], V)


def test_read_adds_gated_memory_output():
    model = make(slots=7)
    mem = model.memory.memories[0]
    st = mem.init_state(2, torch.device("cpu"), torch.float32)
    st.V = tuple(torch.randn_like(x) for x in st.V)           # something to read
    T = 5
    q_raw = torch.randn(2, BB.n_heads, T, BB.head_dim)
    pos = torch.arange(40, 40 + T).expand(2, T)
    cos, sin = rope_tables(pos, BB.head_dim, BB.rope_theta, q_raw.dtype)
    out = torch.randn(2, BB.n_heads, T, BB.head_dim)
    ctx = StepContext(torch.zeros(2, T, dtype=torch.long), pos[:, 0], torch.zeros(2, dtype=torch.bool), True, False,
                      False, positions=pos)
    with torch.no_grad():
        got, _ = mem.attn_out(1, apply_rope(q_raw, cos, sin), out, st, ctx)
        want = out + mem.gate[1][None, :, None, None] * trellis_read_ref(st.K[1], st.V[1], q_raw)
    assert_close(got, want)


@pytest.mark.parametrize("window", [0, 24])
def test_state_is_flat_in_context_length(window):
    model = make(slots=8, window=window).eval()
    mem = model.memory.memories[0]
    spec = mem.spec()
    sizes = []
    with torch.no_grad():
        st = None
        for s in range(40):
            _, st = model(torch.randint(0, 97, (2, S)), st)
            if s >= 2:
                sizes.append(mem.held_bytes(st.memories[0]))
    assert len(set(sizes)) == 1 and sizes[0] == spec.state_bytes(40 * S, 2)
    assert spec.state_bytes(10**3) == spec.state_bytes(10**7)
    dense = build_model(ModelConfig(BB, (DenseKVConfig(scope="document"),))).memory.memories[0].spec()
    assert dense.state_bytes(10**7) == 10**4 * dense.state_bytes(10**3)   # the unbounded peer grows linearly


def test_gradient_flows_through_writes_into_the_backbone():
    """Segment 2 sees segment 1 only through the slots: the loss on segment 2 must reach the input
    embeddings of tokens that occur only in segment 1 (untied embeddings), and the gates."""
    model = make(slots=6).train()
    seg1 = torch.randint(0, 40, (2, S))
    seg2 = torch.randint(50, 97, (2, S))
    _, st = model(seg1)
    out, _ = model(seg2, st)
    cross_entropy(out.logits[:, :-1], seg2[:, 1:]).backward()
    only_seg1 = sorted(set(seg1.flatten().tolist()))
    assert model.tok_emb.weight.grad[only_seg1].abs().sum(-1).min() > 0
    mem = model.memory.memories[0]
    assert mem.w_alpha.grad.abs().sum() > 0 and mem.b_theta.grad.abs().sum() > 0 and mem.k_init.grad.abs().sum() > 0


def test_detached_writes_change_backbone_gradient():
    """Detaching the written keys/values changes the backbone's gradient (the writes are on the graph)."""
    model = make(slots=6).train()
    seg1, seg2 = torch.randint(0, 97, (1, S)), torch.randint(0, 97, (1, S))
    _, st = model(seg1)
    out, _ = model(seg2, st)
    cross_entropy(out.logits[:, :-1], seg2[:, 1:]).backward()
    g_full = model.blocks[0].attn.wk.weight.grad.clone()
    model.zero_grad()
    _, st = model(seg1)
    st = tree_map(lambda t: t.detach(), st)
    out, _ = model(seg2, st)
    cross_entropy(out.logits[:, :-1], seg2[:, 1:]).backward()
    assert (g_full - model.blocks[0].attn.wk.weight.grad).abs().max() > 1e-6


def test_non_finite_write_is_refused_and_state_kept():
    model = make(slots=4).eval()
    with torch.no_grad():
        _, st = run(model, torch.randint(0, 97, (2, S)))
        before = tree_map(torch.clone, st)
        model.blocks[1].attn.wv.weight[0, 0] = float("nan")
        with pytest.raises(FloatingPointError, match="non-finite"):
            model(torch.randint(0, 97, (2, S)), st)
    for a, b in zip(st.memories[0].K + st.memories[0].V, before.memories[0].K + before.memories[0].V):
        assert torch.equal(a, b)


def test_bad_configs_list_every_reason():
    with pytest.raises(ConfigError) as e:
        TrellisConfig(slots=0, window=-1, init_alpha=1.5, init_theta=0.0, init_key_std=0)
    assert len(e.value.reasons) == 5
    reasons = validate_memories(BB, [TrellisConfig(layers=(0, 5, 5))])
    assert any("out of range" in r for r in reasons) and any("duplicates" in r for r in reasons)
    assert TrellisConfig(window=4).holds_context and not TrellisConfig().holds_context


@pytest.mark.slow
def test_model_stable_over_thousands_of_segments():
    model = make(slots=8, window=8).eval()
    with torch.no_grad():
        st = None
        for s in range(3000):
            out, st = model(torch.randint(0, 97, (2, S)), st)
            if s % 500 == 0:
                assert torch.isfinite(out.logits).all()
        tr = st.memories[0]
        assert all(torch.isfinite(x).all() and x.abs().max() < 1e3 for x in tr.K + tr.V)
    assert math.isfinite(out.logits.abs().max().item())
