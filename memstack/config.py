"""Configs: frozen dataclasses of plain data, checked on construction, round-tripped through
dicts / YAML / JSON, and overridable from the command line with dotted keys.

Every check collects *all* problems before raising one `ConfigError`, including problems in
nested configs (each reason is prefixed with its dotted path, e.g. ``memories.0.mem_len``).

Polymorphic configs (memories, tasks) carry a ``kind`` string; `from_dict` resolves it through
the registry, so a YAML file never names a Python class.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Union, get_args, get_origin

import yaml

from memstack.errors import ConfigError


# ----------------------------------------------------------------------------- base classes

class Checked:
    """Mixin for frozen config dataclasses: `check()` returns reasons; construction raises them all."""

    def check(self) -> list[str]:
        return []

    def __post_init__(self) -> None:
        reasons = self.check()
        named = {r.split()[0] for r in reasons if r.split()}
        reasons = [r for r in _non_finite(self) if r.split()[0] not in named] + reasons  # said once per field
        if reasons:
            raise ConfigError(reasons, what=type(self).__name__)


def _non_finite(cfg: Any) -> list[str]:
    """Every float field (or float inside a tuple/list field) that is NaN or infinite: a range
    check written as `x <= 0` lets NaN through, so finiteness is checked once, for every config."""
    out = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        items = enumerate(value) if isinstance(value, (tuple, list)) else [(None, value)]
        for i, v in items:
            if isinstance(v, float) and not math.isfinite(v):
                out.append(f"{f.name}{'' if i is None else f'.{i}'} must be a finite number, got {v}")
    return out


@dataclass(frozen=True)
class BackboneConfig(Checked):
    """The dense decoder every memory plugs into (Llama-style: RMSNorm, RoPE, SwiGLU, GQA)."""

    vocab_size: int = 512
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int | None = None    # None: = n_heads (MHA); 1: MQA; in between: GQA
    d_ff: int | None = None          # SwiGLU hidden width; None: 8/3 * d_model rounded up to 16
    seg_len: int = 64                # tokens per segment: the backbone's own context window;
                                     # memory is what carries information across segments
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    init_std: float = 0.02

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def ff_dim(self) -> int:
        if self.d_ff is not None:
            return self.d_ff
        return -(-(8 * self.d_model // 3) // 16) * 16

    def check(self) -> list[str]:
        r = []
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "seg_len"):
            if getattr(self, name) < 1:
                r.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.n_heads >= 1 and self.d_model % self.n_heads:
            r.append(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        elif self.n_heads >= 1 and (self.d_model // self.n_heads) % 2:
            r.append(f"head dim d_model/n_heads = {self.d_model // self.n_heads} must be even for RoPE")
        if self.n_kv_heads is not None:
            if self.n_kv_heads < 1:
                r.append(f"n_kv_heads must be >= 1, got {self.n_kv_heads}")
            elif self.n_heads >= 1 and self.n_heads % self.n_kv_heads:
                r.append(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.d_ff is not None and self.d_ff < 1:
            r.append(f"d_ff must be >= 1 or null, got {self.d_ff}")
        if self.rope_theta <= 0:
            r.append(f"rope_theta must be > 0, got {self.rope_theta}")
        if not 0 < self.norm_eps < 1:
            r.append(f"norm_eps must be in (0, 1), got {self.norm_eps}")
        if self.init_std <= 0:
            r.append(f"init_std must be > 0, got {self.init_std}")
        return r


@dataclass(frozen=True)
class MemoryConfig(Checked):
    """Base of every memory's config. Subclasses set `kind` (the registry name).

    `check()` validates the config alone; `check_with(backbone)` validates it against the backbone.
    """

    kind: ClassVar[str] = ""

    def check_with(self, backbone: BackboneConfig) -> list[str]:
        return []


def _layers_reasons(layers: tuple[int, ...] | None, backbone: BackboneConfig) -> list[str]:
    """Shared check for memories placed at chosen layers."""
    if layers is None:
        return []
    bad = [i for i in layers if not 0 <= i < backbone.n_layers]
    r = [f"layers {bad} out of range for a {backbone.n_layers}-layer backbone (valid: 0..{backbone.n_layers - 1})"] if bad else []
    if len(set(layers)) != len(layers):
        r.append(f"layers {list(layers)} has duplicates")
    return r


@dataclass(frozen=True)
class ModelConfig(Checked):
    """A backbone plus a list of memories. Combinations are lists, never classes."""

    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    memories: tuple[MemoryConfig, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "memories", tuple(self.memories))
        super().__post_init__()

    def check(self) -> list[str]:
        from memstack.registry import validate_memories  # registry imports this module

        return validate_memories(self.backbone, self.memories)


@dataclass(frozen=True)
class GroupConfig(Checked):
    """Optimizer settings for a named parameter group (memories assign parameters to groups).

    optimizer: "adamw" (dense, torch.optim.AdamW), or one of the row-sparse optimizers of
    memory/sparse/row_optim.py that accept sparse gradients and touch only the rows a step touched:
    "adam" (lazy Adam, per-row step counts) and "rowwise_adagrad" (one state scalar per row).
    Parameters with sparse gradients (table rows) must be in a row-sparse group. Defined here,
    below the memories, because a memory names its groups' defaults (`Memory.optim_defaults`).
    """

    lr_scale: float = 1.0
    weight_decay: float | None = None     # None: the run's weight_decay (a memory's own group: 0)
    optimizer: Literal["adamw", "adam", "rowwise_adagrad"] = "adamw"
    eps: float = 1e-8

    def check(self) -> list[str]:
        r = [] if self.lr_scale > 0 else [f"lr_scale must be > 0, got {self.lr_scale}"]
        if self.weight_decay is not None and self.weight_decay < 0:
            r.append(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.optimizer not in ("adamw", "adam", "rowwise_adagrad"):
            r.append(f"optimizer must be adamw, adam or rowwise_adagrad, got {self.optimizer!r}")
        if not self.eps > 0:
            r.append(f"eps must be > 0, got {self.eps}")
        return r



# ----------------------------------------------------------------------------- dict round trip

def to_dict(cfg: Any) -> Any:
    """A config (or nested structure of them) as plain YAML/JSON data; memory configs get `kind`."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        out: dict[str, Any] = {}
        kind = getattr(type(cfg), "kind", None)
        if isinstance(kind, str) and kind:
            out["kind"] = kind
        for f in dataclasses.fields(cfg):
            out[f.name] = to_dict(getattr(cfg, f.name))
        return out
    if isinstance(cfg, (tuple, list)):
        return [to_dict(x) for x in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def _suggest(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


class _Reasons(list):
    def add(self, path: str, msg: str) -> None:
        self.append(f"{path}: {msg}" if path else msg)


def _convert(tp: Any, value: Any, path: str, reasons: _Reasons) -> Any:
    """Convert plain data `value` to type `tp`, appending problems to `reasons`."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            reasons.add(path, "must not be null")
            return None
        non_none = [a for a in args if a is not type(None)]
        if len(non_none) == 1:
            return _convert(non_none[0], value, path, reasons)
        for a in non_none:  # first type that converts cleanly
            trial = _Reasons()
            out = _convert(a, value, path, trial)
            if not trial:
                return out
        reasons.add(path, f"{value!r} does not match {tp}")
        return None
    if origin is Literal:
        if value not in get_args(tp):
            reasons.add(path, f"{value!r} is not one of {list(get_args(tp))}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            reasons.add(path, f"expected a list, got {type(value).__name__} {value!r}")
            return ()
        args = get_args(tp)
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            items = [_convert(args[0], v, f"{path}.{i}", reasons) for i, v in enumerate(value)]
        elif origin is tuple and args:
            if len(args) != len(value):
                reasons.add(path, f"expected {len(args)} items, got {len(value)}")
                return ()
            items = [_convert(a, v, f"{path}.{i}", reasons) for i, (a, v) in enumerate(zip(args, value))]
        else:
            items = [_convert(args[0] if args else Any, v, f"{path}.{i}", reasons) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            reasons.add(path, f"expected a mapping, got {type(value).__name__}")
            return {}
        kt, vt = get_args(tp) or (Any, Any)
        return {_convert(kt, k, path, reasons): _convert(vt, v, f"{path}.{k}", reasons) for k, v in value.items()}
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _from_dict(tp, value, path, reasons)
    if tp is bool:
        if not isinstance(value, bool):
            reasons.add(path, f"expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            reasons.add(path, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            reasons.add(path, f"expected a number, got {value!r}")
            return value
        if not math.isfinite(value):
            reasons.add(path, f"must be a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            reasons.add(path, f"expected a string, got {value!r}")
        return value
    return value


def _from_dict(cls: type, data: Any, path: str, reasons: _Reasons) -> Any:
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        reasons.add(path, f"expected a mapping for {cls.__name__}, got {type(data).__name__} {data!r}")
        return None
    data = dict(data)
    own_kind = getattr(cls, "kind", None)
    kind = data.pop("kind", None) if own_kind is not None else None
    if own_kind == "":  # a polymorphic base (MemoryConfig, TaskConfig): `kind` picks the class
        from memstack import registry

        try:
            cls = registry.config_class_for(cls, kind)
        except Exception as e:  # unknown or missing kind
            reasons.add(f"{path}.kind" if path else "kind", str(e))
            return None
    elif kind is not None and kind != own_kind:
        reasons.add(path, f"kind {kind!r} does not match {cls.__name__} (kind {own_kind!r})")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = [k for k in data if k not in names]
    for k in unknown:
        reasons.add(f"{path}.{k}" if path else k, f"unknown field for {cls.__name__}{_suggest(k, names)}; valid: {', '.join(names)}")
    kwargs = {}
    n_before = len(reasons)
    for name in names:
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], f"{path}.{name}" if path else name, reasons)
    if len(reasons) > n_before:
        return None
    try:  # also when there were unknown fields: report the known fields' problems in the same pass
        out = cls(**kwargs)
    except ConfigError as e:
        for r in e.reasons:
            reasons.add(path, r)
        return None
    except TypeError as e:  # a required field is missing
        reasons.add(path, str(e))
        return None
    return None if unknown else out


def from_dict(cls: type, data: Any, what: str | None = None) -> Any:
    """Build config class `cls` from plain data; raises one ConfigError with every problem."""
    reasons = _Reasons()
    out = _from_dict(cls, data, "", reasons)
    if reasons:
        raise ConfigError(list(reasons), what=what or cls.__name__)
    return out


# ----------------------------------------------------------------------------- YAML + overrides

class _Loader(yaml.SafeLoader):
    """SafeLoader that reads 1e-3 and 2E5 as floats (YAML 1.1 wants a dot: '1.0e-3')."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)

def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping at the top level, not {type(data).__name__}")
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """'model.n_layers=4' -> (['model', 'n_layers'], 4). Values are parsed as YAML scalars/lists."""
    key, sep, raw = text.lstrip("-").partition("=")
    if not sep or not key:
        raise ConfigError(f"override {text!r} must look like key.sub=value")
    try:
        value = yaml_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply dotted overrides to a nested dict/list (copied). Every bad path is reported at once."""
    import copy

    data = copy.deepcopy(data)
    reasons = []
    for text in overrides:
        try:
            keys, value = parse_override(text)
        except ConfigError as e:
            reasons.extend(e.reasons)
            continue
        node: Any = data
        for i, k in enumerate(keys):
            last = i == len(keys) - 1
            where = ".".join(keys[: i + 1])
            if isinstance(node, list):
                if not k.isdigit() or int(k) >= len(node):
                    reasons.append(f"override {text!r}: {where} is not an index of a list of {len(node)}")
                    break
                k = int(k)
            elif not isinstance(node, dict):
                reasons.append(f"override {text!r}: {'.'.join(keys[:i])} is a value, not a section")
                break
            if last:
                node[k] = value
            else:
                if isinstance(node, dict) and k not in node:
                    node[k] = {}
                node = node[k]
    if reasons:
        raise ConfigError(reasons, what="overrides")
    return data


__all__ = [
    "BackboneConfig", "MemoryConfig", "ModelConfig", "Checked", "GroupConfig", "to_dict", "from_dict", "load_yaml",
    "apply_overrides", "parse_override",
]
