"""Exact tests of the scheduling policies (core/policy.py): which request is admitted first,
which is preempted first, how SJF ages and what VTC charges. Torch-free. The 'model' appends
token 0 to every sequence that samples; a request finishes after max_tokens outputs."""

from __future__ import annotations

import pytest

from pagedllm.config import SchedulerConfig
from pagedllm.core.block_manager import BlockManager
from pagedllm.core.policy import BucketPredictor, OraclePredictor
from pagedllm.core.scheduler import Scheduler
from pagedllm.core.sequence import Sequence, SequenceGroup, SequenceStatus


def make(policy="fcfs", num_blocks=64, block_size=4, budget=64, max_seqs=8, predictor=None,
         **kwargs):
    bm = BlockManager(num_blocks, block_size, enable_caching=False)
    cfg = SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget,
                          max_model_len=64, policy=policy, **kwargs)
    return Scheduler(cfg, bm, predictor)


def add(sched, rid, n, t, priority=0, max_tokens=16, user=None):
    g = SequenceGroup(str(rid), [Sequence(rid, list(range(n)))], None, arrival_time=t,
                      priority=priority, max_tokens=max_tokens, user=user)
    sched.add(g)
    return g


def step(sched):
    """One engine step: [(request id, num_new_tokens)] in batch order, and the plan."""
    out = sched.schedule()
    sampled = [e for e in out.scheduled if e.samples]
    sched.update_from_output(out)
    for e in sampled:
        e.seq.token_ids.append(0)
        if e.seq.num_output_tokens >= e.group.max_tokens:
            sched.finish_seq(e.seq, SequenceStatus.FINISHED_LENGTH)
    sched.remove_finished()
    sched.block_manager.check_integrity()
    return [(e.group.request_id, e.num_new_tokens) for e in out.scheduled], out


def run_order(sched, arrivals: dict[int, list], steps: int) -> list[str]:
    """Requests in the order they were first scheduled; arrivals[k]: add(...) args before
    step k (0-based)."""
    order = []
    for k in range(steps):
        for args in arrivals.get(k, ()):
            add(sched, *args[:3], **args[3])
        for rid, _ in step(sched)[0]:
            if rid not in order:
                order.append(rid)
    return order


# ---- priority -------------------------------------------------------------------------------
def test_priority_victim_is_the_lowest_priority_then_the_latest_arrival():
    # 4 blocks of 4: three 3-token prompts take a block each; at their 5th token each needs a
    # second one. One is free: the first in priority order takes it, the tail is preempted.
    sched = make("priority", num_blocks=4)
    a = add(sched, 0, 3, t=0, priority=2)
    add(sched, 1, 3, t=1, priority=0)
    c = add(sched, 2, 3, t=2, priority=1)
    assert step(sched)[0] == [("1", 3), ("2", 3), ("0", 3)]  # running in priority order
    step(sched)
    batch, out = step(sched)
    # "1" takes the free block; "2" needs one: the tail "0" (priority 2, though it came
    # first) is preempted and its block goes to "2".
    assert out.preempted == [a] and batch == [("1", 1), ("2", 1)]
    # Equal priorities: the latest arrival goes.
    sched = make("priority", num_blocks=4)
    add(sched, 0, 3, t=0, priority=1)
    add(sched, 1, 3, t=1, priority=1)
    c = add(sched, 2, 3, t=2, priority=1)
    step(sched), step(sched)
    assert step(sched)[1].preempted == [c]


def test_priority_fcfs_policy_preempts_the_latest_arrival_whatever_its_priority():
    sched = make("fcfs", num_blocks=4)
    add(sched, 0, 3, t=0)
    add(sched, 1, 3, t=1)
    c = add(sched, 2, 3, t=2)
    step(sched), step(sched)
    assert step(sched)[1].preempted == [c]


def test_a_waiting_high_priority_request_preempts_lower_ones_at_once():
    sched = make("priority", num_blocks=2, block_size=4)
    low = add(sched, 0, 7, t=0, priority=5)
    assert step(sched)[0] == [("0", 7)]  # both blocks taken
    add(sched, 1, 3, t=1, priority=0)
    batch, out = step(sched)
    assert out.preempted == [low] and batch == [("1", 3)]
    assert low.seqs[0].status is SequenceStatus.WAITING  # recomputed, not swapped
    assert low.seqs[0].num_computed_tokens == 0 and sched.waiting == [low]
    # Equal priority: no preemption, the newcomer waits for blocks.
    sched = make("priority", num_blocks=2, block_size=4)
    add(sched, 0, 7, t=0, priority=5)
    step(sched)
    add(sched, 1, 3, t=1, priority=5)
    batch, out = step(sched)
    assert batch == [("0", 1)] and not out.preempted and out.waiting_for_blocks


def test_a_high_priority_request_preempts_for_a_sequence_slot_too():
    sched = make("priority", max_seqs=1)
    low = add(sched, 0, 3, t=0, priority=1)
    step(sched)
    add(sched, 1, 3, t=1, priority=0)
    batch, out = step(sched)
    assert out.preempted == [low] and batch == [("1", 3)]


# ---- shortest job first ---------------------------------------------------------------------
def test_sjf_oracle_admits_the_shortest_predicted_output_first():
    sched = make("sjf", max_seqs=1, length_predictor="oracle", aging_rate=0.0)
    arrivals = {0: [(0, 4, 0.0, {"max_tokens": 8}), (1, 4, 1.0, {"max_tokens": 2}),
                    (2, 4, 2.0, {"max_tokens": 4}), (3, 4, 3.0, {"max_tokens": 2})]}
    assert run_order(sched, arrivals, 20) == ["1", "3", "2", "0"]
    # FCFS on the same trace: arrival order.
    assert run_order(make("fcfs", max_seqs=1), arrivals, 20) == ["0", "1", "2", "3"]


def test_sjf_victim_is_the_longest_predicted():
    sched = make("sjf", num_blocks=4, length_predictor="oracle", aging_rate=0.0)
    add(sched, 0, 3, t=0, max_tokens=30)
    long = add(sched, 1, 3, t=1, max_tokens=50)
    add(sched, 2, 3, t=2, max_tokens=10)
    assert step(sched)[0] == [("2", 3), ("0", 3), ("1", 3)]
    step(sched)
    assert step(sched)[1].preempted == [long]


@pytest.mark.parametrize("rate, expected", [
    # A (10 tokens, arrived at step 0) ranks 10; the short request arriving at step k ranks
    # 3 + k. Short ones that arrive at steps 1..6 go first; S7 ties with A (10) and loses on
    # arrival time: A runs after S6.
    (1.0, ["X", "S1", "S2", "S3", "S4", "S5", "S6", "A", "S7"]),
    # No ageing: A starves while short requests keep coming.
    (0.0, ["X"] + [f"S{k}" for k in range(1, 13)]),
])
def test_sjf_ageing_bounds_how_long_a_long_request_waits(rate, expected):
    sched = make("sjf", max_seqs=1, length_predictor="oracle", aging_rate=rate)
    ids = iter(range(100))

    def req(name, n_out, t):
        g = SequenceGroup(name, [Sequence(next(ids), [1, 2])], None, arrival_time=t,
                          max_tokens=n_out)
        sched.add(g)

    req("X", 5, -2.0)  # runs steps 1..5 alone (max 1 sequence)
    req("A", 10, -1.0)
    order = []
    for k in range(1, 60):
        for rid, _ in step(sched)[0]:
            if rid not in order:
                order.append(rid)
        req(f"S{k}", 3, float(k))  # arrives after step k: arrival_step k
    assert order[:len(expected)] == expected


def test_bucket_predictor_statistics_are_exact():
    p = BucketPredictor(prior_weight=1.0)

    def group(n_prompt, n_out=0):
        g = SequenceGroup("r", [Sequence(0, [7] * n_prompt)], None)
        g.seqs[0].token_ids += [0] * n_out
        return g

    assert p.predict(group(5)) == 0.0  # nothing finished yet
    p.observe(group(5), 10)  # bucket 3: prompts of 4..7 tokens
    p.observe(group(6), 20)
    p.observe(group(100), 100)  # bucket 7
    mean = 130 / 3
    assert p.predict(group(7)) == pytest.approx((30 + mean) / 3)
    assert p.predict(group(64)) == pytest.approx((100 + mean) / 2)
    assert p.predict(group(2000)) == pytest.approx(mean)  # an empty bucket: the global mean
    assert OraclePredictor().predict(SequenceGroup("r", [Sequence(0, [1])], None,
                                                   max_tokens=42)) == 42.0


def test_online_sjf_learns_from_finished_requests_only():
    pred = BucketPredictor()
    sched = make("sjf", predictor=pred)
    add(sched, 0, 3, t=0, max_tokens=4)  # runs to its length: observed
    aborted = add(sched, 1, 3, t=1, max_tokens=4)
    failed = add(sched, 2, 3, t=2, max_tokens=4)
    stopped = add(sched, 3, 12, t=3, max_tokens=9)  # ended by a stop string after 2 tokens
    step(sched), step(sched)
    sched.abort(aborted.request_id)
    sched.finish_seq(failed.seqs[0], SequenceStatus.FINISHED_ABORTED)
    sched.finish_seq(stopped.seqs[0], SequenceStatus.FINISHED_STOPPED)
    sched.abort(stopped.request_id)  # as the engine core removes it
    for _ in range(3):
        step(sched)
    assert pred.count == 2 and pred.buckets == {2: [1, 4.0], 4: [1, 2.0]}
    g = add(sched, 4, 3, t=4)
    assert g.predicted_output_len == pytest.approx((4 + 8 * 3) / 9) and g.arrival_step == 5


# ---- fairness (VTC) -------------------------------------------------------------------------
def test_vtc_charges_prefill_and_decode_tokens_by_weight():
    sched = make("fair", budget=4, fair_weights=(1.0, 2.0))
    add(sched, 0, 6, t=0, max_tokens=3, user="a")
    step(sched)  # 4 prompt tokens
    assert sched.policy.counters == {"a": 4.0}
    step(sched)  # 2 prompt tokens + the first sampled token
    assert sched.policy.counters == {"a": 8.0}
    step(sched)
    assert sched.policy.counters == {"a": 10.0}


def test_vtc_admits_the_client_with_the_smallest_counter():
    # Client a sends four requests at once, b one a step later; one runs at a time.
    sched = make("fair", max_seqs=1)
    arrivals = {0: [(i, 4, float(i), {"max_tokens": 3, "user": "a"}) for i in range(4)],
                1: [(9, 4, 9.0, {"max_tokens": 3, "user": "b"})]}
    # b arrives while a's first request runs: lifted to a's counter then (4 + 2), it is
    # below a's once that request finishes (4 + 3 * 2 = 10), so it runs second.
    assert run_order(sched, arrivals, 30) == ["0", "9", "1", "2", "3"]
    assert run_order(make("fcfs", max_seqs=1), arrivals, 30) == ["0", "1", "2", "3", "9"]


def test_vtc_lifts_new_and_returning_clients_so_they_bank_no_credit():
    sched = make("fair")
    add(sched, 0, 4, t=0, max_tokens=2, user="a")
    step(sched), step(sched)  # a: 4 + 2 * 2, finished
    assert sched.policy.counters == {"a": 8.0} and not sched.has_unfinished()
    add(sched, 1, 4, t=1, max_tokens=20, user="b")  # nobody active: the largest counter
    assert sched.policy.counters["b"] == 8.0
    step(sched)  # b: + 4 + 2
    add(sched, 2, 4, t=2, max_tokens=20, user="c")  # the smallest active counter
    assert sched.policy.counters["c"] == 14.0
    add(sched, 3, 4, t=3, max_tokens=20, user="a")  # returning: lifted from 8 to 14
    assert sched.policy.counters["a"] == 14.0
    add(sched, 4, 4, t=4, max_tokens=20, user="b")  # active: unchanged
    assert sched.policy.counters["b"] == 14.0


def test_vtc_preempts_the_client_with_the_largest_counter():
    sched = make("fair", num_blocks=4)
    add(sched, 0, 3, t=0, max_tokens=20, user="light")
    heavy = add(sched, 1, 3, t=1, max_tokens=20, user="heavy")
    sched.policy.counters["heavy"] = 100.0  # it was served a lot before
    add(sched, 2, 3, t=2, max_tokens=20, user="other")
    step(sched), step(sched)
    assert step(sched)[1].preempted == [heavy]


# ---- configuration --------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, message", [
    ({"policy": "lottery"}, "scheduling policy must be one of fcfs, priority, sjf, fair"),
    ({"policy": "fcfs", "length_predictor": "oracle"}, "length_predictor applies to the 'sjf'"),
    ({"policy": "priority", "aging_rate": 1.0}, "aging_rate applies to the 'sjf'"),
    ({"policy": "sjf", "fair_weights": (1.0, 2.0)}, "fair_weights applies to the 'fair'"),
    ({"policy": "sjf", "length_predictor": "bert"}, "length_predictor must be one of"),
    ({"policy": "sjf", "aging_rate": -1.0}, "aging_rate must be >= 0"),
    ({"policy": "fair", "fair_weights": (0.0, 0.0)}, "fair_weights must be two weights"),
])
def test_policy_options_are_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SchedulerConfig(**kwargs)
