"""Performance of the sparse-table substrate, as ratios measured in the same run.

    flock /tmp/memstack-timing.lock .venv/bin/python benchmarks/sparse/perf.py [--quick]

1. train_step: Engram vs the plain backbone widened to equal activated parameters (target:
   <= 5% slower), on two backbone sizes;
2. gather: gather_rows (torch path on CPU; on CUDA the Triton kernel, by dispatch and by name) vs
   index_select vs nn.Embedding, and vs a same-size contiguous copy (the bandwidth ceiling);
3. generation: greedy decoding with the table resident vs memory-mapped from a file with
   prefetch (and without), tokens/s (target: <= 3% slower);
4. online updates: rows written per second by OnlineUpdater with a snapshot (store commit)
   every 10 updates.

Writes docs/benchmarks/sparse/perf.json (sections not re-run keep their figures), or with --out
only this run's sections to that file. `--only gather --device cuda --out F` is the GPU run
(benchmarks/gpu/run_all.sh). Measures; asserts nothing.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import backbone, matched_plain, write_json

from memstack.backbone.model import build_model, cross_entropy
from memstack.config import BackboneConfig, ModelConfig
from memstack.memory.sparse.config import EngramConfig
from memstack.ops.gather import gather_torch
from memstack.train.config import TrainConfig
from memstack.train.optim import build_optimizer


def _median_time(fn, reps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def train_step(quick: bool) -> list[dict]:
    out = []
    for d_model, layers, seg in ([(64, 2, 64)] if quick else [(64, 2, 64), (256, 4, 128)]):
        bb = BackboneConfig(vocab_size=512, d_model=d_model, n_layers=layers, n_heads=4, n_kv_heads=2, seg_len=seg)
        eng = EngramConfig(layers=(1,), heads=4, head_dim=d_model // 8, rows_per_head=16381, tokenizer="bpe512")
        wide, extra, dense = matched_plain(eng, bb)
        x = torch.randint(0, 512, (8, seg + 1))
        cells = {}
        for name, mc in (("plain", ModelConfig(wide, ())), ("engram", ModelConfig(bb, (eng,)))):
            torch.manual_seed(0)
            m = build_model(mc)
            opt = build_optimizer(m, TrainConfig(lr=1e-3))

            def step():
                opt.zero_grad(set_to_none=True)
                cross_entropy(m(x[:, :-1])[0].logits, x[:, 1:]).backward()
                opt.step()

            cells[name] = m, step
        times = {k: [] for k in cells}
        for _ in range(3 if quick else 5):   # interleave the two so load drifts hit both
            for k, (_, step) in cells.items():
                times[k].append(_median_time(step, 5, 1))
        rec = {"d_model": d_model, "n_layers": layers, "seg_len": seg, "batch": 8,
               "plain_params": cells["plain"][0].num_params(), "engram_active_params": cells["engram"][0].num_params()
               - cells["engram"][0].memory.memories[0].table.weight.numel(), "engram_dense_params": dense,
               "plain_step_s": statistics.median(times["plain"]), "engram_step_s": statistics.median(times["engram"])}
        rec["overhead"] = rec["engram_step_s"] / rec["plain_step_s"] - 1
        out.append(rec)
        print("train_step", rec, flush=True)
    return out


def gather(quick: bool, device: str = "cpu", smoke: bool = False) -> list[dict]:
    """Row gather bandwidth: the dispatched gather_rows (Triton on CUDA, index_select on CPU), and on
    CUDA the Triton kernel and the torch path by name, vs index_select, nn.Embedding and a contiguous
    copy of the same bytes (the bandwidth ceiling, measured in the same run). CPU timings are one
    thread's; CUDA timings synchronise around each call."""
    from memstack.ops.gather import gather_rows

    dev = torch.device(device)
    out = []
    R, D = (4096, 64) if smoke else (262_144, 64) if quick else (1_048_576, 64)
    lookups = (256,) if smoke else (4096, 65536, 1_048_576) if dev.type == "cuda" else (4096, 65536)
    table = torch.randn(R, D, device=dev)
    emb = torch.nn.Embedding(R, D, _weight=table)

    def timed(fn):
        def run():
            fn()
            if dev.type == "cuda":
                torch.cuda.synchronize()
        return _median_time(run, 3 if smoke else 9)

    for n in lookups:
        idx = torch.randint(0, R, (n,), device=dev)
        big = torch.randn(n, D, device=dev)
        with torch.no_grad():
            fns = {"gather_rows": lambda: gather_rows(table, idx), "index_select": lambda: table.index_select(0, idx),
                   "nn.Embedding": lambda: emb(idx), "contiguous_copy": lambda: big.clone()}
            if dev.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":  # interpreter: CPU smoke runs
                from memstack.ops.gather.triton import gather_rows_triton

                fns.update({"triton": lambda: gather_rows_triton(table, idx), "torch": lambda: gather_torch(table, idx)})
            t = {k: timed(f) for k, f in fns.items()}
        moved = 2 * n * D * 4                                 # read + write of the rows
        rec = {"device": dev.type, "rows": R, "dim": D, "row_bytes": D * 4, "lookups": n,
               **{f"{k}_s": v for k, v in t.items()}, **{f"{k}_GBps": moved / v / 1e9 for k, v in t.items()},
               "gather_vs_index_select": t["index_select"] / t["gather_rows"],
               "gather_vs_copy_bandwidth": t["contiguous_copy"] / t["gather_rows"]}
        out.append(rec)
        print("gather", rec, flush=True)
    return out


def generation(quick: bool) -> list[dict]:
    from memstack.generate import SamplingConfig, generate
    from memstack.memory.sparse.offload import place_tables

    bb = BackboneConfig(vocab_size=512, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, seg_len=64)
    rows = 65521 if quick else 524287
    eng = EngramConfig(layers=(1,), heads=8, head_dim=16, rows_per_head=rows, tokenizer="bpe512")
    torch.manual_seed(0)
    model = build_model(ModelConfig(bb, (eng,))).eval()
    table = model.memory.memories[0].table
    prompt = torch.randint(0, 512, (4, 32))
    cfg = SamplingConfig(max_new_tokens=48 if quick else 96)

    def run():
        return torch.stack(list(generate(model, prompt, cfg)), 1)

    res = {"table_rows": table.n_rows, "table_MB": table.nbytes() / 2**20, "batch": 4, "new_tokens": cfg.max_new_tokens}
    ref = run()
    times = {"resident": [], "disk_prefetch": [], "disk_sync": []}
    with tempfile.TemporaryDirectory() as d:
        for _ in range(3):
            for mode in times:
                place_tables(model, "device" if mode == "resident" else "disk", Path(d), prefetch=mode == "disk_prefetch")
                t0 = time.perf_counter()
                got = run()
                times[mode].append(time.perf_counter() - t0)
                res[f"{mode}_same_tokens"] = bool(torch.equal(got, ref))
        place_tables(model, "device")
    for mode, ts in times.items():
        res[f"{mode}_tok_per_s"] = 4 * cfg.max_new_tokens / statistics.median(ts)
    res["disk_prefetch_slowdown"] = res["resident_tok_per_s"] / res["disk_prefetch_tok_per_s"] - 1
    res["disk_sync_slowdown"] = res["resident_tok_per_s"] / res["disk_sync_tok_per_s"] - 1
    res["note"] = "file pages warm in the OS page cache (the file was just written); CPU: host == device memory"
    print("generation", res, flush=True)
    return [res]


def online(quick: bool) -> list[dict]:
    from memstack.memory.sparse.online import OnlineUpdater, UpdatePolicy
    from memstack.memory.sparse.store import TableStore

    bb = backbone()
    torch.manual_seed(0)
    model = build_model(ModelConfig(bb, (EngramConfig(heads=4, head_dim=8, rows_per_head=65521, tokenizer="bpe512"),)))
    table = model.memory.memories[0].table
    with tempfile.TemporaryDirectory() as d:
        st = TableStore(Path(d) / "s")
        t0 = time.perf_counter()
        st.create(table.weight, [s.__dict__ for s in table.specs])
        create_s = time.perf_counter() - t0
        up = OnlineUpdater(model, table, lr=1e-2, store=st, policy=UpdatePolicy(max_row_update_norm=10.0))
        n = 30 if quick else 100
        rows = commits = 0
        t0 = time.perf_counter()
        for i in range(n):
            x = torch.randint(0, 512, (4, 65))
            r = up.step(x[:, :-1], x[:, 1:])
            rows += r.rows
            if (i + 1) % 10 == 0:
                up.commit()
                commits += 1
        secs = time.perf_counter() - t0
    rec = {"table_rows": table.n_rows, "dim": table.dim, "updates": n, "batch_tokens": 4 * 64, "rows_written": rows,
           "commits": commits, "seconds": secs, "rows_per_s": rows / secs, "updates_per_s": n / secs,
           "initial_full_snapshot_s": create_s}
    print("online", rec, flush=True)
    return [rec]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default="train_step,gather,generation,online")
    ap.add_argument("--device", default="cpu", help="gather only: cpu or cuda (the other sections run on the CPU)")
    ap.add_argument("--smoke", action="store_true", help="gather only: tiny sizes, proves the script runs")
    ap.add_argument("--out", default=None, help="write this run's sections here, leaving docs/ alone")
    args = ap.parse_args()
    torch.set_num_threads(1)
    import json

    from common import OUT
    from memstack.evals.bench import environment

    if args.out:
        res = {"benchmark": "sparse_perf", "device": args.device, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
               "env": environment(torch.device("cpu"))}
        for name in args.only.split(","):
            res[name] = gather(args.quick, args.device, args.smoke) if name == "gather" else globals()[name](args.quick)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=1))
        return
    # sections not re-run keep their earlier figures (with the date and git SHA they were taken at)
    old = json.loads((OUT / "perf.json").read_text()) if (OUT / "perf.json").exists() else {}
    res = {k: v for k, v in old.items() if k not in ("env", "date")}
    for k in ("train_step", "gather", "generation", "online"):
        if k in res and f"{k}_taken" not in res:
            res[f"{k}_taken"] = {"date": old.get("date"), "git_sha": old.get("env", {}).get("git_sha"), "quick": None}
    res.update({"threads": 1, "gpu": "not measured yet (no GPU in this task): Triton gather kernel vs index_select and vs "
                "the HBM bandwidth limit (benchmarks/gpu/run_all.sh); host-offloaded generation over PCIe"})
    for name in args.only.split(","):
        res[name] = gather(args.quick, args.device, args.smoke) if name == "gather" else globals()[name](args.quick)
        res[f"{name}_taken"] = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "quick": args.quick,
                                "git_sha": environment(torch.device("cpu"))["git_sha"]}
        write_json("perf", res)


if __name__ == "__main__":
    main()
