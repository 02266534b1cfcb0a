"""RETRO-fitting the pretrained SmolLM2-135M (Borgeaud et al., arXiv 2112.04426, section 4): the
backbone stays frozen; chunked cross-attention layers and the neighbour encoder (which reads the
retrieving chunk's activations) are added and trained; chunk keys come from the frozen MiniLM.
Then the test-time retrieval ablation on the same weights: true neighbours, retrieval off
(RETRO[OFF]: the CCA layers add exactly zero, i.e. the frozen backbone) and random neighbours.

Data: State of the Union addresses (shipped corpus; split by year), SmolLM2's own tokenizer.
The datastore holds every 64-token chunk of the train split (key: MiniLM over the chunk's text,
value: the chunk + its continuation); same-document neighbours are excluded while training, as
in the paper. The learning rate is chosen on the validation split, bits per byte reported on
the test split. Optional control (`--random-control`): the same retrofit trained on random
neighbours (what the added layers gain without retrieval: domain adaptation through the CCA).

    nice -n 10 .venv/bin/python benchmarks/retrieval/retrofit.py --store /tmp/sotu-retro-minilm \\
        --out docs/benchmarks/retrieval/retrofit.json --device cuda --steps 300 --lrs 3e-4,1e-3

Measures, never asserts. Needs `memstack data fetch smollm2`.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from memstack.evals.bench import environment

CCA_LAYERS = (5, 8, 11, 14, 17, 20, 23, 26, 29)   # every 3rd layer from the 6th (the paper's smaller models / RETROfit)


def lm_task(split: str, tokens: int, seg_len: int, rows: int = 8):
    from memstack.evals.lm import LMTaskConfig
    from memstack.evals.task import build_task

    return build_task(LMTaskConfig(corpus="sotu", tokenizer="smollm2", eval_split=split, eval_tokens=tokens,
                                   eval_rows=rows), seg_len)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", required=True, help="the chunk datastore (built here when missing)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--work", default="runs/retrofit")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seg-len", type=int, default=512)
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--enc-layers", type=int, default=2)
    ap.add_argument("--layers", default=",".join(map(str, CCA_LAYERS)))
    ap.add_argument("--lrs", default="3e-4,1e-3")
    ap.add_argument("--eval-tokens", type=int, default=65536)
    ap.add_argument("--store-docs", type=int, default=0, help="only the first N train documents in the store (0: all)")
    ap.add_argument("--random-control", action="store_true")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from memstack.adapters import load_adapter
    from memstack.data.tokenizers import get_tokenizer
    from memstack.evals.lm import corpus_split
    from memstack.hf.pretrained import load_pretrained
    from memstack.memory.retrieval.config import RetroConfig
    from memstack.memory.retrieval.retro import build_retro_store
    from memstack.memory.retrieval.store import Datastore
    from memstack.train.run import run_config_from_dict, run_training

    dev = torch.device(args.device)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rec: dict = {"env": environment(dev), "args": vars(args), "command": " ".join(["python", *sys.argv]),
                 "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "timing": {}}

    def save():
        out.write_text(json.dumps(rec, indent=1))

    retro = RetroConfig(store=args.store, chunk=args.chunk, k=args.k, layers=tuple(int(x) for x in args.layers.split(",")),
                        enc_layers=args.enc_layers, enc_query=True, share_embedding=True, key="minilm", tokenizer="smollm2")
    tok = get_tokenizer("smollm2")
    t0 = time.perf_counter()
    if not (Path(args.store) / "manifest.json").is_file():
        docs = [tok.encode(t) for t in corpus_split("sotu", "train")]
        if args.store_docs:
            docs = docs[: args.store_docs]
        build_retro_store(docs, len(tok.token_bytes()), retro, tok.eot_id, out=args.store, device=dev)
    store = Datastore.open(args.store)
    rec["store"] = {"path": args.store, "chunks": len(store), "fingerprint": store.fingerprint,
                    "seconds": time.perf_counter() - t0}
    print(f"store: {len(store):,} chunks ({rec['store']['seconds']:.0f} s)", flush=True)
    tasks = {s: lm_task(s, args.eval_tokens, args.seg_len) for s in ("val", "test")}

    def evaluate(model) -> dict:
        model.eval()
        t = time.perf_counter()
        r = {s: tasks[s].evaluate(model) for s in ("val", "test")}
        rec["timing"].setdefault("eval_s", []).append(time.perf_counter() - t)
        return {f"{s}_{k}": v[k] for s, v in r.items() for k in ("bpb", "bpb_se", "ppl")}

    frozen = load_pretrained("smollm2", (), seg_len=args.seg_len).to(dev)
    rec["frozen"] = evaluate(frozen)
    print(f"frozen SmolLM2: {rec['frozen']}", flush=True)
    del frozen
    save()

    def train(lr: float, cfg: RetroConfig, tag: str) -> dict:
        train_cfg = {"trainable": "memory", "lr": lr, "max_steps": args.steps, "warmup_steps": max(1, args.steps // 10),
                     "batch_size": args.batch, "n_segments": 1, "log_every": 25, "weight_decay": 0.0, "progress": False}
        run = run_config_from_dict({"pretrained": "smollm2", "model": {"seg_len": args.seg_len}, "device": args.device,
                                    "memories": [{"kind": "retro", **{k: v for k, v in asdict(cfg).items()}}],
                                    "task": {"kind": "lm", "corpus": "sotu", "tokenizer": "smollm2", "eval_split": "val",
                                             "eval_tokens": args.eval_tokens, "eval_rows": 8},
                                    "train": train_cfg, "out_dir": str(Path(args.work) / f"{tag}-lr{lr:g}")})
        t = time.perf_counter()
        r = run_training(run, progress=False)
        secs = time.perf_counter() - t
        print(f"{tag} lr={lr:g}: val bpb {r['eval']['bpb']:.4f} ({secs:.0f} s, final loss {r['loss']:.3f})", flush=True)
        return {"lr": lr, "val_bpb": r["eval"]["bpb"], "train_s": secs, "adapter": r["adapter"], "final_loss": r["loss"],
                "params": r["params"], "tokens": args.steps * args.batch * args.seg_len}

    runs = [train(float(lr), retro, "retrofit") for lr in args.lrs.split(",")]
    best = min(runs, key=lambda r: r["val_bpb"])
    rec["runs"], rec["chosen_lr"] = runs, best["lr"]
    save()

    def with_adapter(trained: RetroConfig, cfg: RetroConfig, adapter: str):
        """The adapter (trained with `trained`) evaluated under the test-time switches of `cfg`
        (load_adapter refuses a config that differs, so the weights are copied across)."""
        model = load_pretrained("smollm2", (trained,), seg_len=args.seg_len).to(dev)
        load_adapter(model, adapter)
        if cfg == trained:
            return model
        other = load_pretrained("smollm2", (cfg,), seg_len=args.seg_len).to(dev)
        other.load_state_dict(model.state_dict())
        return other

    rec["ablation"] = {}
    for name, cfg in (("retrieval on", retro), ("retrieval off", replace(retro, retrieval=False)),
                      ("random neighbours", replace(retro, random_neighbours=True))):
        rec["ablation"][name] = evaluate(with_adapter(retro, cfg, best["adapter"]))
        print(f"{name}: {rec['ablation'][name]}", flush=True)
        save()
    if args.random_control:   # trained on random neighbours, evaluated on random and on true neighbours
        rnd = replace(retro, random_neighbours=True)
        ctl = train(best["lr"], rnd, "random-control")
        rec["random_control"] = {"run": ctl, "random neighbours": evaluate(with_adapter(rnd, rnd, ctl["adapter"])),
                                 "true neighbours": evaluate(with_adapter(rnd, retro, ctl["adapter"]))}
        print(f"random-trained control: {rec['random_control']}", flush=True)
        save()
    print(json.dumps({k: rec[k] for k in ("frozen", "ablation", "chosen_lr")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
