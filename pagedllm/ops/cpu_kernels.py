"""C++ paged decode attention for CPU tensors (csrc/paged_decode_cpu.cpp), twin of
torch_ref.paged_decode_attention.

The twin gathers every sequence's whole context out of the paged cache (a copy) in every layer
before SDPA; on a CPU that copy is most of decode attention's time. The kernel reads K/V rows in
place through the block table, once for all the query heads of a KV head, prefetching the next
block, and runs tasks (a row, or a tile of up to 16 consecutive rows of one prompt; all its KV
heads or one) on torch's intra-op threads, the costliest first. Arithmetic is fp32 (bf16 caches
are widened on load); it matches the twin to ~1e-6 in fp32 (tests/ops/test_cpu_kernels.py).

`paged_prefill_attention` runs prompt and chunk rows through the same kernel, each row a one-token
query over its own context: batch-invariant mode's one attention path (ops/batch_invariant.py),
and the CPU prompt path elsewhere too (ops/backend.py).

It is built on first use by ops/cpu_build.py (cached; called through ctypes); if it cannot be
built or loaded, one warning is logged and the twin serves every call. PAGEDLLM_CPU_KERNELS=0
turns it off (read at import).
"""

from __future__ import annotations

import ctypes

import torch

from pagedllm.forward_context import per_pass
from pagedllm.ops import torch_ref
from pagedllm.ops.cpu_build import CppLibrary

_DTYPES = (torch.float32, torch.bfloat16)

_ptr, _i32, _i64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
_ARGTYPES = (
    [_ptr] * 6 + [_i32]  # query, key_cache, value_cache, block_tables, seq_lens, out, is_bf16
    + [_i64] * 6  # num_seqs, num_heads, num_kv_heads, head_dim, num_blocks, block_size
    + [ctypes.c_float, _i64, _i64]  # scale, max_len, window
    + [_i64] * 6  # strides: query (seq, head), caches (block, token, head), block_tables (seq)
)


def _declare(lib: ctypes.CDLL) -> None:
    lib.pagedllm_paged_decode_attention.argtypes = _ARGTYPES
    lib.pagedllm_paged_decode_attention.restype = _i32
    lib.pagedllm_reshape_and_cache.argtypes = [_ptr] * 5 + [_i64] * 12
    lib.pagedllm_reshape_and_cache.restype = _i32


_LIBRARY = CppLibrary("pagedllm_cpu_kernels", "paged_decode_cpu.cpp", "CPU attention kernel",
                      _declare)


def load() -> bool:
    """Build (or load the cached build of) the kernel once; True if it is usable."""
    return _LIBRARY.load()


def load_error() -> str | None:
    """Why the kernel is not in use (None while it is, or before the first load)."""
    return _LIBRARY.error()


def supports(query: torch.Tensor, key_cache: torch.Tensor) -> bool:
    """Whether the kernel takes these tensors (CPU, fp32 or bf16 throughout); builds it on the
    first call that would use it."""
    return (query.device.type == "cpu" and query.dtype in _DTYPES
            and key_cache.dtype == query.dtype and load())


def paged_decode_attention(
    query: torch.Tensor,  # [S, Hq, D], one query token per sequence
    key_cache: torch.Tensor,  # [N, B, Hkv, D]
    value_cache: torch.Tensor,  # [N, B, Hkv, D]
    block_tables: torch.Tensor,  # [S, M] int32; entries past a sequence's blocks are ignored
    seq_lens: torch.Tensor,  # [S] int32
    scale: float,
    max_seq_len: int | None = None,  # an upper bound on seq_lens, or None
    sliding_window: int | None = None,
) -> torch.Tensor:  # [S, Hq, D]
    """See torch_ref.paged_decode_attention; the twin serves tensors the kernel does not take."""
    if not (supports(query, key_cache) and value_cache.dtype == query.dtype
            and key_cache.stride(-1) == 1 and value_cache.stride() == key_cache.stride()):
        return torch_ref.paged_decode_attention(
            query, key_cache, value_cache, block_tables, seq_lens, scale, max_seq_len,
            sliding_window)
    num_seqs, num_heads, head_dim = query.shape
    num_blocks, block_size, num_kv_heads, _ = key_cache.shape
    assert key_cache.shape == value_cache.shape and key_cache.shape[3] == head_dim
    assert num_heads % num_kv_heads == 0 and block_tables.shape[0] == seq_lens.shape[0] == num_seqs
    if query.stride(-1) != 1:
        query = query.contiguous()
    block_tables, seq_lens, max_len = kernel_tables(block_tables, seq_lens, block_size,
                                                    max_seq_len)
    window = max_len if sliding_window is None else sliding_window  # a window >= len: all keys
    out = torch.empty((num_seqs, num_heads, head_dim), dtype=query.dtype)
    if num_seqs == 0:
        return out
    bad_block = _LIBRARY.lib.pagedllm_paged_decode_attention(
        query.data_ptr(), key_cache.data_ptr(), value_cache.data_ptr(), block_tables.data_ptr(),
        seq_lens.data_ptr(), out.data_ptr(), query.dtype == torch.bfloat16,
        num_seqs, num_heads, num_kv_heads, head_dim, num_blocks, block_size, scale, max_len,
        window, query.stride(0), query.stride(1), *key_cache.stride()[:3], block_tables.stride(0),
    )
    if bad_block:
        raise IndexError("a block table entry of a used block is out of range")
    return out


def reshape_and_cache(
    key: torch.Tensor,  # [T, Hkv, D]
    value: torch.Tensor,  # [T, Hkv, D]
    key_cache: torch.Tensor,  # [N, B, Hkv, D]
    value_cache: torch.Tensor,  # [N, B, Hkv, D]
    slot_mapping: torch.Tensor,  # [T]; negative: padding, not written
) -> None:
    """torch_ref.reshape_and_cache for a cache in the model's dtype, in one C++ call (the twin
    serves everything else: quantized caches, strided rows)."""
    if not (supports(key, key_cache) and value.dtype == key.dtype
            and value_cache.dtype == key.dtype and key.stride(-1) == 1
            and value.stride(-1) == 1 and key_cache.stride(-1) == 1
            and value_cache.stride() == key_cache.stride()
            and key.shape[1:] == value.shape[1:] == key_cache.shape[2:]
            and value_cache.shape == key_cache.shape):
        return torch_ref.reshape_and_cache(key, value, key_cache, value_cache, slot_mapping)
    slots = kernel_slots(slot_mapping)
    num_blocks, block_size, num_kv_heads, head_dim = key_cache.shape
    assert key.shape[0] == value.shape[0] == slots.shape[0], (key.shape, slots.shape)
    elt = key.element_size()
    bad = _LIBRARY.lib.pagedllm_reshape_and_cache(
        key.data_ptr(), value.data_ptr(), key_cache.data_ptr(), value_cache.data_ptr(),
        slots.data_ptr(), slots.shape[0], num_kv_heads, head_dim * elt, num_blocks * block_size,
        block_size, key.stride(0) * elt, key.stride(1) * elt, value.stride(0) * elt,
        value.stride(1) * elt, *(s * elt for s in key_cache.stride()[:3]))
    if bad:
        raise IndexError("a slot of the slot mapping is past the cache")


def kernel_tables(block_tables: torch.Tensor, seq_lens: torch.Tensor, block_size: int,
                  max_seq_len: int | None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The attention kernel's block tables (int32, rows contiguous), context lengths (int32,
    contiguous) and bound on every context: the block tables' width, clipped as the twin
    clips it, and max_seq_len when known (ops/cpu_decoder.py passes the kernel the same)."""
    block_tables = block_tables.to(torch.int32)
    if block_tables.stride(-1) != 1:
        block_tables = block_tables.contiguous()
    max_len = block_tables.shape[1] * block_size
    if max_seq_len is not None:
        max_len = min(max_len, max_seq_len)
    return block_tables, seq_lens.to(torch.int32).contiguous(), max_len


def kernel_slots(slot_mapping: torch.Tensor) -> torch.Tensor:
    """The KV write's slots as the kernel reads them: int64, contiguous."""
    slots = slot_mapping if slot_mapping.dtype == torch.int64 else slot_mapping.long()
    return slots if slots.is_contiguous() else slots.contiguous()


def prompt_rows(block_tables: torch.Tensor, query_start_loc: torch.Tensor,
                 seq_lens: torch.Tensor) -> tuple[int, torch.Tensor, torch.Tensor]:
    """(rows, each row's block table [T, M], each row's context length [T] int32): the same in
    every layer of a forward pass, so worked out once per pass."""
    return per_pass("prompt rows", (block_tables, query_start_loc, seq_lens),
                    lambda: _work_out_prompt_rows(block_tables, query_start_loc, seq_lens))


def _work_out_prompt_rows(block_tables: torch.Tensor, query_start_loc: torch.Tensor,
                          seq_lens: torch.Tensor) -> tuple[int, torch.Tensor, torch.Tensor]:
    starts = query_start_loc.to(torch.int64)
    num_tokens = int(starts[-1])  # rows past it are padding (a CUDA-graph bucket): left as is
    q_lens = starts[1:] - starts[:-1]  # [S]
    seq_of_row = torch.repeat_interleave(torch.arange(q_lens.shape[0]), q_lens)  # [T]
    row_lens = (seq_lens.to(torch.int64)[seq_of_row] - starts[1:][seq_of_row]
                + torch.arange(num_tokens) + 1)
    return num_tokens, block_tables[seq_of_row], row_lens.to(torch.int32)


def paged_prefill_attention(
    query: torch.Tensor,  # [T, Hq, D], concatenated query chunks
    key_cache: torch.Tensor,  # [N, B, Hkv, D]
    value_cache: torch.Tensor,  # [N, B, Hkv, D]
    block_tables: torch.Tensor,  # [S, M]
    query_start_loc: torch.Tensor,  # [S + 1]
    seq_lens: torch.Tensor,  # [S]
    scale: float,
    max_seq_len: int | None = None,
    sliding_window: int | None = None,
) -> torch.Tensor:  # [T, Hq, D]
    """torch_ref.paged_prefill_attention through the decode kernel: each query row is a
    one-token query over its own context, so a row of a prompt, of a chunk over cached blocks
    and of a decode step runs the same routine (batch-invariant mode, ops/batch_invariant.py).

    Row t of sequence s (its chunk is rows [start[s], end[s])) sits at absolute position
    seq_lens[s] - (end[s] - t), so its context is the first seq_lens[s] - end[s] + t + 1 tokens.
    The kernel scores up to 16 consecutive rows of a sequence together (a tile, on AVX-512), so
    K is read from memory once per tile, not once per row (V is re-read per few rows of the
    tile, from the L2 cache)."""
    num_tokens, row_tables, row_lens = prompt_rows(block_tables, query_start_loc, seq_lens)
    out = paged_decode_attention(query[:num_tokens], key_cache, value_cache, row_tables,
                                 row_lens, scale, max_seq_len, sliding_window)
    if num_tokens == query.shape[0]:
        return out
    return torch.cat([out, torch.zeros_like(query[num_tokens:])])
