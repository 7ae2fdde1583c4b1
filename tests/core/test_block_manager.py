"""Exact block-manager tests: block tables, prefix hits, fork + copy-on-write, swap maps."""

from __future__ import annotations

from types import SimpleNamespace

from hypothesis import given, settings
from hypothesis import strategies as st

from pagedllm.config import ModelConfig
from pagedllm.core.block_manager import BlockManager, cdiv
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
       st.sampled_from(["caching", "plain", "window"]))
def test_random_operations_keep_integrity(ops, mode):
    """Property: any sequence of allocate/append/fork/free keeps check_integrity() true,
    and freeing everything returns every block (with a sliding window too)."""
    bm = BlockManager(num_blocks=24, block_size=4, enable_caching=mode == "caching",
                      sliding_window=5 if mode == "window" else None)
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


# ---- sliding window (every layer slides: Mistral) ---------------------------------------------


def held(bm: BlockManager, seq_id: int) -> list[int]:
    """The blocks a table still holds (released entries are -1)."""
    return [b for b in bm.get_block_ids(seq_id) if b >= 0]


def test_sliding_window_bounds_the_blocks_a_sequence_holds():
    """W = 6, block size 4: the token at position c sees keys c - 5 .. c, so blocks wholly
    before c - 5 are released; a decoding sequence never holds more than cdiv(6, 4) + 1 = 3."""
    window, bs = 6, 4
    bm = BlockManager(num_blocks=16, block_size=bs, enable_caching=False, sliding_window=window)
    a = seq(0, 10)
    compute(bm, a, 10)  # positions 0..9: blocks [0, 1, 2]; nothing has left a window yet
    assert bm.get_block_ids(0) == [0, 1, 2]
    a.token_ids.append(10)
    compute(bm, a, 1)  # position 10 sees 5..10: block 0 (0..3) is released
    assert bm.get_block_ids(0) == [-1, 1, 2]
    assert bm.pool.free_queue.block_ids()[-1] == 0
    counts = []
    for c in range(11, 60):
        a.token_ids.append(c)
        compute(bm, a, 1)
        counts.append(len(held(bm, 0)))
        # exactly the blocks from the one holding c - W + 1 to the one holding c
        assert counts[-1] == c // bs - (c - window + 1) // bs + 1
        assert bm.get_block_ids(0)[:(c - window + 1) // bs] == [-1] * ((c - window + 1) // bs)
        assert bm.num_free_blocks == 16 - counts[-1]
        bm.check_integrity()
    assert max(counts) == cdiv(window, bs) + 1 == 3 and min(counts) == 2
    bm.free(a)
    assert bm.num_free_blocks == 16
    bm.check_integrity()


def test_sliding_window_reuses_released_blocks_in_a_full_pool():
    """Three blocks serve a sequence of any length: a block the window releases is counted as
    free for the very step that releases it, and comes straight back (LRU: the only free one)."""
    bm = BlockManager(num_blocks=3, block_size=4, enable_caching=False, sliding_window=6)
    a = seq(0, 8)
    compute(bm, a, 8)  # [0, 1]
    tables = []
    for c in range(8, 24):
        a.token_ids.append(c)
        assert bm.num_blocks_to_allocate([(a, 1, [])]) <= bm.num_free_blocks
        compute(bm, a, 1)
        if c % 4 == 0:
            tables.append(bm.get_block_ids(0))
    assert tables == [[0, 1, 2], [-1, 1, 2, 0], [-1, -1, 2, 0, 1], [-1, -1, -1, 0, 1, 2]]
    assert bm.num_free_blocks == 1  # position 23 sees 18..23: blocks 4 and 5 only
    bm.check_integrity()


def test_sliding_window_chunked_prefill_releases_before_the_chunk():
    """A chunk of positions [c, c + n) needs keys from c - W + 1 on: earlier blocks go first."""
    bm = BlockManager(num_blocks=16, block_size=4, enable_caching=False, sliding_window=6)
    a = seq(0, 40)
    compute(bm, a, 16)  # 0..15: blocks 0..3
    compute(bm, a, 16)  # 16..31 need keys from 11: blocks 0, 1 released, 4..7 new
    assert bm.get_block_ids(0) == [-1, -1, 2, 3, 4, 5, 6, 7]
    compute(bm, a, 8)  # 32..39 need keys from 27: blocks 2..5 released, 6 (24..27) kept
    assert bm.get_block_ids(0) == [-1] * 6 + [6, 7, 8, 9]  # 8, 9: the free queue's head
    assert bm.pool.free_queue.block_ids()[-6:] == [1, 0, 5, 4, 3, 2]  # released tail first
    bm.check_integrity()


def test_sliding_window_fork_and_swap_keep_released_entries():
    bm = BlockManager(num_blocks=8, block_size=4, enable_caching=False, num_cpu_blocks=8,
                      sliding_window=6)
    parent = seq(0, 14)
    compute(bm, parent, 12)
    compute(bm, parent, 2)  # 12, 13 see keys from 7: block 0 released -> [-1, 1, 2, 3]
    child = parent.fork(1)
    bm.fork(parent, child)
    for s, token in ((parent, 100), (child, 200)):
        s.token_ids.append(token)
        compute(bm, s, 1)  # position 14 sees 9..14: block 1 is released by both owners
    assert bm.get_block_ids(0) == [-1, -1, 2, 4] and bm.get_block_ids(1) == [-1, -1, 2, 3]
    assert bm.pool.blocks[1].ref_cnt == 0 and bm.pool.blocks[2].ref_cnt == 2
    bm.check_integrity()
    assert bm.swap_out([parent, child]) == [(2, 0), (4, 1), (3, 2)]  # held blocks only
    assert bm.num_free_blocks == 8
    assert [b.block_id for b in bm.cpu_block_tables[0]] == [-1, -1, 0, 1]
    bm.check_integrity()
    assert bm.swap_in([parent, child]) == [(0, 5), (1, 6), (2, 7)]
    assert bm.get_block_ids(0) == [-1, -1, 5, 6] and bm.get_block_ids(1) == [-1, -1, 5, 7]
    bm.check_integrity()
    bm.free(parent)
    bm.free(child)
    assert bm.num_free_blocks == 8
    bm.check_integrity()


def test_hybrid_model_keeps_every_block():
    """Gemma 3 interleaves global layers with the sliding ones: no window reaches the block
    manager, which then holds all of a sequence's blocks (and keeps prefix caching)."""
    layers = dict(num_hidden_layers=4, sliding_window=6)
    hybrid = SimpleNamespace(layer_types=["sliding_attention", "full_attention"] * 2, **layers)
    mistral = SimpleNamespace(**layers)
    assert ModelConfig("m", "dummy", "float32", 64, hybrid).sliding_window is None
    assert ModelConfig("m", "dummy", "float32", 64, mistral).sliding_window == 6
    # a window no sequence can outgrow frees nothing: none reaches the block manager
    assert ModelConfig("m", "dummy", "float32", 6, mistral).sliding_window is None
    bm = BlockManager(num_blocks=16, block_size=4, enable_caching=True, sliding_window=None)
    a = seq(0, 10)
    compute(bm, a, 10)
    for c in range(10, 40):
        a.token_ids.append(c)
        compute(bm, a, 1)
    assert bm.get_block_ids(0) == list(range(10))
    bm.check_integrity()


def test_sliding_only_model_turns_prefix_caching_off(caplog):
    from pagedllm.config import CacheConfig, EngineConfig, ParallelConfig, SchedulerConfig

    mistral = SimpleNamespace(num_hidden_layers=2, sliding_window=6, num_attention_heads=4)
    model = ModelConfig("m", "dummy", "float32", 64, mistral)
    with caplog.at_level("INFO"):
        config = EngineConfig(model, CacheConfig(), SchedulerConfig(max_model_len=64),
                              ParallelConfig(), device="cpu")
    assert not config.cache.enable_prefix_caching
    assert "prefix caching is off" in caplog.text
