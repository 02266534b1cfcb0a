"""Retrieval-memory performance, each figure a ratio measured in the same run:

1. datastore insert throughput (vectors/s) and query latency at 1M-2M entries vs a plain FAISS
   index of the same type on the same data (our overhead: validation, columns, ids, namespaces,
   exact re-scoring);
2. exact search on the CPU vs a measured memory-bandwidth ceiling (a streaming read of a
   buffer as large as the keys); GPU: not measured (no GPU in this task);
3. kNN-LM's added cost per generated token, as a share of the forward pass;
4. Memorizing Transformer training speed with the memory on vs off.

    flock /tmp/memstack-timing.lock .venv/bin/python benchmarks/retrieval/perf.py --out reports/retrieval/perf.json
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from memstack.evals.bench import environment


def log(*a):
    print(time.strftime("%H:%M:%S"), *a, flush=True)


def timeit(fn, reps: int = 5, warm: int = 1) -> float:
    for _ in range(warm):
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def paired_us(ours, peer, queries: list, calls: int = 4000, warm: int = 400) -> dict:
    """Single-query latency of two searchers, measured call by call in alternation (ours, peer,
    ours, peer, ...) so that load changes on the shared machine hit both alike; `queries` cycles
    (one query repeated = hot caches; many distinct queries = a realistic stream). Medians in us."""
    ta, tb = [], []
    for i in range(calls + warm):
        qq = queries[i % len(queries)]
        t0 = time.perf_counter_ns()
        ours(qq)
        t1 = time.perf_counter_ns()
        peer(qq)
        t2 = time.perf_counter_ns()
        if i >= warm:
            ta.append(t1 - t0)
            tb.append(t2 - t1)
    a, b = np.asarray(ta) / 1e3, np.asarray(tb) / 1e3
    return {"ours_us": float(np.median(a)), "faiss_us": float(np.median(b)), "ratio": float(np.median(a) / np.median(b)),
            "pair_ratio_median": float(np.median(a / b)), "calls": calls}


def bench_store(n: int, d: int, backend: str, batch: int = 20_000, nq: int = 256, k: int = 10,
                query_batches: tuple[int, ...] = (1, 64)) -> dict:
    import faiss

    from memstack.memory.retrieval.backends import FaissIndex
    from memstack.memory.retrieval.config import StoreConfig
    from memstack.memory.retrieval.store import Datastore

    g = torch.Generator().manual_seed(0)
    # clustered data (real embeddings are not uniform): 1,000 Gaussian blobs
    centers = torch.randn(1000, d, generator=g) * 3
    x = centers[torch.randint(0, 1000, (n,), generator=g)] + torch.randn(n, d, generator=g)
    q = centers[torch.randint(0, 1000, (nq,), generator=g)] + torch.randn(nq, d, generator=g)
    cfg = StoreConfig(dim=d, backend=backend, nlist=1024, nprobe=16, hnsw_m=16, ef_construction=40, ef_search=64,
                      train_min=100_000, compact_at=0.0)
    ours = Datastore(cfg, "bench", payload={"token": ("int64", ())})
    tok = torch.zeros(batch, dtype=torch.long)
    t0 = time.perf_counter()
    for a in range(0, n, batch):
        ours.add(x[a:a + batch], {"token": tok[: min(batch, n - a)]})
    ins_ours = n / (time.perf_counter() - t0)
    rec = {"n": n, "d": d, "backend": backend, "insert_vps_ours": ins_ours,
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    xn, qn = x.numpy(), q.numpy()
    if backend == "exact":
        # the peer: one brute-force FAISS IndexFlatL2 (what "exact" would otherwise be)
        peer = faiss.IndexFlatL2(d)
        t0 = time.perf_counter()
        for a in range(0, n, batch):
            peer.add(xn[a:a + batch])
        ins_peer = n / (time.perf_counter() - t0)
        peer_search = lambda qq: peer.search(qq, k)  # noqa: E731
    else:
        peer = FaissIndex(cfg)               # the same FAISS index type, fed directly (no datastore around it)
        t0 = time.perf_counter()
        rows = np.arange(n, dtype=np.int64)
        for a in range(0, n, batch):
            peer.add(np.ascontiguousarray(xn[a:a + batch]), rows[a:a + batch])
        ins_peer = n / (time.perf_counter() - t0)
        peer_search = lambda qq: peer.index.search(qq, k)  # noqa: E731
    rec["insert_vps_faiss"] = ins_peer
    rec["insert_ratio"] = ins_ours / ins_peer
    if 1 in query_batches:
        # single queries: paired, call-by-call alternation; hot (one query repeated) and a stream
        # of 256 distinct queries. Few calls where one search takes milliseconds (exact, flat).
        calls = 4000 if backend in ("faiss_hnsw", "faiss_ivf") else 40
        one = [q[i:i + 1].clone() for i in range(nq)]
        one_np = [np.ascontiguousarray(t.numpy()) for t in one]
        pairs = list(zip(one, one_np))
        for name, qs in (("hot", pairs[:1]), ("stream", pairs)):
            r = paired_us(lambda p: ours.search(p[0], k), lambda p: peer_search(p[1]), qs, calls=calls, warm=max(calls // 10, 4))
            rec[f"single_{name}"] = r
        rec["query_ms_batch1_ours"] = rec["single_stream"]["ours_us"] / 1e3
        rec["query_ms_batch1_faiss"] = rec["single_stream"]["faiss_us"] / 1e3
        rec["query_ratio_batch1"] = rec["single_stream"]["ratio"]
    for qb in [b for b in query_batches if b != 1]:
        reps = 3   # batch 64 over 1M+ keys takes seconds per call on one shared core
        tq = timeit(lambda: ours.search(q[:qb], k), reps=reps)
        tp = timeit(lambda: peer_search(np.ascontiguousarray(qn[:qb])), reps=reps)
        rec[f"query_ms_batch{qb}_ours"] = 1e3 * tq
        rec[f"query_ms_batch{qb}_faiss"] = 1e3 * tp
        rec[f"query_ratio_batch{qb}"] = tq / tp
    # recall@k of ours vs exact truth on 64 queries
    from memstack.ops.knn import knn_search

    _, truth = knn_search(q[:64], x, k, "l2")
    got = ours.search(q[:64], k).ids
    rec["recall_at_k"] = float(sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(got, truth)) / truth.numel())
    log(json.dumps({k_: (round(v, 4) if isinstance(v, float) else v) for k_, v in rec.items()}))
    return rec


def bandwidth(n: int, d: int) -> dict:
    """Exact torch search over n x d fp32 keys with one query (bandwidth-bound) and 64 queries,
    against a streaming read of a same-sized buffer (the ceiling for reading the keys once)."""
    from memstack.ops.knn import knn_search

    keys = torch.randn(n, d)
    key_sq = (keys * keys).sum(-1)
    nbytes = keys.numel() * 4
    t_read = timeit(lambda: keys.sum(), reps=5)
    ceiling = nbytes / t_read
    out = {"n": n, "d": d, "bytes": nbytes, "read_GBps": ceiling / 1e9}
    for qb in (1, 64):
        q = torch.randn(qb, d)
        t = timeit(lambda: knn_search(q, keys, 10, "l2", key_sq=key_sq), reps=5 if qb == 1 else 3)
        out[f"search_ms_q{qb}"] = 1e3 * t
        out[f"search_GBps_q{qb}"] = nbytes / t / 1e9
        out[f"share_of_ceiling_q{qb}"] = (nbytes / t) / ceiling
    log(json.dumps(out))
    return out


def knnlm_cost(n: int) -> dict:
    """Per-token decode time of the quick backbone with and without kNN-LM (store of n entries)."""
    from memstack.backbone.model import build_model
    from memstack.config import BackboneConfig, ModelConfig
    from memstack.generate import Decoder
    from memstack.memory.retrieval.config import KNNLMConfig, StoreConfig
    from memstack.memory.retrieval.store import Datastore
    import tempfile

    bb = BackboneConfig(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, seg_len=64)
    torch.manual_seed(0)
    model = build_model(ModelConfig(bb)).eval()
    out = {"n": n}
    with tempfile.TemporaryDirectory() as tmp:
        for backend in ("exact", "faiss_ivf"):
            s = Datastore(StoreConfig(dim=64, backend=backend, nlist=1024, nprobe=16, train_min=100_000), "bench",
                          payload={"token": ("int64", ())})
            for a in range(0, n, 50_000):
                s.add(torch.randn(min(50_000, n - a), 64), {"token": torch.randint(0, 512, (min(50_000, n - a),))})
            s.save(Path(tmp) / backend)
            variants = {f"knn_{backend}": model.with_memories([KNNLMConfig(store=str(Path(tmp) / backend), k=32, cache_len=0)]),
                        f"knn_{backend}_cache": model.with_memories([KNNLMConfig(store=str(Path(tmp) / backend), k=32,
                                                                                  cache_len=1024)])}
            for name, m in variants.items():
                # the plain backbone is timed right before each variant, in alternating rounds, so a
                # change in the shared machine's load hits both sides of the ratio alike
                decs = {"plain": Decoder(model, 1), name: Decoder(m, 1)}
                tok = torch.randint(0, 512, (1, 1))
                with torch.no_grad():
                    for d in decs.values():
                        d.feed(torch.randint(0, 512, (1, 8)))
                    rounds = {n_: [] for n_ in decs}
                    for _ in range(5):
                        for n_, d in decs.items():
                            rounds[n_].append(timeit(lambda: d.feed(tok), reps=10, warm=2))
                out[f"{name}_plain"] = 1e3 * float(np.median(rounds["plain"]))
                out[name] = 1e3 * float(np.median(rounds[name]))
    for k_ in [k_ for k_ in out if k_.startswith("knn") and not k_.endswith("_plain")]:
        out[f"{k_}_added_share"] = (out[k_] - out[f"{k_}_plain"]) / out[f"{k_}_plain"]
    log(json.dumps(out))
    return out


def memorizing_speed(steps: int = 6) -> dict:
    from memstack.backbone.model import build_model
    from memstack.config import BackboneConfig, ModelConfig
    from memstack.evals.lm import LMTask, LMTaskConfig
    from memstack.memory.retrieval.config import MemorizingConfig
    from memstack.train.config import TrainConfig
    from memstack.train.distributed import DistInfo
    from memstack.train.trainer import Trainer

    bb = BackboneConfig(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, seg_len=64)
    task = LMTask(LMTaskConfig(corpus="sotu", tokenizer="bpe512"), 64)
    out = {}
    trainers = {}
    for name, mems in [("off", ()), ("on_1024", (MemorizingConfig(mem_len=1024, k=32),)),
                       ("on_2048", (MemorizingConfig(mem_len=2048, k=32),))]:
        torch.manual_seed(0)
        model = build_model(ModelConfig(bb, mems))
        tr = Trainer(model, TrainConfig(max_steps=10**6, batch_size=16, n_segments=2, progress=False),
                     task.train_source(16, 0), dist=DistInfo(device=torch.device("cpu")))
        # fill the memory first (2048 entries = 32 segments of a row = 16 steps); warm the plain one too
        for _ in range(18 if name != "off" else 2):
            tr.train_step()
        trainers[name] = tr
    # alternating rounds: a change in the shared machine's load hits every configuration alike
    spent = {n: [0.0, 0] for n in trainers}
    for _ in range(steps):
        for name, tr in trainers.items():
            t0, tok0 = time.perf_counter(), tr.tokens
            tr.train_step()
            spent[name][0] += time.perf_counter() - t0
            spent[name][1] += tr.tokens - tok0
    for name, (sec, tok) in spent.items():
        out[f"tok_per_s_{name}"] = tok / sec
    out["interleaved"] = True
    for name in ("on_1024", "on_2048"):
        out[f"slowdown_{name}"] = out["tok_per_s_off"] / out[f"tok_per_s_{name}"]
    log(json.dumps(out))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="reports/retrieval/perf.json")
    p.add_argument("--sizes", default="1000000,2000000")
    p.add_argument("--hnsw-size", type=int, default=200_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--backends", default="exact,faiss_flat,faiss_ivf",
                   help="store backends timed at each of --sizes (faiss_ivf at the first size only)")
    p.add_argument("--only", default="store,hnsw,bandwidth,knnlm,memorizing")
    p.add_argument("--query-batches", default="1,64", help="query batch sizes timed in the store part")
    p.add_argument("--append", action="store_true", help="add to the record at --out instead of starting a new one "
                   "(lets each part run as its own short invocation under the timing lock)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    # one thread: on a shared, oversubscribed machine OpenMP threads spin against other processes
    torch.set_num_threads(args.threads)
    import faiss

    faiss.omp_set_num_threads(args.threads)
    out = {"command": "benchmarks/retrieval/perf.py " + " ".join(f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "env": environment(torch.device("cpu")),
           "note": "2 shared CPU cores (six helpers on the machine); torch and FAISS at --threads threads",
           "gpu_exact_search_vs_bandwidth": "not measured yet (no GPU in this task)"}
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    if args.append and path.is_file():
        prev = json.loads(path.read_text())
        out["runs"] = prev.get("runs", [{"command": prev["command"], "date": prev["date"]}]) + [
            {"command": out["command"], "date": out["date"]}]
        out = {**prev, **{k: v for k, v in out.items() if k not in ("store",)}}
    else:
        out["runs"] = [{"command": out["command"], "date": out["date"]}]
    sizes = [int(s) for s in args.sizes.split(",")]
    only = args.only.split(",")
    out.setdefault("store", [])
    if "store" in only:
        for n in sizes:
            for backend in args.backends.split(","):
                if backend == "faiss_ivf" and n != sizes[0]:
                    continue   # IVF at the first size only (time on a shared machine)
                out["store"].append(bench_store(n, args.dim, backend,
                                                query_batches=tuple(int(b) for b in args.query_batches.split(","))))
                path.write_text(json.dumps(out, indent=1))
    if "hnsw" in only:      # HNSW builds slowly on one core: a smaller store
        out["store"].append(bench_store(args.hnsw_size, args.dim, "faiss_hnsw"))
        path.write_text(json.dumps(out, indent=1))
    if "bandwidth" in only:
        out["bandwidth"] = [bandwidth(n, args.dim) for n in sizes]
        path.write_text(json.dumps(out, indent=1))
    if "knnlm" in only:
        out["knnlm_decode_ms"] = knnlm_cost(sizes[0])
        path.write_text(json.dumps(out, indent=1))
    if "memorizing" in only:
        out["memorizing_training"] = memorizing_speed()
        path.write_text(json.dumps(out, indent=1))
    log("written", path)


if __name__ == "__main__":
    main()
