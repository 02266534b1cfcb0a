"""Text generation with any memory stack: greedy / temperature / top-k / top-p sampling, streaming.

The prompt is fed in segments of the backbone's `seg_len`, exactly as in training. Inside the
current segment, a segment-scoped dense KV cache holds the tokens seen so far, so decoding one
token at a time costs one token's compute and gives the same logits as a one-shot forward of
the segment; across segments the model's own memories carry the context. A model whose stack
already has a KV cache (a memory whose config declares `kv_cache`) uses it instead.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import Tensor

from memstack.config import Checked
from memstack.memory.base import Step
from memstack.memory.state import ModelState


MIN_TEMPERATURE = 1e-5   # below this, sampling is argmax in fp32 anyway (vLLM treats it as greedy too)


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


@dataclass(frozen=True)
class SamplingConfig(Checked):
    """How one request samples. Every field is checked (type, finiteness, range) and every
    problem is listed at once: a value that would crash or poison a step -- temperature 1e-300
    (logits / t overflow), NaN, top_k 2.5 -- is refused here, before it reaches an engine."""

    max_new_tokens: int = 64
    temperature: float = 0.0      # 0: greedy; else >= MIN_TEMPERATURE
    top_k: int = 0                # 0: off
    top_p: float = 1.0            # 1: off (nucleus sampling keeps the smallest set with mass >= top_p)
    stop_ids: tuple[int, ...] = ()
    seed: int = 0

    def check(self) -> list[str]:
        r = []
        if not _is_int(self.max_new_tokens):
            r.append(f"max_new_tokens must be an integer, got {self.max_new_tokens!r}")
        elif self.max_new_tokens < 0:
            r.append(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        t = self.temperature
        if not _is_real(t) or not math.isfinite(t):
            r.append(f"temperature must be a finite number, got {t!r}")
        elif t < 0:
            r.append(f"temperature must be >= 0, got {t}")
        elif 0 < t < MIN_TEMPERATURE:
            r.append(f"temperature must be 0 (greedy) or >= {MIN_TEMPERATURE:g}, got {t:g} (logits / t would "
                     "overflow; use 0 for greedy decoding)")
        if not _is_int(self.top_k):
            r.append(f"top_k must be an integer (0: off), got {self.top_k!r}")
        elif self.top_k < 0:
            r.append(f"top_k must be >= 0, got {self.top_k}")
        p = self.top_p
        if not _is_real(p) or not math.isfinite(p):
            r.append(f"top_p must be a finite number in (0, 1], got {p!r}")
        elif not 0 < p <= 1:
            r.append(f"top_p must be in (0, 1], got {p}")
        if not isinstance(self.stop_ids, (tuple, list)) or not all(_is_int(x) and x >= 0 for x in self.stop_ids):
            r.append(f"stop_ids must be non-negative integers, got {self.stop_ids!r}")
        if not _is_int(self.seed) or not 0 <= self.seed < 2 ** 63:
            r.append(f"seed must be an integer in [0, 2**63), got {self.seed!r}")
        return r


def sample(logits: Tensor, cfg: SamplingConfig, generator: torch.Generator | None = None) -> Tensor:
    """Next token ids (B,) from logits (B, V)."""
    if cfg.temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / cfg.temperature
    if cfg.top_k:
        kth = torch.topk(logits, min(cfg.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1:
        probs, idx = torch.softmax(logits, -1).sort(-1, descending=True)
        drop = probs.cumsum(-1) - probs >= cfg.top_p        # mass before this token already suffices
        drop[:, 0] = False
        logits = logits.masked_fill(drop.scatter(-1, idx, drop), float("-inf"))
    probs = torch.softmax(logits, -1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def decoding_model(model: torch.nn.Module) -> torch.nn.Module:
    """`model`, with a segment-scoped decode cache appended unless a memory of its stack declares
    itself a KV cache (`MemoryConfig.kv_cache`): that one decodes."""
    from memstack.memory.kv.config import DenseKVConfig

    if any(m.kv_cache is not None for m in model.cfg.memories):
        return model
    return model.with_memories([DenseKVConfig(scope="segment")])


class Decoder:
    """Feeds tokens to a model segment by segment and keeps track of where the segment stands."""

    def __init__(self, model: torch.nn.Module, batch: int = 1):
        self.model = decoding_model(model)
        self.seg_len = model.cfg.backbone.seg_len
        self.state: ModelState = self.model.init_state(batch)
        self.in_seg = 0

    @torch.no_grad()
    def feed(self, ids: Tensor) -> Tensor:
        """Feed ids (B, n); returns the logits after the last one (B, V)."""
        i, logits = 0, None
        while i < ids.shape[1]:
            n = min(self.seg_len - self.in_seg, ids.shape[1] - i)
            step = Step(seg_start=self.in_seg == 0, seg_end=self.in_seg + n == self.seg_len)
            out, self.state = self.model(ids[:, i:i + n], self.state, step)
            logits = out.logits[:, -1]
            self.in_seg = (self.in_seg + n) % self.seg_len
            i += n
        if logits is None:
            raise ValueError("feed() needs at least one token")
        return logits


@torch.no_grad()
def generate(model: torch.nn.Module, prompt: Tensor | list[int], cfg: SamplingConfig = SamplingConfig()) -> Iterator[Tensor]:
    """Yield generated token ids one step at a time (each a (B,) tensor). `prompt`: (B, T) or a list."""
    was_training = model.training
    model.eval()
    try:
        ids = torch.as_tensor(prompt, dtype=torch.long, device=model.device)
        ids = ids[None] if ids.dim() == 1 else ids
        dec = Decoder(model, ids.shape[0])
        gen = torch.Generator(device=ids.device).manual_seed(cfg.seed)
        logits = dec.feed(ids)
        done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        stop = torch.tensor(cfg.stop_ids, dtype=torch.long, device=ids.device)
        for _ in range(cfg.max_new_tokens):
            nxt = sample(logits, cfg, gen)
            yield nxt
            done |= torch.isin(nxt, stop)
            if bool(done.all()):
                return
            logits = dec.feed(nxt[:, None])
    finally:
        model.train(was_training)
