"""Every memory served: engine throughput at N concurrent requests vs decoding them one at a time.

    nice python benchmarks/runtime/memory_engine.py [--requests 16] [--memories rmt,xl]

For each registered memory (its first contract config) on the same small backbone: N requests
(prompt `--prompt-len`, `--new-tokens` greedy tokens each) run (a) through one `Engine`, all
admitted at once (continuous batching, memory state in per-request slots, paged K/V), and (b) one
after the other with `memstack.generate` (the library decoder, batch 1 -- what `memstack generate`
does for one request). Both produce the same tokens (checked: `agree`). Ratio = (b) / (a), in
process CPU time (the machine is shared; both run on one thread) and in wall time, medians of
`--reps` alternating repetitions. Writes one JSON record under reports/benchmarks/runtime/.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from common import device_info, table, write_record


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=40)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--seg-len", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--memories", default="", help="comma-separated registry names (default: all)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from memstack.backbone.model import build_model
    from memstack.config import BackboneConfig, ModelConfig
    from memstack.engine import Engine, EngineConfig
    from memstack.generate import SamplingConfig, generate
    from memstack.registry import MEMORIES

    b = BackboneConfig(vocab_size=args.vocab, d_model=args.d_model, n_layers=args.layers, n_heads=4, n_kv_heads=2,
                       seg_len=args.seg_len, init_std=0.1)
    names = args.memories.split(",") if args.memories else MEMORIES.names()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, args.vocab, (args.prompt_len,), generator=g).tolist() for _ in range(args.requests)]
    cfg = SamplingConfig(max_new_tokens=args.new_tokens)
    rows = []
    for name in names:
        torch.manual_seed(0)
        fields = MEMORIES.target_class(name).contract_configs()[0]
        model = build_model(ModelConfig(b, (MEMORIES.config_class(name)(**fields),))).eval()
        with torch.no_grad():
            for p in model.memory.parameters():
                p.add_(0.02 * torch.randn_like(p))
        eng = Engine(model, EngineConfig(block_size=16, kv_memory_mb=64, max_num_seqs=args.requests))
        eng.generate([prompts[0][:5]], SamplingConfig(max_new_tokens=2))                     # warm-up
        list(generate(model, prompts[0][:5], SamplingConfig(max_new_tokens=2)))
        te, tl = [], []
        for _ in range(args.reps):
            t, c = time.perf_counter(), time.process_time()
            ours = eng.generate(prompts, cfg)
            te.append((time.perf_counter() - t, time.process_time() - c))
            t, c = time.perf_counter(), time.process_time()
            lib = [[int(x) for x in generate(model, p, cfg)] for p in prompts]
            tl.append((time.perf_counter() - t, time.process_time() - c))
        (w_e, c_e), (w_l, c_l) = ([statistics.median(x) for x in zip(*t)] for t in (te, tl))
        n = args.requests * args.new_tokens
        agree = sum(a == b for x, y in zip(ours, lib) for a, b in zip(x, y)) / n
        rows.append({"memory": name, "engine_cpu_tok_s": n / c_e, "one_at_a_time_cpu_tok_s": n / c_l,
                     "ratio": c_l / c_e, "ratio_wall": w_l / w_e, "agree": agree})
        print(f"{name}: {rows[-1]['ratio']:.2f}x (wall {rows[-1]['ratio_wall']:.2f}x), agree {agree:.3f}", flush=True)
    path = write_record("memory_engine", {**vars(args), "backbone": vars(b) if hasattr(b, "__dict__") else str(b)}, rows,
                        "cpu")
    print(f"device: {device_info('cpu')}; {args.requests} requests x ({args.prompt_len} prompt + {args.new_tokens} new "
          f"tokens); d_model {args.d_model}, {args.layers} layers, seg_len {args.seg_len}")
    print(table(rows, ["memory", "engine_cpu_tok_s", "one_at_a_time_cpu_tok_s", "ratio", "ratio_wall", "agree"]))
    print(f"record: {path}")


if __name__ == "__main__":
    main()
