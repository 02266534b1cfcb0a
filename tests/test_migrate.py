"""`memstack migrate`: artefacts written in format 1 (JSON metadata without checksums) are refused
by this memstack with a message naming the command, and migrate to the sealed formats -- loading
afterwards gives exactly what they held; a data file that no longer matches its old manifest
stops the migration of that artefact and leaves it untouched.

Format-1 files are made here by rewriting current ones the way the old writers laid them out."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from memstack.backbone.model import build_model
from memstack.checkpoint import load_checkpoint, save_checkpoint
from memstack.cli import main
from memstack.config import BackboneConfig, ModelConfig
from memstack.errors import CheckpointError
from memstack.memory.learned.config import XLConfig
from memstack.memory.retrieval.config import StoreConfig
from memstack.memory.retrieval.store import Datastore, DatastoreError
from memstack.memory.sparse.store import TableStore
from memstack.memory.state import load_state, save_state

MODEL = ModelConfig(BackboneConfig(vocab_size=61, d_model=16, n_layers=2, n_heads=2, seg_len=8), (XLConfig(mem_len=8),))


def _rewrite(path: Path, fn) -> None:
    doc = json.loads(path.read_text())
    path.write_text(json.dumps(fn({k: v for k, v in doc.items() if k != "checksum"}), indent=1))


def _v1(doc: dict, **extra) -> dict:
    return {**{k: v for k, v in doc.items() if k != "kind"}, "format": 1, **extra}


def _old_table_store(root: Path) -> None:
    head = json.loads((root / "HEAD").read_text())
    (root / "HEAD").write_text(json.dumps({"version": head["version"]}))
    _rewrite(root / "store.json", _v1)
    for p in (root / "versions").glob("v*.json"):
        _rewrite(p, lambda d: {"format": 1, **{k: d[k] for k in ("version", "parent")}, "kind": d["snapshot"],
                               **{k: d[k] for k in ("file", "sha256", "touched", "created", "meta")}})


def _migrate(path: Path, capsys) -> tuple[int, str]:
    rc = main(["migrate", str(path)])
    return rc, capsys.readouterr().out


def test_a_format_1_table_store_is_refused_then_migrated(tmp_path, capsys):
    st = TableStore(tmp_path / "s")
    w = torch.randn(20, 3)
    st.create(w, [{"name": "knowledge", "rows": 20, "addressing": "hashed", "write_quota": None}])
    snaps = [w.clone()]
    for v in range(3):
        w[[v, 5 + v]] += 1.0
        st.commit(w, torch.tensor([v, 5 + v]))
        snaps.append(w.clone())
    st.rollback(2)
    _old_table_store(tmp_path / "s")
    with pytest.raises(CheckpointError, match=r"memstack migrate .*/s"):
        TableStore(tmp_path / "s").load()
    rc, out = _migrate(tmp_path / "s", capsys)
    assert rc == 0 and "table store: 4 versions" in out
    st = TableStore(tmp_path / "s")
    assert st.head == 2 and st.last == 4
    for v, want in enumerate(snaps, 1):
        assert torch.equal(st.load(v), want)
    assert main(["migrate", str(tmp_path / "s")]) == 0 and "already current" in capsys.readouterr().out


def test_a_table_store_whose_rows_no_longer_match_is_left_untouched(tmp_path, capsys):
    st = TableStore(tmp_path / "s")
    st.create(torch.randn(20, 3), [{"name": "knowledge", "rows": 20, "addressing": "hashed", "write_quota": None}])
    f = tmp_path / "s" / st.version(1).file
    _old_table_store(tmp_path / "s")
    before = {p: p.read_bytes() for p in (tmp_path / "s").rglob("*.json")} | {tmp_path / "s" / "HEAD": (tmp_path / "s" / "HEAD").read_bytes()}
    raw = bytearray(f.read_bytes())
    raw[-1] ^= 0xFF
    f.write_bytes(bytes(raw))
    rc, out = _migrate(tmp_path / "s", capsys)
    assert rc == 1 and "NOT migrated" in out and f.name in out
    assert all(p.read_bytes() == b for p, b in before.items())


def test_datastore_checkpoint_state_and_trainer_run_migrate(tmp_path, capsys):
    # a datastore
    ds = Datastore(StoreConfig(dim=4), "test:1", payload={"token": ("int64", ())})
    ds.add(torch.randn(10, 4), {"token": torch.arange(10)}, namespace="a")
    ds.save(tmp_path / "run" / "store")
    from safetensors.torch import load_file, save_file

    from memstack.atomic import sha256_file

    mf = tmp_path / "run" / "store" / "manifest.json"
    tf = tmp_path / "run" / "store" / json.loads(mf.read_text())["tensors"]
    save_file(load_file(str(tf)), str(tf))                        # format 1 had no metadata in the tensor file
    _rewrite(mf, lambda d: {**d, "format": 1, "sha256": sha256_file(tf)})
    with pytest.raises(DatastoreError, match="memstack migrate"):
        Datastore.open(tmp_path / "run" / "store")
    # a trainer run: out_dir/ckpt/{latest, step-*} with the carried state
    from memstack.data.packing import DocumentStream
    from memstack.train.config import TrainConfig
    from memstack.train.trainer import Trainer

    torch.manual_seed(0)
    src = DocumentStream([torch.randint(1, 61, (40,)).numpy() for _ in range(4)], 2, 8, 0)
    tr = Trainer(build_model(MODEL), TrainConfig(lr=1e-2, warmup_steps=1, max_steps=2, batch_size=2, progress=False), src)
    tr.train_step()
    step = tr.save(tmp_path / "run" / "ckpt")
    (tmp_path / "run" / "ckpt" / "latest").write_text(step.name)
    _rewrite(step / "config.json", lambda d: _v1({k: v for k, v in d.items() if k != "shards"}))
    _rewrite(step / "carry.json", _v1)
    _rewrite(step / "trainer.json", lambda d: _v1({k: v for k, v in d.items() if k not in ("optim_sha256", "config", "carry")}))
    # a plain checkpoint and a saved state
    model = build_model(MODEL)
    save_checkpoint(model, tmp_path / "run" / "plain")
    _rewrite(tmp_path / "run" / "plain" / "config.json", lambda d: _v1({k: v for k, v in d.items() if k != "shards"}))
    state = model.init_state(2)
    save_state(state, tmp_path / "run" / "states" / "s", model.memory.kinds)
    _rewrite(tmp_path / "run" / "states" / "s.json", _v1)
    with pytest.raises(CheckpointError, match="memstack migrate"):
        load_checkpoint(tmp_path / "run" / "plain")

    rc, out = _migrate(tmp_path / "run", capsys)
    assert rc == 0, out
    for what in ("datastore", "trainer checkpoint", "trainer latest pointer", "checkpoint", "model state"):
        assert f": {what}" in out, (what, out)
    assert torch.equal(Datastore.open(tmp_path / "run" / "store").search(ds.keys[:2], 1, "a").ids[:, 0], ds.ids[:2])
    loaded, _ = load_checkpoint(tmp_path / "run" / "plain")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    assert load_state(tmp_path / "run" / "states" / "s", model.memory.kinds).batch_size == 2
    again = Trainer(build_model(MODEL), TrainConfig(lr=1e-2, warmup_steps=1, max_steps=2, batch_size=2, progress=False),
                    DocumentStream([torch.randint(1, 61, (40,)).numpy() for _ in range(4)], 2, 8, 0))
    again.resume(tmp_path / "run" / "ckpt")
    assert again.step == 1
    assert all(torch.equal(a, b) for a, b in zip(again.model.state_dict().values(), tr.model.state_dict().values()))
