"""Fitting the learned KV press's scorer: the future-attention target equals its brute-force
definition, the recording backend attends like the model's own forward, ridge on accumulated
normal equations equals ridge on the rows, the validation choice picks the best lambda, and a
scorer file round-trips and refuses tampering."""
from __future__ import annotations

import pytest
import torch

from memstack.backbone.model import build_model
from memstack.config import BackboneConfig
from memstack.errors import IntegrityError
from memstack.memory.base import Step
from memstack.memory.kv.compress.learned import LearnedScorer, fit_ridge, kv_features, ridge_mse
from memstack.train.kv_scorer import (RecordingAttention, collect, fit, future_max_attention,
                                      reconstruct_max_attention)


def tiny(seed=0):
    torch.manual_seed(seed)
    b = BackboneConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, seg_len=24, init_std=0.3)
    return build_model(b, []).eval()


def test_future_max_attention_equals_definition():
    torch.manual_seed(0)
    p = torch.softmax(torch.randn(2, 4, 12, 12), -1)
    got = future_max_attention(p, 2, horizon=3, n_future=5)
    assert got.shape == (2, 2, 12 - 3 - 5 + 1)
    for b in range(2):
        for h in range(2):
            for j in range(got.shape[2]):
                want = max(float(p[b, qh, i, j]) for qh in (2 * h, 2 * h + 1) for i in range(j + 3, j + 8))
                assert float(got[b, h, j]) == pytest.approx(want)


def test_reconstruct_target_equals_definition_and_reads_twice():
    torch.manual_seed(0)
    p = torch.softmax(torch.randn(1, 4, 10, 10), -1)
    got = reconstruct_max_attention(p, 2)
    for h in range(2):
        for j in range(5):
            want = max(float(p[0, qh, i, j]) for qh in (2 * h, 2 * h + 1) for i in range(5, 10))
            assert float(got[0, h, j]) == pytest.approx(want)
    rec = collect(tiny(), torch.randint(0, 64, (2, 12)), 0, 0, target="reconstruct")    # 24 tokens a window
    assert torch.equal(rec.xtx[..., -1, -1], torch.full((2, 2), 24.0, dtype=torch.float64))   # 2 x 12 keys
    with pytest.raises(ValueError, match="target must be"):
        RecordingAttention(2, 2, 8, 1, 1, target="kvzip")


def test_recording_backend_attends_like_the_model_and_accumulates_rows():
    model = tiny()
    x = torch.randint(0, 64, (2, 24))
    out, _ = model(x, model.init_state(2, x.device), Step())
    rec = RecordingAttention(2, 2, 8, horizon=4, n_future=10)
    got, _ = model(x, model.init_state(2, x.device), Step(), attn=rec)
    torch.testing.assert_close(got.logits, out.logits, rtol=1e-4, atol=1e-4)
    # 2 windows x (24 - 4 - 10 + 1) keys per (layer, head): the bias column counts them
    assert torch.equal(rec.xtx[..., -1, -1], torch.full((2, 2), 22.0, dtype=torch.float64))
    stats = collect(model, x, horizon=4, n_future=10, batch=1)                 # one window at a time: same sums
    torch.testing.assert_close(stats.xtx, rec.xtx)
    torch.testing.assert_close(stats.xty, rec.xty)


def test_ridge_from_normal_equations_equals_rows():
    g = torch.Generator().manual_seed(0)
    X = torch.cat([torch.randn(200, 5, generator=g, dtype=torch.float64), torch.ones(200, 1, dtype=torch.float64)], 1)
    w_true = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0, 0.7], dtype=torch.float64)
    y = X @ w_true + 0.01 * torch.randn(200, generator=g, dtype=torch.float64)
    w = fit_ridge(X.T @ X, X.T @ y, 0.0)
    torch.testing.assert_close(w.double(), w_true, atol=0.01, rtol=0)
    w2 = fit_ridge(X.T @ X, X.T @ y, 0.5)
    pen = torch.diag(torch.tensor([1.0] * 5 + [0.0], dtype=torch.float64))
    direct = torch.linalg.solve(X.T @ X + 0.5 * 200 * pen, X.T @ y)
    torch.testing.assert_close(w2.double(), direct, atol=1e-5, rtol=1e-5)
    mse = ridge_mse(X.T @ X, X.T @ y, y @ y, w2)
    torch.testing.assert_close(mse, ((X @ w2.double() - y) ** 2).mean(), atol=1e-9, rtol=1e-6)


def test_fit_chooses_lambda_on_validation_and_scorer_round_trips(tmp_path):
    model = tiny()
    torch.manual_seed(1)
    tr = collect(model, torch.randint(0, 64, (3, 24)), horizon=4, n_future=10)
    va = collect(model, torch.randint(0, 64, (2, 24)), horizon=4, n_future=10)
    res = fit(tr, va, {"backbone": "tiny"}, lambdas=(1e-3, 1e-1, 10.0))
    assert res.lam == min(res.val_mse, key=res.val_mse.get)
    assert res.n_train == 3 * 11 and res.n_val == 2 * 11
    path = res.scorer.save(tmp_path / "s.safetensors")
    back = LearnedScorer.load(path)
    assert torch.equal(back.weight, res.scorer.weight) and back.meta["lam"] == res.lam
    kv = torch.randn(2, 2, 2, 5, 8)
    torch.testing.assert_close(back.scores(kv), back.scores_reference(kv), rtol=1e-5, atol=1e-5)
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 1                                                                 # one flipped bit in the weights
    path.write_bytes(bytes(raw))
    with pytest.raises(IntegrityError, match="checksum mismatch"):
        LearnedScorer.load(path)
    assert kv_features(kv[:, 0], kv[:, 1]).shape[-1] == 8 // 2 + 8 + 1
