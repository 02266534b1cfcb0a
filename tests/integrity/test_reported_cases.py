"""The cases reported in issue 13, each reproduced and refused: consistent forgeries (documents
re-sealed after an edit) that only the links between documents can catch, a truncated HEAD under
`memory log`, a parent cycle under `memory export`, datastore manifests that are not objects,
and what crashes leave behind (removed on the next open, never listed as a version)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from memstack.atomic import write_sealed
from memstack.cli import main
from memstack.errors import CheckpointError
from memstack.memory.retrieval.config import StoreConfig
from memstack.memory.retrieval.store import Datastore, DatastoreError
from memstack.memory.sparse.store import TableStore

NS = [{"name": "knowledge", "rows": 16, "addressing": "hashed", "write_quota": None}]
REPO = Path(__file__).resolve().parents[2]


def _reseal(path: Path, **changes) -> None:
    doc = json.loads(path.read_text())
    body = {k: v for k, v in doc.items() if k not in ("kind", "format", "checksum")}
    write_sealed(path, doc["kind"], doc["format"], {**body, **changes})


def _store(root: Path, n: int = 4) -> TableStore:
    st = TableStore(root)
    w = torch.randn(16, 2)
    st.create(w, NS)
    for i in range(n - 1):
        w[i] += 1
        st.commit(w, torch.tensor([i]))
    return st


def test_a_resealed_parent_edit_breaks_the_chain(tmp_path):
    st = _store(tmp_path / "s")
    _reseal(tmp_path / "s" / "versions" / "v000004.json", parent=2)     # consistent on its own ...
    with pytest.raises(CheckpointError, match="v000004.json is not the manifest HEAD was committed on"):
        TableStore(tmp_path / "s").load()                                  # ... but HEAD signed the original
    with pytest.raises(CheckpointError, match="parent and the parent's checksum disagree|not the manifest"):
        TableStore(tmp_path / "s").load(4)


def test_a_truncated_head_fails_memory_log_loudly(tmp_path, capsys):
    _store(tmp_path / "s")
    head = tmp_path / "s" / "HEAD"
    head.write_bytes(head.read_bytes()[:20])
    assert main(["memory", "log", "--store", str(tmp_path / "s")]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "HEAD is not valid JSON (truncated or corrupted)" in err
    assert main(["memory", "rollback", "--store", str(tmp_path / "s"), "--version", "1"]) == 2


def test_a_parent_cycle_is_refused_not_followed(tmp_path):
    """v2's parent re-sealed to 4 (a cycle 4 -> 3 -> 2 -> 4): `memory export --from 1 --to 4` exits
    with the reason instead of looping (run as a process with a deadline)."""
    _store(tmp_path / "s")
    _reseal(tmp_path / "s" / "versions" / "v000002.json", parent=4)
    p = subprocess.run([sys.executable, "-m", "memstack", "memory", "export", "--store", str(tmp_path / "s"), "--from", "1",
                        "--to", "4", "--out", str(tmp_path / "d.safetensors")], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 2 and "v000002.json is inconsistent: its parent 4 is not an earlier version" in p.stderr
    assert not (tmp_path / "d.safetensors").exists()


@pytest.mark.parametrize("text", ["[1, 2]", "null", "{}"])
def test_a_datastore_manifest_that_is_not_a_manifest_is_refused(tmp_path, text):
    s = Datastore(StoreConfig(dim=4), "t:1")
    s.add(torch.randn(3, 4))
    s.save(tmp_path / "d")
    (tmp_path / "d" / "manifest.json").write_text(text)
    with pytest.raises(DatastoreError, match="manifest.json"):
        Datastore.open(tmp_path / "d")


def test_resealed_datastore_namespaces_or_counter_are_refused(tmp_path):
    """Swapping tenant names, or lowering next_id, in a manifest re-sealed by hand: the tensor
    file records both, so the store refuses instead of serving tenant-b's entries to tenant-a or
    reusing live ids."""
    s = Datastore(StoreConfig(dim=4), "t:1")
    s.add(torch.randn(3, 4), namespace="tenant-a")
    s.add(torch.randn(3, 4), namespace="tenant-b")
    s.save(tmp_path / "d")
    mf = tmp_path / "d" / "manifest.json"
    good = mf.read_bytes()
    for change in ({"namespaces": ["tenant-b", "tenant-a"]}, {"next_id": 0}):
        _reseal(mf, **change)
        with pytest.raises(DatastoreError, match="manifest was replaced|next_id"):
            Datastore.open(tmp_path / "d")
        mf.write_bytes(good)
    assert Datastore.open(tmp_path / "d").next_id == 6


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_what_a_crash_leaves_is_removed_on_the_next_open_and_never_listed(tmp_path):
    st = _store(tmp_path / "s", n=2)
    root = tmp_path / "s"
    dead = _dead_pid()
    leftovers = [root / f".rows.safetensors.{dead}.0123abcd.tmp", root / "versions" / f".v000003.json.{dead}.89abcdef.tmp",
                 root / "store.json.k2j4h5g1.tmp"]                          # the last: an older version's temp name
    for f in leftovers:
        f.write_bytes(b"x" * 1000)
    live = root / f".HEAD.{os.getpid()}.00000000.tmp"                     # a live writer's: kept
    live.write_bytes(b"y")
    w = st.load().clone()
    w[5] = 9.0
    (root / "versions" / "v000003.json").write_text((root / "versions" / "v000002.json").read_text())  # crashed before HEAD
    from memstack.atomic import save_tensors_versioned

    orphan, _ = save_tensors_versioned({"rows": torch.tensor([5]), "values": w[5:6]}, root, "rows")
    fresh = TableStore(root)
    assert [v.version for v in fresh.versions()] == [1, 2]                 # v3 never committed: not a version
    assert {p.name for p in fresh.cleaned} == {f.name for f in leftovers} | {"v000003.json", orphan}
    assert not any(f.exists() for f in leftovers) and live.exists()
    assert fresh.commit(w, torch.tensor([5])) == 3 and torch.equal(fresh.load(), w)


def test_a_datastore_open_removes_a_crashed_saves_files(tmp_path):
    s = Datastore(StoreConfig(dim=4), "t:1")
    s.add(torch.randn(3, 4))
    s.save(tmp_path / "d")
    dead = _dead_pid()
    junk = [tmp_path / "d" / f".store.safetensors.{dead}.0000aaaa.tmp", tmp_path / "d" / "manifest.json.abcdefgh.tmp",
            tmp_path / "d" / "store-0123456789ab.safetensors"]
    for f in junk:
        f.write_bytes(b"z" * 4096)
    t = Datastore.open(tmp_path / "d")
    assert {p.name for p in t.cleaned} == {f.name for f in junk} and len(t) == 3
    assert sorted(p.name for p in (tmp_path / "d").iterdir() if p.name != ".lock")[0] == "manifest.json"
