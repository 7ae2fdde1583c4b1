"""POST /v1/chat/completions: messages -> chat template -> one engine request with n choices."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

from starlette.requests import Request

from pagedllm.engine.async_engine import RequestStream
from pagedllm.entrypoints.openai.protocol import APIError, ChatCompletionRequest
from pagedllm.entrypoints.openai.serving_engine import (
    MIN_LOGPROB,
    OpenAIServing,
    SSEResponse,
    final_output,
    sse,
    to_api_error,
    until_disconnected,
    usage,
)
from pagedllm.entrypoints.openai.tool_calls import check_tools, constraint, tool_parser
from pagedllm.outputs import CompletionOutput, PositionLogprobs


class OpenAIServingChat(OpenAIServing):
    async def create(self, request: ChatCompletionRequest, raw: Request) -> dict | SSEResponse:
        arrival = time.monotonic()
        self.check_request(request)
        tool_mode = check_tools(request.tools, request.tool_choice, self.tool_call_parser)
        prompt_ids = await self.render(request, tool_mode)
        max_tokens = request.requested_max_tokens
        self.check_length(len(prompt_ids), max_tokens, "messages")
        max_tokens = self.default_max_tokens(max_tokens, [len(prompt_ids)])
        num_logprobs = request.num_logprobs()
        params = self.make_params(lambda: request.to_sampling_params(
            max_tokens, num_logprobs, compact_json=self.compact_json,
            defaults=self.sampling_defaults))
        forced = constraint(request.tools, tool_mode) if tool_mode else None
        if forced is not None:  # 'required' / named: the grammar makes the calls parse
            if params.structured_outputs is not None:
                raise APIError(400, "tool_choice 'required' or a named function cannot be "
                               "combined with another structured-output constraint",
                               param="tool_choice")
            forced.disable_any_whitespace = self.compact_json
            params.structured_outputs = forced
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        stream = await self.add(request_id, prompt_ids, params, None, arrival, request)
        meta = {"id": request_id, "created": int(time.time()), "model": self.model_name}
        if request.stream:
            events = self._stream(stream, meta, params.n, num_logprobs, request.include_usage,
                                  request.continuous_usage, len(prompt_ids), tool_mode)
            return SSEResponse(events, on_close=stream.close)
        try:
            out = await until_disconnected(raw, final_output(stream))
        finally:
            stream.close()
        choices = []
        for o in out.outputs:
            message, finish = {"role": "assistant", "content": o.text}, o.finish_reason
            parser = tool_parser(tool_mode, self.tool_call_parser)
            if parser is not None:
                content, calls = parser.extract(o.text)
                if calls:
                    message = {"role": "assistant", "content": content, "tool_calls": calls}
                    finish = "tool_calls" if finish == "stop" else finish
            choices.append({"index": o.index, "message": message,
                            "logprobs": self._logprobs(o, 0, num_logprobs),
                            "finish_reason": finish, "stop_reason": o.stop_reason})
        return {**meta, "object": "chat.completion", "choices": choices,
                "usage": usage(len(out.prompt_token_ids), out.outputs)}

    async def render(self, request: ChatCompletionRequest, tool_mode: str | None = None
                     ) -> list[int]:
        if not request.messages:
            raise APIError(400, "messages must not be empty", param="messages")
        for i, m in enumerate(request.messages):
            m.check_message(i)
        messages = [m.to_template() for m in request.messages]
        self.check_chars(sum(len(str(m["content"] or "")) for m in messages), "messages")
        tools = request.tools if tool_mode not in (None, "none") else None
        return await self.encoder.encode_chat(messages, tools=tools)

    async def _stream(self, stream: RequestStream, meta: dict, n: int, num_logprobs: int | None,
                      include_usage: bool, continuous_usage: bool = False,
                      num_prompt_tokens: int = 0, tool_mode: str | None = None
                      ) -> AsyncIterator[str]:
        base = {**meta, "object": "chat.completion.chunk"}
        if include_usage:
            base["usage"] = None  # OpenAI sends usage only in the last chunk

        def chunk(index: int, delta: dict, logprobs=None, finish_reason=None, stop_reason=None):
            extra = {}
            if include_usage and continuous_usage:  # vLLM's extension: usage on every chunk
                extra["usage"] = usage(num_prompt_tokens, last.outputs if last else [])
            return sse({**base, "choices": [{
                "index": index, "delta": delta, "logprobs": logprobs,
                "finish_reason": finish_reason, "stop_reason": stop_reason}], **extra})

        sent_logprobs = [0] * n  # positions already streamed, per choice
        done = [False] * n
        parsers = [tool_parser(tool_mode, self.tool_call_parser) for _ in range(n)]
        called = [False] * n  # a choice that made tool calls finishes with "tool_calls"
        last = None
        try:
            for i in range(n):
                yield chunk(i, {"role": "assistant", "content": ""})
            async for out in stream:
                last = out
                if out.error is not None:
                    raise APIError(400, out.error, code="request_failed")
                for o in out.outputs:
                    if done[o.index]:
                        continue
                    logprobs = None
                    if num_logprobs is not None and o.logprobs is not None:
                        logprobs = self._logprobs(o, sent_logprobs[o.index], num_logprobs)
                        sent_logprobs[o.index] = len(o.logprobs)
                    parser = parsers[o.index]
                    if parser is None:
                        if o.delta_text or (logprobs and logprobs["content"]):
                            yield chunk(o.index, {"content": o.delta_text}, logprobs)
                    else:
                        deltas = parser.feed(o.delta_text)
                        if o.finish_reason is not None:
                            deltas += parser.finish()
                        for delta in deltas:
                            called[o.index] |= "tool_calls" in delta
                            yield chunk(o.index, delta)
                    if o.finish_reason is not None:
                        done[o.index] = True
                        finish = o.finish_reason
                        if called[o.index] and finish == "stop":
                            finish = "tool_calls"
                        yield chunk(o.index, {}, None, finish, o.stop_reason)
            if include_usage and last is not None:
                yield sse({**base, "choices": [],
                           "usage": usage(len(last.prompt_token_ids), last.outputs)})
        except Exception as exc:
            yield sse(to_api_error(exc).to_dict())
        yield sse("[DONE]")

    @staticmethod
    def _logprobs(o: CompletionOutput, start: int, num_logprobs: int | None) -> dict | None:
        """OpenAI's chat shape: {"content": [{token, logprob, bytes, top_logprobs}]} from
        position `start` on."""
        if num_logprobs is None or o.logprobs is None:
            return None
        content = []
        for pos in range(start, len(o.logprobs)):
            entries: PositionLogprobs = o.logprobs[pos]
            chosen = entries[o.token_ids[pos]]
            top = sorted((lp for lp in entries.values() if lp.rank is not None
                          and lp.rank <= num_logprobs), key=lambda lp: lp.rank)
            content.append({**_entry(chosen), "top_logprobs": [_entry(lp) for lp in top]})
        return {"content": content}


def _entry(lp) -> dict:
    token = lp.decoded_token or ""
    return {"token": token, "logprob": max(lp.logprob, MIN_LOGPROB),
            "bytes": list(token.encode("utf-8"))}

