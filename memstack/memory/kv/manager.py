"""The KV cache manager: block tables of sequences over one `BlockPool` (pure Python).

The scheduler's whole view of KV memory (vLLM's `KVCacheManager`: get_computed_blocks /
allocate_slots / free, written from the design note): a sequence's KV is a list of physical
blocks in logical order (its *block table*), how many slots of them are written, and from
which slot on they are visible. Operations:

    match_prefix   take the longest chain of cached full blocks for a new sequence's tokens
    allocate       make room for n more slots -- all or nothing; copy-on-write a shared tail
    commit         count written slots; key and cache the blocks that became full
    release_before free leading blocks no query can see any more (window / segment scope)
    fork           a second sequence sharing every block (parallel sampling, beam search)
    free           release every block, tail first (so tails are evicted first)

Slots vs tokens: without compression slot s of block table entry j holds token
(n_dropped + j) * block_size + s. Compression (memory/kv/compress) rewrites a sequence's
blocks with fewer slots than tokens; such a sequence stops caching new blocks (`cacheable`),
because its blocks no longer hold "the KV of exactly this prefix".
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from memstack.memory.kv.block_pool import Block, BlockPool
from memstack.memory.kv.hashing import block_hash


@dataclass(eq=False)
class SeqKV:
    root: bytes                                  # hash-chain root (namespace + tenant salt)
    blocks: list[Block] = field(default_factory=list)
    n_slots: int = 0                             # slots written, counted from slot 0 of blocks[0]
    start: int = 0                               # first visible slot
    n_tokens: int = 0                            # tokens whose KV was computed (the document so far)
    n_dropped: int = 0                           # leading logical blocks released (window / segment)
    hashes: list[bytes] = field(default_factory=list)  # keys of the document's full blocks so far
    cacheable: bool = True
    tag: Any = None                              # recorded on the blocks it caches (BlockPool.uncache)

    @property
    def block_ids(self) -> list[int]:
        return [b.id for b in self.blocks]

    @property
    def visible(self) -> int:
        return self.n_slots - self.start


class KVCacheManager:
    def __init__(self, pool: BlockPool, block_size: int):
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.pool, self.block_size = pool, block_size

    def new_seq(self, root: bytes, tag: Any = None) -> SeqKV:
        return SeqKV(root, tag=tag)

    # -- prefix cache --------------------------------------------------------------------------
    def cached_prefix(self, root: bytes, tokens: list[int], max_tokens: int) -> list[Block]:
        """Cached blocks for the longest prefix of tokens (at most max_tokens tokens), no refs taken."""
        bs, out, parent = self.block_size, [], root
        for i in range(min(max_tokens, len(tokens)) // bs):
            parent = block_hash(parent, tokens[i * bs:(i + 1) * bs])
            b = self.pool.lookup(parent)
            if b is None:
                break
            out.append(b)
        return out

    def match_prefix(self, seq: SeqKV, tokens: list[int], max_tokens: int) -> int:
        """For a fresh sequence: reference the cached blocks of the longest cached prefix of
        `tokens` (at most max_tokens, so the caller keeps >= 1 token to compute); returns how
        many tokens' KV that gives."""
        if seq.blocks or seq.n_tokens:
            raise RuntimeError("match_prefix is for a fresh sequence")
        hit = self.cached_prefix(seq.root, tokens, max_tokens)
        self.pool.touch(hit)
        seq.blocks = list(hit)
        seq.hashes = [b.key for b in hit]
        seq.n_slots = seq.n_tokens = len(hit) * self.block_size
        return seq.n_tokens

    # -- growth --------------------------------------------------------------------------------
    def blocks_needed(self, seq: SeqKV, n_new: int) -> int:
        """Fresh blocks `allocate(seq, n_new)` takes (a copy-on-write tail counts one)."""
        bs = self.block_size
        need = -(-(seq.n_slots + n_new) // bs) - len(seq.blocks)
        cow = 1 if seq.n_slots % bs and seq.blocks and seq.blocks[-1].ref_cnt > 1 and n_new else 0
        return max(need, 0) + cow

    def allocate(self, seq: SeqKV, n_new: int) -> list[tuple[int, int]]:
        """Room for n_new more slots. Returns block copies (src, dst) the KV tensors must do
        before writing (copy-on-write of a shared, partly filled tail). Raises MemoryError and
        changes nothing when the pool is short."""
        n = self.blocks_needed(seq, n_new)
        fresh = self.pool.allocate(n)             # all or nothing
        copies = []
        if seq.n_slots % self.block_size and seq.blocks and seq.blocks[-1].ref_cnt > 1 and n_new:
            old, new = seq.blocks[-1], fresh.pop(0)
            copies.append((old.id, new.id))
            self.pool.release([old])
            seq.blocks[-1] = new
        seq.blocks.extend(fresh)
        return copies

    def commit(self, seq: SeqKV, tokens: list[int], n_new: int, n_slots: int | None = None) -> list[int]:
        """n_new tokens' KV was written (tokens[seq.n_tokens : +n_new]; `tokens` is the document so
        far), in n_slots slots (default n_new; more when a model's memories add tokens -- such a
        sequence is not cacheable). Blocks that became full are keyed and cached; returns their ids."""
        seq.n_slots += n_new if n_slots is None else n_slots
        seq.n_tokens += n_new
        if seq.n_slots > len(seq.blocks) * self.block_size:
            raise RuntimeError("commit beyond allocated blocks")
        if not seq.cacheable:
            return []
        bs, stored = self.block_size, []
        while len(seq.hashes) < seq.n_tokens // bs:
            i = len(seq.hashes)
            parent = seq.hashes[-1] if seq.hashes else seq.root
            key = block_hash(parent, tokens[i * bs:(i + 1) * bs])
            seq.hashes.append(key)
            j = i - seq.n_dropped
            if 0 <= j < len(seq.blocks) and self.pool.cache(seq.blocks[j], key, seq.tag):
                stored.append(seq.blocks[j].id)
        return stored

    # -- shrinking -----------------------------------------------------------------------------
    def set_start(self, seq: SeqKV, start: int) -> None:
        """Make slots before `start` invisible and free the blocks that are wholly before it."""
        start = max(seq.start, min(start, seq.n_slots))
        k = start // self.block_size
        if k:
            self.pool.release(reversed(seq.blocks[:k]))
            seq.blocks = seq.blocks[k:]
            seq.n_dropped += k
            start -= k * self.block_size
            seq.n_slots -= k * self.block_size
        seq.start = start

    def replace_blocks(self, seq: SeqKV, blocks: list[Block], n_slots: int) -> None:
        """Swap a sequence's blocks for `blocks` (already allocated and written, e.g. compacted
        by compression), freeing the old ones. The sequence stops caching new blocks."""
        old = seq.blocks
        seq.blocks, seq.n_slots, seq.start = list(blocks), n_slots, 0
        seq.cacheable = False
        self.pool.release(reversed(old))

    def truncate(self, seq: SeqKV, n_slots: int) -> int:
        """Keep slots [0, n_slots) (a press compacted the kept K/V there) and free every block after
        them; the sequence stops caching. Returns the number of blocks freed."""
        if seq.start or n_slots > seq.n_slots or any(b.ref_cnt > 1 for b in seq.blocks):
            raise ValueError("truncate needs a sequence whose blocks it owns alone, visible from slot 0")
        nb = -(-n_slots // self.block_size)
        freed = seq.blocks[nb:]
        self.pool.release(reversed(freed))
        seq.blocks, seq.n_slots, seq.cacheable = seq.blocks[:nb], n_slots, False
        return len(freed)

    def drop_blocks(self, seq: SeqKV, idx: list[int]) -> None:
        """Free the blocks at table positions `idx` (whole blocks: StreamingLLM eviction). Later
        blocks are then computed over a context with holes, so the sequence stops caching."""
        drop = set(idx)
        if any(i * self.block_size < seq.start or i >= len(seq.blocks) - 1 for i in drop):
            raise ValueError("only whole visible blocks before the last one can be dropped")
        self.pool.release([seq.blocks[i] for i in sorted(drop, reverse=True)])
        seq.blocks = [b for i, b in enumerate(seq.blocks) if i not in drop]
        seq.n_slots -= len(drop) * self.block_size
        seq.cacheable = False

    def fork(self, seq: SeqKV) -> SeqKV:
        """A sequence sharing every block of `seq` (copy-on-write when either appends)."""
        self.pool.touch(seq.blocks)
        return SeqKV(seq.root, list(seq.blocks), seq.n_slots, seq.start, seq.n_tokens, seq.n_dropped,
                     list(seq.hashes), seq.cacheable, seq.tag)

    def free(self, seq: SeqKV) -> None:
        self.pool.release(reversed(seq.blocks))
        seq.blocks = []
        seq.n_slots = seq.start = 0
