"""Pure-PyTorch paged-attention ops: the CPU path and the oracle for every Triton kernel.

Layouts (shared with ops/triton/*, same signatures):
  key_cache, value_cache: [num_blocks, block_size, num_kv_heads, head_dim]   (one layer)
  slot = block_id * block_size + offset;  slot < 0 means "do not write" (CUDA-graph padding).
  block_tables: [num_seqs, max_blocks_per_seq] int32, unused tail entries are ignored.
  seq_lens:     [num_seqs] int32, context length *including* the tokens of this step.
  query_start_loc: [num_seqs + 1] int32, prefix sums of the query lengths of this step.
  sliding_window: None, or W: a query at position p sees keys p - W < k <= p (W keys, itself
                  included; HF's convention). Blocks wholly before the window may already be
                  freed (their table entries are -1): no op reads them.

The new tokens' K/V are written into the cache before attention runs (write, then attend), so
attention only ever reads K/V from the paged cache.

Quantized caches (--kv-cache-dtype; the write quantizes, attention de-quantizes):
  float8 (e4m3fn, e5m2): the value itself, saturated to the format's range (scale 1.0: a float
                  format's relative error does not depend on a scale, only its range does).
  int8:           symmetric, one fp32 scale per (token, KV head) in key_scales / value_scales
                  [num_blocks, block_size, num_kv_heads], paged like the cache (same block ids):
                  s = absmax / 127, q = floor(x / s + 0.5), x ~ q * s. A per-token scale is
                  fixed when the token is written, so appending to a block never re-quantizes it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pagedllm.forward_context import per_pass

INT8_MAX = 127.0  # symmetric int8: -128 is never used, so q and -q are both representable
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def quantize_kv(x: torch.Tensor, cache_dtype: torch.dtype
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x [..., D] -> (values in cache_dtype, per-row fp32 scales [...] for int8, else None).
    The Triton write kernel computes the same fp32 operations in the same order (bit-equal)."""
    if cache_dtype == torch.int8:
        xf = x.float()
        scale = xf.abs().amax(-1) / INT8_MAX
        # NOTE: a division, not a multiplication by 1 / scale: a GPU fuses x * inv + 0.5 into
        # one FMA (one rounding, not two), and the Triton kernel would then differ at ties.
        safe = torch.where(scale > 0, scale, 1.0)[..., None]  # an all-zero row stays 0
        q = torch.floor(xf / safe + 0.5).clamp_(-INT8_MAX, INT8_MAX)
        return q.to(torch.int8), scale
    if cache_dtype in FP8_DTYPES:
        # Saturate: e4m3fn has no inf (an overflow would be NaN), e5m2 would give inf.
        fmax = torch.finfo(cache_dtype).max
        return x.float().clamp(-fmax, fmax).to(cache_dtype), None
    return x.to(cache_dtype), None


def dequantize_kv(values: torch.Tensor, scales: torch.Tensor | None, dtype: torch.dtype
                  ) -> torch.Tensor:
    """Cache values [..., D] (+ int8 scales [...]) -> dtype."""
    if scales is None:
        return values.to(dtype)
    return (values.float() * scales[..., None]).to(dtype)


def _check_scales(cache: torch.Tensor, scales: torch.Tensor | None) -> None:
    assert (scales is not None) == (cache.dtype == torch.int8), \
        "an int8 KV cache needs its scales, other caches have none"
    assert scales is None or scales.shape == cache.shape[:3], (scales.shape, cache.shape)


def reshape_and_cache(
    key: torch.Tensor,  # [T, Hkv, D]
    value: torch.Tensor,  # [T, Hkv, D]
    key_cache: torch.Tensor,  # [N, B, Hkv, D]
    value_cache: torch.Tensor,  # [N, B, Hkv, D]
    slot_mapping: torch.Tensor,  # [T] int
    key_scales: torch.Tensor | None = None,  # [N, B, Hkv] fp32, int8 caches only
    value_scales: torch.Tensor | None = None,
) -> None:
    """Scatter this step's K/V into their cache slots, quantized to the cache's dtype."""
    valid, slots = _write_slots(slot_mapping)
    for x, cache, scales in ((key, key_cache, key_scales), (value, value_cache, value_scales)):
        _check_scales(cache, scales)
        q, s = quantize_kv(x if valid is None else x[valid], cache.dtype)
        cache.view(-1, *cache.shape[2:])[slots] = q
        if scales is not None:
            scales.view(-1, scales.shape[2])[slots] = s


def _write_slots(slot_mapping: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(row mask, or None when every row is written; the slots written, int64). Every layer of
    a step writes through the same slot_mapping, and on CPU the mask, its nonzero and the
    gathers cost ~8 small ops per layer, so a forward pass works them out once (per_pass)."""
    if slot_mapping.device.type != "cpu":  # no host sync on a GPU: always the masked path
        valid = slot_mapping >= 0
        return valid, slot_mapping[valid].long()

    def work_out():
        valid = slot_mapping >= 0
        mask = None if bool(valid.all()) else valid
        return mask, slot_mapping.long() if mask is None else slot_mapping[mask].long()

    return per_pass("kv-write slots", (slot_mapping,), work_out)


def copy_blocks(kv_caches: list[torch.Tensor], block_mapping: torch.Tensor) -> None:
    """Copy whole blocks src -> dst in every layer (copy-on-write).

    kv_caches: per-layer tensors [2, N, B, Hkv, D] (or an int8 cache's scales [2, N, B, Hkv]);
    block_mapping: [M, 2] int (src, dst).
    """
    if block_mapping.numel() == 0:
        return
    src = block_mapping[:, 0].long()
    dst = block_mapping[:, 1].long()
    for kv in kv_caches:
        kv[:, dst] = kv[:, src]


def _gather_context(
    cache: torch.Tensor, block_table: torch.Tensor, start: int, end: int
) -> torch.Tensor:
    """Tokens [start, end) of one sequence, in order: [end - start, Hkv(, D)] (a cache or its
    scales). start is a multiple of the block size (blocks before it may be freed)."""
    block_size = cache.shape[1]
    first, num_blocks = start // block_size, (end + block_size - 1) // block_size
    blocks = cache[block_table[first:num_blocks].long()]  # [nb, B, Hkv, D]
    return blocks.reshape(-1, *cache.shape[2:])[:end - start]


def paged_decode_attention(
    query: torch.Tensor,  # [S, Hq, D], one query token per sequence
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [S, M]
    seq_lens: torch.Tensor,  # [S]
    scale: float,
    max_seq_len: int | None = None,  # max(seq_lens) if known (saves a host sync)
    sliding_window: int | None = None,
    key_scales: torch.Tensor | None = None,  # [N, B, Hkv] fp32, int8 caches only
    value_scales: torch.Tensor | None = None,
) -> torch.Tensor:  # [S, Hq, D]
    """Each sequence's single new token attends to its whole context (incl. itself), or to
    its last sliding_window tokens."""
    _check_scales(key_cache, key_scales)
    _check_scales(value_cache, value_scales)
    num_seqs, num_heads, head_dim = query.shape
    if num_seqs == 0:
        return torch.empty_like(query)
    block_size = key_cache.shape[1]
    max_len = int(seq_lens.max()) if max_seq_len is None else max_seq_len
    # An upper bound wider than the block tables is clipped to them, and bounds every sequence.
    width = block_tables.shape[1]
    max_len = min(max_len, width * block_size)
    num_blocks = (max_len + block_size - 1) // block_size
    seq_lens = seq_lens.to(block_tables.device).long().clamp_max(max_len)
    # Column j of sequence s is its logical block first[s] + j: all blocks from 0, or only the
    # blocks that hold the window (a window spans at most cdiv(W, B) + 1 of them).
    first = torch.zeros_like(seq_lens)
    if sliding_window is not None:
        first = (seq_lens - sliding_window).clamp_min(0) // block_size
        num_blocks = min(num_blocks, (sliding_window + block_size - 1) // block_size + 1)
    cols = first[:, None] + torch.arange(num_blocks, device=first.device)[None, :]  # [S, nb]
    # Entries past a sequence's own blocks are unused and may hold anything (padding, stale
    # ids): point them at block 0 so the gather stays in bounds; the mask below hides them.
    used = cols * block_size < seq_lens[:, None]
    table = block_tables.long().gather(1, cols.clamp_max(width - 1))
    table = torch.where(used, table, 0)
    # Gather every sequence's blocks at once and mask the rest: [S, L, Hkv, D].
    k = dequantize_kv(key_cache[table].flatten(1, 2),
                      None if key_scales is None else key_scales[table].flatten(1, 2), query.dtype)
    v = dequantize_kv(value_cache[table].flatten(1, 2),
                      None if value_scales is None else value_scales[table].flatten(1, 2),
                      query.dtype)
    pos = (cols[:, :, None] * block_size
           + torch.arange(block_size, device=cols.device)).flatten(1)  # [S, L]
    mask = pos < seq_lens[:, None]
    if sliding_window is not None:
        mask &= pos >= seq_lens[:, None] - sliding_window
    mask = mask.to(query.device)
    # Grouped-query attention without repeating K/V: the G query heads that share a KV head
    # play the role of G query positions attending (non-causally) to that head's context.
    num_kv_heads = key_cache.shape[2]
    q = query.view(num_seqs, num_kv_heads, num_heads // num_kv_heads, head_dim)  # [S, Hkv, G, D]
    out = F.scaled_dot_product_attention(
        q,
        k.transpose(1, 2),  # [S, Hkv, L, D] (a strided view, no copy)
        v.transpose(1, 2),
        attn_mask=mask[:, None, None, :],
        scale=scale,
    )
    return out.reshape(num_seqs, num_heads, head_dim)  # [S, Hq, D]


def paged_prefill_attention(
    query: torch.Tensor,  # [T, Hq, D], concatenated query chunks
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [S, M]
    query_start_loc: torch.Tensor,  # [S + 1]
    seq_lens: torch.Tensor,  # [S]
    scale: float,
    max_seq_len: int | None = None,  # unused here; part of the shared signature
    sliding_window: int | None = None,
    key_scales: torch.Tensor | None = None,  # [N, B, Hkv] fp32, int8 caches only
    value_scales: torch.Tensor | None = None,
) -> torch.Tensor:  # [T, Hq, D]
    """Variable-length chunks, each the *last* q_len tokens of its sequence, attend causally.

    Query j of a sequence with context length L and chunk length q sits at absolute position
    p = L - q + j and sees keys 0 .. p (a bottom-right aligned causal mask), or with a window W
    only keys p - W + 1 .. p. Decode is the q == 1 case, so this op also serves mixed prefill +
    decode batches.
    """
    _check_scales(key_cache, key_scales)
    _check_scales(value_cache, value_scales)
    out = torch.empty_like(query)
    starts = query_start_loc.tolist()
    lens = seq_lens.tolist()
    block_size = key_cache.shape[1]
    for i, seq_len in enumerate(lens):
        q0, q1 = starts[i], starts[i + 1]
        q_len = q1 - q0
        if q_len == 0:
            continue
        # The chunk's first query sees keys from k0 on (rounded down to its block).
        k0 = 0
        if sliding_window is not None:
            k0 = max(seq_len - q_len - sliding_window + 1, 0) // block_size * block_size
        k, v = (
            dequantize_kv(_gather_context(cache, block_tables[i], k0, seq_len),
                          None if scales is None
                          else _gather_context(scales, block_tables[i], k0, seq_len),
                          query.dtype)
            for cache, scales in ((key_cache, key_scales), (value_cache, value_scales)))
        q = query[q0:q1].transpose(0, 1)  # [Hq, q, D]
        if q_len == seq_len and sliding_window is None:
            mask, causal = None, True  # whole prompt: SDPA's top-left causal is the same thing
        else:
            q_pos = torch.arange(seq_len - q_len, seq_len, device=query.device)[:, None]
            k_pos = torch.arange(k0, seq_len, device=query.device)[None, :]
            mask, causal = k_pos <= q_pos, False  # [q, L - k0]
            if sliding_window is not None:
                mask &= k_pos > q_pos - sliding_window
        o = F.scaled_dot_product_attention(
            q, k.transpose(0, 1), v.transpose(0, 1),
            attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=True,
        )
        out[q0:q1] = o.transpose(0, 1)
    return out
