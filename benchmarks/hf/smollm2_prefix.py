"""A trained prefix / memory tokens on the frozen pretrained SmolLM2-135M-Instruct: does the frozen
model benefit? (Prefix-tuning, Li & Liang arXiv 2101.00190; prompt/memory tokens.)

Task: SOTU language modelling with SmolLM2's own tokenizer, in 64-token segments (each segment
is read on its own: neither memory carries anything across segments). The backbone stays frozen
(`train.trainable: memory`); only the memory trains. Every (memory, lr) run writes its adapter
(adapters.py); the learning rate is chosen on the validation split, bits per byte reported on
the test split, next to the frozen model's. Needs `memstack data fetch smollm2`.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/hf/smollm2_prefix.py \
        --out docs/benchmarks/adapters-data

Writes records.jsonl (one line per variant) and prints a table. Measures, never asserts.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from memstack.config import from_dict
from memstack.evals.bench import environment
from memstack.evals.lm import LMTaskConfig
from memstack.train.run import evaluate_checkpoint, run_config_from_dict, run_training

TEXT = ("The following is an excerpt from a State of the Union address, delivered by the President of the "
        "United States to Congress.")
# (memories, memory_init_text): a random start for the paper's MLP-reparameterised prefix, and the
# text starts of adapter_init.py (step 0 of those = the frozen model with TEXT as a hard prompt)
VARIANTS = {
    "prefix16-text": ([{"kind": "prefix", "n_prefix": 16, "reparam": False}], TEXT),
    "memory_tokens16-text": ([{"kind": "memory_tokens", "n_tokens": 16}], TEXT),
    "prefix16-mlp-random": ([{"kind": "prefix", "n_prefix": 16, "reparam": True, "reparam_hidden": 512}], None),
}


def task(split: str, tokens: int) -> LMTaskConfig:
    return LMTaskConfig(corpus="sotu", tokenizer="smollm2", eval_split=split, eval_tokens=tokens, eval_rows=4)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--work", default="runs/smollm2")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seg-len", type=int, default=64)
    ap.add_argument("--lrs", default="0.003,0.01")
    ap.add_argument("--only", help="comma-separated: frozen and/or variant names")
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--device", default="cpu", help="cpu (one thread) or cuda")
    args = ap.parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(1)
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    pick = set(args.only.split(",")) if args.only else {"frozen", "text-prompt", *VARIANTS}
    env = environment(torch.device(args.device))
    base = {"pretrained": "smollm2", "model": {"seg_len": args.seg_len}, "device": args.device,
            "task": {"kind": "lm", "corpus": "sotu", "tokenizer": "smollm2", "eval_split": "val",
                     "eval_tokens": args.eval_tokens, "eval_rows": 4}}
    rows = []
    date = time.strftime("%Y-%m-%d %H:%M:%S")

    def done(r: dict) -> None:  # each row is written as soon as it is measured: a run stopped later keeps it
        rows.append(r)
        with open(out / "smollm2_prefix-records.jsonl", "a") as f:
            f.write(json.dumps({**r, "steps": args.steps, "batch": args.batch, "seg_len": args.seg_len,
                                "eval_tokens": args.eval_tokens, "env": env, "date": date,
                                "command": " ".join(["python", *sys.argv])}) + "\n")

    if "frozen" in pick:
        from memstack.hf.pretrained import load_pretrained
        from memstack.evals.task import build_task

        model = load_pretrained("smollm2", (), seg_len=args.seg_len).to(args.device).eval()
        res = {s: build_task(task(s, args.eval_tokens), args.seg_len).evaluate(model)["bpb"] for s in ("val", "test")}
        done({"variant": "frozen SmolLM2", "val_bpb": res["val"], "test_bpb": res["test"], "trained_params": 0})
    if "text-prompt" in pick:  # the frozen model reading TEXT before every segment (a hard prompt; no training)
        from memstack.adapter_init import init_prefix_from_text
        from memstack.config import MemoryConfig
        from memstack.evals.task import build_task
        from memstack.hf.pretrained import load_pretrained

        t = build_task(task("val", args.eval_tokens), args.seg_len)
        mem = from_dict(MemoryConfig, VARIANTS["prefix16-text"][0][0], what="memory")
        model = load_pretrained("smollm2", (mem,), seg_len=args.seg_len).to(args.device).eval()
        init_prefix_from_text(model, t.tokenizer.encode(TEXT))
        res = {s: build_task(task(s, args.eval_tokens), args.seg_len).evaluate(model)["bpb"] for s in ("val", "test")}
        done({"variant": "frozen SmolLM2 + the text as a prompt (16 tokens)", "val_bpb": res["val"],
                     "test_bpb": res["test"], "trained_params": 0})
    for name, (mems, text) in VARIANTS.items():
        if name not in pick:
            continue
        runs = []
        for lr in (float(x) for x in args.lrs.split(",")):
            run_dir = work / f"{name}-lr{lr:g}"
            train = {"trainable": "memory", "lr": lr, "max_steps": args.steps, "warmup_steps": max(1, args.steps // 10),
                     "batch_size": args.batch, "n_segments": 1, "log_every": 10, "weight_decay": 0.0, "progress": False}
            cfg = run_config_from_dict({**base, "memories": mems, "train": train, "out_dir": str(run_dir),
                                        "memory_init_text": text})
            t0 = time.perf_counter()
            rec = run_training(cfg, progress=False)
            wall = time.perf_counter() - t0
            adapter = Path(rec["adapter"])
            test = evaluate_checkpoint(adapter, task("test", args.eval_tokens), device=args.device)["bpb"]
            n_adapter = sum(p.stat().st_size for p in adapter.iterdir())
            runs.append({"lr": lr, "val_bpb": rec["eval"]["bpb"], "test_bpb": test, "train_s": wall,
                         "final_train_loss": rec["loss"], "adapter_bytes": n_adapter, "adapter": str(adapter),
                         "params": rec["params"]})
            print(f"{name} lr={lr}: val {rec['eval']['bpb']:.4f} test {test:.4f} ({wall:.0f} s)", flush=True)
        best = min(runs, key=lambda r: r["val_bpb"])
        from safetensors.torch import load_file

        from memstack.adapters import read_adapter

        weights = load_file(str(Path(best["adapter"]) / read_adapter(best["adapter"])["weights"]))
        done({"variant": name, "memories": mems, "memory_init_text": text, "runs": runs, "chosen_lr": best["lr"], "val_bpb": best["val_bpb"],
                     "test_bpb": best["test_bpb"], "adapter_bytes": best["adapter_bytes"],
                     "trained_params": sum(t.numel() for t in weights.values())})
    print("| variant | lr (chosen on val) | val bpb | test bpb | trained params | adapter bytes |")
    for r in rows:
        print(f"| {r['variant']} | {r.get('chosen_lr', '-')} | {r['val_bpb']:.4f} | {r['test_bpb']:.4f} | "
              f"{r['trained_params']:,} | {r.get('adapter_bytes', 0):,} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
