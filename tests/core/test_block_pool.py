"""Exact tests of the block pool: free-queue order, ref counts, prefix-cache map and eviction."""

from __future__ import annotations

import sys

import pytest

from pagedllm.core.block_pool import BlockPool, FreeBlockQueue, KVCacheBlock, hash_block_tokens


def test_core_imports_no_torch():
    import subprocess

    code = ("import sys, pagedllm.core.scheduler, pagedllm.core.block_manager; "
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0, "core/ imported torch"


def test_free_queue_o1_ops_keep_order():
    blocks = [KVCacheBlock(i) for i in range(5)]
    q = FreeBlockQueue(blocks)
    assert q.block_ids() == [0, 1, 2, 3, 4]
    q.remove(blocks[2])  # from the middle
    assert q.block_ids() == [0, 1, 3, 4] and q.num_free_blocks == 4
    assert q.popleft() is blocks[0]
    q.append(blocks[2])
    q.append(blocks[0])
    assert q.block_ids() == [1, 3, 4, 2, 0]
    for _ in range(5):
        q.popleft()
    with pytest.raises(ValueError):
        q.popleft()


def test_allocate_and_free_order():
    pool = BlockPool(4)
    a = pool.get_new_blocks(2)
    assert [b.block_id for b in a] == [0, 1] and all(b.ref_cnt == 1 for b in a)
    b = pool.get_new_blocks(1)
    assert b[0].block_id == 2 and pool.num_free_blocks == 1
    pool.free_blocks(a[::-1])  # tail first
    assert pool.free_queue.block_ids() == [3, 1, 0]
    assert [x.block_id for x in pool.get_new_blocks(2)] == [3, 1]
    with pytest.raises(ValueError, match="asked for 2 blocks, 1 free"):
        pool.get_new_blocks(2)
    pool.check_integrity()


def test_double_free_is_caught():
    pool = BlockPool(2)
    (b,) = pool.get_new_blocks(1)
    pool.free_blocks([b])
    with pytest.raises(AssertionError, match="double free"):
        pool.free_blocks([b])


def test_cached_block_survives_free_and_is_revived_then_evicted_lru():
    pool = BlockPool(3)
    blocks = pool.get_new_blocks(3)
    h0 = hash_block_tokens(None, (1, 2))
    h1 = hash_block_tokens(h0, (3, 4))
    pool.cache_block(blocks[0], h0)
    pool.cache_block(blocks[1], h1)
    pool.free_blocks([blocks[1], blocks[0], blocks[2]])
    assert pool.free_queue.block_ids() == [1, 0, 2]
    # A prefix hit revives the free cached block without reallocating it.
    assert pool.get_cached_block(h0) is blocks[0]
    pool.touch([blocks[0]])
    assert blocks[0].ref_cnt == 1 and pool.free_queue.block_ids() == [1, 2]
    # Allocation pops the least recently freed block and evicts its hash.
    (new,) = pool.get_new_blocks(1)
    assert new is blocks[1] and new.block_hash is None and pool.get_cached_block(h1) is None
    assert pool.get_cached_block(h0) is blocks[0]
    pool.check_integrity()


def test_first_writer_wins_for_duplicate_contents():
    pool = BlockPool(2)
    a, b = pool.get_new_blocks(2)
    h = hash_block_tokens(None, (7, 7))
    pool.cache_block(a, h)
    pool.cache_block(b, h)
    assert pool.get_cached_block(h) is a and b.block_hash is None


def test_chained_hash_depends_on_parent():
    h_a = hash_block_tokens(None, (1, 2))
    h_b = hash_block_tokens(None, (9, 9))
    assert hash_block_tokens(h_a, (3, 4)) != hash_block_tokens(h_b, (3, 4))
    assert hash_block_tokens(h_a, (3, 4)) == hash_block_tokens(hash_block_tokens(None, (1, 2)), (3, 4))


def test_caching_disabled_never_hits():
    pool = BlockPool(2, enable_caching=False)
    (a,) = pool.get_new_blocks(1)
    h = hash_block_tokens(None, (1,))
    pool.cache_block(a, h)
    assert pool.get_cached_block(h) is None


def test_check_integrity_detects_leak():
    pool = BlockPool(2)
    (a,) = pool.get_new_blocks(1)
    a.ref_cnt = 0  # corrupt: a block with no owner that is not in the free queue
    with pytest.raises(AssertionError, match="leaked"):
        pool.check_integrity()
