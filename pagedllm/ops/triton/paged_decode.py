"""Paged decode attention in Triton: flash-decoding over the block table.

One program serves one (sequence, KV head, partition):

  - GQA: it scores the partition's keys against *all* query heads that share the KV head (the
    group, padded to 16 rows for the tensor cores), so each K/V byte is read once per KV head,
    not once per query head. Decode is memory-bound; this is what makes GQA cheap.
  - split-K: a long context is cut into `num_splits` partitions handled by separate programs,
    so that a small batch with long contexts still puts work on every SM. Each partition writes
    its unnormalised output and softmax statistics (max, sum); `_reduce_kernel` merges them:

      out = sum_p exp2(m_p - M) * acc_p / sum_p exp2(m_p - M) * l_p,   M = max_p m_p

With one partition the first kernel normalises and writes `out` itself (no second launch).
A sliding window W cuts each context to its last W tokens, [max(seq_len - W, 0), seq_len): the
partitions split that range, so blocks before it are never read (they may be freed).
Nothing here reads device memory on the host, so the op can be captured in a CUDA graph.
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
    num_sms,
)

# Split-K policy (see choose_num_splits).
# Measured on an H200 (benchmarks/kernels/paged_decode_bench.py --tune): at batch 64 x 2048
# (512 programs unsplit) one split beat two by ~10%, the merge and partial writes costing more
# than the better wave balance gained; small batches need splits to put loads on every SM.
_FULL_PROGRAMS_PER_SM = 2  # unsplit programs from this many per SM up: no split
_PROGRAMS_PER_SM = 4  # otherwise split until about this many programs per SM
_MIN_PARTITION = 128  # tokens (two KV tiles): shorter ones cost more in the merge than they save
_MAX_SPLITS = 64


@triton.jit
def _paged_decode_kernel(
    out_ptr,  # [S, Hq, D]                 (written when not SPLIT)
    part_out_ptr,  # [S, Hq, P, D] fp32    (written when SPLIT)
    part_m_ptr,  # [S, Hq, P] fp32
    part_l_ptr,  # [S, Hq, P] fp32
    query_ptr,  # [S, Hq, D]
    key_cache_ptr,  # [N, B, Hkv, D]
    value_cache_ptr,  # [N, B, Hkv, D]
    key_scales_ptr,  # [N, B, Hkv] fp32 (int8 caches; else any pointer, unused)
    value_scales_ptr,  # [N, B, Hkv] fp32
    block_tables_ptr,  # [S, M]
    seq_lens_ptr,  # [S]
    scale_log2e,
    window,  # sliding window, or NO_WINDOW
    partition_size,  # tokens per partition, a multiple of BLOCK_N
    num_splits,
    stride_qs,
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
    stride_os,
    stride_oh,
    QUERY_GROUP: tl.constexpr,  # query heads per KV head
    BLOCK_G: tl.constexpr,  # QUERY_GROUP padded to a power of two >= 16
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,  # tokens per cache block
    BLOCK_N: tl.constexpr,  # tokens per KV tile
    SPLIT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    KV_SCALED: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    num_heads = tl.num_programs(1) * QUERY_GROUP

    seq_len = tl.load(seq_lens_ptr + seq)
    ctx_start = tl.maximum(seq_len - window, 0)  # the first key the query sees
    start = ctx_start + split * partition_size
    if SPLIT:
        if start >= seq_len:
            return  # the merge only reads partitions that hold tokens
    # The last partition takes everything left, so a max_seq_len hint that is too small costs
    # speed, never correctness.
    end = tl.minimum(start + partition_size, seq_len)
    if split == num_splits - 1:
        end = seq_len

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    heads = kv_head * QUERY_GROUP + offs_g
    q_mask = (offs_g < QUERY_GROUP)[:, None] & (offs_d < HEAD_DIM)[None, :]
    q_ptrs = query_ptr + seq * stride_qs + heads[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=q_mask, other=0.0)  # [BLOCK_G, BLOCK_D]

    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    q_pos = tl.zeros([BLOCK_G], dtype=tl.int32)  # unused: decode sees its whole context

    k_head_ptr = key_cache_ptr + kv_head * stride_kh
    v_head_ptr = value_cache_ptr + kv_head * stride_vh
    ks_head_ptr = key_scales_ptr + kv_head * stride_sh
    vs_head_ptr = value_scales_ptr + kv_head * stride_sh
    table_ptr = block_tables_ptr + seq.to(tl.int64) * stride_bts
    full_end = start + (end - start) // BLOCK_N * BLOCK_N
    for n0 in range(start, full_end, BLOCK_N):
        acc, m_i, l_i = attend_kv_tile(
            acc, m_i, l_i, q, q_pos, k_head_ptr, v_head_ptr, ks_head_ptr, vs_head_ptr, table_ptr,
            stride_kn, stride_kb, stride_vn, stride_vb, stride_sn, stride_sb,
            n0, end, scale_log2e, window,
            HEAD_DIM, BLOCK_D, BLOCK_SIZE, BLOCK_N, False, False, False, DOT_PRECISION, KV_SCALED,
        )
    if full_end < end:
        acc, m_i, l_i = attend_kv_tile(
            acc, m_i, l_i, q, q_pos, k_head_ptr, v_head_ptr, ks_head_ptr, vs_head_ptr, table_ptr,
            stride_kn, stride_kb, stride_vn, stride_vb, stride_sn, stride_sb,
            full_end, end, scale_log2e, window,
            HEAD_DIM, BLOCK_D, BLOCK_SIZE, BLOCK_N, True, False, False, DOT_PRECISION, KV_SCALED,
        )

    if SPLIT:
        # part_*: [S, Hq, P(, D)] contiguous.
        row = (seq * num_heads + heads).to(tl.int64) * num_splits + split  # [BLOCK_G]
        g_mask = offs_g < QUERY_GROUP
        tl.store(part_m_ptr + row, m_i, mask=g_mask)
        tl.store(part_l_ptr + row, l_i, mask=g_mask)
        tl.store(part_out_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=q_mask)
    else:
        # An empty sequence (seq_len 0, e.g. CUDA-graph padding) yields zeros, not NaN.
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        o_ptrs = out_ptr + seq * stride_os + heads[:, None] * stride_oh + offs_d[None, :]
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=q_mask)


@triton.jit
def _reduce_kernel(
    out_ptr,  # [S, Hq, D]
    part_out_ptr,  # [S, Hq, P, D] fp32
    part_m_ptr,  # [S, Hq, P] fp32
    part_l_ptr,  # [S, Hq, P] fp32
    seq_lens_ptr,
    window,
    partition_size,
    num_splits,
    stride_os,
    stride_oh,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_P: tl.constexpr,  # num_splits padded to a power of two
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + seq)
    # Same ledger as the decode kernel: partitions past the sequence wrote nothing.
    num_valid = tl.minimum(tl.cdiv(tl.minimum(seq_len, window), partition_size), num_splits)

    offs_p = tl.arange(0, BLOCK_P)
    offs_d = tl.arange(0, BLOCK_D)
    p_mask = offs_p < num_valid
    row = (seq * tl.num_programs(1) + head).to(tl.int64) * num_splits + offs_p  # [BLOCK_P]
    m = tl.load(part_m_ptr + row, mask=p_mask, other=float("-inf"))
    l_part = tl.load(part_l_ptr + row, mask=p_mask, other=0.0)
    m_max = tl.max(m, 0)
    w = tl.where(p_mask, tl.exp2(m - m_max), 0.0)  # where(): all-masked rows give -inf - -inf
    denom = tl.sum(w * l_part, 0)
    o_mask = p_mask[:, None] & (offs_d < HEAD_DIM)[None, :]
    part_ptrs = part_out_ptr + row[:, None] * HEAD_DIM + offs_d[None, :]
    parts = tl.load(part_ptrs, mask=o_mask, other=0.0)  # [BLOCK_P, BLOCK_D]
    out = tl.sum(parts * w[:, None], 0) / tl.where(denom > 0, denom, 1.0)
    o_ptrs = out_ptr + seq * stride_os + head * stride_oh + offs_d
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=offs_d < HEAD_DIM)


def choose_num_splits(
    num_seqs: int, num_kv_heads: int, max_seq_len: int, device: torch.device
) -> int:
    """Partitions per sequence: enough programs to fill the GPU, none shorter than
    _MIN_PARTITION tokens (a big batch already fills it: 1 split, no merge)."""
    base = max(1, num_seqs * num_kv_heads)
    if base >= _FULL_PROGRAMS_PER_SM * num_sms(device):
        return 1
    wanted = triton.cdiv(_PROGRAMS_PER_SM * num_sms(device), base)
    return max(1, min(wanted, triton.cdiv(max_seq_len, _MIN_PARTITION), _MAX_SPLITS))


def _decode_config(head_dim: int, device: torch.device) -> tuple[int, int, int]:
    """(BLOCK_N, num_warps, num_stages) for the decode kernel.

    From the H200 sweep at head_dim 128: 64-token tiles, 4 warps and 2 stages led (95% of copy
    bandwidth at batch 64 x 2048; 3 stages and 8 warps were 10-30% slower there).
    """
    block_n = max(16, min(128, 8192 // next_pow2(head_dim)))  # ~16 KB per K (or V) tile in bf16
    return block_n, 4, 2


def paged_decode_attention(
    query: torch.Tensor,  # [S, Hq, D], one query token per sequence
    key_cache: torch.Tensor,  # [N, B, Hkv, D]
    value_cache: torch.Tensor,  # [N, B, Hkv, D]
    block_tables: torch.Tensor,  # [S, M] int32
    seq_lens: torch.Tensor,  # [S] int32
    scale: float,
    max_seq_len: int | None = None,  # max(seq_lens) or any upper bound, if known
    sliding_window: int | None = None,
    key_scales: torch.Tensor | None = None,  # [N, B, Hkv] fp32, int8 caches only
    value_scales: torch.Tensor | None = None,
) -> torch.Tensor:  # [S, Hq, D]
    """Each sequence's single new token attends to its whole context (incl. itself), or to
    its last sliding_window tokens.

    max_seq_len only picks the number of partitions (a wrong value costs speed, not
    correctness); None takes the block tables' width, M * block_size, which needs no host sync.
    Under CUDA graphs pass a bound that holds for every replay (or None).
    """
    if max_seq_len is None:
        max_seq_len = block_tables.shape[1] * key_cache.shape[1]
    if sliding_window is not None:
        max_seq_len = min(max_seq_len, sliding_window)  # the partitions split the window only
    num_splits = choose_num_splits(query.shape[0], key_cache.shape[2], max_seq_len, query.device)
    return _paged_decode(
        query, key_cache, value_cache, block_tables, seq_lens, scale, max_seq_len, num_splits,
        sliding_window=sliding_window, key_scales=key_scales, value_scales=value_scales,
    )


def _paged_decode(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    max_seq_len: int,
    num_splits: int,
    *,
    sliding_window: int | None = None,
    key_scales: torch.Tensor | None = None,
    value_scales: torch.Tensor | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> torch.Tensor:
    """The launcher, with the policy knobs exposed for tests (forced splits) and benchmarks."""
    check_paged_inputs(query, key_cache, value_cache, key_scales, value_scales)
    num_seqs, num_heads, head_dim = query.shape
    _, block_size, num_kv_heads, _ = key_cache.shape
    group = num_heads // num_kv_heads
    out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    if num_seqs == 0:
        return out
    assert block_tables.stride(1) == 1 and seq_lens.is_contiguous()

    cfg_n, cfg_warps, cfg_stages = _decode_config(head_dim, query.device)
    block_n = block_n or cfg_n
    block_d = max(16, next_pow2(head_dim))
    # Partitions are whole KV tiles; recount the splits after rounding.
    partition = triton.cdiv(triton.cdiv(max(max_seq_len, 1), num_splits), block_n) * block_n
    num_splits = max(1, triton.cdiv(max_seq_len, partition))
    split = num_splits > 1
    if split:
        # One workspace (one allocation): out [S, Hq, P, D], then m and l [S, Hq, P], fp32.
        rows = num_seqs * num_heads * num_splits
        workspace = torch.empty(rows * (head_dim + 2), dtype=torch.float32, device=query.device)
        part_out, part_m, part_l = workspace.split([rows * head_dim, rows, rows])
    else:
        part_out = part_m = part_l = out  # unused placeholders

    window = NO_WINDOW if sliding_window is None else sliding_window
    scaled = key_scales is not None
    if not scaled:  # placeholders, never read (KV_SCALED is False)
        key_scales = value_scales = key_cache[:, :, :, 0]
    _paged_decode_kernel[(num_seqs, num_kv_heads, num_splits)](
        out, part_out, part_m, part_l,
        query, key_cache, value_cache, key_scales, value_scales, block_tables, seq_lens,
        scale * LOG2E, window, partition, num_splits,
        query.stride(0), query.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
        key_scales.stride(0), key_scales.stride(1), key_scales.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        QUERY_GROUP=group,
        BLOCK_G=max(16, next_pow2(group)),
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        BLOCK_SIZE=block_size,
        BLOCK_N=block_n,
        SPLIT=split,
        DOT_PRECISION=dot_precision(query.dtype),
        KV_SCALED=scaled,
        num_warps=num_warps or cfg_warps,
        num_stages=num_stages or cfg_stages,
    )
    if split:
        _reduce_kernel[(num_seqs, num_heads)](
            out, part_out, part_m, part_l, seq_lens, window, partition, num_splits,
            out.stride(0), out.stride(1),
            HEAD_DIM=head_dim,
            BLOCK_D=block_d,
            BLOCK_P=next_pow2(num_splits),
            num_warps=4 if block_d * next_pow2(num_splits) <= 8192 else 8,
        )
    return out
