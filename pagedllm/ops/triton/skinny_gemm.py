"""y = x W^T for the few-row matmuls of decode steps (M <= 16 rows), in Triton.

At batch 1 a decode step is four matmuls per layer plus the LM head, each reading its whole
weight to multiply one row: the step is a weight read, ~15 GB for an 8B model. cuBLAS runs these
at ~90% of the device-to-device copy rate on an H100, and picks split-K (a second, reduce kernel)
for two of the four layer shapes. This kernel streams the weight once, with no split-K:

- M == 1 (GEMV): each program owns BLOCK_N output features, walks K in BLOCK_K slices and keeps
  a [BLOCK_N, BLOCK_K] fp32 partial-product tile, summed once at the end (no per-slice
  reduction: the loop is loads and FMAs only).
- 2 <= M <= 16: the same walk with tensor cores, the rows padded to 16 (tl.dot's minimum).

Small BLOCK_N gives thousands of programs even for N = 4096, so every SM has loads in flight
without splitting K. The weight is read once (evict_first keeps it from pushing x out of L2).

Its twin is F.linear (the linear layers reach both through ops/gemm.py). It sums in another order
than cuBLAS, so results agree to fp32-accumulation rounding, not bit for bit.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

MAX_M = 16  # rows above this go to cuBLAS, which is no longer bandwidth-starved there


@triton.jit
def _load_k_slice(w_ptrs, x_ptrs, k0, offs_k, K, EVEN_K: tl.constexpr):
    """One BLOCK_K slice of the weight tile and of x (1-D or [BLOCK_M, BLOCK_K]); the K mask
    broadcasts to either shape."""
    if EVEN_K:
        w = tl.load(w_ptrs, eviction_policy="evict_first")
        x = tl.load(x_ptrs)
    else:
        k_mask = (k0 + offs_k) < K
        w = tl.load(w_ptrs, mask=k_mask[None, :], other=0.0, eviction_policy="evict_first")
        x = tl.load(x_ptrs, mask=k_mask, other=0.0)
    return w, x


@triton.jit
def _skinny_gemm_kernel(
    x_ptr,  # [M, K]
    w_ptr,  # [N, K], K contiguous (nn.Linear's layout)
    bias_ptr,  # [N] (read when HAS_BIAS)
    y_ptr,  # [M, N]
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_ym,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,  # 1: FMA GEMV; 16: tensor cores
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,  # K % BLOCK_K == 0: no masks in the loop
):
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    n_mask = offs_n < N
    # Rows past N read row 0 (always valid) instead of masking: their results are not stored.
    w_rows = tl.where(n_mask, offs_n, 0).to(tl.int64) * stride_wn
    w_ptrs = w_ptr + w_rows[:, None] + offs_k[None, :]
    # Two loops (one load helper): the GEMV loads x as a 1-D vector that broadcasts over the
    # weight tile; one loop for both (x as a [1, BLOCK_K] tile) ran the down projection at 45.9 µs
    # instead of 40.6 per call on an H100 (skinny_gemm_bench.py).
    if BLOCK_M == 1:
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        x_ptrs = x_ptr + offs_k
        for k0 in range(0, K, BLOCK_K):
            w, x = _load_k_slice(w_ptrs, x_ptrs, k0, offs_k, K, EVEN_K)
            acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
            w_ptrs += BLOCK_K
            x_ptrs += BLOCK_K
        out = tl.sum(acc, axis=1)[None, :]  # [1, BLOCK_N]
    else:
        offs_m = tl.arange(0, BLOCK_M)
        m_mask = offs_m < M
        x_ptrs = x_ptr + tl.where(m_mask, offs_m, 0)[:, None] * stride_xm + offs_k[None, :]
        out = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            w, x = _load_k_slice(w_ptrs, x_ptrs, k0, offs_k, K, EVEN_K)
            out = tl.dot(x, tl.trans(w), out)
            w_ptrs += BLOCK_K
            x_ptrs += BLOCK_K
    if HAS_BIAS:
        out += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    offs_m = tl.arange(0, BLOCK_M)
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, out.to(y_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & n_mask[None, :])


def default_config(m: int, n: int, k: int) -> dict:
    """Block shapes and launch options, from the sweep of benchmarks/kernels/skinny_gemm_bench.py
    --tune on an H100 (Llama-3-8B shapes; the best config per shape was within a few percent of
    these)."""
    if m == 1:
        if k >= 8192:  # few outputs, long rows (the MLP's down projection)
            return {"BLOCK_N": 16, "BLOCK_K": 1024, "num_warps": 8, "num_stages": 1}
        return {"BLOCK_N": 4, "BLOCK_K": 1024, "num_warps": 4, "num_stages": 1}
    return {"BLOCK_N": 64, "BLOCK_K": 256, "num_warps": 4, "num_stages": 4}


@functools.cache
def _tuned_for(device_index: int) -> bool:
    # The block shapes were chosen on an H100, and the M >= 2 config takes 120 KiB of shared
    # memory, more than pre-Hopper parts give one program: other GPUs keep cuBLAS until tuned.
    return torch.cuda.get_device_capability(device_index) >= (9, 0)


def supports(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """Whether skinny_linear takes this matmul (else the caller keeps F.linear)."""
    return (x.is_cuda and x.dim() == 2 and x.shape[0] <= MAX_M and weight.dim() == 2
            and x.dtype in (torch.bfloat16, torch.float16) and weight.dtype == x.dtype
            and weight.shape[1] == x.shape[1] and weight.stride(1) == 1 and x.stride(1) == 1
            and (bias is None or (bias.dtype == x.dtype and bias.shape == weight.shape[:1]
                                  and bias.is_contiguous()))
            and _tuned_for(x.device.index if x.device.index is not None
                           else torch.cuda.current_device()))


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  config: dict | None = None) -> torch.Tensor:
    """x [M, K] @ weight[N, K]^T (+ bias) for M <= MAX_M."""
    m, k = x.shape
    n = weight.shape[0]
    if m > MAX_M or weight.shape[1] != k:
        raise ValueError(f"skinny_linear takes x [<= {MAX_M}, K] and weight [N, K]; got "
                         f"{tuple(x.shape)} and {tuple(weight.shape)}")
    cfg = dict(config or default_config(m, n, k))
    block_n, block_k = cfg.pop("BLOCK_N"), cfg.pop("BLOCK_K")
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return y
    _skinny_gemm_kernel[(triton.cdiv(n, block_n),)](
        x, weight, bias if bias is not None else weight, y, m, n, k,
        x.stride(0), weight.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, BLOCK_M=1 if m == 1 else 16, BLOCK_N=block_n,
        BLOCK_K=block_k, EVEN_K=k % block_k == 0, **cfg)
    return y
