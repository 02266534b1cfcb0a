"""Paged attention vs contiguous SDPA on the same K/V, and vs the device's measured bandwidth ceiling.

    flock /tmp/memstack-timing.lock .venv/bin/python benchmarks/runtime/paged_attention.py            # CPU grid
    flock /tmp/memstack-timing.lock .venv/bin/python benchmarks/runtime/paged_attention.py --prefill  # + prefill
    python benchmarks/runtime/paged_attention.py --device cuda --dtypes bfloat16 --heads 32 --kv-heads 8 \\
        --head-dim 128 --batches 1,8,64 --contexts 4096,32768                                         # GPU

Decode: B sequences of L tokens each; their K/V sit in a paged pool (blocks handed out in random
order, `--layers` layers per block as in the engine's pool, layer 1 read) and, copied out, as one
contiguous (B, kv_heads, L, head_dim) tensor. Each paged implementation (`--impls`: "cpu" the
compiled kernel, "torch" gather into a reused workspace + SDPA, "fresh" the same with a fresh gather
buffer per call -- the path before issue 10 --, "triton" on CUDA) and contiguous SDPA (GQA folded into the
query axis, no repeated heads, no mask) are timed **interleaved**: every repeat runs each contender
once, in rotating order, so machine load falls on all alike; medians are reported. On the CPU the
primary timer is the thread's CPU time (robust on a shared machine; all runs are one torch thread
unless --threads) and the wall-clock median is recorded beside it; on CUDA it is wall time after
synchronising. `speed` = SDPA time / paged time (1.0 = as fast as contiguous SDPA).

Bandwidth: useful bytes = the K and V one step must read (B x L x kv_heads x head_dim x 2 x element
size); GB/s = useful bytes / median time; the ceiling is measured in the same run (a read-only
reduction and a copy over a buffer larger than the caches) and each contender is reported as a share
of the read ceiling.

--prefill adds chunks of T queries at the end of an L-token context (`--chunks T:L,...`), one
sequence, causal, against contiguous SDPA with the equivalent mask; "dispatch" is what
`paged_prefill` picks by default for that shape.

Writes one JSON record (reports/benchmarks/runtime/paged_attention-*.json, or --out) and prints
the tables. Measures; asserts nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from common import device_info, git_sha, sync, table, write_record


def ceiling(device, nbytes: int, dtype) -> dict:
    """Read-only reduction and copy bandwidth over `nbytes`, medians of 7."""
    x = torch.ones(nbytes // torch.empty((), dtype=dtype).element_size(), dtype=dtype, device=device)
    y = torch.empty_like(x)
    t = race({"read": lambda: x.sum(), "copy": lambda: y.copy_(x)}, device, reps=7, cpu_time=False)
    return {"bytes": nbytes, "read_GBps": nbytes / t["read"]["wall"] / 1e9,
            "copy_GBps": 2 * nbytes / t["copy"]["wall"] / 1e9}


def race(fns: dict, device, reps: int, cpu_time: bool, warmup: int = 1) -> dict:
    """Interleaved timing: each repeat runs every contender once, starting one further along the
    list each time. Returns {name: {"wall": median s, "cpu": median s or None}}."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    sync(device)
    wall = {n: [] for n in names}
    cpu = {n: [] for n in names}
    for r in range(reps):
        for i in range(len(names)):
            n = names[(r + i) % len(names)]
            c, w = time.thread_time(), time.perf_counter()
            fns[n]()
            sync(device)
            wall[n].append(time.perf_counter() - w)
            cpu[n].append(time.thread_time() - c)
    return {n: {"wall": statistics.median(wall[n]), "cpu": statistics.median(cpu[n]) if cpu_time else None}
            for n in names}


def _pool(B: int, L: int, Hkv: int, D: int, bs: int, layers: int, dtype, dev):
    """A pool holding B sequences of L tokens in shuffled blocks, its layer-1 views, the tables and
    the same K/V laid out contiguously (B, Hkv, L, D)."""
    from memstack.memory.kv.store import KVSpec, PagedKVCache

    nb = B * -(-L // bs)
    cache = PagedKVCache(KVSpec(layers, Hkv, D, bs, dtype), nb, dev)
    cache.kv.normal_()
    tables = torch.randperm(nb, device=dev).reshape(B, -1).to(torch.int32)
    kc, vc = cache.layer(min(1, layers - 1))
    k = kc[tables.long()].transpose(1, 2).reshape(B, Hkv, -1, D)[:, :, :L].contiguous()
    v = vc[tables.long()].transpose(1, 2).reshape(B, Hkv, -1, D)[:, :, :L].contiguous()
    return cache, kc, vc, tables, k, v


def _with_impl(impl: str, fn):
    """fn run with `impl` forced; "fresh" is the torch path with a fresh gather buffer per call (the
    path before the CPU kernel and the reused workspace: the "before" of docs/benchmarks/runtime.md)."""
    from memstack.ops.paged_attention import set_impl, torch_impl

    def run():
        set_impl("torch" if impl == "fresh" else impl)
        torch_impl.REUSE_WORKSPACE = impl != "fresh"
        try:
            return fn()
        finally:
            set_impl(None)
            torch_impl.REUSE_WORKSPACE = True
    return run


def decode_rows(args, dev, dtype, impls, cpu_time, ceil) -> list[dict]:
    from memstack.ops.paged_attention import decode_impl, paged_decode

    H, Hkv, D, bs = args.heads, args.kv_heads, args.head_dim, args.block_size
    rows = []
    for B in args.batches:
        for L in args.contexts:
            cache, kc, vc, tables, k, v = _pool(B, L, Hkv, D, bs, args.layers, dtype, dev)
            q = torch.randn(B, H, D, device=dev, dtype=dtype)
            starts = torch.zeros(B, dtype=torch.int64, device=dev)
            lens = torch.full((B,), L, dtype=torch.int64, device=dev)
            qg = q.reshape(B, Hkv, H // Hkv, D)
            out = torch.empty_like(q)
            fns = {"sdpa": lambda: F.scaled_dot_product_attention(qg, k, v)}
            for impl in impls:
                fns[impl] = _with_impl(impl, lambda: paged_decode(q, kc, vc, tables, starts, lens, out=out))
            t = race(fns, dev, args.reps, cpu_time)
            useful = 2 * B * L * Hkv * D * k.element_size()
            kk = "cpu" if cpu_time else "wall"
            r = {"dtype": str(dtype).split(".")[-1], "B": B, "L": L, "default": decode_impl(q, kc, vc),
                 "KV_MB": useful / 2**20, "sdpa_ms": t["sdpa"][kk] * 1e3,
                 "sdpa_%ceil": 100 * useful / t["sdpa"][kk] / 1e9 / ceil["read_GBps"]}
            for impl in impls:
                r[f"{impl}_ms"] = t[impl][kk] * 1e3
                r[f"{impl}_speed"] = t["sdpa"][kk] / t[impl][kk]
                r[f"{impl}_GBps"] = useful / t[impl][kk] / 1e9
                r[f"{impl}_%ceil"] = 100 * r[f"{impl}_GBps"] / ceil["read_GBps"]
                r[f"{impl}_wall_speed"] = t["sdpa"]["wall"] / t[impl]["wall"]
            rows.append(r)
            del cache, kc, vc, k, v
    return rows


def prefill_rows(args, dev, dtype, impls, cpu_time) -> list[dict]:
    from memstack.ops.attention.sdpa import attention_sdpa
    from memstack.ops.paged_attention import paged_prefill, prefill_impl

    H, Hkv, D, bs = args.heads, args.kv_heads, args.head_dim, args.block_size
    rows = []
    for T, L in args.chunks:
        cache, kc, vc, tables, k, v = _pool(1, L, Hkv, D, bs, args.layers, dtype, dev)
        q = torch.randn(T, H, D, device=dev, dtype=dtype)
        mask = torch.ones(T, L, dtype=torch.bool, device=dev).tril(L - T)[None]      # query i sees <= L-T+i
        qq = q.transpose(0, 1)[None]                                                  # (1, H, T, D)
        out = torch.empty_like(q)
        fns = {"sdpa": lambda: attention_sdpa(qq, k, v, mask)}
        for impl in [i for i in impls if i != "triton"]:
            fns[impl] = _with_impl(impl, lambda: paged_prefill(q, kc, vc, tables[0], 0, L, out=out))
        t = race(fns, dev, args.reps, cpu_time)
        kk = "cpu" if cpu_time else "wall"
        r = {"dtype": str(dtype).split(".")[-1], "T": T, "L": L, "default": prefill_impl(q, kc, vc, L),
             "sdpa_ms": t["sdpa"][kk] * 1e3}
        for impl in fns:
            if impl != "sdpa":
                r[f"{impl}_ms"] = t[impl][kk] * 1e3
                r[f"{impl}_speed"] = t["sdpa"][kk] / t[impl][kk]
        rows.append(r)
        del cache, kc, vc, k, v
    return rows


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtypes", default=None, help="comma list (CPU default float32,bfloat16; CUDA bfloat16)")
    ap.add_argument("--impls", default=None, help="paged implementations to time (CPU default cpu,torch,fresh; "
                    "CUDA triton,torch); those that cannot run here are skipped with the reason recorded")
    ap.add_argument("--batches", type=_ints, default=[1, 16, 64])
    ap.add_argument("--contexts", type=_ints, default=[128, 512, 1024, 4096])
    ap.add_argument("--heads", type=int, default=9, help="query heads (default: SmolLM2-135M's 9 / 3 KV / dim 64)")
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--layers", type=int, default=2, help="layers per pool block (the engine's layout)")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--prefill", action="store_true", help="also time prefill chunks (--chunks)")
    ap.add_argument("--chunks", default="16:128,16:4096,64:64,128:1024,512:512,512:4096,2048:2048",
                    help="prefill chunks T:L (T queries ending an L-token context)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: the shared 2-core dev machine; 0: torch's default)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, 3 repeats: proves the script runs")
    ap.add_argument("--out", default=None, help="write the record here instead of reports/benchmarks/runtime/")
    args = ap.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    from memstack.ops.paged_attention import cpu

    dev = torch.device(args.device)
    if args.smoke:
        args.batches, args.contexts, args.reps, args.chunks = [1, 3], [40], 2, "5:40"
    args.chunks = [tuple(int(x) for x in c.split(":")) for c in args.chunks.split(",")]
    dtypes = [getattr(torch, d) for d in (args.dtypes or ("bfloat16" if dev.type == "cuda" else
                                                          "float32,bfloat16")).split(",")]
    impls, skipped = [], {}
    for impl in (args.impls or ("triton,torch" if dev.type == "cuda" else "cpu,torch,fresh")).split(","):
        if impl == "cpu" and (dev.type != "cpu" or cpu.unavailable()):
            skipped[impl] = "not on the CPU" if dev.type != "cpu" else cpu.unavailable()
        elif impl == "triton" and dev.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            skipped[impl] = "needs CUDA (or TRITON_INTERPRET=1, the interpreter: smoke runs only)"
        else:
            impls.append(impl)
    cpu_time = dev.type == "cpu" and torch.get_num_threads() == 1
    esize = max(torch.empty((), dtype=d).element_size() for d in dtypes)
    biggest = max(args.batches) * max(args.contexts) * args.kv_heads * args.head_dim * 2 * esize
    ceil = ceiling(dev, max(2 * biggest, 1 << (20 if args.smoke else 28)), dtypes[0])
    rows, pre = [], []
    for dtype in dtypes:
        rows += decode_rows(args, dev, dtype, impls, cpu_time, ceil)
        if args.prefill or args.smoke:
            pre += prefill_rows(args, dev, dtype, impls, cpu_time)
    timer = "thread CPU time" if cpu_time else "wall time"
    cfg = {"heads": args.heads, "kv_heads": args.kv_heads, "head_dim": args.head_dim, "block_size": args.block_size,
           "layers": args.layers, "reps": args.reps, "threads": args.threads, "timer": timer, "impls": impls,
           "skipped": skipped, "ceiling": ceil, "smoke": args.smoke}
    rec = {"benchmark": "paged_attention", "config": cfg, "decode": rows, "prefill": pre}
    if args.out:
        path = Path(args.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**rec, "git": git_sha(), "device": device_info(dev), "torch": torch.__version__,
                                    "date": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=1))
    else:
        path = write_record("paged_attention", cfg, {"decode": rows, "prefill": pre}, dev)
    print(f"device: {device_info(dev)}; timer: {timer}, medians of {args.reps} interleaved repeats; ceiling read "
          f"{ceil['read_GBps']:.2f} GB/s, copy {ceil['copy_GBps']:.2f} GB/s; skipped: {skipped or 'none'}")
    cols = ["dtype", "B", "L", "default", "KV_MB", "sdpa_ms"]
    for impl in impls:
        cols += [f"{impl}_ms", f"{impl}_speed", f"{impl}_%ceil"]
    print(table(rows, cols + ["sdpa_%ceil"]))
    if pre:
        print(table(pre, ["dtype", "T", "L", "default", "sdpa_ms"] +
                    [c for i in impls if i != "triton" for c in (f"{i}_ms", f"{i}_speed")]))
    print(f"record: {path}")
    return rec


if __name__ == "__main__":
    main()
