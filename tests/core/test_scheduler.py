"""Exact scheduler tests: which sequences run each step, with how many tokens, and what
happens when blocks run out. The 'model' appends token 0 to every sequence that samples."""

from __future__ import annotations

import pytest

from pagedllm.config import SchedulerConfig
from pagedllm.core.block_manager import BlockManager
from pagedllm.core.scheduler import Scheduler
from pagedllm.core.sequence import Sequence, SequenceGroup, SequenceStatus


def make(num_blocks=16, block_size=4, budget=64, max_seqs=8, chunked=True, policy="fcfs",
         caching=False, cpu_blocks=0, mode=None):
    bm = BlockManager(num_blocks, block_size, enable_caching=caching, num_cpu_blocks=cpu_blocks)
    cfg = SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget,
                          max_model_len=64 if chunked else budget, enable_chunked_prefill=chunked,
                          policy=policy, preemption_mode=mode)
    return Scheduler(cfg, bm), bm


def add(sched, rid, n, t, priority=0, start=0):
    g = SequenceGroup(str(rid), [Sequence(rid, list(range(start, start + n)))], None,
                      arrival_time=t, priority=priority)
    sched.add(g)
    return g


def step(sched, max_len=None):
    """One engine step; returns [(seq_id, num_new_tokens)] in batch order."""
    out = sched.schedule()
    sampled = [e.seq for e in out.scheduled if e.samples]
    sched.update_from_output(out)
    for s in sampled:
        s.token_ids.append(0)
        if max_len is not None and s.num_tokens >= max_len:
            sched.finish_seq(s, SequenceStatus.FINISHED_LENGTH)
    sched.remove_finished()
    sched.block_manager.check_integrity()
    return [(e.seq.seq_id, e.num_new_tokens) for e in out.scheduled], out


def test_continuous_batching_admits_new_requests_between_decode_steps():
    sched, bm = make()
    add(sched, 0, 5, t=0)
    assert step(sched)[0] == [(0, 5)]
    assert step(sched)[0] == [(0, 1)]
    add(sched, 1, 3, t=1)
    # The running decode goes first, then the new prefill joins the same step.
    assert step(sched)[0] == [(0, 1), (1, 3)]
    assert step(sched)[0] == [(0, 1), (1, 1)]
    assert bm.get_block_ids(0) == [0, 1] and bm.get_block_ids(1) == [2]


def test_chunked_prefill_under_token_budget():
    sched, _ = make(budget=8)
    add(sched, 0, 20, t=0)
    add(sched, 1, 4, t=1)
    assert step(sched)[0] == [(0, 8)]
    assert step(sched)[0] == [(0, 8)]
    assert step(sched)[0] == [(0, 4), (1, 4)]  # last chunk, then the next prompt fits
    assert step(sched)[0] == [(0, 1), (1, 1)]


def test_decode_is_never_starved_by_a_long_prefill():
    sched, _ = make(budget=6)
    add(sched, 0, 3, t=0)
    assert step(sched)[0] == [(0, 3)]
    add(sched, 1, 30, t=1)
    assert step(sched)[0] == [(0, 1), (1, 5)]
    assert step(sched)[0] == [(0, 1), (1, 5)]


def test_without_chunking_a_prompt_waits_for_a_whole_budget():
    sched, _ = make(budget=10, chunked=False)
    add(sched, 0, 8, t=0)
    add(sched, 1, 8, t=1)
    assert step(sched)[0] == [(0, 8)]  # 8 + 8 > 10: the second waits
    assert step(sched)[0] == [(0, 1), (1, 8)]


def test_max_num_seqs_caps_the_batch():
    sched, _ = make(max_seqs=2)
    for i in range(3):
        add(sched, i, 2, t=i)
    assert step(sched)[0] == [(0, 2), (1, 2)]
    assert [g.request_id for g in sched.waiting] == ["2"]


def test_recompute_preemption_takes_the_latest_arrival_and_resumes_it_first():
    # 4 blocks of 4 tokens. Two 7-token prompts take 2 blocks each; at token 9 seq 0
    # needs a third block: seq 1 (latest) is preempted, and comes back first.
    sched, bm = make(num_blocks=4, block_size=4)
    g0 = add(sched, 0, 7, t=0)
    g1 = add(sched, 1, 7, t=1)
    add(sched, 2, 2, t=2)
    assert step(sched)[0] == [(0, 7), (1, 7)]  # no room for seq 2
    assert step(sched)[0] == [(0, 1), (1, 1)]  # 8 tokens each, blocks full
    batch, out = step(sched)
    assert batch == [(0, 1)]
    assert out.preempted == [g1] and sched.num_preemptions == 1
    s1 = g1.seqs[0]
    assert s1.status is SequenceStatus.WAITING and s1.num_computed_tokens == 0
    assert s1.token_ids == list(range(7)) + [0, 0]  # outputs are kept, recomputed later
    assert [g.request_id for g in sched.waiting] == ["1", "2"]  # back at the front
    # Seq 1's blocks were freed tail first ([3, 2]), so seq 0's third block is 3.
    assert bm.get_block_ids(0) == [0, 1, 3]
    sched.finish_seq(g0.seqs[0], SequenceStatus.FINISHED_STOPPED)
    sched.remove_finished()
    # Seq 1 re-prefills its prompt and both outputs in one go, then seq 2 is admitted.
    assert step(sched)[0] == [(1, 9), (2, 2)]


def test_no_new_admissions_in_a_step_that_preempted():
    sched, _ = make(num_blocks=2, block_size=2)
    add(sched, 0, 2, t=0)
    add(sched, 1, 2, t=1)
    step(sched)
    add(sched, 2, 1, t=2)
    batch, out = step(sched)
    assert batch == [(0, 1)] and len(out.preempted) == 1
    assert [g.request_id for g in sched.waiting] == ["1", "2"]


def test_priority_policy_orders_admission_and_preemption():
    sched, _ = make(num_blocks=4, block_size=4, policy="priority", max_seqs=1)
    add(sched, 0, 3, t=0, priority=5)
    add(sched, 1, 3, t=1, priority=1)  # lower value = more important, as in vLLM
    assert step(sched)[0] == [(1, 3)]


def test_a_request_that_can_never_fit_is_rejected_not_looped():
    sched, bm = make(num_blocks=2, block_size=4)
    big = add(sched, 0, 12, t=0)
    ok = add(sched, 1, 3, t=1)
    batch, out = step(sched)
    assert [g for g, _ in out.rejected] == [big]
    assert "needs 3 KV blocks but the cache has only 2" in out.rejected[0][1]
    assert big.seqs[0].status is SequenceStatus.FINISHED_ABORTED
    assert batch == [(1, 3)] and ok in sched.running
    assert bm.num_free_blocks == 1


def test_a_running_sequence_that_outgrows_the_whole_cache_is_rejected():
    sched, bm = make(num_blocks=2, block_size=2)
    g = add(sched, 0, 3, t=0)
    step(sched)  # 3 tokens -> 2 blocks; sampling makes 4
    step(sched)  # token 4 fits; sampling makes 5 -> needs a third block
    batch, out = step(sched)
    assert batch == [] and [x for x, _ in out.rejected] == [g]
    assert bm.num_free_blocks == 2 and not sched.has_unfinished()


def test_abort_frees_blocks_in_every_queue():
    sched, bm = make()
    add(sched, 0, 5, t=0)
    add(sched, 1, 5, t=1)
    step(sched)
    add(sched, 2, 5, t=2)
    assert sched.abort("0").seqs[0].status is SequenceStatus.FINISHED_ABORTED
    assert sched.abort("2") is not None  # still waiting
    assert sched.abort("nope") is None
    assert bm.get_block_ids(0) == [] and [g.request_id for g in sched.running] == ["1"]
    bm.check_integrity()


def test_prefix_cache_hit_skips_computed_blocks_and_counts_tokens():
    sched, bm = make(caching=True, block_size=4)
    add(sched, 0, 10, t=0)
    step(sched)
    add(sched, 1, 10, t=1)  # same 10 tokens
    batch, _ = step(sched)
    # Seq 1 starts at token 8 (two cached blocks); seq 0 decodes.
    assert batch == [(0, 1), (1, 2)]
    assert bm.get_block_ids(1)[:2] == bm.get_block_ids(0)[:2]
    assert sched.prefix_cache_queries == 20 and sched.prefix_cache_hits == 8


@pytest.mark.parametrize("mode", ["swap", None])
def test_swap_preemption_moves_a_group_and_brings_it_back_first(mode):
    sched, bm = make(num_blocks=5, block_size=4, cpu_blocks=8, mode=mode)
    g0 = add(sched, 0, 7, t=0)
    g1 = add(sched, 1, 7, t=1, start=50)
    step(sched)  # 7-token prefills: seq 0 -> [0, 1], seq 1 -> [2, 3]; both sample (8 tokens)
    # Make request 1 a two-sequence group, as parallel sampling does: the child shares
    # seq 1's blocks and differs in its last (not yet computed) token.
    parent = g1.seqs[0]
    child = Sequence(9, parent.token_ids[:-1] + [1])
    bm.fork(parent, child)
    child.num_computed_tokens = parent.num_computed_tokens
    g1.seqs.append(child)
    batch, out = step(sched)  # token 8 goes into shared, half-full block 3: one copy
    assert batch == [(0, 1), (1, 1), (9, 1)] and out.blocks_to_copy == [(3, 4)]
    assert bm.get_block_ids(1) == [2, 4] and bm.get_block_ids(9) == [2, 3]
    # Token 9 needs a new block for each of the 3 sequences, with none free: the group
    # (latest arrival) is swapped out whole; its shared block 2 is copied once.
    batch, out = step(sched)
    assert out.preempted == [g1] and batch == [(0, 1)]
    assert out.blocks_to_swap_out == [(2, 0), (4, 1), (3, 2)]
    assert sched.swapped == [g1] and {s.status for s in g1.seqs} == {SequenceStatus.SWAPPED}
    assert bm.get_block_ids(0) == [0, 1, 4]
    sched.finish_seq(g0.seqs[0], SequenceStatus.FINISHED_STOPPED)
    sched.remove_finished()  # free queue now [3, 2, 4, 1, 0]
    batch, out = step(sched)
    assert out.blocks_to_swap_in == [(0, 3), (1, 2), (2, 4)]
    assert bm.get_block_ids(1) == [3, 2, 1] and bm.get_block_ids(9) == [3, 4, 0]
    assert batch == [(1, 1), (9, 1)]
    assert sched.num_swapped_out_blocks == 3 and sched.num_swapped_in_blocks == 3



def test_group_prefix_hits_are_pinned_before_siblings_allocate():
    """Allocating one sequence's new block pops the LRU head; if that head is a sibling's free
    cached hit, the sibling must already hold it (else two sequences share one new block)."""
    sched, bm = make(num_blocks=4, block_size=2, caching=True)
    for seq_id, tokens in [(90, [5, 6]), (91, [1, 2]), (92, [8, 8, 8, 8])]:
        s = Sequence(seq_id, tokens)
        bm.allocate_slots(s, len(tokens))
        s.num_computed_tokens = len(tokens)
        bm.cache_blocks(s)
        bm.free(s)
    # LRU order: [0: (5,6) cached, 1: (1,2) cached, 3, 2]
    assert bm.pool.free_queue.block_ids() == [0, 1, 3, 2]
    x, y = Sequence(0, [1, 2, 9]), Sequence(1, [5, 6, 9])
    sched.add(SequenceGroup("g", [x, y], None, arrival_time=0))
    batch, _ = step(sched)
    assert batch == [(0, 1), (1, 1)]  # both start past their one-block hit
    assert bm.get_block_ids(0) == [1, 3] and bm.get_block_ids(1) == [0, 2]


def test_parallel_sampling_forks_when_the_first_token_is_due():
    sched, bm = make(block_size=4)
    g = SequenceGroup("r", [Sequence(100, list(range(6)))], None, arrival_time=0, num_samples=3)
    sched.add(g)
    out = sched.schedule()
    (entry,) = out.scheduled  # the prompt is prefilled once...
    assert entry.seq.seq_id == 100 and entry.num_new_tokens == 6
    assert [c.seq_id for c in entry.forks] == [0, 1]  # ...and forked while planned
    assert [s.seq_id for s in g.seqs] == [100, 0, 1]
    assert all(s.status is SequenceStatus.RUNNING for s in g.seqs)
    assert all(c.num_computed_tokens == 6 for c in entry.forks)  # this step computes them
    table = bm.get_block_ids(100)
    assert [bm.get_block_ids(c.seq_id) for c in entry.forks] == [table, table]
    assert [bm.pool.blocks[b].ref_cnt for b in table] == [3, 3]
    sched.update_from_output(out)
    for s in g.seqs:
        s.token_ids.append(7)
    out = sched.schedule()  # three decodes; the shared partial block is copied twice
    assert [(e.seq.seq_id, e.num_new_tokens, e.forks) for e in out.scheduled] == \
        [(100, 1, []), (0, 1, []), (1, 1, [])]
    assert len(out.blocks_to_copy) == 2
    bm.check_integrity()


# ---- admission control (max_waiting / max_queued_tokens) ------------------------------------
def make_capped(max_seqs, max_waiting=None, max_queued_tokens=None):
    bm = BlockManager(64, 4, enable_caching=False)
    cfg = SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=64, max_model_len=64,
                          max_waiting=max_waiting, max_queued_tokens=max_queued_tokens)
    return Scheduler(cfg, bm), bm


def ids(items):
    """Request ids of groups, (group, reason) pairs or ScheduledSeqs."""
    return [x.request_id if isinstance(x, SequenceGroup) else
            x[0].request_id if isinstance(x, tuple) else x.group.request_id for x in items]


def test_admission_counts_the_queue_after_scheduling_not_arrivals():
    sched, _ = make_capped(max_seqs=3, max_waiting=2)
    for rid in range(7):  # 7 at once: 3 run, 2 may wait, the 2 newest are refused
        add(sched, rid, 4, t=rid)
    _, out = step(sched)
    assert ids(out.scheduled) == ["0", "1", "2"]
    assert ids(out.admitted) == ["0", "1", "2", "3", "4"]
    assert ids(out.refused) == ["5", "6"]
    assert "2 requests wait (max_waiting=2)" in out.refused[0][1]
    assert ids(sched.waiting) == ["3", "4"]
    assert all(s.is_finished for g, _ in out.refused for s in g.seqs)
    # Queue full: the next arrival is refused; earlier waiters are never refused later.
    add(sched, 7, 4, t=7)
    _, out = step(sched)
    assert ids(out.refused) == ["7"] and out.admitted == [] and ids(sched.waiting) == ["3", "4"]
    # A finished runner frees a slot: the oldest waiter runs and an arrival may wait again.
    sched.finish_seq(sched.running[0].seqs[0], SequenceStatus.FINISHED_STOPPED)
    sched.remove_finished()
    add(sched, 8, 4, t=8)
    _, out = step(sched)
    assert ids(out.admitted) == ["8"] and ids(sched.waiting) == ["4", "8"]


def test_admission_by_queued_tokens_and_zero_means_no_waiting():
    sched, _ = make_capped(max_seqs=1, max_queued_tokens=10)
    add(sched, 0, 4, t=0)
    for rid, n in [(1, 6), (2, 5), (3, 4)]:  # waits: 6 fits, 6+5 > 10 refused, 6+4 fits
        add(sched, rid, n, t=rid)
    _, out = step(sched)
    assert ids(out.scheduled) == ["0"] and ids(out.refused) == ["2"]
    assert "6 prompt tokens wait and this request adds 5 (max_queued_tokens=10)" \
        in out.refused[0][1]
    assert ids(sched.waiting) == ["1", "3"]

    sched, _ = make_capped(max_seqs=1, max_waiting=0)
    add(sched, 0, 4, t=0)
    add(sched, 1, 4, t=1)
    _, out = step(sched)
    assert ids(out.admitted) == ["0"] and ids(out.refused) == ["1"] and not sched.waiting


def test_no_admission_control_without_caps():
    sched, _ = make(max_seqs=1)
    for rid in range(4):
        add(sched, rid, 4, t=rid)
    _, out = step(sched)
    assert out.admitted == [] and out.refused == [] and len(sched.waiting) == 3
