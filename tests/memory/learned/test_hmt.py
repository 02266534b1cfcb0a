"""HMT: the segment layout [P; sensory; segment; P] against a by-hand pass, the cache is a FIFO of
the written memory embeddings, recall is softmax attention of the summary over the cache, and
predictions are causal (the summary reads the previous segment, never the current one)."""
from __future__ import annotations

import math

import torch

from memstack.backbone.model import build_model
from memstack.config import BackboneConfig, ModelConfig
from memstack.memory.learned.config import HMTConfig
from tolerances import assert_close

S, V, K, J, N = 8, 61, 3, 5, 2


def hmt_model():
    torch.manual_seed(0)
    bb = BackboneConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, seg_len=S, init_std=0.1)
    model = build_model(ModelConfig(bb, (HMTConfig(n_sensory=K, n_summary=J, cache_size=N),)))
    with torch.no_grad():
        for p in model.memory.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model.eval()


def test_segments_follow_the_hmt_layout_by_hand():
    model = hmt_model()
    mem = model.memory.memories[0]
    tokens = torch.randint(0, V, (2, 4 * S))
    cache = []                                                   # written memory embeddings, by hand
    prev_x = None
    state = None
    with torch.no_grad():
        for s in range(4):
            x = model.tok_emb(tokens[:, s * S:(s + 1) * S])     # (2, S, D)
            if not cache:
                P = mem.init_mem.expand(2, 1, -1)
            else:  # summary of the previous segment's last J tokens, then recall over the cache
                sm = mem.sum_token.expand(2, 1, -1)
                h = model.encode(torch.cat([sm, prev_x[:, -J:], sm], 1), torch.arange(J + 2).expand(2, -1))
                summary = mem.norm_sum(h[:, -1])
                C = torch.stack(cache[-N:], 1)                      # (2, <=N, D), oldest first
                w = torch.softmax((mem.w_q(summary)[:, None] @ mem.w_k(C).transpose(1, 2)) / math.sqrt(32), -1)
                P = w @ C
            sensory = prev_x[:, -K:] if prev_x is not None else torch.zeros(2, K, 32)
            ext = torch.cat([P, sensory, x, P], 1)
            pos = s * S + torch.arange(-1 - K, S + 1).expand(2, -1)
            h = model.encode(ext, pos)
            ref = model.lm_head(model.norm(h[:, 1 + K:1 + K + S])).float()
            out, state = model(tokens[:, s * S:(s + 1) * S], state)
            assert_close(out.logits, ref, msg=f"segment {s}")
            cache.append(mem.norm_mem(h[:, -1]))
            prev_x = x
            st = state.memories[0]
            kept = cache[-N:]
            assert_close(st.cache[:, N - len(kept):], torch.stack(kept, 1), msg=f"cache after segment {s}")
            assert st.valid.sum(1).tolist() == [len(kept)] * 2


def test_predictions_are_causal_within_a_segment():
    """Changing the last token of a segment changes nothing before it (the paper's summary of the
    current segment's first half would), and changes the next segment (through the memory)."""
    model = hmt_model()
    a = torch.randint(0, V, (1, 3 * S))
    b = a.clone()
    b[0, 2 * S - 1] = (a[0, 2 * S - 1] + 1) % V                 # last token of segment 1
    run = lambda t: torch.cat([o for o in _logits(model, t)], 1)  # noqa: E731
    with torch.no_grad():
        ya, yb = run(a), run(b)
    assert torch.equal(ya[:, :2 * S - 1], yb[:, :2 * S - 1])
    assert (ya[:, 2 * S:] - yb[:, 2 * S:]).abs().max() > 1e-4


def _logits(model, tokens):
    state = None
    for s in range(tokens.shape[1] // S):
        out, state = model(tokens[:, s * S:(s + 1) * S], state)
        yield out.logits


def test_recall_picks_the_matching_cached_memory():
    """With W_q = W_k = sharp identity-like maps, recall returns (almost exactly) the cached entry
    most similar to the summary, and never an invalid slot."""
    model = hmt_model()
    mem = model.memory.memories[0]
    D = 32
    with torch.no_grad():
        mem.w_q.weight.copy_(torch.eye(D) * 30)
        mem.w_k.weight.copy_(torch.eye(D))
        st = mem.init_state(2, torch.device("cpu"), torch.float32)
        C = torch.nn.functional.normalize(torch.randn(2, N, D), dim=-1)
        st.cache.copy_(C)
        st.valid[:] = torch.tensor([[True, True], [False, True]])
        summary = C[:, 0] + 0.01 * torch.randn(2, D)
        P = mem._recall(summary, st)
    assert_close(P[0, 0], C[0, 0], dtype=torch.bfloat16)
    assert_close(P[1, 0], C[1, 1])                             # row 1's slot 0 is invalid: only slot 1 remains


def test_without_sensory_memory_one_past_segment_is_a_one_token_rmt():
    """With k = 0 and a single past segment, recall returns that segment's memory embedding (one
    valid cache entry), so HMT computes exactly what RMT with one memory token computes: same
    logits and same gradients for the shared weights (the summary pass gets no gradient: its
    softmax is over one entry)."""
    from memstack.memory.learned.config import RMTConfig

    torch.manual_seed(1)
    bb = BackboneConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, seg_len=S, init_std=0.1)
    hmt = build_model(ModelConfig(bb, (HMTConfig(n_sensory=0, n_summary=J, cache_size=N),)))
    rmt = build_model(ModelConfig(bb, (RMTConfig(n_tokens=1),)))
    with torch.no_grad():
        for p in hmt.parameters():
            p.add_(0.1 * torch.randn_like(p))
    h_mem, r_mem = hmt.memory.memories[0], rmt.memory.memories[0]
    shared = {k: v for k, v in hmt.state_dict().items() if not k.startswith("memory.")}
    rmt.load_state_dict({**rmt.state_dict(), **shared})
    with torch.no_grad():
        r_mem.init_mem.copy_(h_mem.init_mem)
        r_mem.norm.weight.copy_(h_mem.norm_mem.weight)
    tokens = torch.randint(0, V, (3, 2 * S))
    grads, logits = [], []
    for model in (hmt, rmt):
        state, out = None, []
        for s in range(2):
            o, state = model(tokens[:, s * S:(s + 1) * S], state)
            out.append(o.logits)
        out = torch.cat(out, 1)
        out[:, S:].square().mean().backward()                    # a loss on the second segment only
        logits.append(out.detach())
        grads.append({k: p.grad.clone() for k, p in model.named_parameters() if not k.startswith("memory.")})
    assert_close(logits[0], logits[1])
    assert grads[0].keys() == grads[1].keys()
    for k in grads[0]:
        assert_close(grads[0][k], grads[1][k], grad=True, msg=k)
    assert_close(h_mem.init_mem.grad, r_mem.init_mem.grad, grad=True, msg="init_mem")
    assert_close(h_mem.norm_mem.weight.grad, r_mem.norm.weight.grad, grad=True, msg="memory norm")
