"""The tensor-parallel driver: rank 0 in the engine-core process, ranks 1.. elsewhere.

Subclasses only start, watch and kill the other ranks (processes: multiproc.py; Ray actors:
ray.py); everything a step does is here and in worker/worker.py:

  start-up  listen for commands' connections -> start ranks 1.. -> accept them -> join the
            torch.distributed group (rank 0 too) -> load every shard -> wait for "ready"
  a step    plan on the host (StepPlan) -> send it to ranks 1.. -> every rank runs it -> rank 0
            samples. A rank that dies mid-step closes its gloo sockets, so rank 0's collective
            raises at once; a hung one fails it after PAGEDLLM_TP_TIMEOUT_S.
"""

from __future__ import annotations

import logging
import os
import pickle
import secrets
import socket
import threading
import time
from contextlib import contextmanager
from multiprocessing.connection import Connection, Listener, wait

import torch

from pagedllm.config import EngineConfig, threads_per_rank
from pagedllm.distributed.parallel_state import destroy_distributed
from pagedllm.executor.base import Executor, ModelRunnerOutput
from pagedllm.worker.worker import WorkerInit, determine_num_blocks, init_rank

logger = logging.getLogger(__name__)

# Bound on one collective: generous, since the first step may build kernels on one rank while
# the others wait; a dead rank is noticed at once regardless (see the module docstring).
TIMEOUT_S = float(os.environ.get("PAGEDLLM_TP_TIMEOUT_S", "120"))
_POLL_S = 0.1


class DistributedExecutor(Executor):
    """Rank 0 (the driver) runs here; subclasses start ranks 1.. from their WorkerInit."""

    host = "127.0.0.1"  # where ranks 1.. reach rank 0 (Ray: this node's address)

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.tp = config.parallel.tensor_parallel_size
        self._conns: dict[int, Connection] = {}
        self._ready: set[int] = set()
        self.pids: dict[int, int] = {0: os.getpid()}  # rank -> pid, as each rank connects
        self._failed: str | None = None
        self._closed = False
        self._threads = torch.get_num_threads()
        # CPU: the ranks share the cores; each gets its part, as threads of one process would.
        num_threads = threads_per_rank(config) if config.device == "cpu" else None
        authkey = secrets.token_bytes(16)
        self._listener = Listener((self.host, 0), authkey=authkey)
        init_method = f"tcp://{self.host}:{_free_port(self.host)}"
        inits = [WorkerInit(config, r, self._device_index(r), init_method,
                            self._listener.address, authkey, TIMEOUT_S, num_threads)
                 for r in range(1, self.tp)]
        try:
            self._start_workers(inits)
            self._accept(len(inits))
            self.runner = init_rank(WorkerInit(config, 0, 0, init_method, self._listener.address,
                                               authkey, TIMEOUT_S, num_threads))
            self._wait_ready()
        except BaseException:
            self.shutdown()
            raise
        self.device = self.runner.device

    # ---- what subclasses provide -----------------------------------------------------------
    def _device_index(self, rank: int) -> int:
        return rank

    def _start_workers(self, inits: list[WorkerInit]) -> None:
        raise NotImplementedError

    def _dead_workers(self) -> dict[int, str]:
        """rank -> why it is gone (exit code, actor error) for every rank not running."""
        raise NotImplementedError

    def _stop_workers(self, timeout_s: float) -> None:
        """Wait up to timeout_s for ranks that were told to exit, then kill the rest."""
        raise NotImplementedError

    # ---- the executor surface ----------------------------------------------------------------
    def block_bytes(self) -> int:
        return self.runner.block_bytes()

    def determine_num_blocks(self) -> int:
        with self._collective():
            self._send(("num_blocks",))
            return determine_num_blocks(self.runner)

    def init_cache(self, num_blocks: int, num_cpu_blocks: int) -> None:
        with self._collective():
            self._send(("init_cache", num_blocks, num_cpu_blocks))
            self.runner.init_cache(num_blocks, num_cpu_blocks)

    def execute_model(self, out, sampling, sample_from, prompt_logprobs=None
                      ) -> ModelRunnerOutput:
        plan = self.runner.plan_step(out, sampling, sample_from, prompt_logprobs)
        with self._collective():
            self._send(("step", plan))
            result, rows = self.runner.execute_plan(plan, out, sampling, prompt_logprobs)
        return ModelRunnerOutput(result, rows)

    def launch(self, out, sampling, sample_from, from_device):
        # Every rank must run the same input ids, so the fed ids go through the host.
        plan = self.runner.plan_step(out, sampling, sample_from)
        self.runner.feed_on_host(plan, from_device)
        with self._collective():
            self._send(("step", plan))
            return self.runner.launch_plan(plan, sampling, [])

    def collect(self, handle) -> list[int]:
        return self.runner.collect(handle)

    def check_health(self) -> None:
        if self._closed:
            raise RuntimeError("the executor was shut down")
        self._read_errors()
        dead = self._dead_workers()
        if dead:
            rank, why = min(dead.items())
            self._failed = self._failed or f"tensor-parallel rank {rank} is gone ({why})"
        if self._failed:
            raise RuntimeError(self._failed)

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        for conn in self._conns.values():
            try:
                conn.send_bytes(pickle.dumps(None))
            except OSError:
                pass  # already gone
        try:
            self._stop_workers(timeout_s=5.0)
        finally:
            for conn in self._conns.values():
                conn.close()
            self._listener.close()
            destroy_distributed()
            torch.set_num_threads(self._threads)

    # ---- helpers -------------------------------------------------------------------------------
    def _send(self, msg) -> None:
        payload = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)  # once for every rank
        for conn in self._conns.values():
            conn.send_bytes(payload)

    @contextmanager
    def _collective(self):
        """Around work that every rank joins: refuse after a failure, and turn a failure into
        an error that names the rank that caused it."""
        self.check_health()
        try:
            yield
        except Exception as e:
            # Give the dead rank's exit a moment to show in the process table.
            deadline = time.monotonic() + 2.0
            while not self._dead_workers() and time.monotonic() < deadline:
                time.sleep(_POLL_S)
            self._read_errors()
            dead = self._dead_workers()
            why = f"tensor-parallel rank {min(dead)} is gone ({dead[min(dead)]})" if dead \
                else f"a tensor-parallel step failed: {e}"
            self._failed = self._failed or why
            raise RuntimeError(self._failed) from e

    def _read_errors(self) -> None:
        """Read what ranks 1.. sent: "ready" once loaded, or their traceback before exiting
        (the first one is kept)."""
        for rank, conn in list(self._conns.items()):
            try:
                while conn.poll():
                    kind, _, detail = conn.recv()
                    if kind == "ready":
                        self._ready.add(rank)
                    elif kind == "error" and not self._failed:
                        self._failed = f"tensor-parallel rank {rank} failed:\n{detail}"
            except (EOFError, OSError):
                continue

    def _accept(self, n: int) -> None:
        """Accept ranks 1..'s connections, watching them: accept() alone would wait forever
        for a rank that died before connecting."""
        def accept() -> None:
            for _ in range(n):
                conn = self._listener.accept()
                _, rank, pid = conn.recv()
                self._conns[rank], self.pids[rank] = conn, pid

        thread = threading.Thread(target=accept, daemon=True, name="pagedllm-tp-accept")
        thread.start()
        deadline = time.monotonic() + TIMEOUT_S
        while thread.is_alive():
            thread.join(_POLL_S)
            self.check_health()
            if time.monotonic() > deadline:
                raise RuntimeError(f"tensor-parallel ranks did not connect in {TIMEOUT_S:.0f} s "
                                   f"(connected: {sorted(self._conns)})")

    def _wait_ready(self) -> None:
        """Every rank loaded its shard (no deadline: a large model loads for minutes)."""
        while len(self._ready) < len(self._conns):
            wait(list(self._conns.values()), timeout=_POLL_S)
            self.check_health()  # reads "ready" and "error" messages


def _free_port(host: str) -> int:
    # NOTE: the port is free now, not certainly when the group binds it; rare, and start-up
    # then fails with an address-in-use error rather than anything subtle.
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
