"""Continuous batching under one token budget (no prefill/decode phases).

Every live sequence catches num_computed_tokens up to len(token_ids). Each step:
  0. the priority policy only: a waiting group that cannot get blocks preempts running groups
     of lower priority;
  1. running groups, in the policy's order: a decode costs 1 token, a prefill a chunk of the
     budget; when blocks run out, the last running group in that order is preempted
     (recompute or swap);
  2. if nothing was preempted in 1: swapped groups come back first, then waiting groups are
     admitted in the policy's order (prefix-cache hits start them past their cached blocks).
The policy (fcfs, priority, sjf, fair) ranks the groups: core/policy.py. The plan
(SchedulerOutput, core/scheduler_output.py) goes to the model runner; the scheduler never
touches tensors.
"""

from __future__ import annotations

import bisect
import itertools

from pagedllm.config import SchedulerConfig
from pagedllm.core.block_manager import BlockManager
from pagedllm.core.kv_accounting import KVMemoryStats
from pagedllm.core.policy import OutputLengthPredictor, control_admission, create_policy
from pagedllm.core.scheduler_output import PreemptionMode, ScheduledSeq, SchedulerOutput
from pagedllm.core.sequence import Sequence, SequenceGroup, SequenceStatus


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager,
                 predictor: OutputLengthPredictor | None = None) -> None:
        self.config = config
        self.block_manager = block_manager
        self.policy = create_policy(config, predictor)
        self.waiting: list[SequenceGroup] = []  # sorted by the policy's rank
        self.running: list[SequenceGroup] = []  # sorted by rank: the tail is preempted first
        self.swapped: list[SequenceGroup] = []
        self.num_preemptions = 0
        self.num_swapped_out_blocks = 0
        self.num_swapped_in_blocks = 0
        self.prefix_cache_queries = 0  # tokens looked up
        self.prefix_cache_hits = 0  # tokens found
        self._finished_off_running = False
        self._seq_ids = itertools.count()
        self.kv_memory = KVMemoryStats()  # the paper's Fig. 2 split, every step
        self._arrivals: list[SequenceGroup] = []  # added since the last step

    def new_seq_id(self) -> int:
        """Sequence ids are unique per scheduler: block tables are keyed by them."""
        return next(self._seq_ids)

    # ---- queue management ----------------------------------------------------------------
    def _key(self, group: SequenceGroup) -> tuple:
        return self.policy.rank(group)

    def add(self, group: SequenceGroup) -> None:
        self.policy.on_add(group, (self.waiting, self.running, self.swapped))
        bisect.insort(self.waiting, group, key=self._key)
        if self.config.max_waiting is not None or self.config.max_queued_tokens is not None:
            self._arrivals.append(group)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.swapped)

    def num_live_seqs(self) -> int:
        return sum(len(g.live_seqs()) for g in self.running)

    def abort(self, request_id: str) -> SequenceGroup | None:
        for queue in (self.waiting, self.running, self.swapped):
            for group in queue:
                if group.request_id == request_id:
                    queue.remove(group)
                    if group.is_finished:  # ended by stop strings (the core's finish_seqs)
                        self.policy.on_finished(group)
                    for seq in group.live_seqs():
                        self.finish_seq(seq, SequenceStatus.FINISHED_ABORTED)
                    return group
        return None

    def finish_seq(self, seq: Sequence, status: SequenceStatus) -> None:
        """Mark a sequence finished and free its blocks at once."""
        assert status.is_finished
        if seq.status is not SequenceStatus.RUNNING:
            self._finished_off_running = True  # remove_finished must look at every queue
        seq.status = status
        self.block_manager.free(seq)

    def remove_finished(self) -> list[SequenceGroup]:
        """Drop finished groups whose tokens have all arrived. With async scheduling a group
        can finish after this step preempted it (its last token arrives late), so every
        queue is looked at; a group finished by length at launch waits for its last token."""
        done = []
        names = ("running", "waiting", "swapped") if self._finished_off_running else ("running",)
        self._finished_off_running = False
        for name in names:
            queue = getattr(self, name)
            finished = [g for g in queue if g.is_done]
            if finished:
                setattr(self, name, [g for g in queue if g not in finished])
                done.extend(finished)
        for group in done:
            self.policy.on_finished(group)
        return done

    # ---- the step --------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        self.policy.on_step()
        if not self.policy.fixed:  # ranks moved since the last step (waiting: see _admit_waiting)
            self.running.sort(key=self._key)
        if self.policy.preempts_for_waiting and self.waiting and self.running:
            self._preempt_for_waiting(out)
        num_preempted = len(out.preempted)
        budget = self.config.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            group = self.running[i]
            entries = self._try_schedule(group, budget, out)
            while entries is None:  # out of blocks: preempt from the tail until this group fits
                victim = self.running.pop()
                if victim is group:
                    if i == 0:  # alone and still too big: fail it instead of looping forever
                        self._reject(group, out)
                    else:
                        self._preempt(group, out)
                    break
                self._preempt(victim, out)
                entries = self._try_schedule(group, budget, out)
            if entries is None:
                break
            out.scheduled.extend(entries)
            budget -= sum(e.num_new_tokens for e in entries)
            i += 1

        pressure = len(out.preempted) > num_preempted  # running groups lacked blocks
        if not pressure:
            budget = self._resume_swapped(budget, out)
        if not pressure and not self.swapped:
            self._admit_waiting(budget, out)
        if self._arrivals:
            self._control_admission(out)
        return out

    def _control_admission(self, out: SchedulerOutput) -> None:
        """Refuse arrivals over the waiting caps (policy.control_admission says which)."""
        arrivals, self._arrivals = self._arrivals, []
        admitted, refused = control_admission(self.waiting, arrivals, self.config.max_waiting,
                                              self.config.max_queued_tokens)
        for group, _ in refused:
            self.waiting.remove(group)
            for seq in group.live_seqs():
                self.finish_seq(seq, SequenceStatus.FINISHED_ABORTED)
        out.admitted += admitted
        out.refused += refused

    def _preempt_for_waiting(self, out: SchedulerOutput) -> None:
        """Strict priority (vLLM's): waiting groups, most important first, preempt running
        groups of a larger priority value (the least important, latest first; by recompute,
        so they wait behind) until the blocks and sequence slots for their next chunk are
        free. Preemption takes no blocks from groups of the same priority."""
        bm, budget = self.block_manager, self.config.max_num_batched_tokens
        need_blocks, need_seqs = 0, self.num_live_seqs()
        for group in list(self.waiting):
            live = group.live_seqs()
            need_blocks += bm.num_blocks_to_allocate(
                [(s, min(s.num_tokens - s.num_computed_tokens, budget), []) for s in live])
            need_seqs += len(live)
            while (need_blocks > bm.num_free_blocks or need_seqs > self.config.max_num_seqs) \
                    and self.running and self.running[-1].priority > group.priority:
                victim = self.running.pop()
                need_seqs -= len(victim.live_seqs())
                self._preempt(victim, out, PreemptionMode.RECOMPUTE)
            if need_blocks > bm.num_free_blocks or need_seqs > self.config.max_num_seqs:
                return

    def _try_schedule(
        self, group: SequenceGroup, budget: int, out: SchedulerOutput, hits: dict | None = None
    ) -> list[ScheduledSeq] | None:
        """Plan this step's tokens for a group: [] if none fit the budget, None if no blocks.

        Block allocation is all-or-nothing for the group: either every planned sequence gets
        its slots, or nothing changes.
        """
        bm = self.block_manager
        hits = hits or {}
        plan = []
        for seq in group.live_seqs():
            num_computed = len(hits.get(seq.seq_id, ())) * bm.block_size or seq.num_computed_tokens
            n = min(seq.num_tokens - num_computed, budget)
            if n <= 0:
                continue
            if n < seq.num_tokens - num_computed and not self.config.enable_chunked_prefill:
                continue  # a prefill that does not fit whole waits for a later step
            plan.append((seq, n))
            budget -= n
        need = bm.num_blocks_to_allocate([(s, n, hits.get(s.seq_id, [])) for s, n in plan])
        if need > bm.num_free_blocks:
            return None
        # Pin every prefix hit of the group first: allocating one sequence's new blocks pops
        # the LRU free queue, which may hold a sibling's free cached hit.
        for seq, _ in plan:
            if hits.get(seq.seq_id):
                bm.allocate_slots(seq, 0, hits[seq.seq_id])
                seq.num_computed_tokens = len(hits[seq.seq_id]) * bm.block_size
        entries = []
        for seq, n in plan:
            copies = bm.allocate_slots(seq, n)
            assert copies is not None, "checked above"
            out.blocks_to_copy.extend(copies)
            entry = ScheduledSeq(seq, group, n, bm.get_block_ids(seq.seq_id))
            if group.num_samples > 1 and len(group.seqs) == 1 and entry.samples \
                    and seq.num_output_tokens == 0:
                entry.forks = [self._fork(group, entry) for _ in range(group.num_samples - 1)]
            entries.append(entry)
        self.policy.on_planned(entries)
        return entries

    def _fork(self, group: SequenceGroup, entry: ScheduledSeq) -> Sequence:
        """Parallel sampling as in the paper: the prompt is prefilled once; when its first
        token is due, the sequence forks into n that share every block (ref_cnt = n), and
        all n sample their first token from the same logits. The first write into a shared
        partial block copies it (BlockManager.append_slots)."""
        child = entry.seq.fork(self.new_seq_id())
        self.block_manager.fork(entry.seq, child)
        # This step computes the parent's chunk into the blocks the child shares.
        child.num_computed_tokens += entry.num_new_tokens
        group.seqs.append(child)
        return child

    def _admit_waiting(self, budget: int, out: SchedulerOutput) -> None:
        while self.waiting and budget > 0:
            # Fair: each admission charges its client, so the next is the minimum again.
            group = self.waiting[0] if self.policy.fixed else min(self.waiting, key=self._key)
            if self.num_live_seqs() + len(group.live_seqs()) > self.config.max_num_seqs:
                break
            entries = self._admit(group, budget, out)
            if entries is None:
                if not self.running and not out.scheduled:
                    self.waiting.remove(group)
                    self._reject(group, out)
                    continue
                out.waiting_for_blocks = True
                break
            if not entries:
                break  # budget too small for an unchunked prefill
            budget -= sum(e.num_new_tokens for e in entries)

    def _admit(self, group: SequenceGroup, budget: int, out: SchedulerOutput
               ) -> list[ScheduledSeq] | None:
        """Move the waiting `group` to running if this step's tokens fit (the result of
        _try_schedule, which changes nothing unless it returns entries)."""
        bm = self.block_manager
        live = group.live_seqs()
        hits = {s.seq_id: [] if group.skip_prefix_cache else bm.get_computed_blocks(s)
                for s in live}
        entries = self._try_schedule(group, budget, out, hits)
        if not entries:
            return entries
        self.waiting.remove(group)
        if live[0].num_output_tokens == 0:  # first admission, not a resume
            group.num_cached_tokens = len(hits[live[0].seq_id]) * bm.block_size
        for seq in live:
            self.prefix_cache_queries += seq.num_tokens
            self.prefix_cache_hits += len(hits[seq.seq_id]) * bm.block_size
        for seq in group.live_seqs():  # n > 1: the sequences forked this step too
            seq.status = SequenceStatus.RUNNING
        bisect.insort(self.running, group, key=self._key)
        out.scheduled.extend(entries)
        return entries

    # ---- isolating a failed step (the engine core runs its requests one at a time) ----------
    def schedule_solo(self, group: SequenceGroup) -> SchedulerOutput:
        """Plan a step for `group` alone: no other group runs, nothing is preempted. The plan
        is empty when its tokens do not fit in the blocks the others hold now."""
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        if group in self.running:
            entries = self._try_schedule(group, budget, out)
            out.scheduled.extend(entries or [])
        elif group in self.waiting:
            self._admit(group, budget, out)
        return out

    def evict(self, group: SequenceGroup) -> None:
        """Take `group` out of every queue and free its blocks; its live sequences keep their
        tokens and start over as after a recompute preemption (the caller re-adds it)."""
        for queue in (self.waiting, self.running, self.swapped):
            if group in queue:
                queue.remove(group)
        for seq in group.live_seqs():
            self.block_manager.free(seq)
            seq.num_computed_tokens = 0
            seq.status = SequenceStatus.WAITING

    def _resume_swapped(self, budget: int, out: SchedulerOutput) -> int:
        bm = self.block_manager
        while self.swapped and budget > 0:
            group = self.swapped[0]
            live = group.live_seqs()
            if self.num_live_seqs() + len(live) > self.config.max_num_seqs:
                break
            # Room for the swapped blocks plus one new block per sequence for this step's token.
            if not bm.can_swap_in(live) or \
                    bm.num_unique_blocks(live, bm.cpu_block_tables) + len(live) > bm.num_free_blocks:
                out.waiting_for_blocks = True
                break
            self.swapped.pop(0)
            copies = bm.swap_in(live)
            out.blocks_to_swap_in.extend(copies)
            self.num_swapped_in_blocks += len(copies)
            for seq in live:
                seq.status = SequenceStatus.RUNNING
            bisect.insort(self.running, group, key=self._key)
            entries = self._try_schedule(group, budget, out)
            assert entries is not None, "room was checked above"
            out.scheduled.extend(entries)
            budget -= sum(e.num_new_tokens for e in entries)
        return budget

    # ---- preemption ------------------------------------------------------------------------
    def preemption_mode(self, group: SequenceGroup) -> PreemptionMode:
        if self.config.preemption_mode is not None:
            mode = PreemptionMode(self.config.preemption_mode)
        else:  # the paper's rule: recomputing one sequence is cheap, a group shares blocks
            mode = PreemptionMode.SWAP if len(group.live_seqs()) > 1 else PreemptionMode.RECOMPUTE
        if mode is PreemptionMode.SWAP and not self.block_manager.can_swap_out(group.live_seqs()):
            mode = PreemptionMode.RECOMPUTE  # no CPU room: recompute is always possible
        return mode

    def _preempt(self, group: SequenceGroup, out: SchedulerOutput,
                 mode: PreemptionMode | None = None) -> None:
        live = group.live_seqs()
        self.num_preemptions += 1
        group.num_preemptions += 1
        out.preempted.append(group)
        if (mode or self.preemption_mode(group)) is PreemptionMode.SWAP:
            copies = self.block_manager.swap_out(live)
            out.blocks_to_swap_out.extend(copies)
            self.num_swapped_out_blocks += len(copies)
            for seq in live:
                seq.status = SequenceStatus.SWAPPED
            self.swapped.append(group)
            return
        for seq in live:
            self.block_manager.free(seq)
            seq.num_computed_tokens = 0
            seq.status = SequenceStatus.WAITING
        bisect.insort(self.waiting, group, key=self._key)

    def _reject(self, group: SequenceGroup, out: SchedulerOutput) -> None:
        bm = self.block_manager
        need = sum(-(-s.num_tokens // bm.block_size) for s in group.live_seqs())
        for seq in group.live_seqs():
            self.finish_seq(seq, SequenceStatus.FINISHED_ABORTED)
        out.rejected.append((group, (
            f"request {group.request_id} needs {need} KV blocks but the cache has only "
            f"{bm.pool.num_blocks}; raise num_gpu_blocks_override / the KV cache size or "
            "shorten the prompt")))

    # ---- after the forward pass --------------------------------------------------------------
    def update_from_output(self, out: SchedulerOutput) -> None:
        """Advance num_computed_tokens and publish newly full blocks in the prefix cache."""
        for entry in out.scheduled:
            seq = entry.seq
            if seq.is_finished:
                continue
            seq.num_computed_tokens += entry.num_new_tokens
            self.block_manager.cache_blocks(seq)
        # Measured before this step's finished sequences free their blocks: the step's peak.
        self.kv_memory.record(self.block_manager.memory_ledger(
            [s for g in self.running for s in g.live_seqs()],
            blocked=out.waiting_for_blocks or bool(out.preempted)))
