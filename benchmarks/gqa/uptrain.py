"""Claim check: an MHA checkpoint converted to GQA / MQA by mean-pooling its K/V heads and
uptrained for ~5% of its pre-training steps gets close to the MHA model's quality (Ainslie et
al., arXiv 2305.13245), and mean pooling beats keeping the first head or a random start.

    .venv/bin/memstack train --config gqa_base --out runs/gqa/mha            # the MHA model (600 steps)
    .venv/bin/python benchmarks/gqa/uptrain.py --base runs/gqa/mha --out docs/benchmarks/gqa-data

For every variant (MHA itself, GQA-4 / GQA-2 / MQA by mean pooling, MQA by first head / random
init) and every uptraining proportion alpha (0, 5%, 10% of the base run's steps), each learning
rate of the sweep is run from the converted checkpoint with the base run's recipe (batch, segments,
cosine schedule, weight decay; warm-up 10% of the uptraining steps), the learning rate is chosen on
the SOTU validation split, and bits per byte are reported on the test split. MHA "uptrained" the
same steps is the control: it says how much of a gain is the extra training alone.
Writes one JSON record per run (records.jsonl) and summary.md. Measures, never asserts.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from memstack.backbone.gqa import convert_kv_heads, kv_bytes_per_token
from memstack.checkpoint import save_checkpoint
from memstack.config import from_dict
from memstack.evals.bench import environment
from memstack.evals.lm import LMTaskConfig
from memstack.evals.task import build_task
from memstack.train.config import TrainConfig
from memstack.train.run import RunConfig, latest_checkpoint, load_for_inference, run_training

VARIANTS = [("mha", None, "mean"), ("gqa4-mean", 4, "mean"), ("gqa2-mean", 2, "mean"), ("mqa-mean", 1, "mean"),
            ("mqa-first", 1, "first"), ("mqa-random", 1, "random")]


def evaluate(model, split: str, eval_tokens: int) -> float:
    task = build_task(LMTaskConfig(corpus="sotu", tokenizer="bpe512", eval_split=split, eval_tokens=eval_tokens),
                      model.cfg.backbone.seg_len)
    model.eval()
    with torch.no_grad():
        return task.evaluate(model)["bpb"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="the MHA training run (out_dir) or checkpoint")
    ap.add_argument("--out", required=True, help="where records.jsonl and summary.md go")
    ap.add_argument("--work", default="runs/gqa", help="converted and uptrained checkpoints")
    ap.add_argument("--alphas", default="0,0.05,0.1", help="uptraining steps as fractions of the base run's")
    ap.add_argument("--lrs", default="0.001,0.003")
    ap.add_argument("--only", help="comma-separated variant names (default: all)")
    ap.add_argument("--eval-tokens", type=int, default=50_000)
    ap.add_argument("--seed", type=int, default=1, help="data order of the uptraining (the base run used 0)")
    ap.add_argument("--summarize", nargs="+", metavar="RECORDS", help="only write OUT/summary.md from these "
                    "records files (runs of several invocations, e.g. one per learning rate), choosing on validation")
    args = ap.parse_args(argv)
    if args.summarize:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        write_summary([Path(p) for p in args.summarize], Path(args.out) / "summary.md")
        return 0
    torch.set_num_threads(1)

    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    base_dir = latest_checkpoint(args.base)
    base, meta, _ = load_for_inference(base_dir, "cpu")
    base_train = from_dict(TrainConfig, meta["train"], what="the base run's train config")
    b = base.cfg.backbone
    env = environment(torch.device("cpu"))
    pick = set(args.only.split(",")) if args.only else None
    records = out / "records.jsonl"
    for name, g, method in VARIANTS:
        if pick and name not in pick:
            continue
        conv = base if g is None else convert_kv_heads(base, g, method, seed=args.seed)
        conv_dir = work / f"conv-{name}"
        save_checkpoint(conv, conv_dir, meta={k: meta[k] for k in ("task", "tokenizer", "tokenizer_fingerprint") if k in meta})
        for alpha in (float(a) for a in args.alphas.split(",")):
            steps = round(alpha * base_train.max_steps)
            runs = []
            if steps == 0:
                runs.append({"lr": None, "val_bpb": evaluate(conv, "val", args.eval_tokens),
                             "test_bpb": evaluate(conv, "test", args.eval_tokens), "train_s": 0.0})
            for lr in ([] if steps == 0 else [float(x) for x in args.lrs.split(",")]):
                tcfg = replace(base_train, lr=lr, max_steps=steps, warmup_steps=max(1, steps // 10), seed=args.seed,
                               log_every=max(1, steps // 5), ckpt_every=0, eval_every=0, progress=False)
                run_dir = work / f"up-{name}-a{alpha:g}-lr{lr:g}"
                cfg = RunConfig(model=conv.cfg.backbone, memories=(), task=LMTaskConfig(
                    corpus="sotu", tokenizer="bpe512", eval_split="val", eval_tokens=args.eval_tokens),
                    train=tcfg, device="cpu", out_dir=str(run_dir), init_from=str(conv_dir))
                t0 = time.perf_counter()
                rec = run_training(cfg, progress=False)
                train_s = time.perf_counter() - t0
                model, _, _ = load_for_inference(run_dir, "cpu")
                runs.append({"lr": lr, "val_bpb": rec["eval"]["bpb"], "test_bpb": evaluate(model, "test", args.eval_tokens),
                             "train_s": train_s, "final_train_loss": rec["loss"]})
            best = min(runs, key=lambda r: r["val_bpb"])
            cb = conv.cfg.backbone
            row = {"variant": name, "kv_heads": cb.kv_heads, "method": method if g is not None else "-", "alpha": alpha,
                   "uptrain_steps": steps, "uptrain_tokens": steps * base_train.batch_size * base_train.n_segments * b.seg_len,
                   "base_steps": base_train.max_steps, "kv_bytes_per_token": kv_bytes_per_token(cb),
                   "params": conv.num_params(), "runs": runs, "chosen_lr": best["lr"], "val_bpb": best["val_bpb"],
                   "test_bpb": best["test_bpb"], "base": str(base_dir), "backbone": asdict(cb),
                   "eval_tokens": args.eval_tokens, "env": env, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                   "command": " ".join([sys.executable.rsplit("/", 1)[-1], *sys.argv])}
            with open(records, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"{name:12s} alpha={alpha:<5g} lr={best['lr']} val {best['val_bpb']:.4f} test {best['test_bpb']:.4f}",
                  flush=True)
    write_summary(records, out / "summary.md")
    return 0


def write_summary(records: Path | list[Path], path: Path) -> None:
    """summary.md over one or more records files (e.g. one per learning rate): for each (variant,
    alpha) the run with the lowest validation bits per byte is reported (its test figure)."""
    files = records if isinstance(records, list) else [records]
    rows = [json.loads(x) for f in files for x in Path(f).read_text().splitlines()]
    latest = {}
    for r in rows:                           # per (variant, alpha): the lowest validation bpb wins
        key = (r["variant"], r["alpha"])
        if key not in latest or r["val_bpb"] < latest[key]["val_bpb"]:
            latest[key] = r
    alphas = sorted({a for _, a in latest})
    names = [v for v, _, _ in VARIANTS if any(k[0] == v for k in latest)]
    mha = {a: latest[("mha", a)]["test_bpb"] for a in alphas if ("mha", a) in latest}
    head = "| variant | KV heads | KV bytes/token | " + " | ".join(f"test bpb, alpha={a:g} (lr)" for a in alphas) + " |"
    lines = [head, "|" + "---|" * (3 + len(alphas))]
    for n in names:
        cells = []
        for a in alphas:
            r = latest.get((n, a))
            if r is None:
                cells.append("-")
                continue
            gap = f", {r['test_bpb'] - mha[a]:+.3f} vs MHA" if a in mha and n != "mha" else ""
            cells.append(f"{r['test_bpb']:.4f} (val {r['val_bpb']:.4f}; lr {r['chosen_lr'] if r['chosen_lr'] is not None else '-'}{gap})")
        r0 = next(latest[(n, a)] for a in alphas if (n, a) in latest)
        lines.append(f"| {n} | {r0['kv_heads']} | {r0['kv_bytes_per_token']:,} | " + " | ".join(cells) + " |")
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
