"""The Orca baselines (core/reservation.py) under the real scheduler, and the paper's Fig. 2
memory split (core/kv_accounting.py) on hand-made traces whose answers are worked out below.

The 'model' appends token 0 to every sequence that samples; a sequence finishes when it
reaches prompt + max_tokens, as a replay with ignore_eos does."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pagedllm.config import SchedulerConfig
from pagedllm.core.block_manager import BlockManager
from pagedllm.core.kv_accounting import KVLedger
from pagedllm.core.reservation import ReservationManager, create_kv_allocator
from pagedllm.core.scheduler import Scheduler
from pagedllm.core.sequence import Sequence, SequenceGroup, SequenceStatus


def make(allocator="orca-oracle", num_blocks=16, block_size=4, budget=64, max_len=64,
         max_seqs=8, caching=False):
    bm = create_kv_allocator(allocator, num_blocks, block_size, caching, 0, max_len)
    cfg = SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget,
                          max_model_len=max_len)
    return Scheduler(cfg, bm), bm


def add(sched, rid, prompt_len, max_tokens, start=0):
    g = SequenceGroup(str(rid), [Sequence(rid, list(range(start, start + prompt_len)))], None,
                      arrival_time=rid, max_tokens=max_tokens)
    sched.add(g)
    return g


def step(sched):
    """One engine step; returns ([(seq_id, num_new_tokens)], this step's ledger)."""
    out = sched.schedule()
    sampled = [e.seq for e in out.scheduled if e.samples]
    sched.update_from_output(out)
    ledger = sched.kv_memory.last
    for s in sampled:
        s.token_ids.append(0)
        if s.num_tokens >= s.max_num_tokens:
            sched.finish_seq(s, SequenceStatus.FINISHED_LENGTH)
    sched.remove_finished()
    sched.block_manager.check_integrity()
    return [(e.seq.seq_id, e.num_new_tokens) for e in out.scheduled], ledger


def test_reservation_sizes_per_policy():
    s = Sequence(0, list(range(10)))
    SequenceGroup("0", [s], None, max_tokens=13)  # final length 23
    sizes = {}
    for policy in ("orca-max", "orca-pow2", "orca-oracle"):
        rm = ReservationManager(64, 4, policy, max_model_len=100)
        sizes[policy] = (rm.num_reserved(s), rm.region_order(s))
    # max: 100 slots -> 25 blocks -> 32; pow2: 10 + 16 = 26 -> 7 blocks -> 8; oracle: 23 -> 6 -> 8
    assert sizes == {"orca-max": (100, 5), "orca-pow2": (26, 3), "orca-oracle": (23, 3)}


def test_region_is_presented_as_a_contiguous_block_table():
    sched, bm = make("orca-oracle")
    add(sched, 0, 5, 3)  # 8 slots -> 2 blocks -> order 1 at block 0
    add(sched, 1, 6, 10)  # 16 slots -> 4 blocks -> order 2: [4, 8) (its buddy [0, 4) is split)
    assert step(sched)[0] == [(0, 5), (1, 6)]
    assert bm.get_block_ids(0) == [0, 1] and bm.get_block_ids(1) == [4, 5, 6, 7]
    assert bm.pool.free_regions() == [(2, 1), (8, 3)]


def test_a_request_larger_than_any_free_region_waits_though_the_blocks_are_free():
    sched, bm = make("orca-oracle", num_blocks=16)
    for rid in range(4):
        add(sched, rid, 8, 8 + 8 * (rid % 2))  # 16 or 24 slots: 4 blocks (order 2) or 8 (order 3)
    # 0 -> [0, 4), 1 -> [8, 16) (order 3: the smallest fitting is [8, 16)), 2 -> [4, 8); 3 waits
    scheduled, ledger = step(sched)
    assert scheduled == [(0, 8), (1, 8), (2, 8)]
    assert [bm.get_block_ids(i)[0] for i in (0, 1, 2)] == [0, 8, 4]
    assert sched.waiting[0].request_id == "3" and ledger.unused == 0
    for _ in range(8):  # 0 and 2 finish after 8 tokens; 1 runs on
        step(sched)
    assert [g.request_id for g in sched.running] == ["1", "3"]  # 3 took the merged [0, 8)
    assert bm.get_block_ids(3) == list(range(0, 6))

    # External fragmentation: free half the pool in two pieces that are not buddies.
    sched, bm = make("orca-oracle", num_blocks=16)
    for rid in range(4):
        add(sched, rid, 8, 4 if rid % 2 == 0 else 8)  # 12 slots (3 blocks) or 16 (4 blocks)
    step(sched)
    assert [bm.get_block_ids(i)[0] for i in range(4)] == [0, 4, 8, 12]
    add(sched, 9, 20, 8)  # 28 slots -> 7 blocks -> a region of 8
    for _ in range(4):
        scheduled, ledger = step(sched)  # 0 and 2 finish at the 4th: 8 blocks free in 2 pieces
    assert bm.num_free_blocks == 8 and bm.pool.free_regions() == [(0, 2), (8, 2)]
    scheduled, ledger = step(sched)
    assert scheduled == [(1, 1), (3, 1)]  # 9 still waits: no free region of 8 blocks
    assert ledger.external_frag >= 8 * 4  # the 32 free slots count as lost
    paged_sched, _ = make("paged", num_blocks=16)
    paged_bm = paged_sched.block_manager
    paged_bm.pool.get_new_blocks(8)  # the same 8 blocks held elsewhere: paged admits it at once
    add(paged_sched, 9, 20, 8)
    assert paged_sched.schedule().scheduled[0].num_new_tokens == 20


def test_fig2_split_on_a_hand_made_trace_orca_pow2():
    """bs = 4, 16 blocks (64 slots). A: prompt 5 + 3 out (F = 8), pow2 reserves 5 + 4 = 9 ->
    3 blocks -> a region of 4 (16 slots). B: 6 + 10 (F = 16), reserves 6 + 16 = 22 -> 6 blocks
    -> 8 (32 slots). C: 20 + 4 (F = 24), reserves 24 -> 6 -> 8; it waits until A is gone.

      step  A (tok res int ext)   B (tok res int ext)   C (tok res int ext)   free (blocked)
      1     5   3   1   7         6  10   6  10          -                     16 (yes)
      2     6   2   1   7         7   9   6  10          -                     16 (yes)
      3     7   1   1   7         8   8   6  10          -                     16 (yes)
      4     -  (A finished)       9   7   6  10          20  4   0   8          0
    (int = min(alloc, reserved) - F; ext = alloc - reserved, plus free slots while C waits)
    """
    sched, _ = make("orca-pow2")
    add(sched, 0, 5, 3)
    add(sched, 1, 6, 10)
    add(sched, 2, 20, 4)
    ledgers = [step(sched)[1] for _ in range(4)]
    assert ledgers == [KVLedger(11, 13, 7, 33, 0), KVLedger(13, 11, 7, 33, 0),
                       KVLedger(15, 9, 7, 33, 0), KVLedger(29, 11, 6, 18, 0)]
    assert all(ledger.total == 64 for ledger in ledgers)
    shares = sched.kv_memory.shares()
    assert shares == {"token_states": 68 / 256, "reserved": 44 / 256, "internal_frag": 27 / 256,
                      "external_frag": 117 / 256, "unused": 0.0}


def test_fig2_split_on_a_hand_made_trace_paged():
    """The same requests on paged blocks: all three start at once (9 blocks), nothing is lost.
      step 1: A 5 tokens in 2 blocks (3 reserved), B 6 in 2 (2 reserved: it grows past them),
              C 20 in 5 (0); 7 free blocks, nobody waits: unused
      step 2: A 6 (2), B 7 (1), C 21 in 6 blocks (3 reserved); 6 free blocks unused"""
    sched, _ = make("paged")
    add(sched, 0, 5, 3)
    add(sched, 1, 6, 10)
    add(sched, 2, 20, 4)
    assert [step(sched)[1] for _ in range(2)] == [KVLedger(31, 5, 0, 0, 28),
                                                  KVLedger(34, 6, 0, 0, 24)]
    # Internal fragmentation of paged blocks: the last block's slots past the final token.
    sched, _ = make("paged")
    add(sched, 0, 5, 2)  # F = 7 in 2 blocks: 1 slot never filled
    assert step(sched)[1] == KVLedger(5, 2, 1, 0, 56)


def test_paged_free_blocks_count_as_lost_while_a_request_waits_for_them():
    sched, _ = make("paged", num_blocks=4)
    add(sched, 0, 10, 16)  # 3 blocks
    add(sched, 1, 8, 4)  # needs 2 blocks, 1 is free: waits
    scheduled, ledger = step(sched)
    assert scheduled == [(0, 10)] and ledger == KVLedger(10, 2, 0, 4, 0)


def test_shared_prefix_blocks_are_counted_once():
    sched, bm = make("paged", caching=True)
    add(sched, 0, 9, 4)
    step(sched)  # A's blocks 0, 1 are full and published
    add(sched, 1, 9, 4)  # same prompt: 2 prefix hits, a block of its own for the 9th token
    _, ledger = step(sched)
    assert bm.get_block_ids(1)[:2] == bm.get_block_ids(0)[:2]
    # A: 10 computed in 3 blocks; B: 9 in 3 blocks, 2 of them A's. The tables hold 24 slots,
    # the pool 16 (4 blocks): the 8 slots of the shared blocks are token states counted once.
    assert ledger.token_states == 10 + 9 - 8 and ledger.total == 64
    assert ledger.reserved == 2 + 3 and ledger.unused == (16 - 4) * 4


def test_orca_modes_refuse_to_share():
    sched, bm = make("orca-max")
    g = add(sched, 0, 4, 4)
    step(sched)
    with pytest.raises(ValueError, match="kv_allocator='paged'"):
        bm.fork(g.seqs[0], g.seqs[0].fork(99))


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(["paged", "orca-max", "orca-pow2", "orca-oracle"]),
       st.integers(8, 40), st.sampled_from([2, 4, 8]), st.booleans(),
       st.lists(st.tuples(st.integers(1, 30), st.integers(1, 20), st.integers(0, 3)),
                min_size=1, max_size=12))
def test_random_workloads_keep_integrity_and_a_full_ledger(allocator, num_blocks, block_size,
                                                           shared_prompts, requests):
    """Every allocator under the real scheduler: integrity after every step, the ledger adds
    up to the pool, everything finishes, and nothing is held at the end. Orca regions are never
    preempted (they hold their whole final length)."""
    max_len = 64
    caching = allocator == "paged" and shared_prompts
    sched, bm = make(allocator, num_blocks, block_size, budget=32, max_len=max_len,
                     caching=caching)
    for rid, (prompt, out, delay) in enumerate(requests):
        prompt = min(prompt, max_len - 1)
        add(sched, rid, prompt, min(out, max_len - prompt), start=0 if shared_prompts else rid)
    for _ in range(2000):
        if not sched.has_unfinished():
            break
        _, ledger = step(sched)
        assert ledger.total == num_blocks * block_size
        assert min(ledger) >= 0
    assert not sched.has_unfinished()
    if allocator != "paged":
        assert sched.num_preemptions == 0
    assert bm.num_free_blocks == num_blocks
    if isinstance(bm, BlockManager):
        assert not bm.block_tables
    else:
        assert not bm.regions
