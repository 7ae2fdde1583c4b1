"""KV-cache writes and block copies in Triton.

reshape_and_cache: one program per new token writes its K and V rows (all KV heads) into the
token's slot; slot < 0 is padding (CUDA graphs) and is skipped. It quantizes to the cache's
dtype as ops/torch_ref.quantize_kv does (fp8: saturate; int8: a scale per head, same fp32 ops in
the same order, IEEE divisions (div_rn), so the two agree bit for bit).
copy_blocks: one launch copies whole blocks src -> dst for K and V of every layer, reading each
layer's base address from a small device table of pointers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedllm.ops.triton.common import next_pow2

_INT8_MAX = tl.constexpr(127.0)  # torch_ref.INT8_MAX


@triton.jit
def _quantize_store(x, cache_ptrs, scale_ptrs, mask, h_mask, QUANT: tl.constexpr,
                    FP8_MAX: tl.constexpr):
    """x [BLOCK_H, BLOCK_D] -> the cache's dtype (QUANT 0: cast, 1: fp8, 2: int8 + scales)."""
    if QUANT == 2:
        xf = x.to(tl.float32)
        absmax = tl.max(tl.where(mask, tl.abs(xf), 0.0), 1)  # [BLOCK_H]
        scale = tl.math.div_rn(absmax, tl.full(absmax.shape, _INT8_MAX, tl.float32))
        safe = tl.where(scale > 0, scale, 1.0)
        q = tl.floor(tl.math.div_rn(xf, tl.broadcast_to(safe[:, None], xf.shape)) + 0.5)
        q = tl.minimum(tl.maximum(q, -_INT8_MAX), _INT8_MAX)
        tl.store(cache_ptrs, q.to(tl.int8), mask=mask)
        tl.store(scale_ptrs, scale, mask=h_mask)
    elif QUANT == 1:
        xf = tl.minimum(tl.maximum(x.to(tl.float32), -FP8_MAX), FP8_MAX)
        tl.store(cache_ptrs, xf.to(cache_ptrs.dtype.element_ty), mask=mask)
    else:
        tl.store(cache_ptrs, x.to(cache_ptrs.dtype.element_ty), mask=mask)


@triton.jit
def _reshape_and_cache_kernel(
    key_ptr,  # [T, Hkv, D]
    value_ptr,  # [T, Hkv, D]
    key_cache_ptr,  # [N, B, Hkv, D]
    value_cache_ptr,  # [N, B, Hkv, D]
    key_scales_ptr,  # [N, B, Hkv] fp32 (QUANT 2 only)
    value_scales_ptr,  # [N, B, Hkv] fp32
    slot_mapping_ptr,  # [T]
    num_kv_heads,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_kcn,
    stride_kcb,
    stride_kch,
    stride_vcn,
    stride_vcb,
    stride_vch,
    stride_sn,  # K and V scales share their strides
    stride_sb,
    stride_sh,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    QUANT: tl.constexpr,
    FP8_MAX: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:
        return
    block_id = slot // BLOCK_SIZE
    in_block = slot % BLOCK_SIZE

    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    h_mask = offs_h < num_kv_heads
    mask = h_mask[:, None] & (offs_d < HEAD_DIM)[None, :]
    s_offs = block_id * stride_sn + in_block * stride_sb + offs_h * stride_sh

    k = tl.load(
        key_ptr + token * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask
    )
    kc_ptrs = (
        key_cache_ptr + block_id * stride_kcn + in_block * stride_kcb
        + offs_h[:, None] * stride_kch + offs_d[None, :]
    )
    _quantize_store(k, kc_ptrs, key_scales_ptr + s_offs, mask, h_mask, QUANT, FP8_MAX)

    v = tl.load(
        value_ptr + token * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask
    )
    vc_ptrs = (
        value_cache_ptr + block_id * stride_vcn + in_block * stride_vcb
        + offs_h[:, None] * stride_vch + offs_d[None, :]
    )
    _quantize_store(v, vc_ptrs, value_scales_ptr + s_offs, mask, h_mask, QUANT, FP8_MAX)


def reshape_and_cache(
    key: torch.Tensor,  # [T, Hkv, D]
    value: torch.Tensor,  # [T, Hkv, D]
    key_cache: torch.Tensor,  # [N, B, Hkv, D]
    value_cache: torch.Tensor,  # [N, B, Hkv, D]
    slot_mapping: torch.Tensor,  # [T] int
    key_scales: torch.Tensor | None = None,  # [N, B, Hkv] fp32, int8 caches only
    value_scales: torch.Tensor | None = None,
) -> None:
    """Scatter this step's K/V into their cache slots, quantized to the cache's dtype
    (slot < 0: skip)."""
    num_tokens, num_kv_heads, head_dim = key.shape
    assert value.shape == key.shape and key_cache.shape == value_cache.shape
    assert key_cache.shape[2:] == key.shape[1:] and slot_mapping.shape[0] >= num_tokens
    # Unit stride on head_dim keeps the loads and stores wide; key/value may be views into a
    # fused qkv projection (other strides arbitrary).
    assert key.stride(2) == 1 and value.stride(2) == 1
    assert key_cache.stride(3) == 1 and value_cache.stride(3) == 1
    assert key_cache.dtype == value_cache.dtype
    quant = 2 if key_cache.dtype == torch.int8 else \
        1 if key_cache.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) else 0
    assert (key_scales is not None) == (quant == 2) == (value_scales is not None), \
        "an int8 KV cache needs its scales, other caches have none"
    if quant == 2:
        assert key_scales.shape == value_scales.shape == key_cache.shape[:3]
        assert key_scales.stride() == value_scales.stride()
        assert key_scales.dtype == value_scales.dtype == torch.float32
    else:  # placeholders, never read
        key_scales = value_scales = key_cache[:, :, :, 0]
    if num_tokens == 0:
        return
    _reshape_and_cache_kernel[(num_tokens,)](
        key, value, key_cache, value_cache, key_scales, value_scales, slot_mapping,
        num_kv_heads,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
        key_scales.stride(0), key_scales.stride(1), key_scales.stride(2),
        HEAD_DIM=head_dim,
        BLOCK_H=next_pow2(num_kv_heads),
        BLOCK_D=next_pow2(head_dim),
        BLOCK_SIZE=key_cache.shape[1],
        QUANT=quant,
        FP8_MAX=torch.finfo(key_cache.dtype).max if quant == 1 else 0.0,
        num_warps=4,
    )


@triton.jit
def _copy_blocks_kernel(
    cache_ptrs_ptr,  # [L, 2] int64: data pointers of kv[0] (K) and kv[1] (V) of each layer
    block_mapping_ptr,  # [M, 2] int: (src, dst)
    dtype_ref_ptr,  # any cache tensor: gives the element type of the pointers above
    block_numel,  # B * Hkv * D
    CHUNK: tl.constexpr,
):
    layer = tl.program_id(0)
    pair = tl.program_id(1)
    kind = tl.program_id(2)  # 0: K, 1: V
    base = tl.load(cache_ptrs_ptr + layer * 2 + kind).to(dtype_ref_ptr.dtype)
    src = tl.load(block_mapping_ptr + pair * 2).to(tl.int64) * block_numel
    dst = tl.load(block_mapping_ptr + pair * 2 + 1).to(tl.int64) * block_numel
    for start in range(0, block_numel, CHUNK):
        offs = start + tl.arange(0, CHUNK)
        mask = offs < block_numel
        tl.store(base + dst + offs, tl.load(base + src + offs, mask=mask), mask=mask)


# Pointer tables of the layer lists seen so far, keyed by the pointers themselves: the KV caches
# live for the whole run, so this builds the table once instead of a host->device copy per call.
_cache_ptr_tables: dict[tuple[int, ...], torch.Tensor] = {}


def _cache_ptr_table(kv_caches: list[torch.Tensor]) -> torch.Tensor:
    ptrs = tuple(p for kv in kv_caches for p in (kv[0].data_ptr(), kv[1].data_ptr()))
    table = _cache_ptr_tables.get(ptrs)
    if table is None:
        if len(_cache_ptr_tables) >= 16:  # only tests make many cache lists
            _cache_ptr_tables.clear()
        device = kv_caches[0].device
        table = torch.tensor(ptrs, dtype=torch.int64, device=device).view(-1, 2)
        _cache_ptr_tables[ptrs] = table
    return table


def copy_blocks(kv_caches: list[torch.Tensor], block_mapping: torch.Tensor) -> None:
    """Copy whole blocks src -> dst in every layer (copy-on-write), in one launch.

    kv_caches: per-layer tensors [2, N, B, Hkv, D] or int8 scales [2, N, B, Hkv] (same shape,
    dtype and device);
    block_mapping: [M, 2] int (src, dst). Pairs run in parallel: no block may be both a src
    and a dst (copy-on-write never chains copies within one step).
    """
    if block_mapping.numel() == 0 or not kv_caches:
        return
    first = kv_caches[0]
    for kv in kv_caches:
        assert kv.shape == first.shape and kv.dtype == first.dtype and kv.device == first.device
        # Each half must be a dense [N, B*Hkv*D] array for the flat block offsets below.
        assert kv[0].is_contiguous() and kv[1].is_contiguous()
    block_mapping = block_mapping.to(device=first.device).contiguous()
    block_numel = first[0, 0].numel()
    grid = (len(kv_caches), block_mapping.shape[0], 2)
    _copy_blocks_kernel[grid](
        _cache_ptr_table(kv_caches), block_mapping, first, block_numel,
        CHUNK=min(4096, next_pow2(block_numel)), num_warps=4,
    )
