"""Memorizing with a memory-mapped store: the same output as the in-memory store (to rounding: the mapped read recomputes the k kept scores) (growth, FIFO
eviction, a row reset, rows in step), the same kept entries, gradients through the read, files
left nowhere, consumed states refused, and what it cannot do refused with reasons."""
from __future__ import annotations

import os

import pytest
import torch

from memstack.backbone.model import build_model
from memstack.config import BackboneConfig, ModelConfig
from memstack.errors import ConfigError
from memstack.memory.base import Step
from memstack.memory.retrieval.config import MemorizingConfig
from memstack.memory.retrieval.mapped import mapped_zeros, merge_in_place
from tolerances import assert_close

BB = BackboneConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, seg_len=8)


def pair(tmp_path, **kw):
    kw = {"layers": (0, 1), "mem_len": 20, "k": 3, "gate_init": 1.0, **kw}
    torch.manual_seed(0)
    a = build_model(ModelConfig(BB, (MemorizingConfig(**kw),))).eval()
    b = build_model(ModelConfig(BB, (MemorizingConfig(store="mmap", mmap_dir=str(tmp_path), **kw),))).eval()
    b.load_state_dict(a.state_dict())
    return a, b


def entries(ms, j, row):
    """The valid (stamp, key) entries of layer j, row `row`, sorted by stamp."""
    ok = ms.valid[j][row]
    st = ms.stamp[j][row][ok]
    order = st.argsort()
    return st[order].tolist(), ms.mk[j][row][:, ok][:, order], ms.mv[j][row][:, ok][:, order]


def test_mmap_store_equals_in_memory_store(tmp_path):
    a, b = pair(tmp_path)
    sa = sb = None
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for s in range(7):                       # 56 tokens into 20 slots: evicts from segment 3 on
            x = torch.randint(0, 64, (2, 8), generator=g)
            reset = torch.tensor([False, s == 4])                                # row 1 starts a new document
            oa, sa = a(x, sa, Step(reset=reset))
            ob, sb = b(x, sb, Step(reset=reset))
            assert_close(ob.logits, oa.logits)
            for j in range(2):
                for row in range(2):
                    st_a, ka, va = entries(sa.memories[0], j, row)
                    st_b, kb, vb = entries(sb.memories[0], j, row)
                    assert st_a == st_b
                    assert_close(kb, ka)                   # layer 1's keys follow layer 0's read: rounding
                    assert_close(vb, va)
    m = sb.memories[0]
    assert m.mk[0].shape == (2, 2, 20, 8) and bool(m.valid[0][0].all())
    assert sorted(m.stamp[0][0].tolist()) == list(range(36, 56))                 # the 20 newest positions
    assert os.listdir(tmp_path) == []                                            # the files are unlinked


def test_mmap_chunked_decode_and_gradients(tmp_path):
    a, b = pair(tmp_path, layers=(1,), mem_len=12)
    x = torch.randint(0, 64, (1, 32))
    la = a(x[:, :8], None)
    sa, sb = la[1], b(x[:, :8], None)[1]
    for s in range(8, 32, 8):                    # chunks of 3 + 5 inside each segment
        for c0, c1 in ((s, s + 3), (s + 3, s + 8)):
            seg = Step(seg_start=c0 == s, seg_end=c1 == s + 8)
            oa, sa = a(x[:, c0:c1], sa, seg)
            ob, sb = b(x[:, c0:c1], sb, seg)
            assert_close(ob.logits, oa.logits)
    b.train()
    out, _ = b(x[:, :8], sb)
    out.logits.sum().backward()                  # the read's gradient needs no mapped array
    assert b.memory.memories[0].gate.grad is not None and torch.isfinite(b.memory.memories[0].gate.grad).all()
    with pytest.raises(RuntimeError, match="already consumed"):
        b(x[:, :8], sb, Step())                     # sb was consumed by the call above


def test_merge_in_place_keeps_the_newest():
    mk, mv = mapped_zeros((2, 1, 4, 2), torch.float32), mapped_zeros((2, 1, 4, 2), torch.float32)
    valid = torch.tensor([[True, True, False, True], [True, True, True, True]])
    stamp = torch.tensor([[5, 1, 0, 3], [10, 11, 12, 13]])
    pk = torch.arange(12, dtype=torch.float32).reshape(2, 1, 3, 2)
    ppos = torch.tensor([[6, 7, 8], [14, 15, 16]])
    v2, s2 = merge_in_place(mk, mv, valid, stamp, pk, pk + 100, ppos, torch.ones(2, 3, dtype=torch.bool))
    # row 0 drops stamp 1, the invalid slot and stamp 3 (in slot order) for 6, 7, 8; row 1 its three oldest
    assert s2.tolist() == [[5, 6, 7, 8], [14, 15, 16, 13]] and bool(v2.all())
    assert mk[0, 0, 1].tolist() == [0.0, 1.0] and mk[0, 0, 3].tolist() == [4.0, 5.0]
    assert mv[1, 0, 0].tolist() == [106.0, 107.0] and mk[1, 0, 3].tolist() == [0.0, 0.0]   # slot 3 kept (never written)
    bf = mapped_zeros((3, 5), torch.bfloat16)
    bf[1, 2] = 1.5
    assert bf.dtype == torch.bfloat16 and float(bf[1, 2]) == 1.5 and float(bf.sum()) == 1.5


def test_mmap_refusals(tmp_path):
    with pytest.raises(ConfigError) as e:
        MemorizingConfig(store="mmap", evict="lru")
    assert "evict='fifo'" in str(e.value)
    with pytest.raises(ConfigError, match="store must be"):
        MemorizingConfig(store="disk")
    _, b = pair(tmp_path)
    st = b.init_state(2, torch.device("cpu"))
    mem = b.memory.memories[0]
    with pytest.raises(ValueError, match="cannot be split or regrouped"):
        mem.take_rows(st.memories[0], torch.tensor([0]))
    with pytest.raises(ValueError, match="cannot be split or regrouped"):
        mem.cat_rows([st.memories[0]])
