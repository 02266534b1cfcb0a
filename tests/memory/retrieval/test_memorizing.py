"""Memorizing Transformer: the gated read against a hand-built reference, causality (no position
retrieves its own segment or the future), growth and eviction by policy (never a reset)."""
from __future__ import annotations

import torch

from memstack.backbone.layers import apply_rope, rope_tables
from memstack.backbone.model import build_model
from memstack.config import BackboneConfig, ModelConfig
from memstack.memory.base import Step, StepContext
from memstack.memory.retrieval.config import MemorizingConfig
from memstack.memory.retrieval.memorizing import MemorizingState, MemorizingTransformer, unrotate
from memstack.ops.knn import topk_attention_ref
from tolerances import assert_close

BB = BackboneConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, seg_len=8)


def test_unrotate_inverts_rope():
    x = torch.randn(2, 3, 5, 8)
    pos = torch.randint(0, 10_000, (2, 5))
    cos, sin = rope_tables(pos, 8, 10000.0, torch.float32)
    assert_close(unrotate(apply_rope(x, cos, sin), pos, 10000.0), x, dtype=torch.float32)


def test_gated_read_matches_reference():
    mem = MemorizingTransformer(MemorizingConfig(layers=(1,), mem_len=16, k=3), BB)
    with torch.no_grad():
        mem.gate.copy_(torch.tensor([[-1.0, 0.0, 0.5, 2.0]]))
    B, M, T = 2, 9, 5
    mk, mv = torch.randn(B, 2, M, 8), torch.randn(B, 2, M, 8)
    valid = torch.rand(B, M) > 0.2
    st = mem.init_state(B, torch.device("cpu"), torch.float32)
    st = MemorizingState((mk,), (mv,), (valid,), (torch.zeros(B, M, dtype=torch.long),), st.pk, st.pv, st.ppos, st.pvalid)
    pos = torch.tensor([[40], [100]]) + torch.arange(T)
    ctx = StepContext(torch.zeros(B, T, dtype=torch.long), pos[:, 0], torch.zeros(B, dtype=torch.bool), True, False, False,
                      positions=pos)
    q_raw = torch.randn(B, 4, T, 8)
    cos, sin = rope_tables(pos, 8, BB.rope_theta, torch.float32)
    q = apply_rope(q_raw, cos, sin)                              # what the backbone hands over
    local = torch.randn(B, 4, T, 8)
    out, _ = mem.attn_out(1, q, local, st, ctx)
    vm, has, _ = topk_attention_ref(q_raw, mk, mv, valid, 3)     # memory read is position-free
    g = torch.sigmoid(mem.gate[0])[None, :, None, None]
    expect = torch.where(has[..., None], g * vm + (1 - g) * local, local)
    assert_close(out.detach(), expect, dtype=torch.float32)


def test_no_position_sees_its_own_segment_or_the_future():
    torch.manual_seed(0)
    model = build_model(ModelConfig(BB, (MemorizingConfig(layers=(0, 1), mem_len=12, k=4, gate_init=1.0),))).eval()
    tokens = torch.randint(0, 64, (1, 32))

    def run(t):
        st, outs = None, []
        for s in range(4):
            o, st = model(t[:, 8 * s:8 * s + 8], st)
            outs.append(o.logits)
        return torch.cat(outs, 1)

    variants = tokens.repeat(5, 1)
    js = (3, 8, 13, 27)
    for i, j in enumerate(js):
        variants[i + 1, j] = (tokens[0, j] + 1) % 64
    with torch.no_grad():
        out = run(variants)
    for i, j in enumerate(js):
        assert torch.equal(out[i + 1, :j], out[0, :j]), f"changing token {j} changed an earlier position"
        assert not torch.equal(out[i + 1, j:], out[0, j:])


def _fill(evict: str):
    torch.manual_seed(0)
    model = build_model(ModelConfig(BB, (MemorizingConfig(layers=(1,), mem_len=20, k=2, evict=evict),))).eval()
    st = None
    with torch.no_grad():
        for s in range(6):
            _, st = model(torch.randint(0, 64, (2, 8)), st)
    return st.memories[0]


def test_memory_grows_then_evicts_fifo_never_resets():
    ms = _fill("fifo")
    assert ms.mk[0].shape[2] == 20 and bool(ms.valid[0].all())
    assert ms.stamp[0].sort(1).values.tolist() == [list(range(28, 48))] * 2   # the 20 newest positions


def test_lru_keeps_recently_retrieved_entries():
    mem = MemorizingTransformer(MemorizingConfig(layers=(1,), mem_len=4, k=1, evict="lru"), BB)
    B = 1
    mk = torch.randn(B, 2, 4, 8)
    stamp = torch.tensor([[0, 1, 90, 3]])             # entry 2 was retrieved at position 90
    pk = torch.randn(B, 2, 2, 8)
    k, _, ok, st = mem._merge(mk, mk, torch.ones(B, 4, dtype=torch.bool), stamp, pk, pk, torch.tensor([[50, 51]]),
                              torch.ones(1, 2, dtype=torch.bool))
    assert st.tolist() == [[90, 3, 50, 51]]           # the two least recently used (0, 1) went; order kept
    assert torch.equal(k[:, :, 0], mk[:, :, 2]) and torch.equal(k[:, :, 2:], pk) and bool(ok.all())
    # invalid (reset) slots go first, whatever their stamp
    k, _, ok, st = mem._merge(mk, mk, torch.tensor([[True, True, False, True]]), stamp, pk, pk, torch.tensor([[50, 51]]),
                              torch.ones(1, 2, dtype=torch.bool))
    assert st.tolist() == [[1, 3, 50, 51]] and bool(ok.all())


def test_lru_stamps_follow_retrieval():
    ms = _fill("lru")
    st = ms.stamp[0]
    assert ms.mk[0].shape[2] == 20
    assert int(st.max()) == 47 and int(st.min()) >= 0
    # LRU and FIFO keep different sets: retrieval refreshed some entries that FIFO would drop
    assert any(sorted(r) != list(range(28, 48)) for r in st.tolist())


def test_bad_memorizing_configs_list_every_reason():
    from memstack.errors import ConfigError

    with pytest_raises(ConfigError) as e:
        MemorizingConfig(mem_len=0, k=0, evict="random")
    assert len(e.value.reasons) == 3


def pytest_raises(*a):
    import pytest

    return pytest.raises(*a)
