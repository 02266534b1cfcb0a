"""Adapter-only checkpoints: only the memories are written; they load onto the backbone they were
trained on (by fingerprint) and refuse any other, listing every reason; corruption is caught."""
from __future__ import annotations

import json

import pytest
import torch

from memstack.adapters import (backbone_fingerprint, load_adapter, model_from_adapter, read_adapter,
                               save_adapter)
from memstack.backbone import build_model
from memstack.checkpoint import save_checkpoint
from memstack.config import BackboneConfig, ModelConfig
from memstack.errors import CheckpointError
from memstack.memory.learned.config import MemoryTokensConfig, PrefixConfig
from memstack.memory.sparse.config import EngramConfig


def bb(**kw) -> BackboneConfig:
    return BackboneConfig(**{**dict(vocab_size=67, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, seg_len=16,
                                    init_std=0.2), **kw})


MEMS = (PrefixConfig(n_prefix=3, reparam_hidden=16), MemoryTokensConfig(n_tokens=2))


def trained(seed=0, mems=MEMS, **kw):
    torch.manual_seed(seed)
    m = build_model(ModelConfig(bb(**kw), mems))
    with torch.no_grad():   # "training": memories move away from their initialisation
        for n, p in m.named_parameters():
            if n.startswith("memory."):
                p.add_(torch.randn_like(p) * 0.3)
    return m.eval()


def fresh_like(model, seed=5):
    """The same backbone (weights copied) with freshly initialised memories."""
    torch.manual_seed(seed)
    m = build_model(model.cfg)
    m.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("memory.")}, strict=False)
    return m.eval()


def test_adapter_holds_only_the_memories_and_restores_them_exactly(tmp_path):
    m = trained()
    save_adapter(m, tmp_path / "a", meta={"task": "x"})
    files = sorted((p.name for p in (tmp_path / "a").iterdir() if p.name != ".lock"), reverse=True)
    assert files[0] == "adapter.json" and files[1].startswith("adapter-") and len(files) == 2
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "a" / files[1]))
    assert set(saved) == {k for k in m.state_dict() if k.startswith("memory.")}
    n_mem = sum(v.numel() for v in saved.values())
    assert n_mem == sum(p.numel() for n, p in m.named_parameters() if n.startswith("memory."))
    doc = read_adapter(tmp_path / "a")
    assert doc["backbone_sha256"] == backbone_fingerprint(m) and doc["meta"] == {"task": "x"}
    assert [d["kind"] for d in doc["memories"]] == ["prefix", "memory_tokens"]
    other = fresh_like(m)
    x = torch.randint(0, 67, (2, 16))
    assert not torch.allclose(other(x)[0].logits, m(x)[0].logits)
    assert load_adapter(other, tmp_path / "a") == {"task": "x"}
    assert torch.equal(other(x)[0].logits, m(x)[0].logits)


def test_fingerprint_sees_every_backbone_byte_and_ignores_memories():
    m = trained()
    fp = backbone_fingerprint(m)
    assert fp == backbone_fingerprint(fresh_like(m))                 # memories differ, backbone equal
    with torch.no_grad():
        m.blocks[1].mlp.w_up.weight[3, 5] += 1e-7
    assert backbone_fingerprint(m) != fp
    assert backbone_fingerprint(trained(seed=1)) != fp


def test_a_different_backbone_is_refused_with_both_fingerprints(tmp_path):
    m = trained()
    save_adapter(m, tmp_path / "a", pretrained="smollm2")
    other = trained(seed=1)                                          # same architecture, other weights
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(CheckpointError) as e:
        load_adapter(other, tmp_path / "a")
    msg = str(e.value)
    assert backbone_fingerprint(m)[:16] in msg and backbone_fingerprint(other)[:16] in msg
    assert "'smollm2'" in msg and "model_from_adapter" in msg
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())   # nothing loaded


def test_other_architecture_or_memories_list_every_reason(tmp_path):
    save_adapter(trained(), tmp_path / "a")
    wrong = build_model(ModelConfig(bb(d_model=64, n_layers=3), (PrefixConfig(n_prefix=4, reparam_hidden=16),
                                                                   MemoryTokensConfig(n_tokens=5))))
    with pytest.raises(CheckpointError) as e:
        load_adapter(wrong, tmp_path / "a")
    msg = str(e.value)
    for what in ("backbone.d_model", "backbone.n_layers", "memories.0.n_prefix", "memories.1.n_tokens"):
        assert what in msg, what


def test_seg_len_is_free(tmp_path):
    m = trained()
    save_adapter(m, tmp_path / "a")
    longer, _ = model_from_adapter(tmp_path / "a", backbone=m, seg_len=32)
    assert longer.cfg.backbone.seg_len == 32
    x = torch.randint(0, 67, (1, 16))
    assert torch.allclose(longer(x)[0].logits, m(x)[0].logits, atol=1e-6)


def test_model_from_adapter_on_a_backbone_checkpoint(tmp_path):
    m = trained()
    save_adapter(m, tmp_path / "a")
    plain = build_model(ModelConfig(m.cfg.backbone))
    plain.load_state_dict({k: v for k, v in m.state_dict().items() if not k.startswith("memory.")})
    save_checkpoint(plain, tmp_path / "backbone")
    rebuilt, meta = model_from_adapter(tmp_path / "a", backbone=tmp_path / "backbone")
    x = torch.randint(0, 67, (2, 16))
    assert torch.equal(rebuilt.eval()(x)[0].logits, m(x)[0].logits) and meta["adapter"] == str(tmp_path / "a")
    with pytest.raises(CheckpointError, match="names no pretrained backbone"):
        model_from_adapter(tmp_path / "a")


def test_corruption_is_caught(tmp_path):
    m = trained()
    save_adapter(m, tmp_path / "a")
    doc = json.loads((tmp_path / "a" / "adapter.json").read_text())
    # metadata edited by hand: its checksum no longer matches
    (tmp_path / "a" / "adapter.json").write_text(json.dumps({**doc, "pretrained": "smollm2"}))
    with pytest.raises(CheckpointError, match="adapter.json"):
        read_adapter(tmp_path / "a")
    (tmp_path / "a" / "adapter.json").write_text(json.dumps(doc, indent=1) + "\n")
    read_adapter(tmp_path / "a")
    w = tmp_path / "a" / doc["weights"]
    raw = bytearray(w.read_bytes())
    raw[-3] ^= 0xFF
    w.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        load_adapter(fresh_like(m), tmp_path / "a")
    with pytest.raises(CheckpointError, match="not a memstack adapter"):
        read_adapter(tmp_path / "nothing")


def test_a_model_without_memory_parameters_has_no_adapter(tmp_path):
    with pytest.raises(CheckpointError, match="no memory parameters"):
        save_adapter(build_model(ModelConfig(bb())), tmp_path / "a")


def test_sparse_table_adapter(tmp_path):
    """Tables trained on a frozen backbone (Engram) are adapters too."""
    m = trained(mems=(EngramConfig(heads=2, head_dim=8, rows_per_head=31),))
    save_adapter(m, tmp_path / "a")
    other = fresh_like(m)
    load_adapter(other, tmp_path / "a")
    x = torch.randint(0, 67, (2, 16))
    assert torch.equal(other(x)[0].logits, m(x)[0].logits)


@pytest.mark.slow
def test_adapter_on_the_real_smollm2(tmp_path):
    """The pinned SmolLM2-135M (optional asset; skipped without it): an adapter names the backbone,
    rebuilds the model alone with equal logits, and refuses a backbone one weight away."""
    pytest.importorskip("transformers")
    from memstack.data import smollm2
    from memstack.errors import AssetError
    from memstack.hf.pretrained import load_pretrained

    try:
        smollm2.gguf_path()
    except AssetError as e:
        pytest.skip(f"the optional smollm2 asset is not fetched (`memstack data fetch smollm2`): {e}")
    torch.manual_seed(0)
    model = load_pretrained("smollm2", (MemoryTokensConfig(n_tokens=2),), seg_len=32).eval()
    with torch.no_grad():
        model.memory.memories[0].tokens.normal_(0, 0.1)
    save_adapter(model, tmp_path / "a", pretrained="smollm2")
    size = sum(p.stat().st_size for p in (tmp_path / "a").iterdir())
    assert size < 64_000                                              # 2 x 576 fp32 values and a header
    rebuilt, meta = model_from_adapter(tmp_path / "a")
    x = torch.randint(0, 49152, (1, 16))
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x)[0].logits, model(x)[0].logits)
        rebuilt.blocks[7].attn.wv.weight[0, 0] += 1e-3
    with pytest.raises(CheckpointError, match="different backbone"):
        load_adapter(rebuilt, tmp_path / "a")
