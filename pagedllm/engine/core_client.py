"""How a frontend talks to the engine core: directly, or over ZeroMQ to a process or thread.

    InprocClient    calls EngineCore in the caller's thread (tests, offline runs, no IPC)
    SyncMPClient    the core in a spawned process (or a thread); blocking reads (LLM)
    AsyncMPClient   the same with asyncio reads (AsyncLLM, the server)

A core that dies or falls silent past `engine_timeout_s` raises EngineDeadError in every
reader: nothing waits forever on a core that is gone.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing
import multiprocessing.connection
import os
import tempfile
import threading
import time
import uuid
import weakref

import zmq
import zmq.asyncio

from pagedllm.config import EngineConfig
from pagedllm.engine.protocol import (
    EngineCoreOutputs, EngineCoreRequest, MsgpackDecoder, MsgpackEncoder, RequestType,
)

logger = logging.getLogger("pagedllm")

# Silence after which a core with open requests counts as hung (no step takes this long).
ENGINE_TIMEOUT_S = float(os.environ.get("PAGEDLLM_ENGINE_ITERATION_TIMEOUT_S", "60"))
_POLL_MS = 200


class EngineDeadError(RuntimeError):
    """The engine core is gone (crashed, killed or hung); no request can be served."""


class InprocClient:
    """The core in this thread: every call is a method call; step() runs one step."""

    def __init__(self, config: EngineConfig, eos_token_ids: set[int]) -> None:
        from pagedllm.engine.core import EngineCore

        self.core = EngineCore(config, eos_token_ids)

    def add_request(self, req: EngineCoreRequest) -> None:
        self.core.add_request(req)

    def abort_requests(self, request_ids: list[str]) -> None:
        if request_ids:
            self.core.abort_requests(request_ids)

    def finish_seqs(self, seqs: list[tuple[str, int]]) -> None:
        if seqs:
            self.core.finish_seqs(seqs)

    def get_output(self) -> EngineCoreOutputs:
        outputs = self.core.step() if self.core.has_unfinished_requests() else []
        return EngineCoreOutputs(outputs)

    def call_utility(self, method: str, *args):
        return getattr(self.core, method)(*args)

    def is_alive(self) -> bool:
        return True

    def shutdown(self) -> None:
        self.core.shutdown()


class _CoreHandle:
    """Starts the core (a spawned process, or a thread), binds the two sockets and waits for
    its ready message. Owns their teardown: `close()` or garbage collection stops the core."""

    def __init__(self, config: EngineConfig, eos_token_ids: set[int], placement: str,
                 engine_timeout_s: float) -> None:
        from pagedllm.engine.core_proc import run_engine_core

        assert placement in ("process", "thread"), placement
        self.placement = placement
        self.engine_timeout_s = engine_timeout_s
        self.ctx = zmq.Context()
        base = os.path.join(tempfile.gettempdir(), f"pagedllm-{uuid.uuid4().hex[:12]}")
        self.paths = [base + "-in", base + "-out"]
        self.input = self.ctx.socket(zmq.PUSH)
        self.input.bind(f"ipc://{self.paths[0]}")
        self.output = self.ctx.socket(zmq.PULL)
        self.output.bind(f"ipc://{self.paths[1]}")
        args = (config, set(eos_token_ids), f"ipc://{self.paths[0]}", f"ipc://{self.paths[1]}",
                placement == "process")
        if placement == "process":
            self.worker = multiprocessing.get_context("spawn").Process(
                target=run_engine_core, args=args, name="pagedllm-engine-core")
        else:
            self.worker = threading.Thread(target=_thread_main, args=args,
                                           name="pagedllm-engine-core", daemon=True)
        self.worker.start()
        self._finalizer = weakref.finalize(self, _stop, self.worker, self.input, self.output,
                                           self.ctx, self.paths)
        self.dead: str | None = None
        self.last_seen = time.monotonic()
        ready = self._wait_ready()
        self.stats: dict = ready.stats or {}

    def _wait_ready(self) -> EngineCoreOutputs:
        decoder = MsgpackDecoder(EngineCoreOutputs)
        while True:
            if self.output.poll(_POLL_MS):
                msg = decoder.decode(self.output.recv())
                if msg.dead:
                    self.close()
                    raise RuntimeError(msg.dead)
                return msg
            if not self._worker_alive():
                self.close()
                raise RuntimeError(f"the engine core {self.placement} exited while starting "
                                   f"(exit code {getattr(self.worker, 'exitcode', None)}); "
                                   "see its log above")

    def is_alive(self) -> bool:
        return self.dead is None and self._worker_alive()

    def _worker_alive(self) -> bool:
        if isinstance(self.worker, threading.Thread):
            return self.worker.is_alive()
        # NOTE: not Process.is_alive(): it relies on waitpid, which says "alive" forever
        # once anything else in this process has reaped the child. The sentinel is a pipe
        # the child holds open until it exits, however it exits.
        return not multiprocessing.connection.wait([self.worker.sentinel], timeout=0)

    def check(self, busy: bool) -> None:
        """Raise EngineDeadError if the core is gone, or silent for too long while busy."""
        if self.dead is None and not self._worker_alive():
            code = getattr(self.worker, "exitcode", None)
            self.dead = f"the engine core {self.placement} exited (exit code {code})"
        elif self.dead is None and busy and \
                time.monotonic() - self.last_seen > self.engine_timeout_s:
            self.dead = (f"the engine core sent nothing for {self.engine_timeout_s:.0f} s "
                         "(hung); it was stopped")
            self.close(graceful=False)
        if self.dead is not None:
            raise EngineDeadError(self.dead)

    def send(self, kind: RequestType, payload: bytes = b"") -> None:
        if self.dead is not None:
            raise EngineDeadError(self.dead)
        self.input.send_multipart((bytes([kind]), payload), copy=False)

    @property
    def pid(self) -> int | None:
        return getattr(self.worker, "pid", None)

    def close(self, graceful: bool = True) -> None:
        """Stop the core: ask it to finish (graceful), or kill it at once (it is hung)."""
        if not graceful and isinstance(self.worker, multiprocessing.process.BaseProcess):
            self.worker.kill()
        self._finalizer()


def _thread_main(*args) -> None:
    from pagedllm.engine.core_proc import run_engine_core

    try:
        run_engine_core(*args)
    except BaseException:
        pass  # already logged and reported as a dead message


def _stop(worker, input_sock, output_sock, ctx, paths) -> None:
    """Ask the core to stop, then make sure it did (terminate, then kill)."""
    try:
        if worker.is_alive():
            input_sock.send_multipart((bytes([RequestType.SHUTDOWN]), b""))
            worker.join(10)
        if isinstance(worker, multiprocessing.process.BaseProcess) and worker.is_alive():
            worker.terminate()
            worker.join(5)
            if worker.is_alive():
                worker.kill()
                worker.join(5)
    finally:
        input_sock.close(linger=0)
        output_sock.close(linger=0)
        ctx.term()
        for path in paths:
            if os.path.exists(path):
                os.unlink(path)


class _MPClientBase:
    def __init__(self, config: EngineConfig, eos_token_ids: set[int], placement: str = "process",
                 engine_timeout_s: float = ENGINE_TIMEOUT_S) -> None:
        self.handle = _CoreHandle(config, eos_token_ids, placement, engine_timeout_s)
        self.encoder = MsgpackEncoder()
        self.decoder = MsgpackDecoder(EngineCoreOutputs)
        self._call_ids = itertools.count()

    @property
    def stats(self) -> dict:
        return self.handle.stats

    def add_request(self, req: EngineCoreRequest) -> None:
        self.handle.send(RequestType.ADD, self.encoder.encode(req))

    def abort_requests(self, request_ids: list[str]) -> None:
        if request_ids and self.handle.is_alive():
            self.handle.send(RequestType.ABORT, self.encoder.encode(request_ids))

    def finish_seqs(self, seqs: list[tuple[str, int]]) -> None:
        if seqs and self.handle.is_alive():
            self.handle.send(RequestType.FINISH_SEQS, self.encoder.encode(seqs))

    def is_alive(self) -> bool:
        return self.handle.is_alive()

    def _decode(self, frame) -> EngineCoreOutputs:
        msg = self.decoder.decode(frame)
        self.handle.last_seen = time.monotonic()
        if msg.stats is not None:
            self.handle.stats = msg.stats
        if msg.dead is not None:
            self.handle.dead = msg.dead
            raise EngineDeadError(msg.dead)
        return msg

    def shutdown(self, graceful: bool = True) -> None:
        self.handle.close(graceful)


class SyncMPClient(_MPClientBase):
    """Blocking reads: get_output() returns the core's next outputs."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._backlog: list[EngineCoreOutputs] = []  # outputs read while waiting on a utility

    def get_output(self) -> EngineCoreOutputs:
        if self._backlog:
            return self._backlog.pop(0)
        while True:
            msg = self._recv()
            if msg.utility is None:
                return msg

    def _recv(self) -> EngineCoreOutputs:
        while not self.handle.output.poll(_POLL_MS):
            self.handle.check(busy=True)
        return self._decode(self.handle.output.recv(copy=False).buffer)

    def call_utility(self, method: str, *args):
        call_id = next(self._call_ids)
        self.handle.send(RequestType.UTILITY, self.encoder.encode((call_id, method, args)))
        while True:
            msg = self._recv()
            if msg.utility is None:
                if msg.outputs:
                    self._backlog.append(msg)
                continue
            got_id, result, error = msg.utility
            if got_id == call_id:
                if error is not None:
                    raise RuntimeError(f"engine core {method}() failed: {error}")
                return result


class AsyncMPClient(_MPClientBase):
    """asyncio reads: `await get_output_async()`; utility calls are awaited by id."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._aout = zmq.asyncio.Socket.shadow(self.handle.output.underlying)
        self._calls: dict[int, asyncio.Future] = {}

    async def get_output_async(self, busy: bool) -> list[EngineCoreOutputs]:
        """Every message the core has sent, or [] after a poll interval with none (liveness
        checked then).

        NOTE: reads until the socket is empty. ZeroMQ's file descriptor signals a change of
        state, not each message: a reader that takes one message per wake-up can leave the
        rest unseen until its poll times out."""
        if not await self._aout.poll(_POLL_MS):
            self.handle.check(busy)
            return []
        msgs = []
        while True:
            try:
                frame = self.handle.output.recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return msgs
            msg = self._decode(frame.buffer)
            if msg.utility is not None:
                self._reply(msg.utility)
            msgs.append(msg)

    def _reply(self, utility: tuple) -> None:
        call_id, result, error = utility
        fut = self._calls.pop(call_id, None)
        if fut is not None and not fut.done():
            if error is None:
                fut.set_result(result)
            else:
                fut.set_exception(RuntimeError(f"engine core utility failed: {error}"))

    async def call_utility_async(self, method: str, *args):
        """Needs the output reader (AsyncLLM's) running to deliver the reply."""
        call_id = next(self._call_ids)
        fut = asyncio.get_running_loop().create_future()
        self._calls[call_id] = fut
        self.handle.send(RequestType.UTILITY, self.encoder.encode((call_id, method, args)))
        return await fut

    def fail_calls(self, exc: BaseException) -> None:
        for fut in self._calls.values():
            if not fut.done():
                fut.set_exception(exc)
        self._calls.clear()
