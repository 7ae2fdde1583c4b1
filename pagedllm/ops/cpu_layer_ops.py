"""C++ layer ops for CPU tensors (csrc/layer_ops_cpu.cpp): RMSNorm (+ residual add), SiLU-mul
and rotary embedding, the CPU twins of ops/triton/layer_ops.py (same signatures and returns).

The layers' PyTorch code (layers/norm.py, activation.py, rotary.py) runs each op as several tiny
kernels per layer; at decode batch 1 their dispatch costs more than their arithmetic. Each op
here is one pass over each row, rounding where the PyTorch code rounds: rotary gives its bits,
SiLU-mul and RMSNorm are within a rounding of it (tests/ops/test_cpu_layer_ops.py). Rows are
split over torch's intra-op threads only when there are enough of them, and a row's result
never depends on the other rows or the thread count (batch invariance).

Reached through ops/fused.py, which sends CPU tensors here when `supports(x)`. Built on first use
by ops/cpu_build.py (cached; called through ctypes); if it cannot be built or loaded, one
warning is logged and the layers keep their PyTorch code. PAGEDLLM_CPU_KERNELS=0 turns it off.
"""

from __future__ import annotations

import ctypes

import torch

from pagedllm.ops.cpu_build import CppLibrary

_DTYPES = (torch.float32, torch.bfloat16)

_ptr, _i32, _i64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64


def _declare(lib: ctypes.CDLL) -> None:
    lib.pagedllm_rms_norm.argtypes = [_ptr] * 5 + [_i32] + [_i64] * 7 + [ctypes.c_float]
    lib.pagedllm_rms_norm.restype = None
    lib.pagedllm_silu_and_mul.argtypes = [_ptr, _ptr, _i32, _i64, _i64, _i64]
    lib.pagedllm_silu_and_mul.restype = None
    lib.pagedllm_rotary_embedding.argtypes = [_ptr] * 7 + [_i32] + [_i64] * 10
    lib.pagedllm_rotary_embedding.restype = _i32


_LIBRARY = CppLibrary("pagedllm_cpu_layer_ops", "layer_ops_cpu.cpp", "CPU layer ops", _declare)


def load() -> bool:
    """Build (or load the cached build of) the library once; True if it is usable."""
    return _LIBRARY.load()


def load_error() -> str | None:
    """Why the library is not in use (None while it is, or before the first load)."""
    return _LIBRARY.error()


def supports(x: torch.Tensor) -> bool:
    """Whether these ops take x (CPU, fp32 or bf16); builds the library on the first call that
    would use it. Other layouts and dtypes of the remaining arguments are handled below."""
    return x.is_cpu and x.dtype in _DTYPES and load()


# NOTE: the wrappers below run for every layer of every decode step, where each tensor op costs
# a microsecond or more (as much as a row of arithmetic): they skip reshapes and copies that a
# layer's usual tensors do not need.


def _rows(t: torch.Tensor) -> tuple[torch.Tensor, int, int, int]:
    """(tensor, rows per outer index, outer stride, inner stride) addressing t's last-dim rows
    in place: a [T, N] tensor as T rows, a [T, H, D] view (Qwen3's q/k norm, out of the qkv
    output) as T x H rows; any other shape as t.reshape(-1, D) (a copy only where a view cannot
    be had)."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    if t.dim() == 2:
        return t, 1, t.stride(0), 0
    if t.dim() == 3:
        return t, t.shape[1], t.stride(0), t.stride(1)
    t = t.reshape(-1, t.shape[-1])
    return t, 1, t.stride(0), 0


def rms_norm(
    x: torch.Tensor,  # [..., N]
    weight: torch.Tensor,  # [N]
    eps: float,
    residual: torch.Tensor | None = None,  # [..., N]
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """norm(x), or (norm(x + residual), x + residual) as layers/norm.py's RMSNorm returns."""
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        s = x + residual  # broadcast or promoted: the sum is the twin's, then normalized here
        return rms_norm(s, weight, eps), s
    shape, n = x.shape, x.shape[-1]
    xr, inner, x_outer, x_inner = _rows(x)
    r_outer = r_inner = 0
    if residual is not None:
        residual, _, r_outer, r_inner = _rows(residual)
    num_rows = x.numel() // n if n else 0
    # A weight of another dtype promotes the product (the twin's `weight * y`): left to torch.
    w = weight.contiguous() if weight.dtype == x.dtype else None
    out = x.new_empty(shape)  # contiguous, rows in x's row order
    residual_out = x.new_empty(shape) if residual is not None else None
    if num_rows:
        _LIBRARY.lib.pagedllm_rms_norm(
            xr.data_ptr(), residual.data_ptr() if residual is not None else None,
            w.data_ptr() if w is not None else None, out.data_ptr(),
            residual_out.data_ptr() if residual_out is not None else None,
            x.dtype == torch.bfloat16, num_rows, n, inner, x_outer, x_inner, r_outer, r_inner,
            eps)
    if w is None:
        out = weight * out
    return out if residual_out is None else (out, residual_out)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x = [gate | up] along the last dim -> silu(gate) * up."""
    shape = x.shape
    d = shape[-1] // 2
    x2 = x if x.dim() == 2 else x.reshape(-1, shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = x.new_empty((*shape[:-1], d))
    if x2.shape[0] and d:
        _LIBRARY.lib.pagedllm_silu_and_mul(x2.data_ptr(), out.data_ptr(),
                                           x.dtype == torch.bfloat16, x2.shape[0], d,
                                           x2.stride(0))
    return out


def rotary_embedding(
    positions: torch.Tensor,  # [T]
    query: torch.Tensor,  # [T, Hq, D], any token/head strides (a view of the qkv output)
    key: torch.Tensor,  # [T, Hkv, D]
    cos_cache: torch.Tensor,  # [P, D] fp32
    sin_cache: torch.Tensor,  # [P, D] fp32
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE ("rotate half") on q and k in one call; new contiguous q and k (the inputs, views of
    the qkv output, are left as they are)."""
    num_tokens, num_q_heads, head_dim = query.shape
    num_kv_heads = key.shape[1]
    assert head_dim % 2 == 0 and key.shape[2] == head_dim and key.dtype == query.dtype
    assert cos_cache.shape[-1] == head_dim and sin_cache.shape == cos_cache.shape
    if query.stride(2) != 1:
        query = query.contiguous()
    if key.stride(2) != 1:
        key = key.contiguous()
    if cos_cache.dtype != torch.float32 or not cos_cache.is_contiguous():  # not the layer's own
        cos_cache = cos_cache.to(torch.float32).contiguous()
    if sin_cache.dtype != torch.float32 or not sin_cache.is_contiguous():
        sin_cache = sin_cache.to(torch.float32).contiguous()
    if positions.dtype != torch.int64 or not positions.is_contiguous():
        positions = positions.to(torch.int64).contiguous()
    q_out = query.new_empty(query.shape)
    k_out = key.new_empty(key.shape)
    if num_tokens and head_dim:
        bad_position = _LIBRARY.lib.pagedllm_rotary_embedding(
            positions.data_ptr(), query.data_ptr(), key.data_ptr(), q_out.data_ptr(),
            k_out.data_ptr(), cos_cache.data_ptr(), sin_cache.data_ptr(),
            query.dtype == torch.bfloat16, num_tokens, num_q_heads, num_kv_heads, head_dim,
            query.stride(0), query.stride(1), key.stride(0), key.stride(1), cos_cache.stride(0),
            cos_cache.shape[0])
        if bad_position:
            raise IndexError(f"a position is out of the rotary tables' {cos_cache.shape[0]}")
    return q_out, k_out
