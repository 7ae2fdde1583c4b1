"""One tensor-parallel rank: join the group, load this rank's shard, then run what rank 0 sends.

  rank 0 (the driver, inside the engine-core process)       rank r > 0 (a process or Ray actor)
    plan_step(SchedulerOutput) -> StepPlan (host only)
    control channel: pickle once, send to each rank ──────▶  recv -> StepPlan
    run_plan(plan)    ◀── all_reduce / all_gather ──▶        run_plan(plan)  (logits dropped)
    sampler -> token ids

Commands go over a multiprocessing Connection (TCP, with an auth key), not a collective: a rank
waits for the next step for as long as the engine is idle, with no timeout, while collectives
keep a short timeout so that a rank that hangs or dies inside a step fails the others fast.
"""

from __future__ import annotations

import ctypes
import logging
import os
import pickle
import signal
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Client

import torch

from pagedllm.config import EngineConfig
from pagedllm.distributed.parallel_state import (
    cpu_all_reduce_min, destroy_distributed, init_distributed,
)
from pagedllm.worker.model_runner import ModelRunner

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class WorkerInit:
    """What a rank needs to join (pickled to a spawned process or a Ray actor)."""

    config: EngineConfig
    rank: int
    device_index: int  # CUDA device of this rank in its process (Ray hides the others: 0)
    dist_init_method: str  # tcp://host:port of the torch.distributed rendezvous
    control_address: tuple[str, int]  # rank 0's command listener
    authkey: bytes
    timeout_s: float  # bound on each collective
    num_threads: int | None  # CPU: torch threads of this rank (the cores are shared)


def init_rank(init: WorkerInit) -> ModelRunner:
    """Join the group and load this rank's shard of the model."""
    tp = init.config.parallel.tensor_parallel_size
    if init.num_threads is not None:
        torch.set_num_threads(init.num_threads)
    if init.config.device == "cuda":
        torch.cuda.set_device(init.device_index)
    if tp > 1:
        init_distributed(init.rank, tp, init.dist_init_method, init.config.device,
                         init.timeout_s)
    return ModelRunner(init.config, init.device_index)


def determine_num_blocks(runner: ModelRunner) -> int:
    """KV blocks that fit on every rank: each profiles its own device, the minimum wins."""
    return cpu_all_reduce_min(runner.determine_num_blocks())


def serve(init: WorkerInit) -> None:
    """The body of rank r > 0: connect, load, then run commands until None (or rank 0 goes)."""
    conn = Client(init.control_address, authkey=init.authkey)
    conn.send(("hello", init.rank, os.getpid()))
    try:
        runner = init_rank(init)
        conn.send(("ready", init.rank, None))
        while (msg := pickle.loads(conn.recv_bytes())) is not None:
            kind, *args = msg
            if kind == "step":
                runner.run_plan(args[0])
            elif kind == "num_blocks":
                determine_num_blocks(runner)
            elif kind == "init_cache":
                runner.init_cache(*args)
            else:
                raise ValueError(f"unknown command {kind!r}")
    except EOFError:
        logger.warning("rank %d: rank 0 is gone; exiting", init.rank)
    except BaseException:
        try:
            conn.send(("error", init.rank, traceback.format_exc()))
        except OSError:
            pass
        raise
    finally:
        destroy_distributed()
        conn.close()


def set_pdeathsig() -> None:
    """Linux: the kernel kills this process when its parent dies (no orphan ranks)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:  # not Linux: the control channel's EOF still ends the rank
        pass


def mp_worker_main(init: WorkerInit, parent_pid: int) -> None:
    """Entry point of a spawned rank (MultiprocExecutor)."""
    set_pdeathsig()
    # The parent may have died before prctl took effect: then nobody will ever signal us.
    if os.getppid() != parent_pid:
        os._exit(1)
    serve(init)
