"""Paged prefill attention in Triton: variable-length query chunks over the block table.

Each sequence contributes the *last* q_len of its seq_len tokens (chunked prefill, prefix-cache
hits, or a q_len 1 decode row in a mixed batch); query j sits at position seq_len - q_len + j and
sees keys 0 .. that position (bottom-right aligned causal mask); with a sliding window W only
the last W of them.

One program serves one tile of BLOCK_Q query tokens x all QUERY_GROUP heads of one KV head. The
group is packed into the tile's rows, so K/V are read once per KV head (GQA):

  row r  ->  token  q_tile * BLOCK_Q + r // G,   head  kv_head * G + r % G     (G: QUERY_GROUP)
  (BLOCK_Q = BLOCK_M // G; with a group of 3 and BLOCK_M 64, row 63 is padding)

The grid has a fixed upper bound of tiles, T // BLOCK_Q + S, computed from shapes (no host sync,
CUDA-graph safe). Sequence s owns tiles [first_tile(s), first_tile(s + 1)) with

  first_tile(s) = query_start_loc[s] // BLOCK_Q + s

which is strictly increasing and leaves every sequence at least cdiv(q_len, BLOCK_Q) tiles; a
program finds its sequence by binary search and exits if its tile holds no query.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedllm.ops.triton.common import (
    LOG2E,
    NO_WINDOW,
    attend_kv_tile,
    check_paged_inputs,
    dot_precision,
    next_pow2,
)


@triton.jit
def _paged_prefill_kernel(
    out_ptr,  # [T, Hq, D]
    query_ptr,  # [T, Hq, D]
    key_cache_ptr,  # [N, B, Hkv, D]
    value_cache_ptr,  # [N, B, Hkv, D]
    key_scales_ptr,  # [N, B, Hkv] fp32 (int8 caches; else any pointer, unused)
    value_scales_ptr,  # [N, B, Hkv] fp32
    block_tables_ptr,  # [S, M]
    query_start_loc_ptr,  # [S + 1]
    seq_lens_ptr,  # [S]
    scale_log2e,
    window,  # sliding window, or NO_WINDOW
    num_seqs,
    stride_qt,
    stride_qh,
    stride_kn,
    stride_kb,
    stride_kh,
    stride_vn,
    stride_vb,
    stride_vh,
    stride_sn,
    stride_sb,
    stride_sh,
    stride_bts,
    stride_ot,
    stride_oh,
    QUERY_GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,  # rows per tile (tokens x group), a power of two
    BLOCK_Q: tl.constexpr,  # query tokens per tile, BLOCK_M // QUERY_GROUP
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    KV_SCALED: tl.constexpr,
):
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)

    # Largest seq with first_tile(seq) <= tile (see the module docstring).
    lo = tile * 0  # a runtime int32 (num_seqs may arrive as the constant 1)
    hi = lo + num_seqs - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        first = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
        lo = tl.where(first <= tile, mid, lo)
        hi = tl.where(first <= tile, hi, mid - 1)
    seq = lo

    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    q_tile = tile - (q_start // BLOCK_Q + seq)
    if q_tile * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context_len = seq_len - q_len  # tokens before this chunk (cached prefix or earlier chunks)

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    tok = q_tile * BLOCK_Q + offs_m // QUERY_GROUP  # [BLOCK_M], index within the chunk
    heads = kv_head * QUERY_GROUP + offs_m % QUERY_GROUP
    row_mask = (offs_m < BLOCK_Q * QUERY_GROUP) & (tok < q_len)
    q_mask = row_mask[:, None] & (offs_d < HEAD_DIM)[None, :]
    q_rows = (q_start + tok).to(tl.int64)
    q_ptrs = query_ptr + q_rows[:, None] * stride_qt + heads[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=q_mask, other=0.0)  # [BLOCK_M, BLOCK_D]
    q_pos = context_len + tok

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)

    k_head_ptr = key_cache_ptr + kv_head * stride_kh
    v_head_ptr = value_cache_ptr + kv_head * stride_vh
    ks_head_ptr = key_scales_ptr + kv_head * stride_sh
    vs_head_ptr = value_scales_ptr + kv_head * stride_sh
    table_ptr = block_tables_ptr + seq.to(tl.int64) * stride_bts
    # The tile's rows sit at first_pos .. last_pos (= kv_end - 1); its keys fall into three runs:
    #
    #   [lo, mid)           some rows' windows start after these keys: window + causal mask
    #   [mid, full_end)     whole KV tiles that every row sees (>= last_pos - W + 1 and
    #                       <= first_pos): no mask
    #   [full_end, kv_end)  after some rows' positions: causal mask (every window reaches them)
    #
    # lo = max(first_pos - W + 1, 0): the first key any row sees; mid = max(last_pos - W + 1, lo)
    # rounded up to whole tiles from lo. Without a window (W = NO_WINDOW) lo = mid = 0.
    first_pos = context_len + q_tile * BLOCK_Q
    kv_end = tl.minimum(context_len + (q_tile + 1) * BLOCK_Q, seq_len)
    lo = tl.maximum(first_pos - window + 1, 0)
    mid_end = tl.maximum(kv_end - window, lo)  # kv_end - 1 is the last row's position
    for n0 in range(lo, mid_end, BLOCK_N):
        acc, m_i, l_i = attend_kv_tile(
            acc, m_i, l_i, q, q_pos, k_head_ptr, v_head_ptr, ks_head_ptr, vs_head_ptr, table_ptr,
            stride_kn, stride_kb, stride_vn, stride_vb, stride_sn, stride_sb,
            n0, kv_end, scale_log2e, window,
            HEAD_DIM, BLOCK_D, BLOCK_SIZE, BLOCK_N, True, True, True, DOT_PRECISION, KV_SCALED,
        )
    mid = lo + tl.cdiv(mid_end - lo, BLOCK_N) * BLOCK_N
    full_end = mid + tl.maximum(first_pos + 1 - mid, 0) // BLOCK_N * BLOCK_N
    for n0 in range(mid, full_end, BLOCK_N):
        acc, m_i, l_i = attend_kv_tile(
            acc, m_i, l_i, q, q_pos, k_head_ptr, v_head_ptr, ks_head_ptr, vs_head_ptr, table_ptr,
            stride_kn, stride_kb, stride_vn, stride_vb, stride_sn, stride_sb,
            n0, kv_end, scale_log2e, window,
            HEAD_DIM, BLOCK_D, BLOCK_SIZE, BLOCK_N, False, False, False, DOT_PRECISION, KV_SCALED,
        )
    for n0 in range(full_end, kv_end, BLOCK_N):
        acc, m_i, l_i = attend_kv_tile(
            acc, m_i, l_i, q, q_pos, k_head_ptr, v_head_ptr, ks_head_ptr, vs_head_ptr, table_ptr,
            stride_kn, stride_kb, stride_vn, stride_vb, stride_sn, stride_sb,
            n0, kv_end, scale_log2e, window,
            HEAD_DIM, BLOCK_D, BLOCK_SIZE, BLOCK_N, True, True, False, DOT_PRECISION, KV_SCALED,
        )

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    o_ptrs = out_ptr + q_rows[:, None] * stride_ot + heads[:, None] * stride_oh + offs_d[None, :]
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=q_mask)


def prefill_block_m(num_tokens: int, num_seqs: int, group: int) -> int:
    """Rows per tile (BLOCK_M) for a batch of this shape: the one choice that depends on it.

    Short average chunks (decode rows in a mixed batch) get small tiles so that few rows go
    to padding; long prompts get 128-row tiles that keep the tensor cores busy. Non-increasing
    in num_seqs: worker/cuda_graph.py relies on that to pick, for a padded batch, the padded
    row count that keeps the tile size of the real one.
    """
    rows_per_seq = triton.cdiv(num_tokens, max(num_seqs, 1)) * group
    block_m = 128 if rows_per_seq >= 128 else 64 if rows_per_seq >= 32 else 16
    return max(block_m, next_pow2(group))


def _prefill_config(
    num_tokens: int, num_seqs: int, group: int, head_dim: int
) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages), from shapes only (no host sync)."""
    block_m = prefill_block_m(num_tokens, num_seqs, group)
    block_n = 64 if head_dim <= 128 else 32
    num_warps = 8 if block_m >= 128 else 4
    return block_m, block_n, num_warps, 3 if head_dim <= 128 else 2


def paged_prefill_attention(
    query: torch.Tensor,  # [T, Hq, D], concatenated query chunks
    key_cache: torch.Tensor,  # [N, B, Hkv, D]
    value_cache: torch.Tensor,  # [N, B, Hkv, D]
    block_tables: torch.Tensor,  # [S, M] int32
    query_start_loc: torch.Tensor,  # [S + 1] int32
    seq_lens: torch.Tensor,  # [S] int32
    scale: float,
    max_seq_len: int | None = None,  # unused: the grid comes from shapes alone
    sliding_window: int | None = None,
    key_scales: torch.Tensor | None = None,  # [N, B, Hkv] fp32, int8 caches only
    value_scales: torch.Tensor | None = None,
) -> torch.Tensor:  # [T, Hq, D]
    """Variable-length chunks, each the *last* q_len tokens of its sequence, attend causally.

    Same contract as torch_ref.paged_prefill_attention; the chunk's own K/V must already be in
    the cache (reshape_and_cache runs first).
    """
    check_paged_inputs(query, key_cache, value_cache, key_scales, value_scales)
    num_tokens, num_heads, head_dim = query.shape
    _, block_size, num_kv_heads, _ = key_cache.shape
    num_seqs = seq_lens.shape[0]
    group = num_heads // num_kv_heads
    out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    if num_tokens == 0 or num_seqs == 0:
        return out
    assert query_start_loc.shape[0] == num_seqs + 1 and block_tables.stride(1) == 1

    block_m, block_n, num_warps, num_stages = _prefill_config(
        num_tokens, num_seqs, group, head_dim
    )
    block_q = block_m // group
    num_tiles = num_tokens // block_q + num_seqs
    scaled = key_scales is not None
    if not scaled:  # placeholders, never read (KV_SCALED is False)
        key_scales = value_scales = key_cache[:, :, :, 0]
    _paged_prefill_kernel[(num_tiles, num_kv_heads)](
        out, query, key_cache, value_cache, key_scales, value_scales, block_tables,
        query_start_loc, seq_lens,
        scale * LOG2E, NO_WINDOW if sliding_window is None else sliding_window, num_seqs,
        query.stride(0), query.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
        key_scales.stride(0), key_scales.stride(1), key_scales.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        QUERY_GROUP=group,
        BLOCK_M=block_m,
        BLOCK_Q=block_q,
        HEAD_DIM=head_dim,
        BLOCK_D=max(16, next_pow2(head_dim)),
        BLOCK_SIZE=block_size,
        BLOCK_N=block_n,
        DOT_PRECISION=dot_precision(query.dtype),
        KV_SCALED=scaled,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out
