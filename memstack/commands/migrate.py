"""`memstack migrate PATH`: bring files written by an older memstack (format 1, whose JSON
metadata carried no checksum) to the current, sealed formats (memstack/atomic.py).

What it migrates, found from PATH (a directory):
    a table store        HEAD + store.json + versions/  (memstack memory snapshot)
    a datastore          manifest.json                  (memstack datastore build)
    a model checkpoint   config.json (+ shards/)        (save_checkpoint)
    a trainer checkpoint step-*/ with trainer.json, optim.safetensors, carry.json; the `latest` pointer
    saved model states   <name>.json beside <name>-<sha>.safetensors
and any of them below PATH (a training run's out dir, a folder of stores).

Every data file an old document names is first verified against the SHA-256 that document
recorded; a mismatch stops the migration of that artefact and leaves it untouched. The old
documents themselves carried no checksum, so their content is taken as it is now -- migrate files
you have not edited by hand. Documents are rewritten lowest level first and the top one (HEAD,
latest) last, so an interrupted migration leaves the artefact readable by the old format's rules
or finishes when run again. KV prefix exports and KV disk-tier chunks are not migrated: export
the prefix again; a disk tier recomputes what it refuses.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any, Callable

from memstack.atomic import (StoreLock, read_sealed, remove_unreferenced, save_tensors_versioned, sha256_file,
                             write_sealed)
from memstack.errors import IntegrityError, MemstackError


class MigrationError(MemstackError):
    """An artefact that cannot be migrated (its data does not match its old manifest)."""


def _old(path: Path) -> dict | None:
    """A format-1 JSON document (a dict without a seal), or None if `path` is something else."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and "checksum" not in doc else None


def _verified(directory: Path, name: object, sha: object, what: Path) -> Path:
    f = directory / str(name)
    if not f.is_file() or sha256_file(f) != sha:
        raise MigrationError(f"{f} (named by {what}) is missing or does not match the SHA-256 recorded for it; "
                             "nothing was migrated")
    return f


def _body(doc: dict, drop: tuple[str, ...] = ("format", "kind")) -> dict:
    return {k: v for k, v in doc.items() if k not in drop}


# ----------------------------------------------------------------------------- one artefact each

def table_store(root: Path) -> str:
    from memstack.memory.sparse import store as st

    with StoreLock(root):
        head = _old(root / "HEAD")
        if head is None:
            read_sealed(root / "HEAD", st.KIND_HEAD, st.STORE_FORMAT)
            return "already current"
        info = _old(root / "store.json")
        manifests: dict[int, dict] = {}
        for p in sorted((root / "versions").glob("v*.json")):
            d = _old(p)
            if d is None:                                   # sealed by an interrupted migration
                d = read_sealed(p, st.KIND_VERSION, st.STORE_FORMAT)
                d["kind"] = d["snapshot"]
            manifests[int(p.stem[1:])] = d
        if info is None:
            info = _body(read_sealed(root / "store.json", st.KIND_STORE, st.STORE_FORMAT), ("format", "kind", "checksum"))
        for v, d in manifests.items():
            if d.get("version") != v or not 0 <= d.get("parent", -1) < v or d.get("kind") not in ("full", "delta"):
                raise MigrationError(f"{root / 'versions'}/v{v:06d}.json is inconsistent; nothing was migrated")
            _verified(root, d["file"], d["sha256"], root / "versions" / f"v{v:06d}.json")
        if head.get("version") not in manifests:
            raise MigrationError(f"{root / 'HEAD'} names version {head.get('version')!r}, which has no manifest")
        store_sum = write_sealed(root / "store.json", st.KIND_STORE, st.STORE_FORMAT,
                                 {k: info[k] for k in ("rows", "dim", "dtype", "namespaces")})
        sums: dict[int, str] = {}
        for v in sorted(manifests):
            d = manifests[v]
            sums[v] = write_sealed(root / "versions" / f"v{v:06d}.json", st.KIND_VERSION, st.STORE_FORMAT, {
                "version": v, "parent": d["parent"], "parent_manifest": sums.get(d["parent"]), "store": store_sum,
                "snapshot": d["kind"], "file": d["file"], "sha256": d["sha256"], "touched": d["touched"],
                "created": d["created"], "meta": d.get("meta", {})})
        write_sealed(root / "HEAD", st.KIND_HEAD, st.STORE_FORMAT,
                     {"version": head["version"], "manifest": sums[head["version"]], "last": max(manifests)})
    return f"table store: {len(manifests)} versions"


def datastore(root: Path) -> str:
    from memstack.memory.retrieval import store as ds

    mf = root / "manifest.json"
    with StoreLock(root):
        old = _old(mf)
        if old is None:
            read_sealed(mf, ds.KIND, ds.STORE_FORMAT)
            return "already current"
        if old.get("kind") != ds.KIND or old.get("format") != 1:
            raise MigrationError(f"{mf} is not a format-1 datastore manifest")
        from safetensors.torch import load_file

        tf = _verified(root, old.get("tensors"), old.get("sha256"), mf)
        raw = mf.read_bytes()
        # format 2 also binds the namespaces, id counter and row count into the tensor file's header
        name, sha = save_tensors_versioned(load_file(str(tf)), root, "store",
                                           metadata=ds._bound(old["namespaces"], old["next_id"], old["rows"]))
        write_sealed(mf, ds.KIND, ds.STORE_FORMAT, {**_body(old), "tensors": name, "sha256": sha})
    try:
        ds.Datastore.open(root)                             # the columns must agree with the manifest
    except MemstackError as e:
        mf.write_bytes(raw)
        raise MigrationError(f"{root}: its columns contradict its manifest; left as it was:\n{e}") from None
    remove_unreferenced(root, "store", {name})
    return "datastore"


def model_state(manifest: Path) -> str:
    from memstack.memory import state as ms

    old = _old(manifest)
    if old is None:
        return "already current"
    if old.get("format") != 1 or "skeleton" not in old:
        raise MigrationError(f"{manifest} is not a format-1 saved state")
    _verified(manifest.parent, old.get("tensors"), old.get("sha256"), manifest)
    write_sealed(manifest, ms.STATE_KIND, ms.STATE_FORMAT, _body(old))
    return "model state"


def checkpoint(root: Path) -> str:
    from memstack import checkpoint as ck
    from memstack.memory.sparse import shard

    cf = root / "config.json"
    old = _old(cf)
    if old is None:
        read_sealed(cf, ck.KIND, ck.FORMAT)
        return "already current"
    if old.get("format") != 1:
        raise MigrationError(f"{cf} is not a format-1 checkpoint config")
    _verified(root, old.get("weights"), old.get("sha256"), cf)
    shards = None
    if (root / "shards").is_dir():
        tables = {}
        for p in sorted((root / "shards").glob("*.json")):
            idx = _old(p)
            if idx is None or p.name == "index.json":
                continue
            for part in idx["parts"]:
                _verified(root / "shards", part["file"], part["sha256"], p)
            optim: dict[str, list] = {}
            pat = re.compile(re.escape(f"optim.{p.stem}.") + r"([A-Za-z_]+)\.rows-(\d+)-(\d+)\.safetensors")
            for f in sorted((root / "shards").glob(f"optim.{p.stem}.*.rows-*.safetensors")):
                if m := pat.fullmatch(f.name):       # format 1 kept no checksum for these: taken as they are
                    optim.setdefault(m[1], []).append({"lo": int(m[2]), "hi": int(m[3]), "file": f.name,
                                                       "sha256": sha256_file(f)})
            tables[p.stem] = {"rows": idx["rows"], "dim": idx["dim"], "parts": idx["parts"], "optim": optim}
        shards = write_sealed(root / "shards" / "index.json", shard.INDEX_KIND, shard.INDEX_FORMAT, {"tables": tables})
    write_sealed(cf, ck.KIND, ck.FORMAT, {**_body(old), "shards": shards})
    return "checkpoint"


def trainer_step(step: Path) -> str:
    from memstack.train import trainer as tr

    tj = step / "trainer.json"
    old = _old(tj)
    checkpoint(step)
    carry = None
    if (step / "carry.json").is_file():
        model_state(step / "carry.json")
        carry = read_sealed(step / "carry.json", "memstack-state", 2)["checksum"]
    if old is None:
        read_sealed(tj, tr.TRAINER_KIND, tr.TRAINER_FORMAT)
        return "already current"
    if old.get("format") != 1:
        raise MigrationError(f"{tj} is not a format-1 trainer state")
    body = {**_body(old), "optim_sha256": sha256_file(step / "optim.safetensors"),
            "config": read_sealed(step / "config.json", "memstack-checkpoint", 2)["checksum"], "carry": carry}
    write_sealed(tj, tr.TRAINER_KIND, tr.TRAINER_FORMAT, body)
    return "trainer checkpoint"


def trainer_latest(root: Path) -> str:
    from memstack.train import trainer as tr

    latest = root / "latest"
    text = latest.read_text().strip()
    if text.startswith("{"):
        read_sealed(latest, tr.LATEST_KIND, tr.TRAINER_FORMAT)
        return "already current"
    step = root / text
    if not re.fullmatch(r"step-\d+", text) or not (step / "trainer.json").is_file():
        raise MigrationError(f"{latest} names {text!r}, which is not a step of {root}")
    trainer_step(step)
    write_sealed(latest, tr.LATEST_KIND, tr.TRAINER_FORMAT,
                 {"step": text, "trainer": read_sealed(step / "trainer.json", tr.TRAINER_KIND, tr.TRAINER_FORMAT)["checksum"]})
    return "trainer latest pointer"


# ----------------------------------------------------------------------------- discovery

def plan(root: Path) -> list[tuple[Path, Callable[[Path], str]]]:
    """What to migrate under `root`, in an order where every document is rewritten after what it
    names (steps before `latest`)."""
    out: list[tuple[Path, Callable[[Path], str]]] = []
    todo = [root]
    while todo:
        d = todo.pop()
        if (d / "HEAD").is_file() and (d / "store.json").is_file():
            out.append((d, table_store))
            continue
        if (d / "manifest.json").is_file():
            out.append((d, datastore))
            continue
        if (d / "trainer.json").is_file():
            out.append((d, trainer_step))
            continue
        if (d / "config.json").is_file():
            out.append((d, checkpoint))
        latest = (d / "latest").is_file()
        for f in sorted(d.glob("*.json")):
            if f.name != "config.json" and "skeleton" in (_old(f) or {}):
                out.append((f, model_state))
        out += [(s, trainer_step) for s in sorted(d.glob("step-*")) if (s / "trainer.json").is_file()]
        if latest:
            out.append((d, trainer_latest))
        todo += [c for c in sorted(d.iterdir(), reverse=True)
                 if c.is_dir() and not c.name.startswith((".", "step-")) and c.name != "shards"]
    return out


def migrate(root: str | Path, log: Callable[[str], Any] = print) -> int:
    """Migrate everything found under `root`; returns how many artefacts failed."""
    root = Path(root)
    if not root.is_dir():
        raise MemstackError(f"{root} is not a directory")
    steps = plan(root)
    if not steps:
        log(f"{root}: nothing memstack wrote was found here")
    failed = 0
    for path, fn in steps:
        try:
            log(f"{path}: {fn(path)}")
        except (MigrationError, IntegrityError) as e:
            failed += 1
            log(f"{path}: NOT migrated: {e}")
    return failed


def add_parser(sub) -> None:
    s = sub.add_parser("migrate", help="bring stores and checkpoints written by an older memstack to the current, "
                       "checksummed formats", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("path", help="a store, checkpoint or run directory (everything below it is migrated)")
    s.set_defaults(fn=lambda args: 1 if migrate(args.path) else 0)
