"""Physical KV blocks: ref counts, an O(1) LRU free queue, and the prefix-cache hash map.

A block is in exactly one of three states:
  in use        ref_cnt > 0, not in the free queue
  free, cached  ref_cnt == 0, in the free queue, block_hash set (can be revived by a prefix hit)
  free, empty   ref_cnt == 0, in the free queue, block_hash None
Allocation pops from the head of the free queue (least recently freed first) and evicts the
popped block's hash; freeing appends to the tail. So cached blocks live as long as possible.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

# A full block's prefix-cache key: sha256 over a canonical byte encoding of its whole prefix.
#
#   field       bytes      contents
#   parent      32         parent block's digest; ROOT_BLOCK_HASH for a sequence's first block
#   n           4          number of token ids, u32 little-endian
#   token_ids   8 * n      each token id, i64 little-endian
#   salt tag    1          0x00: no salt, 0x01: salt follows
#   salt        4 + len    UTF-8 length (u32 LE) then the UTF-8 bytes; only when the tag is 0x01
#
# Every field is fixed-width or length-prefixed, so distinct (parent, tokens, salt) give distinct
# messages. The salt (a tenant's opt-out of sharing) enters the first block only and reaches
# every later block through the parent digest.
# NOTE: the key is the digest alone, without the token ids: an alias needs a sha256 collision
# (about 2**128 work even for a crafted prompt), and a 32-byte key keeps lookups cheap.
BlockHash = bytes
ROOT_BLOCK_HASH: BlockHash = bytes(32)


def hash_block_tokens(
    parent: BlockHash | None, token_ids: tuple[int, ...], cache_salt: str | None = None
) -> BlockHash:
    """Digest of one full block given its parent's digest (None for a first block)."""
    assert parent is None or len(parent) == 32, parent
    msg = [parent if parent is not None else ROOT_BLOCK_HASH,
           struct.pack(f"<I{len(token_ids)}q", len(token_ids), *token_ids)]
    if cache_salt is None:
        msg.append(b"\x00")
    else:
        salt = cache_salt.encode()
        msg.append(b"\x01" + struct.pack("<I", len(salt)) + salt)
    return hashlib.sha256(b"".join(msg)).digest()


@dataclass(slots=True, eq=False)
class KVCacheBlock:
    block_id: int
    ref_cnt: int = 0
    block_hash: BlockHash | None = None
    # Doubly linked free-queue pointers; None when not in the queue (or at an end).
    prev_free: KVCacheBlock | None = None
    next_free: KVCacheBlock | None = None

    def __repr__(self) -> str:
        return f"KVCacheBlock(id={self.block_id}, ref_cnt={self.ref_cnt})"


class FreeBlockQueue:
    """Doubly linked list of free blocks with O(1) popleft, append and remove-from-middle.

    remove() is what a prefix-cache hit on a free cached block needs; a deque cannot do it in O(1).
    Sentinel head/tail nodes keep the pointer updates branch-free.
    """

    def __init__(self, blocks: list[KVCacheBlock]) -> None:
        self._head = KVCacheBlock(-1)
        self._tail = KVCacheBlock(-1)
        self._head.next_free = self._tail
        self._tail.prev_free = self._head
        self.num_free_blocks = 0
        for block in blocks:
            self.append(block)

    def popleft(self) -> KVCacheBlock:
        block = self._head.next_free
        if block is self._tail:
            raise ValueError("no free blocks")
        self.remove(block)
        return block

    def remove(self, block: KVCacheBlock) -> None:
        assert block.prev_free is not None and block.next_free is not None, block
        block.prev_free.next_free = block.next_free
        block.next_free.prev_free = block.prev_free
        block.prev_free = block.next_free = None
        self.num_free_blocks -= 1

    def append(self, block: KVCacheBlock) -> None:
        last = self._tail.prev_free
        assert last is not None
        last.next_free = block
        block.prev_free = last
        block.next_free = self._tail
        self._tail.prev_free = block
        self.num_free_blocks += 1

    def __iter__(self):
        block = self._head.next_free
        while block is not self._tail:
            yield block
            block = block.next_free

    def block_ids(self) -> list[int]:
        return [b.block_id for b in self]


class BlockPool:
    """All physical blocks of one device (GPU/CPU execution pool, or the CPU swap pool)."""

    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVCacheBlock(i) for i in range(num_blocks)]
        self.free_queue = FreeBlockQueue(self.blocks)
        self.cached: dict[BlockHash, KVCacheBlock] = {}

    @property
    def num_free_blocks(self) -> int:
        return self.free_queue.num_free_blocks

    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def get_new_blocks(self, n: int) -> list[KVCacheBlock]:
        if n > self.num_free_blocks:
            raise ValueError(f"asked for {n} blocks, {self.num_free_blocks} free")
        out = []
        for _ in range(n):
            block = self.free_queue.popleft()
            self._evict(block)
            block.ref_cnt = 1
            out.append(block)
        return out

    def _evict(self, block: KVCacheBlock) -> None:
        if block.block_hash is not None:
            if self.cached.get(block.block_hash) is block:
                del self.cached[block.block_hash]
            block.block_hash = None

    def get_cached_block(self, block_hash: BlockHash) -> KVCacheBlock | None:
        return self.cached.get(block_hash) if self.enable_caching else None

    def touch(self, blocks: list[KVCacheBlock]) -> None:
        """Take a reference on blocks found in the cache (reviving free cached ones)."""
        for block in blocks:
            if block.ref_cnt == 0:
                self.free_queue.remove(block)
            block.ref_cnt += 1

    def cache_block(self, block: KVCacheBlock, block_hash: BlockHash) -> None:
        """Publish a full, computed block under its hash (first writer wins)."""
        if not self.enable_caching or block.block_hash is not None:
            return
        if block_hash in self.cached:
            return  # same contents already cached in another block; this one stays private
        block.block_hash = block_hash
        self.cached[block_hash] = block

    def free_blocks(self, blocks: list[KVCacheBlock]) -> None:
        """Drop one reference from each block; those reaching 0 join the free queue's tail in
        the given order (callers pass a table tail-first so that prefix roots are evicted last)."""
        for block in blocks:
            assert block.ref_cnt > 0, f"double free of {block}"
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                if not self.enable_caching:
                    block.block_hash = None
                self.free_queue.append(block)

    def reset_prefix_cache(self) -> None:
        for block in self.free_queue:
            block.block_hash = None
        self.cached = {b.block_hash: b for b in self.blocks if b.block_hash is not None}

    def check_integrity(self) -> None:
        in_queue = set()
        for block in self.free_queue:
            assert block.block_id not in in_queue, f"block {block.block_id} twice in free queue"
            assert block.ref_cnt == 0, f"free block {block.block_id} has ref_cnt {block.ref_cnt}"
            in_queue.add(block.block_id)
        assert len(in_queue) == self.num_free_blocks
        for block in self.blocks:
            assert block.ref_cnt >= 0
            if block.block_id not in in_queue:
                assert block.ref_cnt > 0, f"block {block.block_id} leaked (ref 0, not free)"
        for block_hash, block in self.cached.items():
            assert block.block_hash == block_hash, f"cache map stale for block {block.block_id}"
