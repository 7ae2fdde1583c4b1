"""Tensor-parallel group. At tp=1 (the default) every collective is a no-op."""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist

_TP_SIZE = 1
_TP_RANK = 0


def init_tensor_parallel(tp_size: int, tp_rank: int) -> None:
    """Called once per worker process after torch.distributed is initialized."""
    global _TP_SIZE, _TP_RANK
    if tp_size > 1:
        assert dist.is_initialized(), "init torch.distributed before tensor parallelism"
        assert dist.get_world_size() == tp_size
    _TP_SIZE, _TP_RANK = tp_size, tp_rank


def get_tp_size() -> int:
    return _TP_SIZE


def get_tp_rank() -> int:
    return _TP_RANK


def tp_all_reduce(x: torch.Tensor) -> torch.Tensor:
    if _TP_SIZE == 1:
        return x
    dist.all_reduce(x)
    return x


def tp_all_gather(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    if _TP_SIZE == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(_TP_SIZE)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=dim)


# ---- process groups (executors call these; the model only sees the functions above) ----------
_CPU_GROUP = None  # gloo group for host-side values (the KV block count); WORLD on a CPU


def init_distributed(rank: int, world_size: int, init_method: str, device_type: str,
                     timeout_s: float) -> None:
    """Join the tensor-parallel group: NCCL on CUDA (plus a gloo group for host values), gloo
    on a CPU. `timeout_s` bounds every collective: a hung rank fails the others instead of
    blocking them forever (a dead one fails them at once: its sockets close)."""
    global _CPU_GROUP
    timeout = timedelta(seconds=timeout_s)
    backend = "nccl" if device_type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=init_method, rank=rank,
                            world_size=world_size, timeout=timeout)
    _CPU_GROUP = dist.new_group(backend="gloo", timeout=timeout) if backend == "nccl" \
        else dist.group.WORLD
    init_tensor_parallel(world_size, rank)


def destroy_distributed() -> None:
    """Leave the group and go back to tp = 1 (a later model in this process is unsharded)."""
    global _CPU_GROUP, _TP_SIZE, _TP_RANK
    _CPU_GROUP, _TP_SIZE, _TP_RANK = None, 1, 0
    if dist.is_initialized():
        dist.destroy_process_group()


def cpu_all_reduce_min(value: int) -> int:
    """The minimum of an int over ranks (through the gloo group, on the host)."""
    if _TP_SIZE == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=_CPU_GROUP)
    return int(t.item())
