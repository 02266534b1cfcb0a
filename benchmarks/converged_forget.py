"""What forgetting one user's datastore entries costs a served memory: `Memory.forget` (entries
overwritten, the store written back crash-safely) on a kNN-LM store of `--users` namespaces, beside
the peer operations on the same store -- one save of the whole store (what forget's write costs at
least) and one search. Forget runs in the engine thread, so this is how long serving pauses.
Prints one JSON record.

    python benchmarks/converged_forget.py [--users 64] [--per-user 2000] [--dim 576] [--backend exact]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=64)
    ap.add_argument("--per-user", type=int, default=2000)
    ap.add_argument("--dim", type=int, default=576, help="key dimension (SmolLM2-135M's hidden size: 576)")
    ap.add_argument("--backend", default="exact", choices=["exact", "faiss_flat", "faiss_hnsw"])
    a = ap.parse_args()
    from memstack.backbone.model import build_model
    from memstack.config import BackboneConfig, ModelConfig
    from memstack.memory.retrieval.config import KNNLMConfig, StoreConfig
    from memstack.memory.retrieval.store import Datastore

    g = torch.Generator().manual_seed(0)
    st = Datastore(StoreConfig(dim=a.dim, backend=a.backend), "bench-keys", payload={"token": ("int64", ())})
    names = [f"tenant:acme/user:u{i}" for i in range(a.users)]
    for ns in names:
        st.add(torch.randn(a.per_user, a.dim, generator=g), {"token": torch.randint(0, 1000, (a.per_user,))}, namespace=ns)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "store"
        t0 = time.perf_counter()
        st.save(path)
        save_s = time.perf_counter() - t0
        b = BackboneConfig(vocab_size=1000, d_model=a.dim, n_layers=1, n_heads=4, seg_len=32)
        model = build_model(ModelConfig(b, (KNNLMConfig(store=str(path), k=8, cache_len=0),)))
        mem = model.memory.memories[0]
        q = torch.randn(1, a.dim, generator=g)
        t0 = time.perf_counter()
        mem.store.search(q, 8, names[1])
        search_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        removed = mem.forget(names[0])
        forget_s = time.perf_counter() - t0
        on_disk = Datastore.open(path).count(names[0])
    print(json.dumps({"entries": a.users * a.per_user, "dim": a.dim, "backend": a.backend, "removed": removed,
                      "left_on_disk": on_disk, "forget_s": round(forget_s, 4), "save_s": round(save_s, 4),
                      "forget_over_save": round(forget_s / save_s, 2), "search_s": round(search_s, 5),
                      "store_mb": round(a.users * a.per_user * (a.dim * 4 + 8 * 4) / 2**20, 1)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
