"""Accuracy vs compression ratio of the learned KV press against the heuristic presses (StreamingLLM,
H2O, SnapKV), at equal ratios, on the frozen SmolLM2-135M: passkey and a RULER-style multi-key needle.

    python -m memstack.train.kv_scorer --pretrained smollm2 --out runs/kv-scorer/smollm2.safetensors
    python benchmarks/runtime/press_accuracy.py --scorer runs/kv-scorer/smollm2.safetensors

The model reads each example segment by segment (`--seg-len`) with its cache swapped for `kv_paged`
compressing at every segment end to keep_ratio of the tokens seen (the question arrives last, so
every press is query-agnostic); whole blocks are freed. Every press keeps the `--recent` newest
tokens; StreamingLLM also 4 sinks; the learned press and H2O/SnapKV get no forced sinks (each must
find them). Filler: Moby Dick (the scorer was fitted on Austen, its lambda chosen on State of the
Union addresses). Exact match of the answer, teacher-forced (= greedy decoding).

Choices on validation: with several `--scorer` files and `--learned-sinks` values, each pair is
scored on the passkey task's validation split (other keys and filler offsets than the test grid) at
`--select-ratios`; the best mean exact match (ties: the first listed) is the learned press of the
test curves. The heuristic presses have no free choice here (their windows are fixed above).

`--engine-check N` also serves N passkey prompts through the engine with the learned press on its
shared pool (`add_request(..., compression=...)`), decoding greedily, and reports how many answers
agree with the kv_paged evaluation above and the blocks the press freed.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from common import device_info, table, write_record
from compression_accuracy import swapped

RATIOS = (0.25, 0.5, 0.75, 0.875)
POLICIES = ("streaming", "h2o", "snapkv", "learned")


def tasks(args, tokenizer_name: str, seg_len: int):
    from memstack.evals.longctx import LongContextTaskConfig, LongContextTask
    from memstack.evals.passkey import PasskeyTask, PasskeyTaskConfig

    pk = PasskeyTask(PasskeyTaskConfig(tokenizer=tokenizer_name, lengths=(args.length,),
                                       depths=tuple(float(d) for d in args.depths.split(",")),
                                       per_cell=args.per_cell), seg_len)
    yield "passkey", pk, lambda m: pk.evaluate(m)["exact"]
    if args.ruler_examples:
        cfg = LongContextTaskConfig(variant="niah_multikey", n_facts=args.n_facts, tokenizer=tokenizer_name,
                                    lengths=(args.length,), examples=(args.ruler_examples,), progress=False)
        nk = LongContextTask(cfg, seg_len)
        yield f"niah_multikey ({args.n_facts} key{'s' if args.n_facts > 1 else ''})", nk, \
            lambda m: nk.evaluate_length(m, args.length, args.ruler_examples)[f"exact@{args.length}"]


def engine_check(model, task, comp, n: int, kv_paged_model, bs: int) -> dict:
    """Greedy answers of n passkey prompts through the engine's learned press vs kv_paged's."""
    from memstack.engine import Engine, EngineConfig
    from memstack.evals.task import example_predictions
    from memstack.generate import SamplingConfig

    x = np.concatenate([c.batch.inputs for c in task.grid])[:n]
    y = np.concatenate([c.batch.labels for c in task.grid])[:n]
    correct, mask = example_predictions(kv_paged_model, x, y, task.seg_len)
    paged_ok = (correct | ~mask).all(1)
    eng = Engine(model, EngineConfig(block_size=bs, num_blocks=4096, max_num_batched_tokens=4096))
    agree, eng_ok, freed = 0, 0, []
    for i in range(n):
        pos = np.nonzero(y[i] != -100)[0]
        prompt, answer = x[i, :pos[0] + 1].tolist(), y[i, pos].tolist()
        rid = eng.add_request(prompt, SamplingConfig(max_new_tokens=len(answer)), compression=comp)
        uncompressed = -(-(len(prompt) + len(answer)) // bs)
        peak = 0
        while eng.has_unfinished():
            eng.step()
            s = eng.requests[rid].seq
            if s is not None:
                peak = max(peak, len(s.blocks))
        out = eng.requests.pop(rid).output
        ok = out == answer
        eng_ok += ok
        agree += ok == bool(paged_ok[i])
        freed.append(1 - peak / uncompressed)
    return {"engine_exact": eng_ok / n, "kv_paged_exact": float(paged_ok.mean()), "agree": agree / n,
            "peak_blocks_saved": float(np.mean(freed))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scorer", required=True, help="the learned press's scorer file(s), comma-separated")
    ap.add_argument("--learned-sinks", default="0", help="forced sink tokens of the learned press to choose from")
    ap.add_argument("--select-ratios", default="0.5,0.75", help="ratios of the validation choice")
    ap.add_argument("--pretrained", default="smollm2")
    ap.add_argument("--length", type=int, default=384)
    ap.add_argument("--depths", default="0.25,0.5,0.75")
    ap.add_argument("--per-cell", type=int, default=4, help="passkey examples per depth")
    ap.add_argument("--ruler-examples", type=int, default=12, help="multi-key needle examples (0: skip)")
    ap.add_argument("--n-facts", type=int, default=1)
    ap.add_argument("--ruler-ratios", default="0.5,0.75", help="ratios for the multi-key needle (each costs minutes)")
    ap.add_argument("--ratios", default=",".join(map(str, RATIOS)))
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--seg-len", type=int, default=64)
    ap.add_argument("--block-size", type=int, default=4)
    ap.add_argument("--recent", type=int, default=8)
    ap.add_argument("--engine-check", type=int, default=0, help="passkey prompts served through the engine's press")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--plot", default="docs/benchmarks/img/runtime-learned-press.png")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from memstack.hf.pretrained import PRETRAINED, load_pretrained
    from memstack.memory.kv.config import CompressionConfig, DenseKVConfig, PagedKVConfig

    model = load_pretrained(args.pretrained, [DenseKVConfig(scope="document")], seg_len=args.seg_len).eval()
    ratios = [float(r) for r in args.ratios.split(",")]

    scorers, sink_opts = args.scorer.split(","), [int(x) for x in args.learned_sinks.split(",")]
    chosen = {"scorer": scorers[0], "sinks": sink_opts[0]}

    def comp(policy: str, r: float) -> CompressionConfig:
        return CompressionConfig(policy=policy, keep_ratio=1 - r, recent=args.recent,
                                 sink_tokens=4 if policy == "streaming" else chosen["sinks"] if policy == "learned" else 0,
                                 scorer=chosen["scorer"] if policy == "learned" else "")

    rows = []
    if len(scorers) * len(sink_opts) > 1:                      # the learned press's choices, on validation
        _, pk, _ = next(tasks(args, PRETRAINED[args.pretrained].tokenizer, args.seg_len))
        best = None
        for sc in scorers:
            for sk in sink_opts:
                chosen.update(scorer=sc, sinks=sk)
                vals = [pk.evaluate(swapped(model, PagedKVConfig(block_size=args.block_size,
                                                                 compression=comp("learned", float(r)))), "val")["exact"]
                        for r in args.select_ratios.split(",")]
                rows.append({"task": "passkey (validation)", "policy": f"learned {Path(sc).name} sinks={sk}",
                             "ratios": args.select_ratios, "val_exact": vals, "mean": float(np.mean(vals))})
                print(rows[-1], flush=True)
                if best is None or rows[-1]["mean"] > best[0]:
                    best = (rows[-1]["mean"], sc, sk)
        chosen.update(scorer=best[1], sinks=best[2])
        print(f"chosen on validation: {chosen}", flush=True)
    rows.append({"task": "choice", "policy": "learned", "chosen": dict(chosen)})
    for name, task, score in tasks(args, PRETRAINED[args.pretrained].tokenizer, args.seg_len):
        t0 = time.perf_counter()
        base = score(model)
        rows.append({"task": name, "policy": "none", "ratio": 0.0, "score": base, "s": time.perf_counter() - t0})
        print(rows[-1], flush=True)
        for policy in args.policies.split(","):
            for r in (ratios if name == "passkey" else [float(x) for x in args.ruler_ratios.split(",")]):
                t0 = time.perf_counter()
                m = swapped(model, PagedKVConfig(block_size=args.block_size, compression=comp(policy, r)))
                rows.append({"task": name, "policy": policy, "ratio": r, "score": score(m),
                             "s": time.perf_counter() - t0})
                print(rows[-1], flush=True)
        if args.engine_check and name == "passkey":
            for r in (0.5, 0.75):
                c = comp("learned", r)
                m = swapped(model, PagedKVConfig(block_size=args.block_size, compression=c))
                res = {"task": name, "policy": "learned (engine check)", "ratio": r,
                       **engine_check(model, task, c, args.engine_check, m, args.block_size)}
                rows.append(res)
                print(res, flush=True)
    path = write_record("press_accuracy", vars(args), rows, "cpu")
    _plot(rows, Path(args.plot), args)
    print(f"device: {device_info('cpu')}")
    print(table([r for r in rows if "score" in r], ["task", "policy", "ratio", "score", "s"]))
    print(f"record: {path}; plot: {args.plot}")


def _plot(rows: list[dict], out: Path, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["task"] for r in rows if "score" in r))
    fig, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 4), squeeze=False)
    for ax, t in zip(axes[0], names):
        rs = [r for r in rows if r["task"] == t and "score" in r]
        base = next(r["score"] for r in rs if r["policy"] == "none")
        for policy in args.policies.split(","):
            pts = sorted((r["ratio"], r["score"]) for r in rs if r["policy"] == policy)
            ax.plot([0.0] + [p[0] for p in pts], [base] + [p[1] for p in pts], marker="o", label=policy,
                    lw=2.5 if policy == "learned" else 1.2)
        ax.set_title(f"{t}, {args.length} tokens, SmolLM2-135M (frozen)", fontsize=9)
        ax.set_xlabel("compression ratio (share of KV removed)")
        ax.set_ylabel("exact match")
        ax.set_ylim(-0.02, 1.06)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower left", fontsize=8)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main()
