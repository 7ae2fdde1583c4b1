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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def reshape_and_cache(
    key: torch.Tensor,  # [T, Hkv, D]
    value: torch.Tensor,  # [T, Hkv, D]
    key_cache: torch.Tensor,  # [N, B, Hkv, D]
    value_cache: torch.Tensor,  # [N, B, Hkv, D]
    slot_mapping: torch.Tensor,  # [T] int
) -> None:
    """Scatter this step's K/V into their cache slots."""
    valid = slot_mapping >= 0
    slots = slot_mapping[valid].long()
    key_cache.view(-1, *key_cache.shape[2:])[slots] = key[valid].to(key_cache.dtype)
    value_cache.view(-1, *value_cache.shape[2:])[slots] = value[valid].to(value_cache.dtype)


def copy_blocks(kv_caches: list[torch.Tensor], block_mapping: torch.Tensor) -> None:
    """Copy whole blocks src -> dst in every layer (copy-on-write).

    kv_caches: per-layer tensors [2, N, B, Hkv, D]; block_mapping: [M, 2] int (src, dst).
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
    """Tokens [start, end) of one sequence, in order: [end - start, Hkv, D]. start is a multiple
    of the block size (blocks before it may be freed)."""
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
) -> torch.Tensor:  # [S, Hq, D]
    """Each sequence's single new token attends to its whole context (incl. itself), or to
    its last sliding_window tokens."""
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
    k = key_cache[table].flatten(1, 2)
    v = value_cache[table].flatten(1, 2)
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
        k.transpose(1, 2).to(query.dtype),  # [S, Hkv, L, D] (a strided view, no copy)
        v.transpose(1, 2).to(query.dtype),
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
) -> torch.Tensor:  # [T, Hq, D]
    """Variable-length chunks, each the *last* q_len tokens of its sequence, attend causally.

    Query j of a sequence with context length L and chunk length q sits at absolute position
    p = L - q + j and sees keys 0 .. p (a bottom-right aligned causal mask), or with a window W
    only keys p - W + 1 .. p. Decode is the q == 1 case, so this op also serves mixed prefill +
    decode batches.
    """
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
        k = _gather_context(key_cache, block_tables[i], k0, seq_len).to(query.dtype)
        v = _gather_context(value_cache, block_tables[i], k0, seq_len).to(query.dtype)
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
