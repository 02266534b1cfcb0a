"""Every GPU measurement of the project, in one run, into one JSON record (issue 10).

    benchmarks/gpu/run_all.sh                 # on a CUDA machine (one H200: sized to finish in < 8 minutes)
    benchmarks/gpu/run_all.sh --smoke         # anywhere: tiny sizes on the CPU, Triton under its interpreter

Runs the existing benchmark scripts, each in its own process (they share module names such as
`common`, and one failing must not take the others down), each with a time limit, and merges
their records:

1. paged_attention -- benchmarks/runtime/paged_attention.py: the HBM ceiling measured in the same
   run (read-only reduction and device copy over a buffer larger than the caches), then paged decode
   (Triton kernel; torch gather + SDPA beside it) and contiguous SDPA on the same K/V, bf16, 32 query
   / 8 KV heads of dim 128, batch 1/8/32, context 8k/32k (up to 4.3 GB of K/V): GB/s and share of
   the ceiling;
2. engine_vs_hf -- benchmarks/runtime/engine_throughput.py: the engine (public API) vs HF
   `generate` with a static cache, same weights, batch 1/16/64, equal and mixed lengths;
3. smollm2_prefix -- benchmarks/hf/smollm2_prefix.py on the GPU (issue 15 part 6): prefix / memory
   tokens trained on the frozen SmolLM2-135M-Instruct, lr chosen on validation, test bpb; skipped
   when the optional smollm2 asset is absent (not in --smoke);
4. table_gather -- benchmarks/sparse/perf.py --only gather: Triton gather_rows vs index_select,
   nn.Embedding and a contiguous copy of the same bytes;
5. linear_memory -- benchmarks/learned/perf.py op: the chunkwise op, Triton vs torch chunkwise vs the
   per-token reference.

The record (reports/benchmarks/gpu/run_all-<date>.json, or --out) holds each component's full
record, its command, wall time and status (ok / failed with the tail of its output / timed out),
and a `summary` of the headline figures; it is rewritten after every component, so a run stopped from
outside keeps what finished. With --smoke every component runs tiny on the CPU (the
Triton paths through TRITON_INTERPRET=1): it proves the script and its record, not speed.
Measures; asserts nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def components(smoke: bool, device: str, tmp: Path) -> list[dict]:
    """name, argv, time limit (s): the GPU sizes add up to well under 8 minutes on one H200."""
    py = sys.executable
    if smoke:
        return [
            {"name": "paged_attention", "limit": 120, "out": tmp / "paged_attention.json",
             "argv": [py, "benchmarks/runtime/paged_attention.py", "--smoke", "--impls", "cpu,torch,triton",
                      "--dtypes", "float32", "--out", str(tmp / "paged_attention.json")]},
            {"name": "engine_vs_hf", "limit": 180, "out": tmp / "engine_vs_hf.json",
             "argv": [py, "benchmarks/runtime/engine_throughput.py", "--smoke", "--out", str(tmp / "engine_vs_hf.json")]},
            {"name": "table_gather", "limit": 120, "out": tmp / "table_gather.json",
             "argv": [py, "benchmarks/sparse/perf.py", "--only", "gather", "--smoke", "--out",
                      str(tmp / "table_gather.json")]},
            {"name": "linear_memory", "limit": 120, "out": tmp / "linear_memory" / "perf-op.json",
             "argv": [py, "benchmarks/learned/perf.py", "op", "--smoke", "--no-plot", "--out",
                      str(tmp / "linear_memory")]},
        ]
    return [
        {"name": "paged_attention", "limit": 150, "out": tmp / "paged_attention.json",
         "argv": [py, "benchmarks/runtime/paged_attention.py", "--device", device, "--dtypes", "bfloat16",
                  "--impls", "triton,torch", "--heads", "32", "--kv-heads", "8", "--head-dim", "128",
                  "--batches", "1,8,32", "--contexts", "8192,32768", "--reps", "10", "--threads", "0",
                  "--out", str(tmp / "paged_attention.json")]},
        {"name": "engine_vs_hf", "limit": 180, "out": tmp / "engine_vs_hf.json",
         "argv": [py, "benchmarks/runtime/engine_throughput.py", "--device", device, "--threads", "0",
                  "--d-model", "1024", "--layers", "8", "--heads", "16", "--kv-heads", "4", "--vocab", "32000",
                  "--prompt-len", "128", "--new-tokens", "128", "--reps", "3", "--out", str(tmp / "engine_vs_hf.json")]},
        # issue 15 part 6: prefix / memory tokens trained on the frozen SmolLM2 (needs the smollm2 asset)
        {"name": "smollm2_prefix", "limit": 300, "out": tmp / "smollm2_prefix" / "smollm2_prefix-records.jsonl",
         "needs": "smollm2",
         "argv": [py, "benchmarks/hf/smollm2_prefix.py", "--device", device, "--steps", "200", "--batch", "8",
                  "--eval-tokens", "16384", "--lrs", "0.003,0.01,0.03", "--work", str(tmp / "smollm2_runs"),
                  "--out", str(tmp / "smollm2_prefix")]},
        {"name": "table_gather", "limit": 60, "out": tmp / "table_gather.json",
         "argv": [py, "benchmarks/sparse/perf.py", "--only", "gather", "--device", device, "--out",
                  str(tmp / "table_gather.json")]},
        {"name": "linear_memory", "limit": 60, "out": tmp / "linear_memory" / "perf-op.json",
         "argv": [py, "benchmarks/learned/perf.py", "op", "--device", device, "--no-plot", "--out",
                  str(tmp / "linear_memory")]},
    ]


def run(c: dict, env: dict) -> dict:
    t = time.perf_counter()
    res = {"command": " ".join(c["argv"][1:]), "limit_s": c["limit"]}
    try:
        p = subprocess.run(c["argv"], cwd=REPO, env=env, capture_output=True, text=True, timeout=c["limit"])
        ok = p.returncode == 0 and c["out"].exists()
        res["status"] = "ok" if ok else f"failed (exit {p.returncode})"
        if not ok:
            res["output_tail"] = (p.stdout + p.stderr)[-3000:]
    except subprocess.TimeoutExpired as e:
        res["status"] = f"timed out after {c['limit']} s"
        res["output_tail"] = ((e.stdout or b"").decode(errors="replace") + (e.stderr or b"").decode(errors="replace"))[-3000:]
    if c["out"].exists() and c["out"].suffix == ".jsonl":   # rows written as measured: kept from a stopped run too
        res["record"] = [json.loads(line) for line in c["out"].read_text().splitlines() if line.strip()]
    elif res["status"] == "ok":
        res["record"] = json.loads(c["out"].read_text())
    res["wall_s"] = time.perf_counter() - t
    return res


def summary(parts: dict) -> dict:
    """Headline figures from the component records (None where a component did not run)."""
    s: dict = {}
    pa = parts.get("paged_attention", {}).get("record")
    if pa:
        ceil = pa["config"]["ceiling"]
        s["hbm_ceiling_GBps"] = {"read": ceil["read_GBps"], "copy": ceil["copy_GBps"]}
        impl = "triton" if "triton" in pa["config"]["impls"] else pa["config"]["impls"][0]
        s["paged_decode"] = [{"impl": impl, "B": r["B"], "L": r["L"], "GBps": r.get(f"{impl}_GBps"),
                              "share_of_read_ceiling": r.get(f"{impl}_%ceil", 0) / 100,
                              "speed_vs_contiguous_sdpa": r.get(f"{impl}_speed")} for r in pa["decode"]]
    ev = parts.get("engine_vs_hf", {}).get("record")
    if ev:
        s["engine_vs_hf"] = [{"case": r["case"], "batch": r["batch"], "engine/hf": r["engine/hf"],
                              "token_agree": r["token_agree"]} for r in ev["results"]]
    tg = parts.get("table_gather", {}).get("record")
    if tg:
        key = "triton" if any("triton_GBps" in r for r in tg["gather"]) else "gather_rows"
        s["table_gather"] = [{"impl": key, "lookups": r["lookups"], "GBps": r[f"{key}_GBps"],
                              "share_of_copy_bandwidth": r["contiguous_copy_s"] / r[f"{key}_s"]} for r in tg["gather"]]
    sp = parts.get("smollm2_prefix", {}).get("record")
    if sp:
        s["smollm2_prefix"] = [{k: r.get(k) for k in ("variant", "chosen_lr", "val_bpb", "test_bpb", "trained_params")}
                               for r in sp]
    lm = parts.get("linear_memory", {}).get("record")
    if lm:
        s["linear_memory"] = [{k: r.get(k) for k in ("T", "block", "rule", "speedup", "triton_vs_chunked")}
                              for r in lm["rows"]]
    return s


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (Triton interpreted): proves it runs")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--only", default=None, help="comma list of components (default: all)")
    ap.add_argument("--out", default=None, help="the record's path (default reports/benchmarks/gpu/run_all-<date>.json)")
    args = ap.parse_args(argv)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    if args.smoke:
        env["TRITON_INTERPRET"] = "1"
        args.device = "cpu"
    else:
        import torch

        if not torch.cuda.is_available():
            sys.exit("run_all: no CUDA device here; use --smoke to check the script on the CPU")
    sys.path.insert(0, str(REPO / "benchmarks" / "runtime"))
    from common import device_info, git_sha  # noqa: E402  (benchmarks/runtime/common.py)
    import torch  # noqa: E402

    from memstack.data.assets import asset_path  # noqa: E402
    from memstack.errors import AssetError  # noqa: E402

    def present(name: str) -> bool:
        try:
            return asset_path(name).exists()
        except AssetError:
            return False

    t0 = time.perf_counter()
    parts: dict = {}
    out = Path(args.out) if args.out else REPO / "reports" / "benchmarks" / "gpu" / \
        f"run_all{'-smoke' if args.smoke else ''}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    rec = {"benchmark": "gpu_run_all", "smoke": args.smoke, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
           "git": git_sha(), "device": device_info(args.device), "torch": torch.__version__}
    with tempfile.TemporaryDirectory(prefix="memstack-gpu-") as d:
        for c in components(args.smoke, args.device, Path(d)):
            if args.only and c["name"] not in args.only.split(","):
                continue
            if c.get("needs") and not present(c["needs"]):
                parts[c["name"]] = {"status": f"skipped (no {c['needs']} asset: memstack data fetch {c['needs']})"}
            else:
                print(f"[run_all] {c['name']}: {' '.join(c['argv'][1:])}", flush=True)
                parts[c["name"]] = run(c, env)
            print(f"[run_all] {c['name']}: {parts[c['name']]['status']} in {parts[c['name']].get('wall_s', 0):.1f} s",
                  flush=True)
            # written after every component: a run stopped from outside keeps what finished
            rec.update(elapsed_s=time.perf_counter() - t0, summary=summary(parts), components=parts)
            out.write_text(json.dumps(rec, indent=1))
    print(json.dumps(rec["summary"], indent=1))
    print(f"[run_all] {len(parts)} components, {sum(p['status'] == 'ok' for p in parts.values())} ok, "
          f"{rec['elapsed_s']:.0f} s; record: {out}")
    return out


if __name__ == "__main__":
    main()
