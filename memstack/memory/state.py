"""Model state and the generic utilities every memory state gets for free.

A memory's state is a dataclass whose fields are tensors, plain Python scalars, None, or
tuples/lists of those (one entry per layer, typically). Nothing else: that is what lets one set
of functions detach, move, measure, save and load the state of any memory.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from memstack.atomic import remove_unreferenced, save_tensors_versioned, sha256_file, write_json_atomic
from memstack.errors import CheckpointError

STATE_FORMAT = 1


@dataclass
class ModelState:
    """Everything a model carries from one call to the next, per example."""

    pos: Tensor                   # (B,) int64: tokens of the current document consumed so far
    memories: tuple[Any, ...]     # one state per memory, in stack order (None: stateless memory)

    @property
    def batch_size(self) -> int:
        return self.pos.shape[0]


def tree_map(fn: Callable[[Tensor], Tensor], obj: Any) -> Any:
    """Apply fn to every tensor in a state tree, rebuilding dataclasses/tuples/lists around it."""
    if isinstance(obj, Tensor):
        return fn(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: tree_map(fn, getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init})
    if isinstance(obj, tuple):
        return tuple(tree_map(fn, x) for x in obj)
    if isinstance(obj, list):
        return [tree_map(fn, x) for x in obj]
    return obj


def tensors(obj: Any) -> list[Tensor]:
    out: list[Tensor] = []
    tree_map(lambda t: out.append(t) or t, obj)
    return out


def detach(obj: Any) -> Any:
    return tree_map(lambda t: t.detach(), obj)


def to(obj: Any, device: torch.device | str) -> Any:
    return tree_map(lambda t: t.to(device), obj)


def tensor_nbytes(obj: Any) -> int:
    """Bytes of the tensors as seen (views count their own extent)."""
    return sum(t.numel() * t.element_size() for t in tensors(obj))


def allocated_nbytes(obj: Any) -> int:
    """Bytes of the distinct storages behind the tensors (what is really allocated)."""
    seen: dict[int, int] = {}
    for t in tensors(obj):
        s = t.untyped_storage()
        seen[s.data_ptr()] = max(seen.get(s.data_ptr(), 0), s.nbytes())
    return sum(seen.values())


# ----------------------------------------------------------------------------- save / load

def _flatten(obj: Any, prefix: str, out: dict[str, Tensor]) -> Any:
    """Return a JSON skeleton of obj; tensors go into `out` under dotted keys."""
    if isinstance(obj, Tensor):
        out[prefix] = obj.detach().contiguous().cpu()
        return {"$tensor": prefix}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        cls = type(obj)
        return {"$dataclass": f"{cls.__module__}:{cls.__qualname__}",
                "fields": {f.name: _flatten(getattr(obj, f.name), f"{prefix}.{f.name}", out)
                           for f in dataclasses.fields(obj) if f.init}}
    if isinstance(obj, (tuple, list)):
        return {"$" + type(obj).__name__: [_flatten(x, f"{prefix}.{i}", out) for i, x in enumerate(obj)]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"state field of type {type(obj).__name__} at {prefix!r} cannot be saved; "
                    "states hold tensors, scalars, None and tuples/lists of them")


def _state_class(path: str) -> type:
    """Resolve a saved dataclass name among modules *already imported* (the model's memories);
    a saved file never causes new code to be imported."""
    import sys

    mod, _, name = path.partition(":")
    obj: Any = sys.modules.get(mod)
    for part in name.split("."):
        obj = getattr(obj, part, None)
    if not (isinstance(obj, type) and dataclasses.is_dataclass(obj)):
        raise CheckpointError(f"saved state refers to {path!r}, which is not a state class of this model")
    return obj


def _unflatten(skel: Any, tensors_: dict[str, Tensor], device: torch.device | str) -> Any:
    if isinstance(skel, dict):
        if "$tensor" in skel:
            return tensors_[skel["$tensor"]].to(device)
        if "$dataclass" in skel:
            cls = _state_class(skel["$dataclass"])
            return cls(**{k: _unflatten(v, tensors_, device) for k, v in skel["fields"].items()})
        if "$tuple" in skel:
            return tuple(_unflatten(x, tensors_, device) for x in skel["$tuple"])
        if "$list" in skel:
            return [_unflatten(x, tensors_, device) for x in skel["$list"]]
    return skel


def save_state(state: ModelState, path: str | Path, kinds: list[str]) -> None:
    """Write a model state as the manifest `<path>.json` (structure, kinds, checksum) and a
    content-named tensor file beside it. A crash at any point leaves the previous version intact."""
    path = Path(path)
    flat: dict[str, Tensor] = {}
    skel = _flatten(state, "state", flat)   # fails on an unsaveable state before anything is written
    json.dumps(skel)
    path.parent.mkdir(parents=True, exist_ok=True)
    manifest = path.with_name(path.name + ".json")
    name, sha = save_tensors_versioned(flat, path.parent, path.name)
    write_json_atomic(manifest, {"format": STATE_FORMAT, "kinds": kinds, "skeleton": skel, "tensors": name, "sha256": sha})
    remove_unreferenced(path.parent, path.name, {name})


def load_state(path: str | Path, kinds: list[str], device: torch.device | str = "cpu") -> ModelState:
    """Read a state written by `save_state`; refuses a corrupted file or one from other memories."""
    from safetensors.torch import load_file

    path = Path(path)
    manifest = path.with_name(path.name + ".json")
    if not manifest.is_file():
        raise CheckpointError(f"no saved state at {path} (expected {manifest.name})")
    try:
        meta = json.loads(manifest.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{manifest} is corrupted: {e}") from None
    if meta.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{manifest}: state format {meta.get('format')} is not supported (expected {STATE_FORMAT})")
    if meta.get("kinds") != kinds:
        raise CheckpointError(f"{path}: state was saved for memories {meta.get('kinds')}, this model has {kinds}")
    tpath = path.parent / str(meta.get("tensors"))
    if not tpath.is_file():
        raise CheckpointError(f"{manifest} names {tpath.name}, which is missing")
    if sha256_file(tpath) != meta.get("sha256"):
        raise CheckpointError(f"{tpath}: checksum mismatch -- the file is corrupted or was modified")
    return _unflatten(meta["skeleton"], load_file(str(tpath)), device)
