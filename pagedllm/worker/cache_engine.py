"""The KV cache tensors: one device tensor for all layers (per-layer views bound into each
Attention layer) and a CPU twin for swapped-out blocks. Executes the scheduler's cache plans.

The element type is CacheConfig.cache_dtype: `auto` stores the model dtype; fp8 / fp8_e5m2 store
float8 (scale 1.0); int8 stores int8 plus one fp32 scale per (token, KV head) for K and for V,
kept in a second tensor with the same block dimension, so that every block operation (swap out,
swap in, copy-on-write) moves a block's scales with its values (ops/torch_ref.py: the format).

  kv:        [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]   cache dtype
  kv_scales: [num_layers, 2, num_blocks, block_size, num_kv_heads]             fp32 (int8 only)
"""

from __future__ import annotations


import torch
from torch import nn

from pagedllm.layers.attention import Attention
from pagedllm.ops import backend

_CACHE_DTYPES = {
    "fp8": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2, "int8": torch.int8,
}
SCALE_DTYPE = torch.float32


def kv_cache_torch_dtype(cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    """The torch dtype of the cache for a CacheConfig.cache_dtype (`auto`: the model's)."""
    return model_dtype if cache_dtype == "auto" else _CACHE_DTYPES[cache_dtype]


def has_scales(dtype: torch.dtype) -> bool:
    return dtype == torch.int8


def kv_block_bytes(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                   dtype: torch.dtype) -> int:
    """Bytes of one block across all layers (K and V, and their scales for int8)."""
    per_head = head_dim * dtype.itemsize + (SCALE_DTYPE.itemsize if has_scales(dtype) else 0)
    return 2 * num_layers * block_size * num_kv_heads * per_head


class CacheEngine:
    def __init__(
        self, model: nn.Module, num_blocks: int, num_cpu_blocks: int, block_size: int,
        device: torch.device, dtype: torch.dtype,
    ) -> None:
        """dtype: the cache's element type (kv_cache_torch_dtype)."""
        if dtype in (torch.float8_e4m3fn, torch.float8_e5m2) and device.type == "cuda" \
                and torch.cuda.get_device_capability(device) < (8, 9):
            raise ValueError("an fp8 KV cache needs a GPU of compute capability 8.9 or newer "
                             "(Ada, Hopper); use kv_cache_dtype='int8' or 'auto'")
        self.layers = [m for m in model.modules() if isinstance(m, Attention)]
        first = self.layers[0]
        shape = (len(self.layers), 2, num_blocks, block_size, first.num_kv_heads, first.head_dim)
        # kv[layer]: [2, num_blocks, block_size, Hkv, D]. Zeroed: attention may read (and mask)
        # never-written slots of a partial block, and 0 * garbage could be NaN.
        self.kv = torch.zeros(shape, dtype=dtype, device=device)
        self.kv_scales = torch.zeros(shape[:-1], dtype=SCALE_DTYPE, device=device) \
            if has_scales(dtype) else None
        self.cpu_kv = self.cpu_kv_scales = None
        if num_cpu_blocks:
            # empty, not zeros: only blocks written by a swap-out are ever read back, and the
            # OS commits the pages lazily, so an unused swap space costs no memory.
            def cpu_twin(t: torch.Tensor) -> torch.Tensor:
                return torch.empty((*t.shape[:2], num_cpu_blocks, *t.shape[3:]), dtype=t.dtype,
                                   device="cpu", pin_memory=device.type == "cuda")

            self.cpu_kv = cpu_twin(self.kv)
            if self.kv_scales is not None:
                self.cpu_kv_scales = cpu_twin(self.kv_scales)
        for i, layer in enumerate(self.layers):
            layer.kv_cache = self.kv[i]
            layer.kv_scales = None if self.kv_scales is None else self.kv_scales[i]
        self.per_layer = [self.kv[i] for i in range(len(self.layers))]
        self.per_layer_scales = [] if self.kv_scales is None else \
            [self.kv_scales[i] for i in range(len(self.layers))]

    def _pools(self) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """(device tensor, CPU twin) pairs indexed by block in dim 2: values, then scales."""
        pools = [(self.kv, self.cpu_kv)]
        if self.kv_scales is not None:
            pools.append((self.kv_scales, self.cpu_kv_scales))
        return pools

    def swap_out(self, pairs: list[tuple[int, int]]) -> None:
        """(device block, cpu block) pairs."""
        if pairs:
            src, dst = _split(pairs, self.kv.device)
            for dev, cpu in self._pools():
                cpu[:, :, dst.cpu()] = dev[:, :, src].to("cpu")

    def swap_in(self, pairs: list[tuple[int, int]]) -> None:
        """(cpu block, device block) pairs."""
        if pairs:
            src, dst = _split(pairs, self.kv.device)
            for dev, cpu in self._pools():
                dev[:, :, dst] = cpu[:, :, src.cpu()].to(dev.device, non_blocking=True)

    def copy(self, pairs: list[tuple[int, int]]) -> None:
        """Copy-on-write (src, dst) pairs, every layer (values and scales)."""
        if pairs:
            mapping = torch.tensor(pairs, dtype=torch.int64, device=self.kv.device)
            backend.copy_blocks(self.per_layer, mapping)
            if self.per_layer_scales:
                backend.copy_blocks(self.per_layer_scales, mapping)

    def execute_plan(self, swap_out, swap_in, copies) -> None:
        # Order matters: a block swapped out this step may be reused as a copy/swap-in target.
        self.swap_out(swap_out)
        self.swap_in(swap_in)
        self.copy(copies)


def _split(pairs, device):
    t = torch.tensor(pairs, dtype=torch.int64, device=device)
    return t[:, 0], t[:, 1]
