"""Time to first token with a long shared prefix: cold vs device-pool hit vs host hit vs disk hit.

    flock /tmp/memstack-timing.lock python benchmarks/runtime/ttft.py [--prefix 8192]

A request = a long prefix (a document, a system prompt) + a short question. Cold: no cache,
the whole prompt is prefilled. Device hit: the prefix's blocks are in the engine's pool (on a
GPU: HBM; on this CPU run the "device" pool is host memory too). Host hit: the pool forgot them
(Block pool reset) and the host tier copies them back in one contiguous transfer. Disk hit: a
fresh engine (a new process's state: empty pool, no host tier) reads them from the disk tier's
chunk files (the OS page cache is warm; a cold disk read is slower). Each figure is the
median of `--reps` requests with fresh questions.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile

import torch

from common import device_info, table, write_record


def ttft(eng, prompt) -> float:
    from memstack.generate import SamplingConfig

    rid = eng.add_request(prompt, SamplingConfig(max_new_tokens=1))
    while not eng.requests[rid].finished:
        eng.step()
    r = eng.requests.pop(rid)
    return r.first_token_time - r.arrival, r.cached_tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prefix", type=int, default=8192)
    ap.add_argument("--question", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from memstack.backbone.model import build_model
    from memstack.config import BackboneConfig
    from memstack.engine import Engine, EngineConfig
    from memstack.memory.kv.config import DenseKVConfig

    torch.manual_seed(0)
    b = BackboneConfig(vocab_size=1024, d_model=args.d_model, n_layers=args.layers, n_heads=4, n_kv_heads=2,
                       seg_len=args.prefix + 1024)
    model = build_model(b, [DenseKVConfig()]).eval()
    prefix = torch.randint(0, 1024, (args.prefix,)).tolist()
    q = lambda: torch.randint(0, 1024, (args.question,)).tolist()  # noqa: E731
    disk = tempfile.mkdtemp(prefix="memstack-ttft-")
    base = dict(block_size=16, kv_memory_mb=512, max_num_batched_tokens=2048, device=args.device)
    rows = []
    cold = Engine(model, EngineConfig(**base, enable_prefix_caching=False))
    rows.append({"case": "cold (recompute)", "ttft_s": statistics.median(ttft(cold, prefix + q())[0] for _ in range(args.reps)),
                 "cached_tokens": 0})
    del cold
    eng = Engine(model, EngineConfig(**base, host_cache_blocks=args.prefix // 16 + 8, disk_cache_dir=disk))
    ttft(eng, prefix + q())                                                      # compute + offload the prefix
    eng.tiers.flush()
    t = [ttft(eng, prefix + q()) for _ in range(args.reps)]
    rows.append({"case": "device-pool hit", "ttft_s": statistics.median(x[0] for x in t), "cached_tokens": t[0][1]})
    t = []
    for _ in range(args.reps):
        eng.pool.reset_cache()                                                   # forget the pool's copy
        t.append(ttft(eng, prefix + q()))
    rows.append({"case": "host hit", "ttft_s": statistics.median(x[0] for x in t), "cached_tokens": t[0][1]})
    t = []
    for _ in range(args.reps):
        fresh = Engine(model, EngineConfig(**base, disk_cache_dir=disk))        # a new process' view: disk only
        t.append(ttft(fresh, prefix + q()))
    rows.append({"case": "disk hit", "ttft_s": statistics.median(x[0] for x in t), "cached_tokens": t[0][1]})
    cold_t = rows[0]["ttft_s"]
    for r in rows:
        r["%_of_cold"] = 100 * r["ttft_s"] / cold_t
    path = write_record("ttft", {**vars(args), "params": model.num_params()}, rows, args.device)
    print(f"device: {device_info(args.device)}; {model.num_params() / 1e6:.2f}M-param model, prefix {args.prefix} + "
          f"question {args.question} tokens")
    print(table(rows, ["case", "ttft_s", "%_of_cold", "cached_tokens"]))
    print(f"record: {path}")


if __name__ == "__main__":
    main()
