"""`memstack memory ...`: inspect, snapshot, roll back, export/import and update the sparse
tables of a checkpoint (see memory/sparse/store.py and online.py)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from memstack.errors import MemstackError

EPILOG = """examples:
  memstack memory stats    --checkpoint runs/engram
  memstack memory snapshot --checkpoint runs/engram --store runs/engram-tables
  memstack memory learn    --checkpoint runs/engram --store runs/engram-tables --text "the code of kemo ravi is pano."
  memstack memory log      --store runs/engram-tables
  memstack memory export   --store runs/engram-tables --from 1 --to 3 --out delta.safetensors
  memstack memory import   --store replica-tables --delta delta.safetensors
  memstack memory rollback --store runs/engram-tables --version 2
  memstack memory apply    --checkpoint runs/engram --store runs/engram-tables --out runs/engram-v2
"""


_NAMESPACE_QUOTA = object()   # --quota not given: the namespace's own write_quota applies


def _quota(text: str) -> int | None | str:
    """--quota: `none` (no quota, said explicitly) or an integer; its range is checked with the rest."""
    if text.strip().lower() == "none":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a quota is a positive integer or `none`, got {text!r}") from None


def _norm_cap(text: str) -> float | None:
    """--max-row-norm: `none` (no cap, said explicitly) or a number; NaN / inf / <= 0 are refused later."""
    if text.strip().lower() == "none":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a norm cap is a finite number > 0 or `none`, got {text!r}") from None


def _tables(model) -> dict:
    from memstack.memory.sparse.table import SparseTable

    return {n: m for n, m in model.named_modules() if isinstance(m, SparseTable)}


def _pick(model, name: str | None):
    tables = _tables(model)
    if not tables:
        raise MemstackError("this checkpoint has no sparse tables (engram, pkm)")
    if name is None:
        if len(tables) > 1:
            raise MemstackError(f"the checkpoint has several tables; pick one with --table: {', '.join(tables)}")
        name = next(iter(tables))
    if name not in tables:
        raise MemstackError(f"no table {name!r}; tables: {', '.join(tables)}")
    return name, tables[name]


def _load(args):
    from memstack.train.run import load_for_inference

    model, meta, tok = load_for_inference(args.checkpoint, "cpu")
    return model, meta, tok


def _specs(table) -> list[dict]:
    return [dict(s.__dict__) for s in table.specs]


def cmd_stats(args) -> int:
    out: dict = {}
    if args.checkpoint:
        model, _, _ = _load(args)
        out["tables"] = []
        for name, t in _tables(model).items():
            rec = {"table": name, "rows": t.n_rows, "dim": t.dim, "bytes": t.nbytes(), "namespaces": _specs(t)}
            owner = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else None
            if owner is not None and hasattr(owner, "layout"):
                lay = owner.layout
                rec["hash_layout"] = {"fingerprint": lay.fingerprint(), "version": lay.version,
                                      "compressed_vocab": lay.compressed_vocab, "orders": list(lay.orders),
                                      "heads": lay.heads, "tokenizer_fingerprint": lay.tokenizer_fingerprint}
            out["tables"].append(rec)
    if args.store:
        from memstack.memory.sparse.store import TableStore

        st = TableStore(args.store)
        out["store"] = {"root": str(st.root), "head": st.head, **st.info,
                        "versions": [{"version": v.version, "parent": v.parent, "kind": v.kind, "rows": v.touched,
                                      "meta": v.meta} for v in st.versions()]}
    if not out:
        raise MemstackError("give --checkpoint and/or --store")
    print(json.dumps(out, indent=1))
    return 0


def cmd_snapshot(args) -> int:
    from memstack.memory.sparse.store import TableStore

    model, _, _ = _load(args)
    name, table = _pick(model, args.table)
    st = TableStore(args.store)
    meta = {"checkpoint": str(args.checkpoint), "table": name, "note": args.note or ""}
    if st.exists:
        if st.info["namespaces"] != _specs(table):
            raise MemstackError(f"{args.store} holds a table with another namespace layout")
        v = st.commit(table.weight, table.weight.new_zeros(0).long(), meta, full=True)
    else:
        v = st.create(table.weight, _specs(table), meta)
    print(f"{args.store}: version {v} ({table.n_rows} rows x {table.dim}, full snapshot of {name})")
    return 0


def _report_cleaned(store) -> None:
    """Say what opening the store removed (left by an interrupted write)."""
    if store.cleaned:
        names = ", ".join(str(p.relative_to(store.root)) for p in store.cleaned[:5])
        more = f" and {len(store.cleaned) - 5} more" if len(store.cleaned) > 5 else ""
        print(f"{store.root}: removed {len(store.cleaned)} file(s) left by an interrupted write: {names}{more}",
              file=sys.stderr)


def cmd_log(args) -> int:
    from memstack.memory.sparse.store import TableStore

    st = TableStore(args.store)
    head = st.head
    versions = st.versions()                      # every committed version, verified: an error, never a gap
    _report_cleaned(st)
    for v in versions:
        mark = "*" if v.version == head else " "
        print(f"{mark} v{v.version:<5} parent {v.parent:<5} {v.kind:<5} {v.touched:>8} rows  {json.dumps(v.meta)}")
    return 0


def cmd_rollback(args) -> int:
    from memstack.memory.sparse.store import TableStore

    TableStore(args.store).rollback(args.version)
    print(f"{args.store}: HEAD is now version {args.version}")
    return 0


def cmd_export(args) -> int:
    from memstack.memory.sparse.store import TableStore

    h = TableStore(args.store).export_delta(args.from_version, args.to_version, args.out)
    print(f"{args.out}: {h['n_rows']} rows, version {h['from_version']} -> {h['to_version']}")
    return 0


def cmd_import(args) -> int:
    from memstack.memory.sparse.store import TableStore

    v = TableStore(args.store).import_delta(args.delta)
    print(f"{args.store}: imported {args.delta} as version {v}")
    return 0


def cmd_learn(args) -> int:
    import torch

    from memstack.errors import ConfigError
    from memstack.memory.sparse.grants import SHARED, NamespaceAuthority
    from memstack.memory.sparse.online import OnlineUpdater, UpdatePolicy, updater_reasons
    from memstack.memory.sparse.store import TableStore
    from memstack.memory.sparse.table import namespace_reasons

    # every option checked before anything is loaded, every problem reported at once
    reasons = updater_reasons(args.lr, "adam", (0.9, 0.999), 1e-8, args.top_t) + namespace_reasons(args.namespace)
    if args.steps < 1:
        reasons.append(f"--steps must be >= 1, got {args.steps}")
    quotas = {} if args.quota is _NAMESPACE_QUOTA else {args.namespace: args.quota}
    try:
        policy = UpdatePolicy(max_row_update_norm=args.max_row_norm, quotas=quotas)
    except ConfigError as e:
        reasons += e.reasons
    if reasons:
        raise ConfigError(reasons, what="`memory learn` options")
    model, _, tok = _load(args)
    if tok is None:
        raise MemstackError(f"{args.checkpoint} records no tokenizer; it cannot read text")
    name, table = _pick(model, args.table)
    if args.namespace not in {s.name for s in table.specs}:
        raise MemstackError(f"{name} has no namespace {args.namespace!r}; it has {[s.name for s in table.specs]}")
    st = TableStore(args.store)
    if not st.exists:
        raise MemstackError(f"{args.store} is not a table store; run `memstack memory snapshot` first")
    table_w = st.load()
    if tuple(table_w.shape) != tuple(table.weight.shape):
        raise MemstackError(f"{args.store} holds a {tuple(table_w.shape)} table, the checkpoint's is {tuple(table.weight.shape)}")
    with torch.no_grad():
        table.weight.copy_(table_w)             # continue from the store's HEAD
    text = Path(args.file).read_text() if args.file else args.text
    if not text:
        raise MemstackError("give --text or --file")
    ids = [tok.eot_id] + tok.encode(text)
    S = model.cfg.backbone.seg_len
    chunks = [ids[i:i + S + 1] for i in range(0, max(len(ids) - 1, 1), S)]
    # the command line is the operator: it may write any namespace, and writes the one it is given
    authority = NamespaceAuthority()
    into = args.namespace if args.namespace == SHARED else authority.grant(args.namespace)
    up = OnlineUpdater(model, table, lr=args.lr, top_t=args.top_t, policy=policy, store=st, authority=authority)
    ok = rejected = 0
    for step in range(args.steps):
        for c in chunks:
            if len(c) < 2:
                continue
            t = torch.tensor([c])
            res = up.step(t[:, :-1], t[:, 1:], into=[into])
            if res.accepted:
                ok += 1
            else:
                rejected += 1
                print(f"step {step}: update rejected, table unchanged: " + "; ".join(res.reasons))
    if not up.pending:
        print("nothing to commit (no accepted update)")
        return 1 if rejected else 0
    v = up.commit({"learned": (args.file or args.text)[:80], "steps": args.steps, "accepted": ok, "rejected": rejected})
    print(f"{args.store}: version {v} "
          f"-- {ok} updates accepted, {rejected} rejected; rows written: {st.version(v).touched}")
    return 0


def cmd_apply(args) -> int:
    import torch

    from memstack.checkpoint import save_checkpoint
    from memstack.memory.sparse.store import TableStore

    model, meta, _ = _load(args)
    name, table = _pick(model, args.table)
    st = TableStore(args.store)
    w = st.load(args.version)
    with torch.no_grad():
        table.weight.copy_(w)
    v = args.version or st.head
    save_checkpoint(model, args.out, meta={**meta, "tables_from": str(args.store), "table_version": v})
    print(f"{args.out}: checkpoint with {name} at store version {v}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("memory", help="sparse tables: stats, snapshots, rollback, deltas, online learning",
                       description="Work with the sparse memory tables (Engram, PKM) of a checkpoint: versioned, "
                       "checksummed snapshots in a table store, rollback to any version, export/import of the "
                       "touched-row delta between versions, and online learning from text that updates only "
                       "table rows under a safety policy (NaN/Inf rejection, per-row update-norm cap, "
                       "per-namespace write quota).", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    ms = p.add_subparsers(dest="action", metavar="ACTION", required=True)

    def common(s, ckpt=True, store=True, table=True):
        if ckpt:
            s.add_argument("--checkpoint", required=True, help="a checkpoint dir, or a training out_dir")
        if store:
            s.add_argument("--store", required=True, help="table store directory")
        if table:
            s.add_argument("--table", help="table module name when the model has several (see `stats`)")

    s = ms.add_parser("stats", help="tables (rows, namespaces, hash layout) and store versions")
    s.add_argument("--checkpoint")
    s.add_argument("--store")
    s.set_defaults(fn=cmd_stats)
    s = ms.add_parser("snapshot", help="full snapshot of a checkpoint's table (creates the store)")
    common(s)
    s.add_argument("--note")
    s.set_defaults(fn=cmd_snapshot)
    s = ms.add_parser("log", help="list the versions of a store (* = HEAD)")
    common(s, ckpt=False, table=False)
    s.set_defaults(fn=cmd_log)
    s = ms.add_parser("rollback", help="make an earlier (or any) version current")
    common(s, ckpt=False, table=False)
    s.add_argument("--version", type=int, required=True)
    s.set_defaults(fn=cmd_rollback)
    s = ms.add_parser("export", help="write the rows that differ between two versions")
    common(s, ckpt=False, table=False)
    s.add_argument("--from", dest="from_version", type=int, required=True)
    s.add_argument("--to", dest="to_version", type=int, required=True)
    s.add_argument("--out", required=True)
    s.set_defaults(fn=cmd_export)
    s = ms.add_parser("import", help="apply an exported delta onto the same base version, as a new version")
    common(s, ckpt=False, table=False)
    s.add_argument("--delta", required=True)
    s.set_defaults(fn=cmd_import)
    s = ms.add_parser("learn", help="learn from text by updating table rows only (frozen backbone), then commit")
    common(s)
    s.add_argument("--text")
    s.add_argument("--file")
    s.add_argument("--steps", type=int, default=20, help="passes over the text")
    s.add_argument("--lr", type=float, default=1e-2)
    s.add_argument("--top-t", type=int, default=None, help="update only the t touched rows with the highest TF-IDF")
    s.add_argument("--max-row-norm", type=_norm_cap, default=1.0,
                   help="reject updates moving a row further than this (a finite number > 0; `none`: no cap)")
    s.add_argument("--namespace", default="knowledge", help="the namespace the text is learnt into (rows of other "
                   "namespaces the text touches are left unchanged)")
    s.add_argument("--quota", type=_quota, default=_NAMESPACE_QUOTA,
                   help="rows this commit may write in --namespace: a positive integer, or `none` for no quota "
                   "(default: the namespace's own write_quota)")
    s.set_defaults(fn=cmd_learn)
    s = ms.add_parser("apply", help="write a checkpoint whose table is a store version")
    common(s)
    s.add_argument("--version", type=int, default=None, help="default: HEAD")
    s.add_argument("--out", required=True)
    s.set_defaults(fn=cmd_apply)
