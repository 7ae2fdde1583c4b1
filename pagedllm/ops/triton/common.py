"""Pieces shared by the paged-attention kernels: one online-softmax step over a KV tile.

A "KV tile" is BLOCK_N consecutive token positions of one sequence; they may span several cache
blocks, so every position looks up its own physical block in the block table:

  position n  ->  block_table[n // BLOCK_SIZE] * block_stride + (n % BLOCK_SIZE) * token_stride

The softmax runs in base 2 (exp2) with the scale folded into one multiplier, log2(e) * scale.

Quantized caches: an fp8 cache is converted where it is loaded (scale 1.0); an int8 cache comes
with per-(token, head) scales (ops/torch_ref.py), applied to the tile rather than to K and V:

  q . (s_n k_n) = s_n (q . k_n)     -> the score columns are multiplied by the key scales
  sum_n p_n (s_n v_n)               -> the probabilities are multiplied by the value scales
                                       (after the row sum l_i, which must not see them)

so the dots take the raw int8 values (exact in fp16/bf16) and no de-quantized tile is built.

A sliding window W hides key n from a query at position p when p - n >= W (HF's convention);
"no window" is passed as NO_WINDOW, larger than any position, so one code path serves both.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
NO_WINDOW = 2**31 - 1  # the window of full attention: every position - NO_WINDOW is < 0


@triton.jit
def attend_kv_tile(
    acc,  # [M, BLOCK_D] fp32, unnormalised output
    m_i,  # [M] fp32, running max of the (log2-scaled) scores
    l_i,  # [M] fp32, running sum of exp2(score - m_i)
    q,  # [M, BLOCK_D], query rows in the query dtype
    q_pos,  # [M] int32, absolute position of each query row (only read when CAUSAL)
    k_head_ptr,  # key_cache + kv_head * stride_kh
    v_head_ptr,  # value_cache + kv_head * stride_vh
    ks_head_ptr,  # key_scales + kv_head * stride_sh (only read when KV_SCALED)
    vs_head_ptr,  # value_scales + kv_head * stride_sh
    block_table_ptr,  # this sequence's block-table row
    stride_kn,
    stride_kb,
    stride_vn,
    stride_vb,
    stride_sn,  # scales [N, B, Hkv]: block and token strides (K and V scales share them)
    stride_sb,
    n0,  # first position of the tile
    kv_end,  # positions >= kv_end are not part of this program's range
    scale_log2e,
    window,  # sliding window (only read when SLIDING)
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASK_KV: tl.constexpr,  # the tile may run past kv_end
    CAUSAL: tl.constexpr,  # the tile may hold positions after some query row
    SLIDING: tl.constexpr,  # the tile may hold positions before some query row's window
    DOT_PRECISION: tl.constexpr,
    KV_SCALED: tl.constexpr,  # int8 cache with per-(token, head) scales
):
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    if MASK_KV:
        mask_n = offs_n < kv_end
        block_ids = tl.load(block_table_ptr + offs_n // BLOCK_SIZE, mask=mask_n, other=0)
    else:
        mask_n = offs_n >= 0  # all true; keeps one code path below
        block_ids = tl.load(block_table_ptr + offs_n // BLOCK_SIZE)
    # int64: block_id * block_stride overflows int32 on caches over 2^31 elements.
    block_ids = block_ids.to(tl.int64)
    in_block = offs_n % BLOCK_SIZE
    kv_mask = mask_n[:, None]
    if BLOCK_D != HEAD_DIM:
        kv_mask = kv_mask & (offs_d[None, :] < HEAD_DIM)
    k_ptrs = k_head_ptr + (block_ids * stride_kn + in_block * stride_kb)[:, None] + offs_d[None, :]
    if MASK_KV or BLOCK_D != HEAD_DIM:
        k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
    else:
        k = tl.load(k_ptrs)

    s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=DOT_PRECISION) * scale_log2e
    if KV_SCALED:
        s_offs = block_ids * stride_sn + in_block * stride_sb
        k_scale = tl.load(ks_head_ptr + s_offs, mask=mask_n, other=0.0)
        v_scale = tl.load(vs_head_ptr + s_offs, mask=mask_n, other=0.0)
        s = s * k_scale[None, :]
    if CAUSAL:
        visible = mask_n[None, :] & (offs_n[None, :] <= q_pos[:, None])
        if SLIDING:
            visible = visible & (offs_n[None, :] > q_pos[:, None] - window)
        s = tl.where(visible, s, float("-inf"))
    elif MASK_KV:
        s = tl.where(mask_n[None, :], s, float("-inf"))

    # NOTE: without a window every row has seen at least one visible key before (or in) this
    # tile, so m_new is finite and exp2(-inf - m_new) = 0 handles the first tile without a
    # special case. A window can hide a whole tile from a row that has seen nothing yet: it
    # then subtracts 0, not -inf, so that its terms stay 0 instead of exp2(-inf + inf) = NaN.
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_sub = m_new
    if SLIDING:
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_sub)
    p = tl.exp2(s - m_sub[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)

    v_ptrs = v_head_ptr + (block_ids * stride_vn + in_block * stride_vb)[:, None] + offs_d[None, :]
    if MASK_KV or BLOCK_D != HEAD_DIM:
        v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
    else:
        v = tl.load(v_ptrs)
    if KV_SCALED:
        p = p * v_scale[None, :]
    acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=DOT_PRECISION)
    return acc, m_new, l_i


def dot_precision(dtype: torch.dtype) -> str:
    # fp32 callers are tests and the CPU-sized oracle checks: keep them exact, not tf32.
    return "ieee" if dtype == torch.float32 else "tf32"


KV_CACHE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float8_e4m3fn,
                   torch.float8_e5m2, torch.int8)


def check_paged_inputs(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                       key_scales: torch.Tensor | None = None,
                       value_scales: torch.Tensor | None = None):
    assert query.dim() == 3 and key_cache.dim() == 4, "query [T, Hq, D], cache [N, B, Hkv, D]"
    assert key_cache.shape == value_cache.shape and key_cache.dtype == value_cache.dtype
    assert key_cache.dtype in KV_CACHE_DTYPES, key_cache.dtype
    assert (key_scales is not None) == (key_cache.dtype == torch.int8) \
        and (value_scales is not None) == (key_scales is not None), \
        "an int8 KV cache needs its scales, other caches have none"
    if key_scales is not None:
        assert key_scales.shape == value_scales.shape == key_cache.shape[:3]
        assert key_scales.dtype == value_scales.dtype == torch.float32
        assert key_scales.stride() == value_scales.stride()
    assert query.shape[2] == key_cache.shape[3], "head_dim of query and cache differ"
    assert query.shape[1] % key_cache.shape[2] == 0, "num_heads must be a multiple of num_kv_heads"
    # The kernels index the last dimension with unit stride (it is what makes loads wide).
    assert query.stride(2) == 1 and key_cache.stride(3) == 1 and value_cache.stride(3) == 1
    assert query.dtype in (torch.float16, torch.bfloat16, torch.float32)


@functools.cache
def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; a small stand-in elsewhere (interpreter)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def next_pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))

