"""load_format="dummy": no checkpoint is read; the model gets small random weights.

Used to benchmark or test the engine with a config.json alone. The values are tiny so that
activations stay finite through any number of layers; the outputs are meaningless.

The model is the same at every tensor-parallel size: each FULL checkpoint-shaped tensor is
drawn from its own stream, seeded by (seed, parameter name, shard id), and goes through the
parameter's `weight_loader` like a checkpoint tensor would, so rank r keeps exactly the slice a
real checkpoint would give it (layers say which full tensors they take: `full_shards`).
"""

from __future__ import annotations

import zlib

import torch
from torch import nn


@torch.no_grad()
def initialize_dummy_weights(model: nn.Module, low: float = -1e-3, high: float = 1e-3,
                             seed: int = 0) -> None:
    """Fill every floating-point parameter of `model` in place, uniformly in [low, high)."""
    seen: set[int] = set()  # tied parameters (lm_head = embed_tokens) are filled once
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if id(param) in seen or not torch.is_floating_point(param):
                continue
            seen.add(id(param))
            name = f"{module_name}.{param_name}" if module_name else param_name
            loader = getattr(param, "weight_loader", None)
            full_shards = getattr(module, "full_shards", None)
            shards = full_shards(param) if full_shards else [(None, tuple(param.shape))]
            for shard_id, shape in shards:
                full = _uniform(shape, low, high, seed, f"{name}|{shard_id}")
                if loader is None:
                    param.copy_(full)
                else:
                    loader(param, full.to(param.device, param.dtype), shard_id)


def _uniform(shape: tuple[int, ...], low: float, high: float, seed: int, key: str
             ) -> torch.Tensor:
    # CPU float32 whatever the device or dtype: the same bits on every rank and machine.
    stream = (seed * 1_000_003 + zlib.crc32(key.encode())) % 2**63
    gen = torch.Generator().manual_seed(stream)
    return torch.empty(shape, dtype=torch.float32).uniform_(low, high, generator=gen)
