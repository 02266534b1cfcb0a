"""Inference memory vs context length: Trellis's state is flat, a KV cache's grows.

Streams one long document (SOTU test split, concatenated, bpe512 ids) through a randomly
initialised backbone in segments, with no gradient, and records after each length: the memory's
logical state bytes (MemorySpec / held_bytes), the bytes actually allocated behind the state
(distinct storages), and the decode throughput of the last stretch. Peers in the same run:
kv_dense with no window (full context) and kv_dense with a window holding the same bytes as the
Trellis slots. Measures, never asserts.

    .venv/bin/python benchmarks/trellis/memory.py --out reports/trellis_memory
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from memstack.backbone.model import build_model
from memstack.config import BackboneConfig, ModelConfig
from memstack.memory.kv.config import DenseKVConfig, TrellisConfig
from memstack.memory.state import allocated_nbytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="reports/trellis_memory")
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    ap.add_argument("--slots", type=int, default=64)
    ap.add_argument("--seg-len", type=int, default=128)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from memstack.data.corpora import sotu
    from memstack.data.tokenizers import get_tokenizer

    tok = get_tokenizer("bpe512")
    ids = np.concatenate([tok.encode(d.text) for d in sotu("test")])
    while len(ids) < max(args.lengths):
        ids = np.concatenate([ids, ids])
    ids = torch.as_tensor(ids[: max(args.lengths)], dtype=torch.long)[None]
    b = BackboneConfig(vocab_size=512, d_model=256, n_layers=4, n_heads=8, n_kv_heads=2, seg_len=args.seg_len)
    peers = {
        f"trellis slots={args.slots}": TrellisConfig(slots=args.slots),
        "kv_dense (unbounded)": DenseKVConfig(scope="document"),
        f"kv_dense window={args.slots}": DenseKVConfig(scope="document", window=args.slots),
    }
    recs = []
    for label, mem in peers.items():
        torch.manual_seed(0)
        model = build_model(ModelConfig(b, (mem,))).eval()
        m = model.memory.memories[0]
        st, done, t_last, n_last = None, 0, time.perf_counter(), 0
        with torch.no_grad():
            for L in sorted(args.lengths):
                while done < L:
                    _, st = model(ids[:, done:done + args.seg_len], st)
                    done += args.seg_len
                dt = time.perf_counter() - t_last
                r = {"memory": label, "tokens": L, "held_bytes": m.held_bytes(st.memories[0]),
                     "spec_bytes": m.spec().state_bytes(L), "allocated_bytes": allocated_nbytes(st.memories[0]),
                     "tok_per_s": (done - n_last) / dt}
                t_last, n_last = time.perf_counter(), done
                recs.append(r)
                print(json.dumps(r), flush=True)
    (out / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    lines = ["| memory | context tokens | state bytes (held) | allocated bytes | tok/s over the stretch |", "|---|---|---|---|---|"]
    lines += [f"| {r['memory']} | {r['tokens']:,} | {r['held_bytes']:,} | {r['allocated_bytes']:,} | {r['tok_per_s']:,.0f} |"
              for r in recs]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label in peers:
        rs = [r for r in recs if r["memory"] == label]
        ax.plot([r["tokens"] for r in rs], [r["allocated_bytes"] for r in rs], "o-", label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("bytes allocated for the memory state")
    ax.set_title(f"inference state vs context (d_model {b.d_model}, {b.n_layers} layers, {b.kv_heads} KV heads)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "state_vs_context.png", dpi=120)


if __name__ == "__main__":
    main()
