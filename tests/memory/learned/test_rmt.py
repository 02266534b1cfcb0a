"""RMT: the mechanism against a by-hand forward of [memory; segment; memory], and truncated
backprop-through-time that really truncates through RMT's carried memory (the public code's `k2`
is a silent no-op on its default branch)."""
from __future__ import annotations

import pytest
import torch

from memstack.backbone.model import build_model
from memstack.config import BackboneConfig, ModelConfig
from memstack.data.packing import IGNORE, Batch
from memstack.memory.base import Step
from memstack.memory.learned.config import RMTConfig
from memstack.memory.state import detach
from memstack.train.segments import SegmentLoop
from tolerances import assert_close

S, V, M = 8, 61, 3


def rmt_model(n_tokens=M, seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(BackboneConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, seg_len=S,
                                     init_std=0.1), (RMTConfig(n_tokens=n_tokens),))
    model = build_model(cfg)
    with torch.no_grad():   # a non-trivial norm gain, so the test sees it applied
        model.memory.memories[0].norm.weight.uniform_(0.5, 1.5)
    return model


def test_segment_equals_a_by_hand_pass_over_memory_segment_memory():
    """Logits = the plain backbone over [mem; x; mem] at positions pos-m .. pos+T+m-1; the next
    memory = norm(final states at the write slots); the first segment reads the initial memory."""
    model = rmt_model().eval()
    mem_mod = model.memory.memories[0]
    tokens = torch.randint(0, V, (2, 2 * S))
    with torch.no_grad():
        state, mem = None, mem_mod.init_mem.expand(2, -1, -1)
        for s in range(2):
            x = model.tok_emb(tokens[:, s * S:(s + 1) * S])
            pos = s * S + torch.arange(-M, S + M).expand(2, -1)
            h = model.encode(torch.cat([mem, x, mem], 1), pos)                  # (2, M+S+M, D)
            ref_logits = model.lm_head(model.norm(h[:, M:M + S])).float()
            out, state = model(tokens[:, s * S:(s + 1) * S], state)
            assert_close(out.logits, ref_logits)
            mem = mem_mod.norm(h[:, -M:])
            assert_close(state.memories[0].mem, mem)
            assert not state.memories[0].fresh.any()


def test_memory_carries_information_and_reset_cuts_it():
    model = rmt_model().eval()
    a = torch.randint(0, V, (1, 3 * S))
    b = a.clone()
    b[:, :S] = torch.randint(0, V, (1, S))          # only segment 0 differs
    run = lambda t, reset_at=None: torch.cat(list(_segments(model, t, reset_at)), 1)  # noqa: E731
    with torch.no_grad():
        ya, yb = run(a), run(b)
        za, zb = run(a, reset_at=2), run(b, reset_at=2)
    assert (ya[:, 2 * S:] - yb[:, 2 * S:]).abs().max() > 1e-4   # segment 2 sees segment 0 through the memory
    assert torch.equal(za[:, 2 * S:], zb[:, 2 * S:])           # ... unless the document restarts there


def _segments(model, tokens, reset_at=None):
    state = None
    for s in range(tokens.shape[1] // S):
        reset = torch.tensor([s == reset_at]) if reset_at is not None else None
        out, state = model(tokens[:, s * S:(s + 1) * S], state, Step(reset=reset))
        yield out.logits


# ----------------------------------------------------------------------------- BPTT through RMT

N_SEG, B = 4, 2


def _batch():
    tokens = torch.randint(0, V, (B, N_SEG, S))
    targets = torch.full((B, N_SEG, S), IGNORE)
    targets[:, -1] = torch.randint(0, V, (B, S))                   # the loss sits on the last segment only
    reset = torch.zeros(B, N_SEG, dtype=torch.bool)
    reset[:, 0] = True
    return Batch(tokens, targets, reset)


def _grads(model, batch, policy, k):
    """d loss / d (token embeddings) of each segment, and d loss / d parameters."""
    captured = []
    hook = model.tok_emb.register_forward_hook(lambda m, i, o: (o.retain_grad(), captured.append(o)) and None)
    try:
        model.zero_grad(set_to_none=True)
        loss, _, _ = SegmentLoop(model)(batch, model.init_state(B), policy, k, 1.0 / batch.n_targets)
        loss.backward()
    finally:
        hook.remove()
    return [c.grad for c in captured], {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _reached(grads):
    return {n for n, g in enumerate(grads) if g is not None and bool((g != 0).any())}


@pytest.mark.parametrize("policy,k,reached", [
    ("full", 1, {0, 1, 2, 3}), ("truncated", 2, {2, 3}), ("truncated", 3, {3}), ("truncated", 4, {0, 1, 2, 3}),
    ("detached", 1, {3}),
])
def test_truncation_really_truncates_through_rmt_memory(policy, k, reached):
    model = rmt_model()
    grads, _ = _grads(model, _batch(), policy, k)
    assert _reached(grads) == reached
    for n in set(range(N_SEG)) - reached:
        assert grads[n] is None or not grads[n].any()


def test_truncated_gradient_equals_a_run_started_from_the_detached_memory():
    """truncated k=2 over 4 segments = backprop through segments 2-3 only, starting from the memory
    that segments 0-1 wrote, detached: the same parameter gradients, to fp32 tolerance."""
    model = rmt_model()
    batch = _batch()
    _, g_trunc = _grads(model, batch, "truncated", 2)
    # by hand: run segments 0-1 without gradient, then 2-3 with it
    model.zero_grad(set_to_none=True)
    state = model.init_state(B)
    with torch.no_grad():
        for n in range(2):
            _, state = model(batch.tokens[:, n], state, Step(reset=batch.reset[:, n]))
    state = detach(state)
    loss = 0.0
    for n in range(2, N_SEG):
        out, state = model(batch.tokens[:, n], state, Step(reset=batch.reset[:, n]))
        loss = loss + torch.nn.functional.cross_entropy(out.logits.reshape(-1, V), batch.targets[:, n].reshape(-1),
                                                        ignore_index=IGNORE, reduction="sum")
    (loss / batch.n_targets).backward()
    for name, p in model.named_parameters():
        if name in g_trunc:
            assert_close(p.grad, g_trunc[name], grad=True, msg=name)
    # and full BPTT differs (the cut is not a no-op)
    _, g_full = _grads(model, batch, "full", 1)
    diff = max((g_full[n] - g_trunc[n]).abs().max().item() for n in g_trunc)
    assert diff > 1e-6
