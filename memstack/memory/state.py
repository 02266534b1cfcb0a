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

from memstack.atomic import (StoreLock, clean_temporaries, read_sealed, remove_unreferenced, save_tensors_versioned,
                             sha256_file, tidy, versioned_name_re, write_sealed)
from memstack.errors import CheckpointError, IntegrityError

STATE_FORMAT = 2
STATE_KIND = "memstack-state"


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


def unique_state_dict(model: torch.nn.Module) -> dict[str, Tensor]:
    """state_dict without aliases (tied embeddings are stored once, under their first name)."""
    out, seen = {}, set()
    for name, t in model.state_dict().items():
        key = (t.data_ptr(), t.shape, t.stride()) if t.numel() else None
        if key is not None and key in seen:
            continue
        seen.add(key)
        out[name] = t.detach().contiguous().cpu()
    return out


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


def _unflatten(skel: Any, tensors_: dict[str, Tensor], device: torch.device | str, named: set[str] | None = None) -> Any:
    named = set() if named is None else named
    if isinstance(skel, dict):
        if "$tensor" in skel:
            named.add(skel["$tensor"])
            return tensors_[skel["$tensor"]].to(device)
        if "$dataclass" in skel:
            cls = _state_class(skel["$dataclass"])
            return cls(**{k: _unflatten(v, tensors_, device, named) for k, v in skel["fields"].items()})
        if "$tuple" in skel:
            return tuple(_unflatten(x, tensors_, device, named) for x in skel["$tuple"])
        if "$list" in skel:
            return [_unflatten(x, tensors_, device, named) for x in skel["$list"]]
        raise ValueError(f"unknown state node {sorted(skel)}")
    return skel


def save_state(state: ModelState, path: str | Path, kinds: list[str]) -> str:
    """Write a model state as the sealed manifest `<path>.json` (structure, kinds, the tensor
    file's SHA-256) and a content-named tensor file beside it. A crash at any point leaves the
    previous version intact; temporaries of crashed writers are removed. Returns the manifest's
    checksum (what a checkpoint records to sign it)."""
    path = Path(path)
    flat: dict[str, Tensor] = {}
    skel = _flatten(state, "state", flat)   # fails on an unsaveable state before anything is written
    json.dumps(skel, allow_nan=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    manifest = path.with_name(path.name + ".json")
    with StoreLock(path.parent):
        clean_temporaries(path.parent)
        name, sha = save_tensors_versioned(flat, path.parent, path.name)
        checksum = write_sealed(manifest, STATE_KIND, STATE_FORMAT, {"kinds": list(kinds), "skeleton": skel,
                                                                       "tensors": name, "sha256": sha})
        remove_unreferenced(path.parent, path.name, {name})
    return checksum


def state_manifest(path: str | Path) -> dict:
    """The verified manifest of a state saved at `path` (IntegrityError naming the file otherwise)."""
    path = Path(path)
    return read_sealed(path.with_name(path.name + ".json"), STATE_KIND, STATE_FORMAT,
                       {"kinds": list, "skeleton": (dict, list, type(None), str, int, float, bool), "tensors": str,
                        "sha256": str}, older=f"run `memstack migrate {path.parent}` to verify it and add the checksums")


def load_state(path: str | Path, kinds: list[str], device: torch.device | str = "cpu", expect: str | None = None) -> ModelState:
    """Read a state written by `save_state`; refuses a corrupted or edited file, one from other
    memories, or (with `expect`) one whose manifest is not the one a checkpoint recorded."""
    from safetensors.torch import load_file

    path = Path(path)
    manifest = path.with_name(path.name + ".json")
    if not manifest.is_file():
        raise CheckpointError(f"no saved state at {path} (expected {manifest.name})")
    tidy(path.parent, lambda: {path.name: state_manifest(path)["tensors"]})    # what a crashed save left
    meta = state_manifest(path)
    if expect is not None and meta["checksum"] != expect:
        raise IntegrityError(f"{manifest} is not the state its checkpoint recorded (its checksum differs)")
    if meta["kinds"] != list(kinds):
        raise CheckpointError(f"{path}: state was saved for memories {meta['kinds']}, this model has {list(kinds)}")
    tpath = path.parent / meta["tensors"]
    if not versioned_name_re(path.name).fullmatch(meta["tensors"]) or not tpath.is_file():
        raise CheckpointError(f"{manifest} names {tpath.name}, which is missing")
    if sha256_file(tpath) != meta["sha256"]:
        raise CheckpointError(f"{tpath}: checksum mismatch -- the file is corrupted or was modified")
    tensors_ = load_file(str(tpath))
    named: set[str] = set()
    try:
        out = _unflatten(meta["skeleton"], tensors_, device, named)
    except (KeyError, TypeError, ValueError) as e:
        raise IntegrityError(f"{manifest}: its structure does not fit its tensors ({e})") from None
    if named != set(tensors_) or not isinstance(out, ModelState):
        raise IntegrityError(f"{manifest}: its structure does not fit its tensor file {tpath.name}")
    return out
