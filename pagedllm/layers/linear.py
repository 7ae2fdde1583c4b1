"""Linear layers that know how they are sharded across tensor-parallel ranks.

Each parameter carries a `weight_loader(param, loaded, shard_id=None)` that copies this rank's
slice of a full HF tensor into place, so loaders stream whole checkpoint tensors and never
need to know about parallelism or fused (packed) projections.
"""

from __future__ import annotations

import torch
from torch import nn

from pagedllm.distributed.parallel_state import get_tp_rank, get_tp_size, tp_all_reduce
from pagedllm.ops import gemm


def _shard(loaded: torch.Tensor, dim: int, size: int, rank: int) -> torch.Tensor:
    return loaded.narrow(dim, rank * size, size)


class _PackedLinearMixin:
    """Optional CPU pre-packed or quantized weight (see ops/gemm.py), made once after loading."""

    packed_weight: torch.Tensor | gemm.QuantizedWeight | None = None

    def prepack(self, quantization: str | None = None) -> None:
        self.packed_weight = gemm.prepack(self.weight, quantization)


class ColumnParallelLinear(_PackedLinearMixin, nn.Module):
    """y = x W^T with W split by output rows: each rank holds output_size / tp rows."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False) -> None:
        super().__init__()
        tp = get_tp_size()
        assert output_size % tp == 0, f"output size {output_size} not divisible by tp={tp}"
        self.input_size = input_size
        self.output_size = output_size
        self.output_size_per_rank = output_size // tp
        self.weight = nn.Parameter(torch.empty(self.output_size_per_rank, input_size),
                                   requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(self.output_size_per_rank), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        size = param.shape[0]
        param.data.copy_(_shard(loaded, 0, size, get_tp_rank()))

    def full_shards(self, param: nn.Parameter) -> list[tuple[object, tuple[int, ...]]]:
        """(shard_id, full checkpoint shape) of each tensor `weight_loader` takes for `param`:
        what a loader of made-up weights must produce so that every tp sees the same model."""
        return [(None, (self.output_size, *param.shape[1:]))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gemm.linear(x, self.weight, self.bias, self.packed_weight)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of the same input fused into one matmul.

    shard_id i selects the i-th output block (gate_proj = 0, up_proj = 1).
    """

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False) -> None:
        self.output_sizes = output_sizes
        super().__init__(input_size, sum(output_sizes), bias)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        tp = get_tp_size()
        offset = sum(self.output_sizes[:shard_id]) // tp
        size = self.output_sizes[shard_id] // tp
        param.data.narrow(0, offset, size).copy_(_shard(loaded, 0, size, get_tp_rank()))

    def full_shards(self, param: nn.Parameter) -> list[tuple[object, tuple[int, ...]]]:
        return [(i, (size, *param.shape[1:])) for i, size in enumerate(self.output_sizes)]


class QKVParallelLinear(ColumnParallelLinear):
    """q, k, v projections fused; heads are split across ranks (KV heads replicated if fewer
    KV heads than ranks). shard_id is "q", "k" or "v"."""

    def __init__(
        self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool
    ) -> None:
        tp = get_tp_size()
        assert num_heads % tp == 0, f"{num_heads} heads not divisible by tp={tp}"
        self.head_dim = head_dim
        self.total_num_heads, self.total_num_kv_heads = num_heads, num_kv_heads
        self.num_heads = num_heads // tp
        self.num_kv_heads = max(1, num_kv_heads // tp)
        self.kv_replicas = max(1, tp // num_kv_heads)
        total = (self.num_heads + 2 * self.num_kv_heads) * head_dim * tp
        super().__init__(hidden_size, total, bias)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        q_size = self.num_heads * self.head_dim
        kv_size = self.num_kv_heads * self.head_dim
        offset, size = {"q": (0, q_size), "k": (q_size, kv_size),
                        "v": (q_size + kv_size, kv_size)}[shard_id]
        rank = get_tp_rank() if shard_id == "q" else get_tp_rank() // self.kv_replicas
        param.data.narrow(0, offset, size).copy_(_shard(loaded, 0, size, rank))

    def full_shards(self, param: nn.Parameter) -> list[tuple[object, tuple[int, ...]]]:
        rest = tuple(param.shape[1:])
        kv = self.total_num_kv_heads * self.head_dim
        return [("q", (self.total_num_heads * self.head_dim, *rest)), ("k", (kv, *rest)),
                ("v", (kv, *rest))]


class RowParallelLinear(_PackedLinearMixin, nn.Module):
    """y = x W^T with W split by input columns; partial sums are all-reduced across ranks."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False) -> None:
        super().__init__()
        tp = get_tp_size()
        assert input_size % tp == 0, f"input size {input_size} not divisible by tp={tp}"
        self.input_size = input_size
        self.weight = nn.Parameter(torch.empty(output_size, input_size // tp),
                                   requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        if bias:  # added once, after the reduction
            self.bias = nn.Parameter(torch.empty(output_size), requires_grad=False)
            self.bias.weight_loader = lambda p, w, shard_id=None: p.data.copy_(w)
        else:
            self.register_parameter("bias", None)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        size = param.shape[1]
        param.data.copy_(_shard(loaded, 1, size, get_tp_rank()))

    def full_shards(self, param: nn.Parameter) -> list[tuple[object, tuple[int, ...]]]:
        if param is self.bias:
            return [(None, tuple(param.shape))]
        return [(None, (param.shape[0], self.input_size))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = tp_all_reduce(gemm.linear(x, self.weight, None, self.packed_weight))
        return y if self.bias is None else y + self.bias


class ReplicatedLinear(_PackedLinearMixin, nn.Module):
    """y = x W^T with the whole W on every rank: for small projections that are not worth
    splitting (an MoE router, OPT's project_in/out)."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(output_size, input_size), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(output_size), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        assert param.shape == loaded.shape, f"{tuple(loaded.shape)} != {tuple(param.shape)}"
        param.data.copy_(loaded)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gemm.linear(x, self.weight, self.bias, self.packed_weight)
