"""The CPU thread governor (worker/cpu_threads.py): the team shrinks to the idle cores."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

from pagedllm.worker.cpu_threads import CpuThreadGovernor


def test_target_leaves_each_busy_neighbour_its_core():
    target = CpuThreadGovernor.target
    assert target(2, 0.0, 2) == 2
    assert target(2, 0.3, 2) == 2  # a neighbour at under a third of a core is tolerated
    assert target(2, 0.5, 2) == 1  # one above it takes that core
    assert target(2, 1.0, 2) == 1
    assert target(2, 3.5, 2) == 1  # never below one
    assert target(16, 8.0, 8) == 8  # the other TP rank's 8 busy cores: 8 idle remain
    assert target(16, 0.0, 4) == 4  # never above the cap


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="needs Linux /proc/stat")
@pytest.mark.skipif(len(os.sched_getaffinity(0)) > 4, reason="one spinner per core: <= 4 cores")
def test_busy_neighbours_shrink_the_team():
    threads = torch.get_num_threads()
    cpus = sorted(os.sched_getaffinity(0))
    torch.set_num_threads(len(cpus))
    gov = CpuThreadGovernor(ceiling=len(cpus), interval_s=0.0)
    if not gov.enabled:
        pytest.skip("one core: nothing to adapt")
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in cpus]
    try:
        time.sleep(1.0)
        gov._last = gov._sample()
        time.sleep(1.0)
        gov.before_step()
        assert gov.threads == torch.get_num_threads() == 1
    finally:
        for p in spinners:
            p.kill()
            p.wait()
        torch.set_num_threads(threads)
