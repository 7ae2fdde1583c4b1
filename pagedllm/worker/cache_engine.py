"""The KV cache tensors: one device tensor for all layers (per-layer views bound into each
Attention layer) and a CPU twin for swapped-out blocks. Executes the scheduler's cache plans."""

from __future__ import annotations

import torch
from torch import nn

from pagedllm.layers.attention import Attention
from pagedllm.ops import backend


def kv_block_bytes(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                   dtype: torch.dtype) -> int:
    """Bytes of one block across all layers (K and V)."""
    return 2 * num_layers * block_size * num_kv_heads * head_dim * dtype.itemsize


class CacheEngine:
    def __init__(
        self, model: nn.Module, num_blocks: int, num_cpu_blocks: int, block_size: int,
        device: torch.device, dtype: torch.dtype,
    ) -> None:
        self.layers = [m for m in model.modules() if isinstance(m, Attention)]
        first = self.layers[0]
        shape = (len(self.layers), 2, num_blocks, block_size, first.num_kv_heads, first.head_dim)
        # kv[layer]: [2, num_blocks, block_size, Hkv, D]. Zeroed: attention may read (and mask)
        # never-written slots of a partial block, and 0 * garbage could be NaN.
        self.kv = torch.zeros(shape, dtype=dtype, device=device)
        self.cpu_kv = None
        if num_cpu_blocks:
            cpu_shape = (*shape[:2], num_cpu_blocks, *shape[3:])
            # empty, not zeros: only blocks written by a swap-out are ever read back, and the
            # OS commits the pages lazily, so an unused swap space costs no memory.
            self.cpu_kv = torch.empty(cpu_shape, dtype=dtype, device="cpu",
                                      pin_memory=device.type == "cuda")
        for i, layer in enumerate(self.layers):
            layer.kv_cache = self.kv[i]
        self.per_layer = [self.kv[i] for i in range(len(self.layers))]

    def swap_out(self, pairs: list[tuple[int, int]]) -> None:
        """(device block, cpu block) pairs."""
        if pairs:
            src, dst = _split(pairs, self.kv.device)
            self.cpu_kv[:, :, dst.cpu()] = self.kv[:, :, src].to("cpu")

    def swap_in(self, pairs: list[tuple[int, int]]) -> None:
        """(cpu block, device block) pairs."""
        if pairs:
            src, dst = _split(pairs, self.kv.device)
            self.kv[:, :, dst] = self.cpu_kv[:, :, src.cpu()].to(self.kv.device, non_blocking=True)

    def copy(self, pairs: list[tuple[int, int]]) -> None:
        """Copy-on-write (src, dst) pairs, every layer."""
        if pairs:
            mapping = torch.tensor(pairs, dtype=torch.int64, device=self.kv.device)
            backend.copy_blocks(self.per_layer, mapping)

    def execute_plan(self, swap_out, swap_in, copies) -> None:
        # Order matters: a block swapped out this step may be reused as a copy/swap-in target.
        self.swap_out(swap_out)
        self.swap_in(swap_in)
        self.copy(copies)


def _split(pairs, device):
    t = torch.tensor(pairs, dtype=torch.int64, device=device)
    return t[:, 0], t[:, 1]
