"""Pretrained backbones in run configs (nothing loaded here), and -- slow, needs the optional
`smollm2` asset -- the real SmolLM2-135M: logits equal HF's on a SOTU snippet, memstack's SOTU
bits per byte equals the one from HF's logits, the tokenizer equals AutoTokenizer's."""
from __future__ import annotations

import math

import pytest
import torch

from memstack.errors import AssetError, ConfigError
from memstack.hf.pretrained import PRETRAINED, mismatch_reasons, pretrained_backbone
from memstack.train.run import run_config_from_dict

LM = {"kind": "lm", "corpus": "sotu", "tokenizer": "smollm2"}


def test_run_config_takes_the_pretrained_architecture():
    cfg = run_config_from_dict({"pretrained": "smollm2", "model": {"seg_len": 128}, "task": LM})
    b = cfg.model
    assert (b.vocab_size, b.d_model, b.n_layers, b.n_heads, b.kv_heads, b.d_ff, b.seg_len) == (49152, 576, 30, 9, 3, 1536, 128)
    assert b.rope_theta == 100000.0 and b.tie_embeddings and mismatch_reasons("smollm2", b) == []
    assert pretrained_backbone("smollm2", 64).seg_len == 64 and PRETRAINED["smollm2"].tokenizer == "smollm2"


def test_run_config_refuses_a_different_architecture_or_tokenizer_with_every_reason():
    with pytest.raises(ConfigError) as e:
        run_config_from_dict({"pretrained": "smollm2", "model": {"d_model": 72, "n_layers": 2}, "task": {**LM, "tokenizer": "gpt2"}})
    text = "\n".join(e.value.reasons)
    assert "model.d_model is 72" in text and "model.n_layers is 2" in text and "task.tokenizer is 'gpt2'" in text
    with pytest.raises(ConfigError, match="unknown backbone 'nope'"):
        run_config_from_dict({"pretrained": "nope", "task": LM, "model": {"vocab_size": 49152}})


def test_float_fields_compare_at_float32_precision():
    """The GGUF stores rms_norm_eps as float32 (1e-5 loads as 9.9999997e-06): the same architecture.
    A real change of a float field is still a mismatch, and so is any integer field."""
    from dataclasses import replace

    import numpy as np

    b = pretrained_backbone("smollm2")
    assert mismatch_reasons("smollm2", replace(b, norm_eps=float(np.float32(1e-5)))) == []
    got = mismatch_reasons("smollm2", replace(b, norm_eps=1.01e-5, rope_theta=10000.0, n_kv_heads=1))
    assert len(got) == 3 and all(f"model.{f} is" in "\n".join(got) for f in ("norm_eps", "rope_theta", "n_kv_heads"))


# ----------------------------------------------------------------------------- real weights (slow)

def _asset_or_skip():
    from memstack.data import smollm2

    try:
        return smollm2.gguf_path()
    except AssetError as e:
        pytest.skip(f"the optional smollm2 asset is not fetched (`memstack data fetch smollm2`): {e}")


@pytest.fixture(scope="module")
def real():
    pytest.importorskip("transformers")
    _asset_or_skip()
    from memstack.data.corpora import sotu
    from memstack.data.tokenizers import get_tokenizer
    from memstack.hf import from_hf
    from memstack.hf.pretrained import hf_model

    hf = hf_model("smollm2").eval()
    ours = from_hf(hf, seg_len=256).eval()
    tok = get_tokenizer("smollm2")
    text = sotu("test")[0].text
    return hf, ours, tok, text


@pytest.mark.slow
def test_smollm2_logits_equal_hf_on_sotu(real):
    """fp32 on 200 SOTU tokens. HF forms RoPE angles in fp32, memstack in fp64 (backbone/layers.py),
    and the attention/matmul orders differ, so the logits agree to rounding, not bit for bit:
    max |diff| <= 1e-3 x the logit scale and the same argmax at every position."""
    hf, ours, tok, text = real
    ids = torch.tensor([tok.encode(text)[:200]])
    with torch.no_grad():
        a, b = hf(ids).logits, ours(ids)[0].logits
    assert (a - b).abs().max() <= 1e-3 * a.abs().max()
    assert torch.equal(a.argmax(-1), b.argmax(-1))


@pytest.mark.slow
def test_smollm2_sotu_bpb_equals_hf_bpb(real):
    from memstack.backbone.model import cross_entropy
    from memstack.data.packing import IGNORE, DocumentStream
    from memstack.evals.lm import LMTask, LMTaskConfig

    hf, ours, tok, _ = real
    task = LMTask(LMTaskConfig(tokenizer="smollm2", eval_split="test", eval_tokens=1024, eval_rows=2), 256)
    got = task.evaluate(ours)
    stream = DocumentStream(task.eval_docs, 2, 256, tok.eot_id, shuffle=False, loop=False)
    nbytes = torch.as_tensor(tok.token_bytes())
    nll, nb = 0.0, 0
    with torch.no_grad():
        while True:
            bt = stream.next(1)
            if bt.n_targets == 0 and stream.exhausted:
                break
            tgt = bt.targets[:, 0]
            nll += float(cross_entropy(hf(bt.tokens[:, 0]).logits.float(), tgt, reduction="sum"))
            nb += int(nbytes[tgt[tgt != IGNORE]].sum())
    want = nll / math.log(2) / nb
    assert got["eval_bytes"] == nb and abs(got["bpb"] - want) <= 1e-4 * want


@pytest.mark.slow
def test_smollm2_tokenizer_equals_autotokenizer(real):
    from transformers import AutoTokenizer

    from memstack.data.smollm2 import gguf_path

    _, _, tok, text = real
    g = gguf_path()
    ref = AutoTokenizer.from_pretrained(str(g.parent), gguf_file=g.name, local_files_only=True)
    ids = tok.encode(text)
    assert ids == ref(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert int(tok.token_bytes()[ids].sum()) == len(text.encode("utf-8"))


@pytest.mark.slow
def test_load_pretrained_equals_from_hf(real, tmp_path, monkeypatch):
    """load_pretrained converts the GGUF, checks it against the registered architecture (the check
    once refused the real file: its float32 norm_eps), caches it as a checkpoint, and a second load
    (from that checkpoint) gives the same logits as from_hf."""
    import memstack.hf.pretrained as pre

    hf, ours, tok, text = real
    monkeypatch.setattr(pre, "_cache_dir", lambda name: tmp_path / name)   # a fresh cache: conversion runs
    ids = torch.tensor([tok.encode(text)[:64]])
    with torch.no_grad():
        want = ours(ids)[0].logits
        first = pre.load_pretrained("smollm2", seg_len=256).eval()
        assert (tmp_path / "smollm2" / "config.json").is_file()
        second = pre.load_pretrained("smollm2", seg_len=256).eval()
        assert torch.equal(first(ids)[0].logits, want) and torch.equal(second(ids)[0].logits, want)


@pytest.mark.slow
def test_a_damaged_or_outdated_converted_cache_is_rebuilt_from_the_verified_asset(tmp_path, monkeypatch, capsys):
    """The converted checkpoint is derived data: a cache that fails its checks (an edited manifest
    here; an older format after an upgrade) is rebuilt from the SHA-256-verified GGUF, not refused."""
    pytest.importorskip("transformers")
    _asset_or_skip()
    import json

    from memstack.hf import pretrained

    monkeypatch.setattr(pretrained, "_cache_dir", lambda name: tmp_path / "conv")
    first = pretrained.load_pretrained("smollm2")
    cfg = tmp_path / "conv" / "config.json"
    doc = json.loads(cfg.read_text())
    doc["meta" if "meta" in doc else next(iter(doc))] = {"edited": True}
    cfg.write_text(json.dumps(doc))
    capsys.readouterr()
    again = pretrained.load_pretrained("smollm2")
    assert "rebuilding the converted smollm2 cache" in capsys.readouterr().err
    third = pretrained.load_pretrained("smollm2")
    assert capsys.readouterr().err == ""                                   # the rebuilt cache verifies
    for m in (again, third):
        assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), m.state_dict().values()))
