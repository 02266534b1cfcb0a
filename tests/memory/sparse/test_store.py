"""Table store: versions, rollback and branching, delta export/import between stores, refusal
of corrupted or mismatched files, and a process killed mid-snapshot leaving the last version."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from memstack.errors import CheckpointError
from memstack.memory.sparse.store import TableStore, tensor_checksum

NS = [{"name": "knowledge", "rows": 50, "addressing": "hashed", "write_quota": None}]
REPO = Path(__file__).resolve().parents[3]


def _store(tmp_path, name="s"):
    w = torch.randn(50, 4)
    st = TableStore(tmp_path / name)
    assert st.create(w, NS) == 1
    return st, w


def test_commit_rollback_branch_and_load_any_version(tmp_path):
    st, w = _store(tmp_path)
    snaps = {1: w.clone()}
    for v in (2, 3):
        rows = torch.tensor([v, 10 + v])
        w[rows] += 1.0
        assert st.commit(w, rows) == v
        snaps[v] = w.clone()
    assert st.head == 3 and st.version(3).touched == 2 and st.version(3).kind == "delta"
    for v, want in snaps.items():
        assert torch.equal(st.load(v), want)
    st.rollback(1)
    assert st.head == 1 and torch.equal(st.load(), snaps[1])
    w = snaps[1].clone()
    w[[40]] = 7.0
    assert st.commit(w, torch.tensor([40])) == 4 and st.version(4).parent == 1   # a branch off version 1
    assert torch.equal(st.load(4), w) and torch.equal(st.load(3), snaps[3])     # the other branch survives
    assert st.touched_between(3, 4).tolist() == [2, 3, 12, 13, 40]   # v2, v3 on one side, v4 on the other
    with pytest.raises(CheckpointError, match="already holds a table store"):
        st.create(w, NS)


def test_delta_export_import_between_stores(tmp_path):
    a, w = _store(tmp_path, "a")
    b = TableStore(tmp_path / "b")
    b.create(w, NS)                                       # a replica at the same base
    w2 = w.clone()
    w2[[5, 6]] = 0.5
    a.commit(w2, torch.tensor([5, 6, 7]))                  # row 7 listed but unchanged
    head = a.export_delta(1, 2, tmp_path / "d.safetensors")
    assert head["n_rows"] == 2 and head["target_checksum"] == tensor_checksum(w2)
    v = b.import_delta(tmp_path / "d.safetensors")
    assert torch.equal(b.load(v), w2)
    # importing again onto the new HEAD: its base no longer matches -> refused, nothing written
    with pytest.raises(CheckpointError, match="not the delta's base"):
        b.import_delta(tmp_path / "d.safetensors")
    assert b.head == v and len(b.versions()) == 2
    c = TableStore(tmp_path / "c")
    c.create(torch.randn(50, 4), NS)
    with pytest.raises(CheckpointError, match="not the delta's base"):
        c.import_delta(tmp_path / "d.safetensors")
    other = TableStore(tmp_path / "o")
    other.create(torch.randn(30, 4), [{**NS[0], "rows": 30}])
    with pytest.raises(CheckpointError) as e:
        other.import_delta(tmp_path / "d.safetensors")
    assert "(50, 4) table" in str(e.value) and "namespace layout differs" in str(e.value)


def test_corrupted_version_is_refused_and_rollback_recovers(tmp_path):
    st, w = _store(tmp_path)
    w[[1]] = 3.0
    st.commit(w, torch.tensor([1]))
    f = tmp_path / "s" / st.version(2).file
    f.write_bytes(f.read_bytes()[:-3] + b"xyz")
    with pytest.raises(CheckpointError, match="checksum mismatch -- version 2 is corrupted"):
        st.load()
    st.rollback(1)
    assert st.head == 1 and st.load().shape == (50, 4)


_WRITER = """
import sys, torch
from memstack.memory.sparse.store import TableStore
st = TableStore(sys.argv[1])
w = st.load()
i = 0
while True:                                   # commit forever; the parent kills us at some point
    i += 1
    rows = torch.tensor([i % 50, (7 * i) % 50])
    w[rows] = float(i)
    st.commit(w, rows, {"i": i})
    if len(sys.argv) > 2:
        break
"""


class _Crash(BaseException):
    pass


@pytest.mark.parametrize("stage", ["rows", "manifest", "head"])
def test_crash_injected_at_each_stage_leaves_a_loadable_version(tmp_path, stage, monkeypatch):
    """In process: the commit stops dead right after `stage` (nothing after it runs)."""
    from memstack.memory.sparse import store as store_mod

    st, w = _store(tmp_path)

    def crash(at):
        if at == stage:
            raise _Crash(at)

    monkeypatch.setattr(store_mod, "_crash_point", crash)
    w_new = w.clone()
    w_new[[1, 7]] = 1.0
    with pytest.raises(_Crash):
        st.commit(w_new, torch.tensor([1, 7]))
    monkeypatch.undo()
    _check_after_crash(st, w, stage)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["rows", "manifest", "head"])
def test_process_exit_at_each_stage_of_a_snapshot_leaves_a_loadable_version(tmp_path, stage):
    """The same with a real process exiting abruptly (os._exit) at the stage."""
    st, w = _store(tmp_path)
    env = {**os.environ, "MEMSTACK_STORE_CRASH": stage}
    p = subprocess.run([sys.executable, "-c", _WRITER, str(tmp_path / "s"), "once"], env=env, cwd=REPO, timeout=300)
    assert p.returncode == 86
    _check_after_crash(st, w, stage)


def _check_after_crash(st, w, stage):
    want_head = 2 if stage == "head" else 1                 # before HEAD moves, the old version stands
    assert st.head == want_head
    got = st.load()
    if want_head == 1:
        assert torch.equal(got, w)
    else:
        assert got[[1, 7]].eq(1.0).all()
    w2 = got.clone()
    w2[[0]] = -1.0
    v = st.commit(w2, torch.tensor([0]))                    # the store keeps working after the crash
    assert torch.equal(st.load(v), w2)


def test_sigkill_during_snapshots_leaves_the_last_committed_version(tmp_path):
    st, _ = _store(tmp_path)
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path / "s")], cwd=REPO)
    try:
        deadline = time.time() + 60
        while st.head < 4 and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(0.137)                                   # land somewhere inside a commit
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    head = st.head
    assert head >= 4
    w = st.load()                                            # verifies every checksum of the chain
    i = st.version(head).meta["i"]
    assert w[i % 50].eq(float(i)).all() and w[(7 * i) % 50].eq(float(i)).all()
