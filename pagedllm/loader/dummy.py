"""load_format="dummy": no checkpoint is read; the model gets small random weights.

Used to benchmark or test the engine with a config.json alone. The values are tiny so that
activations stay finite through any number of layers; the outputs are meaningless.
"""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def initialize_dummy_weights(model: nn.Module, low: float = -1e-3, high: float = 1e-3,
                             seed: int = 0) -> None:
    """Fill every floating-point parameter of `model` in place, uniformly in [low, high)."""
    generators: dict[torch.device, torch.Generator] = {}
    for param in model.parameters():
        if not torch.is_floating_point(param):
            continue
        if param.device not in generators:  # one seeded stream per device: reproducible
            generators[param.device] = torch.Generator(device=param.device).manual_seed(seed)
        param.uniform_(low, high, generator=generators[param.device])
