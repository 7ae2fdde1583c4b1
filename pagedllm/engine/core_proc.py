"""The engine core's busy loop, behind two ZeroMQ sockets: its own process, or a thread.

    frontend  PUSH ──[type, payload]──▶ PULL  EngineCoreProc.run():
                                                drain inputs (block only when idle)
    frontend  PULL ◀── EngineCoreOutputs ── PUSH   step() → outputs + stats

One loop serves both placements: `pagedllm serve` runs it in a spawned process (the HTTP event
loop never shares an interpreter with a model step); `engine_core="thread"` runs it beside
the event loop (the one-process design, kept to measure against). Failures are never silent:
a core that cannot start, or whose step raises, sends a `dead` message with the reason before
it exits, and a core whose frontend dies is killed with it (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import time

import zmq

from pagedllm.config import EngineConfig, available_cpus
from pagedllm.engine.protocol import (
    EngineCoreOutput, EngineCoreOutputs, EngineCoreRequest, MsgpackDecoder, MsgpackEncoder,
    RequestType,
)
from pagedllm.logger import configure_process_logging

logger = logging.getLogger("pagedllm")

# An idle core says it is alive this often; the frontend declares it dead after a silence of
# its `engine_timeout_s` (a step, however long, is never expected to take that).
HEARTBEAT_S = 1.0

# What a frontend may call by name (utility requests); anything else is refused.
_UTILITIES = frozenset({"get_metrics", "check_integrity", "kv_snapshot"})


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent exits: no orphan survives a crash
    or a `kill -9` of the server. (Elsewhere the parent's own shutdown has to do.)"""
    parent = os.getppid()
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


class EngineCoreProc:
    def __init__(self, config: EngineConfig, eos_token_ids: set[int], input_addr: str,
                 output_addr: str) -> None:
        self.ctx = zmq.Context()
        self.input = self.ctx.socket(zmq.PULL)
        self.input.connect(input_addr)
        self.output = self.ctx.socket(zmq.PUSH)
        self.output.setsockopt(zmq.LINGER, 2000)
        self.output.connect(output_addr)
        self.encoder = MsgpackEncoder()
        self.request_decoder = MsgpackDecoder(EngineCoreRequest)
        self.any_decoder = MsgpackDecoder()
        self.core = None
        self._errors = []  # requests the core refused: sent with the next outputs
        try:
            from pagedllm.engine.core import EngineCore

            self.core = EngineCore(config, eos_token_ids)
        except BaseException as exc:
            logger.exception("the engine core failed to start")
            self.send(EngineCoreOutputs(dead=f"the engine core failed to start: {exc!r}"))
            self.close()
            raise
        self.send(EngineCoreOutputs(stats=self.core.get_metrics()))  # ready

    def send(self, outputs: EngineCoreOutputs) -> None:
        self.output.send(self.encoder.encode(outputs), copy=False)

    def run(self) -> None:
        """Serve until SHUTDOWN. A step that raises ends the core with a `dead` message."""
        core = self.core
        last_send = time.monotonic()
        try:
            while True:
                busy = core.has_unfinished_requests()
                # Idle: sleep in poll until a request (or the heartbeat) is due.
                timeout = 0 if busy else int(HEARTBEAT_S * 1000)
                while self.input.poll(timeout):
                    timeout = 0
                    if not self._handle(self.input.recv_multipart(copy=False)):
                        return
                outputs = self._errors
                self._errors = []
                if core.has_unfinished_requests():
                    outputs += core.step()
                now = time.monotonic()
                if outputs or now - last_send >= HEARTBEAT_S:
                    self.send(EngineCoreOutputs(outputs, stats=core.get_metrics()))
                    last_send = now
        except BaseException as exc:
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            logger.exception("the engine core died")
            self.send(EngineCoreOutputs(dead=f"the engine core died: {exc!r}"))
            raise

    def _handle(self, frames) -> bool:
        kind = RequestType(frames[0].bytes[0])
        payload = frames[1].buffer if len(frames) > 1 else b""
        if kind == RequestType.ADD:
            self._add(self.request_decoder.decode(payload))
        elif kind == RequestType.ABORT:
            self.core.abort_requests(self.any_decoder.decode(payload))
        elif kind == RequestType.FINISH_SEQS:
            self.core.finish_seqs([tuple(p) for p in self.any_decoder.decode(payload)])
        elif kind == RequestType.UTILITY:
            call_id, method, args = self.any_decoder.decode(payload)
            try:
                if method not in _UTILITIES:
                    raise ValueError(f"unknown utility call {method!r}")
                reply = (call_id, getattr(self.core, method)(*args), None)
            except Exception as exc:  # the caller gets the error; the core goes on
                reply = (call_id, None, repr(exc))
            self.send(EngineCoreOutputs(utility=reply))
        elif kind == RequestType.SHUTDOWN:
            return False
        return True

    def _add(self, req: EngineCoreRequest) -> None:
        try:
            self.core.add_request(req)
        except Exception as exc:  # a bad request fails alone (the frontend validated it)
            self._errors.append(EngineCoreOutput(req.request_id, finished=True, error=str(exc)))

    def close(self) -> None:
        if self.core is not None:
            self.core.shutdown()
        self.input.close(linger=0)
        self.output.close()
        self.ctx.term()


def run_engine_core(config: EngineConfig, eos_token_ids: set[int], input_addr: str,
                    output_addr: str, in_process: bool = True) -> None:
    """Entry point of the engine-core process (in_process=True) or thread."""
    if in_process:
        die_with_parent()
        # SIGINT goes to the whole process group on Ctrl-C: the frontend decides when the
        # core stops (SHUTDOWN, or SIGTERM from its shutdown path).
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(SystemExit(0)))
        # The serving command's --log-level, through PAGEDLLM_LOGGING_LEVEL.
        configure_process_logging(fmt="%(asctime)s %(levelname)s %(name)s[core]: %(message)s")
    if config.device == "cpu" and config.cpu_threads is None:
        # The frontend (HTTP, detokenization) runs beside this loop and needs a core of its
        # own: OpenMP threads that wait for a time slice would stall every step.
        threads = max(1, available_cpus() - 1)
        config = dataclasses.replace(config, cpu_threads=threads)
        logger.info("engine core: %d CPU thread(s) for model steps, one core left to the "
                    "frontend (set --cpu-threads to change)", threads)
    proc = None
    try:
        proc = EngineCoreProc(config, eos_token_ids, input_addr, output_addr)
        proc.run()
    except BaseException:
        if in_process:
            os._exit(1)  # the dead message is sent; skip interpreter teardown
        raise
    finally:
        if proc is not None and proc.core is not None:
            proc.close()
