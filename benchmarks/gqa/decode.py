"""MHA vs GQA vs MQA decode: KV bytes per token, decode tokens/s (same run, interleaved) and the
quality after uptraining (from benchmarks/gqa/uptrain.py's records).

    flock /tmp/memstack-timing.lock .venv/bin/python benchmarks/gqa/decode.py \
        --records docs/benchmarks/gqa-data/records.jsonl --out docs/benchmarks/gqa-data

Every variant is the same backbone but for its KV head count (the uptrained checkpoints, or with
--random fresh weights of the same shapes: speed does not depend on the weights). Each round
fills B rows of `--context` tokens into the segment-scoped dense KV cache (preallocated, so no
buffer grows while timing) -- random K/V by default, or a real prefill with --prefill -- then
times `--new` greedy decode steps; the variants run
round-robin for `--rounds` rounds and the median is reported, so a change in machine load hits
them alike. Reported: KV bytes per token (formula 2 x layers x KV heads x head_dim x 4, and the
cache's own count after prefill), decode tok/s (wall clock and process CPU time), the ratio to MHA
in the same run, and the KV bytes a decode step reads per second of wall time. Measures, never
asserts.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from memstack.backbone import build_model
from memstack.backbone.gqa import kv_bytes_per_token
from memstack.config import ModelConfig
from memstack.evals.bench import environment
from memstack.generate import Decoder
from memstack.memory.kv.config import DenseKVConfig
from memstack.memory.state import ModelState


def load_variants(records: Path | None, alpha: float, random_heads: str, base_cfg) -> list[tuple[str, object, dict]]:
    """(name, model, quality) per variant: uptrained checkpoints chosen on validation, or random weights."""
    from memstack.train.run import load_for_inference

    out = []
    if records is not None:
        rows = {}
        for line in records.read_text().splitlines():
            r = json.loads(line)
            if r["alpha"] == alpha and r["method"] in ("-", "mean"):
                rows[r["variant"]] = r
        for name in sorted(rows, key=lambda n: -rows[n]["kv_heads"]):
            r = rows[name]
            work = Path(r.get("work", "runs/gqa"))
            ckpt = work / (f"up-{name}-a{alpha:g}-lr{r['chosen_lr']:g}" if r["chosen_lr"] is not None else f"conv-{name}")
            model, _, _ = load_for_inference(ckpt, "cpu")
            out.append((name, model, {"test_bpb": r["test_bpb"], "val_bpb": r["val_bpb"], "alpha": alpha,
                                      "chosen_lr": r["chosen_lr"]}))
        return out
    for g in (int(x) for x in random_heads.split(",")):
        torch.manual_seed(0)
        out.append((f"kv{g}", build_model(ModelConfig(replace(base_cfg, n_kv_heads=g))), {}))
    return out


def with_context(model, seg_len: int):
    """The same weights with a longer segment (one segment holds prompt + generation) and a
    preallocated segment-scoped KV cache."""
    cfg = ModelConfig(replace(model.cfg.backbone, seg_len=seg_len), model.cfg.memories)
    m = build_model(cfg)
    m.load_state_dict(model.state_dict())
    return m.with_memories([DenseKVConfig(scope="segment", initial_capacity=seg_len)]).eval()


def time_decode(model, batch: int, context: int, new: int, seed: int, prefill: bool = False) -> dict:
    g = torch.Generator().manual_seed(seed)
    V = model.cfg.backbone.vocab_size
    dec = Decoder(model, batch)
    if prefill:
        logits = dec.feed(torch.randint(0, V, (batch, context), generator=g))
    else:  # the cache filled with random K/V of `context` tokens: decode speed does not depend on them
        kv = dec.state.memories[-1]
        for buf in (*kv.k, *kv.v):
            buf[:, :, :context].normal_(generator=g)
        kv.valid[:, :context] = True
        kv.length = context
        dec.state = ModelState(torch.full((batch,), context, dtype=torch.long), dec.state.memories)
        dec.in_seg = context
        logits = torch.randn(batch, V, generator=g)
    kv = dec.state.memories[-1]
    cache = dec.model.memory.memories[-1]
    held = cache.held_bytes(kv) / (batch * kv.length)                 # bytes per token, incl. the valid flag
    w0, c0 = time.perf_counter(), time.process_time()
    for _ in range(new):
        logits = dec.feed(logits.argmax(-1)[:, None])
    return {"wall_s": time.perf_counter() - w0, "cpu_s": time.process_time() - c0, "held_bytes_per_token": held}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", help="uptrain.py's records.jsonl (quality and checkpoints); omit with --random")
    ap.add_argument("--alpha", type=float, default=0.05, help="which uptraining proportion's checkpoints")
    ap.add_argument("--random", default=None, help="KV head counts to build with random weights, e.g. 8,4,2,1")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prefill", action="store_true", help="prefill the context through the model (default: fill "
                    "the cache with random K/V, which costs nothing and decodes at the same speed)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from memstack.config import BackboneConfig

    base = BackboneConfig(vocab_size=512, d_model=128, n_layers=4, n_heads=8, seg_len=128)
    variants = load_variants(Path(args.records) if args.records else None, args.alpha, args.random or "8,4,2,1", base)
    S = args.context + args.new
    models = [(n, with_context(m, S), q) for n, m, q in variants]
    times: dict[str, list[dict]] = {n: [] for n, _, _ in models}
    time_decode(models[0][1], args.batch, 64, 4, 0)                        # warm-up (allocator, kernels)
    for r in range(args.rounds):
        for n, m, _ in (models if r % 2 == 0 else models[::-1]):          # alternate the order too
            times[n].append(time_decode(m, args.batch, args.context, args.new, seed=r, prefill=args.prefill))
    rows = []
    for n, m, q in models:
        b = m.cfg.backbone
        wall = statistics.median(t["wall_s"] for t in times[n])
        cpu = statistics.median(t["cpu_s"] for t in times[n])
        kvb = kv_bytes_per_token(b)
        rows.append({"variant": n, "kv_heads": b.kv_heads, "kv_bytes_per_token": kvb,
                     "cache_bytes_per_token": times[n][0]["held_bytes_per_token"],
                     "tok_s": args.batch * args.new / wall, "tok_s_cpu": args.batch * args.new / cpu,
                     "kv_read_GBps": args.batch * (args.context + args.new / 2) * kvb * args.new / wall / 1e9,
                     "wall_s_rounds": [t["wall_s"] for t in times[n]], "params": m.num_params(), **q})
    mha = rows[0]
    for r in rows:
        r["speed_vs_first"] = r["tok_s"] / mha["tok_s"]
        r["speed_vs_first_cpu"] = r["tok_s_cpu"] / mha["tok_s_cpu"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rec = {"benchmark": "gqa_decode", "date": time.strftime("%Y-%m-%d %H:%M:%S"), "env": environment(torch.device("cpu")),
           "config": {**{k: v for k, v in vars(args).items()}, "backbone": asdict(models[0][1].cfg.backbone)},
           "command": " ".join(["python", *sys.argv]), "results": rows}
    path = out / f"decode-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(rec, indent=1))
    print(f"batch {args.batch}, context {args.context}, {args.new} new tokens, median of {args.rounds} interleaved rounds")
    print("| variant | KV heads | KV bytes/token | decode tok/s | vs first (wall) | vs first (CPU time) | KV GB/s | test bpb |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['kv_heads']} | {r['kv_bytes_per_token']:,} | {r['tok_s']:.0f} | "
              f"{r['speed_vs_first']:.2f}x | {r['speed_vs_first_cpu']:.2f}x | {r['kv_read_GBps']:.2f} | "
              f"{r.get('test_bpb', float('nan')):.4f} |")
    print(f"record: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
