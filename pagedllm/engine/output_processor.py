"""OutputProcessor: the frontend's half of a request. Token ids in, RequestOutputs out.

The core sends token-id deltas (engine/protocol.py); this turns them into vLLM's shapes
(pagedllm/outputs.py): incremental detokenization, stop strings, logprobs with decoded
tokens, timestamps. A stop string ends a sequence here first (its text is final at once) and
then in the core: the processor returns which sequences the core must stop, and drops any
token the core sampled for them before it heard.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from pagedllm.engine.detokenizer import IncrementalDetokenizer
from pagedllm.engine.protocol import EngineCoreOutput, EngineCoreRequest, SeqDelta
from pagedllm.layers.sampler import TokenLogprobs
from pagedllm.outputs import CompletionOutput, Logprob, RequestOutput
from pagedllm.sampling_params import RequestOutputKind, SamplingParams


@dataclass(slots=True)
class SeqOutput:
    """One sequence as the client sees it."""

    detokenizer: IncrementalDetokenizer
    token_ids: list[int] = field(default_factory=list)
    logprobs: list | None = None
    cumulative_logprob: float = 0.0
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass(slots=True)
class RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams | None  # as the client sent them; None for beam search
    arrival_time: float
    num_samples: int = 1  # what the core samples: n, or best_of (SamplingParams.core_params)
    seqs: dict[int, SeqOutput] = field(default_factory=dict)
    prompt_logprobs: list | None = None
    num_cached_tokens: int = 0
    first_token_time: float | None = None
    last_token_time: float | None = None


@dataclass(slots=True)
class ProcessedOutputs:
    request_outputs: list[RequestOutput]
    abort: list[str]  # requests a stop string ended whole
    finish_seqs: list[tuple[str, int]]  # single sequences (n > 1) a stop string ended


class OutputProcessor:
    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.requests: dict[str, RequestState] = {}

    def add_request(self, req: EngineCoreRequest, prompt: str | None,
                    params: SamplingParams | None = None) -> None:
        """``params``: the client's, where the core runs others (best_of > n); by default the
        request's own."""
        core = req.sampling_params
        params = params if core is not None and params is not None else core
        state = RequestState(req.request_id, prompt, req.prompt_token_ids, params,
                             req.arrival_time or time.monotonic(),
                             num_samples=core.n if core is not None else 1)
        if params is not None and params.prompt_logprobs is not None:
            state.prompt_logprobs = [None]  # the first token has no logprob
        self.requests[req.request_id] = state

    def abort_request(self, request_id: str) -> None:
        self.requests.pop(request_id, None)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def process_outputs(self, outputs: list[EngineCoreOutput]) -> ProcessedOutputs:
        result = ProcessedOutputs([], [], [])
        now = time.monotonic()
        for out in outputs:
            state = self.requests.get(out.request_id)
            if state is None:
                continue  # aborted by the client, or ended by a stop string meanwhile
            if out.beams is not None or out.error is not None:
                # Beam search reports once, at the end; a failed request ends at once.
                result.request_outputs.append(self._final_output(state, out))
                del self.requests[out.request_id]
                continue
            stopped = [d.index for d in out.seqs if self._apply(state, d, now)]
            if out.new_prompt_logprobs:
                state.prompt_logprobs.extend(self._logprobs(lp) for lp in out.new_prompt_logprobs)
            state.num_cached_tokens = out.num_cached_tokens
            finished = out.finished or (
                len(state.seqs) == state.num_samples
                and all(s.finish_reason is not None for s in state.seqs.values()))
            if finished:
                del self.requests[out.request_id]
                if not out.finished:
                    result.abort.append(out.request_id)  # stop strings ended every sequence
            else:
                result.finish_seqs.extend((out.request_id, i) for i in stopped)
            final_only = (state.params.output_kind == RequestOutputKind.FINAL_ONLY
                          or state.params.picks_best_of)
            if finished or not final_only:
                result.request_outputs.append(self._make_output(state, finished))
        return result

    def _apply(self, state: RequestState, delta: SeqDelta, now: float) -> bool:
        """Append a sequence's new tokens; True if a stop string ended it just now."""
        seq = state.seqs.get(delta.index)
        if seq is None:
            params = state.params
            seq = state.seqs[delta.index] = SeqOutput(
                IncrementalDetokenizer(self.tokenizer, state.prompt_token_ids, params),
                logprobs=[] if params.logprobs is not None else None)
        if seq.finish_reason is not None:
            return False  # a stop string ended it; the core sampled on before it heard
        if delta.new_token_ids:
            if state.first_token_time is None:
                state.first_token_time = now
            state.last_token_time = now
        lps = delta.new_logprobs
        if not state.params.stop:  # no stop strings: take the delta whole
            seq.token_ids.extend(delta.new_token_ids)
            seq.detokenizer.append(delta.new_token_ids)
            if lps:
                self._add_logprobs(seq, lps)
        else:  # token by token: the sequence ends exactly at the token that completes a stop
            for j, token in enumerate(delta.new_token_ids):
                seq.token_ids.append(token)
                if lps:
                    self._add_logprobs(seq, lps[j:j + 1])
                stop = seq.detokenizer.append([token])
                if stop is not None:
                    seq.finish_reason, seq.stop_reason = "stop", stop
                    seq.detokenizer.finish()
                    return True
        if delta.finish_reason is not None:
            seq.finish_reason, seq.stop_reason = delta.finish_reason, delta.stop_reason
            seq.detokenizer.finish()
        return False

    def _add_logprobs(self, seq: SeqOutput, lps: list[TokenLogprobs]) -> None:
        for lp in lps:
            seq.cumulative_logprob += lp.logprob
            if seq.logprobs is not None:
                seq.logprobs.append(self._logprobs(lp))

    def _logprobs(self, lp: TokenLogprobs) -> dict[int, Logprob]:
        """The sampler's top-k row as vLLM's {token id: Logprob}, the chosen token included."""
        entry = {tid: Logprob(v, rank=r + 1) for r, (tid, v) in enumerate(lp.top_logprobs.items())}
        entry[lp.token_id] = Logprob(lp.logprob, rank=lp.rank)
        for tid, logprob in entry.items():
            logprob.decoded_token = self.tokenizer.decode([tid])
        return entry

    def _make_output(self, state: RequestState, finished: bool) -> RequestOutput:
        want_lp = state.params.logprobs is not None
        seqs = [seq for _, seq in sorted(state.seqs.items())]
        if state.params.picks_best_of:
            # The n of best_of samples with the highest cumulative logprob, best first (vLLM
            # v0's order); sorted() is stable, so a tie keeps the lower sample index first.
            seqs = sorted(seqs, key=lambda seq: -seq.cumulative_logprob)[:state.params.n]
        outs = [
            CompletionOutput(
                index=i, text=seq.detokenizer.output_text, token_ids=list(seq.token_ids),
                cumulative_logprob=seq.cumulative_logprob if want_lp else None,
                logprobs=list(seq.logprobs) if want_lp else None,
                finish_reason=seq.finish_reason, stop_reason=seq.stop_reason,
                delta_text=seq.detokenizer.get_delta(seq.finish_reason is not None))
            for i, seq in enumerate(seqs)
        ]
        return RequestOutput(
            request_id=state.request_id, prompt=state.prompt,
            prompt_token_ids=state.prompt_token_ids, outputs=outs, finished=finished,
            prompt_logprobs=state.prompt_logprobs,
            num_cached_tokens=state.num_cached_tokens, metrics=self._metrics(state))

    def _final_output(self, state: RequestState, out: EngineCoreOutput) -> RequestOutput:
        """A beam search's hypotheses, or a failed request's error."""
        outs = [
            CompletionOutput(
                index=i, text=self.tokenizer.decode(h.token_ids, skip_special_tokens=True),
                token_ids=h.token_ids, cumulative_logprob=h.cum_logprob, logprobs=None,
                finish_reason="stop" if h.ended_on_eos else "length")
            for i, h in enumerate(out.beams or ())
        ]
        if out.beams is not None:
            state.first_token_time = state.last_token_time = time.monotonic()
        else:  # failed: every sequence ends as aborted, with what it had
            for seq in state.seqs.values():
                seq.finish_reason = seq.finish_reason or "abort"
            outs = [CompletionOutput(i, seq.detokenizer.output_text, list(seq.token_ids), None,
                                     None, seq.finish_reason, seq.stop_reason)
                    for i, seq in sorted(state.seqs.items())] or [
                CompletionOutput(0, "", [], None, None, "abort")]
        return RequestOutput(
            request_id=state.request_id, prompt=state.prompt,
            prompt_token_ids=state.prompt_token_ids, outputs=outs, finished=True,
            prompt_logprobs=state.prompt_logprobs, error=out.error,
            num_cached_tokens=out.num_cached_tokens, metrics=self._metrics(state))

    @staticmethod
    def _metrics(state: RequestState) -> dict:
        return {"arrival_time": state.arrival_time, "first_token_time": state.first_token_time,
                "last_token_time": state.last_token_time}
