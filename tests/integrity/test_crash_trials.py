"""Crash trials (slow): for every store, TRIALS times, a forked writer loops over writes and
acknowledges each one once its call returned; the test kills it with SIGKILL at a random moment
(uniform over the next ~0.4 s of writing, so it lands anywhere in a write), then reopens the
store and checks:

- it opens, and holds the last acknowledged state -- or the next one, whose write had finished
  when the kill arrived but whose acknowledgement had not been read;
- zero orphans: after that open (and, for the single-file artefacts, the next write), the
  directory holds exactly the files the current version references -- no temporary file, no
  tensor file or manifest of an interrupted write.

`trials_left_debris` counts the trials whose kill left something to clean up (the writes the
kill interrupted half-way); docs/BENCHMARKS.md ("Reliability") reports the counts."""
from __future__ import annotations

import json
import os
import random
import select
import signal
import time
from pathlib import Path

import pytest
import torch

from integrity.stores import NS, SHAPE, V, _engine, _model, _namespace, data_files

TRIALS = 20
WINDOW_S = 0.4
RESULTS: dict[str, dict[str, int]] = {}


def _fork_writer(loop, root: Path) -> tuple[int, int]:
    """Fork a child running `loop(root, ack)`; returns (pid, read end of its acknowledgements)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                                             # the writer: never returns
        os.close(r)
        try:
            torch.manual_seed(0)
            loop(root, lambda i: os.write(w, f"{i}\n".encode()))
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            os._exit(1)
    os.close(w)
    return pid, r


def _kill_at_random(pid: int, fd: int, rng: random.Random) -> int:
    """Wait for the first acknowledgement, then SIGKILL at a random moment; returns the last
    acknowledged write (-1: none)."""
    buf, last = b"", -1
    deadline = None
    while True:
        now = time.monotonic()
        if deadline is not None and now >= deadline:
            break
        ready, _, _ = select.select([fd], [], [], 0.01 if deadline is None else max(deadline - now, 0))
        if ready:
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            buf += chunk
            *done, buf = buf.split(b"\n")
            if done:
                last = int(done[-1])
                if deadline is None:
                    deadline = time.monotonic() + rng.uniform(0.0, WINDOW_S)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    # a write acknowledged just before the kill may still be in the pipe
    while select.select([fd], [], [], 0)[0]:
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        buf += chunk
    os.close(fd)
    done = [x for x in buf.split(b"\n") if x]
    return int(done[-1]) if done else last


# ----------------------------------------------------------------------------- writers and checks
# each: loop(root, ack) writes forever; check(root, acked) -> (state index, files that must exist)

def table_loop(root, ack):
    from memstack.memory.sparse.store import TableStore

    st = TableStore(root)
    w = torch.zeros(24, 3)
    st.create(w, NS)
    ack(0)
    i = 0
    while True:
        i += 1
        w[i % 24] = float(i)
        st.commit(w, torch.tensor([i % 24]))
        ack(i)


def table_check(root: Path, acked: int):
    from memstack.memory.sparse.store import TableStore

    st = TableStore(root)
    n = st.head - 1
    want = torch.zeros(24, 3)
    for i in range(1, n + 1):
        want[i % 24] = float(i)
    assert torch.equal(st.load(), want) and st.last == st.head and [v.version for v in st.versions()] == list(range(1, n + 2))
    files = {"HEAD", "store.json"} | {f"versions/v{v:06d}.json" for v in range(1, n + 2)} | {v.file for v in st.versions()}
    return n, files, [p for p in st.cleaned]


def datastore_loop(root, ack):
    from memstack.memory.retrieval.config import StoreConfig
    from memstack.memory.retrieval.store import Datastore

    s = Datastore(StoreConfig(dim=4), "t:1", payload={"n": ("int64", ())})
    i = 0
    while True:
        i += 1
        s.add(torch.full((5, 4), float(i)), {"n": torch.full((5,), i)}, namespace=f"ns{i % 3}")
        s.save(root)
        ack(i)


def datastore_check(root: Path, acked: int):
    from memstack.memory.retrieval.store import Datastore

    s = Datastore.open(root)
    n = s.next_id // 5
    assert len(s) == 5 * n and s.payload("n").tolist() == [i for i in range(1, n + 1) for _ in range(5)]
    return n, {"manifest.json", json.loads((root / "manifest.json").read_text())["tensors"]}, s.cleaned


def tier_loop(root, ack):
    from memstack.memory.kv.tiers import DiskTier

    t = DiskTier(root, _namespace(), SHAPE)
    i = 0
    while True:
        i += 1
        t.put([i.to_bytes(4, "big") * 8 + bytes([j]) * 0 for j in range(1)], torch.full((1, *SHAPE), float(i)))
        ack(i)


def tier_check(root: Path, acked: int):
    from memstack.memory.kv.tiers import DiskTier

    t = DiskTier(root, _namespace(), SHAPE)
    have = sorted(int.from_bytes(k[:4], "big") for k in t.index)
    assert have == list(range(1, len(have) + 1)) and not t.refused
    for k in t.index:
        assert torch.equal(t.get([k]), torch.full((1, *SHAPE), float(int.from_bytes(k[:4], "big"))))
    d = t.dir.relative_to(root)
    files = {str(d / m.name) for m in t.dir.glob("*.kv.json")} | {str(d / Path(p).name) for p in t.shapes}
    return len(have), files, t.cleaned


def export_loop(root, ack):
    eng = _engine()
    i = 0
    while True:
        i += 1
        h = eng.sessions.pin([i % V] * 8 + [j % V for j in range(8)])
        eng.sessions.export(h, root / "p.kv")
        eng.sessions.unpin(h)
        ack(i)


def export_check(root: Path, acked: int):
    eng = _engine()
    h = eng.sessions.import_(root / "p.kv")
    return h.tokens[0], {"p.kv.json", json.loads((root / "p.kv.json").read_text())["tensors"]}, []


def state_loop(root, ack):
    from memstack.memory.state import save_state

    model = _model()
    st = model.init_state(2)
    i = 0
    while True:
        i += 1
        st.pos.fill_(i)
        save_state(st, root / "s", model.memory.kinds)
        ack(i)


def state_check(root: Path, acked: int):
    from memstack.memory.state import load_state

    st = load_state(root / "s", _model().memory.kinds)
    return int(st.pos[0]), {"s.json", json.loads((root / "s.json").read_text())["tensors"]}, []


def checkpoint_loop(root, ack):
    from memstack.checkpoint import save_checkpoint

    model = _model()
    i = 0
    while True:
        i += 1
        with torch.no_grad():
            model.tok_emb.weight.fill_(float(i))
        save_checkpoint(model, root)
        ack(i)


def checkpoint_check(root: Path, acked: int):
    from memstack.checkpoint import load_checkpoint

    m, _ = load_checkpoint(root)
    w = m.tok_emb.weight
    assert bool((w == w.flatten()[0]).all())
    return int(w.flatten()[0]), {"config.json", json.loads((root / "config.json").read_text())["weights"]}, []


def trainer_loop(root, ack):
    from integrity.stores import _trainer

    tr = _trainer()
    while True:
        tr.train_step()
        tr.save(root)
        ack(tr.step)


def trainer_check(root: Path, acked: int):
    from integrity.stores import _trainer
    from memstack.train.trainer import resolve_step_dir

    tr = _trainer()
    tr.resume(root)
    step = resolve_step_dir(root)
    kept = sorted(root.glob("step-*"))
    # the last two steps are kept; a kill between `latest` and pruning leaves a third, complete
    # one (pruned by the next save) -- every step directory must be a complete checkpoint
    assert step == kept[-1] and len(kept) <= 3
    for d in kept:
        _trainer().resume(d)
    files = {"latest"} | {str(p.relative_to(root)) for d in kept for p in d.rglob("*") if p.is_file() and p.name != ".lock"}
    return tr.step, files, []


WRITERS = {"table_store": (table_loop, table_check), "datastore": (datastore_loop, datastore_check),
           "kv_disk_tier": (tier_loop, tier_check), "kv_prefix_export": (export_loop, export_check),
           "model_state": (state_loop, state_check), "checkpoint": (checkpoint_loop, checkpoint_check),
           "trainer_checkpoint": (trainer_loop, trainer_check)}


def _orphans(root: Path, must: set[str]) -> set[str]:
    return data_files(root) - must


@pytest.mark.slow
@pytest.mark.parametrize("store", list(WRITERS))
def test_kill_9_at_random_moments_keeps_the_last_acknowledged_state_and_leaves_no_orphans(store, tmp_path, seed_from_test_name):
    loop, check = WRITERS[store]
    rng = random.Random(seed_from_test_name)
    debris = 0
    for trial in range(TRIALS):
        root = tmp_path / f"t{trial}"
        root.mkdir()
        pid, fd = _fork_writer(loop, root)
        acked = _kill_at_random(pid, fd, rng)
        assert acked >= 0, f"{store}: the writer acknowledged nothing"
        before = data_files(root)
        got, must, cleaned = check(root, acked)
        assert got in (acked, acked + 1), f"{store} trial {trial}: holds write {got}, last acknowledged {acked}"
        left = _orphans(root, must)
        assert not left, f"{store} trial {trial}: orphans after reopening: {sorted(left)}"
        debris += bool(before - must - {".lock"})
    RESULTS[store] = {"trials": TRIALS, "trials_left_debris": debris}
    print(f"\n{store}: {TRIALS} kill -9 trials, {debris} left debris that the next open removed")
