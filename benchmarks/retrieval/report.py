"""Turn the JSON records of benchmarks/retrieval/*.py into the tables of
docs/benchmarks/retrieval.md (prints markdown; the page adds the prose)."""
from __future__ import annotations

import json
import sys
from pathlib import Path


def load(p):
    p = Path(p)
    return json.loads(p.read_text()) if p.is_file() else None


def main(root="reports/retrieval"):
    r = Path(root)
    out = []
    perf = load(r / "perf.json")
    if perf:
        out.append(f"### Datastore vs plain FAISS ({perf['date']}, {perf['env']['device']})\n")
        out.append("| entries | dim | backend | insert vec/s ours | insert vec/s FAISS | ratio | query ms (1) ours / FAISS | ratio | "
                   "query ms (64) ours / FAISS | ratio | recall@10 |")
        out.append("|---|---|---|---|---|---|---|---|---|---|---|")
        for s in perf.get("store", []):
            out.append(f"| {s['n']:,} | {s['d']} | {s['backend']} | {s['insert_vps_ours']:,.0f} | {s['insert_vps_faiss']:,.0f} | "
                       f"{s['insert_ratio']:.2f} | {s['query_ms_batch1_ours']:.2f} / {s['query_ms_batch1_faiss']:.2f} | "
                       f"{s['query_ratio_batch1']:.2f} | {s['query_ms_batch64_ours']:.1f} / {s['query_ms_batch64_faiss']:.1f} | "
                       f"{s['query_ratio_batch64']:.2f} | {s['recall_at_k']:.3f} |")
        if perf.get("bandwidth"):
            out.append("\n| keys | bytes | streaming read GB/s | search GB/s (1 query) | share | search GB/s (64 queries) | share |")
            out.append("|---|---|---|---|---|---|---|")
            for b in perf["bandwidth"]:
                out.append(f"| {b['n']:,} x {b['d']} | {b['bytes'] / 1e6:,.0f} MB | {b['read_GBps']:.2f} | {b['search_GBps_q1']:.2f} | "
                           f"{b['share_of_ceiling_q1']:.2f} | {b['search_GBps_q64']:.2f} | {b['share_of_ceiling_q64']:.2f} |")
        if perf.get("knnlm_decode_ms"):
            k = perf["knnlm_decode_ms"]
            out.append(f"\nkNN-LM per generated token ({k['n']:,}-entry store, k=32): plain {k['plain']:.2f} ms; " + "; ".join(
                f"{n} {v:.2f} ms (+{100 * k[n + '_added_share']:.0f}%)" for n, v in k.items()
                if n.startswith("knn") and not n.endswith("share")))
        if perf.get("memorizing_training"):
            m = perf["memorizing_training"]
            out.append(f"\nMemorizing training tokens/s: off {m['tok_per_s_off']:,.0f}; memory 1024 {m['tok_per_s_on_1024']:,.0f} "
                       f"(slowdown x{m['slowdown_on_1024']:.2f}); memory 2048 {m['tok_per_s_on_2048']:,.0f} "
                       f"(slowdown x{m['slowdown_on_2048']:.2f})")
        out.append(f"\ncommand: `{perf['command']}`")
    for name in ("knn_lm", "memorizing", "retro"):
        c = load(r / f"claims_{name}.json")
        if c and name in c:
            out.append(f"\n### claim {name} ({c['date']})\n```json\n{json.dumps(c[name], indent=1, default=str)[:4000]}\n```")
            out.append(f"command: `{c['command']}`")
    for p in sorted(r.glob("passages*.json")):
        c = load(p)
        out.append(f"\n### passage retrieval: {p.name} ({c['date']}; {c['passages']:,} passages, {c['queries']:,} queries, "
                   f"alpha {c['alpha']} tuned on {c['dev_queries']} dev queries)\n")
        out.append("| method | R@1 (test) | R@10 (test) | MRR (test) | R@1 (all) | R@10 (all) | MRR (all) |")
        out.append("|---|---|---|---|---|---|---|")
        for m, v in c["methods"].items():
            t, a = v["test"], v["all"]
            out.append(f"| {m} | {t['recall@1']:.3f} | {t['recall@10']:.3f} | {t['mrr']:.3f} | {a['recall@1']:.3f} | "
                       f"{a['recall@10']:.3f} | {a['mrr']:.3f} |")
        out.append(f"\ncommand: `{c['command']}`; seconds: {json.dumps({k: round(v) for k, v in c['seconds'].items()})}")
    print("\n".join(out))


if __name__ == "__main__":
    main(*sys.argv[1:])
