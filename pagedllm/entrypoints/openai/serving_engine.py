"""What the chat and completion endpoints share: the model check, the context-length check,
sampling params, adding requests with engine errors mapped to HTTP statuses, and the two ways a
client disconnect aborts its request (SSEResponse for streams, until_disconnected otherwise)."""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import anyio
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from pagedllm.engine.async_engine import (
    AsyncLLM,
    EngineDeadError,
    EngineDrainingError,
    QueueFullError,
    RequestStream,
)
from pagedllm.entrypoints.llm import LLM
from pagedllm.entrypoints.openai.protocol import APIError, ChatCompletionRequest, CompletionRequest
from pagedllm.loader.generation_config import generation_defaults
from pagedllm.outputs import CompletionOutput, RequestOutput
from pagedllm.sampling_params import SamplingParams

logger = logging.getLogger("pagedllm")
T = TypeVar("T")

# JSON has no -inf; a token the sampler could never pick reports this instead (as vLLM does).
MIN_LOGPROB = -9999.0


def to_api_error(exc: BaseException) -> APIError:
    """How an exception from the engine side is answered."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ValueError):
        return APIError(400, str(exc), param=_field_named_in(str(exc)))
    if isinstance(exc, QueueFullError):
        return APIError(429, str(exc), type="rate_limit_error", code="queue_full")
    if isinstance(exc, (EngineDeadError, EngineDrainingError)):
        return APIError(503, str(exc), type="service_unavailable_error")
    logger.exception("request failed", exc_info=exc)
    return APIError(500, f"internal error: {exc!r}", type="internal_error")


def _field_named_in(message: str) -> str | None:
    # SamplingParams messages start with the field: "top_p must be in (0, 1], got 2".
    match = re.match(r"([a-z_]+) must\b", message)
    return match.group(1) if match else None


class TokenizerThread:
    """Tokenization and chat templates off the event loop. Their cost grows with the input
    (seconds for megabytes), and on the loop they would stall /health and every stream; here
    they run on one worker thread, which the loop preempts every few milliseconds (the Rust
    tokenizer holds the GIL in short slices). The thread has its own copy of the tokenizer:
    a fast tokenizer refuses to be used from two threads at once ("Already borrowed"), and the
    loop keeps the original for detokenizing."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = copy.deepcopy(tokenizer)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="pagedllm-tokenizer")

    async def _run(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn)

    async def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return await self._run(lambda: self.tokenizer.encode(
            text, add_special_tokens=add_special_tokens))

    async def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True,
                          tools: list[dict] | None = None) -> list[int]:
        """The chat template's token ids; a template that raises (e.g. on an unexpected role
        order) is the client's error: 400."""
        try:
            return await self._run(lambda: LLM.encode_chat_with(
                self.tokenizer, messages, add_generation_prompt, tools))
        except Exception as exc:
            raise APIError(400, f"cannot apply the chat template: {exc}",
                           param="messages") from None

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class OpenAIServing:
    def __init__(self, engine: AsyncLLM, tokenizer, model_name: str,
                 encoder: TokenizerThread) -> None:
        self.engine = engine
        # Decoding (echo, logprob tokens) on the loop; encoding in `encoder`'s thread.
        self.tokenizer = tokenizer
        self.encoder = encoder
        # The model's generation_config.json defaults, for fields a request leaves unset.
        m = engine.config.model
        self.sampling_defaults = generation_defaults(m.model, m.generation_config)
        self.model_name = model_name
        self.compact_json = False  # --structured-outputs-disable-any-whitespace
        self.tool_call_parser: str | None = None  # --tool-call-parser
        self.max_model_len = engine.max_model_len
        # No prompt longer than this many characters fits the context, whatever it holds: one
        # token covers at most `longest token` characters (x4 for normalizers that merge
        # characters, e.g. NFC composing accents). Checked before tokenizing, which costs time
        # and memory on the event loop in proportion to the text.
        longest = max((len(t) for t in tokenizer.get_vocab()), default=1) \
            if hasattr(tokenizer, "get_vocab") else 64
        self.max_prompt_chars = self.max_model_len * max(1, longest) * 4

    def check_chars(self, num_chars: int, param: str) -> None:
        if num_chars > self.max_prompt_chars:
            raise APIError(
                400, f"The {param} has {num_chars} characters: more than this model's maximum "
                f"context length ({self.max_model_len} tokens) can hold. Please shorten the "
                "input.", param=param, code="context_length_exceeded")

    def check_request(self, request) -> None:
        """The checks every generation request gets before any work: model, stream options,
        fields we refuse (400), and one warning naming the fields we ignore."""
        self.check_model(request.model)
        request.check_stream_options()
        request.check_unsupported()
        ignored = request.ignored_fields()
        if ignored:
            logger.warning("ignoring unknown request fields: %s", ", ".join(sorted(ignored)))

    def default_max_tokens(self, max_tokens: int | None, prompt_lens: list[int]) -> int | None:
        """With a max_new_tokens in the model's generation_config.json, the smallest of it,
        the request's max_tokens and what the longest prompt leaves of the context (vLLM's
        rule: the file caps requests too); else the request's max_tokens."""
        default = self.sampling_defaults.get("max_tokens")
        if default is None:
            return max_tokens
        room = max(1, self.max_model_len - max(prompt_lens))
        return min(v for v in (max_tokens, default, room) if v is not None)

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(404, f"The model '{model}' does not exist; this server serves "
                           f"'{self.model_name}'", param="model", code="model_not_found")

    def check_length(self, num_prompt_tokens: int, max_tokens: int | None, param: str) -> None:
        limit = self.max_model_len
        if num_prompt_tokens >= limit:
            raise APIError(
                400, f"This model's maximum context length is {limit} tokens. However, you "
                f"requested {num_prompt_tokens} tokens in the {param}, which leaves no room for "
                "the completion. Please shorten the input.", param=param,
                code="context_length_exceeded")
        if isinstance(max_tokens, int) and num_prompt_tokens + max_tokens > limit:
            raise APIError(
                400, f"This model's maximum context length is {limit} tokens. However, you "
                f"requested {num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the "
                f"{param}, {max_tokens} for the completion). Please reduce the length of the "
                f"{param} or of max_tokens.", param="max_tokens", code="context_length_exceeded")

    @staticmethod
    def make_params(build: Callable[[], SamplingParams]) -> SamplingParams:
        try:
            return build()
        except ValueError as exc:
            raise to_api_error(exc) from None

    async def add(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                  prompt: str | None, arrival_time: float,
                  request: ChatCompletionRequest | CompletionRequest) -> RequestStream:
        """Queue one prompt of `request` (its cache_salt, priority and user go with it)."""
        try:
            return await self.engine.add_request(
                request_id, prompt_token_ids, params, prompt, arrival_time,
                priority=request.priority or 0, cache_salt=request.cache_salt, user=request.user)
        except Exception as exc:
            raise to_api_error(exc) from None


async def final_output(stream: RequestStream) -> RequestOutput:
    """Run a request to the end; an engine-side failure becomes an APIError."""
    last = None
    try:
        async for out in stream:
            last = out
    except Exception as exc:  # e.g. EngineDeadError -> 503
        raise to_api_error(exc) from None
    if last is None or not last.finished:
        raise ClientDisconnected  # closed before the engine finished it
    if last.error is not None:
        raise APIError(400, last.error, code="request_failed")
    return last


def usage(num_prompt_tokens: int, outputs: list[CompletionOutput]) -> dict:
    completion = sum(len(o.token_ids) for o in outputs)
    return {"prompt_tokens": num_prompt_tokens, "completion_tokens": completion,
            "total_tokens": num_prompt_tokens + completion}


def sse(data: dict | str) -> str:
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {payload}\n\n"


async def merge(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave several requests' outputs as they arrive, tagged with the stream's index."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream: RequestStream) -> None:
        try:
            async for out in stream:
                queue.put_nowait((i, out))
        except Exception as exc:  # hand it to the consumer, which re-raises it
            queue.put_nowait((i, exc))
        queue.put_nowait((i, None))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            i, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()


class ClientDisconnected(Exception):
    pass


async def _wait_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work` unless the client goes away first (then it is cancelled and this raises
    ClientDisconnected). The caller closes its streams, which aborts them in the engine."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_wait_disconnect(request.receive))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
    if task.done() and not task.cancelled():
        return task.result()
    raise ClientDisconnected


class SSEResponse(StreamingResponse):
    """Server-sent events that stop, and abort their requests, as soon as the client leaves.

    NOTE: Starlette's StreamingResponse, under ASGI spec 2.4, only notices a disconnect when a
    send fails, i.e. at the next token, and leaves the generator unclosed; a request waiting in
    the queue would never notice. Here a listener runs beside the sender, and `on_close` runs
    on every exit path, even if the event generator never started.
    """

    def __init__(self, events: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache"})
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as tg:

                async def stream() -> None:
                    try:
                        await self.stream_response(send)
                    except OSError:
                        pass  # the client went away during a send
                    tg.cancel_scope.cancel()

                async def listen() -> None:
                    await _wait_disconnect(receive)
                    tg.cancel_scope.cancel()

                tg.start_soon(stream)
                tg.start_soon(listen)
        finally:
            self._on_close()
            await self.body_iterator.aclose()
