"""BPTT policies of the segment loop: the `detach_before` truth table, and which segments a
loss on the last segment actually reaches through a recurrent memory whose state carries
gradient (tests/train/toy_memory.py)."""
from __future__ import annotations

import pytest
import torch

from memstack.backbone.model import build_model
from memstack.config import BackboneConfig, ModelConfig
from memstack.data.packing import IGNORE, Batch
from memstack.train.segments import SegmentLoop, detach_before

from .toy_memory import RECURRENT, ToyRecurrentConfig, register

N_SEG, S, B, V = 4, 6, 2, 61


# ----------------------------------------------------------------------------- truth table

@pytest.mark.parametrize("n", range(8))
def test_detach_before_full_detaches_only_the_incoming_state(n):
    assert detach_before(n, "full", 1) is (n == 0)
    assert detach_before(n, "full", 3) is (n == 0)   # k is ignored by "full"


@pytest.mark.parametrize("n", range(8))
def test_detach_before_detached_always(n):
    assert detach_before(n, "detached", 1) is True
    assert detach_before(n, "detached", 5) is True   # k is ignored by "detached"


@pytest.mark.parametrize("k, expected", [
    (1, [True] * 8),
    (2, [True, False, True, False, True, False, True, False]),
    (3, [True, False, False, True, False, False, True, False]),
    (4, [True, False, False, False, True, False, False, False]),
    (9, [True] + [False] * 7),
])
def test_detach_before_truncated_every_k(k, expected):
    assert [detach_before(n, "truncated", k) for n in range(8)] == expected


def test_truncated_k1_equals_detached_and_large_k_equals_full():
    for n in range(10):
        assert detach_before(n, "truncated", 1) == detach_before(n, "detached", 7)
        assert detach_before(n, "truncated", 100) == detach_before(n, "full", 1)


def test_detach_before_unknown_policy_lists_valid_ones():
    with pytest.raises(ValueError, match="full, truncated, detached"):
        detach_before(1, "sometimes", 2)


# ----------------------------------------------------------------------------- gradient reach

@pytest.fixture
def toy_model():
    remove = register(RECURRENT)
    try:
        cfg = ModelConfig(BackboneConfig(vocab_size=V, d_model=16, n_layers=2, n_heads=2, seg_len=S, init_std=0.2),
                          (ToyRecurrentConfig(),))
        yield build_model(cfg)
    finally:
        remove()


def _batch(reset_at=(0,)) -> Batch:
    tokens = torch.randint(0, V, (B, N_SEG, S))
    targets = torch.full((B, N_SEG, S), IGNORE)
    targets[:, -1] = torch.randint(0, V, (B, S))                 # a loss on the last segment only
    reset = torch.zeros(B, N_SEG, dtype=torch.bool)
    reset[:, list(reset_at)] = True
    return Batch(tokens, targets, reset)


def _segment_grads(model, batch: Batch, policy: str, k: int) -> list[torch.Tensor | None]:
    """Run SegmentLoop, backprop its loss; return d loss / d (token embeddings) per segment."""
    captured = []

    def hook(mod, inp, out):
        out.retain_grad()
        captured.append(out)

    handle = model.tok_emb.register_forward_hook(hook)
    try:
        loop = SegmentLoop(model)
        state = model.init_state(B)
        loss, total, _ = loop(batch, state, policy, k, 1.0 / batch.n_targets)
        loss.backward()
    finally:
        handle.remove()
    assert len(captured) == N_SEG
    assert torch.isfinite(loss) and float(total) > 0
    return [c.grad for c in captured]


def _reached(grads) -> set[int]:
    return {n for n, g in enumerate(grads) if g is not None and bool((g != 0).any())}


@pytest.mark.parametrize("policy, k, reached", [
    ("full", 1, {0, 1, 2, 3}),
    ("full", 2, {0, 1, 2, 3}),
    ("truncated", 2, {2, 3}),        # detached entering 0 and 2
    ("truncated", 3, {3}),           # detached entering 0 and 3
    ("truncated", 4, {0, 1, 2, 3}),  # detached entering 0 only: the whole step
    ("truncated", 1, {3}),
    ("detached", 1, {3}),
])
def test_loss_on_last_segment_reaches_exactly_the_policy_window(toy_model, policy, k, reached):
    grads = _segment_grads(toy_model, _batch(), policy, k)
    assert _reached(grads) == reached
    for n in set(range(N_SEG)) - reached:   # cut off: no gradient at all (None or exactly zero)
        assert grads[n] is None or torch.equal(grads[n], torch.zeros_like(grads[n]))
    for n in reached:                        # every row of a reached segment gets gradient
        assert (grads[n].abs().sum(dim=(1, 2)) > 0).all()


def test_document_reset_cuts_gradient_even_under_full_bptt(toy_model):
    """A row that starts a new document at segment 2 must not send gradient into segments 0-1."""
    grads = _segment_grads(toy_model, _batch(reset_at=(0, 2)), "full", 1)
    assert _reached(grads) == {2, 3}
    for n in (0, 1):
        assert grads[n] is None or torch.equal(grads[n], torch.zeros_like(grads[n]))


def test_state_carried_out_of_a_step_is_detached_at_the_next_step(toy_model):
    """The loop detaches the state entering segment 0 under every policy (the step boundary)."""
    loop = SegmentLoop(toy_model)
    b = _batch()
    b = Batch(b.tokens, b.targets, torch.zeros_like(b.reset))   # no reset: the state is carried in
    src = toy_model.init_state(B)
    mem0 = torch.randn(B, 16, requires_grad=True)
    state = type(src)(src.pos, (type(src.memories[0])(mem0 * 2),))
    loss, _, out_state = loop(b, state, "full", 1, 1.0)
    loss.backward()
    assert mem0.grad is None                           # nothing flowed into the previous step
    assert out_state.memories[0].mem.requires_grad     # ... but the returned state still has its graph


def test_segment_loop_loss_is_sum_of_token_losses_times_scale(toy_model):
    b = _batch()
    scale = 0.37
    loss, total, _ = SegmentLoop(toy_model)(b, toy_model.init_state(B), "detached", 1, scale)
    # by hand: the same segments, same resets, same state threading
    state, ref = toy_model.init_state(B), torch.zeros(())
    from memstack.memory.base import Step
    for n in range(N_SEG):
        out, state = toy_model(b.tokens[:, n], state, Step(reset=b.reset[:, n]))
        ref = ref + torch.nn.functional.cross_entropy(out.logits.reshape(-1, V), b.targets[:, n].reshape(-1),
                                                      ignore_index=IGNORE, reduction="sum")
    torch.testing.assert_close(total, ref.detach(), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(loss.detach(), ref.detach() * scale, rtol=1e-6, atol=1e-5)
    assert not total.requires_grad and loss.requires_grad
