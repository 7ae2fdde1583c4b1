"""AsyncLLMEngine: the engine on one background thread, each request an asyncio stream.

LLMEngine is not thread-safe, so exactly one thread ever touches it: the step loop. The event
loop talks to that thread through two one-way channels, and nothing else is shared:

    event loop ── inbox: _Add / _Abort (a deque) ──▶ step-loop thread: drain inbox, step()
    event loop ◀── loop.call_soon_threadsafe(_dispatch, outputs) ── step-loop thread

Every request owns a RequestStream (an asyncio.Queue) that only the event loop reads and writes,
so HTTP handlers stay responsive while a step runs. If the step loop dies, every pending and
future request gets EngineDeadError and `is_healthy` turns False (the server's /health: 503).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
from dataclasses import dataclass

from pagedllm.engine.llm_engine import LLMEngine
from pagedllm.metrics import ServingMetrics
from pagedllm.outputs import RequestOutput
from pagedllm.sampling_params import SamplingParams

logger = logging.getLogger("pagedllm")

# How long an idle step loop sleeps before looking at the inbox again; add/abort wake it early.
_IDLE_WAIT_S = 1.0


class EngineDeadError(RuntimeError):
    """The step loop crashed; no request can be served any more."""


class QueueFullError(RuntimeError):
    """The waiting queue already holds `max_waiting` requests (the server answers 429)."""


@dataclass(slots=True)
class _Add:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float | None
    done: asyncio.Future  # resolved on the event loop: None, or the exception add raised


@dataclass(slots=True)
class _Abort:
    request_id: str


_CLOSED = object()  # put by RequestStream.close()


class RequestStream:
    """The outputs of one request, in order; `async for` ends after the finished one.

    `close()` is idempotent and safe at any time: if the engine has not finished the request,
    it aborts it, which frees its KV blocks at the next drain of the inbox (within one step).
    """

    def __init__(self, request_id: str, engine: AsyncLLMEngine) -> None:
        self.request_id = request_id
        self._engine = engine
        self._queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._engine_done = False  # the final output (or an error) has been put
        self._consumed = False  # the consumer has seen it

    def put(self, item: RequestOutput | BaseException) -> None:
        if self._engine_done:
            return
        self._engine_done = isinstance(item, BaseException) or item.finished
        self._queue.put_nowait(item)

    def close(self) -> None:
        if not self._engine_done:
            self._engine_done = True
            self._queue.put_nowait(_CLOSED)  # wakes a reader still waiting: iteration ends
            self._engine.abort(self.request_id)

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._consumed:
            raise StopAsyncIteration
        item = await self._queue.get()
        if item is _CLOSED:
            self._consumed = True
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            self._consumed = True
            raise item
        self._consumed = item.finished
        return item


class AsyncLLMEngine:
    """Serve an LLMEngine to asyncio code: `stream = await add_request(...)`, `async for`.

    `max_waiting`: reject a new request (QueueFullError) while the engine's waiting queue
    already holds that many requests; None means no limit.
    """

    def __init__(self, engine: LLMEngine, max_waiting: int | None = None) -> None:
        self.engine = engine
        self.max_waiting = max_waiting
        self.metrics = ServingMetrics(self.get_metrics)
        self._inbox: collections.deque[_Add | _Abort] = collections.deque()
        self._wakeup = threading.Event()
        self._stopping = False
        self._dead: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # Event-loop-side state (never touched by the step-loop thread).
        self._streams: dict[str, RequestStream] = {}
        self._pending_adds: set[asyncio.Future] = set()
        # Written by the step-loop thread after every step, read by scrapes: a dict swap is atomic.
        self._stats: dict = engine.get_metrics()

    # ---- lifecycle (event loop) ------------------------------------------------------------
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="pagedllm-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping = True
        self._wakeup.set()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def is_healthy(self) -> bool:
        return self._dead is None and self._thread is not None and self._thread.is_alive()

    def get_metrics(self) -> dict:
        """`LLMEngine.get_metrics()` as of the last step (safe to call from any thread)."""
        return self._stats

    # ---- requests (event loop) -------------------------------------------------------------
    async def add_request(self, request_id: str, prompt_token_ids: list[int],
                          params: SamplingParams, prompt: str | None = None,
                          arrival_time: float | None = None) -> RequestStream:
        """Queue a request; returns once the engine accepted it.

        Raises what the engine's add_request raised (ValueError for bad input), QueueFullError,
        or EngineDeadError; in each case nothing is left queued.
        """
        self._check_alive()
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        stream = RequestStream(request_id, self)
        self._streams[request_id] = stream
        done = self._loop.create_future()
        self._pending_adds.add(done)
        self._post_to_engine(_Add(request_id, prompt, prompt_token_ids, params, arrival_time, done))
        try:
            await done
        except asyncio.CancelledError:
            # The add may still land after we stop waiting for it; the abort queued behind it
            # (inbox order is kept) undoes it.
            self._streams.pop(request_id, None)
            self._post_to_engine(_Abort(request_id))
            raise
        except BaseException:
            self._streams.pop(request_id, None)
            raise
        finally:
            self._pending_adds.discard(done)
        return stream

    def abort(self, request_id: str) -> None:
        """Stop a request; unknown or finished ids are ignored."""
        self._streams.pop(request_id, None)
        if self._dead is None:
            self._post_to_engine(_Abort(request_id))

    def _check_alive(self) -> None:
        if self._dead is not None:
            raise EngineDeadError(f"the engine step loop died: {self._dead!r}")
        if self._thread is None or self._stopping:
            raise EngineDeadError("the engine is not running")

    def _post_to_engine(self, cmd: _Add | _Abort) -> None:
        self._inbox.append(cmd)
        self._wakeup.set()

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue  # aborted by the client while this step ran
            if out.finished:
                del self._streams[out.request_id]
                if out.error is None:
                    self.metrics.observe_finished(out)
            stream.put(out)

    def _fail_all(self, exc: BaseException) -> None:
        error = EngineDeadError(f"the engine step loop died: {exc!r}")
        for stream in self._streams.values():
            stream.put(error)
        self._streams.clear()
        for done in self._pending_adds:
            if not done.done():
                done.set_exception(error)

    # ---- the step loop (its own thread) ----------------------------------------------------
    def _run(self) -> None:
        engine = self.engine
        try:
            while not self._stopping:
                # Clear before draining: an add that lands after the drain sets it again, so
                # the wait below returns at once instead of sleeping on a queued request.
                self._wakeup.clear()
                self._drain_inbox()
                if not engine.has_unfinished_requests():
                    self._stats = engine.get_metrics()
                    self._wakeup.wait(_IDLE_WAIT_S)
                    continue
                outputs = engine.step()
                self._stats = engine.get_metrics()
                if outputs:
                    self._post_to_loop(self._dispatch, outputs)
        except BaseException as exc:
            logger.exception("the engine step loop died")
            self._dead = exc
            self._post_to_loop(self._fail_all, exc)

    def _drain_inbox(self) -> None:
        engine = self.engine
        while self._inbox:
            cmd = self._inbox.popleft()
            if isinstance(cmd, _Abort):
                engine.abort_request(cmd.request_id)
                continue
            error: BaseException | None = None
            try:
                if self.max_waiting is not None and len(engine.scheduler.waiting) >= self.max_waiting:
                    raise QueueFullError(
                        f"the server is busy: the waiting queue is full ("
                        f"{len(engine.scheduler.waiting)} waiting, max_waiting="
                        f"{self.max_waiting}); retry later")
                engine.add_request(cmd.request_id, cmd.prompt, cmd.params, cmd.prompt_token_ids,
                                   arrival_time=cmd.arrival_time)
            except Exception as exc:  # a bad request must not take the loop down
                error = exc
            self._post_to_loop(_resolve, cmd.done, error)

    def _post_to_loop(self, fn, *args) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:
            pass  # the event loop is closed: the server is shutting down


def _resolve(done: asyncio.Future, error: BaseException | None) -> None:
    if done.done():
        return  # the waiter was cancelled
    if error is None:
        done.set_result(None)
    else:
        done.set_exception(error)
