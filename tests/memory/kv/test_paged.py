"""kv_paged: equals kv_dense (every scope), frees whole blocks, compresses to its budget, keeps
what each policy says, KIVI quantization; keep_ratio 1.0 equals no compression."""
from __future__ import annotations

import pytest
import torch

from memstack.backbone.model import build_model
from memstack.config import BackboneConfig, ModelConfig
from memstack.memory.base import Step
from memstack.memory.kv.compress import keep_indices
from memstack.memory.kv.compress.h2o import attention_received
from memstack.memory.kv.config import CompressionConfig, DenseKVConfig, PagedKVConfig
from memstack.ops.kv_quant import dequantize, pack, quantize, unpack
from tolerances import assert_close

S = 8
B = BackboneConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, seg_len=S, init_std=0.3)


def pair(paged: PagedKVConfig, dense: DenseKVConfig):
    torch.manual_seed(0)
    a = build_model(ModelConfig(B, (paged,))).eval()
    b = build_model(ModelConfig(B, (dense,))).eval()
    b.load_state_dict(a.state_dict())
    return a, b


def run(model, tokens, chunks=None):
    state, outs, fed = None, [], 0
    for n in chunks or [S] * (tokens.shape[1] // S):
        seg_pos = fed % S
        out, state = model(tokens[:, fed:fed + n], state, Step(seg_start=seg_pos == 0, seg_end=seg_pos + n == S))
        outs.append(out.logits)
        fed += n
    return torch.cat(outs, 1), state


@pytest.mark.parametrize("scope,window,bs", [("document", None, 4), ("document", None, 3), ("document", 5, 4),
                                             ("document", 11, 2), ("segment", None, 4)])
def test_paged_equals_dense(scope, window, bs):
    paged, dense = pair(PagedKVConfig(scope=scope, window=window, block_size=bs, initial_blocks=1),
                        DenseKVConfig(scope=scope, window=window))
    tokens = torch.randint(0, 64, (3, 5 * S))
    chunks = [5, 3, 1, 1, 6, 8, 2, 2, 2, 2, 8]                                 # crosses no segment boundary
    with torch.no_grad():
        got, st = run(paged, tokens, chunks)
        want, _ = run(dense, tokens, chunks)
    assert_close(got, want)
    s = st.memories[0]
    assert s.table.shape[1] == -(-s.n_slots // bs) and (s.table == s.table[:1]).all()
    assert len(set(s.table[0].tolist())) == s.table.shape[1]                      # no block used twice


def test_window_frees_whole_blocks_and_reuses_them():
    paged, _ = pair(PagedKVConfig(window=5, block_size=4, initial_blocks=1), DenseKVConfig(window=5))
    with torch.no_grad():
        _, st = run(paged, torch.randint(0, 64, (1, 6 * S)))
    s = st.memories[0]
    # 5 tokens kept at each segment end -> slots [3, 8) of 2 blocks; the pool never grew past 4 blocks
    assert (s.n_slots, s.start, s.table.shape[1]) == (8, 3, 2)
    assert s.kv.shape[1] == 4 and s.valid[0].tolist() == [False] * 3 + [True] * 5


@pytest.mark.parametrize("policy", ["streaming", "h2o", "snapkv"])
def test_keep_ratio_one_equals_no_compression(policy):
    torch.manual_seed(0)
    cfg = PagedKVConfig(block_size=4, compression=CompressionConfig(policy=policy, keep_ratio=1.0, recent=3))
    a, b = pair(cfg, DenseKVConfig())
    tokens = torch.randint(0, 64, (2, 4 * S))
    with torch.no_grad():
        got, st = run(a, tokens)
        want, _ = run(b, tokens)
    assert torch.equal(got, want) or (got - want).abs().max() < 1e-5
    assert st.memories[0].n_slots == 4 * S


@pytest.mark.parametrize("policy", ["streaming", "h2o", "snapkv"])
@pytest.mark.parametrize("keep", [0.25, 0.5])
def test_compression_frees_blocks_to_the_budget(policy, keep):
    cfg = PagedKVConfig(block_size=4, compression=CompressionConfig(policy=policy, keep_ratio=keep, recent=3, sink_tokens=2))
    a, _ = pair(cfg, DenseKVConfig())
    with torch.no_grad():
        _, st = run(a, torch.randint(0, 64, (2, 6 * S)))
    s = st.memories[0]
    k = -(-int(keep * 6 * S) // 1)
    assert s.n_slots == k and s.table.shape[1] == -(-k // 4)
    assert s.valid.sum(1).tolist() == [k, k]
    assert a.memory.memories[0].held_bytes(s) < 6 * S * 2 * a.memory.memories[0]._fp_bytes_per_token(torch.float32)


def test_streaming_keeps_sinks_and_recent_tokens():
    """The kept keys are exactly those of tokens [0, sinks) and the last k - sinks (from kv_dense)."""
    cfg = PagedKVConfig(block_size=4, compression=CompressionConfig(policy="streaming", keep_ratio=0.5, sink_tokens=3))
    a, b = pair(cfg, DenseKVConfig())
    tokens = torch.randint(0, 64, (1, 2 * S))
    with torch.no_grad():
        _, sa = run(a, tokens)
        _, sb = run(b, tokens)
    s, d = sa.memories[0], sb.memories[0]
    want_idx = [0, 1, 2] + list(range(2 * S - 5, 2 * S))                          # k = 8
    k, _ = a.memory.memories[0]._gather(s, 0, 8)                                 # layer 0: K depends on tokens only
    assert torch.equal(k, d.k[0][:, :, want_idx])


def test_keep_indices_by_hand():
    scores = torch.tensor([[[[5.0, 1.0, 9.0, 0.0, 3.0, 2.0]]]])                     # (1, 1, 1, 6)
    valid = torch.tensor([[True, True, False, True, True, True]])
    assert keep_indices(scores, valid, 3, recent=1)[0, 0, 0].tolist() == [0, 4, 5]   # recent 5, then 0 and 4; 2 invalid
    assert keep_indices(scores, valid, 6, recent=1)[0, 0, 0].tolist() == [0, 1, 3, 4, 5, 2]  # invalid last
    assert keep_indices(scores, valid, 3, recent=0, sinks=2)[0, 0, 0].tolist() == [0, 1, 4]


def test_attention_received_matches_explicit_probabilities():
    q, k = torch.randn(1, 4, 3, 8), torch.randn(1, 2, 7, 8)                       # 4 past keys + 3 chunk keys
    valid = torch.tensor([[True, False, True, True]])
    got = attention_received(q, k, valid, 3)
    want = torch.zeros(1, 2, 7)
    for h in range(4):
        for t in range(3):
            vis = [0, 2, 3] + [4 + j for j in range(t + 1)]
            p = torch.softmax(k[0, h // 2, vis] @ q[0, h, t] / 8**0.5, 0)
            want[0, h // 2, vis] += p
    assert_close(got, want)
    assert_close(got.sum(-1), torch.full((1, 2), 6.0))


# ------------------------------------------------------------------------------------ KIVI

@pytest.mark.parametrize("bits", [2, 4, 8])
def test_quantize_round_trip_and_error_bound(bits, poison_empty):
    x = torch.randn(3, 5, 16) * torch.linspace(0.1, 10, 16)                       # outlier channels
    for dim in (-2, -1):
        codes, scale, zero = quantize(x, bits, dim)
        assert codes.dtype == torch.uint8 and codes.shape == (3, 5, 16 * bits // 8)
        assert scale.shape == ((3, 1, 16) if dim == -2 else (3, 5, 1))
        err = (dequantize(codes, scale, zero, bits) - x).abs()
        assert (err <= scale / 2 + 1e-5).all()
    q = torch.randint(0, 1 << bits, (4, 24))
    assert torch.equal(unpack(pack(q, bits), bits), q.to(torch.uint8))


def test_kivi_quantizes_old_blocks_and_shrinks_memory():
    cfg = PagedKVConfig(block_size=4, compression=CompressionConfig(policy="kivi", bits=4, recent=6))
    a, b = pair(cfg, DenseKVConfig())
    tokens = torch.randint(0, 64, (2, 3 * S))
    with torch.no_grad():
        got, sa = run(a, tokens)
        want, sb = run(b, tokens)
    s, mem = sa.memories[0], a.memory.memories[0]
    assert s.qk.shape[1] == 4 and s.n_slots == 8                                   # 24 = 16 quantized + 8 residual
    assert s.table.shape[1] == 2
    k, _ = mem._past(s, 0)                                                        # layer 0: K depends on tokens only
    d = sb.memories[0].k[0][:, :, :24]
    kc, ks, kz = quantize(d[:, :, :16].reshape(2, 2, 4, 4, 8).transpose(1, 2), 4, -2)   # per block, per channel
    assert_close(k[:, :, :16], dequantize(kc, ks, kz, 4).transpose(1, 2).reshape(2, 2, 16, 8))
    assert torch.equal(k[:, :, 16:], d[:, :, 16:])
    full = 2 * 24 * mem._fp_bytes_per_token(torch.float32)
    # rows x quantized blocks x layers x kv heads x (K, V codes + K per-channel + V per-token scale/zero) + valid
    quant = 2 * 4 * 2 * 2 * (2 * 4 * 8 * 4 // 8 + 2 * 8 * 4 + 2 * 4 * 4) + 2 * 4 * 4
    assert mem.held_bytes(s) == quant + 2 * 8 * mem._fp_bytes_per_token(torch.float32) < 0.7 * full
    assert (got - want).abs().max() < 0.5 and (got[:, :S] - want[:, :S]).abs().max() == 0   # first segment exact
