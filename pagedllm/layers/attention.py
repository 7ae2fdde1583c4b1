"""PagedAttention layer: write this step's K/V into the paged cache, then attend through the
block tables (decode-only batches take the decode kernel, anything else the prefill kernel).
A quantized cache (fp8, int8 + scales) is quantized by the write and de-quantized by the kernels.

sliding_window W: a query at position p sees only keys p - W < k <= p (Mistral, Gemma 3's local
layers; HF's convention). When every layer of a model slides, the block manager frees blocks
that have left the window (their table entries become -1), and the kernels never read them."""

from __future__ import annotations

import torch
from torch import nn

from pagedllm.forward_context import get_attention_metadata
from pagedllm.ops import backend


class Attention(nn.Module):
    def __init__(self, num_heads: int, head_dim: int, num_kv_heads: int, scale: float,
                 sliding_window: int | None = None) -> None:
        super().__init__()
        assert sliding_window is None or sliding_window >= 1, sliding_window
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.num_kv_heads = num_kv_heads
        self.scale = scale
        self.sliding_window = sliding_window
        # [2, num_blocks, block_size, num_kv_heads, head_dim]; bound by the cache engine.
        self.kv_cache: torch.Tensor | None = None
        # [2, num_blocks, block_size, num_kv_heads] fp32: an int8 cache's scales, else None.
        self.kv_scales: torch.Tensor | None = None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # q: [T, Hq, D]; k, v: [T, Hkv, D]
        meta = get_attention_metadata()
        key_cache, value_cache = self.kv_cache[0], self.kv_cache[1]
        key_scales = value_scales = None
        if self.kv_scales is not None:
            key_scales, value_scales = self.kv_scales[0], self.kv_scales[1]
        backend.reshape_and_cache(k, v, key_cache, value_cache, meta.slot_mapping, key_scales,
                                  value_scales)
        if meta.is_decode_only:
            return backend.paged_decode_attention(
                q, key_cache, value_cache, meta.block_tables, meta.seq_lens, self.scale,
                max_seq_len=meta.max_seq_len, sliding_window=self.sliding_window,
                key_scales=key_scales, value_scales=value_scales)
        return backend.paged_prefill_attention(
            q, key_cache, value_cache, meta.block_tables, meta.query_start_loc, meta.seq_lens,
            self.scale, max_seq_len=meta.max_seq_len, sliding_window=self.sliding_window,
            key_scales=key_scales, value_scales=value_scales)
