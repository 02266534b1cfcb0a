"""Every persistent store of memstack, built tiny on disk, with a function that reads back
everything it holds (what the corruption and crash suites check against).

A `Store` names: `build(root)` -> what a full read must return; `read(root)` -> that value (raises
when something is wrong); `files(root)` -> the files that belong to it after a clean write (what
"zero orphans" compares with). Reading may refuse, never answer wrong."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from memstack.atomic import LOCK_NAME

V = 64


@dataclass(frozen=True)
class Store:
    name: str
    build: Callable[[Path], Any]
    read: Callable[[Path], Any]


def data_files(root: Path) -> set[str]:
    """Every file under root but the writer lock (relative names)."""
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.name != LOCK_NAME}


def same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


# ----------------------------------------------------------------------------- table store

NS = [{"name": "knowledge", "rows": 24, "addressing": "hashed", "write_quota": None}]


def table_build(root: Path, commits: int = 3) -> Any:
    from memstack.memory.sparse.store import TableStore

    st = TableStore(root)
    torch.manual_seed(0)
    w = torch.randn(24, 3)
    st.create(w, NS)
    for i in range(commits):
        w[[i, 10 + i]] = float(i + 1)
        st.commit(w, torch.tensor([i, 10 + i]), {"i": i})
    st.rollback(2)
    return table_read(root)


def table_read(root: Path) -> Any:
    from memstack.memory.sparse.store import TableStore

    st = TableStore(root)
    vs = st.versions()
    return {"head": st.head, "load": st.load(), "versions": [(v.version, v.parent, v.kind, v.touched, v.meta) for v in vs],
            "all": [st.load(v.version) for v in vs], "between": st.touched_between(1, st.last)}


def _delta_base() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(24, 3)


def delta_build(root: Path) -> Any:
    """A delta file alone (its source store is elsewhere, temporary)."""
    import tempfile

    from memstack.memory.sparse.store import TableStore

    root.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as d:
        a = TableStore(Path(d) / "a")
        w = _delta_base()
        a.create(w, NS)
        w[[1, 2]] = 5.0
        a.commit(w, torch.tensor([1, 2]))
        a.export_delta(1, 2, root / "d.safetensors")
    return delta_read(root)


def delta_read(root: Path) -> Any:
    """Import the delta into a fresh replica of the base version (a temporary store)."""
    import tempfile

    from memstack.memory.sparse.store import TableStore

    with tempfile.TemporaryDirectory() as d:
        b = TableStore(Path(d) / "b")
        b.create(_delta_base(), NS)
        return b.load(b.import_delta(root / "d.safetensors"))


# ----------------------------------------------------------------------------- datastore

def datastore_build(root: Path) -> Any:
    from memstack.memory.retrieval.config import StoreConfig
    from memstack.memory.retrieval.store import Datastore

    torch.manual_seed(0)
    s = Datastore(StoreConfig(dim=8, backend="faiss_hnsw"), "test:1", payload={"token": ("int64", ())}, text=True)
    for ns in ("tenant-a", "tenant-b"):
        s.add(torch.randn(20, 8), {"token": torch.arange(20)}, namespace=ns, texts=[f"{ns} {i}" for i in range(20)])
    s.delete([3, 25])
    s.save(root)
    return datastore_read(root)


def datastore_read(root: Path) -> Any:
    from memstack.memory.retrieval.store import Datastore

    s = Datastore.open(root)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(4, 8, generator=g)
    out = {"n": len(s), "next_id": s.next_id, "ns": list(s.namespaces), "texts": [s.text(i) for i in range(s.n_rows)]}
    for ns in ("tenant-a", "tenant-b"):
        r = s.search(q, 5, ns)
        out[ns] = (r.ids, r.scores)
    return out


# ----------------------------------------------------------------------------- KV: disk tier, prefix export

def _namespace():
    from memstack.memory.kv.hashing import CacheNamespace

    return CacheNamespace(model_fingerprint="test-model", block_size=4)


SHAPE = (2, 2, 2, 4, 8)      # a KV block: layers, k/v, kv_heads, block_size, head_dim


def tier_build(root: Path) -> Any:
    from memstack.memory.kv.tiers import DiskTier

    torch.manual_seed(0)
    t = DiskTier(root, _namespace(), SHAPE)
    for c in range(2):
        keys = [bytes([c, i]) * 16 for i in range(3)]
        t.put(keys, torch.randn(3, *SHAPE))
    return tier_read(root)


def tier_read(root: Path) -> Any:
    """Every block the tier serves. A refused chunk serves nothing (reported in `refused`)."""
    from memstack.memory.kv.tiers import DiskTier

    t = DiskTier(root, _namespace(), SHAPE)
    keys = sorted(t.index)
    return {"keys": keys, "blocks": t.get(keys) if keys else None, "refused": t.refused}


def _engine():
    from memstack.backbone.model import build_model
    from memstack.config import BackboneConfig
    from memstack.engine import Engine, EngineConfig
    from memstack.memory.kv.config import DenseKVConfig

    torch.manual_seed(0)
    b = BackboneConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, seg_len=256, init_std=0.3)
    return Engine(build_model(b, [DenseKVConfig()]).eval(), EngineConfig(block_size=4, num_blocks=16))


def export_build(root: Path) -> Any:
    eng = _engine()
    g = torch.Generator().manual_seed(2)
    h = eng.sessions.pin(torch.randint(0, V, (13,), generator=g).tolist())
    eng.sessions.export(h, root / "prompt.kv")
    return export_read(root)


def export_read(root: Path) -> Any:
    eng = _engine()
    h = eng.sessions.import_(root / "prompt.kv")
    return {"tokens": h.tokens, "kv": eng.cache.read_blocks([b.id for b in h.blocks])}


# ----------------------------------------------------------------------------- state, checkpoints

def _model():
    from memstack.backbone.model import build_model
    from memstack.config import BackboneConfig, ModelConfig
    from memstack.memory.learned.config import XLConfig

    torch.manual_seed(0)
    return build_model(ModelConfig(BackboneConfig(vocab_size=V, d_model=16, n_layers=2, n_heads=2, seg_len=8),
                                   (XLConfig(mem_len=8),))).eval()


def state_build(root: Path) -> Any:
    from memstack.memory.state import save_state

    model = _model()
    with torch.no_grad():
        _, st = model(torch.randint(0, V, (2, 8)))
    save_state(st, root / "s", model.memory.kinds)
    return state_read(root)


def state_read(root: Path) -> Any:
    from memstack.memory.state import load_state, tensors

    return tensors(load_state(root / "s", _model().memory.kinds))


def checkpoint_build(root: Path) -> Any:
    from memstack.checkpoint import save_checkpoint

    m = _model()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.01)
    save_checkpoint(m, root, meta={"note": "x"})
    return checkpoint_read(root)


def checkpoint_read(root: Path) -> Any:
    from memstack.checkpoint import load_checkpoint

    model, meta = load_checkpoint(root)
    return {"sd": dict(model.state_dict()), "meta": meta}


def _trainer():
    from memstack.data.packing import DocumentStream
    from memstack.train.config import TrainConfig
    from memstack.train.trainer import Trainer

    g = torch.Generator().manual_seed(3)
    docs = [torch.randint(1, V, (30,), generator=g).numpy() for _ in range(4)]
    return Trainer(_model().train(), TrainConfig(lr=1e-2, warmup_steps=1, max_steps=4, batch_size=2, progress=False),
                   DocumentStream(docs, 2, 8, 0))


def trainer_build(root: Path) -> Any:
    tr = _trainer()
    for _ in range(2):
        tr.train_step()
        tr.save(root)
    return trainer_read(root)


def trainer_read(root: Path) -> Any:
    """Resume from the run (what `latest` names) and from every step kept."""
    from memstack.memory.state import tensors

    out = {}
    for where in [root, *sorted(root.glob("step-*"))]:
        tr = _trainer()
        tr.resume(where)
        out[where.name] = {"step": tr.step, "sd": dict(tr.model.state_dict()), "carry": tensors(tr.state),
                           "opt": json.dumps(str(tr.opt.state_dict()["param_groups"])), "source": tr.source.state_dict()}
    out["latest"] = out.pop(root.name)["step"]
    return out


STORES = [
    Store("table_store", table_build, table_read),
    Store("table_delta", delta_build, delta_read),
    Store("datastore", datastore_build, datastore_read),
    Store("kv_disk_tier", tier_build, tier_read),
    Store("kv_prefix_export", export_build, export_read),
    Store("model_state", state_build, state_read),
    Store("checkpoint", checkpoint_build, checkpoint_read),
    Store("trainer_checkpoint", trainer_build, trainer_read),
]
