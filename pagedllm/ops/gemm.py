"""The door for the linear layers' matmuls (y = x W^T): F.linear, except where a small-M
matmul has a faster kernel on its device.

- CPU: pre-packed weights. MKL's plain sgemm (what F.linear calls) re-packs the weight matrix
  on every call; with few rows (M = batch of decode tokens) that copy costs more than the math,
  and decode on a CPU ran at ~50 GFLOP/s. oneDNN can keep the weight in its blocked layout once,
  which is ~3x faster for M <= a few hundred and works for any M. The packed copy doubles the
  linear layers' weight memory on CPU; PAGEDLLM_CPU_PACKED_GEMM=0 turns it off.
- CUDA (Hopper): M <= 16 rows (decode at small batch) go to the Triton skinny GEMM
  (ops/triton/skinny_gemm.py), which streams the weight without cuBLAS's split-K reduce;
  PAGEDLLM_SKINNY_GEMM=0 (or `set_skinny_enabled(False)`) keeps cuBLAS.

Large-M matmuls (prefill) keep F.linear everywhere: they are compute-bound, and on CPU that is
what HF transformers runs, bit for bit.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

try:
    from pagedllm.ops.triton import skinny_gemm as _skinny
except ImportError:  # no triton
    _skinny = None

SMALL_M = 256  # above this, F.linear is as fast on CPU (measured on a 2-core AVX-512 Xeon)
_ENABLED = os.environ.get("PAGEDLLM_CPU_PACKED_GEMM", "1") != "0"
_skinny_enabled = os.environ.get("PAGEDLLM_SKINNY_GEMM", "1") != "0" and _skinny is not None


def set_skinny_enabled(enabled: bool) -> None:
    """Turn the CUDA skinny GEMM on or off for modules run (or captured) from now on."""
    global _skinny_enabled
    _skinny_enabled = bool(enabled) and _skinny is not None


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
    if _skinny_enabled and _skinny.supports(x, weight, bias):  # CUDA tensors only
        return _skinny.skinny_linear(x, weight, bias)
    return F.linear(x, weight, bias)
