"""One request's failure never touches another's: a memory raising for one row, NaN logits in one
row's sampling, bad sampling values -- the failing request ends with an error, every other
request's output equals decoding it alone, and the engine keeps serving."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

from memstack.backbone.model import build_model
from memstack.config import BackboneConfig, MemoryConfig
from memstack.engine import Engine, EngineConfig, EngineError
from memstack.generate import SamplingConfig, generate
from memstack.memory.base import Memory, Site
from memstack.registry import MEMORIES

POISON = 13
V = 64


@dataclass(frozen=True)
class PoisonConfig(MemoryConfig):
    kind: ClassVar[str] = "test_poison"
    how: str = "raise"          # raise: the forward raises; nan: the row's logits become NaN


class Poison(Memory):
    """Raises (or poisons the logits) for rows whose chunk holds the POISON token; else nothing."""

    sites: ClassVar[frozenset[Site]] = frozenset({Site.LOGITS})

    def logits(self, logits, h, state, ctx):
        bad = (ctx.tokens == POISON).any(1)                                 # (B,)
        if bool(bad.any()):
            if self.cfg.how == "raise":
                raise ValueError("poisoned row")
            logits = logits.masked_fill(bad[:, None, None], float("nan"))
        return logits, state


@pytest.fixture
def poison():
    MEMORIES.add("test_poison", PoisonConfig, Poison, "test only")
    try:
        yield
    finally:
        MEMORIES.remove("test_poison")


def tiny(how):
    torch.manual_seed(0)
    b = BackboneConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4, seg_len=8, init_std=0.3)
    return build_model(b, [PoisonConfig(how=how)]).eval()


def prompts():
    g = torch.Generator().manual_seed(0)
    ps = [torch.randint(0, POISON, (n,), generator=g).tolist() for n in (5, 9, 3)]   # ids < POISON: clean
    ps[1][-1] = POISON                                  # in the chunk its first token is sampled from
    return ps


@pytest.mark.parametrize("how,temperature", [("raise", 0.0), ("nan", 1.0)])
def test_a_failing_request_ends_alone(poison, how, temperature):
    model = tiny(how)
    ps = prompts()
    cfg = SamplingConfig(max_new_tokens=12, temperature=temperature, seed=5)
    eng = Engine(model, EngineConfig(block_size=4, num_blocks=32))
    ids = [eng.add_request(p, cfg) for p in ps]
    errors = {}
    while eng.has_unfinished():
        for o in eng.step():
            if o.error:
                errors[o.request_id] = o.error
    assert list(errors) == [ids[1]] and eng.requests[ids[1]].finish_reason == "error"
    assert ("poisoned row" in errors[ids[1]]) if how == "raise" else ("non-finite logits" in errors[ids[1]])
    for i in (0, 2):
        alone = [int(t) for t in generate(model, ps[i], cfg)]
        assert eng.requests[ids[i]].output == alone and len(alone) == 12
    assert eng.pool.num_free == 32
    # the engine goes on serving
    assert eng.generate([ps[0]], cfg) == [[int(t) for t in generate(model, ps[0], cfg)]]


@pytest.mark.parametrize("bad,why", [
    ({"temperature": 1e-300}, r"temperature must be 0 \(greedy\) or >= 1e-05"),
    ({"temperature": float("nan")}, "temperature must be a finite number"),
    ({"top_k": 2.5}, "top_k must be an integer"),
    ({"top_p": float("inf")}, "top_p must be a finite number"),
    ({"max_new_tokens": -1}, "max_new_tokens must be >= 0"),
])
def test_bad_sampling_values_are_refused_with_reasons(bad, why):
    from memstack.errors import ConfigError

    with pytest.raises(ConfigError, match=why):
        SamplingConfig(**bad)
    # a config that slipped past its constructor (fields set afterwards) is refused by the engine
    cfg = SamplingConfig()
    for k, v in bad.items():
        object.__setattr__(cfg, k, v)
    torch.manual_seed(0)
    b = BackboneConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4, seg_len=8)
    eng = Engine(build_model(b, []).eval(), EngineConfig(block_size=4, num_blocks=8))
    with pytest.raises(EngineError, match=why):
        eng.add_request([1, 2, 3], cfg)
    assert not eng.has_unfinished()
