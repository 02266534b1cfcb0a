"""The learned KV press on the engine's shared pool: the compaction equals its per-slot reference,
real blocks go back to the pool (free count), the served tokens equal `generate` with `kv_paged`
compressing the same way, bad scorers are refused with reasons."""
from __future__ import annotations

import pytest
import torch

from memstack.backbone.model import build_model
from memstack.config import BackboneConfig
from memstack.engine import Engine, EngineConfig, EngineError
from memstack.engine.press import compact, compact_reference, held, select_reference
from memstack.generate import SamplingConfig, generate
from memstack.memory.kv.compress import keep_indices
from memstack.memory.kv.compress.learned import LearnedScorer, n_features
from memstack.memory.kv.config import CompressionConfig, DenseKVConfig, PagedKVConfig
from memstack.memory.kv.store import KVSpec, PagedKVCache

V = 64


def tiny(mems=(DenseKVConfig(scope="document"),), seg=8, seed=0):
    torch.manual_seed(seed)
    b = BackboneConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, seg_len=seg, init_std=0.3)
    return build_model(b, list(mems)).eval()


def scorer_file(tmp_path, L=2, H=2, hd=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    path = tmp_path / "scorer.safetensors"
    LearnedScorer(torch.randn(L, H, n_features(hd), generator=g), {"backbone": "tiny"}).save(path)
    return path


def test_scores_equal_the_per_slot_reference():
    g = torch.Generator().manual_seed(0)
    sc = LearnedScorer(torch.randn(3, 2, n_features(6), generator=g))
    kv = torch.randn(3, 2, 2, 7, 6, generator=g)
    ref = sc.scores_reference(kv)
    torch.testing.assert_close(sc.scores(kv), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sc.scores(kv[None].expand(2, -1, -1, -1, -1, -1))[1], ref, rtol=1e-5, atol=1e-5)
    # the features ignore RoPE: rotating every pair of a key by any angle leaves its score unchanged
    from memstack.backbone.layers import apply_rope, rope_tables

    cos, sin = rope_tables(torch.tensor([[37]]), 6, 10000.0, torch.float32)
    rot = kv.clone()
    rot[:, 0] = apply_rope(kv[:, 0].reshape(1, -1, 1, 6), cos, sin).reshape(3, 2, 7, 6)
    assert not torch.allclose(rot, kv)
    torch.testing.assert_close(sc.scores(rot), sc.scores(kv), rtol=1e-5, atol=1e-5)


def test_scorer_with_low_pairs_equals_reference_and_round_trips(tmp_path):
    from memstack.memory.kv.compress.learned import kv_features

    g = torch.Generator().manual_seed(2)
    sc = LearnedScorer(torch.randn(2, 2, n_features(8, 2), generator=g), {"x": 1}, head_dim=8, low_pairs=2)
    kv = torch.randn(2, 2, 2, 5, 8, generator=g)
    torch.testing.assert_close(sc.scores(kv), sc.scores_reference(kv), rtol=1e-5, atol=1e-5)
    f = kv_features(kv[0, 0], kv[0, 1], 2)                                    # (Hkv, S, 4 + 8 + 4 + 1)
    assert f.shape[-1] == 17 and torch.equal(f[..., 12:14], kv[0, 0][..., 2:4]) and torch.equal(f[..., 14:16], kv[0, 0][..., 6:8])
    back = LearnedScorer.load(sc.save(tmp_path / "low.safetensors"))
    assert (back.head_dim, back.low_pairs, back.shape) == (8, 2, (2, 2, 8)) and torch.equal(back.weight, sc.weight)
    assert back.check_fits(2, 2, 8) == [] and back.check_fits(2, 2, 10)


@pytest.mark.parametrize("start,n_slots,k,recent,sinks", [(0, 23, 9, 3, 2), (3, 17, 5, 5, 0), (0, 8, 8, 2, 1)])
def test_compaction_equals_reference(start, n_slots, k, recent, sinks):
    spec = KVSpec(n_layers=2, kv_heads=3, head_dim=4, block_size=4, dtype=torch.float32)
    a, b = PagedKVCache(spec, 12, torch.device("cpu")), PagedKVCache(spec, 12, torch.device("cpu"))
    torch.manual_seed(0)
    a.kv.normal_()
    b.kv.copy_(a.kv)
    ids = [7, 2, 9, 0, 11, 5][:-(-n_slots // 4)]
    scores = torch.randn(2, 3, n_slots - start)
    before = held(a, ids, start, n_slots).clone()
    assert compact(a, ids, start, n_slots, scores, k, recent, sinks) == -(-k // 4)
    compact_reference(b, ids, start, n_slots, scores, k, recent, sinks)
    got = held(a, ids, 0, k)
    assert torch.equal(got, held(b, ids, 0, k))
    sel = select_reference(scores, k, recent, sinks)
    sel_fast = keep_indices(scores[None], torch.ones(1, n_slots - start, dtype=torch.bool), k, recent, sinks)[0]
    assert sel_fast.tolist() == sel
    for l in range(2):
        for h in range(3):
            assert torch.equal(got[l, :, h], before[l, :, h, sel[l][h]])          # kept slots, in slot order
            S = n_slots - start
            assert set(range(S - recent, S)) | set(range(sinks)) <= set(sel[l][h])


def test_engine_press_frees_blocks_and_equals_kv_paged(tmp_path):
    """The request keeps ceil(keep_ratio * tokens) slots per (layer, head) at each segment end; the
    freed blocks are back in the pool; its greedy tokens equal generate() with kv_paged compressing
    with the same scorer, budget and windows."""
    path = scorer_file(tmp_path)
    model = tiny()
    comp = CompressionConfig(policy="learned", keep_ratio=0.4, recent=3, sink_tokens=1, scorer=str(path))
    torch.manual_seed(5)
    p = torch.randint(0, V, (21,)).tolist()
    cfg = SamplingConfig(max_new_tokens=19)                                      # 40 tokens: 5 segments of 8
    eng = Engine(model, EngineConfig(block_size=4, num_blocks=16, max_num_batched_tokens=64))
    rid = eng.add_request(p, cfg, compression=comp)
    trace = []
    while eng.has_unfinished():
        eng.step()
        seq = eng.requests[rid].seq
        if seq is not None and seq.n_tokens % 8 == 0:
            trace.append((seq.n_tokens, len(seq.blocks), seq.n_slots, eng.pool.num_free))
        eng.pool.check()
    # after each segment end: ceil(0.4 * n) slots held in ceil(slots / 4) blocks, every other block
    # free in the pool (uncompressed the request would hold n / 4 blocks)
    assert [t[0] for t in trace] == [8, 16, 24, 32]
    for n, nb, slots, free in trace:
        assert slots == -(-2 * n // 5) and nb == -(-slots // 4) and free == 16 - nb and nb < n // 4
    assert eng.pool.num_free == 16
    got = eng.requests[rid].output
    paged = build_model(model.cfg.backbone, [PagedKVConfig(block_size=4, compression=comp)]).eval()
    paged.load_state_dict(model.state_dict(), strict=False)
    want = [int(t) for t in generate(paged, p, cfg)]
    assert got == want
    plain = [int(t) for t in generate(model, p, cfg)]
    assert plain != want                                                         # the press changed something


def test_engine_press_bounds_blocks_and_refuses_bad_scorers(tmp_path):
    model = tiny()
    eng = Engine(model, EngineConfig(block_size=4, num_blocks=8, max_num_batched_tokens=64))
    p = list(range(20))
    cfg = SamplingConfig(max_new_tokens=40)
    with pytest.raises(EngineError, match="needs up to 15 KV blocks"):
        eng.add_request(p, cfg)                                                  # 60 tokens uncompressed
    good = scorer_file(tmp_path)
    rid = eng.add_request(p, cfg, compression=CompressionConfig(policy="learned", keep_ratio=0.25, scorer=str(good)))
    while eng.has_unfinished():
        eng.step()
    assert len(eng.requests[rid].output) == 40 and eng.pool.num_free == 8   # ran in 8 blocks
    wrong = tmp_path / "wrong.safetensors"
    LearnedScorer(torch.zeros(3, 2, n_features(8))).save(wrong)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(good.read_bytes()[:-3] + b"xyz")
    for f, why in [(wrong, "fitted for 3 layers"), (bad, "checksum mismatch"), (tmp_path / "none", "does not exist")]:
        with pytest.raises(EngineError, match=why):
            eng.add_request(p, cfg, compression=CompressionConfig(policy="learned", keep_ratio=0.5, scorer=str(f)))
    with pytest.raises(EngineError, match="stateless models only"):
        from memstack.memory.learned.config import XLConfig  # noqa: F401 -- any stateful memory
        stateful = tiny([XLConfig(mem_len=4)])
        Engine(stateful, EngineConfig(block_size=4, num_blocks=32)).add_request(
            p, cfg, compression=CompressionConfig(policy="learned", keep_ratio=0.5, scorer=str(good)))
    assert CompressionConfig.__dataclass_fields__["scorer"].default == ""
    from memstack.errors import ConfigError

    with pytest.raises(ConfigError, match="needs scorer="):
        CompressionConfig(policy="learned", keep_ratio=0.5)
