"""PEFT prefix-tuning adapters <-> memstack's prefix memory: the exported adapter, loaded by the real
`peft` library into a `LlamaForCausalLM` with the same weights, gives memstack's logits; a PEFT
adapter saved by `peft` itself imports to the same logits; mismatches are refused with reasons."""
from __future__ import annotations

import json

import pytest
import torch

from memstack.backbone import build_model
from memstack.config import BackboneConfig, ModelConfig
from memstack.errors import ConfigError
from memstack.hf.peft import export_peft_prefix, import_peft_prefix, read_peft_prefix
from memstack.memory.learned.config import MemoryTokensConfig, PrefixConfig
from tolerances import assert_close

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")


def bb(**kw) -> BackboneConfig:
    return BackboneConfig(**{**dict(vocab_size=101, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, seg_len=16,
                                    init_std=0.2), **kw})


def prefixed(b: BackboneConfig, **kw):
    torch.manual_seed(0)
    cfg = PrefixConfig(**{**dict(n_prefix=3, reparam_hidden=16, init_std=0.3), **kw})
    return build_model(ModelConfig(b, (cfg,))).eval()


def backbone_of(model):
    plain = build_model(ModelConfig(model.cfg.backbone))
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("memory.")})
    return plain.eval()


def peft_logits(model, adapter_dir, x):
    from memstack.hf.convert import to_hf

    pm = peft.PeftModel.from_pretrained(to_hf(backbone_of(model)), str(adapter_dir)).eval()
    with torch.no_grad():
        return pm(input_ids=x).logits


@pytest.mark.parametrize("kv_heads,reparam", [(2, True), (4, False), (1, True)])
def test_exported_prefix_runs_in_peft_with_the_same_logits(tmp_path, kv_heads, reparam):
    m = prefixed(bb(n_kv_heads=kv_heads), reparam=reparam)
    export_peft_prefix(m, tmp_path / "p", base_model="tiny")
    cfg = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["num_virtual_tokens"], cfg["num_layers"], cfg["num_attention_heads"],
            cfg["token_dim"]) == ("PREFIX_TUNING", 3, 2, kv_heads, kv_heads * 8)
    x = torch.randint(0, 101, (2, 12))
    with torch.no_grad():
        assert_close(peft_logits(m, tmp_path / "p", x), m(x)[0].logits)
    # and back: the imported (direct) prefix computes what the original did
    back = import_peft_prefix(tmp_path / "p", backbone_of(m))
    assert back.memory.memories[0].cfg.reparam is False
    with torch.no_grad():
        assert_close(back(x)[0].logits, m(x)[0].logits)


def test_adapter_saved_by_peft_itself_imports(tmp_path):
    """A prefix trained in PEFT (here: its encoder with random weights and the MLP projection),
    saved with `save_pretrained`, gives the same logits through memstack."""
    from memstack.hf.convert import to_hf

    b = bb()
    base = build_model(ModelConfig(b)).eval()
    torch.manual_seed(1)
    pcfg = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5, prefix_projection=True,
                                   encoder_hidden_size=24)
    pm = peft.get_peft_model(to_hf(base), pcfg)
    with torch.no_grad():
        for p in pm.prompt_encoder.parameters():
            p.normal_(0, 0.3)
    pm.save_pretrained(str(tmp_path / "theirs"))
    pm.eval()
    x = torch.randint(0, 101, (3, 10))
    with torch.no_grad():
        want = pm(input_ids=x).logits
        got = import_peft_prefix(tmp_path / "theirs", base)(x)[0].logits
    assert_close(got, want)


def test_exports_that_cannot_be_expressed_are_refused(tmp_path):
    with pytest.raises(ConfigError) as e:
        export_peft_prefix(prefixed(bb(), layers=(1,)), tmp_path / "x")
    assert "covers layers [1]" in str(e.value)
    m = build_model(ModelConfig(bb(), (MemoryTokensConfig(n_tokens=2),)))
    with pytest.raises(ConfigError) as e:
        export_peft_prefix(m, tmp_path / "x")
    assert len(e.value.reasons) == 2 and not (tmp_path / "x").exists()


def test_import_refuses_an_adapter_for_another_backbone(tmp_path):
    export_peft_prefix(prefixed(bb()), tmp_path / "p")
    with pytest.raises(ConfigError) as e:
        read_peft_prefix(tmp_path / "p", bb(n_layers=3, n_kv_heads=4))
    text = "\n".join(e.value.reasons)
    assert "num_layers is 2, the backbone needs 3" in text and "num_attention_heads is 2" in text
    assert "token_dim is 16" in text and "prompt_embeddings has shape" in text
