"""KV memory waste (reserved but unused) under a mixed-length workload, continuous batching.

    flock /tmp/memstack-timing.lock python benchmarks/runtime/kv_waste.py

Requests with prompt lengths uniform in [16, 1024] and output lengths uniform in [16, 256] run
through the engine (continuous batching, 16 at a time). At every step the share of the
reserved slots of running requests that hold no visible token is sampled (Engine.kv_stats);
the figure is the token-weighted average over steps. The peer figure is a static cache on the
same trace: every row of a static batch reserves the batch's longest prompt + max_new_tokens
(HF's StaticCache / contiguous preallocation), waste = 1 - tokens held / slots reserved.
Waste does not depend on the model's width, so a tiny model keeps the run short.
"""
from __future__ import annotations

import argparse
import random

import torch

from common import device_info, table, write_record


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--block-sizes", default="16,8")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from memstack.backbone.model import build_model
    from memstack.config import BackboneConfig
    from memstack.engine import Engine, EngineConfig
    from memstack.generate import SamplingConfig
    from memstack.memory.kv.config import DenseKVConfig

    rng = random.Random(0)
    work = [(rng.randint(16, 1024), rng.randint(16, 256)) for _ in range(args.requests)]
    torch.manual_seed(0)
    model = build_model(BackboneConfig(vocab_size=256, d_model=32, n_layers=1, n_heads=2, seg_len=4096),
                        [DenseKVConfig()]).eval()
    rows = []
    for bs in [int(x) for x in args.block_sizes.split(",")]:
        eng = Engine(model, EngineConfig(block_size=bs, kv_memory_mb=256, max_num_seqs=args.batch,
                                         max_num_batched_tokens=4096))
        for p, n in work:
            eng.add_request(torch.randint(0, 256, (p,)).tolist(), SamplingConfig(max_new_tokens=n))
        reserved = used = 0
        steps = 0
        while eng.has_unfinished():
            eng.step()
            s = eng.kv_stats()
            reserved += s["reserved_slots"]
            used += s["used_slots"]
            steps += 1
        rows.append({"system": f"memstack paged, block {bs}", "waste_%": 100 * (1 - used / reserved), "steps": steps})
    # static batches of `batch` rows in arrival order, each row reserving max(prompt) + max(new) of its batch
    res = held = 0
    for i in range(0, len(work), args.batch):
        chunk = work[i:i + args.batch]
        cap = max(p for p, _ in chunk) + max(n for _, n in chunk)
        for t in range(cap):                                                      # sampled at every position
            res += cap * len(chunk)
            held += sum(min(t + 1, p + n) for p, n in chunk)
    rows.append({"system": "static cache (per static batch)", "waste_%": 100 * (1 - held / res), "steps": None})
    cfg = {**vars(args), "prompt_len": [16, 1024], "new_tokens": [16, 256]}
    path = write_record("kv_waste", cfg, rows, "cpu")
    print(f"device: {device_info('cpu')}; {args.requests} requests, prompts U[16,1024], outputs U[16,256], "
          f"{args.batch} at a time")
    print(table(rows, ["system", "waste_%", "steps"]))
    print(f"record: {path}")


if __name__ == "__main__":
    main()
