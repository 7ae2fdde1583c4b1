"""Fused elementwise layer ops in Triton: RMSNorm (+ residual add), rotary embedding, SiLU-mul.

Decode runs each of these as a handful of tiny PyTorch kernels per layer (RMSNorm alone is
about eight: add, cast, square, mean, rsqrt, two multiplies, cast); at batch 1 they cost more
than the layer's attention. One kernel each reads the inputs once and writes the outputs once.

Each kernel rounds where the PyTorch layer rounds (its twin: layers/norm.py, rotary.py,
activation.py). Measured on an H100 (tests/gpu/test_fused_ops.py): SiLU-mul gives the same bits
as the eager layer; rotary and RMSNorm are within one rounding of it (the compiler contracts
rotary's multiply-adds; RMSNorm sums its squares in another order).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from pagedllm.ops.triton.common import next_pow2

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _rms_norm_kernel(
    x_ptr,  # [T, N]
    residual_ptr,  # [T, N] (read when HAS_RESIDUAL)
    weight_ptr,  # [N]
    out_ptr,  # [T, N]
    residual_out_ptr,  # [T, N] x + residual (written when HAS_RESIDUAL)
    stride_x,
    stride_r,
    stride_o,
    stride_ro,
    N,
    inv_n,  # 1 / N (the mean multiplies by it, as PyTorch's does)
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_N)
    mask = offs < N
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * stride_r + offs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)  # x + residual
        tl.store(residual_out_ptr + row * stride_ro + offs, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(xf * xf, 0) * inv_n + eps)
    y = (xf * rstd).to(x_ptr.dtype.element_ty)  # norm(x), back in the input dtype
    w = tl.load(weight_ptr + offs, mask=mask, other=0.0)
    out = y.to(tl.float32) * w.to(tl.float32)  # weight * norm(x), in the promoted dtype
    tl.store(out_ptr + row * stride_o + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(
    x: torch.Tensor,  # [..., N]
    weight: torch.Tensor,  # [N]
    eps: float,
    residual: torch.Tensor | None = None,  # [..., N]
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """norm(x), or (norm(x + residual), x + residual) as layers/norm.py's RMSNorm returns."""
    shape, n = x.shape, x.shape[-1]
    x2 = x.reshape(-1, n)
    assert x2.stride(-1) == 1 and weight.is_contiguous()
    out = torch.empty(x2.shape, dtype=torch.promote_types(x.dtype, weight.dtype),
                      device=x.device)
    if residual is not None:
        assert residual.shape == shape and residual.dtype == x.dtype
        r2 = residual.reshape(-1, n)
        assert r2.stride(-1) == 1
        residual_out = torch.empty_like(x2)
    else:
        r2 = residual_out = x2  # unused placeholders
    block_n = next_pow2(n)
    if x2.shape[0]:
        _rms_norm_kernel[(x2.shape[0],)](
            x2, r2, weight, out, residual_out,
            x2.stride(0), r2.stride(0), out.stride(0), residual_out.stride(0),
            n, 1.0 / n, eps,
            HAS_RESIDUAL=residual is not None,
            BLOCK_N=block_n,
            num_warps=min(16, max(1, block_n // 512)),
        )
    if residual is None:
        return out.view(shape)
    return out.view(shape), residual_out.view(shape)


@triton.jit
def _rotate(x1, x2, c, s, DTYPE: tl.constexpr):
    """(x1, x2) -> (x1 c - x2 s, x2 c + x1 s), rounded to DTYPE where the PyTorch layer's
    `x * cos + rotate_half(x) * sin` rounds (the compiler may still contract a multiply-add)."""
    o1 = (x1 * c).to(DTYPE).to(tl.float32) + (-x2 * s).to(DTYPE).to(tl.float32)
    o2 = (x2 * c).to(DTYPE).to(tl.float32) + (x1 * s).to(DTYPE).to(tl.float32)
    return o1.to(DTYPE), o2.to(DTYPE)


@triton.jit
def _rotate_heads(x_ptr, out_ptr, token, stride_t, stride_h, num_heads, c, s, offs_d, d_mask,
                  HALF: tl.constexpr, BLOCK_H: tl.constexpr, DTYPE: tl.constexpr):
    """Rotate every head of one token (q or k) and store it contiguously in out."""
    offs_h = tl.arange(0, BLOCK_H)
    mask = (offs_h < num_heads)[:, None] & d_mask[None, :]
    src = x_ptr + token * stride_t + offs_h[:, None] * stride_h + offs_d[None, :]
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    o1, o2 = _rotate(x1, x2, c, s, DTYPE)
    dst = out_ptr + (token * num_heads + offs_h[:, None]) * (2 * HALF) + offs_d[None, :]
    tl.store(dst, o1, mask=mask)
    tl.store(dst + HALF, o2, mask=mask)


@triton.jit
def _rotary_kernel(
    q_ptr,  # [T, Hq, D] (any token/head strides, unit stride on D)
    k_ptr,  # [T, Hkv, D]
    q_out_ptr,  # [T, Hq, D] contiguous
    k_out_ptr,  # [T, Hkv, D] contiguous
    positions_ptr,  # [T]
    cos_ptr,  # [P, D] fp32; both halves of a row are equal
    sin_ptr,  # [P, D] fp32
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_cos,
    num_q_heads,
    num_kv_heads,
    HALF: tl.constexpr,  # D / 2
    BLOCK_HALF: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HKV: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + token).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_HALF)
    d_mask = offs_d < HALF
    dtype = q_out_ptr.dtype.element_ty
    # The layer casts the fp32 tables to the activation dtype before multiplying.
    c = tl.load(cos_ptr + pos * stride_cos + offs_d, mask=d_mask, other=0.0)
    s = tl.load(sin_ptr + pos * stride_cos + offs_d, mask=d_mask, other=0.0)
    c = c.to(dtype).to(tl.float32)[None, :]
    s = s.to(dtype).to(tl.float32)[None, :]

    _rotate_heads(q_ptr, q_out_ptr, token, stride_qt, stride_qh, num_q_heads, c, s, offs_d,
                  d_mask, HALF, BLOCK_HQ, dtype)
    _rotate_heads(k_ptr, k_out_ptr, token, stride_kt, stride_kh, num_kv_heads, c, s, offs_d,
                  d_mask, HALF, BLOCK_HKV, dtype)

def rotary_embedding(
    positions: torch.Tensor,  # [T]
    query: torch.Tensor,  # [T, Hq, D]
    key: torch.Tensor,  # [T, Hkv, D]
    cos_cache: torch.Tensor,  # [P, D] fp32
    sin_cache: torch.Tensor,  # [P, D] fp32
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE ("rotate half") on q and k in one launch; new contiguous q and k."""
    num_tokens, num_q_heads, head_dim = query.shape
    num_kv_heads = key.shape[1]
    assert head_dim % 2 == 0 and key.shape[2] == head_dim and key.dtype == query.dtype
    assert query.stride(2) == 1 and key.stride(2) == 1
    assert cos_cache.is_contiguous() and sin_cache.is_contiguous()
    q_out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    k_out = torch.empty(key.shape, dtype=key.dtype, device=key.device)
    if num_tokens:
        half = head_dim // 2
        _rotary_kernel[(num_tokens,)](
            query, key, q_out, k_out, positions, cos_cache, sin_cache,
            query.stride(0), query.stride(1), key.stride(0), key.stride(1), cos_cache.stride(0),
            num_q_heads, num_kv_heads,
            HALF=half,
            BLOCK_HALF=next_pow2(half),
            BLOCK_HQ=next_pow2(num_q_heads),
            BLOCK_HKV=next_pow2(num_kv_heads),
            num_warps=4,
        )
    return q_out, k_out


@triton.jit
def _silu_and_mul_kernel(
    x_ptr,  # [T, 2 d]: gate | up
    out_ptr,  # [T, d]
    d,
    stride_x,
    stride_o,
    BLOCK: tl.constexpr,
    EXACT_EXP: tl.constexpr,  # libdevice's expf, as PyTorch's; Triton's interpreter lacks it
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < d
    gate = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + d + offs, mask=mask, other=0.0)
    dtype = out_ptr.dtype.element_ty
    # PyTorch's silu: x / (1 + exp(-x)) in fp32 with an exact exp and an IEEE divide.
    if EXACT_EXP:
        e = libdevice.exp(-gate)
    else:
        e = tl.exp(-gate)
    silu = tl.math.div_rn(gate, 1.0 + e).to(dtype)
    out = silu.to(tl.float32) * up.to(tl.float32)
    tl.store(out_ptr + row * stride_o + offs, out.to(dtype), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x = [gate | up] along the last dim -> silu(gate) * up."""
    shape = x.shape
    d = shape[-1] // 2
    x2 = x.reshape(-1, shape[-1])
    assert x2.stride(-1) == 1
    out = torch.empty((x2.shape[0], d), dtype=x.dtype, device=x.device)
    block = min(1024, next_pow2(d))
    if x2.shape[0]:
        _silu_and_mul_kernel[(x2.shape[0], triton.cdiv(d, block))](
            x2, out, d, x2.stride(0), out.stride(0), BLOCK=block, EXACT_EXP=not _INTERPRET,
            num_warps=4)
    return out.view(*shape[:-1], d)
