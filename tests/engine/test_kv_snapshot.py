"""The dashboard's snapshot (engine/kv_snapshot.py) against the block manager's own view.

At every step of a run that forks (n > 1), takes prefix hits, swaps a group out and back and
aborts, the snapshot's cells, counts, block tables and queue states equal what the pool's
check_integrity() walks: the free queue, the prefix-cache map and the references of every
block table. No torch, no model: the scheduler and block manager driven directly.
"""

from __future__ import annotations

import base64
from collections import Counter

import msgspec

from pagedllm.config import SchedulerConfig
from pagedllm.core.block_manager import BlockManager
from pagedllm.core.scheduler import Scheduler
from pagedllm.core.sequence import Sequence, SequenceGroup, SequenceStatus
from pagedllm.engine.kv_snapshot import build_kv_snapshot


def integrity_view(bm: BlockManager) -> dict:
    """Each pool as check_integrity() sees it: per block, free (0), free and cached (1) or
    ref_cnt + 1 counted from the block tables; and the counts by state."""
    bm.check_integrity()  # the invariants hold at this step
    view = {}
    for name, pool, tables in (("device", bm.pool, bm.block_tables),
                               ("cpu", bm.cpu_pool, bm.cpu_block_tables)):
        free = {b.block_id: b.block_hash is not None for b in pool.free_queue}
        refs = Counter(b.block_id for t in tables.values() for b in t if b.block_id >= 0)
        assert not set(free) & set(refs)
        codes = [int(free[i]) if i in free else refs[i] + 1 for i in range(pool.num_blocks)]
        view[name] = {
            "codes": codes,
            "counts": {"free": sum(not c for c in free.values()),
                       "cached": sum(free.values()),
                       "in_use": sum(r == 1 for r in refs.values()),
                       "shared": sum(r > 1 for r in refs.values())},
        }
    return view


def check(sched: Scheduler, requests: dict) -> dict:
    """The snapshot, through JSON as /debug/kv sends it, equals the integrity view."""
    bm = sched.block_manager
    snap = msgspec.json.decode(msgspec.json.encode(
        build_kv_snapshot(sched, requests, {"num_preemptions_total": sched.num_preemptions})))
    view = integrity_view(bm)
    for name in ("device", "cpu"):
        pool = snap[name]
        assert list(base64.b64decode(pool["cells"])) == view[name]["codes"], name
        assert pool["counts"] == view[name]["counts"], name
        assert sum(pool["counts"].values()) == pool["num_blocks"]
    assert snap["device"]["counts"]["free"] + snap["device"]["counts"]["cached"] \
        == bm.num_free_blocks
    queues = {g.request_id: q for q in ("running", "swapped", "waiting")
              for g in getattr(sched, q)}
    assert {r["request_id"]: r["state"] for r in snap["requests"]} == queues
    for row in snap["requests"]:
        for s in row["seqs"]:
            assert s["block_table"] == bm.get_block_ids(s["seq_id"])
            assert s["cpu_block_table"] == [b.block_id for b in
                                            bm.cpu_block_tables.get(s["seq_id"], ())]
    assert snap["step"] == sched.kv_memory.num_steps
    return snap


def run_step(sched: Scheduler, requests: dict) -> None:
    """One engine step: every sampling sequence appends token 7, and ends at max_tokens."""
    out = sched.schedule()
    assert not out.rejected
    sampled = [e.seq for e in out.scheduled if e.samples]
    sampled += [c for e in out.scheduled for c in e.forks]
    sched.update_from_output(out)
    for s in sampled:
        s.token_ids.append(7)
        if s.num_tokens >= s.max_num_tokens:
            sched.finish_seq(s, SequenceStatus.FINISHED_LENGTH)
    for group in sched.remove_finished():
        del requests[group.request_id]


def test_snapshot_equals_the_integrity_view_through_fork_hits_swap_and_abort():
    bm = BlockManager(12, 4, enable_caching=True, num_cpu_blocks=10)
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64,
                                      max_model_len=64, preemption_mode="swap"), bm)
    requests: dict[str, SequenceGroup] = {}

    def add(rid, prompt, max_tokens, n=1, t=0.0):
        g = SequenceGroup(rid, [Sequence(sched.new_seq_id(), prompt)], None, arrival_time=t,
                          num_samples=n, max_tokens=max_tokens)
        requests[rid] = g
        sched.add(g)
        return g

    check(sched, requests)  # an empty pool
    a = add("a", list(range(9)), 12, n=3)  # 2 full blocks + 1 partial, shared by 3 samples
    run_step(sched, requests)
    snap = check(sched, requests)
    (row,) = snap["requests"]
    assert len(row["seqs"]) == 3 and snap["device"]["counts"]["shared"] == 3
    assert max(base64.b64decode(snap["device"]["cells"])) == 3 + 1  # ref 3
    b = add("b", list(range(8)) + [50, 51], 30, t=1.0)  # 2 prefix hits: ref 4 on them
    states = []
    for _ in range(40):
        run_step(sched, requests)
        snap = check(sched, requests)
        rows = {r["request_id"]: r for r in snap["requests"]}
        states.append(rows["b"]["state"] if "b" in rows else None)
        if states[-1] == "swapped":
            assert snap["cpu"]["counts"]["in_use"] > 0
            assert rows["b"]["num_preemptions"] == 1 and rows["b"]["seqs"][0]["cpu_block_table"]
        if states[-3:] == ["running", "running", "running"] and "swapped" in states:
            break
    # b shared a's prefix, was swapped out for a, came back once a finished; now abort it
    assert "a" not in requests and states[0] == "running", states
    assert not any(bm.cpu_block_tables.values()) and b.num_cached_tokens == 8
    sched.abort("b")
    del requests["b"]
    snap = check(sched, requests)
    # every block is free again; the published full blocks stay revivable
    assert not snap["requests"]
    assert snap["device"]["counts"]["in_use"] == snap["device"]["counts"]["shared"] == 0
    assert snap["device"]["counts"]["cached"] > 0
    assert a.num_preemptions == 0 and b.num_preemptions == 1
