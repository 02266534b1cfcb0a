"""Checkpoints: safetensors weights + config.json, checksummed, versioned, written atomically,
refusing anything that does not match."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from memstack import checkpoint as ckpt
from memstack.atomic import write_sealed
from memstack.backbone import build_model
from memstack.checkpoint import (load_checkpoint, load_weights, read_checkpoint_config, save_checkpoint,
                                 unique_state_dict)
from memstack.config import BackboneConfig, ModelConfig
from memstack.errors import CheckpointError
from memstack.memory.learned.config import MemoryTokensConfig, XLConfig

V = 61


def tiny(**kw) -> BackboneConfig:
    return BackboneConfig(**{**dict(vocab_size=V, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, init_std=0.1), **kw})


def logits(model, x):
    model.eval()
    with torch.no_grad():
        return model(x)[0].logits


def weight_files(path):
    return sorted(p.name for p in path.glob("*.safetensors"))


def keys_of(file) -> set[str]:
    with safe_open(str(file), "pt") as f:
        return set(f.keys())


def perturb_(model) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)


# ----------------------------------------------------------------------------- round trip

@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_round_trip_gives_identical_logits(tmp_path, tie):
    cfg = ModelConfig(tiny(tie_embeddings=tie), (XLConfig(mem_len=8), MemoryTokensConfig(n_tokens=3)))
    model = build_model(cfg)
    perturb_(model)     # make sure nothing is merely re-initialised identically
    x = torch.randint(0, V, (2, 9))
    save_checkpoint(model, tmp_path / "ck", meta={"step": 17, "note": "hi"})
    loaded, meta = load_checkpoint(tmp_path / "ck")
    assert meta == {"step": 17, "note": "hi"}
    assert loaded.cfg == cfg
    assert torch.equal(logits(loaded, x), logits(model, x))
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)
    assert read_checkpoint_config(tmp_path / "ck") == (cfg, {"step": 17, "note": "hi"})
    if tie:
        assert loaded.lm_head.weight.data_ptr() == loaded.tok_emb.weight.data_ptr()
    else:
        assert loaded.lm_head.weight.data_ptr() != loaded.tok_emb.weight.data_ptr()


def test_tied_model_saves_the_embedding_once(tmp_path):
    tied, untied = build_model(tiny(tie_embeddings=True)), build_model(tiny(tie_embeddings=False))
    save_checkpoint(tied, tmp_path / "t")
    save_checkpoint(untied, tmp_path / "u")
    (tf,), (uf,) = (tmp_path / "t").glob("*.safetensors"), (tmp_path / "u").glob("*.safetensors")
    tk, uk = keys_of(tf), keys_of(uf)
    assert "tok_emb.weight" in tk and "lm_head.weight" not in tk
    assert {"tok_emb.weight", "lm_head.weight"} <= uk
    assert uk - tk == {"lm_head.weight"}
    assert set(unique_state_dict(tied)) == tk
    # the file holds the embedding bytes once: the untied file is larger by exactly one V x D fp32 matrix
    # (plus its header entry)
    assert uf.stat().st_size - tf.stat().st_size >= V * 32 * 4


def test_weights_file_is_named_by_its_checksum(tmp_path):
    model = build_model(tiny())
    save_checkpoint(model, tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    assert data["format"] == 2 and data["weights"] == f"model-{data['sha256'][:12]}.safetensors"
    assert weight_files(tmp_path) == [data["weights"]]
    assert not list(tmp_path.glob("*.tmp"))


# ----------------------------------------------------------------------------- refusals

def test_corrupted_weights_are_refused(tmp_path):
    model = build_model(tiny())
    save_checkpoint(model, tmp_path)
    (wf,) = tmp_path.glob("*.safetensors")
    raw = bytearray(wf.read_bytes())
    raw[len(raw) // 2] ^= 0x01        # one bit of one weight
    wf.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        load_checkpoint(tmp_path)
    fresh = build_model(tiny())
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        load_weights(fresh, tmp_path)
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items()), "refused load changed the model"


def test_missing_weights_file_is_refused(tmp_path):
    save_checkpoint(build_model(tiny()), tmp_path)
    (wf,) = tmp_path.glob("*.safetensors")
    wf.unlink()
    with pytest.raises(CheckpointError, match=rf"weights file {wf.name} is missing"):
        load_checkpoint(tmp_path)


def test_not_a_checkpoint_and_corrupted_config(tmp_path):
    with pytest.raises(CheckpointError, match="is not a memstack checkpoint"):
        load_checkpoint(tmp_path)
    save_checkpoint(build_model(tiny()), tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json is not valid JSON"):
        load_checkpoint(tmp_path)


def test_edited_config_is_refused_listing_the_difference(tmp_path):
    model = build_model(tiny())
    save_checkpoint(model, tmp_path)
    f = tmp_path / "config.json"
    data = json.loads(f.read_text())
    data["model"]["backbone"]["d_model"] = 48
    data["model"]["backbone"]["n_layers"] = 3
    f.write_text(json.dumps(data, indent=1) + "\n")
    target = build_model(tiny())
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(CheckpointError, match="config.json fails its checksum"):      # an edit breaks the seal
        load_weights(target, tmp_path)
    # re-sealed (a config that really is another model's), every difference is listed
    write_sealed(f, data["kind"], data["format"], {k: v for k, v in data.items() if k not in ("kind", "format", "checksum")})
    with pytest.raises(CheckpointError) as e:
        load_weights(target, tmp_path)
    msg = str(e.value)
    assert "was saved for a different model" in msg
    assert "backbone.d_model: checkpoint has 48, expected 32" in msg
    assert "backbone.n_layers: checkpoint has 3, expected 2" in msg
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())


def test_load_checkpoint_with_expect_refuses_a_different_config(tmp_path):
    cfg = ModelConfig(tiny(), (XLConfig(mem_len=8),))
    save_checkpoint(build_model(cfg), tmp_path)
    other = ModelConfig(tiny(n_kv_heads=4), (XLConfig(mem_len=16),))
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(tmp_path, expect=other)
    msg = str(e.value)
    assert "does not hold the expected model" in msg
    assert "backbone.n_kv_heads: checkpoint has 2, expected 4" in msg
    assert "memories.0.mem_len: checkpoint has 8, expected 16" in msg
    model, _ = load_checkpoint(tmp_path, expect=cfg)
    assert model.cfg == cfg


def test_memory_list_mismatch_is_refused(tmp_path):
    save_checkpoint(build_model(ModelConfig(tiny(), (MemoryTokensConfig(n_tokens=3),))), tmp_path)
    with pytest.raises(CheckpointError, match="memories: checkpoint has .*memory_tokens.*expected \\[\\]"):
        load_weights(build_model(tiny()), tmp_path)


def test_dtype_mismatch_is_refused_listing_every_tensor(tmp_path):
    model = build_model(tiny())
    save_checkpoint(model, tmp_path)
    half = build_model(tiny()).to(torch.bfloat16)
    with pytest.raises(CheckpointError) as e:
        load_weights(half, tmp_path)
    n = len(unique_state_dict(model))
    assert f"does not match the model ({n} problem(s))" in str(e.value)
    assert "tok_emb.weight: dtype torch.float32 in checkpoint, model has torch.bfloat16" in str(e.value)


# ----------------------------------------------------------------------------- versioned, atomic saves

def test_saving_twice_leaves_exactly_one_weights_file(tmp_path):
    model = build_model(tiny())
    x = torch.randint(0, V, (2, 7))
    save_checkpoint(model, tmp_path)
    first = weight_files(tmp_path)
    save_checkpoint(model, tmp_path)                    # same weights: same file, kept
    assert weight_files(tmp_path) == first
    perturb_(model)
    save_checkpoint(model, tmp_path)
    second = weight_files(tmp_path)
    assert len(second) == 1 and second != first
    assert json.loads((tmp_path / "config.json").read_text())["weights"] == second[0]
    assert not list(tmp_path.glob("*.tmp"))
    loaded, _ = load_checkpoint(tmp_path)
    assert torch.equal(logits(loaded, x), logits(model, x))


def test_crash_before_config_replace_keeps_previous_checkpoint(tmp_path, monkeypatch):
    model = build_model(tiny())
    x = torch.randint(0, V, (2, 7))
    save_checkpoint(model, tmp_path)
    old_logits = logits(model, x).clone()
    old_files = weight_files(tmp_path)
    perturb_(model)

    def crash(path, kind, format, body):
        raise OSError("simulated crash before config.json is replaced")

    monkeypatch.setattr(ckpt, "write_sealed", crash)
    with pytest.raises(OSError, match="simulated crash"):
        save_checkpoint(model, tmp_path)
    assert set(old_files) <= set(weight_files(tmp_path))          # the old weights were not removed
    loaded, _ = load_checkpoint(tmp_path)
    assert torch.equal(logits(loaded, x), old_logits)
    assert not torch.equal(logits(model, x), old_logits)          # the crashed save had new values


def test_unserialisable_meta_fails_cleanly(tmp_path):
    """A save that cannot succeed (meta is not JSON) must leave the directory as it was: the
    previous checkpoint loadable and no stray weights or temporary files behind."""
    model = build_model(tiny())
    x = torch.randint(0, V, (2, 7))
    save_checkpoint(model, tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    old_logits = logits(model, x).clone()
    perturb_(model)
    with pytest.raises((TypeError, ValueError)):
        save_checkpoint(model, tmp_path, meta={"lr": torch.tensor(0.1)})
    loaded, _ = load_checkpoint(tmp_path)
    assert torch.equal(logits(loaded, x), old_logits)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
