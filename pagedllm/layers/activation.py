from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pagedllm.ops import fused


class SiluAndMul(nn.Module):
    """x = [gate | up] along the last dim -> silu(gate) * up."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fused.use_fused(x):  # CUDA: one kernel, bit-identical to the code below
            return fused.silu_and_mul(x)
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up
