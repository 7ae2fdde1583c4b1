"""POST /v1/completions: one engine request per prompt; choice index = prompt * n + output."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import AsyncIterator

from starlette.requests import Request

from pagedllm.engine.async_engine import RequestStream
from pagedllm.entrypoints.openai.protocol import APIError, CompletionRequest
from pagedllm.entrypoints.openai.serving_engine import (
    MIN_LOGPROB,
    OpenAIServing,
    SSEResponse,
    final_output,
    merge,
    sse,
    to_api_error,
    until_disconnected,
    usage,
)
from pagedllm.outputs import PositionLogprobs, RequestOutput


class OpenAIServingCompletion(OpenAIServing):
    async def create(self, request: CompletionRequest, raw: Request) -> dict | SSEResponse:
        arrival = time.monotonic()
        self.check_request(request)
        prompts = []  # (text or None, token ids)
        for p in request.prompt:
            if isinstance(p, str):
                self.check_chars(len(p), "prompt")
            ids = await self.encoder.encode(p) if isinstance(p, str) else list(p)
            self.check_length(len(ids), request.max_tokens, "prompt")
            prompts.append((p if isinstance(p, str) else None, ids))
        num_logprobs = request.num_logprobs()
        echo = bool(request.echo)
        # echo + logprobs also reports the prompt's tokens, so ask the engine for them.
        prompt_logprobs = num_logprobs if echo and num_logprobs is not None else None
        max_tokens = self.default_max_tokens(request.max_tokens, [len(i) for _, i in prompts])
        params = self.make_params(lambda: request.to_sampling_params(
            max_tokens, num_logprobs, prompt_logprobs, self.compact_json,
            defaults=self.sampling_defaults))
        request_id = f"cmpl-{uuid.uuid4().hex}"
        streams: list[RequestStream] = []

        def close_all() -> None:
            for s in streams:
                s.close()

        try:
            for i, (text, ids) in enumerate(prompts):
                streams.append(await self.add(f"{request_id}-{i}", ids, params, text, arrival,
                                              request))
        except BaseException:
            close_all()
            raise
        job = _Job(self, request_id, [t for t, _ in prompts], params.n, num_logprobs, echo)
        if request.stream:
            return SSEResponse(job.stream(streams, request.include_usage,
                                          request.continuous_usage), on_close=close_all)
        try:
            outs = await until_disconnected(raw, _gather(streams))
        finally:
            close_all()
        return job.response(outs)


async def _gather(streams: list[RequestStream]) -> list[RequestOutput]:
    return [await final_output(s) for s in streams]  # they run concurrently in the engine


class _Job:
    """Formats the outputs of one /v1/completions call (all its prompts)."""

    def __init__(self, serving: OpenAIServing, request_id: str, texts: list[str | None], n: int,
                 num_logprobs: int | None, echo: bool) -> None:
        self.serving, self.texts, self.n = serving, texts, n
        self.num_logprobs, self.echo = num_logprobs, echo
        self.meta = {"id": request_id, "object": "text_completion", "created": int(time.time()),
                     "model": serving.model_name}

    def prompt_text(self, i: int, out: RequestOutput) -> str:
        if self.texts[i] is None:  # a token-id prompt: echo its decoded text
            self.texts[i] = self.serving.tokenizer.decode(out.prompt_token_ids)
        return self.texts[i]

    def response(self, outs: list[RequestOutput]) -> dict:
        choices = []
        for i, out in enumerate(outs):
            for o in out.outputs:
                text, logprobs = o.text, None
                if self.echo:
                    text = self.prompt_text(i, out) + text
                if self.num_logprobs is not None:
                    positions = self._positions(out, o, 0, self.echo)
                    logprobs = self._logprobs(positions, 0)
                choices.append({"index": i * self.n + o.index, "text": text, "logprobs": logprobs,
                                "finish_reason": o.finish_reason, "stop_reason": o.stop_reason})
        num_prompt = sum(len(out.prompt_token_ids) for out in outs)
        return {**self.meta, "choices": choices,
                "usage": usage(num_prompt, [o for out in outs for o in out.outputs])}

    async def stream(self, streams: list[RequestStream], include_usage: bool,
                     continuous_usage: bool = False) -> AsyncIterator[str]:
        base = dict(self.meta, usage=None) if include_usage else self.meta
        # vLLM's continuous_usage_stats: every chunk carries the usage so far.
        continuous = include_usage and continuous_usage

        def so_far() -> dict:
            outs = list(last.values())
            return usage(sum(len(out.prompt_token_ids) for out in outs),
                         [o for out in outs for o in out.outputs])
        num_choices = len(streams) * self.n
        sent = [0] * num_choices  # generated positions already streamed
        offset = [0] * num_choices  # text_offset of the next token
        done = [False] * num_choices
        last: dict[int, RequestOutput] = {}
        try:
            async with contextlib.aclosing(merge(streams)) as outputs:
                async for i, out in outputs:
                    if out.error is not None:
                        raise APIError(400, out.error, code="request_failed")
                    first, last[i] = i not in last, out
                    for o in out.outputs:
                        index = i * self.n + o.index
                        if done[index]:
                            continue
                        echo = self.echo and first
                        text = (self.prompt_text(i, out) if echo else "") + o.delta_text
                        logprobs = None
                        if self.num_logprobs is not None and o.logprobs is not None:
                            positions = self._positions(out, o, sent[index], echo)
                            logprobs = self._logprobs(positions, offset[index])
                            sent[index] = len(o.logprobs)
                            offset[index] += sum(len(t) for t in logprobs["tokens"])
                        extra = {"usage": so_far()} if continuous else {}
                        if text or (logprobs and logprobs["tokens"]):
                            yield sse({**base, "choices": [{
                                "index": index, "text": text, "logprobs": logprobs,
                                "finish_reason": None, "stop_reason": None}], **extra})
                        if o.finish_reason is not None:
                            done[index] = True
                            yield sse({**base, "choices": [{
                                "index": index, "text": "", "logprobs": None,
                                "finish_reason": o.finish_reason, "stop_reason": o.stop_reason}],
                                **extra})
            if include_usage:
                num_prompt = sum(len(out.prompt_token_ids) for out in last.values())
                yield sse({**base, "choices": [], "usage": usage(
                    num_prompt, [o for out in last.values() for o in out.outputs])})
        except Exception as exc:
            yield sse(to_api_error(exc).to_dict())
        yield sse("[DONE]")

    @staticmethod
    def _positions(out: RequestOutput, o, start: int, with_prompt: bool
                   ) -> list[tuple[int, PositionLogprobs | None]]:
        """(token id, its logprobs) for the prompt (if echoed) then generated tokens from
        `start`; the prompt's first token has no logprob (None)."""
        positions = []
        if with_prompt and out.prompt_logprobs is not None:
            positions = list(zip(out.prompt_token_ids, out.prompt_logprobs))
        positions += [(o.token_ids[p], o.logprobs[p]) for p in range(start, len(o.logprobs))]
        return positions

    def _logprobs(self, positions: list[tuple[int, PositionLogprobs | None]],
                  text_offset: int) -> dict:
        """OpenAI's legacy shape: tokens, token_logprobs, top_logprobs, text_offset."""
        tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
        for token_id, entries in positions:
            if entries is None:
                token = self.serving.tokenizer.decode([token_id])
                token_logprobs.append(None)
                top_logprobs.append(None)
            else:
                chosen = entries[token_id]
                token = chosen.decoded_token or ""
                token_logprobs.append(max(chosen.logprob, MIN_LOGPROB))
                top = {(lp.decoded_token or ""): max(lp.logprob, MIN_LOGPROB)
                       for lp in sorted(entries.values(), key=lambda lp: lp.rank or 0)
                       if lp.rank is not None and lp.rank <= self.num_logprobs}
                top.setdefault(token, token_logprobs[-1])  # the chosen token is always listed
                top_logprobs.append(top)
            tokens.append(token)
            offsets.append(text_offset)
            text_offset += len(token)
        return {"tokens": tokens, "token_logprobs": token_logprobs,
                "top_logprobs": top_logprobs, "text_offset": offsets}
