"""Trellis op: the chunked write against the per-token reference (forward and backward, awkward
sizes, masks, NaN-poisoned allocations), the reference against hand-computed values, and the
update's stability over thousands of segments."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from memstack.ops import trellis as trellis_ops
from memstack.ops.trellis import address, trellis_read_ref, trellis_write, trellis_write_chunked, trellis_write_ref
from tolerances import assert_close, tol


def inputs(B, H, m, d, T, mask_p=0.0, alpha_max=0.5):
    K0 = torch.randn(B, H, m, d)
    V0 = torch.randn(B, H, m, d)
    k, v = torch.randn(B, H, T, d), torch.randn(B, H, T, d)
    alpha, theta = torch.rand(B, H, T) * alpha_max, torch.rand(B, H, T)
    mask = (torch.rand(B, T) >= mask_p) if mask_p else None
    return K0, V0, k, v, alpha, theta, mask


def _fwd_bwd(fn, leaves, mask, gK, gV, dtype, **kw):
    xs = [t.detach().to(dtype).requires_grad_() for t in leaves]
    K, V = fn(*xs, mask, **kw)
    grads = torch.autograd.grad((K * gK.to(dtype)).sum() + (V * gV.to(dtype)).sum(), xs)
    return [K, V, *grads]


NAMES = ["K", "V", "dK0", "dV0", "dk", "dv", "dalpha", "dtheta"]


@pytest.mark.parametrize("T,chunk", [(1, 64), (7, 1), (7, 3), (37, 1), (37, 16), (64, 64), (70, 32)])
@pytest.mark.parametrize("m,d", [(1, 2), (5, 8), (16, 6)])
@pytest.mark.parametrize("masked", [False, True])
def test_chunked_matches_reference_fwd_bwd(T, chunk, m, d, masked, poison_empty):
    """In float64 the two paths agree to the fp64 tolerance: the chunkwise algebra is exact."""
    K0, V0, k, v, alpha, theta, mask = inputs(2, 3, m, d, T, mask_p=0.3 if masked else 0.0)
    gK, gV = torch.randn(2, 3, m, d), torch.randn(2, 3, m, d)
    leaves = (K0, V0, k, v, alpha, theta)
    got = _fwd_bwd(trellis_write_chunked, leaves, mask, gK, gV, torch.float64, chunk=chunk)
    ref = _fwd_bwd(trellis_write_ref, leaves, mask, gK, gV, torch.float64, chunk=chunk)
    for name, a, b in zip(NAMES, got, ref):
        assert torch.isfinite(a).all(), name
        assert_close(a, b, msg=name)


@pytest.mark.parametrize("T,chunk", [(13, 1), (64, 16), (100, 32)])
def test_chunked_fp32_no_less_accurate_than_reference(T, chunk, poison_empty):
    """The strict check is the fp64 one above (the algebra is exact). In float32 the recurrence
    amplifies rounding over many tokens -- the reference's own fp32 gradients are off by up to
    ~1e-3 relative at T = 200 -- and the two paths round differently, so each fp32 result is one
    sample of that amplified noise. Both are measured against the fp64 result: the fast path's
    error must stay within 2x (the reference's error + the fp32 table tolerance); the worst ratio
    measured over 75 seeded trials was 0.42."""
    K0, V0, k, v, alpha, theta, mask = inputs(2, 3, 6, 8, T, mask_p=0.2)
    gK, gV = torch.randn(2, 3, 6, 8), torch.randn(2, 3, 6, 8)
    leaves = (K0, V0, k, v, alpha, theta)
    truth = _fwd_bwd(trellis_write_ref, leaves, mask, gK, gV, torch.float64, chunk=chunk)
    fast = _fwd_bwd(trellis_write_chunked, leaves, mask, gK, gV, torch.float32, chunk=chunk)
    ref = _fwd_bwd(trellis_write_ref, leaves, mask, gK, gV, torch.float32, chunk=chunk)
    for name, f, r, t in zip(NAMES, fast, ref, truth):
        assert f.dtype == torch.float32 and torch.isfinite(f).all(), name
        err_f, err_r = (f.double() - t).abs().max().item(), (r.double() - t).abs().max().item()
        scale = t.abs().max().item()
        t32 = tol(torch.float32)
        assert err_f <= 2 * (err_r + t32["atol"] + t32["rtol"] * scale), (name, err_f, err_r, scale)


@pytest.mark.parametrize("chunk", [1, 3])
def test_masked_tokens_are_skipped(chunk):
    """Skipped tokens leave the write as if they were not there, chunk grouping included (a
    reset's invalidated window entries must not shift the chunks of a fresh document)."""
    K0, V0, k, v, alpha, theta, _ = inputs(2, 2, 4, 6, 9)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[0, 3], mask[1, [0, 1, 8]] = False, False
    K, V = trellis_write_ref(K0, V0, k, v, alpha, theta, mask, chunk=chunk)
    for row, keep in enumerate(mask):
        Kr, Vr = trellis_write_ref(K0[row:row + 1], V0[row:row + 1], k[row:row + 1, :, keep], v[row:row + 1, :, keep],
                                   alpha[row:row + 1, :, keep], theta[row:row + 1, :, keep], chunk=chunk)
        assert_close(K[row:row + 1], Kr)
        assert_close(V[row:row + 1], Vr)


def test_one_step_by_hand():
    """m = 2 slots, d = 2: every quantity written out."""
    K0 = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    V0 = torch.tensor([[0.5, -1.0], [1.0, 1.0]])
    k, v = torch.tensor([2.0, 1.0]), torch.tensor([3.0, -2.0])
    al, th = 0.1, 0.4
    silu = lambda x: x / (1 + math.exp(-x))  # noqa: E731
    s = [(1 * 2 + 0 * 1) / math.sqrt(2), (0 * 2 + 2 * 1) / math.sqrt(2)]
    a = [silu(x) for x in s]
    n = max(math.sqrt(a[0] ** 2 + a[1] ** 2), 1e-6)
    a = [x / n for x in a]
    rec = [a[0] * K0[0, c].item() + a[1] * K0[1, c].item() for c in range(2)]        # K^T a
    K1 = [[(1 - al) * K0[i, c].item() + th * a[i] * (k[c].item() - rec[c]) for c in range(2)] for i in range(2)]
    s2 = [(K1[i][0] * 2 + K1[i][1] * 1) / math.sqrt(2) for i in range(2)]
    b = [silu(x) for x in s2]
    n2 = max(math.sqrt(b[0] ** 2 + b[1] ** 2), 1e-6)
    b = [x / n2 for x in b]
    recv = [b[0] * V0[0, c].item() + b[1] * V0[1, c].item() for c in range(2)]
    V1 = [[(1 - al) * V0[i, c].item() + th * b[i] * (v[c].item() - recv[c]) for c in range(2)] for i in range(2)]
    K, V = trellis_write_ref(K0[None, None], V0[None, None], k[None, None, None], v[None, None, None],
                             torch.tensor([[[al]]]), torch.tensor([[[th]]]))
    assert_close(K[0, 0], torch.tensor(K1))
    assert_close(V[0, 0], torch.tensor(V1))


def test_read_by_hand_and_gqa():
    B, Hkv, G, m, d, T = 2, 2, 3, 5, 4, 6
    K, V = torch.randn(B, Hkv, m, d), torch.randn(B, Hkv, m, d)
    q = torch.randn(B, Hkv * G, T, d)
    out = trellis_read_ref(K, V, q)
    for h in range(Hkv * G):
        g = h // G                                                 # query head h reads KV head h // G
        s = q[:, h] @ K[:, g].transpose(-1, -2) / math.sqrt(d)     # (B, T, m)
        w = F.silu(s)
        w = w / w.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        assert_close(out[:, h], w @ V[:, g])


def test_address_has_unit_norm_and_zero_memory_gives_zero():
    K, x = torch.randn(3, 7, 5), torch.randn(3, 4, 5)
    assert_close(address(K, x).norm(dim=-1), torch.ones(3, 4), dtype=torch.float32)
    assert torch.equal(address(torch.zeros(3, 7, 5), x), torch.zeros(3, 4, 7))


def test_dispatch_and_set_impl():
    K0, V0, k, v, alpha, theta, _ = inputs(1, 1, 3, 4, 5)
    trellis_ops.set_impl("reference")
    try:
        a = trellis_write(K0, V0, k, v, alpha, theta)
    finally:
        trellis_ops.set_impl(None)
    b = trellis_write(K0, V0, k, v, alpha, theta)
    assert_close(a[0], b[0])
    assert_close(a[1], b[1])
    with pytest.raises(ValueError, match="valid"):
        trellis_ops.set_impl("triton")


def _run_segments(n_seg: int, T: int, B: int = 2, H: int = 2, m: int = 8, d: int = 8):
    """n_seg segments of T tokens with heavy-tailed keys/values spanning 5 orders of magnitude and
    gates alternating between the edges of their range (no forgetting, full steps) and random."""
    K, V = torch.randn(B, H, m, d), torch.zeros(B, H, m, d)
    vmax = kmax = 0.0
    norms = []
    for s in range(n_seg):
        k = torch.randn(B, H, T, d) * 10.0 ** torch.randint(-2, 3, (1,)).item()
        v = torch.distributions.StudentT(2.0).sample((B, H, T, d)).clamp(-1e3, 1e3)
        if s % 2:
            alpha, theta = torch.full((B, H, T), 1e-6), torch.full((B, H, T), 1 - 1e-6)
        else:
            alpha, theta = torch.rand(B, H, T), torch.rand(B, H, T)
        K, V = trellis_write_chunked(K, V, k, v, alpha, theta, chunk=1 + s % 3)
        kmax, vmax = max(kmax, k.abs().max().item()), max(vmax, v.abs().max().item())
        norms.append(V.norm().item())
    assert torch.isfinite(K).all() and torch.isfinite(V).all()
    # bounded by the largest input seen (no growth), and no drift late in the run
    assert K.norm(dim=-1).max() <= 10 * math.sqrt(d) * kmax
    assert V.norm(dim=-1).max() <= math.sqrt(d) * vmax * math.sqrt(m)
    tail = n_seg // 6
    assert max(norms[-tail:]) <= 2 * max(norms[:-tail])


def test_stable_over_thousands_of_segments():
    _run_segments(2000, 4)


@pytest.mark.slow
def test_stable_over_many_long_segments():
    _run_segments(10000, 16)
