"""Prefix-tuning: the prefix is exactly extra keys/values in front of every segment (checked
against a hand-written one-layer forward), its MLP reparameterisation computes each layer's
slice of one MLP, every segment sees it at the same relative distance, and prefix-tuning on a
frozen backbone trains the prefix while the backbone stays bit-identical -- also end to end,
from a trained backbone checkpoint (`init_from`) through the run config."""
from __future__ import annotations

import math

import pytest
import torch

from memstack.backbone.layers import apply_rope, rope_tables
from memstack.backbone.model import build_model
from memstack.config import BackboneConfig, ModelConfig
from memstack.data.packing import Batch
from memstack.memory.learned.config import PrefixConfig
from memstack.train.config import TrainConfig
from memstack.train.trainer import Trainer
from tolerances import assert_close

S = 8


def test_prefix_is_extra_keys_values_before_the_segment_one_layer_by_hand():
    b = BackboneConfig(vocab_size=41, d_model=16, n_layers=1, n_heads=4, n_kv_heads=2, seg_len=S)
    torch.manual_seed(0)
    m = build_model(ModelConfig(b, (PrefixConfig(n_prefix=3, reparam=False, init_std=0.5),))).eval()
    P = 3
    tokens = torch.randint(0, 41, (2, 2 * S))
    with torch.no_grad():
        _, st = m(tokens[:, :S])
        got, _ = m(tokens[:, S:], st)                                   # segment 2: positions S..2S-1
        blk, kv = m.blocks[0], m.memory.memories[0].kv[0]             # kv (2, Hkv, P, hd)
        x = m.tok_emb(tokens[:, S:])
        xn = blk.attn_norm(x)
        q = blk.attn.wq(xn).view(2, S, 4, 4).transpose(1, 2)
        k = blk.attn.wk(xn).view(2, S, 2, 4).transpose(1, 2)
        v = blk.attn.wv(xn).view(2, S, 2, 4).transpose(1, 2)
        cos, sin = rope_tables(torch.arange(S - P, 2 * S).expand(2, -1), 4, b.rope_theta, x.dtype)
        q = apply_rope(q, cos[:, :, P:], sin[:, :, P:])
        k = apply_rope(k, cos[:, :, P:], sin[:, :, P:])
        kp = apply_rope(kv[0].expand(2, -1, -1, -1), cos[:, :, :P], sin[:, :, :P])   # prefix at S-3..S-1
        K = torch.cat([kp, k], 2).repeat_interleave(2, 1)              # (B, H, P+S, hd)
        V = torch.cat([kv[1].expand(2, -1, -1, -1), v], 2).repeat_interleave(2, 1)
        mask = torch.cat([torch.ones(S, P, dtype=torch.bool), torch.ones(S, S, dtype=torch.bool).tril()], 1)
        att = (q @ K.transpose(-1, -2) / math.sqrt(4)).masked_fill(~mask, float("-inf")).softmax(-1) @ V
        h = x + blk.attn.wo(att.transpose(1, 2).reshape(2, S, 16))
        h = h + blk.mlp(blk.mlp_norm(h))
        want = m.lm_head(m.norm(h))
    assert_close(got.logits, want)


def test_reparameterised_layer_slices_are_the_one_mlp():
    b = BackboneConfig(vocab_size=41, d_model=16, n_layers=3, n_heads=4, n_kv_heads=2, seg_len=S)
    m = build_model(ModelConfig(b, (PrefixConfig(n_prefix=5, reparam_hidden=24, layers=(0, 2)),)))
    mem = m.memory.memories[0]
    full = mem.prefix_kv()                                             # (2 layers, 2, Hkv, P, hd)
    assert full.shape == (2, 2, 2, 5, 4)
    want = mem.mlp(mem.emb).view(5, 2, 2, 2, 4)                        # (P, L, k/v, Hkv, hd)
    for j in range(2):
        assert_close(mem._layer_kv(j), full[j])
        assert_close(full[j], want[:, j].permute(1, 2, 0, 3))
    assert m.memory._attn_at == [[0], [], [0]]


def test_every_segment_sees_the_prefix_at_the_same_distance():
    """No state crosses segments, and RoPE is relative: the same segment at any segment-aligned
    document position gives the same logits."""
    b = BackboneConfig(vocab_size=41, d_model=16, n_layers=2, n_heads=4, seg_len=S)
    m = build_model(ModelConfig(b, (PrefixConfig(n_prefix=4),))).eval()
    seg = torch.randint(0, 41, (1, S))
    with torch.no_grad():
        st, outs = None, []
        for _ in range(4):
            out, st = m(seg, st)
            outs.append(out.logits)
    for o in outs[1:]:
        assert_close(o, outs[0])


class _Skewed:
    """Tokens i.i.d. from a fixed skewed distribution: a frozen random backbone cannot predict
    them, a prefix can learn to (it shifts every position's output the same way)."""

    def __init__(self, vocab: int, rows: int):
        self.g = torch.Generator().manual_seed(0)
        self.p = torch.softmax(torch.randn(vocab, generator=self.g) * 3, 0)
        self.rows = rows

    def next(self, n: int) -> Batch:
        t = torch.multinomial(self.p, self.rows * n * (S + 1), replacement=True, generator=self.g).view(self.rows, n, S + 1)
        return Batch(t[..., :-1].contiguous(), t[..., 1:].contiguous(), torch.ones(self.rows, n, dtype=torch.bool))

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, d: dict) -> None:
        pass


def test_prefix_tuning_on_a_frozen_backbone_trains_only_the_prefix():
    # init_std 0.2: weights of a trained model's size (at 0.02 a random backbone barely passes
    # the prefix's values on to the logits)
    b = BackboneConfig(vocab_size=41, d_model=16, n_layers=2, n_heads=4, seg_len=S, init_std=0.2)
    torch.manual_seed(0)
    m = build_model(ModelConfig(b, (PrefixConfig(n_prefix=4, reparam_hidden=32),)))
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    tr = Trainer(m, TrainConfig(lr=3e-2, warmup_steps=1, max_steps=40, batch_size=8, n_segments=1, trainable="memory",
                                progress=False, weight_decay=0.0), _Skewed(41, 8))
    losses = [tr.train_step()["loss"] for _ in range(40)]
    for n, p in m.named_parameters():
        if n.startswith("memory."):
            assert not torch.equal(p, before[n]), n
        else:
            assert torch.equal(p, before[n]), n
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3, losses


def test_prefix_tuning_from_a_trained_backbone_leaves_it_bit_identical(tmp_path):
    """Train a plain backbone (run config), then prefix-tune it with `init_from` and
    `train.trainable: memory`: every backbone tensor of the tuned checkpoint equals the trained
    backbone's, bit for bit, and the prefix was trained."""
    import json

    from safetensors.torch import load_file

    from memstack.checkpoint import read_checkpoint_config
    from memstack.train.run import latest_checkpoint, run_config_from_dict, run_training

    base = {"model": {"d_model": 16, "n_layers": 2, "n_heads": 2, "seg_len": 16},
            "task": {"kind": "mqar", "vocab": 64, "seq_len": 32, "num_kv_pairs": 4, "n_train": 64, "n_test": 16},
            "train": {"lr": 3e-3, "max_steps": 3, "warmup_steps": 1, "batch_size": 4, "progress": False}, "device": "cpu"}
    run_training(run_config_from_dict({**base, "out_dir": str(tmp_path / "backbone")}), progress=False)
    tuned = {**base, "memories": [{"kind": "prefix", "n_prefix": 4, "reparam_hidden": 16}],
             "train": {**base["train"], "trainable": "memory"}, "init_from": str(tmp_path / "backbone"),
             "out_dir": str(tmp_path / "prefix")}
    run_training(run_config_from_dict(tuned), progress=False)

    def weights(d):
        ck = latest_checkpoint(d)
        return load_file(str(ck / json.loads((ck / "config.json").read_text())["weights"])), ck

    w0, _ = weights(tmp_path / "backbone")
    w1, ck1 = weights(tmp_path / "prefix")
    assert set(w0) == {k for k in w1 if not k.startswith("memory.")}
    for k, t in w0.items():
        assert torch.equal(t, w1[k]), k
    cfg, meta = read_checkpoint_config(ck1)
    assert cfg.memories[0].kind == "prefix" and meta["init_from"] == str(tmp_path / "backbone")
    torch.manual_seed(0)   # a fresh prefix (same seed as the run) differs from the tuned one
    fresh = build_model(cfg)
    from memstack.checkpoint import load_backbone_weights

    load_backbone_weights(fresh, ck1)
    assert not torch.equal(fresh.memory.memories[0].emb.detach(), w1["memory.memories.0.emb"])


def test_init_from_refuses_a_different_backbone(tmp_path):
    from memstack.checkpoint import load_backbone_weights, save_checkpoint
    from memstack.errors import CheckpointError

    b = BackboneConfig(vocab_size=41, d_model=16, n_layers=2, n_heads=4, seg_len=S)
    save_checkpoint(build_model(ModelConfig(b, ())), tmp_path / "a")
    other = build_model(ModelConfig(BackboneConfig(vocab_size=41, d_model=16, n_layers=1, n_heads=4, seg_len=S),
                                    (PrefixConfig(n_prefix=2),)))
    with pytest.raises(CheckpointError, match="backbone.n_layers"):
        load_backbone_weights(other, tmp_path / "a")
    ok = build_model(ModelConfig(b, (PrefixConfig(n_prefix=2),)))
    prefix_before = ok.memory.memories[0].emb.detach().clone()
    load_backbone_weights(ok, tmp_path / "a")
    assert torch.equal(ok.memory.memories[0].emb, prefix_before)     # memories untouched
