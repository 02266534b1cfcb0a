"""Compose docs/benchmarks/sparse.md from the JSON records in docs/benchmarks/sparse/.

    .venv/bin/python benchmarks/sparse/report.py
"""
from __future__ import annotations

import json

from common import IMG, OUT, REPO


def _load(name: str) -> dict | None:
    p = OUT / f"{name}.json"
    return json.loads(p.read_text()) if p.exists() else None


def _env(d: dict) -> str:
    e = d.get("env", {})
    return f"{e.get('device', '?')}, torch {e.get('torch', '?')}, git {e.get('git_sha', '?')[:12]}, {d.get('date', '?')}"


def _taken(perf: dict, name: str) -> list[str]:
    t = perf.get(f"{name}_taken")
    if not t:
        return []
    mode = {True: ", `--quick`", False: ", full size (no `--quick`)"}.get(t.get("quick"), "")
    return [f"(taken {t['date']}, git {str(t.get('git_sha'))[:12]}{mode})", ""]


def main() -> None:
    L = ["# Sparse tables: measured figures", ""]
    if (OUT / "status.md").exists():   # hand-written: per part of issue 4, done / partial / missing
        L += [(OUT / "status.md").read_text().strip(), ""]
    L += [
         "Machine: the shared 2-core CPU development machine (no GPU in this task), **heavily shared**: six "
         "helpers ran tests and benchmarks at the same time (load average 8-34 during these runs), timings "
         "taken under `flock /tmp/memstack-timing.lock` with torch single-threaded. Treat absolute times as "
         "noisy; ratios are measured in the same run. GPU figures: **not measured yet (no GPU in this task)** -- "
         "the Triton gather kernel vs `index_select` and vs HBM bandwidth, host-offloaded generation over PCIe.",
         "", "Records: `docs/benchmarks/sparse/*.json` (config, git SHA, device, versions). "
         "Regenerate this page with `.venv/bin/python benchmarks/sparse/report.py`.", ""]
    perf = _load("perf")
    L += ["## Performance", "", "Command: `flock /tmp/memstack-timing.lock .venv/bin/python benchmarks/sparse/perf.py --quick`"]
    if perf:
        L += [f"({_env(perf)})", ""]
        if perf.get("train_step"):
            L += ["### Training step, Engram vs plain backbone at equal activated parameters (target <= 5%)", ""] + _taken(perf, "train_step") + [
                  "| d_model x layers | plain step (s) | Engram step (s) | overhead | active params plain / Engram |",
                  "|---|---|---|---|---|"]
            for r in perf["train_step"]:
                L.append(f"| {r['d_model']} x {r['n_layers']} | {r['plain_step_s']:.4f} | {r['engram_step_s']:.4f} | "
                         f"{100 * r['overhead']:+.1f}% | {r['plain_params']:,} / {r['engram_active_params']:,} |")
            L.append("")
        if perf.get("gather"):
            L += ["### Row gather on CPU (256-byte rows), vs index_select / nn.Embedding / a contiguous copy", ""] + _taken(perf, "gather") + [
                  "| table rows | lookups | gather_rows GB/s | index_select GB/s | nn.Embedding GB/s | copy GB/s | gather / index_select speed | gather / copy bandwidth |",
                  "|---|---|---|---|---|---|---|---|"]
            for r in perf["gather"]:
                L.append(f"| {r['rows']:,} | {r['lookups']:,} | {r['gather_rows_GBps']:.2f} | {r['index_select_GBps']:.2f} | "
                         f"{r['nn.Embedding_GBps']:.2f} | {r['contiguous_copy_GBps']:.2f} | {r['gather_vs_index_select']:.2f}x | "
                         f"{r['gather_vs_copy_bandwidth']:.2f} |")
            L += ["", "GPU (Triton kernel vs index_select vs the ~3 TB/s HBM limit): not measured yet (no GPU in this task).", ""]
        if perf.get("generation"):
            r = perf["generation"][0]
            L += ["### Generation with the table memory-mapped from a file + prefetch vs resident (target <= 3%)", ""] + _taken(perf, "generation") + [
                  f"Table {r['table_rows']:,} rows ({r['table_MB']:.0f} MB), batch {r['batch']}, {r['new_tokens']} new tokens, greedy.", "",
                  "| resident tok/s | mmap + prefetch tok/s | mmap, no prefetch tok/s | slowdown with prefetch | without | same tokens |",
                  "|---|---|---|---|---|---|",
                  f"| {r['resident_tok_per_s']:.1f} | {r['disk_prefetch_tok_per_s']:.1f} | {r['disk_sync_tok_per_s']:.1f} | "
                  f"{100 * r['disk_prefetch_slowdown']:+.1f}% | {100 * r['disk_sync_slowdown']:+.1f}% | "
                  f"{r['disk_prefetch_same_tokens'] and r['disk_sync_same_tokens']} |", "", f"Note: {r['note']}.", ""]
        if perf.get("online"):
            r = perf["online"][0]
            L += ["### Online update throughput with snapshots on", ""] + _taken(perf, "online") + [
                  f"{r['updates']} updates of {r['batch_tokens']} tokens on a {r['table_rows']:,}-row table, a store commit "
                  f"every 10: **{r['rows_per_s']:.0f} rows/s** ({r['updates_per_s']:.2f} updates/s, {r['rows_written']:,} rows "
                  f"written, {r['commits']} commits); the initial full snapshot took {r['initial_full_snapshot_s']:.2f} s.", ""]
    else:
        L += ["", "not run yet", ""]
    L += ["## Claims (issue 4), on our harness", ""]
    sc = _load("claim_scaling")
    L += ["### Engram vs plain backbone at equal activated parameters; slots vs loss", "",
          "Command: `.venv/bin/python benchmarks/sparse/claim_scaling.py` (cells may be run in parallel with "
          "`--rows ... --tag _x --no-plain` and merged with `--merge`)."]
    if sc:
        L += [f"({_env(sc)}; {sc['steps']} steps x batch {sc.get('batch', 16)} x 2 segments x 64 tokens = "
              f"{sc['tokens']:,} training tokens per cell, lr {sc['lr']}, SOTU val 20k tokens, bpe512; the plain "
              f"backbone's SwiGLU widened to d_ff {sc['plain_d_ff']} (+{sc['plain_extra_params']:,} params) to match "
              f"Engram's {sc['engram_dense_params']:,} dense params)", "",
              "| model | table slots | table params | active params | SOTU val bpb |", "|---|---|---|---|---|"]
        for r in sc["runs"]:
            L.append(f"| {r['name']} | {r['slots']:,} | {r['table_params']:,} | "
                     f"{r['active_params']:,} | {r['bpb']:.4f} |")
        if "loglinear_slope_bpb_per_e" in sc:
            L.append(f"\nLog-linear fit over the multi-row tables: {sc['loglinear_slope_bpb_per_e']:.4f} bpb per e-fold of slots.")
        L += ["", "![slots vs bpb](img/sparse_claim_scaling.png)", ""]
    lg = _load("claim_scaling_long")
    if lg:
        L += [f"Longer training, same configuration: `claim_scaling.py --steps {lg['steps']} --rows "
              f"{','.join(str(r['rows_per_head']) for r in lg['runs'] if r['rows_per_head'])} --tag _long --save runs/claims_long` "
              f"({_env(lg)}; {lg['tokens']:,} training tokens per cell)", "",
              "| model | table slots | table params | active params | SOTU val bpb |", "|---|---|---|---|---|"]
        for r in lg["runs"]:
            L.append(f"| {r['name']} | {r['slots']:,} | {r['table_params']:,} | {r['active_params']:,} | {r['bpb']:.4f} |")
        L.append("")
    if (OUT / "claim_scaling_notes.md").exists():
        L += [(OUT / "claim_scaling_notes.md").read_text().strip(), ""]
    L += ["### Tables switched off: factual recall vs in-context (Engram §6.3)", "",
          "Command: `.venv/bin/python benchmarks/sparse/claim_facts.py` (options per run below)"]
    for p in sorted(OUT.glob("claim_facts*.json")):
        fa = json.loads(p.read_text())
        t = fa["task"]
        L += ["", f"`{p.name}`: `--steps {fa['steps']} --facts {t['n_facts']} --rows {fa.get('rows_per_head', 4093)} "
              f"--icl-pairs {t['icl_pairs']} --icl-frac {t['icl_frac']}` ({_env(fa)}; {fa['steps']} steps x batch "
              f"{fa.get('batch')} examples of {t['seq_len']} tokens; backbone d_model {fa.get('d_model', 64)} x "
              f"{fa.get('n_layers', 2)} layers, Engram at layer 0 with 2+3-grams, 8 heads)", "",
              "| model | params | fact_acc (closed book) | fact token acc | icl_acc (in context) | icl token acc |",
              "|---|---|---|---|---|---|"]
        for k, r in fa["runs"].items():
            L.append(f"| {k} | {r.get('params', 0):,} | {r['fact_acc']:.3f} | {r['fact_token_acc']:.3f} | {r['icl_acc']:.3f} | "
                     f"{r['icl_token_acc']:.3f} |")
        if "fact_acc_retained" in fa:
            ret = lambda v: "n/a (0 with tables on)" if v is None else f"{100 * v:.0f}%"  # noqa: E731
            L.append(f"\nRetained with tables off: fact_acc {ret(fa['fact_acc_retained'])}, "
                     f"icl_acc {ret(fa['icl_acc_retained'])} (paper: factual QA keeps 29-44%, reading comprehension 81-93%).")
    L.append("")
    if (OUT / "claim_facts_notes.md").exists():
        L += [(OUT / "claim_facts_notes.md").read_text().strip(), ""]
    L += ["### Sparse memory finetuning vs full finetuning: forgetting at equal new-fact accuracy", "",
          "Command: `.venv/bin/python benchmarks/sparse/claim_smf.py` (options per run below)"]
    for p in sorted(OUT.glob("claim_smf*.json")):
        smf = json.loads(p.read_text())
        tag = p.stem[len("claim_smf"):]
        L += ["", f"`{p.name}`: `--steps {smf['steps']} --every {smf.get('every')} --top-t {smf.get('top_t')} "
              f"--lr-smf {smf.get('lr_smf')} --lr-full {smf.get('lr_full')}` ({_env(smf)}; base {smf['ckpt']}, "
              f"{smf['facts']} new facts, batch 8 statements per step, base SOTU val bpb {smf['base_bpb']:.4f} on 10k "
              "tokens; a curve stops at fact_acc 1.0)", "",
              "| method | step | fact_acc | SOTU bpb | forgetting (bpb increase) |", "|---|---|---|---|---|"]
        for k, pts in smf["curves"].items():
            for q in pts:
                L.append(f"| {k} | {q['step']} | {q['fact_acc']:.3f} | {q['bpb']:.4f} | {100 * q['forgetting']:+.2f}% |")
        if "at_equal_accuracy" in smf:
            L.append(f"\nAt equal new-fact accuracy {smf['equal_accuracy']:.3f} (the lower of the two curves' best): " + "; ".join(
                f"{k}: forgetting {100 * q['forgetting']:+.2f}% (step {q['step']:.0f}"
                f"{', interpolated between evaluations' if q.get('interpolated') else ''})"
                for k, q in smf["at_equal_accuracy"].items()) + " (paper: -11% vs -89% held-out F1).")
        if (IMG / f"sparse_claim_smf{tag}.png").exists():
            L += ["", f"![forgetting vs accuracy](img/sparse_claim_smf{tag}.png)"]
    L.append("")
    if (OUT / "claim_smf_notes.md").exists():
        L += [(OUT / "claim_smf_notes.md").read_text().strip(), ""]
    (REPO / "docs" / "benchmarks" / "sparse.md").write_text("\n".join(L) + "\n")
    print("\n".join(L))


if __name__ == "__main__":
    main()
