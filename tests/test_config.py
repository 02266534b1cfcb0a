"""Configs: construction checks, dict/YAML/JSON round trips, every reason at once, overrides."""
from __future__ import annotations

import dataclasses
import json

import pytest
import yaml

from memstack.config import (BackboneConfig, ModelConfig, apply_overrides, from_dict, load_yaml,
                             parse_override, to_dict)
from memstack.errors import ConfigError
from memstack.memory.kv.config import DenseKVConfig
from memstack.memory.learned.config import MemoryTokensConfig, XLConfig


def model_cfg() -> ModelConfig:
    return ModelConfig(
        BackboneConfig(vocab_size=300, d_model=48, n_layers=3, n_heads=6, n_kv_heads=2, d_ff=100,
                       seg_len=32, rope_theta=5e5, norm_eps=1e-6, tie_embeddings=False, init_std=0.01),
        (XLConfig(mem_len=32, layers=(0, 2)), MemoryTokensConfig(n_tokens=4, init_std=0.5),
         DenseKVConfig(scope="segment", initial_capacity=8)),
    )


def reasons_of(exc_info) -> list[str]:
    return exc_info.value.reasons


# ----------------------------------------------------------------------------- derived values

@pytest.mark.parametrize("d_model,n_heads,n_kv_heads,d_ff,head_dim,kv_heads,ff_dim", [
    (64, 4, None, None, 16, 4, 176),     # 8/3*64 = 170.7 -> 176
    (48, 6, 2, None, 8, 2, 128),         # 8/3*48 = 128 exactly
    (32, 4, 1, None, 8, 1, 96),          # 8/3*32 = 85.3 -> 96
    (32, 2, 2, 40, 16, 2, 40),           # explicit d_ff wins
])
def test_backbone_derived_values(d_model, n_heads, n_kv_heads, d_ff, head_dim, kv_heads, ff_dim):
    b = BackboneConfig(d_model=d_model, n_heads=n_heads, n_kv_heads=n_kv_heads, d_ff=d_ff)
    assert (b.head_dim, b.kv_heads, b.ff_dim) == (head_dim, kv_heads, ff_dim)


def test_configs_are_frozen():
    b = BackboneConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        b.d_model = 128  # type: ignore[misc]
    assert isinstance(model_cfg().memories, tuple)
    assert isinstance(ModelConfig(memories=[XLConfig()]).memories, tuple)   # lists become tuples


def test_backbone_construction_lists_every_reason():
    with pytest.raises(ConfigError) as e:
        BackboneConfig(d_model=30, n_heads=4, norm_eps=0.0, rope_theta=-1.0, n_layers=0)
    r = reasons_of(e)
    assert len(r) == 4, r
    assert "d_model (30) must be divisible by n_heads (4)" in r
    assert "n_layers must be >= 1, got 0" in r
    assert any(x.startswith("norm_eps must be in (0, 1)") for x in r)
    assert any(x.startswith("rope_theta must be > 0") for x in r)
    assert "4 problem(s)" in str(e.value)


@pytest.mark.parametrize("kw,reason", [
    (dict(d_model=36, n_heads=4), "head dim d_model/n_heads = 9 must be even for RoPE"),
    (dict(n_heads=4, n_kv_heads=3), "n_heads (4) must be a multiple of n_kv_heads (3)"),
    (dict(n_kv_heads=0), "n_kv_heads must be >= 1, got 0"),
    (dict(d_ff=0), "d_ff must be >= 1 or null, got 0"),
])
def test_backbone_single_reasons(kw, reason):
    with pytest.raises(ConfigError) as e:
        BackboneConfig(**kw)
    assert reasons_of(e) == [reason]


# ----------------------------------------------------------------------------- round trips

def test_to_dict_is_plain_data_with_kinds():
    d = to_dict(model_cfg())
    assert d["memories"] == [
        {"kind": "xl", "mem_len": 32, "layers": [0, 2]},
        {"kind": "memory_tokens", "n_tokens": 4, "init_std": 0.5},
        {"kind": "kv_dense", "scope": "segment", "window": None, "initial_capacity": 8},
    ]
    assert d["backbone"]["n_kv_heads"] == 2 and d["backbone"]["tie_embeddings"] is False
    assert "kind" not in d["backbone"]
    assert json.loads(json.dumps(d)) == d          # nothing but JSON types


def test_round_trip_dict_yaml_json(tmp_path):
    cfg = model_cfg()
    d = to_dict(cfg)
    assert from_dict(ModelConfig, d) == cfg
    assert from_dict(ModelConfig, yaml.safe_load(yaml.safe_dump(d))) == cfg
    assert from_dict(ModelConfig, json.loads(json.dumps(d))) == cfg
    f = tmp_path / "model.yaml"
    f.write_text(yaml.safe_dump(d))
    back = from_dict(ModelConfig, load_yaml(f))
    assert back == cfg
    assert type(back.memories[0]) is XLConfig and back.memories[0].layers == (0, 2)
    assert type(back.memories[2]) is DenseKVConfig


def test_from_hand_written_yaml(tmp_path):
    f = tmp_path / "preset.yaml"
    f.write_text(
        "backbone:\n"
        "  d_model: 48\n"
        "  n_heads: 6\n"
        "  n_kv_heads: 3\n"
        "  rope_theta: 10000   # an int where a float is expected\n"
        "memories:\n"
        "  - kind: xl\n"
        "    mem_len: 16\n"
        "    layers: [1]\n"
        "  - {kind: kv_dense, scope: segment}\n")
    cfg = from_dict(ModelConfig, load_yaml(f))
    assert cfg.backbone == BackboneConfig(d_model=48, n_heads=6, n_kv_heads=3)
    assert isinstance(cfg.backbone.rope_theta, float)
    assert cfg.memories == (XLConfig(mem_len=16, layers=(1,)), DenseKVConfig(scope="segment"))


def test_yaml_exponent_floats_are_numbers(tmp_path):
    """`norm_eps: 1e-6` is how everyone writes it; YAML 1.1 (PyYAML) reads it as a *string*.
    A config loader must still give the float."""
    f = tmp_path / "eps.yaml"
    f.write_text("backbone:\n  norm_eps: 1e-6\n  init_std: 2e-2\n")
    cfg = from_dict(ModelConfig, load_yaml(f))
    assert cfg.backbone.norm_eps == 1e-6 and cfg.backbone.init_std == 0.02


# ----------------------------------------------------------------------------- every reason at once

def test_all_reasons_in_different_nested_places():
    data = {
        "backbone": {"d_model": 30, "n_heads": 4},                       # invalid value
        "memories": [
            {"kind": "xl", "mem_lenn": 5},                               # unknown field (typo)
            {"kind": "memory_tokens", "n_tokens": "eight"},              # wrong type
            {"kind": "xll"},                                             # unknown memory kind
            {"kind": "kv_dense", "scope": "doc"},                        # not one of the literals
        ],
    }
    with pytest.raises(ConfigError) as e:
        from_dict(ModelConfig, data)
    r = reasons_of(e)
    assert len(r) == 5, r
    assert "backbone: d_model (30) must be divisible by n_heads (4)" in r
    typo = [x for x in r if x.startswith("memories.0.mem_lenn:")]
    assert typo and "did you mean 'mem_len'" in typo[0] and "valid: mem_len, layers" in typo[0]
    assert "memories.1.n_tokens: expected an integer, got 'eight'" in r
    kind = [x for x in r if x.startswith("memories.2.kind:")]
    assert kind and "unknown memory 'xll'" in kind[0]
    assert all(n in kind[0] for n in ("kv_dense", "memory_tokens", "none", "xl"))
    assert "memories.3.scope: 'doc' is not one of ['segment', 'document']" in r


def test_unknown_field_does_not_hide_other_problems_of_the_same_section():
    """An unknown field and an invalid value in the *same* section are both reported."""
    with pytest.raises(ConfigError) as e:
        from_dict(BackboneConfig, {"d_model": 30, "n_heads": 4, "n_layrs": 3})
    r = reasons_of(e)
    assert any(x.startswith("n_layrs:") and "did you mean 'n_layers'" in x for x in r), r
    assert "d_model (30) must be divisible by n_heads (4)" in r, r


def test_type_errors_of_every_kind():
    data = {"backbone": {"vocab_size": True, "d_model": 4.5, "rope_theta": "big", "tie_embeddings": "yes",
                         "n_kv_heads": None, "d_ff": None},
            "memories": [{"kind": "xl", "layers": 3}]}
    with pytest.raises(ConfigError) as e:
        from_dict(ModelConfig, data)
    r = reasons_of(e)
    assert "backbone.vocab_size: expected an integer, got True" in r
    assert "backbone.d_model: expected an integer, got 4.5" in r
    assert "backbone.rope_theta: expected a number, got 'big'" in r
    assert "backbone.tie_embeddings: expected true/false, got 'yes'" in r
    assert "memories.0.layers: expected a list, got int 3" in r
    assert len(r) == 5, r          # null is fine for the optional fields


def test_integral_floats_are_accepted_as_ints():
    assert from_dict(BackboneConfig, {"d_model": 64.0}).d_model == 64
    assert type(from_dict(BackboneConfig, {"d_model": 64.0}).d_model) is int


def test_bad_top_level_and_missing_kind():
    with pytest.raises(ConfigError) as e:
        from_dict(ModelConfig, [1, 2])
    assert "expected a mapping for ModelConfig" in reasons_of(e)[0]
    with pytest.raises(ConfigError) as e:
        from_dict(ModelConfig, {"memories": [{"mem_len": 3}], "backbone": "big"})
    r = reasons_of(e)
    assert any(x.startswith("memories.0.kind:") and "missing 'kind'" in x for x in r), r
    assert any(x.startswith("backbone: expected a mapping for BackboneConfig") for x in r), r


def test_cross_checks_run_after_fields_convert():
    with pytest.raises(ConfigError) as e:
        from_dict(ModelConfig, {"backbone": {"n_layers": 2},
                                "memories": [{"kind": "xl", "layers": [0, 7]}, {"kind": "kv_dense"}]})
    r = reasons_of(e)
    assert any("memories.0 (xl): layers [7] out of range for a 2-layer backbone" in x for x in r), r
    assert any("xl and kv_dense both keep the keys of past tokens" in x for x in r), r


def test_kind_mismatch_on_a_concrete_class():
    with pytest.raises(ConfigError) as e:
        from_dict(XLConfig, {"kind": "kv_dense", "mem_len": 3})
    assert reasons_of(e) == ["kind 'kv_dense' does not match XLConfig (kind 'xl')"]
    assert from_dict(XLConfig, {"kind": "xl", "mem_len": 3}) == XLConfig(mem_len=3)


# ----------------------------------------------------------------------------- YAML files

def test_load_yaml_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_yaml(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping at the top level, not list"):
        load_yaml(lst)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_yaml(empty) == {}


# ----------------------------------------------------------------------------- overrides

@pytest.mark.parametrize("text,keys,value", [
    ("model.n_layers=4", ["model", "n_layers"], 4),
    ("a=0.5", ["a"], 0.5),
    ("a=-3", ["a"], -3),
    ("a=1e-3", ["a"], 1e-3),            # exponent floats without a dot (YAML 1.1 would say str)
    ("a=2E5", ["a"], 2e5),
    ("a=1.5e-4", ["a"], 1.5e-4),
    ("a=true", ["a"], True),
    ("a=false", ["a"], False),
    ("a=null", ["a"], None),
    ("a=[1, 2, 3]", ["a"], [1, 2, 3]),
    ("a=[]", ["a"], []),
    ("a=hello", ["a"], "hello"),
    ("a='4'", ["a"], "4"),
    ("a=", ["a"], ""),
    ("a=x=y", ["a"], "x=y"),
    ("--train.lr=0.25", ["train", "lr"], 0.25),
])
def test_parse_override_values(text, keys, value):
    k, v = parse_override(text)
    assert k == keys
    assert v == value and type(v) is type(value)


@pytest.mark.parametrize("text", ["novalue", "=3", "--"])
def test_parse_override_rejects_malformed(text):
    with pytest.raises(ConfigError, match="must look like key.sub=value"):
        parse_override(text)


def test_apply_overrides_nested_and_list_index():
    data = {"model": to_dict(model_cfg()), "seed": 1}
    out = apply_overrides(data, ["model.backbone.n_layers=4", "model.memories.0.mem_len=128",
                                 "model.memories.2.scope=document", "model.memories.2.window=16",
                                 "model.memories.0.layers=[1, 3]", "seed=7", "new.section.key=x"])
    assert data["model"]["backbone"]["n_layers"] == 3 and data["seed"] == 1     # input untouched
    assert out["seed"] == 7 and out["new"] == {"section": {"key": "x"}}
    cfg = from_dict(ModelConfig, {**out["model"], "memories": [out["model"]["memories"][0], out["model"]["memories"][1]]})
    assert cfg.backbone.n_layers == 4 and cfg.memories[0] == XLConfig(mem_len=128, layers=(1, 3))
    assert out["model"]["memories"][2] == {"kind": "kv_dense", "scope": "document", "window": 16, "initial_capacity": 8}


def test_apply_overrides_reports_every_bad_path_at_once():
    data = {"memories": [{"kind": "xl", "mem_len": 4}], "backbone": {"d_model": 64}}
    with pytest.raises(ConfigError) as e:
        apply_overrides(data, ["memories.3.mem_len=1", "memories.x.mem_len=2", "memories.-1.mem_len=2",
                               "backbone.d_model.width=3", "oops", "backbone.n_layers=4"])
    r = reasons_of(e)
    assert len(r) == 5, r
    assert "override 'memories.3.mem_len=1': memories.3 is not an index of a list of 1" in r
    assert "override 'memories.x.mem_len=2': memories.x is not an index of a list of 1" in r
    assert "override 'memories.-1.mem_len=2': memories.-1 is not an index of a list of 1" in r
    assert "override 'backbone.d_model.width=3': backbone.d_model is a value, not a section" in r
    assert any("'oops' must look like key.sub=value" in x for x in r)
    assert data == {"memories": [{"kind": "xl", "mem_len": 4}], "backbone": {"d_model": 64}}


def test_overridden_float_reaches_the_config():
    data = apply_overrides(to_dict(ModelConfig()), ["backbone.norm_eps=1e-6", "backbone.rope_theta=5e5"])
    cfg = from_dict(ModelConfig, data)
    assert cfg.backbone.norm_eps == 1e-6 and cfg.backbone.rope_theta == 5e5


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_floats_are_refused_everywhere(bad):
    # a range check written `x <= 0` lets NaN through: finiteness is checked once, for every config
    with pytest.raises(ConfigError) as e:
        BackboneConfig(rope_theta=bad, norm_eps=bad)
    r = reasons_of(e)
    assert [sum(x.startswith(f"{n} ") for x in r) for n in ("rope_theta", "norm_eps")] == [1, 1], r  # once each
    if bad != float("-inf"):                                                # `<= 0` alone lets NaN and inf through
        assert f"rope_theta must be a finite number, got {bad}" in r
    with pytest.raises(ConfigError) as e:
        from_dict(ModelConfig, {"backbone": {"init_std": bad}, "memories": [{"kind": "memory_tokens", "init_std": bad}]})
    r = reasons_of(e)
    assert r == [f"backbone.init_std: must be a finite number, got {bad!r}",
                 f"memories.0.init_std: must be a finite number, got {bad!r}"], r


def test_yaml_nan_override_is_refused(tmp_path):
    data = apply_overrides({"backbone": {}}, ["backbone.rope_theta=.nan"])
    with pytest.raises(ConfigError) as e:
        from_dict(ModelConfig, data)
    assert reasons_of(e) == ["backbone.rope_theta: must be a finite number, got nan"]
