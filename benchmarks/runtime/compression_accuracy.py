"""Accuracy vs KV compression ratio on passkey and MQAR, per policy, on models trained on our harness.

    memstack train --config configs/train/runtime_mqar.yaml --out runs/rt-mqar
    memstack train --config configs/train/runtime_passkey.yaml --out runs/rt-passkey
    python benchmarks/runtime/compression_accuracy.py --checkpoints runs/rt-mqar runs/rt-passkey
    python benchmarks/runtime/compression_accuracy.py --pretrained smollm2 --passkey-lengths 256 --per-cell 8

Each model was trained with full attention over the document (kv_dense, document scope). Its
cache is swapped for `kv_paged` with a compression policy (same weights) and the model is
evaluated on its own task: at every segment end the past is compressed to keep_ratio of the
tokens seen, whole blocks freed (StreamingLLM, H2O, SnapKV), or its old blocks quantized (KIVI
4/2-bit with a full-precision residual window). Compression ratio (kvpress' convention) = the
share of the KV removed: 0.25 / 0.5 / 0.75 / 0.875 for the token policies; for KIVI the measured
share of bytes removed. Writes the record and a PNG plot (accuracy vs ratio, one panel per task).

With --pretrained (a registered pretrained backbone, e.g. smollm2 = SmolLM2-135M, needs the `hf`
extra and `memstack data fetch smollm2`), the frozen pretrained model is evaluated zero-shot on
passkey retrieval in its own tokenizer (no training), segment by segment with the same policies.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from common import device_info, table, write_record

RATIOS = (0.25, 0.5, 0.75, 0.875)


def swapped(model, paged_cfg):
    from memstack.backbone.model import build_model
    from memstack.config import ModelConfig

    m = build_model(ModelConfig(model.cfg.backbone, (paged_cfg,))).eval()
    missing, unexpected = m.load_state_dict(model.state_dict(), strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return m


def held_ratio(model, paged_cfg, n_tokens: int) -> float:
    """Bytes a compressed cache holds after n_tokens, over the uncompressed kv_paged cache."""
    from memstack.memory.base import Step
    from memstack.memory.kv.config import PagedKVConfig

    seg = model.cfg.backbone.seg_len
    toks = torch.randint(0, model.cfg.backbone.vocab_size, (1, n_tokens))
    out = []
    for cfg in (paged_cfg, PagedKVConfig(block_size=paged_cfg.block_size)):
        m = swapped(model, cfg)
        state = None
        with torch.no_grad():
            for s in range(0, n_tokens, seg):
                _, state = m(toks[:, s:s + seg], state, Step())
        out.append(m.memory.memories[0].held_bytes(state.memories[0]))
    return out[0] / out[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoints", nargs="*", default=[], help="trained run directories (kv_dense models)")
    ap.add_argument("--pretrained", default=None, help="also: a pretrained backbone evaluated zero-shot on passkey")
    ap.add_argument("--passkey-lengths", default="256", help="--pretrained: comma-separated passkey lengths")
    ap.add_argument("--passkey-depths", default="0.1,0.5,0.9", help="--pretrained: comma-separated needle depths")
    ap.add_argument("--per-cell", type=int, default=8, help="--pretrained: examples per (length, depth) cell")
    ap.add_argument("--seg-len", type=int, default=64, help="--pretrained: segment length (compression at each end)")
    ap.add_argument("--block-size", type=int, default=4)
    ap.add_argument("--recent", type=int, default=8, help="recent / observation / residual window (tokens)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--plot", default="docs/benchmarks/img/runtime-compression.png")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from memstack.config import from_dict
    from memstack.evals.task import TaskConfig, build_task
    from memstack.memory.kv.config import CompressionConfig, PagedKVConfig
    from memstack.train.run import load_for_inference

    if not args.checkpoints and not args.pretrained:
        ap.error("give --checkpoints and/or --pretrained")

    def sources():
        for ck in args.checkpoints:
            model, meta, _ = load_for_inference(ck, "cpu")
            yield model, from_dict(TaskConfig, meta["task"], what="task"), Path(ck).name
        if args.pretrained:
            from memstack.evals.passkey import PasskeyTaskConfig
            from memstack.hf.pretrained import PRETRAINED, load_pretrained
            from memstack.memory.kv.config import DenseKVConfig

            model = load_pretrained(args.pretrained, [DenseKVConfig(scope="document")], seg_len=args.seg_len)
            task_cfg = PasskeyTaskConfig(tokenizer=PRETRAINED[args.pretrained].tokenizer,
                                         lengths=tuple(int(x) for x in args.passkey_lengths.split(",")),
                                         depths=tuple(float(x) for x in args.passkey_depths.split(",")),
                                         per_cell=args.per_cell)
            yield model, task_cfg, f"{args.pretrained} zero-shot"

    rows = []
    for model, task_cfg, name in sources():
        model.eval()
        task = build_task(task_cfg, model.cfg.backbone.seg_len)
        tag = f"{task_cfg.kind} ({name})"
        metric = task.primary
        base = task.evaluate(model)[metric]
        rows.append({"task": tag, "policy": "none (kv_dense)", "ratio": 0.0, metric: base, "score": base})
        paged = task.evaluate(swapped(model, PagedKVConfig(block_size=args.block_size)))[metric]
        rows.append({"task": tag, "policy": "none (kv_paged)", "ratio": 0.0, "score": paged})
        n_ctx = task_cfg.context_tokens()
        for policy in ("streaming", "h2o", "snapkv"):
            for r in RATIOS:
                c = CompressionConfig(policy=policy, keep_ratio=1 - r, recent=args.recent, sink_tokens=4)
                cfg = PagedKVConfig(block_size=args.block_size, compression=c)
                score = task.evaluate(swapped(model, cfg))[metric]
                rows.append({"task": tag, "policy": policy, "ratio": r, "score": score,
                             "bytes_kept": held_ratio(model, cfg, n_ctx)})
                print(rows[-1], flush=True)
        for bits in (4, 2):
            c = CompressionConfig(policy="kivi", bits=bits, recent=args.recent)
            cfg = PagedKVConfig(block_size=args.block_size, compression=c)
            kept = held_ratio(model, cfg, n_ctx)
            score = task.evaluate(swapped(model, cfg))[metric]
            rows.append({"task": tag, "policy": f"kivi-{bits}bit", "ratio": 1 - kept, "score": score,
                         "bytes_kept": kept})
            print(rows[-1], flush=True)
    path = write_record("compression_accuracy", vars(args), rows, "cpu")
    _plot(rows, Path(args.plot))
    print(f"device: {device_info('cpu')}")
    print(table(rows, ["task", "policy", "ratio", "score", "bytes_kept"]))
    print(f"record: {path}; plot: {args.plot}")


def _plot(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({r["task"] for r in rows})
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4), squeeze=False)
    for ax, t in zip(axes[0], tasks):
        rs = [r for r in rows if r["task"] == t]
        base = next(r["score"] for r in rs if r["policy"] == "none (kv_dense)")
        for policy in ("streaming", "h2o", "snapkv"):
            pts = sorted((r["ratio"], r["score"]) for r in rs if r["policy"] == policy)
            ax.plot([0.0] + [p[0] for p in pts], [base] + [p[1] for p in pts], marker="o", label=policy)
        kv = [(r["ratio"], r["score"], r["policy"]) for r in rs if r["policy"].startswith("kivi")]
        ax.scatter([k[0] for k in kv], [k[1] for k in kv], marker="*", s=120, color="k", label="kivi (4, 2 bit)", zorder=3)
        ax.set_title(t, fontsize=10)
        ax.set_xlabel("compression ratio (share of KV removed)")
        ax.set_ylabel("score")
        ax.set_ylim(-0.02, 1.06)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower left", fontsize=8)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main()
