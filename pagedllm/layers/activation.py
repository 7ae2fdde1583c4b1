from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pagedllm.ops import fused


class SiluAndMul(nn.Module):
    """x = [gate | up] along the last dim -> silu(gate) * up."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fused.use_fused(x):  # one fused op (ops/fused.py), within a rounding of the code below
            return fused.silu_and_mul(x)
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up


# The element-wise activations of non-gated MLPs (GPT-2, OPT), by their HF config names.
# NOTE: HF's "gelu_new" is the tanh approximation written out by hand; it equals PyTorch's
# approximate="tanh" GELU within fp32 rounding.
_ACTIVATIONS = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "gelu_new": lambda: nn.GELU(approximate="tanh"),
    "gelu_pytorch_tanh": lambda: nn.GELU(approximate="tanh"),
}
ELEMENTWISE_ACTIVATIONS = tuple(_ACTIVATIONS)


def get_act_fn(name: str) -> nn.Module:
    if name not in _ACTIVATIONS:
        raise ValueError(f"activation {name!r} is not supported; supported: "
                         f"{', '.join(ELEMENTWISE_ACTIVATIONS)}")
    return _ACTIVATIONS[name]()
