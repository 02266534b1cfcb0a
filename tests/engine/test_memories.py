"""Every registered memory, served: the engine's output equals `memstack.generate` alone.

For each memory of the registry (its first contract config, on a tiny backbone with seg_len 16):
8 requests of mixed prompt and output lengths, admitted at three different times, in a pool too
small for all of them (some are preempted and recomputed), prompts prefilled in chunks; every
request's greedy tokens equal decoding that request alone with `memstack.generate`. Rows of a
step sit at different positions and phases, so this is the per-row contract through the engine.
"""
from __future__ import annotations

import pytest
import torch

from served import V, make

from memstack.engine import Engine, EngineConfig
from memstack.generate import SamplingConfig, generate
from memstack.registry import MEMORIES

PROMPTS = (3, 17, 9, 30, 1, 12, 25, 6)
NEW = (10, 20, 5, 14, 18, 7, 12, 9)
ARRIVE = (0, 0, 0, 0, 3, 3, 7, 7)             # engine step at which each request is added


def serve_mixed(model, prompts, news, arrive, **cfg):
    """Run the requests through an engine, adding each at its step; returns (outputs, engine, ids)."""
    eng = Engine(model, EngineConfig(**cfg))
    ids, step = [None] * len(prompts), 0
    while step <= max(arrive) or eng.has_unfinished():
        for i, a in enumerate(arrive):
            if a == step:
                ids[i] = eng.add_request(prompts[i], SamplingConfig(max_new_tokens=news[i]))
        for o in eng.step():
            assert o.error is None, o.error
        step += 1
    return [eng.requests[i].output for i in ids], eng, ids


def pool_for(model, prompts, news, block_size=4) -> int:
    """A pool that holds the largest request alone plus a little: the rest must wait or be preempted."""
    probe = Engine(model, EngineConfig(block_size=block_size, num_blocks=4096))
    return max(probe.max_blocks(p + n) for p, n in zip(prompts, news)) + 3


@pytest.mark.parametrize("name", MEMORIES.names())
def test_every_memory_served_equals_generate_alone(name):
    model = make(name)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, V, (n,), generator=g).tolist() for n in PROMPTS]
    want = [[int(t) for t in generate(model, p, SamplingConfig(max_new_tokens=n))] for p, n in zip(prompts, NEW)]
    blocks = pool_for(model, PROMPTS, NEW)
    got, eng, ids = serve_mixed(model, prompts, NEW, ARRIVE, block_size=4, num_blocks=blocks, max_num_batched_tokens=8)
    assert got == want
    assert sum(eng.requests[i].preemptions for i in ids) >= 1, "the pool was meant to force a preemption"
    assert eng.pool.num_free == blocks and not eng.scheduler.running
    eng.pool.check()
