"""What the dashboard draws: one snapshot of the block pools, the queues and the counters.

The engine core builds it only when the frontend asks (the `kv_snapshot` utility call, which
core_proc.py serves between two steps), so a closed dashboard costs the step loop nothing and
an open one costs what the frontend's DashboardHub asks for: at most a few per second,
however many pages are open (entrypoints/openai/dashboard.py).

A pool travels as one byte per physical block (msgpack `bin`; base64 in JSON):

    code      state of block i            (block_pool.py's three states, in-use split by ref)
    0         free, empty
    1         free, cached                a prefix-cache hit would revive it
    2 .. 255  in use, ref_cnt = code - 1  (255: ref_cnt 254 or more); > 2 is shared

In the CPU swap pool an in-use block is a swapped-out block. Block tables travel as lists of
block ids (-1: an entry a sliding window released).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from pagedllm.core.block_manager import BlockManager
from pagedllm.core.block_pool import BlockPool

if TYPE_CHECKING:
    from pagedllm.core.scheduler import Scheduler
    from pagedllm.core.sequence import SequenceGroup

SNAPSHOT_VERSION = 1
FREE, CACHED, REF1 = 0, 1, 2
MAX_CODE = 255
# Waiting requests past this many are counted, not listed (they hold no blocks).
MAX_WAITING_ROWS = 256


def pool_cells(pool: BlockPool) -> bytes:
    """One code per block, in block-id order (see the table above)."""
    return bytes([min(b.ref_cnt + 1, MAX_CODE) if b.ref_cnt else int(b.block_hash is not None)
                  for b in pool.blocks])


def cell_counts(cells: bytes) -> dict[str, int]:
    """Blocks per state: free, cached (free, revivable), in_use (ref 1), shared (ref > 1)."""
    free, cached, in_use = cells.count(FREE), cells.count(CACHED), cells.count(REF1)
    return {"free": free, "cached": cached, "in_use": in_use,
            "shared": len(cells) - free - cached - in_use}


def _pool(pool: BlockPool | None) -> dict | None:
    if pool is None:
        return None
    cells = pool_cells(pool)
    return {"num_blocks": pool.num_blocks, "cells": cells, "counts": cell_counts(cells)}


def _seq_row(bm: BlockManager, seq, position: int) -> dict:
    return {
        "index": getattr(seq.data, "index", position),  # its place in the request (n > 1)
        "seq_id": seq.seq_id,
        "status": seq.status.name.lower(),
        "num_prompt_tokens": seq.num_prompt_tokens,
        "num_computed_tokens": seq.num_computed_tokens,
        "num_tokens": seq.num_tokens,
        "max_num_tokens": seq.max_num_tokens,
        "block_table": [b.block_id for b in bm.block_tables.get(seq.seq_id, ())],
        "cpu_block_table": [b.block_id for b in bm.cpu_block_tables.get(seq.seq_id, ())],
    }


def _request_rows(scheduler: Scheduler, requests: dict[str, SequenceGroup]
                  ) -> tuple[list[dict], int]:
    """Running (in the scheduler's order), then swapped, then waiting requests. A request
    the core holds outside the scheduler (its grammar compiling, or in quarantine after a
    failed step) counts as waiting."""
    bm = scheduler.block_manager
    queued = [(g, "running") for g in scheduler.running]
    queued += [(g, "swapped") for g in scheduler.swapped]
    queued += [(g, "waiting") for g in scheduler.waiting]
    seen = {id(g) for g, _ in queued}
    queued += [(g, "waiting") for g in requests.values() if id(g) not in seen]
    rows, num_waiting = [], 0
    for group, state in queued:
        if state == "waiting":
            num_waiting += 1
            if num_waiting > MAX_WAITING_ROWS:
                continue
        seqs = [s for s in group.seqs if not s.is_finished]
        rows.append({
            "request_id": group.request_id,
            "state": state,
            "num_preemptions": group.num_preemptions,
            "priority": group.priority,
            "arrival_time": group.arrival_time,
            "num_cached_tokens": group.num_cached_tokens,
            "seqs": [_seq_row(bm, s, i) for i, s in enumerate(seqs)],
        })
    return rows, max(0, num_waiting - MAX_WAITING_ROWS)


def build_kv_snapshot(scheduler: Scheduler, requests: dict[str, SequenceGroup],
                      metrics: dict) -> dict:
    """The snapshot of this moment (between two steps). `metrics` is the core's
    get_metrics() (queue lengths, token and preemption counters, the memory-waste split)."""
    start = time.perf_counter()
    bm = scheduler.block_manager
    ledger = scheduler.kv_memory.last
    snapshot = {
        "version": SNAPSHOT_VERSION,
        "time": time.monotonic(),  # CLOCK_MONOTONIC: one clock for the core and the frontend
        "step": scheduler.kv_memory.num_steps,
        "metrics": metrics,
        # The paper's Fig. 2 split of the last step, in token slots (core/kv_accounting.py).
        "memory_split": ledger._asdict() if ledger is not None else None,
    }
    if not isinstance(bm, BlockManager):  # an Orca reservation baseline: no block grid
        snapshot.update(kv_allocator=type(bm).__name__, block_size=bm.block_size, device=None,
                        cpu=None, requests=[], num_requests_omitted=0)
        return snapshot
    rows, omitted = _request_rows(scheduler, requests)
    snapshot.update(kv_allocator="paged", block_size=bm.block_size, device=_pool(bm.pool),
                    cpu=_pool(bm.cpu_pool), requests=rows, num_requests_omitted=omitted)
    # What it cost the step loop: the hub spaces its requests by it (about 20 ms per 100k
    # blocks on one CPU core; under 1 ms for a few thousand).
    snapshot["build_s"] = time.perf_counter() - start
    return snapshot
