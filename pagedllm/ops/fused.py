"""The door to the fused layer ops: RMSNorm + residual, rotary embedding, SiLU-mul.

Layers call `use_fused(x)` and, where it says yes, one fused op instead of their PyTorch code:
on CUDA the Triton kernels (ops/triton/layer_ops.py), on CPU fp32/bf16 tensors the C++ ones
(ops/cpu_layer_ops.py); anything else (no triton, a CPU library that cannot build, fp16 on CPU)
keeps the PyTorch code. Either kind rounds where the PyTorch code rounds, so results change by
at most a rounding: on CUDA SiLU-mul gives its bits and rotary is one rounding off where the
compiler contracts a multiply-add; on CPU rotary gives its bits and SiLU-mul is one rounding off
where the two exps differ; RMSNorm sums its squares in another order on both.
tests/gpu/test_fused_ops.py and tests/ops/test_cpu_layer_ops.py check each op against the
PyTorch code; the latter also checks the CPU ops' batch invariance (a row's bits do not depend
on the other rows or the thread count) and that this door routes CPU layers to them.

PAGEDLLM_FUSED_OPS=0 turns both kinds off (read at import; `set_enabled` for benchmarks and
tests that compare). Like ops/backend.py, the check is a couple of attribute reads: it runs in
every layer of every step and inside graph capture.
"""

from __future__ import annotations

import os

import torch

from pagedllm.ops import cpu_layer_ops

try:
    from pagedllm.ops.triton import layer_ops as _layer_ops
except ImportError:  # no triton: CUDA layers keep their PyTorch code; CPU ones may still fuse
    _layer_ops = None

_enabled = os.environ.get("PAGEDLLM_FUSED_OPS", "1") != "0"


def set_enabled(enabled: bool) -> None:
    """Turn the fused ops on or off for modules run (or captured) from now on."""
    global _enabled
    _enabled = bool(enabled)


def is_enabled() -> bool:
    return _enabled


def use_fused(x: torch.Tensor) -> bool:
    if not _enabled:
        return False
    if x.is_cuda:
        return _layer_ops is not None
    return cpu_layer_ops.supports(x)


def rms_norm(x, weight, eps, residual=None):
    """See layer_ops.rms_norm (the twin: layers/norm.py RMSNorm)."""
    return (_layer_ops if x.is_cuda else cpu_layer_ops).rms_norm(x, weight, eps, residual)


def rotary_embedding(positions, query, key, cos_cache, sin_cache):
    """See layer_ops.rotary_embedding (the twin: layers/rotary.py RotaryEmbedding)."""
    return (_layer_ops if query.is_cuda else cpu_layer_ops).rotary_embedding(
        positions, query, key, cos_cache, sin_cache)


def silu_and_mul(x):
    """See layer_ops.silu_and_mul (the twin: layers/activation.py SiluAndMul)."""
    return (_layer_ops if x.is_cuda else cpu_layer_ops).silu_and_mul(x)
