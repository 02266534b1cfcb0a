"""Host and disk tiers (a prefix on disk is reused by a later process and gives the logits of
recomputation), corrupted or foreign KV refused, and the session API: pin / TTL / unpin /
export / import."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from memstack.atomic import write_sealed
from memstack.backbone.model import build_model
from memstack.checkpoint import save_checkpoint
from memstack.config import BackboneConfig
from memstack.engine import Engine, EngineConfig
from memstack.errors import CheckpointError
from memstack.generate import SamplingConfig
from memstack.memory.kv.config import DenseKVConfig
from tolerances import assert_close

V = 64
CFG = SamplingConfig(max_new_tokens=4)


def tiny(seed=0):
    torch.manual_seed(seed)
    b = BackboneConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, seg_len=256, init_std=0.3)
    return build_model(b, [DenseKVConfig()]).eval()


def run(eng, prompt, salt=None):
    eng.record_logits = True
    rid = eng.add_request(prompt, CFG, salt)
    while not eng.requests[rid].finished:
        eng.step()
    return eng.requests[rid]


def recompute(model, prompt):
    return run(Engine(model, EngineConfig(block_size=4, num_blocks=64, enable_prefix_caching=False)), prompt)


def same(a, b):
    assert a.output == b.output
    for x, y in zip(a.logits, b.logits):
        assert_close(x, y)


def test_host_tier_serves_blocks_evicted_from_the_pool():
    model = tiny()
    p = torch.randint(0, V, (30,)).tolist()
    eng = Engine(model, EngineConfig(block_size=4, num_blocks=12, host_cache_blocks=40))
    run(eng, p)
    for _ in range(3):                                                           # evict p's blocks from the pool
        run(eng, torch.randint(0, V, (30,)).tolist())
    eng.tiers.flush()
    assert eng.manager.cached_prefix(eng.namespace.root(), p, 29) == []
    got = run(eng, p)
    assert got.cached_tokens == 28 and eng.tiers.stats["host_hits"] == 7
    same(got, recompute(model, p))


def test_disk_tier_survives_a_process_restart(tmp_path):
    model = tiny()
    save_checkpoint(model, tmp_path / "ck")
    p = torch.randint(0, V, (37,)).tolist()
    script = textwrap.dedent(f"""
        import json, torch
        from memstack.checkpoint import load_checkpoint
        from memstack.engine import Engine, EngineConfig
        from memstack.generate import SamplingConfig
        model, _ = load_checkpoint({str(tmp_path / 'ck')!r})
        eng = Engine(model, EngineConfig(block_size=4, num_blocks=64, disk_cache_dir={str(tmp_path / 'kv')!r}))
        out = eng.generate([{p!r}], SamplingConfig(max_new_tokens=4))
        eng.tiers.flush()
        print(json.dumps(out[0]))
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    eng = Engine(model, EngineConfig(block_size=4, num_blocks=64, disk_cache_dir=str(tmp_path / "kv")))
    got = run(eng, p)
    assert got.cached_tokens == 36 and eng.tiers.stats["disk_hits"] == 9
    assert got.output == json.loads(res.stdout)
    same(got, recompute(model, p))
    # another model never reads those files (its namespace has its own directory)
    other = Engine(tiny(seed=1), EngineConfig(block_size=4, num_blocks=64, disk_cache_dir=str(tmp_path / "kv")))
    assert run(other, p).cached_tokens == 0


def test_corrupted_or_foreign_disk_files_are_refused(tmp_path):
    model = tiny()
    p = torch.randint(0, V, (21,)).tolist()
    eng = Engine(model, EngineConfig(block_size=4, num_blocks=64, disk_cache_dir=str(tmp_path)))
    run(eng, p)
    eng.tiers.flush()
    d = eng.tiers.disk.dir
    for data in d.glob("*.safetensors"):                                          # flip a byte of every KV file
        raw = bytearray(data.read_bytes())
        raw[-5] ^= 0xFF
        data.write_bytes(bytes(raw))
    manifest = sorted(d.glob("*.kv.json"))[0]
    meta = json.loads(manifest.read_text())
    meta["namespace"]["tokenizer"] = "gpt2"
    body = {k: v for k, v in meta.items() if k not in ("kind", "format", "checksum")}
    write_sealed(d / "foreign.kv.json", meta["kind"], meta["format"], body)      # intact, but another namespace's
    (d / "edited.kv.json").write_text(json.dumps(meta))                            # an edit without re-sealing
    eng2 = Engine(model, EngineConfig(block_size=4, num_blocks=64, disk_cache_dir=str(tmp_path)))
    assert any("foreign.kv.json: tokenizer: stored 'gpt2'" in r for r in eng2.tiers.disk.refused)
    assert any("edited.kv.json" in r and "fails its checksum" in r for r in eng2.tiers.disk.refused)
    got = run(eng2, p)
    assert got.cached_tokens == 0 and any("checksum mismatch" in r for r in eng2.tiers.disk.refused)
    same(got, recompute(model, p))


def test_pin_keeps_a_prefix_resident_until_unpin_or_ttl():
    model = tiny()
    eng = Engine(model, EngineConfig(block_size=4, num_blocks=16))
    p = torch.randint(0, V, (18,)).tolist()
    h = eng.sessions.pin(p, ttl=60)
    assert h.n_tokens == 16 and [b.ref_cnt for b in h.blocks] == [1] * 4
    for _ in range(4):                                                           # pressure on the pool
        run(eng, torch.randint(0, V, (30,)).tolist())
    assert [b.key for b in eng.manager.cached_prefix(eng.namespace.root(), p, 18)] == [b.key for b in h.blocks]
    got = run(eng, p + [1, 2])
    assert got.cached_tokens == 16
    same(got, recompute(model, p + [1, 2]))
    assert eng.sessions.expire(now=time.monotonic() + 30) == 0
    assert eng.sessions.expire(now=time.monotonic() + 61) == 1
    assert all(b.ref_cnt == 0 for b in h.blocks) and not eng.sessions.pins
    h2 = eng.sessions.pin(p)
    eng.sessions.unpin(h2)
    assert all(b.ref_cnt == 0 for b in h2.blocks)
    eng.pool.check()
    with pytest.raises(ValueError, match="ttl must be > 0"):
        eng.sessions.pin(p, ttl=0)


def test_export_import_round_trip_and_refusals(tmp_path):
    model = tiny()
    src = Engine(model, EngineConfig(block_size=4, num_blocks=32), tokenizer="bpe512:aaa")
    p = torch.randint(0, V, (26,)).tolist()
    h = src.sessions.pin(p, salt="t1")
    src.sessions.export(h, tmp_path / "prefix.kv")
    dst = Engine(model, EngineConfig(block_size=4, num_blocks=32), tokenizer="bpe512:aaa")
    h2 = dst.sessions.import_(tmp_path / "prefix.kv", salt="t1")
    assert h2.n_tokens == 24
    got = run(dst, p, salt="t1")
    assert got.cached_tokens == 24
    same(got, recompute(model, p))
    assert run(dst, p, salt="t2").cached_tokens == 0                              # other tenant: no sharing
    with pytest.raises(CheckpointError) as e:                                    # other model and tokenizer
        Engine(tiny(seed=3), EngineConfig(block_size=4, num_blocks=32), tokenizer="gpt2").sessions.import_(
            tmp_path / "prefix.kv")
    assert "2 reason(s)" in str(e.value) and "model_fingerprint" in str(e.value) and "tokenizer: stored 'bpe512:aaa'" in str(e.value)
    with pytest.raises(CheckpointError, match="block_size"):
        Engine(model, EngineConfig(block_size=8, num_blocks=32), tokenizer="bpe512:aaa").sessions.import_(
            tmp_path / "prefix.kv")
    t = next(tmp_path.glob("prefix.kv-*.safetensors"))
    raw = bytearray(t.read_bytes())
    raw[-3] ^= 0x01
    t.write_bytes(bytes(raw))
    fresh = Engine(model, EngineConfig(block_size=4, num_blocks=32), tokenizer="bpe512:aaa")
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        fresh.sessions.import_(tmp_path / "prefix.kv")
    assert fresh.pool.num_free == 32                                              # nothing half-loaded


def test_export_binds_tokens_to_their_kv_and_keeps_other_exports(tmp_path):
    """An edited token id is refused (the seal), and so is one re-sealed by hand (the stored keys
    are no longer the hash chain of the tokens); exporting `s` leaves the files of `s-v2`."""
    model = tiny()
    src = Engine(model, EngineConfig(block_size=4, num_blocks=32))
    h = src.sessions.pin(torch.randint(0, V, (16,)).tolist())
    src.sessions.export(h, tmp_path / "s-v2")
    src.sessions.export(h, tmp_path / "s")
    src.sessions.export(h, tmp_path / "s")                                       # again: replaces its own file only
    assert len(list(tmp_path.glob("s-v2-*.safetensors"))) == 1 and len(list(tmp_path.glob("s-????????????.safetensors"))) == 1
    Engine(model, EngineConfig(block_size=4, num_blocks=32)).sessions.import_(tmp_path / "s-v2")
    mf = tmp_path / "s.json"
    meta = json.loads(mf.read_text())
    meta["tokens"][5] = (meta["tokens"][5] + 1) % V
    mf.write_text(json.dumps(meta, indent=1) + "\n")
    dst = Engine(model, EngineConfig(block_size=4, num_blocks=32))
    with pytest.raises(CheckpointError, match="fails its checksum"):
        dst.sessions.import_(tmp_path / "s")
    write_sealed(mf, meta["kind"], meta["format"], {k: v for k, v in meta.items() if k not in ("kind", "format", "checksum")})
    with pytest.raises(CheckpointError, match="not the hash chain of its tokens"):
        dst.sessions.import_(tmp_path / "s")
    assert dst.pool.num_free == 32
