"""The engine against the model it serves: greedy/sampled output equals `memstack.generate`,
paged logits equal the dense forward, prefix hits equal recomputation, requests join and leave,
preemption and waiting never change anyone's output, bad requests are refused with reasons."""
from __future__ import annotations

import random

import pytest
import torch

from memstack.backbone.model import build_model
from memstack.checkpoint import save_checkpoint
from memstack.config import BackboneConfig
from memstack.engine import Engine, EngineConfig, EngineError
from memstack.generate import SamplingConfig, generate
from memstack.memory.kv.config import DenseKVConfig
from tolerances import assert_close

V = 64
POLICIES = {
    "segment": [],
    "document": [DenseKVConfig(scope="document")],
    "window": [DenseKVConfig(scope="document", window=5)],
}


def tiny(mems=(), seg=8, kv_heads=2, seed=0):
    torch.manual_seed(seed)
    b = BackboneConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4, n_kv_heads=kv_heads, seg_len=seg, init_std=0.3)
    return build_model(b, list(mems)).eval()


def engine(model, **kw):
    kw = {"block_size": 4, "num_blocks": 64, **kw}
    return Engine(model, EngineConfig(**kw))


def lib(model, prompt, cfg):
    return [int(t) for t in generate(model, prompt, cfg)]


def prompts(*lens):
    return [torch.randint(0, V, (n,)).tolist() for n in lens]


@pytest.mark.parametrize("policy", list(POLICIES))
@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_greedy_batch_equals_generate(policy, kv_heads):
    model = tiny(POLICIES[policy], kv_heads=kv_heads)
    ps = prompts(3, 13, 9, 1, 20)
    cfg = SamplingConfig(max_new_tokens=18)
    got = engine(model, max_num_batched_tokens=7).generate(ps, cfg)        # chunked prefill
    assert got == [lib(model, p, cfg) for p in ps]


@pytest.mark.parametrize("policy", ["segment", "document"])
def test_paged_logits_equal_dense_forward(policy):
    """Every prompt token's logits from the paged runner equal one dense forward (segment by
    segment with the model's own cache) -- paged equals dense."""
    from memstack.engine.runner import Work

    model = tiny(POLICIES[policy], seg=64)
    eng = engine(model, num_blocks=32)
    p = prompts(37)[0]
    seq = eng.manager.new_seq(eng.namespace.root())
    eng.manager.allocate(seq, len(p))
    random.shuffle(seq.blocks)                                                  # non-contiguous physical blocks
    got = []
    for a, b in [(0, 11), (11, 12), (12, 30), (30, 37)]:                      # prefill, decode, prefill, prefill
        got += eng.runner.run([Work(p[a:b], a, a, 0, seq.block_ids)], all_logits=True)
    with torch.no_grad():
        want = model(torch.tensor([p]))[0].logits[0]
    assert_close(torch.cat(got), want)


def test_prefix_hit_equals_recompute():
    model = tiny(POLICIES["document"], seg=64)
    shared = prompts(22)[0]
    tails = prompts(5, 3)
    cfg = SamplingConfig(max_new_tokens=6)
    cold = engine(model, enable_prefix_caching=False)
    cold.record_logits = True
    rid = cold.add_request(shared + tails[1], cfg)
    while cold.has_unfinished():
        cold.step()
    want = cold.requests[rid]
    warm = engine(model)
    warm.record_logits = True
    warm.generate([shared + tails[0]], cfg)
    rid = warm.add_request(shared + tails[1], cfg)
    while warm.has_unfinished():
        warm.step()
    got = warm.requests[rid]
    assert got.cached_tokens == 20                                              # 5 full blocks of 4 reused
    assert got.output == want.output
    for a, b in zip(got.logits, want.logits):
        assert_close(a, b)


def test_requests_join_and_leave_between_steps():
    model = tiny(POLICIES["document"], seg=64)
    ps = prompts(6, 11, 4)
    cfgs = [SamplingConfig(max_new_tokens=n) for n in (12, 5, 9)]
    eng = engine(model)
    ids, outs = [], {}
    ids.append(eng.add_request(ps[0], cfgs[0]))
    for step in range(40):
        if step == 3:
            ids.append(eng.add_request(ps[1], cfgs[1]))
        if step == 6:
            ids.append(eng.add_request(ps[2], cfgs[2]))
        for o in eng.step():
            outs.setdefault(o.request_id, []).extend(o.new_tokens)
    assert [outs[i] for i in ids] == [lib(model, p, c) for p, c in zip(ps, cfgs)]
    assert eng.pool.num_free == eng.num_blocks and not eng.has_unfinished()
    eng.pool.check()


def test_sampling_equals_generate_and_is_seeded():
    model = tiny()
    p = prompts(7)[0]
    for cfg in (SamplingConfig(max_new_tokens=15, temperature=1.0, seed=3),
                SamplingConfig(max_new_tokens=15, temperature=0.8, top_p=0.9, top_k=20, seed=4)):
        eng = engine(model)
        a, b = eng.generate([p, p], [cfg, SamplingConfig(max_new_tokens=15, temperature=1.0, seed=99)])
        assert a == lib(model, p, cfg)
        assert a != b


def test_stop_ids_and_max_model_len():
    model = tiny(POLICIES["document"], seg=64)
    p = prompts(5)[0]
    full = lib(model, p, SamplingConfig(max_new_tokens=20))
    k = next(i for i in range(2, 20) if full[i] not in full[:i])
    eng = engine(model, max_model_len=30)
    assert eng.generate([p], SamplingConfig(max_new_tokens=20, stop_ids=(full[k],)))[0] == full[:k + 1]
    rid = eng.add_request(p, SamplingConfig(max_new_tokens=25))
    outs = []
    while eng.has_unfinished():
        outs += eng.step()
    assert outs[-1].finish_reason == "length" and len(eng.requests[rid].output) == 25
    assert eng.generate([p], SamplingConfig(max_new_tokens=0)) == [[]]


def test_streaming_yields_tokens_as_they_come():
    model = tiny()
    p = prompts(6)[0]
    cfg = SamplingConfig(max_new_tokens=10)
    eng = engine(model)
    other = eng.add_request(prompts(9)[0], SamplingConfig(max_new_tokens=30))   # keeps running meanwhile
    got = []
    for tok in eng.stream(p, cfg):
        got.append(tok)
        assert eng.has_unfinished()
    assert got == lib(model, p, cfg) and not eng.requests[other].finished


def test_bad_requests_are_refused_with_every_reason():
    eng = engine(tiny(POLICIES["document"], seg=64), num_blocks=8, max_model_len=40)
    with pytest.raises(EngineError) as e:
        eng.add_request([V, -1] + [1] * 45, SamplingConfig(max_new_tokens=10))
    r = e.value.reasons
    assert len(r) == 3
    assert "token ids must be in [0, 64)" in r[0] and "exceeds max_model_len 40" in r[1]
    assert "needs up to 15 KV blocks of 4 tokens, the pool has 8" in r[2]
    with pytest.raises(EngineError, match="prompt is empty"):
        eng.add_request([], SamplingConfig())
    assert not eng.has_unfinished() and eng.pool.num_free == 8


def test_segment_scope_bounds_the_blocks_a_request_needs():
    eng = engine(tiny(seg=8), num_blocks=4)                                       # 8 visible tokens: 3 blocks
    model = eng.model
    p = prompts(30)[0]
    assert eng.generate([p], SamplingConfig(max_new_tokens=20)) == [lib(model, p, SamplingConfig(max_new_tokens=20))]


def test_a_full_pool_makes_requests_wait_or_be_preempted_without_corrupting_others():
    model = tiny(POLICIES["document"], seg=64)
    ps = prompts(9, 14, 5, 12)
    cfgs = [SamplingConfig(max_new_tokens=n) for n in (14, 10, 17, 8)]
    want = [lib(model, p, c) for p, c in zip(ps, cfgs)]
    eng = engine(model, num_blocks=9)                                              # < what all need together
    ids = [eng.add_request(p, c) for p, c in zip(ps, cfgs)]
    most = 0
    while eng.has_unfinished():
        eng.step()
        most = max(most, len(eng.scheduler.running))
        eng.pool.check()
    assert most < 4                                                               # some had to wait
    assert [eng.requests[i].output for i in ids] == want
    assert eng.pool.num_free == 9


def test_preemption_recomputes_and_keeps_outputs():
    model = tiny(POLICIES["document"], seg=64)
    ps = prompts(7, 7, 7)
    cfg = SamplingConfig(max_new_tokens=16)                                        # 23 tokens: 6 blocks each
    eng = engine(model, num_blocks=13)
    ids = [eng.add_request(p, cfg) for p in ps]
    while eng.has_unfinished():
        eng.step()
    reqs = [eng.requests[i] for i in ids]
    assert sum(r.preemptions for r in reqs) >= 1
    assert [r.output for r in reqs] == [lib(model, p, cfg) for p in ps]


def test_engine_refuses_what_it_cannot_run_with_reasons():
    from memstack.memory.kv.config import CompressionConfig, PagedKVConfig

    with pytest.raises(EngineError, match="its cache compresses inside the model"):
        Engine(tiny([PagedKVConfig(compression=CompressionConfig(policy="h2o", keep_ratio=0.5))]))


@pytest.mark.parametrize("memory", ["kv_dense", "rmt"])
def test_cli_generate_runs_on_the_engine(memory, tmp_path, capsys):
    from memstack.cli import main
    from memstack.data.tokenizers import get_tokenizer
    from memstack.memory.learned.config import RMTConfig

    tok = get_tokenizer("byte")
    torch.manual_seed(0)
    b = BackboneConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=2, n_heads=2, seg_len=16, init_std=0.3)
    mem = DenseKVConfig(scope="document") if memory == "kv_dense" else RMTConfig(n_tokens=3)
    model = build_model(b, [mem]).eval()
    save_checkpoint(model, tmp_path / "ck", {"tokenizer": "byte", "tokenizer_fingerprint": tok.fingerprint()})
    outs = []
    for extra in ([], ["--no-engine"]):                                           # engine vs the plain decoder
        assert main(["generate", "--checkpoint", str(tmp_path / "ck"), "--prompt", "Hello", "--max-new-tokens", "12",
                     "--block-size", "4", "--no-stop"] + extra) == 0
        cap = capsys.readouterr()
        outs.append(cap.out)
        assert "cannot serve" not in cap.err                                       # the engine ran it
    assert outs[0] == outs[1] and outs[0].startswith("Hello") and len(outs[0]) > len("Hello\n")


def test_streaming_compression_frees_whole_blocks_in_the_shared_pool():
    from memstack.memory.kv.config import CompressionConfig

    model = tiny(POLICIES["document"], seg=512)
    p = prompts(10)[0]
    cfg = SamplingConfig(max_new_tokens=60)
    comp = CompressionConfig(policy="streaming", keep_ratio=0.25, sink_tokens=4)
    eng = engine(model, num_blocks=12, max_num_batched_tokens=64)                # 70 tokens need 18 blocks uncompressed
    with pytest.raises(EngineError, match="needs up to 18 KV blocks"):
        eng.add_request(p, cfg)
    eng.record_logits = True
    rid = eng.add_request(p, cfg, compression=comp)
    full = engine(model, num_blocks=32)
    full.record_logits = True
    fid = full.add_request(p, cfg)
    held, first_drop, sink_ids = [], None, set()
    while eng.has_unfinished():
        eng.step()
        full.step()
        s = eng.requests[rid].seq
        if s is not None:
            held.append(len(s.blocks))
            sink_ids.add(s.blocks[0].id)                                          # the sink block is never dropped
            assert s.n_slots == (len(s.blocks) - 1) * 4 + (s.n_tokens - 1) % 4 + 1  # the tail block keeps filling
            if first_drop is None and not s.cacheable:
                first_drop = len(eng.requests[rid].output)
        eng.pool.check()
    while full.has_unfinished():
        full.step()
    got, want = eng.requests[rid], full.requests[fid]
    assert len(got.output) == 60 and first_drop is not None and len(sink_ids) == 1
    # identical until the first block is dropped, and the request never holds more than its budget
    for a, b in zip(got.logits[:first_drop], want.logits[:first_drop]):
        assert_close(a, b)
    assert max(held) <= eng._stream_budget(comp, 70) + 1 and eng.pool.num_free == 12


def test_engine_refuses_policies_it_does_not_run():
    from memstack.memory.kv.config import CompressionConfig

    eng = engine(tiny(POLICIES["document"], seg=64))
    with pytest.raises(EngineError, match="'h2o' runs through the kv_paged memory"):
        eng.add_request([1, 2, 3], SamplingConfig(), compression=CompressionConfig(policy="h2o", keep_ratio=0.5))
