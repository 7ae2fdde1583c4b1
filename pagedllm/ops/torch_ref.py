"""Pure-PyTorch paged-attention ops: the CPU path and the oracle for every Triton kernel.

Layouts (shared with ops/triton/*, same signatures):
  key_cache, value_cache: [num_blocks, block_size, num_kv_heads, head_dim]   (one layer)
  slot = block_id * block_size + offset;  slot < 0 means "do not write" (CUDA-graph padding).
  block_tables: [num_seqs, max_blocks_per_seq] int32, unused tail entries are ignored.
  seq_lens:     [num_seqs] int32, context length *including* the tokens of this step.
  query_start_loc: [num_seqs + 1] int32, prefix sums of the query lengths of this step.

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
    cache: torch.Tensor, block_table: torch.Tensor, seq_len: int
) -> torch.Tensor:
    """The first seq_len tokens of one sequence, in order: [seq_len, Hkv, D]."""
    block_size = cache.shape[1]
    num_blocks = (seq_len + block_size - 1) // block_size
    blocks = cache[block_table[:num_blocks].long()]  # [nb, B, Hkv, D]
    return blocks.reshape(-1, *cache.shape[2:])[:seq_len]


def paged_decode_attention(
    query: torch.Tensor,  # [S, Hq, D], one query token per sequence
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [S, M]
    seq_lens: torch.Tensor,  # [S]
    scale: float,
    max_seq_len: int | None = None,  # max(seq_lens) if known (saves a host sync)
) -> torch.Tensor:  # [S, Hq, D]
    """Each sequence's single new token attends to its whole context (incl. itself)."""
    num_seqs, num_heads, head_dim = query.shape
    if num_seqs == 0:
        return torch.empty_like(query)
    block_size = key_cache.shape[1]
    max_len = int(seq_lens.max()) if max_seq_len is None else max_seq_len
    # An upper bound wider than the block tables is clipped to them.
    num_blocks = min((max_len + block_size - 1) // block_size, block_tables.shape[1])
    max_len = min(max_len, num_blocks * block_size)
    table = block_tables[:, :num_blocks].long()
    # Entries past a sequence's own blocks are unused and may hold anything (padding, stale
    # ids): point them at block 0 so the gather stays in bounds; the mask below hides them.
    used = torch.arange(num_blocks, device=table.device)[None, :] * block_size
    table = torch.where(used < seq_lens[:, None].to(table.device), table, 0)
    # Gather every sequence's blocks at once and mask the padded tail: [S, L, Hkv, D].
    k = key_cache[table].flatten(1, 2)[:, :max_len]
    v = value_cache[table].flatten(1, 2)[:, :max_len]
    pos = torch.arange(max_len, device=query.device)
    mask = pos[None, :] < seq_lens[:, None].to(query.device)  # [S, L]
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
) -> torch.Tensor:  # [T, Hq, D]
    """Variable-length chunks, each the *last* q_len tokens of its sequence, attend causally.

    Query j of a sequence with context length L and chunk length q sits at absolute position
    L - q + j and sees keys 0 .. L - q + j (a bottom-right aligned causal mask). Decode is the
    q == 1 case, so this op also serves mixed prefill + decode batches.
    """
    out = torch.empty_like(query)
    starts = query_start_loc.tolist()
    lens = seq_lens.tolist()
    for i, seq_len in enumerate(lens):
        q0, q1 = starts[i], starts[i + 1]
        q_len = q1 - q0
        if q_len == 0:
            continue
        k = _gather_context(key_cache, block_tables[i], seq_len).to(query.dtype)
        v = _gather_context(value_cache, block_tables[i], seq_len).to(query.dtype)
        q = query[q0:q1].transpose(0, 1)  # [Hq, q, D]
        if q_len == seq_len:
            mask, causal = None, True  # whole prompt: SDPA's top-left causal is the same thing
        else:
            q_pos = torch.arange(seq_len - q_len, seq_len, device=query.device)
            k_pos = torch.arange(seq_len, device=query.device)
            mask, causal = k_pos[None, :] <= q_pos[:, None], False
        o = F.scaled_dot_product_attention(
            q, k.transpose(0, 1), v.transpose(0, 1),
            attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=True,
        )
        out[q0:q1] = o.transpose(0, 1)
    return out
