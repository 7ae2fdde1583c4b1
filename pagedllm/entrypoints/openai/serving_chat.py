"""POST /v1/chat/completions: messages -> chat template -> one engine request with n choices."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

from starlette.requests import Request

from pagedllm.engine.async_engine import RequestStream
from pagedllm.entrypoints.llm import LLM
from pagedllm.entrypoints.openai.protocol import APIError, ChatCompletionRequest
from pagedllm.entrypoints.openai.serving_engine import (
    MIN_LOGPROB, OpenAIServing, SSEResponse, final_output, sse, to_api_error,
    until_disconnected, usage,
)
from pagedllm.outputs import CompletionOutput, PositionLogprobs


class OpenAIServingChat(OpenAIServing):
    async def create(self, request: ChatCompletionRequest, raw: Request) -> dict | SSEResponse:
        arrival = time.monotonic()
        self.check_model(request.model)
        request.check_stream_options()
        prompt_ids = self.render(request)
        max_tokens = request.requested_max_tokens
        self.check_length(len(prompt_ids), max_tokens, "messages")
        num_logprobs = request.num_logprobs()
        params = self.make_params(lambda: request.to_sampling_params(max_tokens, num_logprobs))
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        stream = await self.add(request_id, prompt_ids, params, None, arrival, request.cache_salt)
        meta = {"id": request_id, "created": int(time.time()), "model": self.model_name}
        if request.stream:
            events = self._stream(stream, meta, params.n, num_logprobs, request.include_usage)
            return SSEResponse(events, on_close=stream.close)
        try:
            out = await until_disconnected(raw, final_output(stream))
        finally:
            stream.close()
        choices = [{
            "index": o.index,
            "message": {"role": "assistant", "content": o.text},
            "logprobs": self._logprobs(o, 0, num_logprobs),
            "finish_reason": o.finish_reason,
            "stop_reason": o.stop_reason,
        } for o in out.outputs]
        return {**meta, "object": "chat.completion", "choices": choices,
                "usage": usage(len(out.prompt_token_ids), out.outputs)}

    def render(self, request: ChatCompletionRequest) -> list[int]:
        if not request.messages:
            raise APIError(400, "messages must not be empty", param="messages")
        # "developer" is OpenAI's newer name for the system role; chat templates know "system".
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.content}
                    for m in request.messages]
        self.check_chars(sum(len(str(m["content"] or "")) for m in messages), "messages")
        try:
            return LLM.encode_chat_with(self.tokenizer, messages)
        except Exception as exc:  # a template may raise on e.g. an unexpected role order
            raise APIError(400, f"cannot apply the chat template: {exc}",
                           param="messages") from None

    async def _stream(self, stream: RequestStream, meta: dict, n: int, num_logprobs: int | None,
                      include_usage: bool) -> AsyncIterator[str]:
        base = {**meta, "object": "chat.completion.chunk"}
        if include_usage:
            base["usage"] = None  # OpenAI sends usage only in the last chunk

        def chunk(index: int, delta: dict, logprobs=None, finish_reason=None, stop_reason=None):
            return sse({**base, "choices": [{
                "index": index, "delta": delta, "logprobs": logprobs,
                "finish_reason": finish_reason, "stop_reason": stop_reason}]})

        sent_logprobs = [0] * n  # positions already streamed, per choice
        done = [False] * n
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
                    if o.delta_text or (logprobs and logprobs["content"]):
                        yield chunk(o.index, {"content": o.delta_text}, logprobs)
                    if o.finish_reason is not None:
                        done[o.index] = True
                        yield chunk(o.index, {}, None, o.finish_reason, o.stop_reason)
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

