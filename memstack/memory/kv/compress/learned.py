"""A learned KV press: a small scorer, trained offline, predicts which cached K/V entries future
queries will attend to; the cache keeps the highest-predicted entries and frees whole blocks.

In the spirit of KVzap (Jegou et al., arXiv 2601.07891), which trains a per-layer linear / MLP
surrogate to predict KVzip's scores (Kim et al., arXiv 2505.23416: the most attention an entry
receives while the model reconstructs its context) so that pruning needs no extra forward pass.
What it stores: one linear map per (layer, KV head), `weight (L, Hkv, F)`, in a checksummed
safetensors file with the backbone shape it was fitted for. How it reads: `scores(kv)` maps the
K/V held in the pool to one predicted log-attention per (layer, KV head, slot); the shared
selection (`keep_indices`) keeps the top-k of each (layer, KV head) plus sinks and the recent
window. How it is trained (memstack/train/kv_scorer.py): the frozen model reads real text; the
target of a key is log(max attention it receives from any query at least `horizon` tokens later,
over the query heads of its group), or KVzip's (the window read twice: from the second reading);
ridge regression, closed form, regularisation chosen on held-out text.

Deviations from KVzap, each for a reason:
- Inputs are the K/V at rest in the pool, not the layer's hidden state: the press then runs on
  any paged pool after the fact (the engine's shared pool, `kv_paged`), with no hook in the
  forward pass. Keys are stored after RoPE, so the features are rotation-invariant: the norm of
  each rotary pair (k[i], k[i + D/2]) (D/2 values), the value vector (D values) and a bias.
- KVzip's target is approximated by reading the window twice with no "repeat" instruction in
  between; the alternative target is future-query attention in natural text; KVzip+'s value-norm
  weighting is not applied. With `low_pairs`, raw components of the slowest rotary pairs are
  features too: nearly, not exactly, position-invariant.
- Eviction keeps a budget (keep_ratio of tokens seen, the kvpress protocol shared with H2O /
  SnapKV / StreamingLLM here), not KVzap's fixed score threshold, so ratios are equal across
  presses.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from memstack.errors import IntegrityError

FORMAT = 1
FEATURES = "rope_pair_norms(k)+v+bias"


def n_features(head_dim: int, low_pairs: int = 0) -> int:
    return head_dim // 2 + head_dim + 1 + 2 * low_pairs


def features_name(low_pairs: int) -> str:
    return FEATURES if not low_pairs else f"{FEATURES}+raw_low_pairs(k,{low_pairs})"


def kv_features(k: Tensor, v: Tensor, low_pairs: int = 0) -> Tensor:
    """k, v (..., S, D) post-RoPE keys and values -> (..., S, D/2 + D + 1 + 2 low_pairs) fp32 features
    that do not depend on the key's position: a rotation turns each pair (k[i], k[i + D/2]) within
    its plane, so its norm stays. With low_pairs > 0, also the raw components of the `low_pairs`
    lowest-frequency pairs (the last indices of each half), which hold the key's direction and turn
    by only position x frequency (SmolLM2, theta 1e5: < 0.05 rad over 256 tokens for the last 8)."""
    k, v = k.float(), v.float()
    half = k.shape[-1] // 2
    pair = torch.sqrt(k[..., :half] ** 2 + k[..., half:] ** 2)                   # (..., S, D/2)
    parts = [pair, v]
    if low_pairs:
        parts += [k[..., half - low_pairs:half], k[..., 2 * half - low_pairs:]]   # (..., S, 2 low_pairs)
    return torch.cat(parts + [torch.ones_like(v[..., :1])], -1)


@dataclass
class LearnedScorer:
    weight: Tensor                          # (L, Hkv, F) fp32
    meta: dict = field(default_factory=dict)
    head_dim: int = 0                       # 0: inferred from F with low_pairs = 0
    low_pairs: int = 0

    def __post_init__(self):
        if not self.head_dim:
            self.head_dim = (self.weight.shape[-1] - 1 - 2 * self.low_pairs) * 2 // 3

    @property
    def shape(self) -> tuple[int, int, int]:
        L, H, _ = self.weight.shape
        return L, H, self.head_dim

    def check_fits(self, n_layers: int, kv_heads: int, head_dim: int) -> list[str]:
        L, H, D = self.shape
        r = []
        if (L, H, D) != (n_layers, kv_heads, head_dim):
            r.append(f"the KV scorer was fitted for {L} layers x {H} KV heads of dim {D}, the model has "
                     f"{n_layers} x {kv_heads} of dim {head_dim} (fit one for this model: python -m memstack.train.kv_scorer)")
        return r

    def scores(self, kv: Tensor) -> Tensor:
        """kv (..., L, 2, Hkv, S, D) -> predicted log-attention (..., L, Hkv, S) fp32, all at once."""
        f = kv_features(kv[..., 0, :, :, :], kv[..., 1, :, :, :], self.low_pairs)   # (..., L, Hkv, S, F)
        w = self.weight.to(f.device)
        return torch.einsum("...lhsf,lhf->...lhs", f, w)

    def scores_reference(self, kv: Tensor) -> Tensor:
        """The same for kv (L, 2, Hkv, S, D), one (layer, head, slot) at a time: the definition."""
        L, _, H, S, D = kv.shape
        out = torch.empty(L, H, S)
        for l in range(L):
            for h in range(H):
                for s in range(S):
                    k, v = kv[l, 0, h, s].double(), kv[l, 1, h, s].double()
                    feats = [float(torch.hypot(k[i], k[i + D // 2])) for i in range(D // 2)]
                    feats += [float(x) for x in v]
                    n = self.low_pairs
                    feats += [float(x) for x in k[D // 2 - n:D // 2]] + [float(x) for x in k[D - n:]] + [1.0]
                    out[l, h, s] = sum(a * float(b) for a, b in zip(feats, self.weight[l, h].double()))
        return out

    # -- persistence ---------------------------------------------------------------------------
    def _digest(self) -> str:
        body = json.dumps(self.meta, sort_keys=True).encode()
        w = self.weight.float().contiguous()
        head = f"{tuple(w.shape)};{self.head_dim};{self.low_pairs}" if self.low_pairs else str(tuple(w.shape))
        return hashlib.sha256(body + head.encode() + w.numpy().tobytes()).hexdigest()

    def save(self, path: str | Path) -> Path:
        from memstack.atomic import save_safetensors

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_safetensors({"weight": self.weight.float().contiguous()}, path,
                         metadata={"format": str(FORMAT), "features": features_name(self.low_pairs),
                                   "head_dim": str(self.head_dim), "meta": json.dumps(self.meta, sort_keys=True),
                                   "sha256": self._digest()})
        return path

    @classmethod
    def load(cls, path: str | Path) -> "LearnedScorer":
        """Read a scorer file; refuses (IntegrityError, every reason) a missing, foreign or corrupted one."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise IntegrityError(f"KV scorer file {path} does not exist (train one: python -m memstack.train.kv_scorer)")
        try:
            with safe_open(str(path), "pt") as f:
                md = f.metadata() or {}
                weight = f.get_tensor("weight")
        except Exception as e:  # noqa: BLE001 -- any unreadable file is the same answer
            raise IntegrityError(f"KV scorer file {path} is not a readable safetensors file: {e}") from e
        reasons = []
        if md.get("format") != str(FORMAT):
            reasons.append(f"format {md.get('format')!r}, expected {FORMAT}")
        feats = md.get("features", "")
        low = 0
        pre = FEATURES + "+raw_low_pairs(k,"
        if feats.startswith(pre) and feats.endswith(")") and feats[len(pre):-1].isdigit():
            low = int(feats[len(pre):-1])
        elif feats != FEATURES:
            reasons.append(f"features {feats!r}, expected {FEATURES!r} (optionally +raw_low_pairs(k,N))")
        try:
            meta = json.loads(md.get("meta", ""))
        except json.JSONDecodeError:
            meta, _ = {}, reasons.append("its metadata is not JSON")
        hd = int(md["head_dim"]) if md.get("head_dim", "").isdigit() else (weight.shape[-1] - 1) * 2 // 3
        if weight.dim() != 3 or weight.shape[2] != n_features(hd, low) or hd < 2 or low > hd // 2:
            reasons.append(f"weight shape {tuple(weight.shape)} is not (layers, KV heads, 3 D/2 + 1 + 2 x {low}) "
                           f"for head dim {hd}")
            hd = 0
        out = cls(weight.float(), meta, hd, low)
        if not reasons and md.get("sha256") != out._digest():
            reasons.append("checksum mismatch: the file is corrupted or was modified")
        if reasons:
            raise IntegrityError(f"KV scorer file {path} refused:\n" + "\n".join(f"  - {r}" for r in reasons))
        return out


_CACHE: dict[tuple[str, int, int], LearnedScorer] = {}


def load_scorer(path: str | Path) -> LearnedScorer:
    """`LearnedScorer.load`, cached per (path, mtime, size) so each request does not re-read it."""
    p = Path(path)
    st = p.stat() if p.is_file() else None
    key = (str(p.resolve()), st.st_mtime_ns if st else -1, st.st_size if st else -1)
    if key not in _CACHE:
        _CACHE[key] = LearnedScorer.load(p)
    return _CACHE[key]


def fit_ridge(xtx: Tensor, xty: Tensor, lam: float) -> Tensor:
    """Per-head ridge regression from the normal equations: xtx (..., F, F), xty (..., F) ->
    weight (..., F) minimising |Xw - y|^2 + lam * n * |w[:-1]|^2 (the bias, last, not penalised;
    n = xtx[..., -1, -1], the number of rows)."""
    F = xtx.shape[-1]
    pen = torch.ones(F, dtype=torch.float64)
    pen[-1] = 0
    n = xtx[..., -1:, -1:].double()
    a = xtx.double() + lam * n * torch.diag(pen)
    return torch.linalg.solve(a, xty.double()[..., None])[..., 0].float()


def ridge_mse(xtx: Tensor, xty: Tensor, yty: Tensor, w: Tensor) -> Tensor:
    """Mean squared error of weights w (..., F) on data summarised by its normal equations."""
    w = w.double()
    sse = (w[..., None, :] @ xtx.double() @ w[..., :, None])[..., 0, 0] - 2 * (w * xty.double()).sum(-1) + yty.double()
    return sse / xtx[..., -1, -1].double()
