"""CPU GEMM with pre-packed weights, for the small-M matmuls of decode steps.

MKL's plain sgemm (what F.linear calls) re-packs the weight matrix on every call; with few
rows (M = batch of decode tokens) that copy costs more than the math, and decode on a CPU ran
at ~50 GFLOP/s. oneDNN can keep the weight in its blocked layout once, which is ~3x faster for
M <= a few hundred and works for any M. Large-M matmuls (prefill) keep F.linear, which is
already compute-bound there (and is what HF transformers runs, bit for bit).

The packed copy doubles the linear layers' weight memory on CPU; PAGEDLLM_CPU_PACKED_GEMM=0
turns it off.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

SMALL_M = 256  # above this, F.linear is as fast (measured on a 2-core AVX-512 Xeon)
_ENABLED = os.environ.get("PAGEDLLM_CPU_PACKED_GEMM", "1") != "0"


def prepack(weight: torch.Tensor) -> torch.Tensor | None:
    """The weight in oneDNN's layout, or None where packing does not apply."""
    if not (_ENABLED and weight.device.type == "cpu" and weight.dtype == torch.float32
            and torch.backends.mkldnn.is_available()):
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), SMALL_M)
    except (RuntimeError, AttributeError):  # a torch build without these ops
        return None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
           packed: torch.Tensor | None) -> torch.Tensor:
    if packed is not None and x.shape[0] <= SMALL_M and x.dim() == 2:
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, bias, "none", [], "")
    return F.linear(x, weight, bias)
