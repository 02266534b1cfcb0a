"""Block pool, prefix keys and the KV cache manager: pure Python, exact block ids and eviction
order (the way vLLM tests its pool: no tensors, no GPU)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from memstack.memory.kv.block_pool import BlockPool
from memstack.memory.kv.hashing import CacheNamespace, block_hash, chain_hashes
from memstack.memory.kv.manager import KVCacheManager

BS = 4
NS = CacheNamespace("model-a", "bpe512:abc", "float32", block_size=BS)


def mgr(n=10):
    return KVCacheManager(BlockPool(n), BS)


# ------------------------------------------------------------------------------------ pool

def test_allocation_order_and_free_queue_is_eviction_order():
    pool = BlockPool(6)
    a = pool.allocate(2)
    b = pool.allocate(3)
    assert [x.id for x in a] == [0, 1] and [x.id for x in b] == [2, 3, 4]
    assert pool.free.ids() == [5]
    pool.release(reversed(b))                          # a request frees tail first
    assert pool.free.ids() == [5, 4, 3, 2]
    pool.release(a)
    assert pool.free.ids() == [5, 4, 3, 2, 0, 1]
    assert [x.id for x in pool.allocate(3)] == [5, 4, 3]
    pool.check()


def test_allocate_is_all_or_nothing():
    pool = BlockPool(3)
    pool.allocate(2)
    with pytest.raises(MemoryError, match="asked for 2 KV blocks, 1 free of 3"):
        pool.allocate(2)
    assert pool.free.ids() == [2]
    pool.check()


def test_touch_unlinks_cached_free_block_and_double_free_is_refused():
    pool = BlockPool(4)
    b = pool.allocate(2)
    assert pool.cache(b[0], b"k0") and not pool.cache(b[1], b"k0")   # duplicate key stays private
    pool.release(b)
    assert pool.free.ids() == [2, 3, 0, 1]
    hit = pool.lookup(b"k0")
    assert hit is b[0]
    pool.touch([hit])
    assert pool.free.ids() == [2, 3, 1] and hit.ref_cnt == 1
    pool.release([hit])
    with pytest.raises(RuntimeError, match="double free"):
        pool.release([hit])
    pool.check()


def test_eviction_removes_the_key_and_records_events():
    pool = BlockPool(2)
    a = pool.allocate(1)[0]
    pool.cache(a, b"x")
    pool.release([a])
    assert pool.lookup(b"x") is a                      # free but still cached
    pool.allocate(1)                                   # block 1 (head of queue)
    pool.allocate(1)                                   # block 0: evicts "x"
    assert pool.lookup(b"x") is None
    assert pool.pop_events() == [("stored", b"x"), ("removed", b"x")]
    pool.check()


# ------------------------------------------------------------------------------------ keys

def test_keys_chain_and_depend_on_every_namespace_field_and_salt():
    toks = list(range(12))
    h = chain_hashes(NS.root(), toks, BS)
    assert len(h) == 3 and h[1] == block_hash(h[0], toks[4:8])
    assert chain_hashes(NS.root(), [99] + toks[1:], BS)[2] != h[2]   # a change early changes every later key
    roots = {NS.root(), NS.root("tenant-1"), NS.root("tenant-2")}
    for f, v in [("model_fingerprint", "model-b"), ("tokenizer", "gpt2"), ("dtype", "bfloat16"), ("quant", "kivi2"),
                 ("block_size", 8), ("version", 99)]:
        roots.add(CacheNamespace(**{**NS.to_dict(), f: v}).root())
    assert len(roots) == 9
    assert NS.mismatches(CacheNamespace("model-b", "gpt2", "float32", block_size=BS)) == [
        "model_fingerprint: stored 'model-b', this engine 'model-a'", "tokenizer: stored 'gpt2', this engine 'bpe512:abc'"]


def test_keys_do_not_depend_on_pythonhashseed():
    """Three interpreters with different hash seeds compute the same key (hashing.py loaded on its
    own, so the subprocesses stay light)."""
    import memstack.memory.kv.hashing as hashing

    code = ("import importlib.util, sys; s = importlib.util.spec_from_file_location('h', sys.argv[1]); "
            "h = importlib.util.module_from_spec(s); sys.modules['h'] = h; s.loader.exec_module(h); "
            "print(h.chain_hashes(h.CacheNamespace('m', block_size=4).root('t'), list(range(9)), 4)[-1].hex())")
    outs = set()
    for seed in ("0", "1", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        outs.add(subprocess.run([sys.executable, "-c", code, hashing.__file__], env=env, capture_output=True, text=True,
                                check=True).stdout)
    here = chain_hashes(CacheNamespace("m", block_size=4).root("t"), list(range(9)), 4)[-1].hex()
    assert outs == {here + "\n"}


# ------------------------------------------------------------------------------------ manager

def run_seq(m, tokens, root=None):
    s = m.new_seq(root or NS.root())
    hit = m.match_prefix(s, tokens, len(tokens) - 1)
    m.allocate(s, len(tokens) - hit)
    m.commit(s, tokens, len(tokens) - hit)
    return s, hit


def test_prefix_hit_exact_blocks_and_eviction_order():
    m = mgr(10)
    a, hit = run_seq(m, list(range(10)))               # 3 blocks: 2 full (cached) + 1 partial
    assert hit == 0 and a.block_ids == [0, 1, 2] and a.n_slots == 10
    assert [m.pool.lookup(k).id for k in a.hashes] == [0, 1]
    b, hit = run_seq(m, list(range(8)) + [50, 51, 52, 53, 54])
    assert hit == 8 and b.block_ids == [0, 1, 3, 4]
    assert [x.ref_cnt for x in m.pool.blocks[:5]] == [2, 2, 1, 1, 1]
    m.free(a)
    assert m.pool.free.ids() == [5, 6, 7, 8, 9, 2]      # only a's private tail is free
    m.free(b)
    assert m.pool.free.ids() == [5, 6, 7, 8, 9, 2, 4, 3, 1, 0]
    # b's cached tail block (3: tokens 8..11 of b) is kept findable until popped
    c, hit = run_seq(m, list(range(8)) + [50, 51, 52, 53, 0])
    assert hit == 12 and c.block_ids == [0, 1, 3, 5]
    assert m.pool.free.ids() == [6, 7, 8, 9, 2, 4]
    m.pool.check()


def test_a_whole_cached_prompt_still_computes_its_last_token():
    m = mgr(6)
    a, _ = run_seq(m, list(range(8)))
    m.free(a)
    b, hit = run_seq(m, list(range(8)))
    assert hit == 4 and b.block_ids == [0, 2]           # block 0 hit; the last block is recomputed in a fresh one
    m.pool.check()


def test_salted_prefixes_are_never_shared_across_tenants():
    m = mgr(16)
    toks = list(range(13))
    a, _ = run_seq(m, toks, NS.root("alice"))
    b, hit = run_seq(m, toks, NS.root("bob"))
    assert hit == 0 and not set(a.block_ids) & set(b.block_ids)
    c, hit = run_seq(m, toks, NS.root("alice"))
    assert hit == 12 and c.block_ids[:3] == a.block_ids[:3]
    d, hit = run_seq(m, toks, NS.root())               # the unsalted namespace is a tenant of its own
    assert hit == 0
    m.pool.check()


def test_copy_on_write_of_a_shared_partial_tail():
    m = mgr(8)
    a, _ = run_seq(m, list(range(6)))                  # blocks [0, 1], block 1 half full
    f = m.fork(a)
    assert [b.ref_cnt for b in a.blocks] == [2, 2]
    assert m.blocks_needed(f, 1) == 1
    copies = m.allocate(f, 1)
    assert copies == [(1, 2)] and f.block_ids == [0, 2] and a.block_ids == [0, 1]
    assert [b.ref_cnt for b in m.pool.blocks[:3]] == [2, 1, 1]
    assert m.allocate(a, 1) == []                      # a owns block 1 alone again: no copy
    m.pool.check()


def test_allocate_failure_changes_nothing():
    m = mgr(3)
    a, _ = run_seq(m, list(range(6)))
    before = (a.block_ids, m.pool.free.ids(), [b.ref_cnt for b in m.pool.blocks])
    with pytest.raises(MemoryError):
        m.allocate(a, 20)
    assert (a.block_ids, m.pool.free.ids(), [b.ref_cnt for b in m.pool.blocks]) == before


def test_set_start_frees_whole_leading_blocks_only():
    m = mgr(8)
    a, _ = run_seq(m, list(range(14)))                  # blocks [0,1,2,3]
    m.set_start(a, 6)                                   # block 0 wholly invisible
    assert a.block_ids == [1, 2, 3] and a.start == 2 and a.n_slots == 10 and a.n_dropped == 1
    assert m.pool.free.ids()[-1] == 0
    m.allocate(a, 3)
    m.commit(a, list(range(17)), 3)
    assert len(a.hashes) == 4 and m.pool.lookup(a.hashes[3]).id == a.block_ids[2]
    m.pool.check()
