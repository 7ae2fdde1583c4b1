"""Tensor-parallel group. At tp=1 (the default) every collective is a no-op."""

from __future__ import annotations

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
