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


# ----------------------------------------------------------------------------- rows
# A serving engine keeps each request's state in its own slot (one row) and gathers the rows of
# a step into one batch state; these are the generic row utilities (a memory overrides
# `Memory.take_rows` / `Memory.cat_rows` only where padding needs more than this).

def take_rows(obj: Any, idx: Tensor) -> Any:
    """Rows `idx` (1-D int64) of every tensor in a state tree (dim 0 is the example)."""
    return tree_map(lambda t: t.index_select(0, idx.to(t.device)), obj)


def cat_rows(objs: list[Any]) -> Any:
    """Concatenate row states along dim 0. Tensors whose non-batch sizes differ are left-padded
    to the largest with zeros (False for bool): the padding is the oldest, invalid end of a
    buffer that keeps its newest entries last. A None among tensors stands for zeros (an empty
    accumulator). Scalars must agree across rows."""
    first = objs[0]
    if len(objs) == 1:
        return first
    if isinstance(first, Tensor) or (first is None and any(isinstance(o, Tensor) for o in objs)):
        return _cat_tensors(objs)
    if dataclasses.is_dataclass(first) and not isinstance(first, type):
        return dataclasses.replace(first, **{f.name: cat_rows([getattr(o, f.name) for o in objs])
                                             for f in dataclasses.fields(first) if f.init})
    if isinstance(first, (tuple, list)):
        out = [cat_rows([o[i] for o in objs]) for i in range(len(first))]
        return tuple(out) if isinstance(first, tuple) else out
    if any(o != first for o in objs):
        raise ValueError(f"rows disagree on a scalar state field ({[o for o in objs]}); this memory must "
                         "override Memory.cat_rows")
    return first


def _cat_tensors(objs: list[Tensor | None]) -> Tensor:
    ref = next(o for o in objs if o is not None)
    ts = [o if o is not None else ref.new_zeros((1, *ref.shape[1:])) for o in objs]
    if any(t.dim() != ref.dim() for t in ts):
        raise ValueError("rows of a state field have different ranks; cannot concatenate")
    shape = [max(t.shape[d] for t in ts) for d in range(1, ref.dim())]
    padded = []
    for t in ts:
        if list(t.shape[1:]) != shape:
            pad: list[int] = []
            for d in reversed(range(1, t.dim())):        # F.pad order: last dim first, (left, right)
                pad += [shape[d - 1] - t.shape[d], 0]
            t = torch.nn.functional.pad(t, pad) if t.dtype != torch.bool else torch.nn.functional.pad(t.to(torch.uint8), pad).bool()
        padded.append(t)
    return torch.cat(padded, 0)


def split_rows(obj: Any, batch: int, take: Callable[[Any, Tensor], Any] = take_rows) -> list[Any]:
    """[row 0, row 1, ...] of a batch state (each a batch of one)."""
    return [take(obj, torch.tensor([i])) for i in range(batch)]


def compact_index(valid: Tensor, keep: int | None = None, left: bool = False,
                  width: int | None = None) -> tuple[Tensor, Tensor]:
    """Per row, the indices of its last `keep` valid entries (all of them with keep=None), in order,
    right-aligned (left=False: newest last, padding first) or left-aligned (left=True: oldest
    first, padding last), in a width of the most any row keeps (or exactly `width`, padded).
    valid (B, N) -> (idx (B, W) int64 into N, ok (B, W) bool); gather with `gather_entries`."""
    B, N = valid.shape
    n = valid.sum(1)
    W = int(n.max()) if B and N else 0
    if keep is not None:
        W = min(W, keep)
    if width is not None:
        if width < W:
            raise ValueError(f"compact_index: {W} entries do not fit width {width}")
        if width > W:
            idx, ok = compact_index(valid, keep, left)
            pad = width - W
            z = torch.zeros(B, pad, dtype=idx.dtype, device=idx.device)
            if left:
                return torch.cat([idx, z], 1), torch.cat([ok, z.bool()], 1)
            return torch.cat([z, idx], 1), torch.cat([z.bool(), ok], 1)
    ar = torch.arange(N, device=valid.device)
    if not left:
        # invalid entries sort first (key -1), valid ones by position: take the last W columns
        idx = torch.where(valid, ar, torch.full_like(ar, -1)).sort(dim=1).values[:, N - W:]
        return idx.clamp(min=0), idx >= 0
    drop = (n - keep).clamp(min=0) if keep is not None else torch.zeros_like(n)
    rank = valid.long().cumsum(1) - 1                                           # 0-based rank among valid
    use = valid & (rank >= drop[:, None])
    key = torch.where(use, ar, torch.full_like(ar, N))                          # kept first, by position
    idx = key.sort(dim=1).values[:, :W]
    return idx.clamp(max=max(N - 1, 0)), idx < N


def gather_entries(x: Tensor, idx: Tensor, dim: int = 1) -> Tensor:
    """x gathered along `dim` (the entry axis) with per-row indices idx (B, W)."""
    shape = [1] * x.dim()
    shape[0], shape[dim] = idx.shape
    view = idx.view(shape)
    expand = list(x.shape)
    expand[dim] = idx.shape[1]
    return x.gather(dim, view.expand(expand))


def drop_leading_invalid(valid: Tensor) -> int:
    """How many leading entries are invalid in every row (they can be cut from the buffer)."""
    if not valid.numel():
        return valid.shape[1] if valid.dim() == 2 else 0
    any_valid = valid.any(0)
    return int(any_valid.float().argmax()) if bool(any_valid.any()) else valid.shape[1]

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
