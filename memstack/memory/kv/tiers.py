"""KV tiers below the device pool: host memory, then disk -- prefix blocks that outlive the pool
and the process (LMCache's storage hierarchy, SGLang's HiCache, vLLM's offloading connector).

Unit of transfer: a run of whole blocks, each contiguous across all layers (store.py), gathered
into one contiguous tensor -- never per-layer or per-token pieces (the reference note's finding:
offload throughput is set by the transfer unit). Keys are the prefix keys of memory/kv/hashing.py,
so a block is found again by any request, in any process, whose prefix (and namespace, salt)
matches.

    write:  full blocks computed on the device are copied to host memory and, with a disk tier,
            written through to a chunk file -- asynchronously, on a worker thread (on CUDA the
            device-to-host copy is a non-blocking copy into pinned memory); a lookup never waits
            for them (a block not yet written is a miss, recomputed: correct, just slower)
    read:   on a new request, after the device pool's prefix hit, the chain continues in host
            memory, then on disk; found blocks are loaded into fresh device blocks in one copy
            and become ordinary cached blocks.

Disk layout: <dir>/<namespace digest>/<first key>-<n>.kv-<sha12>.safetensors + a sealed
`<first key>-<n>.kv.json` manifest (the namespace, the keys, the tensor file and its SHA-256,
its shape), written atomically (memstack/atomic.py) under the directory's shared writer lock.
A directory holding another namespace's files is never read for this one (its digest differs);
a manifest that is edited, truncated, of another namespace or whose tensor file fails its
checksum or shape is refused (listed in `refused`) and its blocks recomputed, never used. When a
tier opens with no other writer active, temporaries of dead writers and chunk files that no
manifest names (a crash between the two writes) are removed (`cleaned`).
"""
from __future__ import annotations

import hashlib
import json
import re
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from torch import Tensor

from memstack.atomic import (StoreLock, clean_temporaries, read_sealed, save_tensors_versioned, sha256_file,
                             versioned_name_re, write_sealed)
from memstack.errors import CheckpointError, IntegrityError
from memstack.memory.kv.hashing import CacheNamespace, block_hash
from memstack.memory.kv.store import KVSpec, PagedKVCache


class HostTier:
    """Whole blocks in (pinned, with CUDA) host memory, LRU over `capacity` blocks."""

    def __init__(self, spec: KVSpec, capacity: int):
        pin = torch.cuda.is_available()
        self.buf = torch.zeros((capacity, *spec.block_shape), dtype=spec.dtype, pin_memory=pin)
        self.where: OrderedDict[bytes, int] = OrderedDict()     # key -> slot, least recent first
        self.tags: dict[bytes, object] = {}                        # key -> tag of the sequence that made it
        self.free = list(range(capacity))
        self.lock = threading.Lock()

    def __contains__(self, key: bytes) -> bool:
        with self.lock:
            return key in self.where

    def put(self, keys: list[bytes], data: Tensor, tag=None) -> None:
        with self.lock:
            for key, blk in zip(keys, data):
                if key in self.where:
                    self.where.move_to_end(key)
                    continue
                if self.free:
                    slot = self.free.pop()
                else:
                    old, slot = self.where.popitem(last=False)
                    self.tags.pop(old, None)
                self.buf[slot].copy_(blk)
                self.where[key] = slot
                if tag is not None:
                    self.tags[key] = tag

    def drop(self, match) -> int:
        """Remove (and zero) every block whose tag `match`es; returns how many."""
        with self.lock:
            gone = [k for k, t in self.tags.items() if match(t)]
            for k in gone:
                slot = self.where.pop(k)
                self.buf[slot].zero_()
                self.free.append(slot)
                del self.tags[k]
            return len(gone)

    def get(self, keys: list[bytes]) -> Tensor:
        with self.lock:
            slots = [self.where[k] for k in keys]
            for k in keys:
                self.where.move_to_end(k)
            return self.buf[torch.tensor(slots)]                                 # one contiguous (n, *block) copy


CHUNK_KIND, CHUNK_FORMAT = "memstack-kv-chunk", 1
_KEY_HEX = re.compile(r"[0-9a-f]{64}")


class DiskTier:
    def __init__(self, root: str | Path, namespace: CacheNamespace, block_shape: tuple[int, ...] | None = None):
        self.namespace = namespace
        self.block_shape = tuple(block_shape) if block_shape is not None else None
        digest = hashlib.sha256(json.dumps(namespace.to_dict(), sort_keys=True).encode()).hexdigest()[:16]
        self.dir = Path(root) / digest
        self.dir.mkdir(parents=True, exist_ok=True)
        self.index: dict[bytes, tuple[Path, int, str]] = {}                   # key -> (file, row, sha256)
        self.shapes: dict[Path, tuple[int, ...]] = {}                          # chunk file -> its tensor's shape
        self.tags: dict[Path, tuple[str, ...]] = {}                            # chunk file -> its tag (namespaces)
        self.lock = threading.Lock()
        self.refused: list[str] = []                                             # manifests that failed checks
        self.cleaned = self._clean()
        for m in sorted(self.dir.glob("*.kv.json")):
            self._index(m)

    def _clean(self) -> list[Path]:
        """With no other writer active: remove temporaries of dead writers and chunk files no
        intact manifest names (left by a crash between the tensor file and its manifest)."""
        lock = StoreLock(self.dir)
        try:
            if not lock.acquire(blocking=False):
                return []
        except OSError:
            return []
        try:
            removed = clean_temporaries(self.dir)
            named = set()
            for m in self.dir.glob("*.kv.json"):
                try:
                    named.add(read_sealed(m, CHUNK_KIND, CHUNK_FORMAT, {"tensors": str})["tensors"])
                except IntegrityError:
                    return removed              # a manifest we cannot read: keep every chunk file
            for f in self.dir.glob("*.kv-*.safetensors"):
                stem = f.name.split(".kv-")[0]
                if versioned_name_re(stem + ".kv").fullmatch(f.name) and f.name not in named:
                    f.unlink(missing_ok=True)
                    removed.append(f)
            return removed
        finally:
            lock.release()

    def _index(self, manifest: Path) -> None:
        try:
            meta = read_sealed(manifest, CHUNK_KIND, CHUNK_FORMAT, {"namespace": dict, "keys": list, "tensors": str,
                                                                    "sha256": str, "shape": list},
                               older="written by an older memstack: its blocks are recomputed")
            ns = CacheNamespace(**meta["namespace"])
        except (IntegrityError, TypeError) as e:
            self.refused.append(f"{manifest.name}: {e}")
            return
        keys, name, shape = meta["keys"], meta["tensors"], tuple(meta["shape"])
        bad = self.namespace.mismatches(ns)
        if not all(isinstance(k, str) and _KEY_HEX.fullmatch(k) for k in keys) or len(set(keys)) != len(keys):
            bad.append("its keys are not distinct block keys")
        if not versioned_name_re(manifest.name[:-len(".json")]).fullmatch(name):
            bad.append(f"it names {name!r}, not a chunk file of its own")
        if not shape or shape[0] != len(keys) or (self.block_shape is not None and shape[1:] != self.block_shape):
            bad.append(f"its shape {list(shape)} does not hold {len(keys)} blocks of {self.block_shape}")
        if bad:
            self.refused.append(f"{manifest.name}: " + "; ".join(bad))
            return
        self.shapes[self.dir / name] = shape
        tag = meta.get("tag")                          # absent in chunks written before tags were recorded
        if isinstance(tag, list) and all(isinstance(t, str) for t in tag):
            self.tags[self.dir / name] = tuple(tag)
        for i, k in enumerate(keys):
            self.index.setdefault(bytes.fromhex(k), (self.dir / name, i, meta["sha256"]))

    def __contains__(self, key: bytes) -> bool:
        with self.lock:
            return key in self.index

    def put(self, keys: list[bytes], data: Tensor, tag: tuple[str, ...] | None = None) -> None:
        """One chunk file for a run of blocks (one large sequential write), then its manifest
        (which records `tag`, the namespaces of the sequence that made them)."""
        with self.lock:
            if all(k in self.index for k in keys):
                return
        stem = f"{keys[0].hex()[:24]}-{len(keys)}"
        data = data.contiguous().cpu()
        with StoreLock(self.dir, shared=True):           # a cleaner never removes a file being written
            name, sha = save_tensors_versioned({"kv": data}, self.dir, stem + ".kv")
            write_sealed(self.dir / f"{stem}.kv.json", CHUNK_KIND, CHUNK_FORMAT, {
                "namespace": self.namespace.to_dict(), "keys": [k.hex() for k in keys], "tensors": name,
                "sha256": sha, "shape": list(data.shape), **({"tag": list(tag)} if tag else {})})
        with self.lock:
            self.shapes[self.dir / name] = tuple(data.shape)
            if tag:
                self.tags[self.dir / name] = tuple(tag)
            for i, k in enumerate(keys):
                self.index.setdefault(k, (self.dir / name, i, sha))

    def drop(self, match) -> int:
        """Delete every chunk file (manifest first, then its tensors) whose tag `match`es, and its
        blocks from the index; returns how many blocks."""
        n = 0
        with self.lock, StoreLock(self.dir, shared=True):
            for path in [p for p, t in self.tags.items() if match(t)]:
                stem = path.name.split(".kv-")[0]
                (self.dir / f"{stem}.kv.json").unlink(missing_ok=True)      # no manifest: never read again
                path.unlink(missing_ok=True)
                gone = [k for k, (p, _, _) in self.index.items() if p == path]
                for k in gone:
                    del self.index[k]
                n += len(gone)
                del self.tags[path]
                self.shapes.pop(path, None)
        return n

    def get(self, keys: list[bytes]) -> Tensor:
        """The blocks of `keys` (n, *block_shape); each file is checksummed before use."""
        from safetensors.torch import load_file

        out, files = [], {}
        for k in keys:
            path, i, sha = self.index[k]
            if path not in files:
                if not path.is_file() or sha256_file(path) != sha:
                    raise CheckpointError(f"{path}: missing or checksum mismatch -- the KV file is corrupted; refusing it")
                t = load_file(str(path))
                if set(t) != {"kv"} or tuple(t["kv"].shape) != self.shapes.get(path):
                    raise CheckpointError(f"{path}: its tensor does not have the shape its manifest records; refusing it")
                files[path] = t["kv"]
            out.append(files[path][i])
        return torch.stack(out)


class TieredStore:
    """Host + disk tiers for one engine, with asynchronous write-back on a worker thread."""

    def __init__(self, spec: KVSpec, namespace: CacheNamespace, host_blocks: int = 0, disk_dir: str | None = None):
        self.spec = spec
        self.host = HostTier(spec, host_blocks) if host_blocks else None
        self.disk = DiskTier(disk_dir, namespace, spec.block_shape) if disk_dir else None
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="memstack-kv-tiers")
        self.pending: list[Future] = []
        self.stats = {"host_hits": 0, "disk_hits": 0, "offloaded": 0}

    # -- write ---------------------------------------------------------------------------------
    def offload(self, cache: PagedKVCache, seq, block_ids: list[int]) -> None:
        """Copy newly cached full blocks (ids in the device pool, keys in the pool) down the tiers."""
        keys = [b.key for b in seq.blocks if b.id in set(block_ids)]
        ids = [b.id for b in seq.blocks if b.id in set(block_ids)]
        if not keys:
            return
        data = cache.read_blocks(ids)                                            # gathered once, contiguous
        if data.is_cuda:
            host = torch.empty(data.shape, dtype=data.dtype, pin_memory=True)
            host.copy_(data, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
        else:
            host, done = data, None
        self.stats["offloaded"] += len(keys)
        self.pending = [f for f in self.pending if not f.done()]
        self.pending.append(self.worker.submit(self._write, keys, host, done, seq.tag))

    def _write(self, keys: list[bytes], data: Tensor, done, tag=None) -> None:
        if done is not None:
            done.synchronize()
        if self.host is not None:
            self.host.put(keys, data, tag)
        if self.disk is not None:
            self.disk.put(keys, data, tag)

    def drop(self, match) -> dict[str, int]:
        """Remove every block whose tag `match`es from both tiers (after the writes in flight)."""
        self.flush()
        return {"host_blocks_dropped": self.host.drop(match) if self.host is not None else 0,
                "disk_blocks_dropped": self.disk.drop(match) if self.disk is not None else 0}

    def flush(self) -> None:
        """Wait for every transfer in flight (raises the first error any of them hit)."""
        for f in self.pending:
            f.result()
        self.pending = []

    # -- read ----------------------------------------------------------------------------------
    def extend_prefix(self, engine, seq, tokens: list[int], max_tokens: int) -> int:
        """Continue `seq`'s cached prefix from host memory, then disk; returns its tokens."""
        bs = self.spec.block_size
        keys, where = [], []
        parent = seq.hashes[-1] if seq.hashes else seq.root
        for i in range(len(seq.hashes), min(max_tokens, len(tokens)) // bs):
            parent = block_hash(parent, tokens[i * bs:(i + 1) * bs])
            tier = "host" if self.host is not None and parent in self.host else (
                "disk" if self.disk is not None and parent in self.disk else None)
            if tier is None:
                break
            keys.append(parent)
            where.append(tier)
        n = min(len(keys), engine.pool.num_free)
        if not n:
            return seq.n_tokens
        keys, where = keys[:n], where[:n]
        blocks = engine.pool.allocate(n)
        host_keys = [k for k, w in zip(keys, where) if w == "host"]
        disk_keys = [k for k, w in zip(keys, where) if w == "disk"]
        parts = {}
        if host_keys:
            parts.update(zip(host_keys, self.host.get(host_keys)))
            self.stats["host_hits"] += len(host_keys)
        if disk_keys:
            try:
                parts.update(zip(disk_keys, self.disk.get(disk_keys)))
            except CheckpointError as e:                                          # refused: recompute instead
                self.disk.refused.append(str(e))
                with self.disk.lock:
                    for k in disk_keys:
                        self.disk.index.pop(k, None)
                engine.pool.release(blocks)
                return seq.n_tokens
            self.stats["disk_hits"] += len(disk_keys)
        engine.cache.write_blocks([b.id for b in blocks], torch.stack([parts[k] for k in keys]))
        for b, k in zip(blocks, keys):
            engine.pool.cache(b, k, seq.tag)
        seq.blocks.extend(blocks)
        seq.hashes.extend(keys)
        seq.n_slots += n * bs
        seq.n_tokens += n * bs
        return seq.n_tokens
