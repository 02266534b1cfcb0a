"""The converged system's knowledge table retrofitted on real text (issue 12, part 1).

An Engram table with the converged preset's geometry (configs/bench/converged_cpu.yaml: after block
27 of SmolLM2-135M-Instruct's 30, N-gram orders 2 and 3, 4 hash heads of 16) is trained on the
shipped Wikipedia extracts with the backbone frozen (`train.trainable: memory`: the table rows,
W_K / W_V, the gate and the short conv train; nothing of SmolLM2 does). Articles are split by a
hash of their title (90 / 5 / 5); the last `--reserve` articles are left out entirely, because the
converged suite reads its held-out text and canary from the end of the same file
(evals/personal_facts.py `heldout_texts`). The learning rate is chosen on the validation split and
test bits per byte are reported next to the frozen model's. The chosen run's adapter
(adapters.py: the memory only, bound to the backbone by fingerprint) is what
`knowledge: <adapter dir>` in a converged preset loads.

    OMP_NUM_THREADS=2 nice -n 5 .venv/bin/python benchmarks/converged/knowledge_retrofit.py \
        --out docs/benchmarks/converged --work runs/knowledge

Writes knowledge_retrofit-records.jsonl (one line per run, then a summary line). Needs
`memstack data fetch smollm2`. Measures; asserts nothing.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import torch

from memstack.evals.bench import environment
from memstack.evals.lm import LMTaskConfig
from memstack.train.run import evaluate_checkpoint, run_config_from_dict, run_training


def write_corpus(root: Path, reserve: int) -> dict:
    """train/ val/ test/ folders of one .txt per Wikipedia extract (by a hash of the title)."""
    from memstack.data.wiki import wiki_articles

    arts = list(wiki_articles())[:-reserve] if reserve else list(wiki_articles())
    counts = {"train": 0, "val": 0, "test": 0}
    for i, a in enumerate(arts):
        h = int(hashlib.sha256(a.title.encode()).hexdigest()[:8], 16) % 100
        split = "train" if h < 90 else "val" if h < 95 else "test"
        d = root / split
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{i:05d}.txt").write_text(a.extract, encoding="utf-8")
        counts[split] += 1
    return counts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder of the records file")
    ap.add_argument("--work", default="runs/knowledge", help="corpus folder and runs (adapters)")
    ap.add_argument("--rows-per-head", type=int, default=16381)
    ap.add_argument("--user-rows-per-head", type=int, default=257,
                    help="the preset's per-user rows (not trained here; part of the memory config an adapter must match)")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seg-len", type=int, default=128)
    ap.add_argument("--lrs", default="0.003,0.03")
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--reserve", type=int, default=200, help="last Wikipedia articles left out (the suite's held-out text)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    corpus = work / "wiki-corpus"
    counts = write_corpus(corpus, args.reserve)
    env = environment(torch.device(args.device))
    engram = {"kind": "engram", "layers": [27], "orders": [2, 3], "heads": 4, "head_dim": 16,
              "rows_per_head": args.rows_per_head, "user_rows_per_head": args.user_rows_per_head, "value_init_std": 0.1, "table_init_std": 1e-4,
              "tokenizer": "smollm2"}

    def task(split: str) -> LMTaskConfig:
        return LMTaskConfig(corpus=str(corpus), tokenizer="smollm2", eval_split=split, eval_tokens=args.eval_tokens,
                            eval_rows=4)

    base = {"pretrained": "smollm2", "model": {"seg_len": args.seg_len}, "device": args.device,
            "task": {"kind": "lm", "corpus": str(corpus), "tokenizer": "smollm2", "eval_split": "val",
                     "eval_tokens": args.eval_tokens, "eval_rows": 4}}
    date = time.strftime("%Y-%m-%d %H:%M:%S")
    common = {"steps": args.steps, "batch": args.batch, "seg_len": args.seg_len, "eval_tokens": args.eval_tokens,
              "corpus_docs": counts, "reserve": args.reserve, "memory": engram, "env": env, "date": date,
              "command": " ".join(["python", *sys.argv])}
    recs = out / "knowledge_retrofit-records.jsonl"

    def write(r: dict) -> None:
        with open(recs, "a") as f:
            f.write(json.dumps({**r, **common}) + "\n")

    from memstack.evals.task import build_task
    from memstack.hf.pretrained import load_pretrained

    model = load_pretrained("smollm2", (), seg_len=args.seg_len).to(args.device).eval()
    frozen = {s: build_task(task(s), args.seg_len).evaluate(model)["bpb"] for s in ("val", "test")}
    del model
    write({"run": "frozen", "val_bpb": frozen["val"], "test_bpb": frozen["test"]})
    print(f"frozen: val {frozen['val']:.4f} test {frozen['test']:.4f}", flush=True)
    runs = []
    for lr in (float(x) for x in args.lrs.split(",")):
        train = {"trainable": "memory", "lr": lr, "max_steps": args.steps, "warmup_steps": max(1, args.steps // 10),
                 "batch_size": args.batch, "n_segments": 1, "log_every": 10, "weight_decay": 0.0, "progress": False}
        cfg = run_config_from_dict({**base, "memories": [engram], "train": train, "out_dir": str(work / f"lr{lr:g}")})
        t0 = time.perf_counter()
        rec = run_training(cfg, progress=False)
        wall = time.perf_counter() - t0
        r = {"run": "retrofit", "lr": lr, "val_bpb": rec["eval"]["bpb"], "train_s": wall, "final_train_loss": rec["loss"],
             "adapter": rec["adapter"], "params": rec["params"]}
        runs.append(r)
        write(r)
        print(f"lr {lr}: val {r['val_bpb']:.4f} ({wall:.0f} s)", flush=True)
    best = min(runs, key=lambda r: r["val_bpb"])
    best["test_bpb"] = evaluate_checkpoint(Path(best["adapter"]), task("test"), device=args.device)["bpb"]
    adapter_bytes = sum(p.stat().st_size for p in Path(best["adapter"]).iterdir())
    summary = {"run": "summary", "chosen_lr": best["lr"], "frozen_test_bpb": frozen["test"],
               "retrofit_test_bpb": best["test_bpb"], "change": best["test_bpb"] / frozen["test"] - 1,
               "adapter": best["adapter"], "adapter_bytes": adapter_bytes}
    write(summary)
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
