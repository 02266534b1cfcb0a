"""Decode attention bandwidth: paged decode vs a measured memory-bandwidth ceiling, and vs
contiguous SDPA on the same K/V.

    flock /tmp/memstack-timing.lock python benchmarks/runtime/decode_bandwidth.py [--device cuda]

Useful bytes = the K and V a decode step must read (batch x context x kv_heads x head_dim x 2 x
element size); achieved bandwidth = useful bytes / median time. The ceiling is measured in the
same run: a read-only reduction over a buffer larger than the caches (what the reference note
used on the H100: 2.97 TB/s), and a device copy. The paged path is the Triton kernel on CUDA and
the torch gather + SDPA path on CPU (which reads each byte twice: gather, then attention);
contiguous SDPA reads K/V laid out densely, GQA folded into the query axis (no repeated heads).
"""
from __future__ import annotations

import argparse
import torch
import torch.nn.functional as F

from common import device_info, table, timeit, write_record


def ceiling(device, nbytes: int, dtype) -> dict:
    x = torch.ones(nbytes // torch.empty((), dtype=dtype).element_size(), dtype=dtype, device=device)
    t_read = timeit(lambda: x.sum(), device)
    y = torch.empty_like(x)
    t_copy = timeit(lambda: y.copy_(x), device)
    return {"read_GBps": nbytes / t_read / 1e9, "copy_GBps": 2 * nbytes / t_copy / 1e9}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="float32 (CPU default) | bfloat16 (CUDA default)")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--shapes", default=None, help="B:L,... (default CPU 1:4096,8:2048,8:8192; CUDA adds 64:4096,8:32768)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: the shared 2-core dev machine; "
                    "more OpenMP threads than free cores make every small op wait a scheduler tick)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from memstack.memory.kv.store import KVSpec, PagedKVCache
    from memstack.ops.paged_attention import decode_impl, paged_decode

    dev = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if dev.type == "cuda" else "float32"))
    H, Hkv, D, bs = 32, 8, 128, args.block_size
    shapes = args.shapes or ("1:4096,8:2048,8:8192" if dev.type == "cpu" else "1:32768,8:8192,8:32768,64:4096,256:1024")
    shapes = [tuple(int(x) for x in s.split(":")) for s in shapes.split(",")]
    biggest = max(B * L for B, L in shapes) * Hkv * D * 2 * torch.empty((), dtype=dtype).element_size()
    ceil = ceiling(dev, max(biggest, 1 << 28), dtype)
    rows = []
    for B, L in shapes:
        nb = B * -(-L // bs)
        cache = PagedKVCache(KVSpec(1, Hkv, D, bs, dtype), nb, dev)
        cache.kv.normal_()
        tables = torch.randperm(nb, device=dev).reshape(B, -1).to(torch.int32)       # scattered blocks
        kc, vc = cache.layer(0)
        q = torch.randn(B, H, D, device=dev, dtype=dtype)
        starts = torch.zeros(B, dtype=torch.int32, device=dev)
        lens = torch.full((B,), L, dtype=torch.int32, device=dev)
        impl = decode_impl(q, kc)
        t_paged = timeit(lambda: paged_decode(q, kc, vc, tables, starts, lens), dev)
        # the same K/V, contiguous, for SDPA: (B, Hkv, L, D); GQA folded into the query axis
        k = kc[tables.long()].transpose(1, 2).reshape(B, Hkv, -1, D)[:, :, :L].contiguous()
        v = vc[tables.long()].transpose(1, 2).reshape(B, Hkv, -1, D)[:, :, :L].contiguous()
        qg = q.reshape(B, Hkv, H // Hkv, D)
        t_sdpa = timeit(lambda: F.scaled_dot_product_attention(qg, k, v), dev)
        useful = 2 * B * L * Hkv * D * k.element_size()
        r = {"B": B, "L": L, "impl": impl, "KV_MB": useful / 2**20, "paged_ms": t_paged * 1e3, "sdpa_ms": t_sdpa * 1e3,
             "paged_GBps": useful / t_paged / 1e9, "sdpa_GBps": useful / t_sdpa / 1e9}
        r["paged_%ceil"] = 100 * r["paged_GBps"] / ceil["read_GBps"]
        r["sdpa_%ceil"] = 100 * r["sdpa_GBps"] / ceil["read_GBps"]
        r["paged/sdpa_speed"] = t_sdpa / t_paged
        rows.append(r)
        del cache, k, v
    cfg = {"H": H, "Hkv": Hkv, "D": D, "block_size": bs, "dtype": str(dtype), "ceiling": ceil}
    path = write_record("decode_bandwidth", cfg, rows, dev)
    print(f"device: {device_info(dev)}; ceiling read {ceil['read_GBps']:.2f} GB/s, copy {ceil['copy_GBps']:.2f} GB/s")
    print(table(rows, ["B", "L", "impl", "KV_MB", "paged_ms", "sdpa_ms", "paged_GBps", "sdpa_GBps", "paged_%ceil",
                       "sdpa_%ceil", "paged/sdpa_speed"]))
    print(f"record: {path}")


if __name__ == "__main__":
    main()
