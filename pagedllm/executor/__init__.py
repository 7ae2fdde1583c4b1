"""Executors: run the scheduler's plan on every tensor-parallel rank.

    uni  the one worker inside the engine-core process (tp = 1)
    mp   rank 0 inside the engine-core process, ranks 1.. as spawned processes (torch.distributed)
    ray  rank 0 inside the engine-core process, ranks 1.. as Ray actors in a placement group
    simulated  (load_format="simulate") no model: a cost model prices each step on a virtual
         clock and a seeded stream supplies the tokens (executor/simulated.py)

Every executor has the same surface (see `Executor`), so EngineCore never knows which one runs.
"""

from __future__ import annotations

from pagedllm.config import EngineConfig
from pagedllm.executor.base import Executor, ModelRunnerOutput

__all__ = ["Executor", "ModelRunnerOutput", "create_executor", "verify_devices"]


def create_executor(config: EngineConfig) -> Executor:
    """The executor the config asks for; it loads the model on every rank."""
    if config.model.load_format == "simulate":  # every rank is priced by one cost model
        from pagedllm.executor.simulated import SimulatedExecutor

        return SimulatedExecutor(config)
    verify_devices(config)
    backend = config.parallel.distributed_executor_backend
    if backend == "mp":
        from pagedllm.executor.multiproc import MultiprocExecutor

        return MultiprocExecutor(config)
    if backend == "ray":
        from pagedllm.executor.ray import RayExecutor

        return RayExecutor(config)
    from pagedllm.executor.uniproc import UniProcExecutor

    return UniProcExecutor(config)


def verify_devices(config: EngineConfig) -> None:
    """One CUDA device per rank on this host (mp); checked before any memory is taken. (The
    model's own split is checked when the config is built: ParallelConfig.verify_with_model.)
    Ray places ranks on its cluster's devices and says itself when they do not fit."""
    tp = config.parallel.tensor_parallel_size
    if config.device != "cuda" or tp == 1 or config.parallel.distributed_executor_backend != "mp":
        return
    import torch

    count = torch.cuda.device_count()
    if tp > count:
        raise ValueError(f"tensor_parallel_size ({tp}) is larger than the number of usable CUDA "
                         f"devices ({count}; see CUDA_VISIBLE_DEVICES)")
