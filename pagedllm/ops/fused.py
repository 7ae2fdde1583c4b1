"""The door to the fused layer ops (ops/triton/layer_ops.py): RMSNorm + residual, rotary
embedding, SiLU-mul.

Layers call `use_fused(x)` and take the fused kernel on CUDA tensors; everywhere else they keep
their PyTorch code, so CPU numerics never change. PAGEDLLM_FUSED_OPS=0 turns the kernels off
(read at import; `set_enabled` for benchmarks that compare both). Like ops/backend.py, the check
is a couple of attribute reads: it runs in every layer of every step and inside graph capture.
"""

from __future__ import annotations

import os

import torch

try:
    from pagedllm.ops.triton import layer_ops as _layer_ops
except ImportError:  # no triton: every layer keeps its PyTorch code
    _layer_ops = None

_enabled = os.environ.get("PAGEDLLM_FUSED_OPS", "1") != "0" and _layer_ops is not None


def set_enabled(enabled: bool) -> None:
    """Turn the fused kernels on or off for modules run (or captured) from now on."""
    global _enabled
    _enabled = bool(enabled) and _layer_ops is not None


def is_enabled() -> bool:
    return _enabled


def use_fused(x: torch.Tensor) -> bool:
    return _enabled and x.is_cuda


def rms_norm(x, weight, eps, residual=None):
    """See layer_ops.rms_norm (the twin: layers/norm.py RMSNorm)."""
    return _layer_ops.rms_norm(x, weight, eps, residual)


def rotary_embedding(positions, query, key, cos_cache, sin_cache):
    """See layer_ops.rotary_embedding (the twin: layers/rotary.py RotaryEmbedding)."""
    return _layer_ops.rotary_embedding(positions, query, key, cos_cache, sin_cache)


def silu_and_mul(x):
    """See layer_ops.silu_and_mul (the twin: layers/activation.py SiluAndMul)."""
    return _layer_ops.silu_and_mul(x)
