"""Per-user identity rows read as a key/value prefix (memory/learned/user_prefix.py): the read is
exactly the hand-written gated, position-free prefix attention (with a null slot) for the rows of a user with a
table; every other row -- and a user whose fresh table has learned nothing -- computes the plain
model bit for bit; the rows learn online through the same updater as Engram's and PKM's."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from memstack.backbone.layers import apply_rope, rope_tables
from memstack.backbone.model import build_model
from memstack.config import BackboneConfig, ModelConfig
from memstack.engine.user_memory import LearnConfig, UserMemory
from memstack.errors import ConfigError
from memstack.memory.base import Step
from memstack.memory.learned.config import PrefixConfig
from tolerances import assert_close

S, V = 8, 41
A, B, T = "tenant:t/user:a", "tenant:t/user:b", "tenant:t/task:q"


def one_layer(K: int = 3, gate: float = 0.7):
    torch.manual_seed(0)
    b = BackboneConfig(vocab_size=V, d_model=16, n_layers=1, n_heads=4, n_kv_heads=2, seg_len=S, init_std=0.3)
    return build_model(ModelConfig(b, (PrefixConfig(n_prefix=0, user_prefix=K, user_gate=gate),))).eval()


def random_table(m, ns: str, seed: int = 1):
    rows = m.memory.memories[0].namespace_rows()
    g = torch.Generator().manual_seed(seed)
    rows.install(ns, torch.randn(rows.rows, rows.dim, generator=g))
    return rows.table(ns).weight


def reference(m, tokens, tables, gate: float = 0.7):
    """Logits of one row (1, S) at positions S..2S-1 by hand: causal attention plus, per table
    (K, 2 * Hkv * hd), gate * its position-free prefix read with a null slot (score 0, value 0)."""
    blk = m.blocks[0]
    x = m.tok_emb(tokens)
    xn = blk.attn_norm(x)
    q0 = blk.attn.wq(xn).view(1, S, 4, 4).transpose(1, 2)              # un-rotated queries
    k = blk.attn.wk(xn).view(1, S, 2, 4).transpose(1, 2)
    v = blk.attn.wv(xn).view(1, S, 2, 4).transpose(1, 2)
    cos, sin = rope_tables(torch.arange(S, 2 * S)[None], 4, m.cfg.backbone.rope_theta, x.dtype)
    q, k = apply_rope(q0, cos, sin), apply_rope(k, cos, sin)
    causal = torch.ones(S, S, dtype=torch.bool).tril()
    K2, V2 = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    att = (q @ K2.transpose(-1, -2) / 2).masked_fill(~causal, float("-inf")).softmax(-1) @ V2
    for w in tables:
        kv = w.view(3, 2, 2, 4)                                       # (K, k/v, Hkv, hd)
        kp = kv[:, 0].transpose(0, 1).repeat_interleave(2, 0)          # (H, K, hd)
        vp = kv[:, 1].transpose(0, 1).repeat_interleave(2, 0)
        sc = (q0 @ kp.transpose(-1, -2)) / math.sqrt(4)                # (1, H, S, K)
        att = att + gate * (sc.exp() / (1 + sc.exp().sum(-1, keepdim=True))) @ vp
    h = x + blk.attn.wo(att.transpose(1, 2).reshape(1, S, 16))
    h = h + blk.mlp(blk.mlp_norm(h))
    return m.lm_head(m.norm(h))


def test_a_users_rows_are_a_gated_position_free_prefix_by_hand():
    m = one_layer()
    wa, wt = random_table(m, A), random_table(m, T, seed=2)            # (K, 2 * Hkv * hd): slot p = [k | v]
    tokens = torch.randint(0, V, (5, 2 * S))
    names = (A, B, None, (A, T), T)                                   # a user; no table; no user; user + task; task
    with torch.no_grad():
        _, st = m(tokens[:, :S], None, Step(), namespaces=names)
        got, _ = m(tokens[:, S:], st, Step(), namespaces=names)       # segment 2: positions S..2S-1
        plain = m.without_memories([0])
        _, pst = plain(tokens[:, :S])
        want_plain, _ = plain(tokens[:, S:], pst)
        for i, tables in ((0, [wa]), (3, [wa, wt]), (4, [wt])):
            assert_close(got.logits[i:i + 1], reference(m, tokens[i:i + 1, S:], tables))
    assert torch.equal(got.logits[1:3], want_plain.logits[1:3])       # b (no table) and no user: the plain model
    assert not torch.allclose(got.logits[0], want_plain.logits[0], atol=1e-3)


def test_a_fresh_table_reads_as_nothing_bit_for_bit():
    m = one_layer()
    rows = m.memory.memories[0].namespace_rows()
    fresh = rows.new_table(A)
    half = rows.dim // 2
    w = fresh.weight.detach().view(rows.rows, 2, half)
    assert w[:, 1].abs().max() == 0 and w[:, 0].abs().min() > 0   # random keys (symmetry broken), zero values
    assert torch.equal(rows.new_table(B).weight, fresh.weight)    # the same start for every namespace
    rows.install(A, fresh)
    tokens = torch.randint(0, V, (2, S))
    with torch.no_grad():
        got = m(tokens, None, Step(), namespaces=(A, B))[0].logits
        plain = m.without_memories([0])(tokens)[0].logits
    assert torch.equal(got, plain)


def test_rows_learn_online_and_copies_keep_them(tmp_path):
    torch.manual_seed(0)
    b = BackboneConfig(vocab_size=256, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, seg_len=64, init_std=0.3)
    m = build_model(ModelConfig(b, (PrefixConfig(n_prefix=0, user_prefix=4, layers=(0, 1)),))).eval()
    canary = [[0] + list(b"the quick brown fox jumps over the lazy dog")]
    mem = UserMemory(m, tmp_path, LearnConfig(lr=1.0, steps=6, max_row_update_norm=100.0, drift_threshold=10.0), canary)
    fact = [0] + list(b"my dog is called Rex.")
    out = mem.learn(A, [fact], mem.rows.install)
    assert out["rows_written"] == 2 * 4 and out["loss_last"] < out["loss_first"]   # every slot of both layers
    assert mem.export(A)["rows"] == 8
    x = torch.tensor([fact[:-1]] * 2)
    with torch.no_grad():
        lg = m(x, None, Step(), namespaces=(A, B))[0].logits.log_softmax(-1)
    nll = [-lg[i, torch.arange(x.shape[1]), torch.tensor(fact[1:])].mean() for i in range(2)]
    assert nll[0] < nll[1] - 0.5                                      # alice's fact, for alice only
    twin = copy.deepcopy(m)                                           # a model copy takes the installed rows
    rows2 = twin.memory.memories[0].namespace_rows()
    assert torch.equal(rows2.table(A).weight, mem.rows.table(A).weight) and rows2.table(A) is not mem.rows.table(A)


def test_config_reasons_are_all_reported():
    with pytest.raises(ConfigError) as e:
        PrefixConfig(n_prefix=0, user_prefix=-1, user_gate=float("nan"), user_key_init_std=0.0, user_write_quota=0)
    msg = str(e.value)
    assert all(s in msg for s in ("user_prefix", "user_gate", "user_key_init_std", "user_write_quota"))
    with pytest.raises(ConfigError, match="n_prefix"):
        PrefixConfig(n_prefix=0)                                      # neither a shared nor a per-user prefix
    assert PrefixConfig(n_prefix=0, user_prefix=2).user_prefix == 2
