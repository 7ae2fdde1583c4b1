"""EngineCore: the scheduler, the executor and the step loop. Token ids in, token ids out.

    add_request(EngineCoreRequest) ─▶ Scheduler.schedule() ─▶ Executor.execute_model()
        ─▶ tokens appended, stop ids / max_tokens / n>1 forks / beams ─▶ EngineCoreOutput deltas

It owns every piece of request state that decides what runs next (sequence status, block
tables, seeded generators, beams) and nothing about text: the frontend's OutputProcessor
detokenizes, matches stop strings and tells the core to stop a sequence (`finish_seqs`).
The same class runs in the caller's process (InprocClient) or in its own (core_proc.py).
"""

from __future__ import annotations

import concurrent.futures
import functools
import logging
import os
import time
from dataclasses import dataclass

import torch

from pagedllm.config import EngineConfig, check_kv_allocator
from pagedllm.core.reservation import create_kv_allocator
from pagedllm.core.scheduler import ScheduledSeq, Scheduler, SchedulerOutput
from pagedllm.core.sequence import Sequence, SequenceGroup, SequenceStatus
from pagedllm.engine.beam_search import BeamState
from pagedllm.engine.core_state import (
    RequestState, SeqState, advance_matcher, make_output, sampling_metadata,
    store_prompt_logprobs,
)
from pagedllm.engine.isolation import StepIsolation
from pagedllm.engine.kv_snapshot import build_kv_snapshot
from pagedllm.engine.protocol import EngineCoreOutput, EngineCoreRequest
from pagedllm.engine.structured_output import StructuredOutputManager, token_ids_bitmask
from pagedllm.executor import create_executor
from pagedllm.layers.sampler import SamplingMetadata, TokenLogprobs
from pagedllm.loader import load_tokenizer
from pagedllm.logger import STATS_LOGGER
from pagedllm.sampling_params import RequestOutputKind, SamplingParams

logger = logging.getLogger("pagedllm")
# Its own logger, so a terminal front end can keep it out of streamed text (pagedllm chat).
stats_logger = logging.getLogger(STATS_LOGGER)

# Seconds between two stats lines while busy (vLLM's VLLM_LOG_STATS_INTERVAL).
_LOG_INTERVAL_S = float(os.environ.get("PAGEDLLM_LOG_STATS_INTERVAL_S", "5"))


@dataclass(slots=True)
class InflightStep:
    """A launched step whose sampled tokens have not been read back yet (async scheduling)."""

    out: SchedulerOutput
    rows: list[tuple[int, Sequence]]
    handle: object


class EngineCore:
    def __init__(self, config: EngineConfig, eos_token_ids: set[int]) -> None:
        self.config = config
        self.executor = create_executor(config)
        cc = config.cache
        num_blocks = self.executor.determine_num_blocks()
        block_bytes = self.executor.block_bytes()
        # The Orca baselines never preempt (each request holds its whole length): no swap pool.
        num_cpu_blocks = int(cc.swap_space * 2**30) // block_bytes \
            if cc.kv_allocator == "paged" else 0
        self.executor.init_cache(num_blocks, num_cpu_blocks)
        self.block_manager = create_kv_allocator(
            cc.kv_allocator, num_blocks, cc.block_size, cc.enable_prefix_caching, num_cpu_blocks,
            config.model.max_model_len, config.model.sliding_window)
        self.scheduler = Scheduler(config.scheduler, self.block_manager)
        self.max_model_len = config.model.max_model_len
        self.eos_token_ids = set(eos_token_ids)
        self.requests: dict[str, SequenceGroup] = {}
        self.stats = {"prompt_tokens_total": 0, "generation_tokens_total": 0,
                      "num_requests_failed_total": 0, "step_failures_total": 0,
                      "num_requests_refused_total": 0}
        self._last_log = (time.monotonic(), 0, 0)
        self._inflight: InflightStep | None = None
        self._num_sync_groups = 0  # live requests that need synchronous steps
        self.isolation = StepIsolation(self)
        self._step_groups: list[SequenceGroup] = []  # the requests the current step runs
        self._outbox: list[EngineCoreOutput] = []  # failed before their step: sent with it
        # Structured requests wait here, outside the scheduler, while their grammar compiles.
        # (A function of the config, not a bound method: no cycle through the core.)
        self.structured_output = StructuredOutputManager(
            functools.partial(load_tokenizer, config.model.model, config.model.load_format),
            config.model.hf_config.vocab_size)
        self._grammar_wait: dict[str, tuple[SequenceGroup, object]] = {}
        logger.info(
            "KV cache (%s): %d blocks of %d tokens (%d tokens, %.2f GiB per rank) on %s, %d CPU "
            "swap blocks", cc.cache_dtype, num_blocks, cc.block_size, num_blocks * cc.block_size,
            num_blocks * block_bytes / 2**30, config.device, num_cpu_blocks)

    # ---- requests ------------------------------------------------------------------------------
    def add_request(self, req: EngineCoreRequest) -> None:
        """Queue a request the frontend validated. Raises ValueError (and changes nothing) if
        its id is in use or its params are missing."""
        if req.request_id in self.requests:
            raise ValueError(f"request id {req.request_id!r} is already in use")
        beam = None
        params = req.sampling_params
        if req.beam_search_params is not None:
            bp = req.beam_search_params
            max_tokens = min(bp.max_tokens, self.max_model_len - len(req.prompt_token_ids))
            beam = BeamState(bp.beam_width, max_tokens, bp.length_penalty,
                             set() if bp.ignore_eos else set(self.eos_token_ids))
            # The sampler only returns each beam's top-K raw logprobs; the beam step picks.
            params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True,
                                    logprobs=beam.num_candidates, detokenize=False)
        if not isinstance(params, SamplingParams):
            raise ValueError(f"expected SamplingParams, got {type(params).__name__}")
        check_kv_allocator(self.config, params.n, beam is not None)
        ids = req.prompt_token_ids
        max_tokens = params.max_tokens or self.max_model_len - len(ids)
        seq = Sequence(self.scheduler.new_seq_id(), ids)
        seq.data = self._seq_state(0, params)
        # Stop strings are matched by the frontend, which needs every token as it comes.
        streams = params.output_kind != RequestOutputKind.FINAL_ONLY or bool(params.stop)
        group = SequenceGroup(req.request_id, [seq], params, priority=req.priority,
                              max_tokens=max_tokens, data=RequestState(streams, beam=beam),
                              skip_prefix_cache=params.prompt_logprobs is not None,
                              num_samples=params.n, cache_salt=req.cache_salt, user=req.user)
        if req.arrival_time:
            group.arrival_time = req.arrival_time
        if params.prompt_logprobs is not None:
            group.data.num_prompt_logprobs = 1  # position 0 has none
        if params.allowed_token_ids:
            group.data.allowed_bitmask = token_ids_bitmask(
                params.allowed_token_ids, self.config.model.hf_config.vocab_size)
        self.requests[req.request_id] = group
        self._num_sync_groups += params.needs_sync_steps
        if params.structured_outputs is not None:
            self._grammar_wait[req.request_id] = (group,
                                                  self.structured_output.compile(params))
        else:
            self.scheduler.add(group)

    def _admit_compiled(self) -> None:
        """Hand requests whose grammar is ready to the scheduler (or fail them). If nothing
        else can run, wait a little for one, rather than spin the step loop."""
        if not self.scheduler.has_unfinished() and self._inflight is None:
            futures = [f for _, f in self._grammar_wait.values()]
            concurrent.futures.wait(futures, timeout=0.05,
                                    return_when=concurrent.futures.FIRST_COMPLETED)
        for request_id, (group, future) in list(self._grammar_wait.items()):
            if not future.done():
                continue
            del self._grammar_wait[request_id]
            try:
                group.seqs[0].data.matcher = future.result()
            except Exception as exc:
                self._outbox.append(self.fail(group, f"cannot build the grammar: {exc}"))
                continue
            self.scheduler.add(group)

    def _seq_state(self, index: int, params: SamplingParams) -> SeqState:
        gen = None
        if params.seed is not None and not params.is_greedy:
            # Sequence i of a request draws from seed + i: n > 1 samples differ, reproducibly.
            gen = torch.Generator(device=self.executor.device).manual_seed(params.seed + index)
        return SeqState(index, gen)

    def abort_requests(self, request_ids: list[str]) -> None:
        """Stop requests now and free their blocks (unknown or finished ids are ignored)."""
        for request_id in request_ids:
            waiting = self._grammar_wait.pop(request_id, None)
            group = (waiting[0] if waiting else self.scheduler.abort(request_id)
                     or self.isolation.remove(request_id))
            if group is not None:
                self._remove(group)
                for seq in group.seqs:
                    seq.drop_placeholders()

    def finish_seqs(self, seqs: list[tuple[str, int]]) -> None:
        """The frontend matched a stop string: end these (request id, index) sequences."""
        for request_id, index in seqs:
            group = self.requests.get(request_id)
            seq = next((s for s in group.seqs if s.data.index == index), None) if group else None
            if seq is None or seq.is_finished:
                continue
            seq.drop_placeholders()
            self.scheduler.finish_seq(seq, SequenceStatus.FINISHED_STOPPED)
            seq.data.sent_finish = True  # the frontend ended it; nothing more to say
            if group.is_finished:
                self.abort_requests([request_id])

    def _remove(self, group: SequenceGroup) -> None:
        """The one way out of the core for a request."""
        if self.requests.pop(group.request_id, None) is not None:
            self._num_sync_groups -= group.params.needs_sync_steps
            self.isolation.suspicions.pop(group.request_id, None)

    def has_unfinished_requests(self) -> bool:
        return (self.scheduler.has_unfinished() or self._inflight is not None
                or bool(self.isolation.quarantine) or bool(self._grammar_wait))

    # ---- the step ------------------------------------------------------------------------------
    def step(self) -> list[EngineCoreOutput]:
        """One iteration: schedule, run, update; returns the deltas of requests that changed.

        With async scheduling the device never waits for the host: each call plans and
        launches step N+1 first, then reads back and processes step N (launched by the call
        before), whose sampled tokens N+1 takes straight from device memory:

            call k     schedule N+1 | launch N+1 | wait for N, process N  -> outputs of N
            device     ...... N .............|...... N+1 ........................

        A sequence that finishes in N (EOS, stop id) has one wasted row in N+1, dropped.
        Requests that must see every token on the host before the next step is planned (beam
        search, penalties, logprobs) switch the core to synchronous steps while they live.

        A step that raises fails the request that caused it, not the engine (isolation.py).
        """
        self._step_groups = []
        if self._grammar_wait:
            self._admit_compiled()
        try:
            if self.isolation.quarantine and self._inflight is None:
                outputs = self.isolation.trial()
                if outputs is not None:
                    return self._take_outbox() + outputs
            if self.config.async_scheduling and not self._num_sync_groups \
                    and not self.isolation.quarantine:
                outputs = self._step_async()
            elif self._inflight is not None:
                outputs = self._drain()
            else:
                outputs = self._step_sync()
        except Exception as exc:
            self._inflight = None
            self.stats["step_failures_total"] += 1
            outputs = self.isolation.recover(exc, self._step_groups)
        return self._take_outbox() + outputs

    def _take_outbox(self) -> list[EngineCoreOutput]:
        outputs, self._outbox = self._outbox, []
        return outputs

    def _schedule(self) -> SchedulerOutput:
        out = self.scheduler.schedule()
        self._step_groups += list({id(e.group): e.group for e in out.scheduled}.values())
        self._outbox += [self.fail(group, reason) for group, reason in out.rejected]
        self._outbox += [EngineCoreOutput(g.request_id, admitted=True) for g in out.admitted]
        for group, reason in out.refused:
            self._remove(group)
            self.stats["num_requests_refused_total"] += 1
            self._outbox.append(EngineCoreOutput(group.request_id, finished=True, error=reason,
                                                 queue_full=True))
        return out

    def _sampling(self, out: SchedulerOutput
                  ) -> tuple[list[tuple[int, Sequence]], SamplingMetadata | None]:
        rows = self._sample_rows(out.scheduled)  # (entry index, sequence) per sampler row
        if not rows:
            return rows, None
        return rows, sampling_metadata(out.scheduled, rows, self.eos_token_ids,
                                       self.structured_output, self.executor.device)

    def _step_sync(self) -> list[EngineCoreOutput]:
        return self.run_scheduled(self._schedule())

    def run_scheduled(self, out: SchedulerOutput) -> list[EngineCoreOutput]:
        """Run a planned step synchronously and process its tokens."""
        rows, sampling = self._sampling(out)
        want_plp = {e.seq.seq_id: e.group.params.prompt_logprobs for e in out.scheduled
                    if e.group.params.prompt_logprobs is not None
                    and e.seq.num_computed_tokens < e.seq.num_prompt_tokens - 1}
        result = self.executor.execute_model(out, sampling, [i for i, _ in rows], want_plp)
        self.scheduler.update_from_output(out)
        for e in out.scheduled:
            if e.seq.seq_id in result.prompt_logprobs:
                store_prompt_logprobs(e, *result.prompt_logprobs[e.seq.seq_id])
        sampled = result.sampler_output
        if sampled is None:
            return self._process(out, rows, [], None)
        return self._process(out, rows, sampled.sampled_token_ids, sampled.logprobs)

    def _step_async(self) -> list[EngineCoreOutput]:
        out = self._schedule()
        prev, outputs = self._inflight, []
        if prev is not None:
            self._step_groups += [e.group for e in prev.out.scheduled]
        rows, sampling = self._sampling(out)
        self._inflight = None
        if out.scheduled:
            handle = self.executor.launch(out, sampling, [i for i, _ in rows],
                                          self._inputs_from_device(out, prev))
            for i, seq in rows:
                seq.append_placeholder()  # the next step feeds it from the device
                if self._samples_last_token(out.scheduled[i].group, seq):
                    # Its last token is due: free its blocks and row now, as a synchronous
                    # step would before planning the next one (step N is queued already, so
                    # blocks reused later are written after it). Its token still arrives.
                    self.scheduler.finish_seq(seq, SequenceStatus.FINISHED_LENGTH)
            self._inflight = InflightStep(out, rows, handle)
        if prev is not None:
            outputs += self._process(prev.out, prev.rows, self.executor.collect(prev.handle),
                                     None)
        # After N's tokens are resolved: the blocks this publishes hold no placeholder.
        self.scheduler.update_from_output(out)
        return outputs

    def _drain(self) -> list[EngineCoreOutput]:
        prev, self._inflight = self._inflight, None
        self._step_groups = [e.group for e in prev.out.scheduled]
        return self._process(prev.out, prev.rows, self.executor.collect(prev.handle), None)

    @staticmethod
    def _inputs_from_device(out: SchedulerOutput, prev: InflightStep | None
                            ) -> list[tuple[int, int, int]]:
        """(entry, offset in its chunk, sampler row of the previous step) for every input
        token of this step that is still a placeholder."""
        if prev is None:
            return []
        row_of = {seq.seq_id: r for r, (_, seq) in enumerate(prev.rows)}
        found = []
        for i, e in enumerate(out.scheduled):
            seq = e.seq
            if seq.num_output_placeholders:
                offset = seq.num_known_tokens - seq.num_computed_tokens
                if offset < e.num_new_tokens:
                    assert seq.num_output_placeholders == 1 and offset == e.num_new_tokens - 1
                    found.append((i, offset, row_of[seq.seq_id]))
        return found

    def _samples_last_token(self, group: SequenceGroup, seq: Sequence) -> bool:
        """Whether the token sampled now (its placeholder appended) is the sequence's last by
        length, so that no later step needs it."""
        return (seq.num_output_tokens >= group.max_tokens
                or seq.num_tokens >= self.max_model_len)

    def _process(self, out: SchedulerOutput, rows: list[tuple[int, Sequence]],
                 tokens: list[int], logprobs: list | None) -> list[EngineCoreOutput]:
        """Append each row's token, run stop checks and build the deltas of this step."""
        touched: dict[str, SequenceGroup] = {}
        beam_groups = {}
        for r, (i, seq) in enumerate(rows):
            if seq.is_finished and not seq.num_output_placeholders:
                continue  # aborted while its step ran, or ended by an earlier step's token
            group = out.scheduled[i].group
            lp = logprobs[r] if logprobs else None
            if group.data.beam is not None:  # beams pick their tokens together, below
                group.data.beam.pending[seq.seq_id] = lp.top_logprobs
                beam_groups[group.request_id] = group
                continue
            self._append_token(group, seq, tokens[r], lp)
            touched[group.request_id] = group
        for group in beam_groups.values():
            self._beam_step(group)
        for group in self.scheduler.remove_finished():
            touched[group.request_id] = group
            self._remove(group)
        outputs = [o for g in touched.values() if (o := make_output(g)) is not None]
        self._maybe_log()
        return outputs

    def _append_token(self, group: SequenceGroup, seq: Sequence, token: int,
                      lp: TokenLogprobs | None) -> None:
        params = group.params
        self._count_first_token(group, seq)
        self.stats["generation_tokens_total"] += 1
        if seq.num_output_placeholders:
            seq.resolve_placeholder(token, lp.logprob if lp is not None else 0.0)
        else:
            seq.append_token(token, lp.logprob if lp is not None else 0.0)
        seq.data.new_token_ids.append(token)
        if lp is not None:
            seq.data.new_logprobs.append(lp)
        num_known = seq.num_known_tokens  # a later step's placeholder may follow this token
        status = None
        if seq.data.matcher is not None and advance_matcher(seq, token):
            status = SequenceStatus.FINISHED_STOPPED  # the grammar is complete
        elif num_known - seq.num_prompt_tokens >= params.min_tokens:
            if token in self.eos_token_ids and not params.ignore_eos:
                status = SequenceStatus.FINISHED_STOPPED
            elif token in (params.stop_token_ids or ()):
                status, seq.stop_reason = SequenceStatus.FINISHED_STOPPED, token
        if status is None and (num_known - seq.num_prompt_tokens >= group.max_tokens
                               or num_known >= self.max_model_len):
            status = SequenceStatus.FINISHED_LENGTH
        if status is not None:
            seq.drop_placeholders()
            if seq.is_finished:  # finished by length when its step was launched
                seq.status = status  # (EOS or a stop id in the last token wins)
            else:
                self.scheduler.finish_seq(seq, status)

    def _count_first_token(self, group: SequenceGroup, seq: Sequence) -> None:
        if not group.data.started:
            group.data.started = True
            self.stats["prompt_tokens_total"] += seq.num_prompt_tokens

    def _sample_rows(self, scheduled: list[ScheduledSeq]) -> list[tuple[int, Sequence]]:
        """Which sequences sample this step, and from which entry's logits (a sequence the
        scheduler forked for n > 1 samples from its parent's)."""
        rows = []
        for i, e in enumerate(scheduled):
            if not e.samples:
                continue
            rows.append((i, e.seq))
            for child in e.forks:
                child.data = self._seq_state(e.group.seqs.index(child), e.group.params)
                if e.seq.data.matcher is not None:  # n > 1: each sample its own matcher
                    assert e.seq.data.num_matched == 0
                    child.data.matcher = e.seq.data.matcher.deep_copy()
                rows.append((i, child))
        return rows

    def _fork_seq(self, group: SequenceGroup, parent: Sequence) -> Sequence:
        child = parent.fork(self.scheduler.new_seq_id())
        self.block_manager.fork(parent, child)
        child.data = self._seq_state(len(group.seqs), group.params)
        group.seqs.append(child)
        return child

    def _beam_step(self, group: SequenceGroup) -> None:
        """Run a beam step once every live beam has new logits (engine/beam_search.py), and
        apply its decision to the block tables: a beam chosen k times continues once and
        forks k - 1 times; a beam chosen 0 times is freed at once."""
        state: BeamState = group.data.beam
        beams = group.live_seqs()
        if any(b.seq_id not in state.pending for b in beams):
            return
        self._count_first_token(group, beams[0])
        decision = state.step(beams)
        for beam in decision.drop:
            self.scheduler.finish_seq(beam, SequenceStatus.FINISHED_STOPPED)
        children: dict[int, list[tuple[int, float]]] = {}
        for parent, token, score in decision.extend:
            children.setdefault(id(parent), []).append((token, score))
        for parent in {id(p): p for p, _, _ in decision.extend}.values():
            picks = children[id(parent)]
            # Fork before the parent's own token is appended: the children share its blocks.
            targets = [parent] + [self._fork_seq(group, parent) for _ in picks[1:]]
            for seq, (token, score) in zip(targets, picks):
                seq.token_ids.append(token)
                seq.cumulative_logprob = score
        self.stats["generation_tokens_total"] += len(decision.extend)
        # Finished beams live on only as hypotheses (one is kept: it holds the prompt).
        group.seqs = group.live_seqs() or group.seqs[:1]

    def fail(self, group: SequenceGroup, reason: str) -> EngineCoreOutput:
        """End a request with an error (it is out of the scheduler and holds no blocks)."""
        logger.error(reason)
        self._remove(group)
        self.stats["num_requests_failed_total"] += 1
        return EngineCoreOutput(group.request_id, finished=True, error=reason)

    # ---- metrics, checks -----------------------------------------------------------------------
    def get_metrics(self) -> dict:
        s = self.scheduler
        return {
            "num_requests_running": len(s.running),
            "num_requests_waiting": len(s.waiting) + len(self.isolation)
            + len(self._grammar_wait),
            "num_requests_swapped": len(s.swapped),
            "kv_cache_usage_perc": self.block_manager.usage(),
            "num_preemptions_total": s.num_preemptions,
            "num_swapped_out_blocks_total": s.num_swapped_out_blocks,
            "num_swapped_in_blocks_total": s.num_swapped_in_blocks,
            "prefix_cache_queries_total": s.prefix_cache_queries,
            "prefix_cache_hits_total": s.prefix_cache_hits,
            "num_gpu_blocks": self.block_manager.pool.num_blocks,
            # The paper's Fig. 2 split, averaged over every step so far (core/kv_accounting.py)
            **{f"kv_memory_{name}": share for name, share in s.kv_memory.shares().items()},
            **self.executor.metrics(),
            **self.stats,
        }

    def kv_snapshot(self) -> dict:
        """The block pools, queues and counters now, for the dashboard (engine/kv_snapshot.py)."""
        return build_kv_snapshot(self.scheduler, self.requests, self.get_metrics())

    def check_integrity(self) -> bool:
        """The block pool's invariants hold (raises AssertionError if not)."""
        self.block_manager.check_integrity()
        return True

    def shutdown(self) -> None:
        self.structured_output.shutdown()
        self.executor.shutdown()

    def _maybe_log(self) -> None:
        now = time.monotonic()
        t0, p0, g0 = self._last_log
        if now - t0 < _LOG_INTERVAL_S:
            return
        p, g = self.stats["prompt_tokens_total"], self.stats["generation_tokens_total"]
        self._last_log = (now, p, g)
        s = self.scheduler
        stats_logger.info(
            "prompt throughput: %.1f tok/s, generation throughput: %.1f tok/s, running: %d, "
            "waiting: %d, swapped: %d, KV cache usage: %.1f%%", (p - p0) / (now - t0),
            (g - g0) / (now - t0), len(s.running), len(s.waiting), len(s.swapped),
            100 * self.block_manager.usage())

