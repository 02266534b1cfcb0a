"""Explicit prefix sessions: pin, TTL, unpin, export, import (what vLLM users keep asking for:
vllm#7952, RFC #8333 -- API-level context caching like hosted "prompt caching").

    s = engine.sessions
    h = s.pin(system_prompt_ids, ttl=600, salt="tenant-a")   # computed once, never evicted
    s.unpin(h)                                               # or let the TTL lapse
    s.export(h, "prompt.kv")                                 # KV + tokens + keys + namespace, sealed
    h2 = other_engine.sessions.import_("prompt.kv")          # refused if model/tokenizer/dtype differ

A pin holds a reference on the prefix's full blocks, so the pool never evicts them while it
lasts; requests with that prefix (and salt) hit them like any cached block. TTLs are checked at
every engine step. Export writes only full blocks (the partial tail is not reusable as a block).
Import re-derives every key from the tokens under the importing engine's namespace and salt, so
a file cannot place KV under keys it does not belong to, and refuses a file whose namespace
(model fingerprint, tokenizer, dtype, block size, key version) differs, listing every mismatch.

Integrity (memstack/atomic.py): the manifest `<path>.json` is sealed and names the KV file by
SHA-256, so the token ids are bound to the KV -- an edited token id, key, shape or namespace is
refused; the stored keys must be the hash chain of the stored tokens from the stored chain root;
the KV tensor must have the engine's block shape. An export removes only its own earlier KV
files (`<path>-<sha12>.safetensors`), never another export's whose name merely starts the same.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path

from memstack.errors import CheckpointError
from memstack.generate import SamplingConfig
from memstack.memory.kv.block_pool import Block
from memstack.memory.kv.hashing import CacheNamespace, chain_hashes

EXPORT_FORMAT = 2
EXPORT_KIND = "memstack-kv-prefix"


@dataclass(eq=False)
class PrefixHandle:
    id: int
    tokens: list[int]
    salt: str | None
    blocks: list[Block] = field(default_factory=list)
    expires: float | None = None            # time.monotonic() deadline; None = until unpinned

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)                 # whole blocks only


class Sessions:
    def __init__(self, engine):
        self.engine = engine
        self.pins: dict[int, PrefixHandle] = {}
        self._ids = itertools.count(1)

    def _ttl(self, ttl: float | None) -> float | None:
        if ttl is not None and ttl <= 0:
            raise ValueError(f"ttl must be > 0 seconds or None, got {ttl}")
        return None if ttl is None else time.monotonic() + ttl

    def pin(self, tokens: list[int], ttl: float | None = None, salt: str | None = None) -> PrefixHandle:
        """Compute (or find) the KV of `tokens` and keep its full blocks resident."""
        eng = self.engine
        tokens = [int(t) for t in tokens]
        bs = eng.cfg.block_size
        if len(tokens) < bs:
            raise ValueError(f"a pinned prefix needs at least one full block ({bs} tokens), got {len(tokens)}")
        expires = self._ttl(ttl)
        blocks = eng.manager.cached_prefix(eng.namespace.root(salt), tokens, len(tokens))
        if len(blocks) < len(tokens) // bs:                                       # compute it: a 1-token request
            eng.generate([tokens], SamplingConfig(max_new_tokens=1), salt=salt)
            blocks = eng.manager.cached_prefix(eng.namespace.root(salt), tokens, len(tokens))
        return self._hold(tokens, salt, blocks, expires)

    def _hold(self, tokens, salt, blocks, expires) -> PrefixHandle:
        self.engine.pool.touch(blocks)
        h = PrefixHandle(next(self._ids), tokens[:len(blocks) * self.engine.cfg.block_size], salt, list(blocks), expires)
        self.pins[h.id] = h
        return h

    def unpin(self, handle: PrefixHandle) -> None:
        if self.pins.pop(handle.id, None) is not None:
            self.engine.pool.release(reversed(handle.blocks))

    def expire(self, now: float | None = None) -> int:
        """Unpin every handle whose TTL has passed; returns how many."""
        now = time.monotonic() if now is None else now
        gone = [h for h in self.pins.values() if h.expires is not None and h.expires <= now]
        for h in gone:
            self.unpin(h)
        return len(gone)

    def extend(self, handle: PrefixHandle, ttl: float | None) -> None:
        handle.expires = self._ttl(ttl)

    # -- export / import -----------------------------------------------------------------------
    def export(self, handle: PrefixHandle, path: str | Path) -> Path:
        """Write a pinned prefix: `<path>.json` (namespace, tokens, keys, checksum) + tensors."""
        from memstack.atomic import StoreLock, clean_temporaries, remove_unreferenced, save_tensors_versioned, write_sealed

        if handle.id not in self.pins:
            raise ValueError("export needs a pinned prefix (pin it first; an unpinned one may be evicted)")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = self.engine.cache.read_blocks([b.id for b in handle.blocks]).cpu()
        with StoreLock(path.parent):
            clean_temporaries(path.parent)                                       # of exports that crashed
            name, sha = save_tensors_versioned({"kv": data}, path.parent, path.name)
            write_sealed(path.with_name(path.name + ".json"), EXPORT_KIND, EXPORT_FORMAT, {
                "namespace": self.engine.namespace.to_dict(), "root": self.engine.namespace.root(handle.salt).hex(),
                "tokens": handle.tokens, "keys": [b.key.hex() for b in handle.blocks], "tensors": name, "sha256": sha,
                "shape": list(data.shape)})
            remove_unreferenced(path.parent, path.name, {name})
        return path

    def import_(self, path: str | Path, salt: str | None = None, ttl: float | None = None) -> PrefixHandle:
        """Load an exported prefix into the pool and pin it (under this engine's namespace + salt)."""
        from safetensors.torch import load_file

        from memstack.atomic import read_sealed, sha256_file, tidy, versioned_name_re
        from memstack.errors import IntegrityError

        eng, path = self.engine, Path(path)
        manifest = path.with_name(path.name + ".json")

        def read() -> dict:
            return read_sealed(manifest, EXPORT_KIND, EXPORT_FORMAT,
                               {"namespace": dict, "root": str, "tokens": list, "keys": list, "tensors": str,
                                "sha256": str, "shape": list}, older="export the prefix again with this memstack")

        try:
            tidy(path.parent, lambda: {path.name: read()["tensors"]})            # what a crashed export left
            meta = read()
            ns = CacheNamespace(**meta["namespace"])
        except IntegrityError as e:
            raise CheckpointError(f"{path}: KV prefix refused: {e}") from None
        except TypeError as e:
            raise CheckpointError(f"{manifest}: not a KV prefix export ({e})") from None
        reasons = eng.namespace.mismatches(ns)
        tokens, keys, shape = meta["tokens"], meta["keys"], tuple(meta["shape"])
        tfile = path.parent / meta["tensors"]
        if not reasons and (not versioned_name_re(path.name).fullmatch(meta["tensors"]) or not tfile.is_file()
                            or sha256_file(tfile) != meta["sha256"]):
            reasons.append(f"{tfile.name}: missing or checksum mismatch (corrupted)")
        if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t for t in tokens):
            reasons.append("its tokens are not token ids")
        elif not reasons and len(tokens) != len(keys) * ns.block_size:
            reasons.append(f"{len(tokens)} tokens for {len(keys)} blocks of {ns.block_size}")
        elif not reasons and keys != [k.hex() for k in chain_hashes(_hex(meta["root"]), tokens, ns.block_size)]:
            reasons.append("its stored block keys are not the hash chain of its tokens (tokens or keys edited)")
        if not reasons and shape != (len(keys), *eng.cache.spec.block_shape):
            reasons.append(f"its KV has shape {list(shape)}, the engine's blocks are {list(eng.cache.spec.block_shape)}")
        if reasons:
            raise CheckpointError(f"{path}: KV prefix refused ({len(reasons)} reason(s)):\n" +
                                  "\n".join(f"  - {r}" for r in reasons))
        t = load_file(str(tfile))
        if set(t) != {"kv"} or tuple(t["kv"].shape) != shape:
            raise CheckpointError(f"{tfile}: its tensor does not have the shape its manifest records; refusing it")
        data = t["kv"]
        keys = chain_hashes(eng.namespace.root(salt), tokens, eng.cfg.block_size)  # re-derived, never trusted
        found = [eng.pool.lookup(k) for k in keys]
        eng.pool.touch([b for b in found if b is not None])                      # protect hits while allocating
        fresh = eng.pool.allocate(sum(b is None for b in found))
        blocks = []
        for i, (key, b) in enumerate(zip(keys, found)):
            if b is None:
                b = fresh.pop(0)
                eng.cache.write_blocks([b.id], data[i:i + 1])
                eng.pool.cache(b, key)
            blocks.append(b)
        handle = self._hold(tokens, salt, blocks, self._ttl(ttl))
        eng.pool.release(blocks)                                                 # the pin's reference remains
        return handle


def _hex(text: str) -> bytes:
    try:
        return bytes.fromhex(text)
    except ValueError:
        return b""


__all__ = ["Sessions", "PrefixHandle"]
