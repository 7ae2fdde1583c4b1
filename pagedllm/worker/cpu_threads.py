"""Intra-op threads of CPU model steps that follow the cores other processes leave idle.

Why: an OpenMP team of N threads ends every parallel region at a barrier. When another process
runs on one of the N cores, the team thread that shares it waits for a time slice (milliseconds)
at each region, and a decode step is hundreds of regions of microseconds each (every GEMM,
norm, attention call of every layer). On 2 cores beside busy neighbours, batch-1 decode measured
1.1 tok/s with 2 threads and 6.6-8.3 tok/s with 1; HF's static batch runs few, long regions
and barely notices. So the team shrinks to the cores that are idle, and grows back when they are.

The governor looks at most every `interval_s`, between steps: the busy time of this process's
cores (/proc/stat, steal time included: a hypervisor's share is not ours either), minus this
process's own CPU time, is what the rest of the machine used. The thread count is the idle
cores, rounded so that a neighbour using more than a third of a core takes that core:

    threads = clamp(floor(cores - others + 1/3), 1, ceiling)

The ceiling is the count set before the runner was built (--cpu-threads, threads_per_rank, or
torch's default: OMP_NUM_THREADS, else this process's cores). PAGEDLLM_CPU_ADAPTIVE_THREADS=0 keeps
the ceiling fixed. Thread counts never change results: every CPU kernel splits work by rows or
heads, never inside one dot product (tests/test_batch_invariance_offline.py checks 1 vs 2
threads in batch-invariant mode).
"""

from __future__ import annotations

import logging
import math
import os
import time

import torch

logger = logging.getLogger(__name__)

_ENABLED = os.environ.get("PAGEDLLM_CPU_ADAPTIVE_THREADS", "1") != "0"
_HZ = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _busy_seconds(cpus: set[int]) -> float | None:
    """Seconds the given cores spent not idle since boot (None where /proc/stat is absent)."""
    try:
        with open("/proc/stat") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    busy = 0
    for line in lines:
        name, *fields = line.split()
        if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in cpus:
            continue
        # user nice system idle iowait irq softirq steal [guest guest_nice: inside user/nice]
        values = [int(v) for v in fields[:8]]
        busy += sum(values) - values[3] - values[4]
    return busy / _HZ


class CpuThreadGovernor:
    """Owns torch's intra-op thread count in a process that runs CPU model steps."""

    def __init__(self, ceiling: int, interval_s: float = 0.5) -> None:
        try:
            self.cpus = set(os.sched_getaffinity(0))
        except AttributeError:  # not Linux
            self.cpus = set(range(os.cpu_count() or 1))
        self.ceiling = max(1, ceiling)
        self.interval_s = interval_s
        self.threads = torch.get_num_threads()
        self.enabled = _ENABLED and self.ceiling > 1 and _busy_seconds(self.cpus) is not None
        self._last = self._sample() if self.enabled else None

    @staticmethod
    def target(cores: int, others: float, ceiling: int) -> int:
        """Threads for `cores` usable cores when the rest of the machine keeps `others` busy."""
        return max(1, min(ceiling, math.floor(cores - others + 1 / 3)))

    def _sample(self) -> tuple[float, float, float]:
        t = os.times()
        return time.monotonic(), _busy_seconds(self.cpus) or 0.0, t.user + t.system

    def before_step(self) -> None:
        """Re-size the team if `interval_s` has passed since the last look (cheap otherwise)."""
        if not self.enabled or time.monotonic() - self._last[0] < self.interval_s:
            return
        now = self._sample()
        wall = now[0] - self._last[0]
        others = max(0.0, (now[1] - self._last[1]) - (now[2] - self._last[2])) / wall
        self._last = now
        threads = self.target(len(self.cpus), others, self.ceiling)
        if threads != self.threads:
            logger.debug("CPU threads %d -> %d (others keep %.2f cores busy)", self.threads,
                         threads, others)
            torch.set_num_threads(threads)
            self.threads = threads
