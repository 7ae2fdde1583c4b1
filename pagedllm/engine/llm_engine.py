"""LLMEngine: add_request -> step() -> RequestOutputs. One step = schedule, execute, process."""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass

import torch

from pagedllm.config import EngineConfig
from pagedllm.core.block_manager import BlockManager
from pagedllm.core.scheduler import ScheduledSeq, Scheduler, SchedulerOutput
from pagedllm.core.sequence import Sequence, SequenceGroup, SequenceStatus
from pagedllm.engine.arg_utils import EngineArgs
from pagedllm.engine.beam_search import BeamSearchMixin, BeamState
from pagedllm.engine.detokenizer import IncrementalDetokenizer
from pagedllm.engine.output_processor import convert_logprobs, make_output
from pagedllm.layers.sampler import SamplingMetadata, TokenLogprobs
from pagedllm.outputs import RequestOutput
from pagedllm.sampling_params import RequestOutputKind, SamplingParams
from pagedllm.worker.model_runner import ModelRunner, StepHandle

logger = logging.getLogger("pagedllm")

_LOG_INTERVAL_S = 5.0


@dataclass(slots=True)
class SeqState:
    """Engine-side state of one sequence (kept in Sequence.data; core/ never looks inside)."""

    detokenizer: IncrementalDetokenizer
    generator: torch.Generator | None


@dataclass(slots=True)
class RequestState:
    """Engine-side state of one request (kept in SequenceGroup.data)."""

    prompt_logprobs: list | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    error: str | None = None
    beam: BeamState | None = None  # set for beam-search requests


@dataclass(slots=True)
class InflightStep:
    """A launched step whose sampled tokens have not been read back yet (async scheduling)."""

    out: SchedulerOutput
    rows: list[tuple[int, Sequence]]
    handle: StepHandle


class LLMEngine(BeamSearchMixin):
    def __init__(self, config: EngineConfig, tokenizer) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.runner = ModelRunner(config)
        num_blocks = self.runner.determine_num_blocks()
        cc = config.cache
        num_cpu_blocks = int(cc.swap_space * 2**30) // self.runner.block_bytes()
        self.runner.init_cache(num_blocks, num_cpu_blocks)
        self.block_manager = BlockManager(num_blocks, cc.block_size, cc.enable_prefix_caching,
                                          num_cpu_blocks)
        self.scheduler = Scheduler(config.scheduler, self.block_manager)
        self.max_model_len = config.model.max_model_len
        self.vocab_size = config.model.hf_config.vocab_size
        self.eos_token_ids = _eos_ids(tokenizer, config.model.hf_config)
        self.groups: dict[str, SequenceGroup] = {}
        self._seq_ids = itertools.count()
        self.stats = {"prompt_tokens_total": 0, "generation_tokens_total": 0,
                      "num_requests_finished_total": 0, "num_requests_failed_total": 0}
        self._last_log = (time.monotonic(), 0, 0)
        self._inflight: InflightStep | None = None
        self._num_sync_groups = 0  # live requests that need synchronous steps
        logger.info(
            "KV cache: %d blocks of %d tokens (%d tokens, %.2f GiB) on %s, %d CPU swap blocks",
            num_blocks, cc.block_size, num_blocks * cc.block_size,
            num_blocks * self.runner.block_bytes() / 2**30, config.device, num_cpu_blocks)

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> LLMEngine:
        from pagedllm.loader import load_tokenizer

        config = args.create_engine_config()
        tokenizer = load_tokenizer(config.model.model, config.model.load_format)
        return cls(config, tokenizer)

    # ---- requests ------------------------------------------------------------------------------
    def add_request(
        self,
        request_id: str,
        prompt: str | None,
        params: SamplingParams,
        prompt_token_ids: list[int] | None = None,
        priority: int = 0,
        arrival_time: float | None = None,
    ) -> None:
        """Validate and queue a request. Bad input raises ValueError and changes nothing."""
        if request_id in self.groups:
            raise ValueError(f"request id {request_id!r} is already in use")
        if not isinstance(params, SamplingParams):
            raise ValueError(f"expected SamplingParams, got {type(params).__name__}")
        prompt_token_ids = self.prompt_ids(prompt, prompt_token_ids)
        max_tokens = params.max_tokens or self.max_model_len - len(prompt_token_ids)
        seq = Sequence(next(self._seq_ids), prompt_token_ids)
        seq.data = self._seq_state(seq, params)
        group = SequenceGroup(request_id, [seq], params, priority=priority, prompt=prompt,
                              max_tokens=max_tokens, data=RequestState(),
                              skip_prefix_cache=params.prompt_logprobs is not None)
        if arrival_time is not None:
            group.arrival_time = arrival_time
        if params.prompt_logprobs is not None:
            group.data.prompt_logprobs = [None]  # the first token has no logprob
        self.groups[request_id] = group
        self._num_sync_groups += self._needs_sync(group)
        self.scheduler.add(group)

    def prompt_ids(self, prompt: str | None, prompt_token_ids=None) -> list[int]:
        """The prompt's token ids (encoding the text if no ids are given), validated."""
        if prompt_token_ids is None:
            if prompt is None:
                raise ValueError("either prompt or prompt_token_ids is required")
            prompt_token_ids = self.tokenizer.encode(prompt)
        ids = list(prompt_token_ids)
        if not ids:
            raise ValueError("prompt must not be empty")
        if len(ids) >= self.max_model_len:
            raise ValueError(
                f"prompt has {len(ids)} tokens, but this model's maximum context length is "
                f"{self.max_model_len} tokens (prompt + at least one generated token); "
                "shorten the prompt or raise max_model_len")
        bad = next((t for t in ids if not isinstance(t, int) or not 0 <= t < self.vocab_size),
                   None)
        if bad is not None:
            raise ValueError(f"prompt token id {bad!r} is outside the vocabulary [0, {self.vocab_size})")
        return ids

    def _seq_state(self, seq: Sequence, params: SamplingParams, seed_offset: int = 0) -> SeqState:
        gen = None
        if params.seed is not None and not params.is_greedy:
            gen = torch.Generator(device=self.runner.device).manual_seed(params.seed + seed_offset)
        return SeqState(IncrementalDetokenizer(self.tokenizer, seq.prompt_token_ids, params), gen)

    @staticmethod
    def _needs_sync(group: SequenceGroup) -> int:
        return int(group.params.needs_sync_steps)

    def abort_request(self, request_id: str) -> None:
        """Stop a request now and free its blocks (unknown or finished ids are ignored)."""
        group = self.scheduler.abort(request_id)
        if group is not None and self.groups.pop(request_id, None) is not None:
            self._num_sync_groups -= self._needs_sync(group)
            for seq in group.seqs:
                seq.drop_placeholders()

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or self._inflight is not None

    def get_num_unfinished_requests(self) -> int:
        return len(self.groups)

    # ---- the step ------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One iteration: schedule, run, process; returns outputs of the requests that changed.

        With async scheduling the device never waits for the host: each call plans and
        launches step N+1 first, then reads back and processes step N (launched by the call
        before), whose sampled tokens N+1 takes straight from device memory:

            call k     schedule N+1 | launch N+1 | wait for N, process N  -> outputs of N
            device     ...... N .............|...... N+1 ........................

        A sequence that finishes in N (EOS, stop string) has one wasted row in N+1, dropped.
        Requests that must see every token on the host before the next step is planned (beam
        search, penalties, logprobs) switch the engine to synchronous steps while they live.
        """
        if self.config.async_scheduling and not self._num_sync_groups:
            return self._step_async()
        if self._inflight is not None:
            return self._drain()
        return self._step_sync()

    def _schedule(self) -> tuple[SchedulerOutput, list, list, SamplingMetadata | None]:
        out = self.scheduler.schedule()
        outputs = [self._fail(group, reason) for group, reason in out.rejected]
        rows = self._sample_rows(out.scheduled)  # (entry index, sequence) per sampler row
        sampling = self._sampling_metadata(out.scheduled, rows) if rows else None
        return out, outputs, rows, sampling

    def _step_sync(self) -> list[RequestOutput]:
        out, outputs, rows, sampling = self._schedule()
        want_plp = {e.seq.seq_id: e.group.params.prompt_logprobs for e in out.scheduled
                    if e.group.data.prompt_logprobs is not None
                    and e.seq.num_computed_tokens < e.seq.num_prompt_tokens - 1}
        result, prompt_rows = self.runner.execute(out, sampling, want_plp,
                                                  sample_from=[i for i, _ in rows])
        self.scheduler.update_from_output(out)
        for e in out.scheduled:
            if e.seq.seq_id in prompt_rows:
                self._store_prompt_logprobs(e, *prompt_rows[e.seq.seq_id])
        if result is None:
            return outputs + self._process(out, rows, [], None)
        return outputs + self._process(out, rows, result.sampled_token_ids, result.logprobs)

    def _step_async(self) -> list[RequestOutput]:
        out, outputs, rows, sampling = self._schedule()
        prev, self._inflight = self._inflight, None
        if out.scheduled:
            handle = self.runner.launch(out, sampling, [i for i, _ in rows],
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
            outputs += self._process(prev.out, prev.rows, self.runner.collect(prev.handle), None)
        # After N's tokens are resolved: the blocks this publishes hold no placeholder.
        self.scheduler.update_from_output(out)
        return outputs

    def _drain(self) -> list[RequestOutput]:
        prev, self._inflight = self._inflight, None
        return self._process(prev.out, prev.rows, self.runner.collect(prev.handle), None)

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
                 tokens: list[int], logprobs: list | None) -> list[RequestOutput]:
        """Append each row's token, run stop checks and build the outputs of this step."""
        touched: dict[str, SequenceGroup] = {}
        now = time.monotonic()
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
            self._append_token(group, seq, tokens[r], lp, now)
            touched[group.request_id] = group
        for group in beam_groups.values():
            if self._beam_step(group, now):
                touched[group.request_id] = group
        for group in self.scheduler.remove_finished():
            touched[group.request_id] = group
        outputs = []
        for group in touched.values():
            if group.is_done or group.params.output_kind != RequestOutputKind.FINAL_ONLY:
                outputs.append(make_output(group, self.tokenizer))
            if group.is_done and self.groups.pop(group.request_id, None) is not None:
                self.stats["num_requests_finished_total"] += 1
                self._num_sync_groups -= self._needs_sync(group)
        self._maybe_log(now)
        return outputs

    def _sample_rows(self, scheduled: list[ScheduledSeq]) -> list[tuple[int, Sequence]]:
        """Which sequences sample this step, and from which entry's logits.

        Parallel sampling (n > 1) as in the paper: the prompt is prefilled once; when its
        first token is due, the sequence forks into n that share every block (ref_cnt = n),
        and all n sample their first token from the same logits.
        """
        rows = []
        for i, e in enumerate(scheduled):
            if not e.samples:
                continue
            rows.append((i, e.seq))
            group = e.group
            if group.params.n > 1 and len(group.seqs) == 1 and e.seq.num_output_tokens == 0:
                for _ in range(group.params.n - 1):
                    rows.append((i, self._fork(group, e)))
        return rows

    def _fork(self, group: SequenceGroup, e: ScheduledSeq) -> Sequence:
        child = self._fork_seq(group, e.seq)
        # This step computes the parent's chunk into the blocks the child shares.
        child.num_computed_tokens += e.num_new_tokens
        return child

    def _fork_seq(self, group: SequenceGroup, parent: Sequence) -> Sequence:
        child = parent.fork(next(self._seq_ids))
        self.block_manager.fork(parent, child)
        child.data = self._seq_state(child, group.params, seed_offset=len(group.seqs))
        group.seqs.append(child)
        return child

    def _sampling_metadata(self, scheduled: list[ScheduledSeq],
                           rows: list[tuple[int, Sequence]]) -> SamplingMetadata:
        params, gens, prompts, outs, banned = [], [], [], [], []
        for i, seq in rows:
            p = scheduled[i].group.params
            params.append(p)
            gens.append(seq.data.generator)
            prompts.append(seq.prompt_token_ids if p.repetition_penalty != 1.0 else [])
            outs.append(seq.output_token_ids if p.has_penalties else [])
            # EOS and stop token ids are not allowed before min_tokens.
            if seq.num_output_tokens < p.min_tokens:
                ids = list(p.stop_token_ids or [])
                if not p.ignore_eos:
                    ids += sorted(self.eos_token_ids)
                banned.append(ids)
            else:
                banned.append([])
        return SamplingMetadata.build(params, gens, prompts, outs, banned, self.runner.device)

    def _append_token(self, group: SequenceGroup, seq: Sequence, token: int,
                      lp: TokenLogprobs | None, now: float) -> None:
        params = group.params
        state: RequestState = group.data
        if state.first_token_time is None:
            state.first_token_time = now
            self.stats["prompt_tokens_total"] += seq.num_prompt_tokens
        state.last_token_time = now
        self.stats["generation_tokens_total"] += 1
        if seq.num_output_placeholders:
            seq.resolve_placeholder(token, lp.logprob if lp is not None else 0.0)
        else:
            seq.append_token(token, lp.logprob if lp is not None else 0.0)
        if lp is not None:
            seq.logprobs.append(convert_logprobs(self.tokenizer, lp))
        stop_str = seq.data.detokenizer.append([token])
        num_known = seq.num_known_tokens  # a later step's placeholder may follow this token
        status = None
        if stop_str is not None:
            status, seq.stop_reason = SequenceStatus.FINISHED_STOPPED, stop_str
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
            seq.data.detokenizer.finish()
            if seq.is_finished:  # finished by length when its step was launched
                seq.status = status  # (EOS or a stop string in the last token wins)
            else:
                self.scheduler.finish_seq(seq, status)

    def _store_prompt_logprobs(self, e: ScheduledSeq, start: int, rows: list) -> None:
        target = e.group.data.prompt_logprobs
        for j, row in enumerate(rows):
            if start + 1 + j < len(target):
                continue  # already stored (a prefill recomputed after preemption)
            target.append(convert_logprobs(self.tokenizer, row))

    def _fail(self, group: SequenceGroup, reason: str) -> RequestOutput:
        logger.error(reason)
        group.data.error = reason
        if self.groups.pop(group.request_id, None) is not None:
            self._num_sync_groups -= self._needs_sync(group)
        self.stats["num_requests_failed_total"] += 1
        return make_output(group, self.tokenizer)

    # ---- metrics -------------------------------------------------------------------------------
    def get_metrics(self) -> dict:
        s = self.scheduler
        return {
            "num_requests_running": len(s.running),
            "num_requests_waiting": len(s.waiting),
            "num_requests_swapped": len(s.swapped),
            "kv_cache_usage_perc": self.block_manager.usage(),
            "num_preemptions_total": s.num_preemptions,
            "num_swapped_out_blocks_total": s.num_swapped_out_blocks,
            "num_swapped_in_blocks_total": s.num_swapped_in_blocks,
            "prefix_cache_queries_total": s.prefix_cache_queries,
            "prefix_cache_hits_total": s.prefix_cache_hits,
            "num_gpu_blocks": self.block_manager.pool.num_blocks,
            **self.stats,
        }

    def _maybe_log(self, now: float) -> None:
        t0, p0, g0 = self._last_log
        if now - t0 < _LOG_INTERVAL_S:
            return
        p, g = self.stats["prompt_tokens_total"], self.stats["generation_tokens_total"]
        self._last_log = (now, p, g)
        s = self.scheduler
        logger.info(
            "prompt throughput: %.1f tok/s, generation throughput: %.1f tok/s, running: %d, "
            "waiting: %d, swapped: %d, KV cache usage: %.1f%%", (p - p0) / (now - t0),
            (g - g0) / (now - t0), len(s.running), len(s.waiting), len(s.swapped),
            100 * self.block_manager.usage())


def _eos_ids(tokenizer, hf_config) -> set[int]:
    ids = set()
    for value in (getattr(tokenizer, "eos_token_id", None), getattr(hf_config, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(value)
    return ids
