"""The dense decoder: layers (RMSNorm, RoPE), GQA, tied embeddings, causality, chunked decoding
through a segment-scoped KV cache, input validation and per-example state reset."""
from __future__ import annotations

import math

import pytest
import torch

from memstack.backbone import build_model
from memstack.backbone.layers import RMSNorm, apply_rope, rope_tables
from memstack.config import BackboneConfig, ModelConfig
from memstack.memory.base import Step
from memstack.memory.kv.config import DenseKVConfig
from memstack.memory.learned.config import MemoryTokensConfig, XLConfig
from memstack.memory.state import ModelState, tree_map
from memstack.ops.attention import set_impl
from tolerances import assert_close

V = 97


def tiny(**kw) -> BackboneConfig:
    # init_std large enough that attention is far from uniform, so memory visibly matters
    base = dict(vocab_size=V, d_model=32, n_layers=2, n_heads=4, seg_len=16, init_std=0.15)
    return BackboneConfig(**{**base, **kw})


def toks(B: int, T: int) -> torch.Tensor:
    return torch.randint(0, V, (B, T))


def clone_state(state):
    return tree_map(torch.clone, state)


# ----------------------------------------------------------------------------- layers

def test_rmsnorm_matches_hand_formula():
    dim, eps = 16, 1e-5
    norm = RMSNorm(dim, eps)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(dim))
    x = torch.randn(2, 5, dim) * 3
    expected = torch.stack([
        torch.stack([x[b, t] / math.sqrt((x[b, t] ** 2).mean().item() + eps) * norm.weight for t in range(5)])
        for b in range(2)])
    assert_close(norm(x), expected)
    # a constant row c: output = c / sqrt(c^2 + eps) * weight
    row = torch.full((1, dim), 0.5)
    assert_close(norm(row)[0], 0.5 / math.sqrt(0.25 + eps) * norm.weight.detach())
    # low precision in, same dtype out, computed in fp32
    xb = x.to(torch.bfloat16)
    out = norm(xb)
    assert out.dtype == torch.bfloat16
    assert_close(out, norm(xb.float()), dtype=torch.bfloat16)


def test_rope_tables_shape_and_large_positions_vs_float64():
    head_dim, theta = 16, 10000.0
    positions = torch.tensor([[0, 1, 12345, 999_999, 1_000_000], [3, 77, 500_000, 10, 0]])
    cos, sin = rope_tables(positions, head_dim, theta, torch.float32)
    assert cos.shape == sin.shape == (2, 1, 5, head_dim // 2) and cos.dtype == torch.float32
    half = head_dim // 2
    ref_cos = torch.tensor([[[math.cos(p * theta ** (-i / half)) for i in range(half)] for p in row]
                            for row in positions.tolist()], dtype=torch.float64)
    ref_sin = torch.tensor([[[math.sin(p * theta ** (-i / half)) for i in range(half)] for p in row]
                            for row in positions.tolist()], dtype=torch.float64)
    assert (cos[:, 0].double() - ref_cos).abs().max() < 1e-5
    assert (sin[:, 0].double() - ref_sin).abs().max() < 1e-5


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_rope_scores_depend_only_on_position_difference(dtype):
    B, H, T, D = 2, 3, 6, 16
    q, k = torch.randn(B, H, T, D, dtype=dtype), torch.randn(B, H, T, D, dtype=dtype)
    pos = torch.randint(0, 50, (B, T))

    def scores(qpos, kpos):
        qc, qs = rope_tables(qpos, D, 10000.0, dtype)
        kc, ks = rope_tables(kpos, D, 10000.0, dtype)
        return apply_rope(q, qc, qs) @ apply_rope(k, kc, ks).transpose(-1, -2)

    base = scores(pos, pos)
    for shift in (1, 37, 4096):
        assert_close(scores(pos + shift, pos + shift), base)
    # not vacuous: shifting keys only changes the scores
    assert (scores(pos, pos + 3) - base).abs().max() > 1e-2
    # a rotation preserves norms
    c, s = rope_tables(pos, D, 10000.0, dtype)
    assert_close(apply_rope(q, c, s).norm(dim=-1), q.norm(dim=-1))


# ----------------------------------------------------------------------------- GQA / embeddings

@pytest.mark.parametrize("kv", [1, 2, 4])
def test_gqa_models_run_with_their_kv_width(kv):
    cfg = tiny(n_kv_heads=kv)
    model = build_model(cfg).eval()
    hd = cfg.head_dim
    for blk in model.blocks:
        assert blk.attn.wq.weight.shape == (cfg.n_heads * hd, cfg.d_model)
        assert blk.attn.wk.weight.shape == (kv * hd, cfg.d_model)
        assert blk.attn.wv.weight.shape == (kv * hd, cfg.d_model)
    x = toks(2, 9)
    with torch.no_grad():
        out, state = model(x)
        assert out.logits.shape == (2, 9, V) and out.logits.dtype == torch.float32
        assert out.hidden.shape == (2, 9, cfg.d_model)
        assert torch.isfinite(out.logits).all()
        assert state.pos.tolist() == [9, 9]
        try:  # the grouped fast path equals the explicit-repeat reference through the whole model
            set_impl("reference")
            ref, _ = model(x)
        finally:
            set_impl(None)
    assert_close(out.logits, ref.logits)
    n_proj = 2 * cfg.d_model * kv * hd * cfg.n_layers   # wk + wv over all layers
    assert sum(p.numel() for n, p in model.named_parameters() if n.endswith(("wk.weight", "wv.weight"))) == n_proj


def test_tied_embeddings_share_storage_and_untied_do_not():
    tied = build_model(tiny(tie_embeddings=True))
    untied = build_model(tiny(tie_embeddings=False))
    assert tied.lm_head.weight is tied.tok_emb.weight
    assert tied.lm_head.weight.data_ptr() == tied.tok_emb.weight.data_ptr()
    assert untied.lm_head.weight.data_ptr() != untied.tok_emb.weight.data_ptr()
    assert untied.num_params() - tied.num_params() == V * 32
    with torch.no_grad():  # writing one writes the other only when tied
        tied.tok_emb.weight[3].fill_(1.0)
        untied.tok_emb.weight[3].fill_(1.0)
    assert (tied.lm_head.weight[3] == 1.0).all()
    assert not (untied.lm_head.weight[3] == 1.0).all()


def test_causal_logits_do_not_see_the_future():
    model = build_model(tiny()).eval()
    x = toks(2, 12)
    with torch.no_grad():
        base = model(x)[0].logits
        for t in (0, 5, 10):
            y = x.clone()
            y[:, t + 1:] = torch.randint(0, V, y[:, t + 1:].shape)
            out = model(y)[0].logits
            assert_close(out[:, : t + 1], base[:, : t + 1])
            assert (out[:, t + 1:] - base[:, t + 1:]).abs().max() > 1e-4  # later positions do change


# ----------------------------------------------------------------------------- chunked decoding

def _decode(model, x, splits, state=None, pos0=None):
    """Feed x (B,T) in chunks of the given lengths as one segment; returns (logits, state)."""
    outs, start = [], 0
    for i, n in enumerate(splits):
        step = Step(seg_start=i == 0, seg_end=i == len(splits) - 1)
        out, state = model(x[:, start:start + n], state, step)
        outs.append(out.logits)
        start += n
    assert start == x.shape[1]
    return torch.cat(outs, dim=1), state


SPLITS = {"one_at_a_time": [1] * 13, "prefill_5_then_decode": [5] + [1] * 8, "uneven": [3, 1, 6, 2, 1]}


@pytest.mark.parametrize("split", list(SPLITS))
@pytest.mark.parametrize("kv", [None, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_chunked_decoding_equals_one_shot(split, kv, grad, poison_empty):
    model = build_model(tiny(n_kv_heads=kv)).eval()
    # a small initial capacity makes the cache grow (new_empty: poisoned) while decoding
    dec = model.with_memories([DenseKVConfig(scope="segment", initial_capacity=4)])
    x = toks(2, 13)
    with torch.set_grad_enabled(grad):
        full = model(x)[0].logits
        chunked, state = _decode(dec, x, SPLITS[split])
    assert torch.isfinite(chunked).all()
    assert_close(chunked, full)
    assert state.pos.tolist() == [13, 13]
    if grad:  # the training path keeps the graph to the parameters
        chunked.sum().backward()
        assert model.blocks[0].attn.wq.weight.grad is not None


def test_chunked_decoding_second_segment_restarts_the_cache():
    """scope='segment': a new segment sees only itself, at positions continuing the document."""
    model = build_model(tiny()).eval()
    dec = model.with_memories([DenseKVConfig(scope="segment", initial_capacity=4)])
    x1, x2 = toks(2, 7), toks(2, 6)
    with torch.no_grad():
        _, state = _decode(dec, x1, [3, 1, 1, 1, 1])
        second, state = _decode(dec, x2, [2, 1, 1, 1, 1], state=state)
        alone = model(x2, ModelState(torch.full((2,), 7), ()))[0].logits
    assert_close(second, alone)
    assert state.pos.tolist() == [13, 13]


@pytest.mark.parametrize("memories", [[MemoryTokensConfig(n_tokens=3)], [XLConfig(mem_len=8)]],
                         ids=["memory_tokens", "xl"])
def test_chunked_decoding_with_memories_equals_one_shot(memories):
    """Decoding through the cache added by `with_memories` matches one-shot segments, also when
    the trained model carries its own memory (prefix tokens; XL recurrence over 2 segments)."""
    model = build_model(tiny(), memories).eval()
    dec = model.with_memories([DenseKVConfig(scope="segment", initial_capacity=4)])
    segs = [toks(2, 7), toks(2, 5)]
    with torch.no_grad():
        state_full, state_dec = None, None
        for seg in segs:
            full, state_full = model(seg, state_full)
            chunked, state_dec = _decode(dec, seg, [2] + [1] * (seg.shape[1] - 2), state=state_dec)
            assert_close(chunked, full.logits)


def test_with_memories_shares_parameters_and_keeps_mode():
    model = build_model(tiny())
    model.eval()
    dec = model.with_memories([DenseKVConfig(scope="segment")])
    assert dec.tok_emb is model.tok_emb and dec.blocks is model.blocks and dec.lm_head is model.lm_head
    assert dec.cfg.memories == (DenseKVConfig(scope="segment"),)
    assert {p.data_ptr() for p in dec.parameters()} == {p.data_ptr() for p in model.parameters()}
    # the decode view of an eval-mode model is itself in eval mode (memories see ctx.training)
    assert dec.training is False


# ----------------------------------------------------------------------------- input validation

@pytest.mark.parametrize("bad,shown", [(-1, "-1"), (V, str(V)), (V + 50, str(V + 50))])
def test_out_of_vocab_ids_raise(bad, shown):
    model = build_model(tiny())
    x = toks(2, 5)
    x[1, 3] = bad
    with pytest.raises(ValueError, match=rf"token ids must be integers in \[0, {V}\).*{shown}"):
        model(x)


def test_float_tokens_raise():
    model = build_model(tiny())
    with pytest.raises(ValueError, match=r"token ids must be integers.*float32"):
        model(toks(2, 5).float())


def test_int32_tokens_are_accepted():
    model = build_model(tiny()).eval()
    x = toks(2, 5)
    with torch.no_grad():
        assert torch.equal(model(x.int())[0].logits, model(x)[0].logits)


def test_step_reset_shape_mismatch_raises():
    model = build_model(tiny())
    with pytest.raises(ValueError, match=r"step.reset must have shape \(2,\), got \(3,\)"):
        model(toks(2, 4), step=Step(reset=torch.zeros(3, dtype=torch.bool)))


def test_state_batch_mismatch_raises():
    model = build_model(tiny(), [XLConfig(mem_len=4)])
    state = model.init_state(3)
    with pytest.raises(ValueError, match=r"state is for batch 3, tokens have batch 2"):
        model(toks(2, 4), state)


def test_build_model_rejects_memories_twice():
    with pytest.raises(TypeError):
        build_model(ModelConfig(tiny()), [XLConfig()])


# ----------------------------------------------------------------------------- per-example reset

@pytest.mark.parametrize("mem", [XLConfig(mem_len=8), DenseKVConfig(scope="document", initial_capacity=4)],
                         ids=["xl", "kv_dense_document"])
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_per_example_reset(mem, grad):
    model = build_model(tiny(), [mem]).eval()
    seg1, seg2 = toks(2, 6), toks(2, 5)
    with torch.set_grad_enabled(grad):
        _, state = model(seg1)
        carried = clone_state(state)
        out, new_state = model(seg2, state, Step(reset=torch.tensor([True, False])))
        cont = model(seg2, carried)[0].logits
        fresh = model(seg2[:1])[0].logits
    assert_close(out.logits[0], fresh[0])      # row 0: as if the document had just started
    assert_close(out.logits[1], cont[1])       # row 1: untouched
    assert (cont[0] - fresh[0]).abs().max() > 1e-3, "memory must matter, or the test is vacuous"
    assert new_state.pos.tolist() == [5, 11]


def test_reset_state_wipes_positions_of_masked_rows():
    model = build_model(tiny(), [XLConfig(mem_len=8)])
    state = ModelState(torch.tensor([4, 9, 2]), model.init_state(3).memories)
    out = model.reset_state(state, torch.tensor([False, True, True]))
    assert out.pos.tolist() == [4, 0, 0]
