"""Block tables: logical blocks of each sequence -> physical blocks of the BlockPool.

  logical block i of a sequence holds tokens [i * block_size, (i + 1) * block_size)
  slot of token t = block_table[t // block_size] * block_size + t % block_size

Blocks are allocated on demand as tokens are scheduled, shared by reference (prefix-cache hits,
fork for n > 1 / beams) and copied on the first write into a shared partial block.

Sliding window W on every layer (Mistral): a query at position p sees keys p - W + 1 .. p, so
when a sequence's next tokens start at position c, blocks wholly before c - W + 1 are read by
no one again. allocate_slots releases them first; their table entries become NULL_BLOCK (id -1,
never read: the kernels start at the window), so logical block i stays table entry i:

  W = 6, block_size 4, next token at c = 13: it sees keys 8 .. 13
    table     [NULL, NULL, b7, b3]      block 0: 0-3, 1: 4-7 (released), 2: 8-11, 3: 12-15
    first live block = (c - W + 1) // block_size = 2

A decoding sequence so holds at most cdiv(W, block_size) + 1 blocks. Prefix caching is off then
(config.py): a hit would need the released blocks back.
"""

from __future__ import annotations

from pagedllm.core.block_pool import BlockHash, BlockPool, KVCacheBlock, hash_block_tokens
from pagedllm.core.kv_accounting import KVLedger, paged_ledger
from pagedllm.core.sequence import Sequence


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


# A table entry whose block the sliding window has released: in no pool, never referenced.
NULL_BLOCK = KVCacheBlock(-1)


def _held(table: list[KVCacheBlock]) -> list[KVCacheBlock]:
    """The blocks a table holds: all but the entries its window released."""
    return [block for block in table if block is not NULL_BLOCK]


class BlockManager:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_caching: bool = True,
        num_cpu_blocks: int = 0,
        sliding_window: int | None = None,
    ) -> None:
        assert sliding_window is None or sliding_window >= 1, sliding_window
        assert not (enable_caching and sliding_window), \
            "prefix caching needs every block; it is off when every layer slides (config.py)"
        self.block_size = block_size
        self.sliding_window = sliding_window  # every layer's window, or None
        self.pool = BlockPool(num_blocks, enable_caching)
        # The swap pool never serves prefix hits: swapped blocks belong to one sequence.
        self.cpu_pool = BlockPool(num_cpu_blocks, enable_caching=False) if num_cpu_blocks else None
        self.block_tables: dict[int, list[KVCacheBlock]] = {}
        self.cpu_block_tables: dict[int, list[KVCacheBlock]] = {}
        # How many leading blocks of each sequence are already published in the prefix cache.
        self.num_cached_blocks: dict[int, int] = {}

    # ---- queries -------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    def usage(self) -> float:
        return self.pool.usage()

    def get_block_ids(self, seq_id: int) -> list[int]:
        return [b.block_id for b in self.block_tables.get(seq_id, ())]

    def block_hashes(self, seq: Sequence) -> list[BlockHash]:
        """Chained hashes of the sequence's full blocks, extended lazily as tokens arrive
        (a block holding an output placeholder waits until its value is known).

        The sequence's cache_salt enters the first block's hash and so every later one:
        sequences with different salts never share a block.
        """
        hashes = seq.block_hashes
        bs = self.block_size
        while len(hashes) < seq.num_known_tokens // bs:
            i = len(hashes)
            tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            if i == 0:
                hashes.append(hash_block_tokens(None, tokens, seq.cache_salt))
            else:
                hashes.append(hash_block_tokens(hashes[-1], tokens))
        return hashes

    def get_computed_blocks(self, seq: Sequence) -> list[KVCacheBlock]:
        """Longest run of leading full blocks found in the prefix cache.

        The last token is never a hit: its logits are needed to sample, so at least one token
        is always computed.
        """
        if not self.pool.enable_caching or seq.seq_id in self.block_tables:
            return []
        hits = []
        max_hit_blocks = (seq.num_tokens - 1) // self.block_size
        for block_hash in self.block_hashes(seq)[:max_hit_blocks]:
            block = self.pool.get_cached_block(block_hash)
            if block is None:
                break
            hits.append(block)
        return hits

    def _num_needed_blocks(
        self, seq: Sequence, num_new_tokens: int, computed: list[KVCacheBlock]
    ) -> tuple[int, int, KVCacheBlock | None]:
        """(new blocks for the tokens, blocks the window gives back to the pool first, the
        shared partial block the first write must copy)."""
        table = self.block_tables.get(seq.seq_id, [])
        num_computed = len(computed) * self.block_size if computed else seq.num_computed_tokens
        num_new_blocks = cdiv(num_computed + num_new_tokens, self.block_size) - len(table)
        num_new_blocks -= len(computed)
        lo, hi = self._behind_window(seq, table)
        # Only blocks this sequence alone holds go back (a fork's siblings may hold the rest).
        num_released = sum(1 for block in table[lo:hi] if block.ref_cnt == 1)
        cow = None
        if num_new_tokens > 0 and num_computed % self.block_size != 0:
            block = table[num_computed // self.block_size]
            if block.ref_cnt > 1:
                cow = block
        return max(num_new_blocks, 0), num_released, cow

    def _behind_window(self, seq: Sequence, table: list[KVCacheBlock]) -> tuple[int, int]:
        """Table entries [lo, hi) still held that the window has left: no query from position
        num_computed_tokens on sees their tokens. Released entries form a prefix of the table,
        so the walk back from the window's first block is amortized O(1)."""
        if self.sliding_window is None:
            return 0, 0
        hi = min(max(seq.num_computed_tokens - self.sliding_window + 1, 0) // self.block_size,
                 len(table))
        lo = hi
        while lo > 0 and table[lo - 1] is not NULL_BLOCK:
            lo -= 1
        return lo, hi

    def num_blocks_to_allocate(
        self, plan: list[tuple[Sequence, int, list[KVCacheBlock]]]
    ) -> int:
        """Free blocks that allocate_slots would consume for every (seq, num_new_tokens,
        prefix hits) of one step, exactly: when all k owners of a shared partial block write
        into it, only k - 1 copy (the last one finds itself sole owner and writes in place)."""
        total = 0
        writers: dict[int, list] = {}  # id(shared block) -> [block, number of writers]
        revived = set()
        for seq, n, computed in plan:
            num_new_blocks, num_released, cow = self._num_needed_blocks(seq, n, computed)
            total += num_new_blocks - num_released
            if cow is not None:
                writers.setdefault(id(cow), [cow, 0])[1] += 1
            # Reviving a free cached block takes it out of the free queue too.
            revived.update(id(b) for b in computed if b.ref_cnt == 0)
        total += sum(min(k, block.ref_cnt - 1) for block, k in writers.values())
        return total + len(revived)

    def can_allocate(
        self, seq: Sequence, num_new_tokens: int, computed: list[KVCacheBlock] = ()
    ) -> bool:
        plan = [(seq, num_new_tokens, list(computed))]
        return self.num_blocks_to_allocate(plan) <= self.num_free_blocks

    # ---- mutations -----------------------------------------------------------------------
    def allocate_slots(
        self, seq: Sequence, num_new_tokens: int, computed: list[KVCacheBlock] = ()
    ) -> list[tuple[int, int]] | None:
        """Make room for num_new_tokens more tokens of seq; None (and no change) if it can't.

        `computed` are prefix-cache hits for a sequence that has no blocks yet; the caller then
        sets num_computed_tokens past them. Returns copy-on-write copies [(src, dst)] that must
        run before this step's forward pass.
        """
        computed = list(computed)
        if not self.can_allocate(seq, num_new_tokens, computed):
            return None
        num_new_blocks, _, cow = self._num_needed_blocks(seq, num_new_tokens, computed)
        table = self.block_tables.setdefault(seq.seq_id, [])
        self.num_cached_blocks.setdefault(seq.seq_id, 0)
        lo, hi = self._behind_window(seq, table)
        if hi > lo:  # first, so that a tight pool can reuse them for this very step
            self.pool.free_blocks(table[lo:hi][::-1])
            table[lo:hi] = [NULL_BLOCK] * (hi - lo)
        if computed:
            assert not table, "prefix hits only for a sequence without blocks"
            self.pool.touch(computed)
            table.extend(computed)
            self.num_cached_blocks[seq.seq_id] = len(computed)
        copies = []
        if cow is not None:
            i = table.index(cow)
            (fresh,) = self.pool.get_new_blocks(1)
            copies.append((table[i].block_id, fresh.block_id))
            self.pool.free_blocks([table[i]])
            table[i] = fresh
        table.extend(self.pool.get_new_blocks(num_new_blocks))
        return copies

    def cache_blocks(self, seq: Sequence) -> None:
        """Publish the sequence's newly computed full blocks in the prefix cache."""
        if not self.pool.enable_caching:
            return
        table = self.block_tables[seq.seq_id]
        num_full = seq.num_computed_tokens // self.block_size
        start = self.num_cached_blocks[seq.seq_id]
        if num_full <= start:
            return
        hashes = self.block_hashes(seq)
        for i in range(start, num_full):
            self.pool.cache_block(table[i], hashes[i])
        self.num_cached_blocks[seq.seq_id] = num_full

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Child shares every block of parent (ref_cnt += 1); writes will copy on demand."""
        table = self.block_tables[parent.seq_id]
        for block in _held(table):
            block.ref_cnt += 1
        self.block_tables[child.seq_id] = list(table)
        self.num_cached_blocks[child.seq_id] = self.num_cached_blocks[parent.seq_id]

    def free(self, seq: Sequence) -> None:
        table = self.block_tables.pop(seq.seq_id, None)
        self.num_cached_blocks.pop(seq.seq_id, None)
        if table:
            # Tail first: the free queue then evicts a sequence's last blocks before its prefix.
            self.pool.free_blocks(_held(table[::-1]))
        cpu_table = self.cpu_block_tables.pop(seq.seq_id, None)
        if cpu_table:
            self.cpu_pool.free_blocks(cpu_table[::-1])

    # ---- swapping (whole block tables between the device pool and the CPU pool) -----------
    def can_swap_out(self, seqs: list[Sequence]) -> bool:
        if self.cpu_pool is None:
            return False
        return self.num_unique_blocks(seqs, self.block_tables) <= self.cpu_pool.num_free_blocks

    def can_swap_in(self, seqs: list[Sequence]) -> bool:
        return self.num_unique_blocks(seqs, self.cpu_block_tables) <= self.pool.num_free_blocks

    @staticmethod
    def num_unique_blocks(seqs: list[Sequence], tables: dict) -> int:
        return len({id(b) for s in seqs for b in _held(tables.get(s.seq_id, ()))})

    def swap_out(self, seqs: list[Sequence]) -> list[tuple[int, int]]:
        """Move the group's blocks to the CPU pool; returns (device block, cpu block) copies.

        Blocks shared inside the group stay shared (one copy each); blocks also referenced
        outside the group (prefix hits) keep their device copy for the other owners.
        """
        return self._move(seqs, self.block_tables, self.cpu_block_tables, self.pool,
                          self.cpu_pool)

    def swap_in(self, seqs: list[Sequence]) -> list[tuple[int, int]]:
        """Bring the group's blocks back; returns (cpu block, device block) copies."""
        moved = self._move(seqs, self.cpu_block_tables, self.block_tables, self.cpu_pool,
                           self.pool)
        for seq in seqs:
            # The revived device blocks are fresh: nothing in them is published in the cache.
            self.num_cached_blocks[seq.seq_id] = 0
        return moved

    def _move(self, seqs, src_tables, dst_tables, src_pool, dst_pool) -> list[tuple[int, int]]:
        mapping: dict[int, KVCacheBlock] = {}  # id(src block) -> dst block
        copies = []
        for seq in seqs:
            src_table = src_tables.pop(seq.seq_id)
            dst_table = []
            for block in src_table:
                if block is NULL_BLOCK:
                    dst_table.append(NULL_BLOCK)
                    continue
                dst = mapping.get(id(block))
                if dst is None:
                    (dst,) = dst_pool.get_new_blocks(1)
                    mapping[id(block)] = dst
                    copies.append((block.block_id, dst.block_id))
                else:
                    dst.ref_cnt += 1
                dst_table.append(dst)
            src_pool.free_blocks(_held(src_table[::-1]))
            dst_tables[seq.seq_id] = dst_table
        return copies

    def reset_prefix_cache(self) -> None:
        self.pool.reset_prefix_cache()

    def memory_ledger(self, seqs: list[Sequence], blocked: bool) -> KVLedger:
        """The paper's Fig. 2 split of the device pool (core/kv_accounting.py)."""
        return paged_ledger(self, seqs, blocked)

    def check_integrity(self) -> None:
        """free + in use == total; every ref_cnt equals the number of tables holding the block."""
        assert NULL_BLOCK.ref_cnt == 0 and NULL_BLOCK.block_hash is None, "NULL_BLOCK was used"
        for pool, tables in ((self.pool, self.block_tables), (self.cpu_pool, self.cpu_block_tables)):
            if pool is None:
                assert not tables
                continue
            pool.check_integrity()
            refs: dict[int, int] = {}
            for table in tables.values():
                for block in _held(table):
                    assert pool.blocks[block.block_id] is block, "table entry from another pool"
                    refs[block.block_id] = refs.get(block.block_id, 0) + 1
            for block in pool.blocks:
                assert block.ref_cnt == refs.get(block.block_id, 0), (
                    f"block {block.block_id}: ref_cnt {block.ref_cnt} but "
                    f"{refs.get(block.block_id, 0)} table entries"
                )
