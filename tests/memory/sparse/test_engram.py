"""Engram: tokenizer compression, N-gram hashing against a plain-Python reference, the hash
layout saved with checkpoints (and refused when it differs), the gated conv read against a
hand-written reference, and offloaded / prefetched tables equal resident ones."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from memstack.backbone.model import build_model
from memstack.checkpoint import load_checkpoint, load_weights, save_checkpoint
from memstack.config import BackboneConfig, ModelConfig
from memstack.errors import CheckpointError, ConfigError
from memstack.memory.base import Step
from memstack.memory.sparse.config import EngramConfig
from memstack.memory.sparse.hashing import build_layout, compression_map, distinct_primes, ngram_rows, normalize_token_text
from memstack.memory.sparse.offload import place_tables
from tolerances import assert_close

BB = BackboneConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, seg_len=16)
SMALL = dict(rows_per_head=13, heads=2, head_dim=4)


def test_normalization_chain():
    assert normalize_token_text(" The") == "the"
    assert normalize_token_text("Ｔｈｅ") == "the"                # NFKC folds full-width letters
    assert normalize_token_text("café") == normalize_token_text("CAFE") == "cafe"   # accents stripped
    assert normalize_token_text("\t\n ") == " "                   # a lone space is kept
    assert normalize_token_text(" a \n b ") == "a b"


def test_compression_map_is_surjective_first_seen_with_raw_and_special_keys():
    toks = [b" The", b"the", b"THE", b"\xc3", b"\xc3", b"x", None, b"  "]
    m, vp = compression_map(toks)
    assert m.tolist() == [0, 0, 0, 1, 1, 2, 3, 4] and vp == 5   # partial UTF-8 keyed by raw bytes; EOT its own


def test_bpe512_compression_shrinks_the_vocabulary():
    from memstack.data.tokenizers import get_tokenizer

    lay = build_layout(512, 1, (2, 3), 2, 7, 0, get_tokenizer("bpe512"))
    assert 300 < lay.compressed_vocab < 512
    assert lay.token_map.max() == lay.compressed_vocab - 1 and lay.pad_id == lay.compressed_vocab


def _py_rows(lay, layer, comp_row, t):
    """Plain-Python reference of one token's rows: int64-wrapping multiply-XOR, mod each prime."""
    wrap = lambda x: (x + 2**63) % 2**64 - 2**63  # noqa: E731
    out = []
    for oi, n in enumerate(lay.orders):
        mix = 0
        for j in range(n):
            mix ^= wrap(int(comp_row[t - j]) * int(lay.multipliers[layer, j]))
        for k in range(lay.heads):
            p = int(lay.sizes[layer, oi, k])
            out.append(mix % p + int(lay.offsets[layer, oi, k]))
    return out


def test_hash_matches_python_reference_and_primes_are_distinct():
    lay = build_layout(97, 2, (2, 3, 4), 3, 50, seed=5)
    sizes = lay.sizes.flatten().tolist()
    assert sizes == distinct_primes(50, 18) and len(set(sizes)) == 18 and min(sizes) >= 50
    assert lay.total_rows == sum(sizes) and lay.offsets.flatten().tolist() == [sum(sizes[:i]) for i in range(18)]
    assert (lay.multipliers % 2 == 1).all()
    comp = torch.randint(0, 98, (2, 3 + 11))
    for layer in range(2):
        got = ngram_rows(lay, layer, comp)                         # (2, 11, 9)
        for b in range(2):
            for t in range(11):
                assert got[b, t].tolist() == _py_rows(lay, layer, comp[b].tolist(), t + 3)
    assert not torch.equal(ngram_rows(lay, 0, comp), ngram_rows(lay, 1, comp))   # per-layer multipliers


def test_one_row_control_gives_every_head_one_row():
    lay = build_layout(97, 1, (2, 3), 4, 1, seed=0)
    assert lay.sizes.flatten().tolist() == [1] * 8 and lay.total_rows == 8
    rows = ngram_rows(lay, 0, torch.randint(0, 97, (1, 9)))
    assert rows[0].tolist() == [list(range(8))] * 7


def _reference_block(mem, h, tokens, j=0):
    """Engram's read for one whole document from scratch (pad history, zero conv history)."""
    lay = mem.layout
    comp = torch.cat([torch.full((h.shape[0], lay.max_order - 1), lay.pad_id), lay.token_map[tokens]], 1)
    rows = ngram_rows(lay, j, comp)
    e = mem.table.weight[rows].flatten(2)
    k, v = e @ mem.w_k[j].weight.T, e @ mem.w_v[j].weight.T
    rms = lambda x, w: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w  # noqa: E731
    a = torch.sigmoid((rms(h, mem.norm_h[j].weight) * rms(k, mem.norm_k[j].weight)).sum(-1) / math.sqrt(h.shape[-1]))
    vt = a[..., None] * v
    u = rms(vt, mem.norm_v[j].weight)
    dil, K = mem.dilation, mem.cfg.kernel_size
    y = torch.zeros_like(u)
    for t in range(u.shape[1]):                                    # y_t = sum_i w[:, i] * u_{t - i*dil}
        for i in range(K):
            if t - i * dil >= 0:
                y[:, t] += mem.conv[j][:, i] * u[:, t - i * dil]
    return h + F.silu(y) + vt


def test_block_matches_hand_written_reference_across_segments():
    torch.manual_seed(0)
    model = build_model(ModelConfig(BB, (EngramConfig(layers=(1,), **SMALL),)))
    mem = model.memory.memories[0]
    with torch.no_grad():
        for p in mem.parameters():
            p.add_(0.3 * torch.randn_like(p))
        tokens = torch.randint(0, 97, (2, 20))
        h = torch.randn(2, 20, 32)
        want = _reference_block(mem, h, tokens)
        state = mem.init_state(2, torch.device("cpu"), torch.float32)
        outs = []
        for lo, hi in [(0, 7), (7, 8), (8, 20)]:                   # any split of the document gives the same
            from memstack.memory.base import StepContext

            ctx = StepContext(tokens[:, lo:hi], torch.full((2,), lo), torch.zeros(2, dtype=torch.bool), True, True, False)
            out, state = mem.block(1, h[:, lo:hi], state, ctx)
            outs.append(out)
    assert_close(torch.cat(outs, 1), want)


def test_tokenizer_config_must_match_the_backbone():
    with pytest.raises(ConfigError, match="bpe512.*512 ids but the backbone's vocab_size is 97"):
        ModelConfig(BB, (EngramConfig(tokenizer="bpe512"),))
    with pytest.raises(ConfigError) as e:
        EngramConfig(orders=(2, 2), heads=0, tokenizer="nope")
    assert len(e.value.reasons) == 3


def test_checkpoint_carries_the_layout_and_refuses_a_different_one(tmp_path):
    bb = BackboneConfig(vocab_size=512, d_model=32, n_layers=2, n_heads=4, seg_len=16)
    cfg = ModelConfig(bb, (EngramConfig(tokenizer="bpe512", **SMALL),))
    model = build_model(cfg)
    save_checkpoint(model, tmp_path / "ck")
    loaded, _ = load_checkpoint(tmp_path / "ck")
    x = torch.randint(0, 512, (1, 16))
    assert torch.equal(loaded.eval()(x)[0].logits, model.eval()(x)[0].logits)
    # a model whose layout derives differently (here: compression off = another token map) is refused
    other = build_model(ModelConfig(bb, (EngramConfig(tokenizer="bpe512", compress=False, **SMALL),)))
    other.cfg = cfg                                   # same config on paper, different layout in fact
    with pytest.raises(CheckpointError, match="hash layout differs in token map"):
        load_weights(other, tmp_path / "ck")
    # a tampered token map in the file (a checkpoint from another tokenizer) is refused too
    from safetensors.torch import load_file, save_file

    import json

    meta = json.loads((tmp_path / "ck" / "config.json").read_text())
    sd = load_file(str(tmp_path / "ck" / meta["weights"]))
    sd["memory.memories.0.layout_token_map"] = torch.arange(512)
    save_checkpoint(model, tmp_path / "ck2")
    meta2 = json.loads((tmp_path / "ck2" / "config.json").read_text())
    save_file(sd, str(tmp_path / "ck2" / meta2["weights"]))
    from memstack.atomic import sha256_file, write_sealed

    meta2["sha256"] = sha256_file(tmp_path / "ck2" / meta2["weights"])     # re-sealed: a consistent, foreign file
    write_sealed(tmp_path / "ck2" / "config.json", meta2["kind"], meta2["format"],
                 {k: v for k, v in meta2.items() if k not in ("kind", "format", "checksum")})
    with pytest.raises(CheckpointError, match="token map"):
        load_checkpoint(tmp_path / "ck2")


@pytest.mark.parametrize("residency", ["host", "disk"])
def test_offloaded_prefetched_table_equals_resident(residency, tmp_path):
    torch.manual_seed(1)
    model = build_model(ModelConfig(BB, (EngramConfig(layers=(0, 1), **SMALL),)))
    with torch.no_grad():
        for p in model.memory.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randint(0, 97, (2, 3 * 16))
    ref, grads_ref = _run(model, x)
    place_tables(model, residency, tmp_path)
    t = model.memory.memories[0].table
    assert t.residency == residency and t.prefetch
    if residency == "disk":
        assert (tmp_path / "memory.memories.0.table.rows").stat().st_size == t.weight.numel() * 4
    got, grads = _run(model, x)
    assert torch.equal(got, ref)
    assert torch.equal(grads, grads_ref)                 # the sparse gradient reaches the offloaded rows


def _run(model, x):
    model.train()
    model.zero_grad()
    state, outs = None, []
    for s in range(3):
        out, state = model(x[:, s * 16:(s + 1) * 16], state, Step())
        outs.append(out.logits)
    logits = torch.cat(outs, 1)
    logits.sum().backward()
    return logits.detach(), model.memory.memories[0].table.weight.grad.to_dense()
