"""The engine core's per-request state and the pure functions around it: what a request's
delta says (`make_output`), what the sampler gets per row (`sampling_metadata`), a grammar
matcher fed one token (`advance_matcher`). EngineCore (core.py) owns the instances."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from pagedllm.core.scheduler import ScheduledSeq
from pagedllm.core.sequence import Sequence, SequenceGroup
from pagedllm.engine.beam_search import BeamState
from pagedllm.engine.protocol import BeamHypothesis, EngineCoreOutput, SeqDelta
from pagedllm.engine.structured_output import StructuredOutputManager, bad_word_bans
from pagedllm.layers.sampler import SamplingMetadata, TokenLogprobs

logger = logging.getLogger("pagedllm")


@dataclass(slots=True)
class SeqState:
    """Core-side state of one sequence (kept in Sequence.data; core/ never looks inside)."""

    index: int  # position in its request, as the frontend numbers outputs
    generator: torch.Generator | None
    new_token_ids: list[int] = field(default_factory=list)  # not yet sent to the frontend
    new_logprobs: list[TokenLogprobs] = field(default_factory=list)
    sent_finish: bool = False
    # Structured output: this sequence's grammar matcher, and how many tokens it consumed
    # (always its output length: a recomputed prefill after preemption consumes nothing).
    matcher: object | None = None
    num_matched: int = 0


@dataclass(slots=True)
class RequestState:
    """Core-side state of one request (kept in SequenceGroup.data)."""

    streams: bool  # send deltas every step (else only once, when finished)
    started: bool = False  # its first token arrived (prompt tokens counted)
    num_prompt_logprobs: int = 0  # prompt positions whose logprobs were computed
    new_prompt_logprobs: list[TokenLogprobs] | None = None
    error: str | None = None
    beam: BeamState | None = None
    allowed_bitmask: torch.Tensor | None = None  # [ceil(V/32)] i32 for allowed_token_ids


def make_output(group: SequenceGroup) -> EngineCoreOutput | None:
    """The request's delta since its last one (None while it has nothing to say)."""
    state: RequestState = group.data
    done = group.is_done
    if state.beam is not None:
        if not done:
            return None
        return EngineCoreOutput(group.request_id, finished=True, beams=[
            BeamHypothesis(h.token_ids, h.cum_logprob, h.ended_on_eos)
            for h in state.beam.results()])
    if not done and not state.streams:
        return None  # FINAL_ONLY: tokens pile up in SeqState until the end
    deltas = []
    for seq in group.seqs:
        d: SeqState = seq.data
        finish = None if seq.num_output_placeholders or d.sent_finish \
            else seq.status.finish_reason
        if d.new_token_ids or finish is not None:
            deltas.append(SeqDelta(d.index, d.new_token_ids, d.new_logprobs or None, finish,
                                   seq.stop_reason if finish else None))
            d.new_token_ids, d.new_logprobs = [], []
            if finish is not None:
                d.sent_finish = True
    plp, state.new_prompt_logprobs = state.new_prompt_logprobs, None
    return EngineCoreOutput(group.request_id, deltas, done, plp, group.num_cached_tokens)


def store_prompt_logprobs(e: ScheduledSeq, start: int, rows: list) -> None:
    """Keep a prefill's new prompt-logprob rows (once: a recomputed prefill repeats them)."""
    state: RequestState = e.group.data
    for j, row in enumerate(rows):
        if start + 1 + j < state.num_prompt_logprobs:
            continue  # already stored (a prefill recomputed after preemption)
        state.num_prompt_logprobs += 1
        if state.new_prompt_logprobs is None:
            state.new_prompt_logprobs = []
        state.new_prompt_logprobs.append(row)


def sampling_metadata(scheduled: list[ScheduledSeq], rows: list[tuple[int, Sequence]],
                      eos_token_ids: set[int], structured_output: StructuredOutputManager,
                      device) -> SamplingMetadata:
    """The sampler's per-row inputs: params, generators, penalty context, banned ids (EOS and
    stop ids before min_tokens, bad words) and the allowed-token bitmask of grammar rows."""
    params, gens, prompts, outs, banned = [], [], [], [], []
    mask_rows, matchers = [], []  # rows limited by a grammar or allowed_token_ids
    for r, (i, seq) in enumerate(rows):
        p = scheduled[i].group.params
        if seq.data.matcher is not None or p.allowed_token_ids:
            mask_rows.append(r)
            matchers.append(seq.data.matcher)
        params.append(p)
        gens.append(seq.data.generator)
        prompts.append(seq.prompt_token_ids if p.repetition_penalty != 1.0 else [])
        outs.append(seq.output_token_ids if p.has_penalties else [])
        # EOS and stop token ids are not allowed before min_tokens.
        if seq.num_output_tokens < p.min_tokens:
            ids = list(p.stop_token_ids or [])
            if not p.ignore_eos:
                ids += sorted(eos_token_ids)
        else:
            ids = []
        if p.bad_words_token_ids:
            ids += bad_word_bans(p.bad_words_token_ids, seq.output_token_ids)
        banned.append(ids)
    bitmask = None
    if mask_rows:
        allowed = [scheduled[rows[r][0]].group.data.allowed_bitmask for r in mask_rows]
        bitmask = (mask_rows, structured_output.token_bitmask(matchers, allowed))
    return SamplingMetadata.build(params, gens, prompts, outs, banned, device, bitmask)


def advance_matcher(seq: Sequence, token: int) -> bool:
    """Feed the sampled token to the sequence's matcher; True once the grammar is done
    (complete, or broken: a token the mask allowed was refused, which is logged)."""
    state: SeqState = seq.data
    matcher = state.matcher
    # Each output token is consumed once: a recompute after preemption samples only new
    # tokens, so the count always equals the output length.
    assert state.num_matched == seq.num_output_tokens - 1, (state.num_matched,
                                                            seq.num_output_tokens)
    state.num_matched += 1
    if not matcher.consume_token(token):
        logger.error("structured output: the grammar refused token %d (%s); stopping the "
                     "sequence", token, matcher.get_error())
        return True
    return matcher.is_stopped()
