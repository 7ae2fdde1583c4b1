"""Exact block-manager tests: block tables, prefix hits, fork + copy-on-write, swap maps."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from pagedllm.core.block_manager import BlockManager
from pagedllm.core.sequence import Sequence


def seq(seq_id: int, n: int, start: int = 0) -> Sequence:
    return Sequence(seq_id, list(range(start, start + n)))


def compute(bm: BlockManager, s: Sequence, n: int):
    """What a step does to one sequence: allocate slots, 'compute', publish full blocks."""
    copies = bm.allocate_slots(s, n)
    assert copies is not None
    s.num_computed_tokens += n
    bm.cache_blocks(s)
    return copies


def test_allocate_on_demand_exact_ids():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = seq(0, 6)
    compute(bm, a, 6)  # 6 tokens -> 2 blocks
    assert bm.get_block_ids(0) == [0, 1]
    a.token_ids.append(100)
    compute(bm, a, 1)  # 7th token still fits block 1
    assert bm.get_block_ids(0) == [0, 1]
    a.token_ids += [101, 102]
    compute(bm, a, 2)  # 9 tokens -> a third block
    assert bm.get_block_ids(0) == [0, 1, 2]
    assert bm.num_free_blocks == 5
    bm.free(a)
    assert bm.num_free_blocks == 8
    # Freed tail first: block 2 is evicted first, the prefix root (block 0) last.
    assert bm.pool.free_queue.block_ids()[-3:] == [2, 1, 0]
    bm.check_integrity()


def test_allocate_fails_without_change():
    bm = BlockManager(num_blocks=2, block_size=4)
    a = seq(0, 12)
    assert not bm.can_allocate(a, 12)
    assert bm.allocate_slots(a, 12) is None
    assert bm.num_free_blocks == 2 and 0 not in bm.block_tables
    bm.check_integrity()


def test_prefix_hit_reuses_full_blocks_and_never_the_last_token():
    bm = BlockManager(num_blocks=10, block_size=4)
    a = seq(0, 10)
    compute(bm, a, 10)  # blocks 0,1 full and cached; block 2 partial
    assert bm.get_block_ids(0) == [0, 1, 2]
    b = seq(1, 9)  # same first 8 tokens + one more
    hits = bm.get_computed_blocks(b)
    assert [h.block_id for h in hits] == [0, 1]
    bm.allocate_slots(b, 1, hits)
    b.num_computed_tokens = 8
    assert bm.get_block_ids(1) == [0, 1, 3]
    assert [bm.pool.blocks[i].ref_cnt for i in (0, 1, 2, 3)] == [2, 2, 1, 1]
    # An exact 8-token repeat may hit only one block: the last token must be computed.
    c = seq(2, 8)
    assert [h.block_id for h in bm.get_computed_blocks(c)] == [0]
    bm.check_integrity()


def test_prefix_hit_revives_freed_cached_blocks_lru():
    bm = BlockManager(num_blocks=4, block_size=2)
    a = seq(0, 4)
    compute(bm, a, 4)  # blocks 0,1 full, cached
    bm.free(a)
    assert bm.pool.free_queue.block_ids() == [2, 3, 1, 0]
    b = seq(1, 5)
    hits = bm.get_computed_blocks(b)
    assert [h.block_id for h in hits] == [0, 1]
    assert bm.num_blocks_to_allocate([(b, 1, hits)]) == 3  # 2 revived + 1 new
    bm.allocate_slots(b, 1, hits)
    assert bm.get_block_ids(1) == [0, 1, 2]
    assert bm.pool.free_queue.block_ids() == [3]
    bm.check_integrity()


def test_eviction_drops_oldest_free_cached_block():
    bm = BlockManager(num_blocks=3, block_size=2)
    a = seq(0, 2)
    compute(bm, a, 2)
    bm.free(a)  # block 0 cached, free: queue [1, 2, 0]
    b = seq(1, 6, start=50)
    compute(bm, b, 6)  # needs 3 blocks: takes 1, 2 and finally evicts 0
    assert bm.get_block_ids(1) == [1, 2, 0]
    assert bm.get_computed_blocks(seq(2, 3)) == []  # a's prefix is gone
    bm.check_integrity()


def test_fork_shares_blocks_and_first_write_copies_partial_block():
    bm = BlockManager(num_blocks=8, block_size=4)
    parent = seq(0, 6)
    compute(bm, parent, 6)  # blocks [0, 1], block 1 half full
    child = parent.fork(1)
    bm.fork(parent, child)
    assert child.num_computed_tokens == 6 and child.num_prompt_tokens == 6
    assert bm.get_block_ids(1) == [0, 1]
    assert [bm.pool.blocks[i].ref_cnt for i in (0, 1)] == [2, 2]
    bm.check_integrity()
    # Both append a different token; the first writer into shared block 1 copies it.
    parent.token_ids.append(7)
    child.token_ids.append(8)
    assert compute(bm, parent, 1) == [(1, 2)]
    assert bm.get_block_ids(0) == [0, 2]
    assert [bm.pool.blocks[i].ref_cnt for i in (0, 1, 2)] == [2, 1, 1]
    # The child is now the only owner of block 1: it writes in place, no copy.
    assert compute(bm, child, 1) == []
    assert bm.get_block_ids(1) == [0, 1]
    bm.check_integrity()
    bm.free(parent)
    bm.free(child)
    assert bm.num_free_blocks == 8
    bm.check_integrity()


def test_fork_of_full_blocks_needs_no_copy():
    bm = BlockManager(num_blocks=8, block_size=4)
    parent = seq(0, 8)
    compute(bm, parent, 8)
    child = Sequence(1, parent.token_ids)
    bm.fork(parent, child)
    child.num_computed_tokens = 8
    child.token_ids.append(9)
    assert compute(bm, child, 1) == []  # writes start a fresh block
    assert bm.get_block_ids(1) == [0, 1, 2]
    bm.check_integrity()


def test_swap_out_and_in_maps_blocks_and_keeps_sharing():
    bm = BlockManager(num_blocks=6, block_size=4, num_cpu_blocks=6)
    a = seq(0, 6)
    compute(bm, a, 6)  # device [0, 1]
    b = Sequence(1, a.token_ids)
    bm.fork(a, b)
    b.num_computed_tokens = 6
    out = bm.swap_out([a, b])
    assert out == [(0, 0), (1, 1)]  # shared blocks are copied once
    assert bm.num_free_blocks == 6
    assert bm.cpu_block_tables[0] == bm.cpu_block_tables[1]
    assert [blk.ref_cnt for blk in bm.cpu_pool.blocks[:2]] == [2, 2]
    bm.check_integrity()
    other = seq(2, 4, start=90)
    compute(bm, other, 4)  # takes device block 2
    back = bm.swap_in([a, b])
    assert back == [(0, 3), (1, 4)]
    assert bm.get_block_ids(0) == [3, 4] and bm.get_block_ids(1) == [3, 4]
    assert bm.cpu_pool.num_free_blocks == 6
    bm.check_integrity()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["add", "grow", "free", "fork"]),
                          st.integers(0, 7), st.integers(1, 20)), max_size=60),
       st.booleans())
def test_random_operations_keep_integrity(ops, caching):
    """Property: any sequence of allocate/append/fork/free keeps check_integrity() true,
    and freeing everything returns every block."""
    bm = BlockManager(num_blocks=24, block_size=4, enable_caching=caching)
    live: dict[int, Sequence] = {}
    next_id = 0
    for op, pick, n in ops:
        if op == "add":
            s = seq(next_id, n, start=pick * 3)  # overlapping contents -> prefix hits
            next_id += 1
            hits = bm.get_computed_blocks(s)
            if bm.allocate_slots(s, s.num_tokens - len(hits) * 4, hits) is not None:
                s.num_computed_tokens = s.num_tokens
                bm.cache_blocks(s)
                live[s.seq_id] = s
        elif live:
            s = list(live.values())[pick % len(live)]
            if op == "grow":
                s.token_ids += [pick] * n
                if bm.allocate_slots(s, n) is not None:
                    s.num_computed_tokens = s.num_tokens
                    bm.cache_blocks(s)
                else:
                    del s.token_ids[-n:]
            elif op == "fork":
                child = Sequence(next_id, s.token_ids)
                next_id += 1
                bm.fork(s, child)
                child.num_computed_tokens = s.num_computed_tokens
                live[child.seq_id] = child
            else:
                bm.free(live.pop(s.seq_id))
        bm.check_integrity()
    for s in list(live.values()):
        bm.free(s)
    bm.check_integrity()
    assert bm.num_free_blocks == 24
