"""The block reader (memstack/fid.py) on a tiny random backbone, against references:
- a per-passage read equals the plain forward pass over [block; answer];
- the FiD read equals Hugging Face's LlamaForCausalLM (an independent implementation) run over
  the packed sequence [block_1 | ... | block_k | answer] with a block-diagonal 4-D attention
  mask and per-block position ids -- the FiD attention pattern written out densely;
- with one block, FiD equals the per-passage read; gradient reaches the blocks' encodings;
  frozen layers get none; greedy decoding equals step-by-step argmax of the plain model."""
from __future__ import annotations

import pytest
import torch

from memstack import fid
from memstack.backbone.model import build_model
from memstack.config import BackboneConfig
from tolerances import tol

BB = BackboneConfig(vocab_size=97, d_model=48, n_layers=3, n_heads=4, n_kv_heads=2, seg_len=64)


@pytest.fixture
def model():
    return build_model(BB).eval()


def _blocks(lengths, pad=0):
    seqs = [torch.randint(1, 97, (n,)).tolist() for n in lengths]
    return seqs, fid.pack(seqs, pad)


def test_per_passage_read_equals_plain_forward_over_the_concatenation(model):
    seqs, blocks = _blocks([5, 9, 3, 7])
    kv = fid.encode(model, blocks)
    ans = torch.randint(1, 97, (4, 6))
    got = fid.read(model, kv, ans)                                              # (4, 6, V)
    for r, s in enumerate(seqs):
        full, _ = model(torch.tensor([s + ans[r].tolist()]))
        torch.testing.assert_close(got[r], full.logits[0, len(s):], **tol(torch.float32))


def test_fid_read_equals_hf_llama_with_a_block_mask(model):
    from memstack.hf import to_hf

    k = 3
    seqs, blocks = _blocks([5, 9, 4, 6, 2, 8])                                  # 2 questions x 3 blocks
    ans = torch.randint(1, 97, (2, 4))
    got = fid.read(model, fid.encode(model, blocks).fuse(k), ans)              # (2, 4, V)
    hf = to_hf(model)
    for b in range(2):
        group = seqs[b * k:(b + 1) * k]
        ids = sum(group, []) + ans[b].tolist()
        S = sum(len(s) for s in group)
        start = max(len(s) for s in group)
        pos, mask = [], torch.zeros(len(ids), len(ids), dtype=torch.bool)
        off = 0
        for s in group:                                                         # block-diagonal, causal inside
            pos += list(range(len(s)))
            mask[off:off + len(s), off:off + len(s)] = torch.ones(len(s), len(s), dtype=torch.bool).tril()
            off += len(s)
        pos += list(range(start, start + ans.shape[1]))
        mask[S:, :S] = True                                                     # the answer sees every block
        mask[S:, S:] = torch.ones(ans.shape[1], ans.shape[1], dtype=torch.bool).tril()
        add = torch.zeros(len(ids), len(ids)).masked_fill(~mask, float("-inf"))[None, None]
        with torch.no_grad():
            ref = hf(input_ids=torch.tensor([ids]), attention_mask=add, position_ids=torch.tensor([pos])).logits[0, S:]
        torch.testing.assert_close(got[b], ref.float(), atol=1e-4, rtol=1e-4)


def test_fid_with_one_block_is_the_per_passage_read(model):
    _, blocks = _blocks([4, 7])
    kv = fid.encode(model, blocks)
    ans = torch.randint(1, 97, (2, 5))
    torch.testing.assert_close(fid.read(model, kv.fuse(1), ans), fid.read(model, kv, ans), **tol(torch.float32))


def test_gradient_reaches_block_encodings_and_frozen_layers_get_none(model):
    model.train()
    _, blocks = _blocks([6, 3, 5, 4])
    tok_lp, mask = fid.answer_logprobs(model, fid.encode(model, blocks).fuse(2), [5, 6], [[7, 8], [9]])
    assert mask.tolist() == [[True, True], [True, False]]
    tok_lp.sum().backward()
    assert model.tok_emb.weight.grad is not None
    # a block token's embedding row gets gradient only through the answer's attention to it
    only_in_blocks = sorted(set(blocks.ids.flatten().tolist()) - {5, 6, 7, 8, 9, 0})
    assert float(model.tok_emb.weight.grad[only_in_blocks].abs().sum()) > 0
    model.zero_grad(set_to_none=True)
    tok_lp, _ = fid.answer_logprobs(model, fid.encode(model, blocks, train_from=2).fuse(2), [5], [[7], [8]], train_from=2)
    tok_lp.sum().backward()
    assert model.blocks[0].attn.wq.weight.grad is None and model.blocks[1].mlp.w_up.weight.grad is None
    assert float(model.blocks[2].attn.wq.weight.grad.abs().sum()) > 0


def test_answer_logprobs_match_the_plain_model(model):
    seqs, blocks = _blocks([5, 8])
    tok_lp, mask = fid.answer_logprobs(model, fid.encode(model, blocks), [3, 4], [[10, 11, 12], [13]])
    for r, (s, a) in enumerate(zip(seqs, [[10, 11, 12], [13]])):
        with torch.no_grad():
            out, _ = model(torch.tensor([s + [3, 4] + a]))
        lp = torch.log_softmax(out.logits[0], -1)
        want = [float(lp[len(s) + 1 + i, t]) for i, t in enumerate(a)]
        assert torch.allclose(tok_lp[r, : len(a)], torch.tensor(want), atol=1e-5)
        assert int(mask[r].sum()) == len(a)


def test_greedy_equals_stepwise_argmax_of_the_plain_model(model):
    seqs, blocks = _blocks([5, 8, 2])
    got = fid.greedy(model, fid.encode(model, blocks), [3], max_new=5, stop=set())
    for s, g in zip(seqs, got):
        ids = s + [3]
        for _ in range(5):
            out, _ = model(torch.tensor([ids]))
            ids.append(int(out.logits[0, -1].argmax()))
        assert g == ids[len(s) + 1:]


def test_greedy_stops_at_a_stop_token(model):
    _, blocks = _blocks([4])
    first = fid.greedy(model, fid.encode(model, blocks), [3], max_new=1, stop=set())[0][0]
    assert fid.greedy(model, fid.encode(model, blocks), [3], max_new=5, stop={first}) == [[]]


def test_pack_refuses_empty_blocks():
    with pytest.raises(ValueError, match="at least one token"):
        fid.pack([[1, 2], []], 0)
