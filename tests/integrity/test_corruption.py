"""Corruption suite: for every store (tests/integrity/stores.py), every file it wrote, and every
kind of damage -- a flipped bit, a truncation, an emptied file, a deletion, an edited field of a
JSON document or of a safetensors header, a document replaced by `[1, 2]` or `null` -- reading
the store refuses with an error that names the damaged file, and changes nothing else on disk.
Nothing is served wrong, nothing is skipped in silence.

Two outcomes other than an error are by design, and checked exactly:
- the KV disk tier is a cache: a damaged chunk is refused (`refused` names it) and its blocks
  are recomputed, so its read returns the other chunks only; a deleted manifest just makes its
  blocks unknown (and its chunk file an orphan the tier removes);
- a trainer checkpoint whose `latest` pointer is deleted resumes from the newest complete step.
"""
from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest

from memstack.errors import MemstackError
from integrity.stores import STORES, data_files, same

CASES: list[tuple[str, str, str]] = []      # (store, file, damage): filled per store below


def _json_doc(path: Path):
    try:
        doc = json.loads(path.read_text())
    except (UnicodeDecodeError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def _st_header(path: Path) -> dict | None:
    if path.suffix != ".safetensors":
        return None
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n])


def _write_st_header(path: Path, header: dict) -> None:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])


def _changed(v):
    if isinstance(v, bool):
        return not v
    if isinstance(v, int):
        return v + 1
    if isinstance(v, float):
        return v * 2 + 1
    if isinstance(v, str):
        return v + "x" if not v[-1:].isdigit() else v[:-1] + str((int(v[-1]) + 1) % 10)
    if isinstance(v, list):
        return v[:-1] if v else [0]
    if isinstance(v, dict):
        return {**v, "edited": 1}
    return 0


def damages(path: Path) -> list[str]:
    out = ["flip", "truncate", "empty", "delete"]
    doc = _json_doc(path)
    if doc is not None:
        out += [f"edit:{k}" for k in doc if k != "checksum"] + ["type:list", "type:null"]
    header = _st_header(path)
    if header is not None:
        out += [f"meta:{k}" for k in header.get("__metadata__", {})]
        out += [f"shape:{k}" for k in header if k != "__metadata__"][:1]
    return out


def damage(path: Path, how: str) -> None:
    raw = path.read_bytes()
    if how == "flip":
        b = bytearray(raw)
        b[len(b) // 2] ^= 0x01
        path.write_bytes(bytes(b))
    elif how == "truncate":
        path.write_bytes(raw[: len(raw) // 2])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "delete":
        path.unlink()
    elif how.startswith("edit:"):
        doc = json.loads(raw)
        doc[how[5:]] = _changed(doc[how[5:]])
        path.write_text(json.dumps(doc, indent=1) + "\n")       # as written, but not re-sealed
    elif how.startswith("type:"):
        path.write_text("[1, 2]\n" if how == "type:list" else "null\n")
    elif how.startswith("meta:"):
        h = _st_header(path)
        h["__metadata__"][how[5:]] = _changed(h["__metadata__"][how[5:]])
        _write_st_header(path, h)
    elif how.startswith("shape:"):
        h = _st_header(path)
        t = h[how[6:]]
        t["shape"] = [t["shape"][0] + 1, *t["shape"][1:]] if t["shape"] else [1]
        _write_st_header(path, h)
    else:
        raise ValueError(how)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """Each store built once: {name: (root, what a full read returns)}."""
    out = {}
    for s in STORES:
        root = tmp_path_factory.mktemp(s.name) / "store"
        out[s.name] = (root, s.build(root))
    return out


def _cases():
    """Enumerated from a throwaway build, so the parametrisation lists every (file, damage)."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        for s in STORES:
            root = Path(d) / s.name
            s.build(root)
            for f, g in _named(root).items():
                for how in damages(root / f):
                    yield pytest.param(s.name, g, how, id=f"{s.name}:{g}:{how}")


def _generic(f: str) -> str:
    """A content-named file's name with its hash replaced."""
    import re

    return re.sub(r"-[0-9a-f]{12}\.", "-<sha>.", f)


def _named(root: Path) -> dict[str, str]:
    """file -> a name stable across builds (hashes replaced by the order the files were written)."""
    files = sorted(data_files(root), key=lambda f: ((root / f).stat().st_mtime_ns, f))
    seen: dict[str, int] = {}
    out = {}
    for f in files:
        g = _generic(f)
        if g != f:
            seen[g] = seen.get(g, 0) + 1
            g = g.replace("<sha>", f"<sha#{seen[g]}>")
        out[f] = g
    return out


CASES = list(_cases())


@pytest.mark.parametrize("store,file,how", CASES)
def test_damage_is_refused_naming_the_file(pristine, tmp_path, store, file, how):
    src, want = pristine[store]
    root = tmp_path / "store"
    shutil.copytree(src, root)
    read = next(s.read for s in STORES if s.name == store)
    (target,) = [root / f for f, g in _named(root).items() if g == file]    # content names: hashes differ per build
    damage(target, how)
    before = {f: (root / f).read_bytes() for f in data_files(root)}
    try:
        got = read(root)
    except MemstackError as e:
        assert target.name in str(e) or _generic(target.name) in _generic(str(e)), \
            f"{store}: damaging {file} ({how}) was refused without naming it: {e}"
        err = None
    else:
        err = "read succeeded"
    after = {f: (root / f).read_bytes() for f in data_files(root)}
    if err is None:
        assert after == before, f"{store}: a refused read changed files on disk"
        return
    # the outcomes that are not errors, by design (see the module docstring)
    if store == "kv_disk_tier":
        assert set(got["keys"]) < set(want["keys"]), f"{file} ({how}) was served"
        kept = [i for i, k in enumerate(want["keys"]) if k in set(got["keys"])]
        assert same(got["blocks"], want["blocks"][kept])
        if how == "delete" and file.endswith(".kv.json"):
            assert not any(f.endswith(".kv.json") for f in set(after) - set(before))   # its chunk: an orphan, removed
        else:
            assert any(target.name in r for r in got["refused"]), got["refused"]
        return
    if store == "trainer_checkpoint" and file == "latest" and how == "delete":
        assert same(got, want)
        return
    pytest.fail(f"{store}: damaging {file} ({how}) was not refused")


def test_every_store_and_file_is_covered():
    """The suite's reach, for docs/BENCHMARKS.md ("Reliability"): every store, every file."""
    per_store = {s.name: {(f, h) for n, f, h in (c.values for c in CASES) if n == s.name} for s in STORES}
    assert all(per_store.values())
    assert {h for c in CASES for h in [c.values[2]]} >= {"flip", "truncate", "empty", "delete", "type:list", "type:null"}
