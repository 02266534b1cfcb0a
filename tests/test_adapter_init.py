"""Memories started from real text: a prefix set to the backbone's keys/values of a text, and memory
tokens set to its embeddings, make a segment's logits equal those of the text followed by the segment."""
from __future__ import annotations

import pytest
import torch

from memstack.adapter_init import init_memory_tokens_from_text, init_prefix_from_text
from memstack.backbone import build_model
from memstack.config import BackboneConfig, ModelConfig
from memstack.memory.learned.config import MemoryTokensConfig, PrefixConfig
from tolerances import assert_close

B = BackboneConfig(vocab_size=71, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, seg_len=12, init_std=0.3)


def with_memory(mem):
    torch.manual_seed(0)
    plain = build_model(ModelConfig(B)).eval()
    model = build_model(ModelConfig(B, (mem,))).eval()
    model.load_state_dict(plain.state_dict(), strict=False)
    return plain, model


@pytest.mark.parametrize("mem,init", [(PrefixConfig(n_prefix=5, reparam=False), init_prefix_from_text),
                                      (MemoryTokensConfig(n_tokens=5), init_memory_tokens_from_text)])
def test_initialised_memory_equals_the_text_in_front(mem, init):
    plain, model = with_memory(mem)
    text = torch.randint(0, 71, (7,))            # longer than needed: the first 5 tokens are used
    x = torch.randint(0, 71, (2, 12))
    before = model(x)[0].logits
    init(model, text)
    want = plain(torch.cat([text[:5].expand(2, -1), x], 1))[0].logits[:, 5:]
    got = model(x)[0].logits
    assert_close(got, want)
    assert not torch.allclose(before, want, atol=1e-3)


def test_prefix_init_refuses_a_reparameterised_prefix_and_short_text():
    _, model = with_memory(PrefixConfig(n_prefix=5, reparam=True, reparam_hidden=8))
    with pytest.raises(ValueError, match="direct prefix"):
        init_prefix_from_text(model, list(range(5)))
    _, model = with_memory(PrefixConfig(n_prefix=5, reparam=False))
    with pytest.raises(ValueError, match="the memory needs 5"):
        init_prefix_from_text(model, [1, 2])
