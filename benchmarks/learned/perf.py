"""Performance of the learned memories of issue 3 part A (RMT, ARMT, Infini-attention, HMT).
Measures, never asserts; every figure is a ratio against the plain backbone measured in the same
run, or an absolute with its unit.

    flock /tmp/memstack-timing.lock python benchmarks/learned/perf.py train   # tok/s, peak memory
    flock /tmp/memstack-timing.lock python benchmarks/learned/perf.py infer   # memory vs context length
    flock /tmp/memstack-timing.lock python benchmarks/learned/perf.py op      # chunkwise op vs reference loop
    python benchmarks/learned/perf.py plot                                     # PNGs from the JSON

train: one fresh process per memory (so peak RSS is its own): the same backbone (d_model 64, 2 layers,
       seg_len 128, batch 8), 4 segments per step with full BPTT; 2 warm-up steps, then timed
       steps. Peak memory on CPU = the process's peak RSS during the timed steps (Linux VmHWM,
       reset through /proc/self/clear_refs) and the bytes autograd saved for backward in one step.
infer: one document fed segment by segment (seg_len 128, batch 1, no gradient); at each
       checkpoint the bytes of the memory state actually allocated (distinct storages) and the
       process RSS. The plain backbone keeps a growing document-scope KV cache (`kv_dense`,
       scope=document) -- measured up to 32k tokens, its exact MemorySpec prediction beyond
       (marked "spec"; the contract suite checks the spec against the allocation).
op:    ops/linear_memory: the torch chunkwise path vs the per-token reference loop, fp32, CPU; with
       --device cuda also the Triton kernel (benchmarks/gpu/run_all.sh).
Results go to docs/benchmarks/learned-a-data/perf-*.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "docs" / "benchmarks" / "learned-a-data"
MEMORIES = {
    "none": ("none", {}),
    "rmt": ("rmt", {"n_tokens": 8}),
    "armt": ("armt", {"n_tokens": 4, "d_mem": 16, "nu": 3}),
    "infini": ("infini", {"rule": "delta"}),
    "hmt": ("hmt", {"n_sensory": 8, "n_summary": 16, "cache_size": 16}),
}
SEG, D, LAYERS = 128, 64, 2


def machine() -> dict:
    return {"device": f"cpu ({os.cpu_count()} cores shared with other jobs, {torch.get_num_threads()} torch threads)",
            "platform": platform.platform(), "torch": torch.__version__,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def model_for(kind: str, fields: dict, extra=()):
    from memstack.backbone.model import build_model
    from memstack.config import BackboneConfig, ModelConfig
    from memstack.registry import memory_config

    bb = BackboneConfig(vocab_size=512, d_model=D, n_layers=LAYERS, n_heads=4, n_kv_heads=2, seg_len=SEG)
    torch.manual_seed(0)
    return build_model(ModelConfig(bb, (memory_config(kind, **fields), *extra)))


def rss_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# ------------------------------------------------------------------------------------ train

def train_one(name: str, steps: int, batch: int, n_seg: int) -> dict:
    """Runs in its own process."""
    from memstack.data.packing import Batch
    from memstack.evals.bench import PeakMemory
    from memstack.train.segments import SegmentLoop

    torch.set_num_threads(1)
    kind, fields = MEMORIES[name]
    model = model_for(kind, fields).train()
    loop = SegmentLoop(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 512, (batch, n_seg, SEG), generator=g)
    b = Batch(tokens, torch.roll(tokens, -1, dims=2), torch.zeros(batch, n_seg, dtype=torch.bool))
    state = model.init_state(batch)

    def step(count_saved=False):
        nonlocal state
        saved = [0]

        def pack(t):
            saved[0] += t.numel() * t.element_size()
            return t

        if count_saved:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss, _, st = loop(b, state, "full", 1, 1.0 / b.n_targets)
        else:
            loss, _, st = loop(b, state, "full", 1, 1.0 / b.n_targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        from memstack.memory.state import detach

        state = detach(st)
        return saved[0]

    step()
    saved = step(count_saved=True)
    with PeakMemory(torch.device("cpu")) as peak:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        dt = time.perf_counter() - t0
    return {"memory": name, "tok_per_s": steps * batch * n_seg * SEG / dt, "step_s": dt / steps,
            "peak_rss_mb": peak.peak_mb, "saved_for_backward_mb": saved / 2**20, "params": model.num_params(),
            "state_bytes_per_example": model.memory.state_bytes(n_seg * SEG)}


def bench_train(args) -> dict:
    rows = []
    for rep in range(args.repeats):
        for name in MEMORIES:
            out = subprocess.run([sys.executable, __file__, "_train_one", name, str(args.steps), str(args.batch),
                                  str(args.segments)], capture_output=True, text=True, check=True)
            rec = json.loads(out.stdout.strip().splitlines()[-1])
            rec["repeat"] = rep
            rows.append(rec)
            print(f"  {name:7s} {rec['tok_per_s']:9.0f} tok/s  peak RSS {rec['peak_rss_mb']:7.1f} MB  "
                  f"saved {rec['saved_for_backward_mb']:7.1f} MB", flush=True)
    best = {}
    for r in rows:   # best of the repeats (the machine is shared: the fastest is the least disturbed)
        if r["memory"] not in best or r["tok_per_s"] > best[r["memory"]]["tok_per_s"]:
            best[r["memory"]] = r
    base = best["none"]
    summary = [{**r, "tok_per_s_ratio": r["tok_per_s"] / base["tok_per_s"],
                "peak_rss_ratio": r["peak_rss_mb"] / base["peak_rss_mb"],
                "saved_ratio": r["saved_for_backward_mb"] / base["saved_for_backward_mb"]} for r in best.values()]
    return {"what": "training throughput and memory vs the plain backbone", "seg_len": SEG, "d_model": D,
            "n_layers": LAYERS, "batch": args.batch, "segments_per_step": args.segments, "bptt": "full",
            "timed_steps": args.steps, "repeats": args.repeats, "runs": rows, "summary": summary, **machine(),
            "command": " ".join(["python"] + sys.argv)}


# ------------------------------------------------------------------------------------ infer

def bench_infer(args) -> dict:
    from memstack.memory.base import Step
    from memstack.memory.kv.config import DenseKVConfig
    from memstack.memory.state import allocated_nbytes

    torch.set_num_threads(1)
    checkpoints = [1 << k for k in range(10, 19)]            # 1k .. 256k tokens
    max_len = checkpoints[-1]
    result = {}
    for name in ["none", "rmt", "armt", "infini", "hmt"]:
        kind, fields = MEMORIES[name]
        extra = (DenseKVConfig(scope="document", initial_capacity=SEG),) if name == "none" else ()
        model = model_for(kind, fields, extra).eval()
        limit = args.kv_max if name == "none" else max_len
        g = torch.Generator().manual_seed(1)
        state, rows, n, t0 = model.init_state(1), [], 0, time.perf_counter()
        with torch.no_grad():
            while n < limit:
                tok = torch.randint(0, 512, (1, SEG), generator=g)
                out, state = model(tok, state, Step())
                n += SEG
                if n in checkpoints:
                    rows.append({"tokens": n, "state_bytes": allocated_nbytes(state.memories),
                                 "rss_mb": rss_mb(), "measured": True, "elapsed_s": time.perf_counter() - t0})
        if name == "none":   # beyond what was run: the KV cache's exact spec (contract-tested)
            spec = model.memory.memories[1].spec(torch.float32)
            for c in checkpoints:
                if c > limit:
                    rows.append({"tokens": c, "state_bytes": spec.max_bytes(c), "state_bytes_logical": spec.state_bytes(c),
                                 "measured": False})
        label = "none + kv_dense(document)" if name == "none" else name
        result[label] = rows
        last = [r for r in rows if r["measured"]][-1]
        print(f"  {label:26s} {last['tokens']:7d} tokens: state {last['state_bytes'] / 2**20:9.3f} MiB, "
              f"RSS {last['rss_mb']:7.1f} MB, {last['elapsed_s']:.0f} s", flush=True)
    return {"what": "inference memory vs context length (batch 1)", "seg_len": SEG, "d_model": D, "n_layers": LAYERS,
            "results": result, **machine(), "command": " ".join(["python"] + sys.argv)}


# ------------------------------------------------------------------------------------ op

def bench_op(args) -> dict:
    """linear_memory forward: the per-token reference loop, the torch chunkwise path and (on CUDA) the
    Triton kernel on the same inputs; CUDA timings synchronise around each call."""
    from memstack.ops.linear_memory import linear_memory_chunked, linear_memory_ref

    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    impls = [("reference", linear_memory_ref), ("chunked", linear_memory_chunked)]
    if dev.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":  # the interpreter: smoke runs on CPU
        from memstack.ops.linear_memory.triton import linear_memory_triton

        impls.append(("triton", linear_memory_triton))
    torch.set_num_threads(1)
    shapes = [(256, None, "delta"), (1024, None, "delta"), (1024, 128, "delta"), (1024, 128, "linear"),
              (4096, 128, "linear"), (1024, 1, "linear")]
    if args.smoke:
        shapes = [(64, 16, "delta"), (64, 16, "linear")]
    B, H, d = (8, 16, 64) if dev.type == "cuda" and not args.smoke else (1, 4, 64)
    rows = []
    for T, block, rule in shapes:
        q, k = torch.rand(B, H, T, d, device=dev), torch.rand(B, H, T, d, device=dev)
        v = torch.randn(B, H, T, d, device=dev)
        M, z = torch.zeros(B, H, d, d, device=dev), torch.zeros(B, H, d, device=dev)
        times = {}
        for impl, fn in impls:
            fn(q, k, v, M, z, rule=rule, block=block)
            reps = 1 if impl == "reference" else 5
            sync()
            t0 = time.perf_counter()
            for _ in range(reps):
                fn(q, k, v, M, z, rule=rule, block=block)
            sync()
            times[impl] = (time.perf_counter() - t0) / reps
        row = {"T": T, "block": block or T, "rule": rule, "batch": B, "heads": H, "dk": d, "dv": d,
               **{f"{i}_s": t for i, t in times.items()}, "speedup": times["reference"] / times["chunked"]}
        if "triton" in times:
            row["triton_vs_chunked"] = times["chunked"] / times["triton"]
        rows.append(row)
        print(f"  T={T:5d} block={row['block']:5d} {rule:6s}: " + ", ".join(f"{i} {t * 1e3:8.2f} ms" for i, t in
                                                                          times.items()), flush=True)
    return {"what": f"linear_memory forward: per-token reference loop vs chunkwise torch path"
                    f"{' vs Triton kernel' if dev.type == 'cuda' else ''} (fp32, {dev.type})",
            "rows": rows, **machine(), "device": str(dev), "command": " ".join(["python"] + sys.argv)}


# ------------------------------------------------------------------------------------ plots

def plot(out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img = out.parent / "img"
    img.mkdir(parents=True, exist_ok=True)
    p = out / "perf-infer.json"
    if p.exists():
        data = json.loads(p.read_text())
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        for label, rows in data["results"].items():
            meas = [r for r in rows if r["measured"]]
            ax.plot([r["tokens"] for r in meas], [r["state_bytes"] / 2**20 for r in meas], "o-", label=label)
            spec = [r for r in rows if not r["measured"]]
            if spec:
                ax.plot([meas[-1]["tokens"]] + [r["tokens"] for r in spec],
                        [meas[-1]["state_bytes"] / 2**20] + [r["state_bytes_logical"] / 2**20 for r in spec], "--",
                        color=ax.lines[-1].get_color(), label=label + " (spec, not run)")
        ax.set_xscale("log", base=2), ax.set_yscale("log")
        ax.set_xlabel("context length (tokens)"), ax.set_ylabel("memory state (MiB, batch 1)")
        ax.set_title(f"inference state vs context (d_model {data['d_model']}, {data['n_layers']} layers)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(img / "learned-a-infer-memory.png", dpi=110)
    p = out / "perf-train.json"
    if p.exists():
        data = json.loads(p.read_text())
        s = data["summary"]
        fig, ax = plt.subplots(figsize=(6.5, 3.8))
        x = range(len(s))
        ax.bar([i - 0.2 for i in x], [r["tok_per_s_ratio"] for r in s], width=0.4, label="tokens/s")
        ax.bar([i + 0.2 for i in x], [r["saved_ratio"] for r in s], width=0.4, label="activation bytes saved")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(list(x), [r["memory"] for r in s])
        ax.set_ylabel("ratio to the plain backbone"), ax.legend(fontsize=8)
        ax.set_title(f"training, seg_len {data['seg_len']}, {data['segments_per_step']} segments/step, full BPTT")
        fig.tight_layout()
        fig.savefig(img / "learned-a-train-ratios.png", dpi=110)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_train_one":
        name, steps, batch, n_seg = sys.argv[2], *map(int, sys.argv[3:6])
        print(json.dumps(train_one(name, steps, batch, n_seg)))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["train", "infer", "op", "plot"])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--segments", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--kv-max", type=int, default=32768, help="tokens the growing KV cache is actually run to")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--device", default="cpu", help="op only: cpu or cuda (cuda adds the Triton kernel)")
    ap.add_argument("--smoke", action="store_true", help="op only: tiny shapes, proves the script runs")
    ap.add_argument("--no-plot", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.what == "plot":
        plot(out)
        return
    rec = {"train": bench_train, "infer": bench_infer, "op": bench_op}[args.what](args)
    (out / f"perf-{args.what}.json").write_text(json.dumps(rec, indent=1))
    if not args.no_plot:
        plot(out)


if __name__ == "__main__":
    main()
