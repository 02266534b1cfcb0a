"""Registry: lazy name -> class resolution, unknown names listing valid ones, public
registration, and validation that lists every reason at once."""
from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

from memstack import registry
from memstack.backbone import build_model
from memstack.config import BackboneConfig, MemoryConfig, ModelConfig, from_dict
from memstack.errors import ConfigError, UnknownNameError
from memstack.memory.base import Memory, Site
from memstack.memory.kv.config import DenseKVConfig
from memstack.memory.learned.config import MemoryTokensConfig, XLConfig
from memstack.registry import MEMORIES, TASKS, register_memory, validate, validate_memories

BUILTIN = ["kv_dense", "memory_tokens", "none", "xl"]


def bb(**kw) -> BackboneConfig:
    return BackboneConfig(**{**dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, init_std=0.1), **kw})


# ----------------------------------------------------------------------------- lookups

def test_builtin_memories_resolve_to_their_config_classes():
    assert set(BUILTIN) <= set(MEMORIES.names())
    assert MEMORIES.config_class("xl") is XLConfig
    assert MEMORIES.config_class("kv_dense") is DenseKVConfig
    assert MEMORIES.config_class("memory_tokens") is MemoryTokensConfig
    assert MEMORIES.default_config("xl") == XLConfig()
    assert registry.memory_config("xl", mem_len=7) == XLConfig(mem_len=7)
    from memstack.memory.learned.xl import TransformerXL
    assert MEMORIES.target_class("xl") is TransformerXL


@pytest.mark.parametrize("call", [
    lambda: MEMORIES.entry("xll"),
    lambda: MEMORIES.config_class("xll"),
    lambda: MEMORIES.target_class("xll"),
    lambda: registry.memory_config("xll"),
    lambda: registry.config_class_for(MemoryConfig, "xll"),
])
def test_unknown_memory_lists_valid_names(call):
    with pytest.raises(UnknownNameError) as e:
        call()
    err = e.value
    assert isinstance(err, KeyError)
    assert err.name == "xll" and set(BUILTIN) <= set(err.valid) and err.valid == sorted(err.valid)
    msg = str(err)
    assert msg.startswith("unknown memory 'xll'; valid memory names: ")   # str, not KeyError's repr
    assert all(n in msg for n in BUILTIN)


def test_unknown_task_lists_valid_tasks():
    with pytest.raises(UnknownNameError, match=r"unknown task 'nope'; valid task names: .*mqar.*passkey"):
        TASKS.entry("nope")


def test_non_string_kind_is_an_unknown_name():
    with pytest.raises(UnknownNameError):
        registry.config_class_for(MemoryConfig, 3)
    valid = ", ".join(sorted(MEMORIES.names()))   # every registered memory, whoever registered it
    with pytest.raises(ValueError, match=f"missing 'kind'; valid memory kinds: {valid}$"):
        registry.config_class_for(MemoryConfig, None)


def test_config_resolution_imports_no_memory_implementation():
    """Reading a config resolves `kind` through the registry without importing the memory
    implementations (heavy optional dependencies load only when a memory is built)."""
    code = ("import sys\n"
            "from memstack.config import ModelConfig, from_dict\n"
            "cfg = from_dict(ModelConfig, {'memories': [{'kind': 'xl'}, {'kind': 'memory_tokens'},"
            " {'kind': 'kv_dense', 'scope': 'segment'}]})\n"
            "assert [m.kind for m in cfg.memories] == ['xl', 'memory_tokens', 'kv_dense']\n"
            "impl = ['memstack.memory.learned.xl', 'memstack.memory.learned.memory_tokens',"
            " 'memstack.memory.kv.dense']\n"
            "print(sorted(m for m in impl if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# ----------------------------------------------------------------------------- register_memory

@dataclass(frozen=True)
class ScaleLogitsConfig(MemoryConfig):
    kind: ClassVar[str] = "test_scale_logits"
    scale: float = 2.0

    def check(self) -> list[str]:
        return [] if self.scale > 0 else [f"scale must be > 0, got {self.scale}"]


class ScaleLogits(Memory):
    """Test memory: multiplies the logits by a constant."""

    sites: ClassVar[frozenset[Site]] = frozenset({Site.LOGITS})

    def logits(self, logits, h, state, ctx):
        return logits * self.cfg.scale, state


def test_register_memory_adds_a_usable_memory_and_removal_cleans_up():
    name = ScaleLogitsConfig.kind
    assert name not in MEMORIES.names()
    try:
        returned = register_memory(name, config=ScaleLogitsConfig)(ScaleLogits)
        assert returned is ScaleLogits
        assert name in MEMORIES.names()
        assert MEMORIES.entry(name).summary == "Test memory: multiplies the logits by a constant."
        assert MEMORIES.config_class(name) is ScaleLogitsConfig
        # YAML-style data resolves to the new class, and its own checks apply
        cfg = from_dict(ModelConfig, {"backbone": {"vocab_size": 64, "d_model": 32, "n_heads": 4},
                                      "memories": [{"kind": name, "scale": 3}]})
        assert cfg.memories == (ScaleLogitsConfig(scale=3.0),)
        with pytest.raises(ConfigError) as e:
            from_dict(ModelConfig, {"memories": [{"kind": name, "scale": -1}]})
        assert e.value.reasons == ["memories.0: scale must be > 0, got -1.0"]
        # the backbone calls it at its site: logits exactly 3x the plain model's
        base = build_model(bb()).eval()
        scaled = base.with_memories([ScaleLogitsConfig(scale=3.0)])
        x = torch.randint(0, 64, (2, 6))
        with torch.no_grad():
            torch.testing.assert_close(scaled(x)[0].logits, 3.0 * base(x)[0].logits)
        # registering the same name again needs replace=True
        with pytest.raises(ValueError, match="already registered; pass replace=True"):
            register_memory(name, config=ScaleLogitsConfig)(ScaleLogits)
        register_memory(name, config=ScaleLogitsConfig, summary="again", replace=True)(ScaleLogits)
        assert MEMORIES.entry(name).summary == "again"
    finally:
        MEMORIES.remove(name)
    assert name not in MEMORIES.names()
    with pytest.raises(UnknownNameError):
        MEMORIES.entry(name)


def test_registered_config_must_carry_its_name_as_kind():
    try:
        MEMORIES.add("test_wrong_kind", ScaleLogitsConfig, ScaleLogits)
        with pytest.raises(TypeError, match="has kind 'test_scale_logits'"):
            MEMORIES.config_class("test_wrong_kind")
    finally:
        MEMORIES.remove("test_wrong_kind")


def test_memory_config_not_in_registry_is_reported():
    """A config whose kind was never registered (or was removed) cannot slip into a model."""
    r = validate_memories(bb(), [ScaleLogitsConfig()])
    assert r == [f"memories.0: unknown memory 'test_scale_logits'; valid: {', '.join(sorted(MEMORIES.names()))}"]


# ----------------------------------------------------------------------------- validate_memories

def test_validate_memories_returns_every_reason():
    memories = [XLConfig(layers=(0, 5)), XLConfig(mem_len=4, layers=(1, 1)),
                DenseKVConfig(scope="document"), "kv_dense"]
    r = validate_memories(bb(n_layers=2), memories)
    assert "memories.0 (xl): layers [5] out of range for a 2-layer backbone (valid: 0..1)" in r
    assert "memories.1 (xl): layers [1, 1] has duplicates" in r
    assert "memories.3: 'kv_dense' is not a memory config" in r
    assert "memory 'xl' appears 2 times; a stack holds each memory once" in r
    conflict = [x for x in r if "both keep the keys of past tokens" in x]
    assert conflict == ["xl and xl and kv_dense both keep the keys of past tokens for attention; "
                        "they would feed the same context twice -- keep one"]
    assert len(r) == 5, r
    assert validate(bb(n_layers=2), memories) == r


def test_model_config_raises_all_validation_reasons():
    with pytest.raises(ConfigError) as e:
        ModelConfig(bb(n_layers=3), (XLConfig(layers=(3,)), DenseKVConfig(), MemoryTokensConfig(), MemoryTokensConfig()))
    r = e.value.reasons
    assert any("layers [3] out of range for a 3-layer backbone" in x for x in r)
    assert "memory 'memory_tokens' appears 2 times; a stack holds each memory once" in r
    assert any(x.startswith("xl and kv_dense both keep the keys of past tokens") for x in r)
    assert len(r) == 3, r


@pytest.mark.parametrize("memories", [
    [XLConfig(mem_len=8), DenseKVConfig(scope="segment")],
    [MemoryTokensConfig(), DenseKVConfig(scope="document", window=16)],
    [XLConfig(layers=(0, 1)), MemoryTokensConfig()],
    [],
], ids=["xl+kv_segment", "tokens+kv_document", "xl+tokens", "none"])
def test_valid_combinations(memories):
    assert validate_memories(bb(), memories) == []
    model = build_model(bb(), memories)
    assert model.memory.kinds == [m.kind for m in memories]
