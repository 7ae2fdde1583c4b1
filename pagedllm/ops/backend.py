"""The one door the model code uses for paged attention and KV-cache ops.

Each op dispatches on the device of its tensors: the Triton kernels for CUDA tensors (when
triton imports), the PyTorch twins in torch_ref otherwise. PAGEDLLM_ATTENTION_BACKEND=torch|triton
forces one side (read once, at import; `triton` on CPU tensors needs TRITON_INTERPRET=1).

Quantized KV caches (fp8, int8 + scales; see torch_ref) go through the same doors: key_scales /
value_scales are None except for int8 caches. The C++ kernel declines them (its supports()).

Decode on CPU tensors (fp32, bf16) takes the C++ kernel of ops/cpu_kernels.py when no backend is
forced and it builds (PAGEDLLM_CPU_KERNELS=0 turns it off); `torch` still means the pure-PyTorch
twins everywhere, so the twin stays one variable away.

CPU prefill takes the C++ kernel too, row by row (each row a one-token query over its own
context), wherever the kernel takes the cache: in batch-invariant mode (ops/batch_invariant.py)
that gives prompts, chunks and decode one reduction order, and elsewhere it beats the twin's
gather + masked SDPA (bf16, 2 cores: ShareGPT 19.8 against 22.9 s; one 2,048-token prompt
10.1 against 17.9 s). PAGEDLLM_CPU_PREFILL_KERNEL=0 keeps prompts on the twin outside the mode.

Dispatch is a couple of attribute reads per call: it runs every layer of every step, and inside
CUDA-graph capture, so it never looks at tensor contents.
"""

from __future__ import annotations

import os

import torch

from pagedllm.ops import batch_invariant, cpu_kernels, torch_ref

_BACKENDS = ("torch", "triton")
_OVERRIDE = os.environ.get("PAGEDLLM_ATTENTION_BACKEND", "").strip().lower() or None
_CPU_PREFILL_KERNEL = os.environ.get("PAGEDLLM_CPU_PREFILL_KERNEL", "1") != "0"
if _OVERRIDE is not None and _OVERRIDE not in _BACKENDS:
    raise ValueError(
        f"PAGEDLLM_ATTENTION_BACKEND must be one of {_BACKENDS}, got {_OVERRIDE!r}"
    )

try:
    from pagedllm.ops.triton import cache_ops as _triton_cache_ops
    from pagedllm.ops.triton import paged_decode as _triton_decode
    from pagedllm.ops.triton import paged_prefill as _triton_prefill

    _TRITON_IMPORT_ERROR: ImportError | None = None
except ImportError as e:  # no triton on this machine: the twins serve every device
    _TRITON_IMPORT_ERROR = e

if _OVERRIDE == "triton" and _TRITON_IMPORT_ERROR is not None:
    raise ImportError(
        "PAGEDLLM_ATTENTION_BACKEND=triton but triton does not import"
    ) from _TRITON_IMPORT_ERROR


def _use_triton(device: torch.device) -> bool:
    if _OVERRIDE is not None:
        return _OVERRIDE == "triton"
    return device.type == "cuda" and _TRITON_IMPORT_ERROR is None


def forced_backend() -> str | None:
    """PAGEDLLM_ATTENTION_BACKEND, or None when dispatch follows the device."""
    return _OVERRIDE


def cpu_prefill_kernel() -> bool:
    """Whether CPU prompts take the C++ kernel outside batch-invariant mode (where it takes
    the cache): PAGEDLLM_CPU_PREFILL_KERNEL unset."""
    return _CPU_PREFILL_KERNEL


def get_backend_name(device: torch.device | str) -> str:
    """'triton' or 'torch': which implementation ops on `device` run."""
    return "triton" if _use_triton(torch.device(device)) else "torch"


def _cpu_kernel_takes(query: torch.Tensor, key_cache: torch.Tensor,
                      key_scales: torch.Tensor | None) -> bool:
    """The C++ CPU kernel serves this call: no forced backend, no quantized cache (it declines
    them), and tensors it supports (CPU, fp32/bf16, the kernel built)."""
    return _OVERRIDE is None and key_scales is None and cpu_kernels.supports(query, key_cache)


def paged_decode_attention(
    query: torch.Tensor,  # [S, Hq, D]
    key_cache: torch.Tensor,  # [N, B, Hkv, D]
    value_cache: torch.Tensor,  # [N, B, Hkv, D]
    block_tables: torch.Tensor,  # [S, M]
    seq_lens: torch.Tensor,  # [S]
    scale: float,
    max_seq_len: int | None = None,
    sliding_window: int | None = None,
    key_scales: torch.Tensor | None = None,  # [N, B, Hkv] fp32: int8 caches only
    value_scales: torch.Tensor | None = None,
) -> torch.Tensor:  # [S, Hq, D]
    """See torch_ref.paged_decode_attention. max_seq_len: max(seq_lens) or an upper bound, if
    known. The Triton kernel uses it only to pick its split count and, given None, derives one
    from the block tables' width (no host sync); the twin computes max(seq_lens).
    sliding_window: None, or the window W (a key at distance >= W from the query is hidden)."""
    if _use_triton(query.device):
        impl = _triton_decode.paged_decode_attention
    elif _cpu_kernel_takes(query, key_cache, key_scales):
        return cpu_kernels.paged_decode_attention(
            query, key_cache, value_cache, block_tables, seq_lens, scale, max_seq_len,
            sliding_window)
    else:
        impl = torch_ref.paged_decode_attention
    return impl(query, key_cache, value_cache, block_tables, seq_lens, scale, max_seq_len,
                sliding_window, key_scales, value_scales)


def paged_prefill_attention(
    query: torch.Tensor,  # [T, Hq, D]
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [S, M]
    query_start_loc: torch.Tensor,  # [S + 1]
    seq_lens: torch.Tensor,  # [S]
    scale: float,
    max_seq_len: int | None = None,
    sliding_window: int | None = None,
    key_scales: torch.Tensor | None = None,
    value_scales: torch.Tensor | None = None,
) -> torch.Tensor:  # [T, Hq, D]
    """See torch_ref.paged_prefill_attention (max_seq_len is accepted and unused)."""
    if _use_triton(query.device):
        impl = _triton_prefill.paged_prefill_attention
    elif batch_invariant.enabled or (_CPU_PREFILL_KERNEL
                                     and _cpu_kernel_takes(query, key_cache, key_scales)):
        # Every row through the C++ decode kernel: the mode needs it (batch_invariant.py), and
        # elsewhere it is faster than the twin's gather + masked SDPA
        return cpu_kernels.paged_prefill_attention(
            query, key_cache, value_cache, block_tables, query_start_loc, seq_lens, scale,
            max_seq_len, sliding_window)
    else:
        impl = torch_ref.paged_prefill_attention
    return impl(
        query, key_cache, value_cache, block_tables, query_start_loc, seq_lens, scale, max_seq_len,
        sliding_window, key_scales, value_scales,
    )


def reshape_and_cache(
    key: torch.Tensor,  # [T, Hkv, D]
    value: torch.Tensor,  # [T, Hkv, D]
    key_cache: torch.Tensor,  # [N, B, Hkv, D]
    value_cache: torch.Tensor,  # [N, B, Hkv, D]
    slot_mapping: torch.Tensor,  # [T]
    key_scales: torch.Tensor | None = None,  # [N, B, Hkv] fp32: int8 caches only
    value_scales: torch.Tensor | None = None,
) -> None:
    """See torch_ref.reshape_and_cache (quantizes to the cache's dtype)."""
    if not _use_triton(key.device) and _cpu_kernel_takes(key, key_cache, key_scales):
        return cpu_kernels.reshape_and_cache(key, value, key_cache, value_cache, slot_mapping)
    impl = _triton_cache_ops if _use_triton(key.device) else torch_ref
    impl.reshape_and_cache(key, value, key_cache, value_cache, slot_mapping, key_scales,
                           value_scales)


def copy_blocks(kv_caches: list[torch.Tensor], block_mapping: torch.Tensor) -> None:
    """See torch_ref.copy_blocks. kv_caches: per-layer [2, N, B, Hkv, D] (or int8 scales
    [2, N, B, Hkv]: any per-layer tensors whose dim 1 is the block)."""
    if kv_caches and _use_triton(kv_caches[0].device):
        _triton_cache_ops.copy_blocks(kv_caches, block_mapping)
    else:
        torch_ref.copy_blocks(kv_caches, block_mapping)


def prepare(device: torch.device, dtype: torch.dtype, kv_cache_dtype: torch.dtype) -> None:
    """Build what decode on `device` will call, at start-up rather than in the first request's
    step: on a CPU, the C++ kernel (compiled once per machine, a few seconds; later processes
    load the cached build). A build that fails only logs its warning, as it would later."""
    if device.type == "cpu" and not _use_triton(device) and _OVERRIDE is None \
            and dtype in (torch.float32, torch.bfloat16) and kv_cache_dtype == dtype:
        cpu_kernels.load()
