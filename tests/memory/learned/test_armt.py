"""ARMT: DPFP against hand values; the per-layer delta-rule write against the formula applied to
the write tokens' states captured at each block's output; reads against the formula at each
block's input; the first segment equals the plain backbone; fp32 state under a bf16 model."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from memstack.backbone.model import build_model
from memstack.config import BackboneConfig, ModelConfig
from memstack.memory.learned.armt import dpfp
from memstack.memory.learned.config import ARMTConfig
from tolerances import assert_close

S, V, D = 8, 61, 32
BB = BackboneConfig(vocab_size=V, d_model=D, n_layers=2, n_heads=4, n_kv_heads=2, seg_len=S, init_std=0.1)


def armt_model(**kw):
    torch.manual_seed(0)
    model = build_model(ModelConfig(BB, (ARMTConfig(**{"n_tokens": 3, "d_mem": 4, "nu": 2, **kw}),)))
    with torch.no_grad():
        for p in model.memory.parameters():     # off the zero-W_v start, so the memory is used
            p.add_(0.3 * torch.randn_like(p))
    return model.eval()


def test_dpfp_hand_values():
    x = torch.tensor([1.0, -2.0])
    # r = relu([x, -x]) = [1, 0, 0, 2]; nu=1: r * roll(r, 1) = [1*2, 0*1, 0*0, 2*0]
    assert torch.equal(dpfp(x, 1), torch.tensor([2.0, 0.0, 0.0, 0.0]))
    # nu=2 appends r * roll(r, 2) = [1*0, 0*2, 0*1, 2*0]
    assert torch.equal(dpfp(x, 2), torch.tensor([2.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]))
    y = torch.randn(5, 7)
    assert dpfp(y, 3).shape == (5, 42) and (dpfp(y, 3) >= 0).all()


def _capture(model):
    """Record each block's input and output stream."""
    rec = {"in": [], "out": []}
    hooks = []
    for blk in model.blocks:
        hooks.append(blk.attn_norm.register_forward_hook(lambda m, i, o: rec["in"].append(i[0].detach().clone())))
        hooks.append(blk.register_forward_hook(lambda m, i, o: rec["out"].append(o.detach().clone())))
    return rec, hooks


def test_write_and_read_follow_the_formulas():
    model = armt_model()
    mem = model.memory.memories[0]
    eps, m = mem.cfg.eps, mem.cfg.n_tokens
    phi = lambda x: F.normalize(dpfp(x, mem.cfg.nu), dim=-1)  # noqa: E731
    tokens = torch.randint(0, V, (2, 2 * S))
    A = [torch.zeros(2, mem.d_key, D) for _ in range(2)]
    z = [torch.zeros(2, mem.d_key) for _ in range(2)]
    state = None
    for s in range(2):
        rec, hooks = _capture(model)
        with torch.no_grad():
            _, state = model(tokens[:, s * S:(s + 1) * S], state)
        for h in hooks:
            h.remove()
        for l in range(2):
            # the block's input is the previous block's output (or the embeddings) plus the read
            prev = model.tok_emb(torch.cat([tokens[:, s * S:(s + 1) * S]], 1)).detach() if l == 0 else rec["out"][l - 1]
            if l == 0:
                prev = torch.cat([prev, mem.tokens.detach().expand(2, -1, -1)], 1)
            q = phi(mem.w_q[l](prev))
            read = (q @ A[l]) / ((q * z[l][:, None]).sum(-1, keepdim=True) + eps)
            assert_close(rec["in"][l], prev + read, msg=f"read at layer {l}, segment {s}")
            # the write from this block's output at the write slots
            w = rec["out"][l][:, -m:]
            k, v, beta = phi(mem.w_k[l](w)), mem.w_v[l](w), torch.sigmoid(mem.w_b[l](w))[..., 0]
            kz = (k * z[l][:, None]).sum(-1)
            u = v - (k @ A[l]) / (kz + eps)[..., None]
            gamma = (1 - kz / ((k * k).sum(-1) + eps)).clamp(0, 1)
            A[l] = A[l] + torch.einsum("bmk,bmd,bm->bkd", k, u, beta)
            z[l] = z[l] + (gamma[..., None] * k).sum(1)
            assert_close(state.memories[0].A[l], A[l], msg=f"A at layer {l}, segment {s}")
            assert_close(state.memories[0].z[l], z[l], msg=f"z at layer {l}, segment {s}")
    assert (A[1].abs() > 0).any() and (z[1] > 0).any()


def test_first_segment_equals_the_backbone_and_later_ones_differ():
    model = armt_model()
    plain = build_model(ModelConfig(BB, ())).eval()
    plain.load_state_dict(model.state_dict(), strict=False)
    tokens = torch.randint(0, V, (2, 2 * S))
    with torch.no_grad():
        out0, state = model(tokens[:, :S])
        out1, _ = model(tokens[:, S:], state)
        assert_close(out0.logits, plain(tokens[:, :S])[0].logits)          # an empty memory reads 0
        assert (out1.logits - plain(tokens[:, S:])[0].logits).abs().max() > 1e-4


def test_state_is_fp32_under_a_bf16_model():
    model = armt_model().to(torch.bfloat16)
    tokens = torch.randint(0, V, (2, S))
    with torch.no_grad():
        state = None
        for _ in range(3):
            out, state = model(tokens, state)
    assert all(a.dtype == torch.float32 and torch.isfinite(a).all() for a in state.memories[0].A)
    assert out.logits.dtype == torch.float32 and torch.isfinite(out.logits).all()
    spec = model.memory.memories[0].spec(torch.bfloat16)
    assert spec.state_bytes(0) == sum(t.numel() * 4 for t in state.memories[0].A + state.memories[0].z) // 2
