"""Perceiver IO output queries on a task that needs a structured output: record extraction.

A 24-token segment lists 8 "field value" pairs in random order among 8 noise tokens
(memstack/data/synthetic/records.py); the `latents` memory (16 latents) reads the segment; then a
decoder outputs the value of all 8 fields at once from the latents alone. Decoders compared, each
trained end to end with the backbone and the latents (cross-entropy on the 8 values, chance 1/16):

- queries   Perceiver IO (memory/learned/perceiver_io.py): one query per field -- the field's
            token embedding -- cross-attends to the latents; the backbone's LM head reads it out.
- pooled    the mean of the latents through a linear map to 8 x d_model, same LM head.
- flat      the flattened latents (16 x d_model) through a linear map to 8 x d_model, same head.
- lm        a second segment of the 8 field ids through the whole backbone, which reads the
            latents as extra keys/values (the `latents` memory's own read): the value of field i
            is predicted at its position.

Learning rate chosen on validation records, accuracy reported on test records; also reported:
accuracy when every test example asks for its fields in a random order (the queries and lm
decoders take the fields as input; pooled and flat emit a fixed order and cannot be asked), and
the decoder's time per batch from the latents (median of interleaved repetitions, same run).

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/learned/perceiver_io.py --out docs/benchmarks/perceiver-io-data

Measures, never asserts.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from memstack.backbone import build_model
from memstack.backbone.layers import RMSNorm
from memstack.config import BackboneConfig, ModelConfig
from memstack.data.synthetic.records import records, records_vocab
from memstack.evals.bench import environment
from memstack.memory.base import Step
from memstack.memory.learned.config import LatentConfig
from memstack.memory.learned.perceiver_io import OutputQueries

DECODERS = ("queries", "pooled", "flat", "lm")


class Extractor(nn.Module):
    def __init__(self, decoder: str, b: BackboneConfig, n_latents: int, n_fields: int):
        super().__init__()
        self.kind, self.F = decoder, n_fields
        self.model = build_model(ModelConfig(b, (LatentConfig(n_latents=n_latents, n_heads=4),)))
        D = b.d_model
        if decoder == "queries":
            self.dec = OutputQueries(D, 4, b.ff_dim)
        elif decoder == "pooled":
            self.dec = nn.Sequential(nn.Linear(D, n_fields * D), nn.Unflatten(-1, (n_fields, D)), RMSNorm(D, 1e-5))
        elif decoder == "flat":
            self.dec = nn.Sequential(nn.Flatten(1), nn.Linear(n_latents * D, n_fields * D),
                                     nn.Unflatten(-1, (n_fields, D)), RMSNorm(D, 1e-5))
        elif decoder != "lm":
            raise ValueError(decoder)

    def encode(self, x: torch.Tensor):
        _, state = self.model(x, None, Step())              # one whole segment: the latents are written at its end
        return state

    def decode(self, state, queries: torch.Tensor) -> torch.Tensor:
        """logits (B, O, V) of the values of the fields `queries` (B, O)."""
        z = state.memories[0].z                             # (B, N, D)
        if self.kind == "queries":
            return self.model.lm_head(self.dec(z, self.model.tok_emb(queries)))
        if self.kind == "pooled":
            return self.model.lm_head(self.dec(z.mean(1)))
        if self.kind == "flat":
            return self.model.lm_head(self.dec(z))
        out, _ = self.model(queries, state, Step())         # the fields as a segment reading the latents
        return out.logits

    def dec_params(self) -> int:
        return sum(p.numel() for p in self.dec.parameters()) if self.kind != "lm" else 0


def batch(n: int, seed, args) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r = records(n, n_fields=args.fields, n_values=args.values, n_noise=args.noise, seed=seed)
    return torch.from_numpy(r.inputs), torch.from_numpy(r.targets), torch.from_numpy(r.queries)


@torch.no_grad()
def accuracy(m: Extractor, data, shuffle: bool = False) -> tuple[float, float]:
    x, y, q = data
    if shuffle:                                              # every example asks its fields in its own order
        g = torch.Generator().manual_seed(123)
        perm = torch.stack([torch.randperm(q.shape[1], generator=g) for _ in range(q.shape[0])])
        q, y = q.gather(1, perm), y.gather(1, perm)
    m.eval()
    pred = torch.cat([m.decode(m.encode(x[i:i + 250]), q[i:i + 250]).argmax(-1) for i in range(0, len(x), 250)])
    m.train()
    ok = pred == y
    return float(ok.float().mean()), float(ok.all(1).float().mean())


def train_one(kind: str, lr: float, args, b: BackboneConfig, val, test) -> dict:
    torch.manual_seed(args.seed)
    m = Extractor(kind, b, args.latents, args.fields)
    opt = torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=0.0)
    curve, t0 = [], time.perf_counter()
    for step in range(args.steps):
        x, y, q = batch(args.batch, (args.seed, 1, step), args)
        logits = m.decode(m.encode(x), q)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / 50) * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * step / args.steps)))
        opt.step()
        if (step + 1) % max(1, args.steps // 10) == 0:
            curve.append({"step": step + 1, "loss": float(loss),
                          "val_acc_200": accuracy(m, tuple(t[:200] for t in val))[0]})
    train_s = time.perf_counter() - t0
    v_acc, v_exact = accuracy(m, val)
    t_acc, t_exact = accuracy(m, test)
    s_acc = accuracy(m, test, shuffle=True)[0] if kind in ("queries", "lm") else None
    return {"decoder": kind, "lr": lr, "val_acc": v_acc, "val_exact": v_exact, "test_acc": t_acc, "test_exact": t_exact,
            "test_acc_shuffled_fields": s_acc, "train_s": train_s, "decoder_params": m.dec_params(),
            "params": sum(p.numel() for p in m.parameters()), "curve": curve, "model": m}


def decode_time(models: dict, data, reps: int) -> dict:
    x, _, q = data
    x, q = x[:64], q[:64]
    times = {k: [] for k in models}
    with torch.no_grad():
        states = {k: m.encode(x) for k, m in models.items()}
        for _ in range(reps):
            for k, m in models.items():
                t = time.perf_counter()
                m.decode(states[k], q)
                times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lrs", default="0.001,0.003")
    ap.add_argument("--fields", type=int, default=8)
    ap.add_argument("--values", type=int, default=16)
    ap.add_argument("--noise", type=int, default=8)
    ap.add_argument("--latents", type=int, default=16)
    ap.add_argument("--decoders", default=",".join(DECODERS))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    L = 2 * args.fields + args.noise
    b = BackboneConfig(vocab_size=records_vocab(args.fields, args.values, 16), d_model=64, n_layers=2, n_heads=4,
                       n_kv_heads=2, seg_len=L)
    val, test = batch(1000, (args.seed, 2), args), batch(1000, (args.seed, 3), args)
    rows, best_models = [], {}
    for kind in args.decoders.split(","):
        runs = [train_one(kind, float(lr), args, b, val, test) for lr in args.lrs.split(",")]
        best = max(runs, key=lambda r: r["val_acc"])
        best_models[kind] = best.pop("model")
        for r in runs:
            r.pop("model", None)
        rows.append({**best, "runs": [{k: v for k, v in r.items() if k != "curve"} for r in runs]})
        print(f"{kind:8s} lr={best['lr']} val {best['val_acc']:.3f} test {best['test_acc']:.3f} "
              f"exact {best['test_exact']:.3f} shuffled {best['test_acc_shuffled_fields']}", flush=True)
    times = decode_time(best_models, test, reps=20)
    for r in rows:
        r["decode_ms_per_64"] = times[r["decoder"]] * 1e3
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rec = {"benchmark": "perceiver_io_records", "date": time.strftime("%Y-%m-%d %H:%M:%S"),
           "env": environment(torch.device("cpu")), "config": vars(args), "backbone": b.__dict__,
           "command": " ".join(["python", *sys.argv]), "results": rows}
    path = out / f"records-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(rec, indent=1))
    print("| decoder | lr (val) | decoder params | test field acc | test record exact | fields in random order | "
          "decode ms / 64 records |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        s = "-" if r["test_acc_shuffled_fields"] is None else f"{r['test_acc_shuffled_fields']:.3f}"
        print(f"| {r['decoder']} | {r['lr']} | {r['decoder_params']:,} | {r['test_acc']:.3f} | {r['test_exact']:.3f} | "
              f"{s} | {r['decode_ms_per_64']:.2f} |")
    print(f"record: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
