"""RequestOutputs from the engine's sequences (vLLM's shapes; see pagedllm/outputs.py)."""

from __future__ import annotations

from pagedllm.core.sequence import SequenceGroup
from pagedllm.layers.sampler import TokenLogprobs
from pagedllm.outputs import CompletionOutput, Logprob, RequestOutput


def make_output(group: SequenceGroup, tokenizer) -> RequestOutput:
    """The request's state now: every sequence so far (beam search: the hypotheses, once done).
    Placeholders (async scheduling) are never shown: output_token_ids stops before them."""
    params = group.params
    want_lp = params.logprobs is not None
    outs = beam_output(group, tokenizer) if group.data.beam is not None else [
        CompletionOutput(
            index=i,
            text=seq.data.detokenizer.output_text,
            token_ids=seq.output_token_ids,
            cumulative_logprob=seq.cumulative_logprob if want_lp else None,
            logprobs=list(seq.logprobs) if want_lp else None,
            finish_reason=None if seq.num_output_placeholders else seq.status.finish_reason,
            stop_reason=seq.stop_reason,
            delta_text=seq.data.detokenizer.get_delta(
                seq.is_finished and not seq.num_output_placeholders),
        )
        for i, seq in enumerate(group.seqs)
    ]
    return RequestOutput(
        request_id=group.request_id, prompt=group.prompt,
        prompt_token_ids=group.prompt_token_ids, outputs=outs, finished=group.is_done,
        prompt_logprobs=group.data.prompt_logprobs, error=group.data.error,
        num_cached_tokens=group.num_cached_tokens,
        metrics={"arrival_time": group.arrival_time,
                 "first_token_time": group.data.first_token_time,
                 "last_token_time": group.data.last_token_time},
    )


def beam_output(group: SequenceGroup, tokenizer) -> list[CompletionOutput]:
    if not group.is_finished:
        return []
    return [
        CompletionOutput(
            index=i, text=tokenizer.decode(h.token_ids, skip_special_tokens=True),
            token_ids=h.token_ids, cumulative_logprob=h.cum_logprob, logprobs=None,
            finish_reason="stop" if h.ended_on_eos else "length")
        for i, h in enumerate(group.data.beam.results())
    ]


def convert_logprobs(tokenizer, lp: TokenLogprobs) -> dict[int, Logprob]:
    """The sampler's top-k row as vLLM's {token id: Logprob}, the chosen token included."""
    entry = {tid: Logprob(v, rank=r + 1) for r, (tid, v) in enumerate(lp.top_logprobs.items())}
    entry[lp.token_id] = Logprob(lp.logprob, rank=lp.rank)
    for tid, logprob in entry.items():
        logprob.decoded_token = tokenizer.decode([tid])
    return entry
