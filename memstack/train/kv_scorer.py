"""Fit the learned KV press's scorer (memory/kv/compress/learned.py) on a frozen model.

    python -m memstack.train.kv_scorer --pretrained smollm2 --out runs/kv-scorer/smollm2.safetensors

The frozen model reads windows of real text (training: Jane Austen's novels; validation: State of
the Union addresses; the presses are evaluated on Moby Dick, so the three never overlap). A
recording attention backend (the model's own forward, `attn=`) computes each layer's attention
explicitly and, for every key j with a full future window, the target

    y[l, h, j] = log(eps + max over queries i in [j + horizon, j + horizon + n_future)
                          and over the query heads of KV head h of  softmax(q_i . k / sqrt D)[j])

-- what a query-agnostic press must predict: whether some later query, beyond the recent window
every press keeps anyway, will need this entry. Features are the rotation-invariant K/V features
of `kv_features`; the scorer is ridge regression per (layer, KV head), fitted in closed form from
normal equations accumulated window by window (nothing per token is kept). The regularisation is
chosen on the validation windows (lowest mean squared error, averaged over heads).

Two targets (`--target`): "future" (above) and "reconstruct" -- KVzip's (arXiv 2505.23416): the
window is read twice and a key's target is log(eps + the largest weight any query of the second
reading gives it), i.e. what the model needs to reproduce its context.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from memstack.memory.base import KVBlock, StepContext
from memstack.memory.kv.compress.learned import LearnedScorer, fit_ridge, kv_features, n_features, ridge_mse

EPS = 1e-6
LAMBDAS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)


def future_max_attention(probs: Tensor, kv_heads: int, horizon: int, n_future: int) -> Tensor:
    """probs (B, H, T, T) causal attention -> (B, Hkv, T - horizon - n_future + 1): for each key j
    with a full window, the largest weight from queries [j + horizon, j + horizon + n_future) over
    the query heads of its group."""
    B, H, T, _ = probs.shape
    g = H // kv_heads
    m = probs.reshape(B, kv_heads, g, T, T).amax(2)                             # (B, Hkv, Tq, Tk)
    n_keys = T - horizon - n_future + 1
    out = torch.empty(B, kv_heads, n_keys, dtype=probs.dtype, device=probs.device)
    for j in range(n_keys):                                                     # T small: clarity over speed
        out[:, :, j] = m[:, :, j + horizon:j + horizon + n_future, j].amax(-1)
    return out


def reconstruct_max_attention(probs: Tensor, kv_heads: int) -> Tensor:
    """probs (B, H, 2L, 2L) over a window read twice -> (B, Hkv, L): for each key j of the first
    copy, the largest weight from any query of the second copy, over the query heads of its group
    (KVzip's score: what the model needs to reproduce its context)."""
    B, H, T, _ = probs.shape
    L = T // 2
    return probs[:, :, L:, :L].reshape(B, kv_heads, H // kv_heads, L, L).amax((2, 3))


class RecordingAttention:
    """Dense causal attention (explicit softmax) that accumulates the scorer's normal equations.
    target "future": log max attention from queries [j + horizon, j + horizon + n_future);
    "reconstruct": the window is read twice, log max attention from the second reading."""

    def __init__(self, n_layers: int, kv_heads: int, head_dim: int, horizon: int, n_future: int,
                 target: str = "future", low_pairs: int = 0):
        if target not in ("future", "reconstruct"):
            raise ValueError(f"target must be 'future' or 'reconstruct', got {target!r}")
        F = n_features(head_dim, low_pairs)
        self.horizon, self.n_future, self.target, self.low_pairs = horizon, n_future, target, low_pairs
        self.head_dim = head_dim
        self.xtx = torch.zeros(n_layers, kv_heads, F, F, dtype=torch.float64)
        self.xty = torch.zeros(n_layers, kv_heads, F, dtype=torch.float64)
        self.yty = torch.zeros(n_layers, kv_heads, dtype=torch.float64)

    def begin(self, ctx: StepContext) -> None:
        if ctx.valid is not None:
            raise ValueError("fit the scorer on a model without memory tokens")

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, extras: list[KVBlock], ctx: StepContext) -> Tensor:
        if extras:
            raise ValueError("fit the scorer on a model without memories (its K/V are the context)")
        B, H, T, D = q.shape
        Hkv = k.shape[1]
        kr, vr = k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1)
        s = (q.float() @ kr.float().transpose(-1, -2)) / math.sqrt(D)            # (B, H, T, T)
        causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
        p = torch.softmax(s.masked_fill(~causal, float("-inf")), -1)
        if self.target == "future":
            y = torch.log(future_max_attention(p, Hkv, self.horizon, self.n_future) + EPS)   # (B, Hkv, J)
        else:
            y = torch.log(reconstruct_max_attention(p, Hkv) + EPS)                           # (B, Hkv, T/2)
        J = y.shape[2]
        x = kv_features(k[:, :, :J], v[:, :, :J], self.low_pairs).double()                       # (B, Hkv, J, F)
        self.xtx[layer] += torch.einsum("bhjf,bhjg->hfg", x, x).cpu()
        self.xty[layer] += torch.einsum("bhjf,bhj->hf", x, y.double()).cpu()
        self.yty[layer] += (y.double() ** 2).sum((0, 2)).cpu()
        return (p @ vr.float()).to(q.dtype)


@dataclass
class FitResult:
    scorer: LearnedScorer
    lam: float
    val_mse: dict[float, float]          # per lambda, averaged over (layer, head)
    val_var: float                       # variance of the validation target (MSE of a constant)
    n_train: int
    n_val: int


def collect(model: torch.nn.Module, windows: Tensor, horizon: int, n_future: int, batch: int = 1,
            progress: bool = False, target: str = "future", low_pairs: int = 0) -> RecordingAttention:
    """Run the frozen model over windows (N, T) (read twice for target "reconstruct") and return
    the accumulated statistics."""
    from memstack.memory.base import Step

    b = model.cfg.backbone
    rec = RecordingAttention(b.n_layers, b.kv_heads, b.head_dim, horizon, n_future, target, low_pairs)
    if target == "reconstruct":
        windows = torch.cat([windows, windows], 1)
    it = range(0, windows.shape[0], batch)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc="scorer data", unit="batch")
    with torch.no_grad():
        for i in it:
            x = windows[i:i + batch]
            model(x, model.init_state(x.shape[0], x.device), Step(), attn=rec, logits="last")
    return rec


def fit(train: RecordingAttention, val: RecordingAttention, meta: dict | None = None,
        lambdas: tuple[float, ...] = LAMBDAS) -> FitResult:
    """Ridge per (layer, head) for every lambda; the lambda with the lowest validation MSE wins."""
    mses = {}
    for lam in lambdas:
        w = fit_ridge(train.xtx, train.xty, lam)
        mses[lam] = float(ridge_mse(val.xtx, val.xty, val.yty, w).mean())
    best = min(mses, key=mses.get)
    n_val = val.xtx[..., -1, -1]
    mean = val.xty[..., -1] / n_val
    var = float((val.yty / n_val - mean ** 2).mean())
    m = dict(meta or {}, lam=best, target=train.target, val_mse=mses[best], val_var=var)
    if train.target == "future":
        m.update(horizon=train.horizon, n_future=train.n_future)
    return FitResult(LearnedScorer(fit_ridge(train.xtx, train.xty, best), m, train.head_dim, train.low_pairs), best, mses, var,
                     int(train.xtx[0, 0, -1, -1]), int(n_val[0, 0]))


def text_windows(tokenizer, docs, length: int, n: int, seed: int) -> Tensor:
    """n windows of `length` tokens from the documents' concatenated text, at seeded random offsets."""
    import numpy as np

    ids = np.asarray(tokenizer.encode("\n".join(d.text for d in docs)), dtype=np.int64)
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(ids) - length, n)
    return torch.from_numpy(np.stack([ids[s:s + length] for s in starts]))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pretrained", default="smollm2", help="registered pretrained backbone (memstack data fetch <name>)")
    ap.add_argument("--out", required=True, help="the scorer file to write (.safetensors)")
    ap.add_argument("--length", type=int, default=512, help="tokens per window")
    ap.add_argument("--train-windows", type=int, default=48)
    ap.add_argument("--val-windows", type=int, default=12)
    ap.add_argument("--horizon", type=int, default=16, help="queries closer than this are ignored (the recent window)")
    ap.add_argument("--n-future", type=int, default=256, help="queries per key window")
    ap.add_argument("--target", choices=("future", "reconstruct"), default="future",
                    help="future: attention from later queries; reconstruct: from a second reading of the window (KVzip)")
    ap.add_argument("--low-pairs", type=int, default=0, help="also the raw lowest-frequency rotary pairs of k (direction)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    if a.target == "future" and a.length < a.horizon + a.n_future:
        ap.error(f"--length {a.length} must be >= --horizon + --n-future ({a.horizon + a.n_future})")
    torch.set_num_threads(a.threads)
    from memstack.data import corpora
    from memstack.data.tokenizers import get_tokenizer
    from memstack.hf.pretrained import PRETRAINED, load_pretrained

    model = load_pretrained(a.pretrained, [], seg_len=2 * a.length if a.target == "reconstruct" else a.length).eval()
    tok = get_tokenizer(PRETRAINED[a.pretrained].tokenizer)
    train = collect(model, text_windows(tok, corpora.austen(), a.length, a.train_windows, a.seed), a.horizon,
                    a.n_future, progress=True, target=a.target, low_pairs=a.low_pairs)
    val = collect(model, text_windows(tok, corpora.sotu("all"), a.length, a.val_windows, a.seed + 1), a.horizon,
                  a.n_future, progress=True, target=a.target, low_pairs=a.low_pairs)
    res = fit(train, val, {"backbone": a.pretrained, "train": f"austen, {a.train_windows} x {a.length}",
                           "val": f"sotu, {a.val_windows} x {a.length}"})
    res.scorer.save(a.out)
    print(f"lambda chosen on validation: {res.lam} (val MSE per lambda: "
          + ", ".join(f"{k:g}: {v:.3f}" for k, v in res.val_mse.items())
          + f"; a constant's MSE: {res.val_var:.3f}); {res.n_train} train / {res.n_val} val keys per head; -> {a.out}")


if __name__ == "__main__":
    main()
