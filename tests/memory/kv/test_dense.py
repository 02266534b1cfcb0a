"""Dense KV cache: the HF-style per-layer update face, capacity growth, windows, scopes."""
from __future__ import annotations

import pytest
import torch

from memstack.backbone.model import build_model
from memstack.config import BackboneConfig, ModelConfig
from memstack.errors import ConfigError
from memstack.memory.base import Step
from memstack.memory.kv.config import DenseKVConfig
from memstack.memory.kv.dense import DenseKV
from tolerances import assert_close

S = 8
B = BackboneConfig(vocab_size=61, d_model=32, n_layers=2, n_heads=4, n_kv_heads=1, seg_len=S)


def test_update_face_appends_and_returns_everything():
    mem = DenseKV(DenseKVConfig(initial_capacity=2), B)
    st = mem.init_state(2, torch.device("cpu"), torch.float32)
    k1, v1 = torch.randn(2, 1, 3, 8), torch.randn(2, 1, 3, 8)
    ka, va = st.update(0, k1, v1)
    assert torch.equal(ka, k1) and torch.equal(va, v1) and st.capacity >= 3
    st.advance(3)
    k2, v2 = torch.randn(2, 1, 4, 8), torch.randn(2, 1, 4, 8)
    ka, va = st.update(0, k2, v2)
    assert torch.equal(ka, torch.cat([k1, k2], 2)) and torch.equal(va, torch.cat([v1, v2], 2))
    assert st.capacity >= 7 and bool(st.valid[:, :7].all())


def test_document_scope_unbounded_equals_one_pass():
    torch.manual_seed(0)
    model = build_model(ModelConfig(B, (DenseKVConfig(scope="document"),))).eval()
    plain = build_model(ModelConfig(BackboneConfig(**{**B.__dict__, "seg_len": 4 * S}), ())).eval()
    plain.load_state_dict(model.state_dict())
    tokens = torch.randint(0, 61, (3, 4 * S))
    with torch.no_grad():
        st, outs = None, []
        for s in range(4):
            out, st = model(tokens[:, s * S:(s + 1) * S], st)
            outs.append(out.logits)
        assert_close(torch.cat(outs, 1), plain(tokens)[0].logits)


def test_window_keeps_the_last_tokens_at_segment_ends():
    torch.manual_seed(0)
    model = build_model(ModelConfig(B, (DenseKVConfig(scope="document", window=12),))).eval()
    tokens = torch.randint(0, 61, (1, 3 * S))
    with torch.no_grad():
        st = None
        for s in range(3):
            _, st = model(tokens[:, s * S:(s + 1) * S], st)
            kv = st.memories[0]
            assert kv.length == min(12, (s + 1) * S)
        # layer 0's held keys are exactly the keys of the last 12 tokens (deeper layers differ from
        # an unbounded cache's, because the window changed what earlier segments could see)
        ref = build_model(ModelConfig(B, (DenseKVConfig(scope="document"),))).eval()
        ref.load_state_dict(model.state_dict())
        st2 = None
        for s in range(3):
            _, st2 = ref(tokens[:, s * S:(s + 1) * S], st2)
        assert torch.equal(kv.k[0][:, :, :12], st2.memories[0].k[0][:, :, 3 * S - 12:3 * S])
        assert torch.equal(kv.v[0][:, :, :12], st2.memories[0].v[0][:, :, 3 * S - 12:3 * S])


def test_segment_scope_clears_at_segment_start():
    model = build_model(ModelConfig(B, (DenseKVConfig(scope="segment"),))).eval()
    with torch.no_grad():
        _, st = model(torch.randint(0, 61, (1, 5)), None, Step(seg_start=True, seg_end=False))
        assert st.memories[0].length == 5
        _, st = model(torch.randint(0, 61, (1, 3)), st, Step(seg_start=False, seg_end=True))
        assert st.memories[0].length == 8
        _, st = model(torch.randint(0, 61, (1, 2)), st, Step(seg_start=True, seg_end=False))
        assert st.memories[0].length == 2


def test_config_reasons_collected():
    with pytest.raises(ConfigError) as e:
        DenseKVConfig(scope="segment", window=0, initial_capacity=0)
    assert len(e.value.reasons) == 3


def test_xl_and_document_cache_conflict_but_segment_cache_is_fine():
    from memstack.memory.learned.config import XLConfig

    with pytest.raises(ConfigError, match="feed the same context twice"):
        ModelConfig(B, (XLConfig(), DenseKVConfig(scope="document")))
    ModelConfig(B, (XLConfig(), DenseKVConfig(scope="segment")))
