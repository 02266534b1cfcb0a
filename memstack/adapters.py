"""Adapter-only checkpoints: the memories trained on a frozen backbone, without the backbone.

A memory trained with `train.trainable: memory` (prefix-tuning, memory tokens, tables, Trellis,
...) is a small set of tensors next to a large frozen backbone; saving the whole model repeats
the backbone (540 MB for SmolLM2-135M in fp32) for every task. An adapter stores only

    adapter.json                sealed (memstack/atomic.py: kind "memstack-adapter", format, checksum):
                                {"backbone": <BackboneConfig>, "backbone_sha256": <fingerprint>,
                                 "pretrained": <name> | null, "memories": [<MemoryConfig>...],
                                 "weights": file, "sha256": its SHA-256, "meta"}
    adapter-<sha256[:12]>.safetensors   the memories' tensors ("memory.memories.<i>.<name>")

and is loaded onto *the* backbone it was trained on: the backbone's fingerprint (SHA-256 over the
names, dtypes, shapes and bytes of every backbone tensor, `backbone_fingerprint`) must match, and
a different backbone is refused with both fingerprints and what to load instead. With the
backbone's registered name (`pretrained: smollm2`) an adapter rebuilds its whole model by itself
(`model_from_adapter`). Written like a checkpoint (memstack/atomic.py): tensors first, then the
sealed document naming them by SHA-256, under the directory's writer lock; any edit of either
is refused, naming the file.

Hugging Face PEFT prefix-tuning adapters (`adapter_config.json` + `adapter_model.safetensors`)
convert to and from the `prefix` memory in memstack/hf/peft.py.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from memstack.atomic import (StoreLock, clean_temporaries, read_sealed, remove_unreferenced, save_tensors_versioned,
                             sha256_file, versioned_name_re, write_sealed)
from memstack.checkpoint import _config_diff, _tensor_problems
from memstack.config import BackboneConfig, MemoryConfig, ModelConfig, from_dict, to_dict
from memstack.errors import CheckpointError, ConfigError
from memstack.memory.state import unique_state_dict

FORMAT = 1
KIND = "memstack-adapter"
FIELDS = {"backbone": dict, "backbone_sha256": str, "pretrained": (str, type(None)), "memories": list,
          "weights": str, "sha256": str, "meta": dict}
MEMORY_PREFIX = "memory."
# fields a backbone may differ in and still be the same backbone (a run's context window, the
# initialiser of weights that are loaded anyway)
FREE_FIELDS = ("seg_len", "init_std")


def backbone_tensors(model: torch.nn.Module) -> dict[str, Tensor]:
    """Every tensor of `model` outside its memory stack (tied weights once)."""
    return {k: v for k, v in unique_state_dict(model).items() if not k.startswith(MEMORY_PREFIX)}


def memory_tensors(model: torch.nn.Module) -> dict[str, Tensor]:
    return {k: v for k, v in unique_state_dict(model).items() if k.startswith(MEMORY_PREFIX)}


def backbone_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 over the backbone's tensors: name, dtype, shape and bytes, in name order. Equal
    fingerprints mean bit-identical backbones (the memories are left out)."""
    h = hashlib.sha256()
    for name, t in sorted(backbone_tensors(model).items()):
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        if t.numel():
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())  # no copy of the bytes
    return h.hexdigest()


def _arch(b: BackboneConfig) -> dict:
    return {k: v for k, v in to_dict(b).items() if k not in FREE_FIELDS}


def save_adapter(model: torch.nn.Module, path: str | Path, *, pretrained: str | None = None,
                 meta: dict | None = None, fingerprint: str | None = None) -> Path:
    """Write the memories of `model` (a MemoryModel) as an adapter in directory `path`.
    `pretrained`: the registered backbone name (smollm2) or hf:<dir> it was trained on, so the
    adapter can rebuild its model alone. `fingerprint`: the backbone's, if already computed."""
    path = Path(path)
    tensors = memory_tensors(model)
    if not tensors:
        raise CheckpointError(f"the model has no memory parameters to save as an adapter (memories: "
                              f"{list(model.memory.kinds) or 'none'})")
    doc: dict[str, Any] = {"backbone": to_dict(model.cfg.backbone),
                           "backbone_sha256": fingerprint or backbone_fingerprint(model), "pretrained": pretrained,
                           "memories": [to_dict(m) for m in model.cfg.memories], "meta": meta or {}}
    json.dumps(doc, allow_nan=False)  # an unserialisable meta fails here, before anything is written
    path.mkdir(parents=True, exist_ok=True)
    with StoreLock(path):
        clean_temporaries(path)
        name, sha = save_tensors_versioned(tensors, path, "adapter")
        write_sealed(path / "adapter.json", KIND, FORMAT, {**doc, "weights": name, "sha256": sha})
        remove_unreferenced(path, "adapter", {name})
    return path


def is_adapter(path: str | Path) -> bool:
    return (Path(path) / "adapter.json").is_file()


def read_adapter(path: str | Path) -> dict:
    """The adapter's sealed document, verified (kind, format, checksum, field types)."""
    f = Path(path) / "adapter.json"
    if not f.is_file():
        raise CheckpointError(f"{path} is not a memstack adapter (no adapter.json)")
    return read_sealed(f, KIND, FORMAT, FIELDS)


def _verified_tensors(path: Path, doc: dict) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    wfile = path / doc["weights"]
    if not versioned_name_re("adapter").fullmatch(doc["weights"]) or not wfile.is_file():
        raise CheckpointError(f"{path}: weights file {doc['weights']} is missing")
    if sha256_file(wfile) != doc["sha256"]:
        raise CheckpointError(f"{wfile}: checksum mismatch -- the file is corrupted or was modified")
    return load_file(str(wfile))


def adapter_config(path: str | Path) -> tuple[BackboneConfig, tuple[MemoryConfig, ...], dict]:
    """(backbone config, memory configs, document) of an adapter."""
    doc = read_adapter(path)
    try:
        b = from_dict(BackboneConfig, doc["backbone"], what="adapter backbone config")
        mems = tuple(from_dict(MemoryConfig, m, what=f"adapter memory {i}") for i, m in enumerate(doc["memories"]))
    except ConfigError as e:
        raise CheckpointError(f"{path}: stored config is invalid:\n{e}") from None
    return b, mems, doc


def load_adapter(model: torch.nn.Module, path: str | Path, *, fingerprint: str | None = None) -> dict:
    """Load an adapter's memory tensors into `model`, whose backbone must be the one the adapter
    was trained on (same architecture and fingerprint) and whose memories must be the adapter's.
    Refuses any mismatch, listing every one. Returns the adapter's meta."""
    path = Path(path)
    b, mems, doc = adapter_config(path)
    problems = _config_diff(_arch(b), _arch(model.cfg.backbone), "backbone")
    problems += _config_diff([to_dict(m) for m in mems], [to_dict(m) for m in model.cfg.memories], "memories")
    if problems:
        raise CheckpointError(f"{path} does not fit this model ({len(problems)} problem(s)):\n"
                              + "\n".join(f"  - {p}" for p in problems))
    have = fingerprint or backbone_fingerprint(model)
    if have != doc["backbone_sha256"]:
        pinned = f" (pretrained backbone {doc['pretrained']!r})" if doc.get("pretrained") else ""
        raise CheckpointError(
            f"{path} was trained on a different backbone{pinned}: its fingerprint is {doc['backbone_sha256'][:16]}..., "
            f"this model's backbone is {have[:16]}... Same architecture, different weights: the adapter would "
            f"read keys and values it never saw. Load it onto the backbone it was trained on"
            + (f" (memstack.adapters.model_from_adapter({str(path)!r}) rebuilds it from {doc['pretrained']!r})."
               if doc.get("pretrained") else "."))
    saved = _verified_tensors(path, doc)
    want = memory_tensors(model)
    problems = _tensor_problems(saved, want)
    for i, mem in enumerate(model.memory.memories):
        pre = f"{MEMORY_PREFIX}memories.{i}."
        problems += [f"memory {i} ({mem.cfg.kind}): {r}"
                     for r in mem.check_loaded({k[len(pre):]: v for k, v in saved.items() if k.startswith(pre)})]
    if problems:
        raise CheckpointError(f"{path}: adapter tensors do not match the model ({len(problems)} problem(s)):\n"
                              + "\n".join(f"  - {p}" for p in problems))
    params = dict(model.state_dict())
    with torch.no_grad():
        for k, t in saved.items():
            params[k].copy_(t)
    return doc.get("meta", {})


def model_from_adapter(path: str | Path, backbone: str | Path | torch.nn.Module | None = None,
                       seg_len: int | None = None, device: str | torch.device = "cpu"):
    """The adapter's whole model: its memories on `backbone` -- a MemoryModel, a memstack
    checkpoint directory, or by default the pretrained backbone the adapter names. Returns (model, meta)."""
    from dataclasses import replace

    from memstack.backbone.model import build_model

    b, mems, doc = adapter_config(path)
    seg_len = seg_len or b.seg_len
    if backbone is None:
        if not doc.get("pretrained"):
            raise CheckpointError(f"{path} names no pretrained backbone; pass the backbone it was trained on "
                                  "(a model or a checkpoint directory)")
        from memstack.hf.pretrained import load_pretrained

        model = load_pretrained(doc["pretrained"], mems, seg_len=seg_len)
    else:
        if not isinstance(backbone, torch.nn.Module):
            from memstack.checkpoint import load_checkpoint

            backbone, _ = load_checkpoint(backbone)
        model = build_model(ModelConfig(replace(backbone.cfg.backbone, seg_len=seg_len), mems))
        weights = {k: v for k, v in backbone.state_dict().items() if not k.startswith(MEMORY_PREFIX)}
        missing, unexpected = model.load_state_dict(weights, strict=False)
        if unexpected or any(not k.startswith(MEMORY_PREFIX) for k in missing):
            raise CheckpointError(f"the given backbone does not fit the adapter: unexpected {unexpected[:3]}, "
                                  f"missing {[k for k in missing if not k.startswith(MEMORY_PREFIX)][:3]}")
    meta = load_adapter(model, path)
    return model.to(device), {**meta, "adapter": str(path), "pretrained": doc.get("pretrained")}


__all__ = ["backbone_fingerprint", "save_adapter", "load_adapter", "model_from_adapter", "read_adapter",
           "adapter_config", "is_adapter"]
