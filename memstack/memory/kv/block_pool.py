"""The block pool: who owns each physical KV block (pure Python; no tensors, no attention).

Design from vLLM's v1 `BlockPool` / `FreeKVCacheBlockQueue` (arXiv 2309.06180 and
docs/design/prefix_caching.md), written from the description:

- every physical block is a `Block` (id, reference count, prefix key);
- the free queue is a doubly linked list of the blocks with ref_cnt == 0, and it is *also the
  eviction order*: allocation pops from the head (least recently freed first); a block that
  still carries a prefix key stays findable until it is popped (that is the prefix cache);
  a request's blocks are freed tail-first, so a prompt's last blocks are evicted before its
  first ones (which other prompts are likelier to share);
- a cache hit on a free block ("touch") unlinks it from the queue in O(1);
- `cached`: key -> block for immutable full blocks. Two identical blocks may exist (a request
  computed one before the other was cached); only the first is mapped, the other stays a
  private block and is freed normally (vLLM's documented trade-off).

Events (stored / removed keys) are recorded for observability and for external routers.
Deviation from vLLM: no null block; ids are 0..num_blocks-1, all usable.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable


@dataclass(eq=False)
class Block:
    id: int
    ref_cnt: int = 0
    key: bytes | None = None                   # prefix key while the block is a cached full block
    tag: Any = None                            # whose it is while cached (a serving engine: the namespaces
                                               # its request read), so one user's blocks can be dropped
    prev: "Block | None" = field(default=None, repr=False)
    next: "Block | None" = field(default=None, repr=False)

    def __repr__(self) -> str:
        return f"Block({self.id}, ref={self.ref_cnt}{', cached' if self.key else ''})"


class FreeBlockQueue:
    """Doubly linked list of free blocks in eviction order (head = next to be reused)."""

    def __init__(self, blocks: Iterable[Block]):
        self.head, self.tail = Block(-1), Block(-1)     # sentinels
        self.head.next, self.tail.prev = self.tail, self.head
        self.n = 0
        for b in blocks:
            self.append(b)

    def __len__(self) -> int:
        return self.n

    def append(self, b: Block) -> None:
        last = self.tail.prev
        last.next, b.prev, b.next, self.tail.prev = b, last, self.tail, b
        self.n += 1

    def remove(self, b: Block) -> None:
        if b.prev is None or b.next is None:
            raise RuntimeError(f"{b} is not in the free queue")
        b.prev.next, b.next.prev = b.next, b.prev
        b.prev = b.next = None
        self.n -= 1

    def popleft(self) -> Block:
        if not self.n:
            raise RuntimeError("no free block")
        b = self.head.next
        self.remove(b)
        return b

    def ids(self) -> list[int]:
        out, b = [], self.head.next
        while b is not self.tail:
            out.append(b.id)
            b = b.next
        return out


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool = True):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free = FreeBlockQueue(self.blocks)
        self.cached: dict[bytes, Block] = {}
        self.enable_caching = enable_caching
        self.events: list[tuple[str, bytes]] = []   # ("stored" | "removed", key)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free(self) -> int:
        """Blocks that can be allocated now (free, cached or not)."""
        return len(self.free)

    def usage(self) -> float:
        return 1.0 - self.num_free / self.num_blocks

    # -- allocation ----------------------------------------------------------------------------
    def allocate(self, n: int) -> list[Block]:
        """n blocks from the head of the free queue (evicting their cached keys), ref_cnt 1.
        All or nothing: raises without changing anything when fewer than n are free."""
        if n > self.num_free:
            raise MemoryError(f"asked for {n} KV blocks, {self.num_free} free of {self.num_blocks}")
        out = []
        for _ in range(n):
            b = self.free.popleft()
            self._evict(b)
            b.ref_cnt = 1
            out.append(b)
        return out

    def _evict(self, b: Block) -> None:
        if b.key is not None:
            if self.cached.get(b.key) is b:
                del self.cached[b.key]
                self.events.append(("removed", b.key))
            b.key = b.tag = None

    def touch(self, blocks: Iterable[Block]) -> None:
        """Take a reference to blocks found in the cache (unlinking free ones from the queue)."""
        for b in blocks:
            if b.ref_cnt == 0:
                self.free.remove(b)
            b.ref_cnt += 1

    def release(self, blocks: Iterable[Block]) -> None:
        """Drop one reference from each block, in the given order; blocks reaching zero join the
        tail of the free queue in that order (callers pass a request's blocks tail-first)."""
        for b in blocks:
            if b.ref_cnt <= 0:
                raise RuntimeError(f"double free of {b}")
            b.ref_cnt -= 1
            if b.ref_cnt == 0:
                if b.key is None or not self.enable_caching:
                    self._evict(b)
                self.free.append(b)

    # -- prefix cache --------------------------------------------------------------------------
    def lookup(self, key: bytes) -> Block | None:
        return self.cached.get(key) if self.enable_caching else None

    def cache(self, b: Block, key: bytes, tag: Any = None) -> bool:
        """Make `b` (a full, immutable block) findable under `key`, recording `tag` (whose it is);
        False if another block already is (then `b` stays private)."""
        if not self.enable_caching or b.key is not None:
            return False
        if key in self.cached:
            return False
        b.key, b.tag = key, tag
        self.cached[key] = b
        self.events.append(("stored", key))
        return True

    def pop_events(self) -> list[tuple[str, bytes]]:
        ev, self.events = self.events, []
        return ev

    def reset_cache(self) -> int:
        """Forget every cached key of a free block (e.g. after the weights changed). Blocks in
        use keep theirs. Returns how many keys were dropped."""
        n = 0
        for b in list(self.cached.values()):
            if b.ref_cnt == 0:
                self._evict(b)
                n += 1
        return n

    def uncache(self, match: Callable[[Any], bool]) -> list[Block]:
        """Drop the prefix key of every cached block whose tag `match`es (forgetting a user: its
        blocks are never found again; free ones are reused like any free block, blocks still
        referenced are freed by their holder as usual). Others' blocks keep theirs. Returns the
        blocks it dropped."""
        gone = [b for b in self.cached.values() if match(b.tag)]
        for b in gone:
            self._evict(b)
        return gone

    def check(self) -> None:
        """Invariants (tests call this): queue = exactly the ref_cnt 0 blocks; map consistent."""
        ids = self.free.ids()
        assert len(ids) == len(set(ids)) == self.free.n
        assert set(ids) == {b.id for b in self.blocks if b.ref_cnt == 0}, "free queue != unreferenced blocks"
        assert all(b.ref_cnt >= 0 for b in self.blocks)
        for k, b in self.cached.items():
            assert b.key == k
