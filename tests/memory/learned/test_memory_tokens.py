"""Memory tokens: prepended at each segment start only, at the positions just before the segment."""
from __future__ import annotations

import torch

from memstack.backbone.model import build_model
from memstack.config import BackboneConfig, ModelConfig
from memstack.memory.base import Step
from memstack.memory.learned.config import MemoryTokensConfig
from memstack.memory.learned.memory_tokens import MemoryTokens
from memstack.memory.base import StepContext


def test_prefix_only_at_segment_start():
    b = BackboneConfig(vocab_size=50, d_model=16, n_layers=1, n_heads=2, seg_len=8)
    mem = MemoryTokens(MemoryTokensConfig(n_tokens=3), b)
    x = torch.zeros(2, 4, 16)
    ctx = StepContext(torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.bool),
                      True, True, False)
    pre, suf, _ = mem.embed(x, None, ctx)
    assert pre.shape == (2, 3, 16) and suf is None and torch.equal(pre[0], mem.tokens.detach())
    pre, suf, _ = mem.embed(x, None, ctx.with_(seg_start=False))
    assert pre is None and suf is None


def test_memory_tokens_equal_a_plain_model_fed_their_embeddings_as_a_prefix():
    """The memory tokens behave exactly like extra tokens in front of the segment."""
    torch.manual_seed(0)
    b = BackboneConfig(vocab_size=53, d_model=16, n_layers=2, n_heads=2, seg_len=8)
    model = build_model(ModelConfig(b, (MemoryTokensConfig(n_tokens=3),))).eval()
    plain = build_model(ModelConfig(b, ())).eval()
    plain.load_state_dict(model.state_dict(), strict=False)
    tokens = torch.randint(0, 50, (1, 8))  # ids 50..52 are kept free for the memory tokens
    with torch.no_grad():
        got = model(tokens)[0].logits
        # reference: put the memory tokens in 3 spare embedding rows and feed them first
        plain.tok_emb.weight[50:53] = model.memory.memories[0].tokens
        ref = plain(torch.cat([torch.tensor([[50, 51, 52]]), tokens], 1))[0].logits[:, 3:]
    # (tied embeddings: the spare rows also changed logit columns 50..52)
    torch.testing.assert_close(got[..., :50], ref[..., :50], atol=1e-5, rtol=1e-5)


def test_memory_tokens_are_in_no_decay_group():
    from memstack.train.optim import assign_groups

    b = BackboneConfig(vocab_size=50, d_model=16, n_layers=1, n_heads=2, seg_len=8)
    model = build_model(ModelConfig(b, (MemoryTokensConfig(n_tokens=2),)))
    groups = assign_groups(model)
    assert "memory.memories.0.tokens" in [n for n, _ in groups["no_decay"]]
