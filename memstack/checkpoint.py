"""Model checkpoints: safetensors weights + the config as JSON, checksummed, written atomically.

Layout of a checkpoint directory:
    config.json                  sealed (memstack/atomic.py): {"model": <ModelConfig as data>, "meta",
                                 "weights": file, "sha256", "shards": checksum of shards/index.json | null}
    model-<sha256[:12]>.safetensors
    shards/                      row-sharded tables (memory/sparse/shard.py), when trained so

A save writes the new weights file first, then atomically replaces config.json (which names
it), then removes weights no longer named and temporaries of crashed writers: a crash at any
point leaves a loadable checkpoint. Loading verifies config.json's seal (any edit, truncation or
type change is refused, naming the file), the weights' SHA-256 and the shard index it records,
and refuses weights or configs that do not match the model, listing every mismatch at once.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from memstack.atomic import (StoreLock, clean_temporaries, read_sealed, remove_unreferenced, save_tensors_versioned,
                             sha256_file, tidy, versioned_name_re, write_sealed)
from memstack.config import ModelConfig, from_dict, to_dict
from memstack.errors import CheckpointError, ConfigError
from memstack.memory.state import unique_state_dict

FORMAT = 2
KIND = "memstack-checkpoint"


def save_checkpoint(model: torch.nn.Module, path: str | Path, meta: dict | None = None) -> Path:
    """Save `model` (a MemoryModel) to directory `path`; returns the directory. Shards already
    written into `path/shards` (a row-sharded run) are signed through their index."""
    path = Path(path)
    doc = {"model": to_dict(model.cfg), "meta": meta or {}}
    json.dumps(doc, allow_nan=False)  # an unserialisable meta fails here, before anything is written
    path.mkdir(parents=True, exist_ok=True)
    with StoreLock(path):
        clean_temporaries(path)
        shards = None
        if (path / "shards").is_dir():
            from memstack.memory.sparse.shard import INDEX_FORMAT, INDEX_KIND

            shards = read_sealed(path / "shards" / "index.json", INDEX_KIND, INDEX_FORMAT)["checksum"]
        name, sha = save_tensors_versioned(unique_state_dict(model), path, "model")
        write_sealed(path / "config.json", KIND, FORMAT, {**doc, "weights": name, "sha256": sha, "shards": shards})
        remove_unreferenced(path, "model", {name})
    return path


def _read_config(path: Path) -> dict:
    f = path / "config.json"
    if not f.is_file():
        raise CheckpointError(f"{path} is not a memstack checkpoint (no config.json)")

    def read() -> dict:
        return read_sealed(f, KIND, FORMAT, {"model": dict, "meta": dict, "weights": str, "sha256": str,
                                             "shards": (str, type(None))},
                           older=f"run `memstack migrate {path}` to verify its weights and add the checksums")

    tidy(path, lambda: {"model": read()["weights"]})              # what a crashed save left
    return read()


def read_checkpoint_config(path: str | Path) -> tuple[ModelConfig, dict]:
    """The ModelConfig and meta stored in a checkpoint, without loading weights."""
    data = _read_config(Path(path))
    try:
        cfg = from_dict(ModelConfig, data["model"], what="checkpoint model config")
    except ConfigError as e:
        raise CheckpointError(f"{path}: stored config is invalid:\n{e}") from None
    return cfg, data.get("meta", {})


def _config_diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _config_diff(a.get(k, "<missing>"), b.get(k, "<missing>"), f"{prefix}.{k}" if prefix else k)
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _config_diff(x, y, f"{prefix}.{i}")]
    return [] if a == b else [f"{prefix}: checkpoint has {a!r}, expected {b!r}"]


def _verified_tensors(path: Path, data: dict) -> dict[str, Tensor]:
    """The tensors of checkpoint `path` (whose config.json is `data`), after checking that the
    weights file exists and matches its recorded SHA-256."""
    from safetensors.torch import load_file

    wfile = path / data["weights"]
    if not versioned_name_re("model").fullmatch(data["weights"]) or not wfile.is_file():
        raise CheckpointError(f"{path}: weights file {data['weights']} is missing")
    if sha256_file(wfile) != data["sha256"]:
        raise CheckpointError(f"{wfile}: checksum mismatch -- the file is corrupted or was modified")
    return load_file(str(wfile))


def _tensor_problems(saved: dict[str, Tensor], want: dict[str, Tensor]) -> list[str]:
    """Every way the saved tensors differ from the model's: missing, unexpected, shape, dtype."""
    problems = [f"missing tensor {k} {tuple(v.shape)}" for k, v in want.items() if k not in saved]
    problems += [f"unexpected tensor {k} {tuple(v.shape)}" for k, v in saved.items() if k not in want]
    problems += [f"{k}: shape {tuple(saved[k].shape)} in checkpoint, model has {tuple(v.shape)}"
                 for k, v in want.items() if k in saved and saved[k].shape != v.shape]
    problems += [f"{k}: dtype {saved[k].dtype} in checkpoint, model has {v.dtype}"
                 for k, v in want.items() if k in saved and saved[k].shape == v.shape and saved[k].dtype != v.dtype]
    return problems


def load_weights(model: torch.nn.Module, path: str | Path) -> dict:
    """Load a checkpoint's weights into an existing model, refusing any mismatch. Returns meta."""
    path = Path(path)
    data = _read_config(path)
    diff = _config_diff(data["model"], to_dict(model.cfg))
    if diff:
        raise CheckpointError(f"{path} was saved for a different model:\n" + "\n".join(f"  - {d}" for d in diff))
    saved = saved_full = _verified_tensors(path, data)
    want = unique_state_dict(model)
    in_shards: list[str] = []
    problems: list[str] = []
    sliced = _shard_slices(model, saved)   # full tables in the file, row-sharded in this process
    saved = {k: v for k, v in saved.items() if k not in sliced}
    if data["shards"] is not None and not (path / "shards").is_dir():
        raise CheckpointError(f"{path}: config.json records sharded tables, but {path / 'shards'} is missing")
    if (path / "shards").is_dir():  # row-sharded tables, saved by every rank (memory/sparse/shard.py)
        from memstack.memory.sparse.shard import shard_index, table_modules

        index = shard_index(path, expect=data["shards"])
        tables = table_modules(model)
        in_shards = sorted(set(tables) & set(index))
        want = {k: v for k, v in want.items() if k not in index}
        problems += [f"{k}: the checkpoint holds a ({index[k]['rows']}, {index[k]['dim']}) table, the model "
                     f"({tables[k].n_rows}, {tables[k].dim})" for k in in_shards
                     if (index[k]["rows"], index[k]["dim"]) != (tables[k].n_rows, tables[k].dim)]
    problems += _tensor_problems(saved, want)
    stack = getattr(model, "memory", None)
    for i, mem in enumerate(stack.memories if stack is not None else []):
        pre = f"memory.memories.{i}."
        problems += [f"memory {i} ({mem.cfg.kind}): {r}"
                     for r in mem.check_loaded({k[len(pre):]: v for k, v in saved.items() if k.startswith(pre)})]
    if problems:
        raise CheckpointError(f"{path} does not match the model ({len(problems)} problem(s)):\n"
                              + "\n".join(f"  - {p}" for p in problems))
    params = dict(model.state_dict())
    with torch.no_grad():
        for k, t in saved.items():
            params[k].copy_(t)
    with torch.no_grad():
        for k, (param, lo, hi) in sliced.items():
            param.copy_(saved_full[k][lo:hi])
    if in_shards:
        from memstack.memory.sparse.shard import load_shards_into

        load_shards_into(model, path, in_shards)
    return data.get("meta", {})


def load_backbone_weights(model: torch.nn.Module, path: str | Path) -> dict:
    """Load the backbone of checkpoint `path` -- every tensor outside the memory stack -- into
    `model`, whose memories may differ (e.g. a prefix to tune on a backbone trained without one).
    The backbone configs must be equal; the model's memory parameters are left as they are.
    Refuses a corrupted file or any mismatch, listing every one. Returns the checkpoint's meta."""
    path = Path(path)
    data = _read_config(path)
    diff = _config_diff(data["model"].get("backbone"), to_dict(model.cfg.backbone), "backbone")
    if diff:
        raise CheckpointError(f"{path} holds a different backbone:\n" + "\n".join(f"  - {d}" for d in diff))
    backbone = lambda d: {k: v for k, v in d.items() if not k.startswith("memory.")}  # noqa: E731
    saved, want = backbone(_verified_tensors(path, data)), backbone(unique_state_dict(model))
    problems = _tensor_problems(saved, want)
    if problems:
        raise CheckpointError(f"{path}: backbone does not match the model ({len(problems)} problem(s)):\n"
                              + "\n".join(f"  - {p}" for p in problems))
    params = dict(model.state_dict())
    with torch.no_grad():
        for k, t in saved.items():
            params[k].copy_(t)
    return data.get("meta", {})


def _shard_slices(model: torch.nn.Module, saved: dict[str, Tensor]) -> dict[str, tuple[Tensor, int, int]]:
    """Tables stored whole in `saved` whose model copy holds one row block (a row-sharded run
    resuming an unsharded checkpoint): name -> (parameter, lo, hi)."""
    out = {}
    for name, mod in model.named_modules():
        shard = getattr(mod, "shard", None)
        key = f"{name}.weight"
        if shard is not None and key in saved and saved[key].shape[0] == getattr(mod, "n_rows", -1):
            out[key] = (mod.weight, shard[2], shard[3])
    return out


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu", expect: ModelConfig | None = None):
    """Build the model stored in `path` and load its weights. With `expect`, refuse a checkpoint
    whose config differs from it. Returns (model, meta)."""
    from memstack.backbone.model import build_model

    cfg, _ = read_checkpoint_config(path)
    if expect is not None:
        diff = _config_diff(to_dict(cfg), to_dict(expect))
        if diff:
            raise CheckpointError(f"{path} does not hold the expected model:\n" + "\n".join(f"  - {d}" for d in diff))
    model = build_model(cfg)
    meta = load_weights(model, path)
    return model.to(device), meta
