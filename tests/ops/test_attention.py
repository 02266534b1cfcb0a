"""Attention op: the SDPA fast path against the plain reference, forward and backward.

Contract: q (B,H,T,D), k/v (B,Hkv,S,D), mask (B,T,S) bool (True = may attend) or None = causal
(T == S). GQA/MQA must never materialise the KV heads repeated to (B,H,S,D).
"""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from memstack.ops import attention as attn_mod
from memstack.ops.attention import attention, attention_ref, attention_sdpa, set_impl
from tolerances import assert_close

# (n_heads, kv_heads, head_dim): MHA, GQA 6/2, GQA 8/4, MQA
HEADS = [(4, 4, 16), (6, 2, 8), (8, 4, 16), (4, 1, 8)]
HEAD_IDS = ["mha", "gqa6-2", "gqa8-4", "mqa"]


@pytest.fixture(autouse=True)
def _default_impl():
    set_impl(None)
    yield
    set_impl(None)


def random_mask(B: int, T: int, S: int) -> torch.Tensor:
    """A random validity pattern (B,T,S) in which every query row sees at least one key."""
    mask = torch.rand(B, T, S) < 0.4
    mask[torch.arange(B)[:, None], torch.arange(T)[None], torch.randint(0, S, (B, T))] = True
    assert mask.any(-1).all()
    return mask


def make_inputs(B, H, Hkv, T, S, D, dtype=torch.float32, layout="contiguous"):
    if layout == "contiguous":
        q, k, v = torch.randn(B, H, T, D), torch.randn(B, Hkv, S, D), torch.randn(B, Hkv, S, D)
    else:  # what the model passes: (B, T, H, D) projections viewed as (B, H, T, D)
        q = torch.randn(B, T, H, D).transpose(1, 2)
        k, v = torch.randn(B, S, Hkv, D).transpose(1, 2), torch.randn(B, S, Hkv, D).transpose(1, 2)
    return [t.to(dtype).requires_grad_() for t in (q, k, v)]


def fwd_bwd(fn, q, k, v, mask, grad_out):
    out = fn(q, k, v, mask)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    return out, grads


# ----------------------------------------------------------------------------- values

@pytest.mark.parametrize("H,Hkv,D", HEADS, ids=HEAD_IDS)
@pytest.mark.parametrize("T", [1, 7, 63])
@pytest.mark.parametrize("masking", ["causal", "mask_S=T", "mask_S=T+13"])
def test_sdpa_matches_reference_fwd_bwd(H, Hkv, D, T, masking, poison_empty):
    B = 2
    S = T + 13 if masking == "mask_S=T+13" else T
    mask = None if masking == "causal" else random_mask(B, T, S)
    q, k, v = make_inputs(B, H, Hkv, T, S, D)
    grad_out = torch.randn(B, H, T, D)
    out, (dq, dk, dv) = fwd_bwd(attention_sdpa, q, k, v, mask, grad_out)
    ref, (rq, rk, rv) = fwd_bwd(attention_ref, q, k, v, mask, grad_out)
    assert out.shape == (B, H, T, D) and dk.shape == k.shape and dv.shape == v.shape
    for name, a, b in [("out", out, ref), ("dq", dq, rq), ("dk", dk, rk), ("dv", dv, rv)]:
        assert torch.isfinite(a).all(), name
        assert_close(a, b, msg=name)


@pytest.mark.parametrize("H,Hkv,D", HEADS, ids=HEAD_IDS)
@pytest.mark.parametrize("masked", [False, True])
def test_sdpa_non_contiguous_inputs(H, Hkv, D, masked, poison_empty):
    """The model hands in transposed (non-contiguous) projections."""
    B, T = 3, 11
    S = T + 5 if masked else T
    mask = random_mask(B, T, S) if masked else None
    q, k, v = make_inputs(B, H, Hkv, T, S, D, layout="transposed")
    assert not q.is_contiguous()
    grad_out = torch.randn(B, H, T, D)
    out, grads = fwd_bwd(attention_sdpa, q, k, v, mask, grad_out)
    ref, rgrads = fwd_bwd(attention_ref, q, k, v, mask, grad_out)
    assert_close(out, ref)
    for a, b in zip(grads, rgrads):
        assert_close(a, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("H,Hkv,D", [(4, 4, 16), (6, 2, 8), (4, 1, 8)], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("masked", [False, True])
def test_sdpa_low_precision_vs_fp32_reference(dtype, H, Hkv, D, masked):
    """Low-precision fast path against the fp32 reference on the *same* (rounded) inputs."""
    B, T = 2, 9
    S = T + 13 if masked else T
    mask = random_mask(B, T, S) if masked else None
    q, k, v = make_inputs(B, H, Hkv, T, S, D, dtype=dtype)
    grad_out = torch.randn(B, H, T, D).to(dtype)
    out, grads = fwd_bwd(attention_sdpa, q, k, v, mask, grad_out)
    assert out.dtype == dtype
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref, rgrads = fwd_bwd(attention_ref, q32, k32, v32, mask, grad_out.float())
    assert_close(out, ref, dtype=dtype, msg="out")
    for name, a, b in zip(("dq", "dk", "dv"), grads, rgrads):
        assert_close(a, b, dtype=dtype, msg=name, grad=True)


def test_reference_values_by_hand():
    """The reference itself against a hand computation: one query, two keys, known weights."""
    D = 4
    q = torch.zeros(1, 1, 2, D)
    q[0, 0, 1, 0] = 2.0                               # query 1 scores key 0 at 2*1/sqrt(4) = 1
    k = torch.zeros(1, 1, 2, D)
    k[0, 0, 0, 0] = 1.0
    v = torch.tensor([[[[1.0, 0, 0, 0], [0, 1.0, 0, 0]]]])
    out = attention_ref(q, k, v)                      # causal
    torch.testing.assert_close(out[0, 0, 0], v[0, 0, 0])          # query 0 sees only key 0
    p0 = torch.e / (torch.e + 1)                      # softmax([1, 0])
    torch.testing.assert_close(out[0, 0, 1], torch.tensor([p0, 1 - p0, 0, 0]))
    for fn in (attention_ref, attention_sdpa):        # an explicit mask hiding key 0 from query 1
        mask = torch.tensor([[[True, False], [False, True]]])
        torch.testing.assert_close(fn(q, k, v, mask)[0, 0], v[0, 0])


def test_gqa_head_grouping_is_kv_major():
    """Query head h reads KV head h // (H / Hkv) (the Llama / HF convention), in both impls."""
    B, H, Hkv, T, D = 1, 6, 2, 5, 8
    q = torch.randn(B, H, T, D)
    k, v = torch.randn(B, Hkv, T, D), torch.randn(B, Hkv, T, D)
    for fn in (attention_ref, attention_sdpa):
        out = fn(q, k, v)
        for h in range(H):
            single = attention_ref(q[:, h:h + 1], k[:, h // 3: h // 3 + 1], v[:, h // 3: h // 3 + 1])
            assert_close(out[:, h:h + 1], single)


# ----------------------------------------------------------------------------- no repeated KV heads

def _tensors(x):
    return [t for t in tree_flatten(x)[0] if isinstance(t, torch.Tensor)]


class Watch(TorchDispatchMode):
    """Records every op's outputs; tracks which tensors derive from K/V only (not from q)."""

    def __init__(self, q, k, v):
        super().__init__()
        self.kv_only, self.from_q = {id(k), id(v)}, {id(q)}
        self.keep = [q, k, v]      # keep ids alive so they are not recycled
        self.outputs: list[tuple[str, tuple[int, ...], int, bool]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        ins = _tensors((args, kwargs))
        has_kv = any(id(t) in self.kv_only for t in ins)
        has_q = any(id(t) in self.from_q for t in ins)
        for t in _tensors(out):
            self.keep.append(t)
            kv_only = has_kv and not has_q
            if kv_only:
                self.kv_only.add(id(t))
            if has_q:
                self.from_q.add(id(t))
            self.outputs.append((str(func), tuple(t.shape), t.untyped_storage().nbytes(), kv_only))
        return out


def _run_watched(fn, q, k, v, mask, backward: bool) -> Watch:
    with Watch(q, k, v) as w:
        out = fn(q, k, v, mask)
        if backward:
            out.backward(torch.ones_like(out))
    return w


@pytest.mark.parametrize("H,Hkv,D,T", [(6, 2, 8, 5), (8, 4, 16, 3), (8, 1, 16, 3), (4, 1, 8, 7)])
def test_gqa_never_builds_repeated_kv_masked(H, Hkv, D, T):
    """With S != T no allocation as large as a repeated K/V (B*H*S*D elements) may be made,
    forward or backward. The same watch catches the reference, which does repeat the heads."""
    B, S = 2, T + 13
    forbidden = B * H * S * D
    mask = random_mask(B, T, S)
    q, k, v = make_inputs(B, H, Hkv, T, S, D)
    w = _run_watched(attention_sdpa, q, k, v, mask, backward=True)
    assert any("backward" in op for op, *_ in w.outputs), "backward ops were not observed"
    # storage, not shape: a broadcast view of K (expand) allocates nothing and is allowed
    big = [(op, shape) for op, shape, nbytes, _ in w.outputs if nbytes >= forbidden * q.element_size()]
    assert not big, f"fast path built tensors as large as repeated K/V {(B, H, S, D)}: {big}"
    # the watch is not vacuous: the reference repeats K/V and is caught
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    w_ref = _run_watched(attention_ref, q2, k2, v2, mask, backward=True)
    assert any(nbytes >= forbidden * q.element_size() for _, _, nbytes, _ in w_ref.outputs)


@pytest.mark.parametrize("H,Hkv,D,T", [(6, 2, 8, 9), (8, 1, 16, 4)])
def test_gqa_never_builds_repeated_kv_causal(H, Hkv, D, T):
    """Causal (T == S, so q-shaped tensors have the repeated-K shape): no tensor derived from K/V
    alone may own more storage than K itself."""
    B = 2
    q, k, v = make_inputs(B, H, Hkv, T, T, D)
    limit = max(k.untyped_storage().nbytes(), v.untyped_storage().nbytes())
    w = _run_watched(attention_sdpa, q, k, v, None, backward=False)
    big = [(op, shape) for op, shape, nbytes, kv_only in w.outputs if kv_only and nbytes > limit]
    assert not big, f"fast path materialised repeated K/V heads: {big}"
    w_ref = _run_watched(attention_ref, *(t.detach().clone() for t in (q, k, v)), None, backward=False)
    assert any(kv_only and nbytes > limit for _, _, nbytes, kv_only in w_ref.outputs)


# ----------------------------------------------------------------------------- dispatch

class OpNames(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def _uses_sdpa(q, k, v) -> bool:
    with OpNames() as rec:
        attention(q, k, v)
    return any("scaled_dot_product" in n for n in rec.names)


def test_set_impl_switches_and_rejects_unknown_names():
    q, k, v = (t.detach() for t in make_inputs(2, 6, 2, 7, 7, 8))
    assert _uses_sdpa(q, k, v)                                    # default: SDPA
    set_impl("reference")
    assert not _uses_sdpa(q, k, v)
    assert torch.equal(attention(q, k, v), attention_ref(q, k, v))
    with pytest.raises(ValueError, match=r"unknown attention impl 'flash'.*reference.*sdpa"):
        set_impl("flash")
    assert not _uses_sdpa(q, k, v), "a rejected name must leave the current choice alone"
    set_impl("sdpa")
    assert _uses_sdpa(q, k, v)
    assert torch.equal(attention(q, k, v), attention_sdpa(q, k, v))
    set_impl(None)
    assert _uses_sdpa(q, k, v) and attn_mod._override is None


def test_poison_fixture_poisons(poison_empty):
    before = poison_empty.count
    a, b = torch.empty(4), torch.zeros(3).new_empty(2, 2)
    c, d = torch.empty_like(a), torch.empty(3, dtype=torch.bool)
    assert torch.isnan(a).all() and torch.isnan(b).all() and torch.isnan(c).all() and d.all()
    assert poison_empty.count - before == 4


@pytest.mark.parametrize("fn", [attention_ref, attention_sdpa], ids=["reference", "sdpa"])
@pytest.mark.parametrize("H,Hkv", [(4, 4), (6, 2)], ids=["mha", "gqa"])
def test_causal_without_mask_needs_T_equal_S(fn, H, Hkv):
    """mask=None means causal over the chunk itself, so T must equal S. Both implementations
    must refuse T != S rather than silently pick an alignment (they would disagree)."""
    q = torch.randn(1, H, 3, 8)
    k, v = torch.randn(1, Hkv, 5, 8), torch.randn(1, Hkv, 5, 8)
    with pytest.raises((ValueError, AssertionError), match="T == S"):
        fn(q, k, v)
