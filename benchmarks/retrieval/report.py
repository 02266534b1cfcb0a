"""Turn the JSON records of benchmarks/retrieval/*.py into the tables of
docs/benchmarks/retrieval.md (prints markdown; the page adds the prose)."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path


def load(p):
    p = Path(p)
    return json.loads(p.read_text()) if p.is_file() else None


def arg(rec: dict, name: str) -> str:
    """A command-line value out of a record's `command` string."""
    m = re.search(rf"--{name}=(\S+)", rec["command"])
    return m.group(1) if m else "?"


def claims_tables(c: dict, root: Path) -> str:
    out = [f"### Claims on SOTU ({c['date']}, {c['env']['device']}, backbone d_model {c['backbone']['d_model']}, "
           f"{c['backbone']['n_layers']} layers, seg_len {c['backbone']['seg_len']}, bpe512)\n"]
    k = c.get("knn_lm")
    if k:
        t, v = k["test"], k["val"]
        out.append(f"**kNN-LM** (backbone trained {k['train']['steps']} steps, {k['train']['train_tokens']:,} tokens; datastore "
                   f"{k['store_entries']:,} entries of the SOTU train split, {k['store']['backend']} fp16, nprobe "
                   f"{k['store']['nprobe']}, k={k['k']}; temperature {v['temperature']} and lambda {v['lambda']} tuned on "
                   f"{arg(c, 'val-tokens')} SOTU val tokens, grid in the record)\n")
        out.append("| split | tokens | backbone ppl | kNN-LM ppl | change | via the registered memory | + document cache (1,024) |")
        out.append("|---|---|---|---|---|---|---|")
        out.append(f"| val (tuning) | | {v['ppl_lm']:.3f} | {v['ppl_knnlm']:.3f} | {100 * (v['ppl_knnlm'] / v['ppl_lm'] - 1):+.1f}% | | |")
        out.append(f"| test | {t['tokens']:,} | {t['ppl_lm']:.3f} | {t['ppl_knnlm']:.3f} | {100 * (t['ppl_knnlm'] / t['ppl_lm'] - 1):+.1f}% | "
                   f"{t['ppl_knnlm_via_memory']:.3f} | {t['ppl_knnlm_plus_doc_cache']:.3f} |")
        out.append("\nPaper (WikiText-103, 247M-parameter LM, 103M-entry store): 18.65 -> 16.12 (-13.6%).\n")
    m = c.get("memorizing")
    if m:
        e = m["eval"]
        out.append(f"**Memorizing Transformer** (trained {m['train']['steps']} steps with a {m['trained_mem_len']}-entry memory, "
                   f"k={m['k']}; evaluated on the SOTU test split with the memory capped at each size)\n")
        out.append("| memory entries | test ppl | test bpb |")
        out.append("|---|---|---|")
        for size, r in e.items():
            if size != "gate_closed":
                out.append(f"| {int(size):,} | {r['ppl']:.3f} | {r['bpb']:.4f} |")
        out.append(f"| gate closed (memory unused) | {e['gate_closed']['ppl']:.3f} | |")
        out.append(f"| plain backbone, same steps | {m['plain_backbone']['ppl']:.3f} | |")
        png = Path("docs/benchmarks/img/retrieval-memorizing.png")
        if plot_memorizing(e, m["plain_backbone"]["ppl"], png):
            out.append(f"\n![Memorizing ppl vs memory size](img/{png.name})\n")
    rt = c.get("retro")
    if rt:
        e = rt["eval"]
        out.append(f"**RETRO** ({rt['params']:,} parameters, chunk {rt['chunk']}, 2 neighbours from a {rt['store_entries']:,}-chunk "
                   f"store of the SOTU train split (same-document neighbours excluded), trained {rt['train']['steps']} steps)\n")
        out.append("| model | test ppl |")
        out.append("|---|---|")
        out.append(f"| RETRO, retrieval on | {e['retro_on_ppl']:.3f} |")
        out.append(f"| same weights, retrieval off | {e['retro_off_ppl']:.3f} |")
        out.append(f"| same architecture trained and evaluated without retrieval | {e['trained_off_ppl']:.3f} |")
    out.append(f"\ncommand: `{c['command']}`")
    return "\n".join(out)


def plot_memorizing(e: dict, plain: float, png: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    sizes = [int(s) for s in e if s != "gate_closed"]
    ppl = [e[s]["ppl"] for s in e if s != "gate_closed"]
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    ax.plot(sizes, ppl, "o-", label="Memorizing (trained at 1,024)")
    ax.axhline(plain, color="gray", ls="--", label="plain backbone")
    ax.axhline(e["gate_closed"]["ppl"], color="tab:red", ls=":", label="gate closed")
    ax.set_xscale("log")
    ax.set_xlabel("memory entries per layer (eval)")
    ax.set_ylabel("SOTU test perplexity")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
    return True


def main(root="docs/benchmarks/retrieval"):
    r = Path(root)
    out = []
    perf = load(r / "perf.json")
    if perf:
        out.append(f"### Datastore vs plain FAISS ({perf['env']['device']}; each row's UTC time in its first column)\n")
        out.append("| measured | entries | dim | backend | insert vec/s ours | insert vec/s FAISS | ratio | query ms (1) ours / FAISS | ratio | "
                   "query ms (64) ours / FAISS | ratio | recall@10 |")
        out.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for s in perf.get("store", []):
            q1 = (f"{s['query_ms_batch1_ours']:.2f} / {s['query_ms_batch1_faiss']:.2f} | {s['query_ratio_batch1']:.2f}"
                  if "query_ms_batch1_ours" in s else "not timed | ")
            q64 = (f"{s['query_ms_batch64_ours']:.1f} / {s['query_ms_batch64_faiss']:.1f} | {s['query_ratio_batch64']:.2f}"
                   if "query_ms_batch64_ours" in s else "not timed | ")
            out.append(f"| {s.get('date', perf['date'])[11:16]} | {s['n']:,} | {s['d']} | {s['backend']} | {s['insert_vps_ours']:,.0f} | "
                       f"{s['insert_vps_faiss']:,.0f} | {s['insert_ratio']:.2f} | {q1} | {q64} | {s['recall_at_k']:.3f} |")
        singles = [s for s in perf.get("store", []) if "single_hot" in s]
        if singles:
            out.append("\nSingle-query latency, our datastore vs the bare FAISS index, measured call by call in alternation "
                       "(ours, FAISS, ours, ...; medians over the calls shown): *hot* repeats one query, *stream* cycles "
                       "through 256 distinct queries. Target (issue 15): ratio <= 2.\n")
            out.append("| measured | entries | backend | hot: ours / FAISS us | ratio | stream: ours / FAISS us | ratio | calls |")
            out.append("|---|---|---|---|---|---|---|---|")
            for s in singles:
                h, st = s["single_hot"], s["single_stream"]
                out.append(f"| {s.get('date', perf['date'])[11:16]} | {s['n']:,} | {s['backend']} | {h['ours_us']:,.1f} / "
                           f"{h['faiss_us']:,.1f} | {h['ratio']:.2f} | {st['ours_us']:,.1f} / {st['faiss_us']:,.1f} | "
                           f"{st['ratio']:.2f} | {h['calls']:,} |")
        if perf.get("bandwidth"):
            out.append("\n| keys | bytes | streaming read GB/s | search GB/s (1 query) | share | search GB/s (64 queries) | share |")
            out.append("|---|---|---|---|---|---|---|")
            for b in perf["bandwidth"]:
                out.append(f"| {b['n']:,} x {b['d']} | {b['bytes'] / 1e6:,.0f} MB | {b['read_GBps']:.2f} | {b['search_GBps_q1']:.2f} | "
                           f"{b['share_of_ceiling_q1']:.2f} | {b['search_GBps_q64']:.2f} | {b['share_of_ceiling_q64']:.2f} |")
        if perf.get("knnlm_decode_ms"):
            k = perf["knnlm_decode_ms"]
            out.append(f"\nkNN-LM cost per generated token (batch 1, quick backbone, {k['n']:,}-entry random store, k=32; "
                       "the plain backbone timed in alternating rounds with each variant):\n")
            out.append("| variant | ms / token with kNN-LM | ms / token plain | added share of the forward pass |")
            out.append("|---|---|---|---|")
            for n, v in k.items():
                if n.startswith("knn") and not n.endswith(("_plain", "_share")):
                    out.append(f"| {n} | {v:.2f} | {k[n + '_plain']:.2f} | {100 * k[n + '_added_share']:+.0f}% |")
        if perf.get("memorizing_training"):
            m = perf["memorizing_training"]
            how = "configurations in alternating steps" if m.get("interleaved") else "configurations one after another"
            out.append(f"\nMemorizing training tokens/s (quick backbone, batch 16 x 2 segments x 64, memory filled first, "
                       f"{how}): off {m['tok_per_s_off']:,.0f}; memory 1024 {m['tok_per_s_on_1024']:,.0f} "
                       f"(slowdown x{m['slowdown_on_1024']:.2f}); memory 2048 {m['tok_per_s_on_2048']:,.0f} "
                       f"(slowdown x{m['slowdown_on_2048']:.2f})")
        out.append("\nruns (each `OMP_NUM_THREADS=1 flock /tmp/memstack-timing.lock .venv/bin/python benchmarks/retrieval/perf.py "
                   "--append --out reports/retrieval/perf.json` plus the options shown; rows a later run replaced were dropped):\n")
        for run in perf.get("runs", [{"command": perf["command"], "date": perf["date"]}]):
            opts = " ".join(a for a in run["command"].split()[1:] if a.split("=")[0] not in ("--out", "--append", "--threads", "--dim")
                            and not (a.startswith("--hnsw-size") and "hnsw" not in run["command"].split("--only=")[-1]))
            out.append(f"- {run['date'][11:]}: `{opts or run['command']}`")
    c = load(r / "claims_lm.json")
    if c:
        out.append(claims_tables(c, r))
    for p in sorted(r.glob("open_qa*.json")):
        out.append(open_qa_table(p, load(p)))
    for p in sorted(r.glob("retrofit*.json")):
        out.append(retrofit_table(p, load(p)))
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
    return "\n".join(out)


INVERSE = ("element_by_number", "element_by_symbol", "capital_of", "film_by_director")


def _group_em(run: dict) -> tuple[float, float]:
    """EM on the named templates (the title is in the question) and on the inverse ones."""
    named, inv = [], []
    for p in run["predictions"]:
        (inv if p["id"].split(":")[0] in INVERSE else named).append(p["em"])
    avg = lambda v: 100 * sum(v) / len(v) if v else float("nan")  # noqa: E731
    return avg(named), avg(inv)


def _selection(run: dict) -> str:
    return ", ".join(f"{v['lr']:g}: {v['val_em']:.1f}" for v in run.get("lr_selection", [])) or "-"


def open_qa_table(path: Path, rec: dict) -> str:
    runs = rec["runs"]
    first = next(iter(runs.values()))
    out = [f"\n### Open-domain QA: {path.name} ({rec['env']['device']}; SmolLM2-135M reader, MiniLM retriever over "
           f"{rec['passages']:,} passages; {first['eval_split']} questions: {first['questions']}, few-shot training "
           f"questions: {first['train_questions']})\n",
           "| run | system | retriever | k | steps x batch | lr reader / retriever | validation EM per lr | EM | F1 | EM named | "
           "EM inverse | gold passage in top-k | train s | eval s | re-rank s |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, x in runs.items():
        c = x["config"]
        ret = c["retriever"] + (f" ({c['objective']})" if c["system"] == "atlas" else "")
        rr = x.get("retriever_stats") or {}
        named, inv = _group_em(x)
        out.append(f"| {name} | {c['system']} | {ret if c['system'] not in ('closed_book', 'oracle') else '-'} | "
                   f"{c['k'] if c['system'] not in ('closed_book', 'oracle') else '-'} | {c['steps']} x {c['batch']} | "
                   f"{c['lr_reader']:g} / {c['lr_retriever']:g} | "
                   f"{_selection(x)} | {x['em']:.1f} | {x['f1']:.1f} | {named:.1f} | {inv:.1f} | "
                   f"{x.get('recall_at_k', float('nan')):.1f} | {x['timing']['train_s']:.0f} | {x['timing']['eval_s']:.0f} | "
                   f"{rr.get('rerank_seconds', 0):.0f} |")
    cmd = first["command"]
    sel = first.get("lr_selection") or []
    if sel:
        out.append(f"\nlearning rate (reader and retriever) chosen per run on the first {sel[0]['val_questions']} validation "
                   "questions (best EM, then F1), then trained again from the same weights and seed and scored on the test questions.")
    out.append(f"\ncommand (first run): `{cmd}`; train_layers={first['config']['train_layers']}, "
               f"passage_tokens={first['config']['passage_tokens']}, temperature={first['config']['temperature']}")
    return "\n".join(out)


def retrofit_table(path: Path, rec: dict) -> str:
    a = rec["args"]
    fz = rec["frozen"]
    rows = [("frozen SmolLM2 (= RETRO[OFF]: the CCA layers add exactly zero)", fz)]
    rows += [(f"RETRO-fit, {k}", v) for k, v in rec["ablation"].items()]
    if "random_control" in rec:
        rows += [(f"control trained on random neighbours, evaluated on {k}", rec["random_control"][k])
                 for k in ("random neighbours", "true neighbours")]
    trained = rec["runs"][0]["params"] - 134_515_008
    out = [f"\n### RETRO-fitting SmolLM2-135M: {path.name} ({rec['date']}, {rec['env']['device']})\n",
           f"Frozen backbone; CCA at layers {a['layers']} (0-based), {a['enc_layers']}-layer neighbour encoder attending to "
           f"the query chunk, on the backbone's embedding ({trained:,} trained parameters); chunk {a['chunk']}, k={a['k']}; "
           f"store: {rec['store']['chunks']:,} chunks of the SOTU train split keyed by MiniLM ({rec['store']['fingerprint']}); "
           f"{a['steps']} steps x {a['batch']} rows x {a['seg_len']} tokens "
           f"({a['steps'] * a['batch'] * a['seg_len']:,} tokens); lr chosen on val: "
           + ", ".join(f"{r['lr']:g} -> val bpb {r['val_bpb']:.4f}" for r in rec["runs"]) + f" (chose {rec['chosen_lr']:g}); "
           f"evaluated on the first {a['eval_tokens']:,} tokens of each split.\n",
           "| model | val bpb | test bpb | test ppl | test change vs frozen |", "|---|---|---|---|---|"]
    for name, v in rows:
        out.append(f"| {name} | {v['val_bpb']:.4f} | {v['test_bpb']:.4f} ± {v['test_bpb_se']:.4f} | {v['test_ppl']:.2f} | "
                   f"{100 * (v['test_bpb'] / fz['test_bpb'] - 1):+.2f}% |")
    out.append(f"\ncommand: `{rec['command']}`")
    return "\n".join(out)


START, END = "<!-- tables:start (benchmarks/retrieval/report.py) -->", "<!-- tables:end -->"


if __name__ == "__main__":
    # report.py [RECORDS_DIR] [--page docs/benchmarks/retrieval.md]: print the tables, or splice
    # them into the page between the START and END markers (the prose around them is kept)
    args = sys.argv[1:]
    page = None
    if "--page" in args:
        i = args.index("--page")
        page = Path(args[i + 1])
        del args[i:i + 2]
    tables = main(*args)
    if page is None:
        print(tables)
    else:
        text = page.read_text()
        a, b = text.index(START) + len(START), text.index(END)
        page.write_text(text[:a] + "\n" + tables + "\n" + text[b:])
