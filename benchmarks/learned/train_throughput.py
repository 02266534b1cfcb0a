"""Training cost of learned memories against the plain backbone, at the same segment length.

For each memory (and `none`, the plain backbone), a model is built on the same backbone and
trained for a few steps with the real trainer (AdamW, the segment loop with full BPTT over
`--segments` segments, gradient clipping) on random tokens. Reported per memory:

- tokens/s: input tokens per second of training steps (median over `--repeats` rounds; the
  memories are run round-robin so a change in machine load hits all of them alike);
- activation MB: bytes autograd saves for the backward pass during one step's forward (counted
  with saved-tensor hooks; deterministic, the part of training memory a memory adds);
- peak MB: CUDA allocator peak on GPU; process peak RSS on CPU (includes the interpreter and
  every earlier model, so on CPU it only bounds from above);
- ratios to `none` measured in the same run.

    flock /tmp/memstack-timing.lock .venv/bin/python benchmarks/learned/train_throughput.py --out docs/benchmarks/learned-b-throughput.json

Benchmarks measure, never assert.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from memstack.backbone.model import build_model
from memstack.config import BackboneConfig, ModelConfig, from_dict
from memstack.data.packing import Batch
from memstack.evals.bench import PeakMemory, environment
from memstack.registry import MEMORIES
from memstack.train.config import TrainConfig
from memstack.train.distributed import DistInfo, resolve_device
from memstack.train.trainer import Trainer

DEFAULTS = {
    "none": {},
    "memory_tokens": {"n_tokens": 16},
    "xl": {"mem_len": 64},
    "compressive": {"mem_len": 32, "cmem_len": 32, "rate": 4, "compression": "conv"},
    "lm2": {"n_slots": 16, "n_heads": 4},
    "latents": {"n_latents": 16, "n_heads": 4},
    "prefix": {"n_prefix": 16, "reparam_hidden": 256},
}


class RandomTokens:
    def __init__(self, vocab: int, rows: int, seg_len: int, device: torch.device):
        self.g = torch.Generator().manual_seed(0)
        self.vocab, self.rows, self.seg_len, self.device = vocab, rows, seg_len, device

    def next(self, n: int) -> Batch:
        t = torch.randint(0, self.vocab, (self.rows, n, self.seg_len + 1), generator=self.g)
        reset = torch.zeros(self.rows, n, dtype=torch.bool)
        return Batch(t[..., :-1].contiguous(), t[..., 1:].contiguous(), reset)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, d: dict) -> None:
        pass


def saved_activation_bytes(trainer: Trainer) -> int:
    """Bytes autograd saves for backward during one training step's forward (distinct storages)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        s = t.untyped_storage()
        seen[s.data_ptr()] = max(seen.get(s.data_ptr(), 0), s.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        trainer.train_step()
    params = {p.untyped_storage().data_ptr() for p in trainer.model.parameters()}
    return sum(n for ptr, n in seen.items() if ptr not in params)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--memories", default=",".join(DEFAULTS), help="comma-separated registry names (none first)")
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--seg-len", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--segments", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--steps", type=int, default=6, help="timed steps per round")
    ap.add_argument("--repeats", type=int, default=3, help="round-robin rounds (median reported)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", help="write the records as JSON here")
    args = ap.parse_args(argv)

    device = resolve_device(args.device)
    names = args.memories.split(",")
    backbone = BackboneConfig(vocab_size=args.vocab, d_model=args.d_model, n_layers=args.layers, n_heads=args.heads,
                              seg_len=args.seg_len)
    tcfg = TrainConfig(lr=1e-3, warmup_steps=1, max_steps=10**6, batch_size=args.batch, n_segments=args.segments,
                       progress=False, precision="auto")
    trainers, rec = {}, {}
    for n in names:
        cfg = from_dict(MEMORIES.config_class(n), DEFAULTS.get(n, {}), what=n)
        torch.manual_seed(0)
        model = build_model(ModelConfig(backbone, (cfg,))).to(device)
        tr = Trainer(model, tcfg, RandomTokens(args.vocab, args.batch, args.seg_len, device), dist=DistInfo(device=device))
        for _ in range(2):
            tr.train_step()                                            # warm-up (allocator, autograd caches)
        trainers[n] = tr
        rec[n] = {"memory": n, "config": DEFAULTS.get(n, {}), "tok_per_s": [], "params": model.num_params(),
                  "memory_params": sum(p.numel() for p in model.memory.parameters()),
                  "state_size": model.memory.state_size(args.seg_len * args.segments),
                  "activation_mb": saved_activation_bytes(tr) / 2**20}
    for _ in range(args.repeats):
        for n in names:
            tr = trainers[n]
            with PeakMemory(device) as peak:
                t0, tok0 = time.perf_counter(), tr.tokens
                for _ in range(args.steps):
                    tr.train_step()
                dt = time.perf_counter() - t0
            rec[n]["tok_per_s"].append((tr.tokens - tok0) / dt)
            rec[n]["peak_mb"] = max(rec[n].get("peak_mb", 0.0), peak.peak_mb)
    base = rec.get("none")
    rows = []
    for n in names:
        r = rec[n]
        r["tok_per_s_median"] = statistics.median(r["tok_per_s"])
        if base:
            r["speed_vs_none"] = r["tok_per_s_median"] / base["tok_per_s_median"]
            r["activation_vs_none"] = r["activation_mb"] / base["activation_mb"]
            r["peak_vs_none"] = r["peak_mb"] / base["peak_mb"]
        rows.append(r)
    env = environment(device)
    setup = {k: getattr(args, k) for k in ("d_model", "layers", "heads", "seg_len", "batch", "segments", "vocab", "steps",
                                           "repeats")}
    print(f"device: {env['device']}; torch {env['torch']}; {setup}")
    print(f"{'memory':<14}{'tok/s':>10}{'vs none':>9}{'act MB':>9}{'vs none':>9}{'peak MB':>9}{'vs none':>9}{'state':>9}")
    for r in rows:
        print(f"{r['memory']:<14}{r['tok_per_s_median']:>10,.0f}{r.get('speed_vs_none', float('nan')):>9.2f}"
              f"{r['activation_mb']:>9.1f}{r.get('activation_vs_none', float('nan')):>9.2f}"
              f"{r['peak_mb']:>9.0f}{r.get('peak_vs_none', float('nan')):>9.2f}{r['state_size']:>9}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"setup": setup, "env": env, "date": time.strftime("%Y-%m-%d %H:%M"), "command": " ".join(sys.argv),
                       "records": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
