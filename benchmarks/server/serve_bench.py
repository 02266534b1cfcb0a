"""memstack serve over HTTP vs the same engine in-process, and a loopback soak test.

    python benchmarks/server/serve_bench.py throughput [--clients 1 16 64] [--reps 2]
        [--server now= --server coalesced=:0.02 --server before=/path/to/old/tree]
    python benchmarks/server/serve_bench.py soak --clients 64 --duration 60 [--json out.json]

throughput: one checkpoint (a small random-weight memstack model, byte tokenizer) is served by a
`memstack serve` subprocess; this process is the load generator (asyncio, one streaming client
per concurrency slot, closed loop: each client sends its next request when the last one ends).
The peer is the same checkpoint on the same EngineConfig driven in-process (add_request/step in a
closed loop with the same concurrency) in this process while the server idles. Same prompts (fresh
ones per run, so no run hits another's prefix cache), same max_tokens, `ignore_eos`, so both sides
generate exactly the same number of tokens. Runs are interleaved (in-process, HTTP, in-process,
HTTP, ...) because the machine is shared; the overhead ratio is HTTP wall time / in-process wall
time of the same workload, per repetition, and the median is reported; so is the CPU-time ratio
(the server process's CPU time / the in-process run's CPU time), which a shared machine disturbs
less than wall time; the client's own CPU time is reported beside it.

--server LABEL=[SRC][:INTERVAL] (repeatable) serves the same checkpoint from several servers at
once -- SRC: another source tree (e.g. `git archive` of an earlier commit; default this one),
INTERVAL: its --stream-interval -- and runs each in every repetition, interleaved with the same
in-process run: before/after figures from one run on one machine. Default: one server, this tree.

soak: C streaming clients for D seconds against the server; errors, TTFT and latency percentiles,
server RSS before/after.

The client speaks HTTP/1.1 over asyncio streams (a benchmark client, kept minimal so that it costs
little CPU next to the server on the same cores); it checks status codes and the SSE framing.
Benchmarks measure, never assert; one JSON record per run under reports/benchmarks/server/.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))
from common import device_info, git_sha, table  # noqa: E402

PROMPT, GEN = 32, 64


def build_checkpoint(path: Path, d_model: int, n_layers: int) -> None:
    from memstack.backbone.model import build_model
    from memstack.checkpoint import save_checkpoint
    from memstack.config import BackboneConfig
    from memstack.data.tokenizers import get_tokenizer
    from memstack.memory.kv.config import DenseKVConfig

    tok = get_tokenizer("byte")
    torch.manual_seed(0)
    b = BackboneConfig(vocab_size=tok.vocab_size, d_model=d_model, n_layers=n_layers, n_heads=4, seg_len=512)
    save_checkpoint(build_model(b, [DenseKVConfig()]).eval(), path, {"tokenizer": "byte",
                                                                       "tokenizer_fingerprint": tok.fingerprint()})


def prompts(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(256) for _ in range(PROMPT)] for _ in range(n)]


# -- the in-process peer -------------------------------------------------------------------------
def inproc(engine, work: list[list[int]], clients: int) -> dict:
    from memstack.generate import SamplingConfig

    params = SamplingConfig(max_new_tokens=GEN, temperature=0.0)
    todo, active, ttft, lat, tokens = list(work), {}, [], [], 0
    t0 = time.perf_counter()

    def add():
        rid = engine.add_request(todo.pop(), params)
        active[rid] = [time.perf_counter(), None]

    while todo and len(active) < clients:
        add()
    while active:
        for o in engine.step():
            a = active.get(o.request_id)
            if a is None:
                continue
            tokens += len(o.new_tokens)
            if a[1] is None and o.new_tokens:
                a[1] = time.perf_counter()
                ttft.append(a[1] - a[0])
            if o.finished:
                engine.requests.pop(o.request_id, None)
                lat.append(time.perf_counter() - a[0])
                del active[o.request_id]
                if todo:
                    add()
    return summary(time.perf_counter() - t0, len(work), tokens, ttft, lat, 0)


# -- the HTTP client ---------------------------------------------------------------------------------
async def one(host: str, port: int, body: bytes, conn: list) -> tuple[float | None, float, int]:
    """One streaming completion on a kept-alive connection: (ttft, latency, tokens)."""
    if not conn:
        conn.extend(await asyncio.open_connection(host, port))
    reader, writer = conn
    t0 = time.perf_counter()
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(body) + body)
    status = (await reader.readline()).split(b" ")[1]
    headers = {}
    while (line := await reader.readline()) not in (b"\r\n", b""):
        k, _, v = line.decode().partition(":")
        headers[k.strip().lower()] = v.strip()
    if status != b"200":
        data = await reader.readexactly(int(headers.get("content-length", 0)))
        raise RuntimeError(f"HTTP {status.decode()}: {data[:200]!r}")
    ttft, tokens, buf = None, 0, b""
    while True:                                                   # chunked transfer encoding
        size = int((await reader.readline()).strip(), 16)
        if size == 0:
            await reader.readline()
            break
        buf += await reader.readexactly(size)
        await reader.readexactly(2)
        while b"\n\n" in buf:
            event, buf = buf.split(b"\n\n", 1)
            if not event.startswith(b"data: "):
                raise RuntimeError(f"bad SSE event {event[:80]!r}")
            if event == b"data: [DONE]":
                continue
            msg = json.loads(event[6:])
            if "error" in msg:
                raise RuntimeError(msg["error"]["message"])
            if msg["choices"] and ttft is None:
                ttft = time.perf_counter() - t0
            if msg.get("usage"):
                tokens = msg["usage"]["completion_tokens"]
    return ttft, time.perf_counter() - t0, tokens


async def http_load(url: str, work: list[list[int]] | None, clients: int, duration: float | None = None,
                    prompt_seed: int = 0) -> dict:
    host, port = url.split("//")[1].split(":")
    port = int(port)
    queue = list(work) if work is not None else None
    ttft, lat, tokens, errors, done = [], [], 0, [], 0
    stop_at = time.perf_counter() + duration if duration else None
    rng = random.Random(prompt_seed)

    async def client():
        nonlocal tokens, done
        conn: list = []
        while True:
            if queue is not None:
                if not queue:
                    break
                p = queue.pop()
            else:
                if time.perf_counter() >= stop_at:
                    break
                p = [rng.randrange(256) for _ in range(PROMPT)]
            body = json.dumps({"prompt": p, "max_tokens": GEN, "temperature": 0, "stream": True, "ignore_eos": True,
                               "stream_options": {"include_usage": True}}).encode()
            try:
                t, l_, n = await one(host, port, body, conn)
                ttft.append(t)
                lat.append(l_)
                tokens += n
                done += 1
            except Exception as e:  # noqa: BLE001 -- counted and reported, the load goes on
                errors.append(f"{type(e).__name__}: {e}")
                if conn:
                    conn[1].close()
                conn.clear()
        if conn:
            conn[1].close()

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return summary(time.perf_counter() - t0, done, tokens, ttft, lat, len(errors), errors[:5])


def summary(wall, n, tokens, ttft, lat, errors, examples=()) -> dict:
    pct = lambda xs, q: statistics.quantiles(xs, n=100, method="inclusive")[q - 1] if len(xs) > 1 else (xs or [0])[0]
    return {"wall_s": wall, "requests": n, "tokens": tokens, "req_per_s": n / wall, "tok_per_s": tokens / wall,
            "ttft_p50_ms": 1e3 * pct(ttft, 50), "ttft_p99_ms": 1e3 * pct(ttft, 99),
            "lat_p50_ms": 1e3 * pct(lat, 50), "lat_p99_ms": 1e3 * pct(lat, 99), "errors": errors,
            "error_examples": list(examples)}


# -- the server process --------------------------------------------------------------------------------
def start_server(ck: Path, cfg: dict, src: str = "", interval: str = "") -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "memstack.cli", "serve", "--checkpoint", str(ck), "--port", "0", "--no-access-log",
           "--log-level", "warning", "--block-size", str(cfg["block_size"]), "--kv-memory-mb", str(cfg["kv_memory_mb"]),
           "--max-num-seqs", str(cfg["max_num_seqs"])] + (["--stream-interval", interval] if interval else [])
    env = {**os.environ, "OMP_NUM_THREADS": str(cfg["threads"])}
    if src:                                         # another source tree of memstack (before/after in one run)
        env["PYTHONPATH"] = str(Path(src).resolve()) + os.pathsep + env.get("PYTHONPATH", "")
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    line = p.stdout.readline()
    if "memstack serve:" not in line:
        raise RuntimeError(p.stderr.read())
    return p, line.split(" on ")[1].split()[0].rstrip(";")


def cpu_s(p: subprocess.Popen) -> float:
    t = psutil.Process(p.pid).cpu_times()
    return t.user + t.system


def rss_mb(p: subprocess.Popen) -> float:
    return psutil.Process(p.pid).memory_info().rss / 2**20


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("mode", choices=["throughput", "soak"])
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--requests", type=int, default=None, help="per run (default: max(2 x clients, 16))")
    ap.add_argument("--duration", type=float, default=60.0, help="soak: seconds")
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1, help="torch threads, both sides (a shared machine: 1)")
    ap.add_argument("--server", action="append", default=None, metavar="LABEL=[SRC][:INTERVAL]",
                    help="a server to measure (repeatable): SRC another source tree, INTERVAL its --stream-interval")
    ap.add_argument("--json", help="also write the record here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = {"block_size": 16, "kv_memory_mb": 64.0, "max_num_seqs": 64}
    tmp = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    build_checkpoint(tmp / "ck", args.d_model, args.layers)
    specs = []
    for spec in args.server or ["http="]:
        label, _, rest = spec.partition("=")
        src, _, interval = rest.partition(":")
        specs.append((label, src, interval))
    servers = {label: start_server(tmp / "ck", {**cfg, "threads": args.threads}, src, interval)
               for label, src, interval in specs}
    server, url = next(iter(servers.values()))
    rows, rec = [], {"benchmark": f"server-{args.mode}", "date": time.strftime("%Y-%m-%d %H:%M:%S"), "git": git_sha(),
                     "device": device_info("cpu"), "torch": torch.__version__, "load_avg_start": os.getloadavg(),
                     "config": {**cfg, "threads": args.threads, "d_model": args.d_model, "layers": args.layers, "prompt": PROMPT, "gen": GEN,
                                "clients": args.clients, "servers": specs}}
    try:
        if args.mode == "soak":
            rss0 = rss_mb(server)
            for c in args.clients:
                r = asyncio.run(http_load(url, None, c, args.duration, prompt_seed=c))
                rows.append({"clients": c, "mode": "http", **r})
            rec["rss_mb_before"], rec["rss_mb_after"] = rss0, rss_mb(server)
        else:
            from memstack.engine import Engine, EngineConfig
            from memstack.train.run import load_for_inference

            model, _, _ = load_for_inference(tmp / "ck", "cpu")
            engine = Engine(model, EngineConfig(device="cpu", **cfg))
            for _, (_, u) in servers.items():
                asyncio.run(http_load(u, prompts(8, 999), 4))                         # warm every side up
            inproc(engine, prompts(8, 998), 4)
            run = 0
            for c in args.clients:
                n = args.requests or max(2 * c, 16)
                for rep in range(args.reps):
                    run += 1
                    cpu0 = time.process_time()
                    a = inproc(engine, prompts(n, 100 * run), c)
                    a["cpu_s"] = time.process_time() - cpu0
                    rows.append({"clients": c, "rep": rep, "mode": "in-process", **a})
                    order = list(servers.items())
                    if rep % 2:
                        order.reverse()                 # neither server always runs right after the in-process one
                    for k, (label, (proc, u)) in enumerate(order):
                        srv0, cpu0 = cpu_s(proc), time.process_time()
                        b = asyncio.run(http_load(u, prompts(n, 100 * run + 1 + k), c))
                        b["cpu_s"], b["client_cpu_s"] = cpu_s(proc) - srv0, time.process_time() - cpu0
                        rows.append({"clients": c, "rep": rep, "mode": label, **b, "ratio": b["wall_s"] / a["wall_s"],
                                     "cpu_ratio": b["cpu_s"] / a["cpu_s"]})
        rec["load_avg_end"] = os.getloadavg()
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(30)
    rec["results"] = rows
    out = Path(os.environ.get("MEMSTACK_BENCH_OUT", "reports/benchmarks/server"))
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{rec['benchmark']}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(rec, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(rec, indent=1))
    print(table(rows, ["clients", "mode", "requests", "tokens", "wall_s", "req_per_s", "tok_per_s", "ttft_p50_ms",
                       "ttft_p99_ms", "lat_p50_ms", "lat_p99_ms", "errors", "cpu_s", "client_cpu_s", "ratio", "cpu_ratio"]))
    if args.mode == "throughput":
        for c in args.clients:
            for label in servers:
                ratios = [r["ratio"] for r in rows if r["clients"] == c and r["mode"] == label]
                cpu = [r["cpu_ratio"] for r in rows if r["clients"] == c and r["mode"] == label]
                print(f"clients {c}, {label}: HTTP / in-process, median of {len(ratios)}: wall "
                      f"{statistics.median(ratios):.3f} (range {min(ratios):.3f}-{max(ratios):.3f}), "
                      f"server CPU {statistics.median(cpu):.3f}")
    else:
        print(f"server RSS {rec['rss_mb_before']:.0f} MiB before, {rec['rss_mb_after']:.0f} MiB after")
    print(f"record: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
