"""Where the engine's time goes per step: a sampling profile (pyinstrument) of `Engine.generate`,
folded into categories, at each batch size.

    pip install -e '.[profile]'     # pyinstrument
    flock /tmp/memstack-timing.lock .venv/bin/python benchmarks/runtime/engine_profile.py [--batches 1,16,64]

Same model and workload as engine_throughput.py's equal case (greedy, prompt 64, 64 new tokens,
Llama-shaped 3.8M-parameter model, one torch thread, prefix caching off), one warm-up run, then one
run per batch size whose decode steps are profiled (the first step, the whole prompt's prefill, is
not: every step after it decodes one token per request). Each sample's time goes to a category by the innermost frame that
names one (anything under the paged attention op counts as attention):

    matmul            F.linear (q/k/v/o projections, SwiGLU, lm_head)
    attention         memstack/ops/paged_attention/* (kernel call, dispatch, argument packing)
    kv_write          PagedKVCache.write (index_put of the step's K/V into the pool)
    layers_elementwise RMSNorm, RoPE, SiLU, residual adds, embedding (backbone/layers.py, model.py)
    torch_python      torch.nn.Module.__call__ machinery, no_grad decorators
    tensor_from_lists torch.tensor(...) of Python lists (tokens, positions, slots, tables)
    runner_python     ModelRunner.run's own Python (list comprehensions, loops, slicing)
    sampling          argmax / sample / tolist of the logits
    engine_python     Engine.step, Scheduler, KVCacheManager, BlockPool, requests (bookkeeping)
    other             the rest

Prints a table of ms per step and share per category, writes one JSON record (and with --html the
pyinstrument HTML pages) under reports/benchmarks/runtime/. Wall-clock sampling on a shared machine
inflates every category alike when the process is descheduled, so the shares are the figure to
read; CPU time per step is recorded beside them. Measures; asserts nothing.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from common import device_info, table, write_record

CATS = ["matmul", "attention", "kv_write", "layers_elementwise", "torch_python", "tensor_from_lists", "runner_python",
        "sampling", "engine_python", "other"]


def category(frame) -> str | None:
    f, path = frame.function or "", frame.file_path or ""
    if "ops/paged_attention" in path:
        return "attention"
    if f == "linear" and "<built-in>" in path:
        return "matmul"
    if f == "write" and "kv/store.py" in path:
        return "kv_write"
    if "backbone/layers.py" in path or "backbone/model.py" in path or f in ("silu", "embedding", "rms_norm"):
        return "layers_elementwise"
    if "torch/nn/modules/module.py" in path or "torch/utils/_contextlib.py" in path or "grad_mode.py" in path:
        return "torch_python"
    if f.endswith("tensor") and "<built-in>" in path:
        return "tensor_from_lists"
    if "engine/runner.py" in path:
        return "runner_python"
    if f in ("argmax", "tolist", "sample", "Tensor.argmax", "Tensor.tolist") or "generate.py" in path:
        return "sampling"
    if any(p in path for p in ("engine/engine.py", "engine/scheduler.py", "engine/request.py", "kv/manager.py",
                               "kv/block_pool.py", "kv/hashing.py")):
        return "engine_python"
    return None


def fold(frame, inherited: str, acc: dict) -> None:
    """Add each frame's self time to its category (its own, else its caller's; attention keeps its subtree)."""
    own = category(frame)
    cat = inherited if inherited == "attention" else (own or inherited)
    acc[cat] = acc.get(cat, 0.0) + frame.total_self_time
    for c in frame.children:
        fold(c, cat, acc)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--interval", type=float, default=0.0005, help="sampling interval (s)")
    ap.add_argument("--html", action="store_true", help="also write pyinstrument's HTML page per batch size")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from pyinstrument import Profiler

    from engine_throughput import build, workload
    from memstack.engine import Engine, EngineConfig
    from memstack.generate import SamplingConfig

    margs = argparse.Namespace(vocab=4096, d_model=256, layers=4, heads=8, kv_heads=2)
    dev = torch.device("cpu")
    model, _ = build(margs, dev)
    rows = []
    for B in [int(b) for b in args.batches.split(",")]:
        prompts, news = workload("equal", B, args.prompt_len, args.new_tokens, margs.vocab)
        blocks = sum(-(-(len(p) + n) // 16) for p, n in zip(prompts, news)) + 8
        eng = Engine(model, EngineConfig(block_size=16, num_blocks=blocks, max_num_seqs=B,
                                         max_num_batched_tokens=max(2048, sum(map(len, prompts))),
                                         enable_prefix_caching=False, device="cpu"))
        params = [SamplingConfig(max_new_tokens=n) for n in news]
        eng.generate(prompts, params)                                             # warm-up
        for pr, sp in zip(prompts, params):
            eng.add_request(pr, sp)
        eng.step()                                                                # the prefill step, not profiled
        n_steps = 0
        p = Profiler(interval=args.interval)
        c = time.process_time()
        p.start()
        while eng.has_unfinished():                                               # decode steps only
            eng.step()
            n_steps += 1
        p.stop()
        cpu = time.process_time() - c
        acc: dict = {}
        fold(p.last_session.root_frame(), "other", acc)
        total = sum(acc.values())
        row = {"batch": B, "steps": n_steps, "cpu_ms_per_step": 1e3 * cpu / n_steps,
               "sampled_ms_per_step": 1e3 * total / n_steps}
        for k in CATS:
            row[f"{k}_%"] = 100 * acc.get(k, 0.0) / total
        rows.append(row)
        if args.html:
            out = Path("reports/benchmarks/runtime")
            out.mkdir(parents=True, exist_ok=True)
            (out / f"engine_profile-B{B}.html").write_text(p.output_html())
        print(f"B={B}: " + ", ".join(f"{k} {row[k + '_%']:.1f}%" for k in CATS), flush=True)
    path = write_record("engine_profile", {**vars(args), "model": vars(margs), "categories": CATS}, rows, dev)
    print(f"device: {device_info(dev)}; one run per batch after a warm-up; prompt {args.prompt_len}, "
          f"{args.new_tokens} new tokens")
    print(table(rows, ["batch", "steps", "cpu_ms_per_step"] + [f"{k}_%" for k in CATS]))
    print(f"record: {path}")
    return {"results": rows}


if __name__ == "__main__":
    main()
