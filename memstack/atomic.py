"""Crash-safe files: content-addressed tensor files plus a JSON manifest replaced atomically.

The pattern every persistent artefact uses (checkpoints, saved memory state):
  1. write the tensors to `<stem>-<sha256[:12]>.safetensors` (temp file, then rename);
  2. atomically replace the JSON manifest that names that file and its checksum;
  3. remove the files the previous manifest named.
A crash at any point leaves a manifest that names complete, checksummed files.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from torch import Tensor


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_json_atomic(path: Path, data: Any) -> None:
    """Serialise first (so an unserialisable value fails before anything is written), then
    write a temp file, fsync, and rename over `path`."""
    text = json.dumps(data, indent=1)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_tensors_versioned(tensors: dict[str, Tensor], directory: Path, stem: str) -> tuple[str, str]:
    """Write tensors as `<stem>-<sha[:12]>.safetensors`; returns (file name, sha256)."""
    from safetensors.torch import save_file

    fd, tmp = tempfile.mkstemp(dir=directory, prefix=stem + ".", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp)
        sha = sha256_file(Path(tmp))
        name = f"{stem}-{sha[:12]}.safetensors"
        os.replace(tmp, directory / name)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return name, sha


def remove_unreferenced(directory: Path, stem: str, keep: set[str]) -> None:
    """Delete `<stem>-*.safetensors` files in directory that no manifest references any more."""
    for f in directory.glob(f"{stem}-*.safetensors"):
        if f.name not in keep:
            f.unlink(missing_ok=True)
