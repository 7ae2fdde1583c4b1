"""MultiprocExecutor: rank 0 in the engine-core process, ranks 1.. as spawned processes.

"spawn", not fork: the parent holds threads (torch's pools, the accept thread) and may hold a
CUDA context, neither of which survives a fork. Each child asks the kernel to kill it when its
parent dies (prctl PR_SET_PDEATHSIG), so a crashed engine leaves no rank behind.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time

from pagedllm.executor.distributed import DistributedExecutor
from pagedllm.worker.worker import WorkerInit, mp_worker_main


class MultiprocExecutor(DistributedExecutor):
    def _start_workers(self, inits: list[WorkerInit]) -> None:
        ctx = mp.get_context("spawn")
        self.procs: dict[int, mp.process.BaseProcess] = {}
        for init in inits:
            proc = ctx.Process(target=mp_worker_main, args=(init, os.getpid()),
                               name=f"pagedllm-tp{init.rank}", daemon=True)
            proc.start()
            self.procs[init.rank] = proc

    def _dead_workers(self) -> dict[int, str]:
        return {rank: f"pid {p.pid}, exit code {p.exitcode}"
                for rank, p in getattr(self, "procs", {}).items() if not p.is_alive()}

    def _stop_workers(self, timeout_s: float) -> None:
        procs = getattr(self, "procs", {})
        deadline = time.monotonic() + timeout_s
        for p in procs.values():
            p.join(max(0.0, deadline - time.monotonic()))
        for p in procs.values():
            if p.is_alive():
                p.kill()
                p.join(5.0)
