"""HF LlamaForCausalLM <-> memstack: logits equal HF's at tiny random configs (MHA, GQA, MQA,
tied and untied), in one forward pass and in cached decoding, across segments with a KV memory,
and back; unsupported configs are refused with every reason."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

transformers = pytest.importorskip("transformers")

from memstack.backbone.model import build_model  # noqa: E402
from memstack.config import BackboneConfig, ModelConfig  # noqa: E402
from memstack.errors import ConfigError  # noqa: E402
from memstack.generate import Decoder, SamplingConfig, generate  # noqa: E402
from memstack.hf import from_hf, hf_config_reasons, to_hf  # noqa: E402
from memstack.memory.kv.config import DenseKVConfig  # noqa: E402
from tolerances import assert_close  # noqa: E402

V = 101
SHAPES = {"mha": 4, "gqa": 2, "mqa": 1}


def hf_model(kv_heads: int, tie: bool, **kw):
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=kv_heads, tie_word_embeddings=tie,
                                   max_position_embeddings=256, rms_norm_eps=1e-5, **kw)
    if hasattr(cfg, "rope_parameters"):
        cfg.rope_parameters = {"rope_type": "default", "rope_theta": 500.0}   # not the default: it must be carried over
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # norms away from 1, so a swapped or missing norm shows
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    return model


CASES = [pytest.param(kv, tie, id=f"{name}-{'tied' if tie else 'untied'}") for name, kv in SHAPES.items() for tie in (False, True)]


@pytest.mark.parametrize("kv,tie", CASES)
def test_forward_logits_equal_hf(kv, tie):
    hf = hf_model(kv, tie)
    model = from_hf(hf, seg_len=64).eval()
    b = model.cfg.backbone
    assert (b.kv_heads, b.tie_embeddings, b.rope_theta, b.d_ff) == (kv, tie, 500.0, 48)
    x = torch.randint(0, V, (2, 45))
    with torch.no_grad():
        assert_close(model(x)[0].logits, hf(x).logits)


@pytest.mark.parametrize("kv,tie", CASES)
def test_cached_decoding_equals_hf_cache(kv, tie):
    """Prefill, then one token at a time: memstack's segment decode cache against HF's DynamicCache."""
    hf = hf_model(kv, tie)
    model = from_hf(hf, seg_len=64).eval()
    x = torch.randint(0, V, (2, 30))
    with torch.no_grad():
        out = hf(x[:, :11], use_cache=True)
        cache, want = out.past_key_values, [out.logits[:, -1]]
        for t in range(11, 30):
            out = hf(x[:, t:t + 1], cache=cache, use_cache=True)      # `cache` (was past_key_values) in transformers 5
            cache = out.past_key_values
            want.append(out.logits[:, -1])
        dec = Decoder(model, batch=2)
        got = [dec.feed(x[:, :11])] + [dec.feed(x[:, t:t + 1]) for t in range(11, 30)]
    assert_close(torch.stack(got, 1), torch.stack(want, 1))


def test_segments_with_document_kv_equal_hf_full_context():
    """Segments of 8 tokens plus a document-scoped KV memory reproduce HF's full attention over 40
    tokens, whole and in cached decoding across segment boundaries."""
    hf = hf_model(2, False)
    model = from_hf(hf, memories=[DenseKVConfig(scope="document")], seg_len=8).eval()
    x = torch.randint(0, V, (2, 40))
    with torch.no_grad():
        want = hf(x).logits
        st, outs = None, []
        for s in range(5):
            out, st = model(x[:, 8 * s:8 * (s + 1)], st)
            outs.append(out.logits)
        assert_close(torch.cat(outs, 1), want)
        dec = Decoder(model, batch=2)
        got = torch.stack([dec.feed(x[:, :13])] + [dec.feed(x[:, t:t + 1]) for t in range(13, 40)], 1)
    assert_close(got, want[:, 12:])


def test_greedy_generation_equals_hf_generate():
    hf = hf_model(1, True)
    model = from_hf(hf, seg_len=64)
    prompt = torch.randint(0, V, (1, 9))
    with torch.no_grad():
        want = hf.generate(prompt, max_new_tokens=12, do_sample=False, min_new_tokens=12, pad_token_id=0)[0, 9:]
    got = torch.cat(list(generate(model, prompt, SamplingConfig(max_new_tokens=12))))
    assert got.tolist() == want.tolist()


@pytest.mark.parametrize("tie", [False, True])
def test_to_hf_round_trip(tie):
    torch.manual_seed(0)
    model = build_model(ModelConfig(BackboneConfig(vocab_size=V, d_model=48, n_layers=2, n_heads=6, n_kv_heads=3, seg_len=32,
                                                   rope_theta=1234.0, norm_eps=1e-6, tie_embeddings=tie), ())).eval()
    hf = to_hf(model)
    assert hf.config.tie_word_embeddings == tie and hf.config.num_key_value_heads == 3
    x = torch.randint(0, V, (3, 32))
    with torch.no_grad():
        assert_close(hf(x).logits, model(x)[0].logits)
        back = from_hf(hf, seg_len=32)
    b = model.cfg.backbone
    assert back.cfg.backbone == replace(b, d_ff=b.ff_dim)      # HF states the MLP width explicitly
    for (n, p), (_, q) in zip(model.named_parameters(), back.named_parameters()):
        assert torch.equal(p, q), n


def test_to_hf_refuses_memories():
    model = build_model(ModelConfig(BackboneConfig(vocab_size=V, d_model=32, n_layers=1, n_heads=4), (DenseKVConfig(),)))
    with pytest.raises(ValueError, match="kv_dense.*drop_memories"):
        to_hf(model)
    assert to_hf(model, drop_memories=True).config.num_hidden_layers == 1


def test_unsupported_configs_list_every_reason():
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=3, attention_bias=True, mlp_bias=True,
                                   hidden_act="gelu", head_dim=16)
    if hasattr(cfg, "rope_parameters"):
        cfg.rope_parameters = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    else:
        cfg.rope_scaling = {"type": "linear", "factor": 2.0}
    reasons = hf_config_reasons(cfg)
    for needle in ("rope type 'linear'", "attention_bias", "mlp_bias", "hidden_act='gelu'", "head_dim=16",
                   "not a multiple of num_key_value_heads"):
        assert any(needle in r for r in reasons), (needle, reasons)
    with pytest.raises(ConfigError) as e:
        from_hf(transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
            attention_bias=True, mlp_bias=True)))
    assert len(e.value.reasons) == 2
    gpt2 = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=V)
    assert any("model_type is 'gpt2'" in r for r in hf_config_reasons(gpt2))
