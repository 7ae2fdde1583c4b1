"""AsyncLLM: the asyncio frontend. Each request is a RequestStream; the core runs elsewhere.

    event loop: add_request ── EngineCoreRequest (ZeroMQ) ──▶ engine core (process or thread)
    event loop: output task ◀── EngineCoreOutputs ── OutputProcessor ──▶ RequestStream queues

The event loop never runs a model step: by default the core is its own process
(`engine_core="process"`), so the server's Python (HTTP, JSON, detokenization) and the step
loop do not share a GIL. `engine_core="thread"` keeps the core in this process on a thread
(the one-interpreter design, kept to measure against). If the core dies or hangs, every open
request gets EngineDeadError, `is_healthy` turns False (/health: 503) and the core is stopped.

Each request leaves `_streams` one of three ways, and each counts it once in
`request_success_total{finished_reason}`: `_dispatch` (its final output: "stop"/"length", or
"error" if the core failed it), `abort` (the client closed the stream first: "abort") and
`_fail_all` (the core died or the engine stopped: "error").
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging

from pagedllm.config import EngineConfig
from pagedllm.engine.arg_utils import EngineArgs
from pagedllm.engine.core_client import AsyncMPClient, EngineDeadError
from pagedllm.engine.llm_engine import RequestValidator, eos_token_ids
from pagedllm.engine.output_processor import OutputProcessor
from pagedllm.metrics import ServingMetrics
from pagedllm.outputs import RequestOutput
from pagedllm.sampling_params import SamplingParams

logger = logging.getLogger("pagedllm")

__all__ = ["AsyncLLM", "EngineDeadError", "EngineDrainingError", "QueueFullError",
           "RequestStream"]


class QueueFullError(RuntimeError):
    """The request would wait beyond `max_waiting` requests or `max_queued_tokens` tokens
    (the server answers 429)."""


class EngineDrainingError(RuntimeError):
    """The server is shutting down: it finishes what it has and takes nothing new (503)."""


_CLOSED = object()  # put by RequestStream.close()


class RequestStream:
    """The outputs of one request, in order; `async for` ends after the finished one.

    Outputs are cumulative, so when the reader falls behind the engine (a busy server), the
    pending ones merge into one: the newest output, with the delta texts joined. A slow
    client then costs fewer, larger chunks instead of a growing backlog.

    `close()` is idempotent and safe at any time: if the engine has not finished the request,
    it aborts it, which frees its KV blocks in the core's next drain of its inputs.
    """

    def __init__(self, request_id: str, engine: AsyncLLM) -> None:
        self.request_id = request_id
        self._engine = engine
        self._items: collections.deque = collections.deque()
        self._ready = asyncio.Event()
        self._engine_done = False  # the final output (or an error) has been put
        self._consumed = False  # the consumer has seen it

    def put(self, item: RequestOutput | BaseException) -> None:
        if self._engine_done:
            return
        self._engine_done = isinstance(item, BaseException) or item.finished
        last = self._items[-1] if self._items else None
        if isinstance(item, RequestOutput) and isinstance(last, RequestOutput):
            self._items[-1] = _merge(last, item)
        else:
            self._items.append(item)
        self._ready.set()

    def close(self) -> None:
        if not self._engine_done:
            self._engine_done = True
            self._items.append(_CLOSED)  # wakes a reader still waiting: iteration ends
            self._ready.set()
            self._engine.abort(self.request_id)

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._consumed:
            raise StopAsyncIteration
        while not self._items:
            self._ready.clear()
            await self._ready.wait()
        item = self._items.popleft()
        if item is _CLOSED:
            self._consumed = True
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            self._consumed = True
            raise item
        self._consumed = item.finished
        return item


def _merge(old: RequestOutput, new: RequestOutput) -> RequestOutput:
    """Two pending cumulative outputs of one request as one: the newer, whose delta texts
    start where the older's began."""
    deltas = {o.index: o.delta_text for o in old.outputs}
    for o in new.outputs:
        o.delta_text = deltas.pop(o.index, "") + o.delta_text
    return new


def _finished_reason(out: RequestOutput) -> str:
    """How a finished request ended, counted once however many sequences it has: "error" if
    the core failed it, else "stop" if any sequence stopped (EOS, stop token or string), else
    "length" if any hit max_tokens or the context, else "abort"."""
    if out.error is not None:
        return "error"
    reasons = [o.finish_reason for o in out.outputs]
    if "stop" in reasons:
        return "stop"
    return "length" if "length" in reasons else "abort"


class AsyncLLM:
    """Serve the engine to asyncio code: `stream = await add_request(...)`, `async for`.

    Admission control counts the real queue: with `max_waiting` (requests) or
    `max_queued_tokens` (prompt tokens) set, the core refuses a new request that would still
    wait after the step that first sees it beyond either limit (Scheduler._control_admission),
    and `add_request` returns only once the core kept it, or raises QueueFullError: a server
    answers 429 before sending any header. Requests that fit a free slot are never refused.
    """

    def __init__(self, config: EngineConfig, tokenizer, engine_core: str = "process",
                 max_waiting: int | None = None, max_queued_tokens: int | None = None,
                 engine_timeout_s: float | None = None) -> None:
        if engine_core not in ("process", "thread"):
            raise ValueError(f"engine_core must be 'process' or 'thread', got {engine_core!r}")
        config = dataclasses.replace(config, scheduler=dataclasses.replace(
            config.scheduler, max_waiting=max_waiting, max_queued_tokens=max_queued_tokens))
        self._admission_control = max_waiting is not None or max_queued_tokens is not None
        self._admissions: dict[str, asyncio.Future] = {}  # sent, not yet kept or refused
        self.config = config
        self.tokenizer = tokenizer
        self.validator = RequestValidator(config, tokenizer)
        self.max_model_len = config.model.max_model_len
        self.vocab_size = config.model.hf_config.vocab_size
        self.output_processor = OutputProcessor(tokenizer)
        kwargs = {} if engine_timeout_s is None else {"engine_timeout_s": engine_timeout_s}
        self.client = AsyncMPClient(config, eos_token_ids(tokenizer, config.model.hf_config),
                                    placement=engine_core, **kwargs)
        self.metrics = ServingMetrics(self.get_metrics, lambda: self.is_healthy)
        self.stats = {"num_requests_finished_total": 0}
        self._streams: dict[str, RequestStream] = {}
        self._dead: BaseException | None = None
        self._stopping = False
        self._draining = False
        self._reader: asyncio.Task | None = None

    @classmethod
    def from_engine_args(cls, args: EngineArgs, **kwargs) -> AsyncLLM:
        from pagedllm.loader import load_tokenizer

        config = args.create_engine_config()
        return cls(config, load_tokenizer(config.model.model, config.model.load_format),
                   **kwargs)

    # ---- lifecycle (event loop) ------------------------------------------------------------
    def start(self) -> None:
        self._reader = asyncio.get_running_loop().create_task(self._output_loop())

    def stop(self) -> None:
        """Stop the core (it is not restarted); open requests fail with EngineDeadError."""
        self._stopping = True
        if self._reader is not None:
            self._reader.cancel()
        self.client.shutdown()
        self._fail_all(EngineDeadError("the engine was shut down"))

    shutdown = stop

    def drain(self, timeout_s: float) -> None:
        """Begin a graceful shutdown: refuse new requests (EngineDrainingError), let open ones
        finish for up to `timeout_s`, then end the rest with an error (their blocks freed)."""
        if self._draining:
            return
        self._draining = True
        logger.info("shutting down: %d open request(s) get up to %.0f s to finish",
                    len(self._streams), timeout_s)
        asyncio.get_running_loop().call_later(timeout_s, self._abort_open)

    @property
    def is_draining(self) -> bool:
        """A graceful shutdown began (drain()): endless streams (the dashboard's) end now."""
        return self._draining

    def _abort_open(self) -> None:
        if not self._streams:
            return
        logger.warning("shutdown timeout: aborting %d open request(s)", len(self._streams))
        error = EngineDeadError("the server is shutting down; the request was aborted")
        self._fail_admissions(error)
        for request_id, stream in list(self._streams.items()):
            stream.put(error)
            self.abort(request_id)  # frees its blocks in the core

    @property
    def is_healthy(self) -> bool:
        return (self._dead is None and not self._stopping and self.client.is_alive()
                and self._reader is not None and not self._reader.done())

    def get_metrics(self) -> dict:
        """The core's counters as of its last report, with the frontend's own."""
        return {**self.client.stats, **self.stats}

    async def check_integrity(self) -> bool:
        """The core's block pool invariants hold (raises if not)."""
        return await self.client.call_utility_async("check_integrity")

    async def get_kv_snapshot(self) -> dict:
        """The core's block pools, queues and counters now (engine/kv_snapshot.py)."""
        return await self.client.call_utility_async("kv_snapshot")

    async def get_core_metrics(self) -> dict:
        """The core's counters now (a round trip), not as of its last report."""
        return await self.client.call_utility_async("get_metrics")

    # ---- requests (event loop) -------------------------------------------------------------
    async def add_request(self, request_id: str, prompt_token_ids: list[int],
                          params: SamplingParams, prompt: str | None = None,
                          arrival_time: float | None = None, priority: int = 0,
                          cache_salt: str | None = None, user: str | None = None
                          ) -> RequestStream:
        """Queue a request. Raises ValueError for bad input, QueueFullError, or
        EngineDeadError; in each case nothing is left queued (a caller cancelled while the
        core decides aborts the request)."""
        self._check_alive()
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        req = self.validator.make_request(request_id, prompt, params, prompt_token_ids,
                                          priority, arrival_time, cache_salt, user)
        stream = RequestStream(request_id, self)
        self._streams[request_id] = stream
        self.output_processor.add_request(req, prompt, params)
        admitted = None
        if self._admission_control:
            admitted = self._admissions[request_id] = asyncio.get_running_loop().create_future()
        self.client.add_request(req)
        if admitted is not None:
            try:
                await admitted
            except BaseException:
                self.abort(request_id, counted=False)
                raise
        return stream

    def _admit(self, out) -> bool:
        """Settle a request's admission from the core's marker or refusal; True if `out`
        was one (it carries nothing for the stream)."""
        if not (out.admitted or out.queue_full):
            return False
        future = self._admissions.pop(out.request_id, None)
        if out.queue_full:
            self._streams.pop(out.request_id, None)
            self.output_processor.abort_request(out.request_id)
        if future is not None and not future.done():
            if out.queue_full:
                future.set_exception(QueueFullError(out.error))
            else:
                future.set_result(None)
        return True

    def abort(self, request_id: str, counted: bool = True) -> None:
        """Stop a request; unknown or finished ids are ignored."""
        future = self._admissions.pop(request_id, None)
        if future is not None:
            future.cancel()
        if self._streams.pop(request_id, None) is not None and counted:
            self.metrics.count_finished("abort")
        self.output_processor.abort_request(request_id)
        if self._dead is None and not self._stopping:
            self.client.abort_requests([request_id])

    def _check_alive(self) -> None:
        if self._dead is not None:
            raise EngineDeadError(f"the engine core is dead: {self._dead}")
        if self._reader is None or self._stopping:
            raise EngineDeadError("the engine is not running")
        if self._draining:
            raise EngineDrainingError("the server is shutting down; retry on another replica "
                                      "or after it restarts")

    # ---- outputs (a task on the event loop) ------------------------------------------------
    async def _output_loop(self) -> None:
        client = self.client
        try:
            while True:
                for msg in await client.get_output_async(busy=bool(self._streams)):
                    outputs = [o for o in msg.outputs if not self._admit(o)]
                    if not outputs:
                        continue
                    processed = self.output_processor.process_outputs(outputs)
                    client.abort_requests(processed.abort)
                    client.finish_seqs(processed.finish_seqs)
                    self._dispatch(processed.request_outputs)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            if not isinstance(exc, EngineDeadError):
                logger.exception("the engine's output loop failed")
            else:
                logger.error("%s", exc)
            self._dead = exc
            client.fail_calls(EngineDeadError(str(exc)))
            self._fail_all(exc if isinstance(exc, EngineDeadError)
                           else EngineDeadError(f"the engine's output loop failed: {exc!r}"))
            client.shutdown(graceful=False)  # a dead or hung core gets no second chance

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue  # aborted by the client while this step ran
            if out.finished:
                del self._streams[out.request_id]
                self.metrics.count_finished(_finished_reason(out))
                if out.error is None:
                    self.stats["num_requests_finished_total"] += 1
                    self.metrics.observe_finished(out)
            stream.put(out)

    def _fail_all(self, exc: BaseException) -> None:
        self._fail_admissions(exc)
        for request_id, stream in list(self._streams.items()):
            stream.put(exc)
            self.output_processor.abort_request(request_id)
            self.metrics.count_finished("error")
        self._streams.clear()

    def _fail_admissions(self, exc: BaseException) -> None:
        for future in self._admissions.values():
            if not future.done():
                future.set_exception(exc)
        self._admissions.clear()
