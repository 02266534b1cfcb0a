"""Memorizing Transformer at 65,536 memory entries per document: training slowdown against the
plain backbone in the same run, with the memory in RAM and memory-mapped.

    python benchmarks/retrieval/memorizing_scale.py --mem-len 65536

Backbone: d_model 128, 4 layers, 4 heads / 2 KV heads of dim 32, seg_len 256, bpe512; the
memory at the default layer (the last but one), k = 32, FIFO. Data: the Austen novels (LM task,
`corpus=austen`): each row streams one novel, so a row's document is long enough to fill the
memory (65,536 entries = 256 segments). Each memorizing trainer first reads its own stream
without gradients until every row's memory is full (timed: the fill rate), then the three
configurations (plain, memorizing in RAM, memorizing memory-mapped) take training steps (2
segments per step, the trainer's own `train_step`: forward, backward, AdamW) in alternating
rounds, so a change in the shared machine's load hits each alike. Reported: tokens/s (wall and
this process's CPU time), the slowdown against the plain backbone, the memory's bytes and this
process's resident set. Writes one JSON record under reports/benchmarks/retrieval/.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import torch


def rss_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mem-len", type=int, default=65536)
    ap.add_argument("--rows", type=int, default=1, help="documents per batch (each with its own memory)")
    ap.add_argument("--steps", type=int, default=4, help="timed training steps per configuration")
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--mmap-dir", default="", help="where the mapped files go (default: the system temp dir)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="reports/benchmarks/retrieval")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from memstack.backbone.model import build_model
    from memstack.config import BackboneConfig, ModelConfig
    from memstack.evals.lm import LMTask, LMTaskConfig
    from memstack.memory.base import Step
    from memstack.memory.retrieval.config import MemorizingConfig
    from memstack.memory.state import detach
    from memstack.train.config import TrainConfig
    from memstack.train.distributed import DistInfo
    from memstack.train.trainer import Trainer

    seg = 256
    bb = BackboneConfig(vocab_size=512, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, seg_len=seg)
    task = LMTask(LMTaskConfig(corpus="austen", tokenizer="bpe512"), seg)
    configs = {"plain": (), "memory": (MemorizingConfig(mem_len=a.mem_len, k=a.k),),
               "mmap": (MemorizingConfig(mem_len=a.mem_len, k=a.k, store="mmap", mmap_dir=a.mmap_dir),)}
    trainers, out = {}, {"fill": {}}
    for name, mems in configs.items():
        torch.manual_seed(0)
        model = build_model(ModelConfig(bb, mems))
        tr = Trainer(model, TrainConfig(max_steps=10**6, batch_size=a.rows, n_segments=2, progress=False),
                     task.train_source(a.rows, 0), dist=DistInfo(device=torch.device("cpu")))
        tr.train_step()                                                          # warm up (allocations, first step)
        if mems:
            n_fill = -(-a.mem_len // seg)                                        # segments until the memory is full
            t0, c0 = time.perf_counter(), time.process_time()
            state = tr.state
            with torch.no_grad():
                model.eval()
                for _ in range(0, n_fill, 16):
                    batch = tr.source.next(16)
                    for n in range(16):
                        _, state = model(batch.tokens[:, n], state, Step(reset=batch.reset[:, n]))
            tr.state = detach(state)
            m = tr.state.memories[0]
            held = int(m.valid[0].sum(1).min())
            out["fill"][name] = {"segments": n_fill, "wall_s": time.perf_counter() - t0,
                                 "cpu_s": time.process_time() - c0, "entries_per_row_min": held,
                                 "memory_bytes": sum(t.numel() * t.element_size() for t in (*m.mk, *m.mv)),
                                 "rss_mb_after_fill": rss_mb()}
            print(name, out["fill"][name], flush=True)
            if held < a.mem_len:
                print(f"warning: a row's document ended before its memory was full ({held} entries)", flush=True)
        trainers[name] = tr
    spent = {n: [0.0, 0.0, 0] for n in trainers}
    for r in range(a.steps):
        for name, tr in (trainers.items() if r % 2 == 0 else reversed(trainers.items())):
            t0, c0, tok0 = time.perf_counter(), time.process_time(), tr.tokens
            tr.train_step()
            spent[name][0] += time.perf_counter() - t0
            spent[name][1] += time.process_time() - c0
            spent[name][2] += tr.tokens - tok0
        print(f"round {r + 1}/{a.steps}", {n: round(v[0], 2) for n, v in spent.items()}, flush=True)
    for name, (wall, cpu, tok) in spent.items():
        out[name] = {"tok_per_s_wall": tok / wall, "tok_per_s_cpu": tok / cpu, "tokens": tok}
    for name in ("memory", "mmap"):
        out[name]["slowdown_wall"] = out["plain"]["tok_per_s_wall"] / out[name]["tok_per_s_wall"]
        out[name]["slowdown_cpu"] = out["plain"]["tok_per_s_cpu"] / out[name]["tok_per_s_cpu"]
        held = trainers[name].state.memories[0].valid[0].sum(1)
        out[name]["entries_per_row_after"] = held.tolist()
    sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    rec = {"command": "benchmarks/retrieval/memorizing_scale.py " + " ".join(f"--{k.replace('_', '-')}={v}" for k, v in vars(a).items()),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "git": sha,
           "device": f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores visible, torch threads {a.threads}",
           "torch": torch.__version__, "load_avg": os.getloadavg(), "backbone": vars(bb) if hasattr(bb, "__dict__") else str(bb),
           "results": out}
    path = Path(a.out) / f"memorizing_scale-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rec, indent=1, default=str))
    print(json.dumps(out, indent=1))
    print(f"record: {path}")


if __name__ == "__main__":
    main()
