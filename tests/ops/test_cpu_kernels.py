"""The C++ CPU decode kernel (ops/cpu_kernels.py) against its twin, torch_ref.paged_decode_attention
(itself checked against dense attention in test_attention_ops.py).

Skipped, with the build error as the reason, only where the kernel cannot be built.
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch

from pagedllm.ops import cpu_kernels, torch_ref

if not cpu_kernels.load():
    pytest.skip(f"CPU kernel not built: {cpu_kernels.load_error()}", allow_module_level=True)

GARBAGE = (-1, 2**31 - 1)  # unused block-table entries: reading either would fault or show up


def make_inputs(seq_lens, num_kv_heads, group, head_dim, block_size, dtype=torch.float32,
                seed=0, width=None):
    """Shuffled, distinct blocks per sequence; the tail of every table row alternates garbage."""
    gen = torch.Generator().manual_seed(seed)
    needed = [math.ceil(n / block_size) for n in seq_lens]
    width = width or max(needed) + 2
    num_blocks = sum(needed) + 5  # a few blocks no sequence owns
    ids = torch.randperm(num_blocks, generator=gen).tolist()
    table = torch.tensor([GARBAGE[j % 2] for j in range(width)], dtype=torch.int32)
    table = table.repeat(len(seq_lens), 1)
    for i, n in enumerate(needed):
        table[i, :n] = torch.tensor(ids[:n], dtype=torch.int32)
        ids = ids[n:]
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    key_cache = torch.randn(shape, generator=gen).to(dtype)
    value_cache = torch.randn(shape, generator=gen).to(dtype)
    query = torch.randn(len(seq_lens), num_kv_heads * group, head_dim, generator=gen).to(dtype)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    return query, key_cache, value_cache, table, lens, head_dim**-0.5


def ragged_lens(num_seqs: int, block_size: int, seed: int) -> list[int]:
    """Length 1, exact multiples of the block size, one past and one short of them, then random."""
    fixed = [1, block_size, 3 * block_size, block_size + 1, 2 * block_size - 1, 200]
    gen = torch.Generator().manual_seed(seed)
    rand = torch.randint(1, 300, (max(0, num_seqs - len(fixed)),), generator=gen).tolist()
    return (fixed + rand)[:num_seqs]


def max_abs_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert torch.isfinite(out).all()
    return (out.double() - ref.double()).abs().max().item()


# head_dim 32, 64, 128: the AVX-512 task where the CPU has it (80: the portable one); groups of
# up to 8 query heads (pass 2 of the AVX-512 task holds 1-4 of them in registers at once).
@pytest.mark.parametrize("num_seqs", [1, 7, 33])
@pytest.mark.parametrize("head_dim", [32, 64, 80, 128])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("group", [1, 3, 4, 7])
def test_matches_twin_fp32(group, block_size, head_dim, num_seqs):
    seed = group * 1000 + block_size * 10 + head_dim + num_seqs
    inputs = make_inputs(ragged_lens(num_seqs, block_size, seed), 3 if group == 3 else 2, group,
                         head_dim, block_size, seed=seed)
    assert max_abs_err(cpu_kernels.paged_decode_attention(*inputs),
                       torch_ref.paged_decode_attention(*inputs)) <= 1e-5


@pytest.mark.parametrize("max_seq_len", ["exact", None, "loose", "past_table", "too_small"])
def test_max_seq_len_bound(max_seq_len):
    """Any bound the twin takes gives the twin's numbers: exact, absent, loose, wider than the
    block tables (clipped to them), even one below some lengths (both truncate there)."""
    seq_lens = [5, 16, 64, 97]
    inputs = make_inputs(seq_lens, 2, 3, 64, 16, seed=3, width=7)
    bound = {"exact": 97, None: None, "loose": 100, "past_table": 10_000, "too_small": 40}
    out = cpu_kernels.paged_decode_attention(*inputs, max_seq_len=bound[max_seq_len])
    ref = torch_ref.paged_decode_attention(*inputs, max_seq_len=bound[max_seq_len])
    assert max_abs_err(out, ref) <= 1e-5


def test_strided_query_and_empty_rows():
    """The query as the engine passes it (a view into a fused qkv output), a zero-length
    sequence (the twin's fully masked row is zeros), and an empty batch."""
    query, key_cache, value_cache, table, lens, scale = make_inputs([40, 0, 17], 2, 4, 64, 16)
    qkv = torch.randn(3, 12, 64)
    qkv[:, :8] = query
    query = qkv[:, :8]
    assert not query.is_contiguous()
    out = cpu_kernels.paged_decode_attention(query, key_cache, value_cache, table, lens, scale)
    ref = torch_ref.paged_decode_attention(query, key_cache, value_cache, table, lens, scale)
    assert max_abs_err(out, ref) <= 1e-5 and not out[1].any()
    empty = cpu_kernels.paged_decode_attention(query[:0], key_cache, value_cache, table[:0],
                                               lens[:0], scale)
    assert empty.shape == (0, 8, 64)


@pytest.mark.parametrize("head_dim", [32, 64, 80, 128])
@pytest.mark.parametrize("group", [1, 3, 4, 7])
def test_bf16_within_rounding_of_fp32_oracle(group, head_dim):
    """bf16 storage, fp32 math (the AVX-512 task at head_dim 32/64/128 where the CPU has it):
    within one bf16 rounding of the fp32 oracle on the same bf16 inputs."""
    seed = 5 + group * 10 + head_dim
    inputs = make_inputs(ragged_lens(9, 16, seed), 3 if group == 3 else 2, group, head_dim, 16,
                         dtype=torch.bfloat16, seed=seed)
    out = cpu_kernels.paged_decode_attention(*inputs)
    upcast = [x.float() if x.is_floating_point() else x for x in inputs[:5]]
    exact = torch_ref.paged_decode_attention(*upcast, inputs[5])
    # NOTE: fp32 math on the same inputs, so only the output's rounding (and the sums' order)
    # separates them: half an ulp of bf16 (2^-8 relative) plus fp32 noise.
    err = (out.double() - exact.double()).abs()
    assert torch.isfinite(out).all()
    assert (err <= exact.double().abs() * 2**-8 + 1e-5).all(), err.max().item()


def test_bad_block_id_raises():
    query, key_cache, value_cache, table, lens, scale = make_inputs([20, 20], 2, 1, 64, 16)
    table[1, 1] = key_cache.shape[0]  # a *used* entry out of range
    with pytest.raises(IndexError, match="block table"):
        cpu_kernels.paged_decode_attention(query, key_cache, value_cache, table, lens, scale)


def test_backend_takes_kernel_for_cpu_decode(monkeypatch):
    """No override: CPU decode runs the kernel; PAGEDLLM_ATTENTION_BACKEND=torch: the twin."""
    from pagedllm.ops import backend

    calls = []
    kernel = cpu_kernels.paged_decode_attention
    monkeypatch.setattr(cpu_kernels, "paged_decode_attention",
                        lambda *a, **k: calls.append(1) or kernel(*a, **k))
    inputs = make_inputs([3, 30], 2, 3, 64, 16)
    try:
        for forced, expected_calls in ((None, 1), ("torch", 1)):
            if forced is None:
                monkeypatch.delenv("PAGEDLLM_ATTENTION_BACKEND", raising=False)
            else:
                monkeypatch.setenv("PAGEDLLM_ATTENTION_BACKEND", forced)
            out = importlib.reload(backend).paged_decode_attention(*inputs)
            assert len(calls) == expected_calls
            assert max_abs_err(out, torch_ref.paged_decode_attention(*inputs)) <= 1e-5
    finally:
        monkeypatch.undo()
        importlib.reload(backend)


def test_backend_takes_kernel_for_cpu_prompts(monkeypatch):
    """Prompt/chunk rows go through the kernel too (not only in batch-invariant mode);
    PAGEDLLM_CPU_PREFILL_KERNEL=0 and quantized caches keep the twin."""
    from pagedllm.ops import backend

    calls = []
    kernel = cpu_kernels.paged_prefill_attention
    monkeypatch.setattr(cpu_kernels, "paged_prefill_attention",
                        lambda *a, **k: calls.append(1) or kernel(*a, **k))
    gen = torch.Generator().manual_seed(0)
    key_cache = torch.randn(8, 16, 2, 64, generator=gen)
    value_cache = torch.randn(8, 16, 2, 64, generator=gen)
    query = torch.randn(5, 4, 64, generator=gen)  # 3 rows of seq 0, 2 of seq 1
    args = (query, key_cache, value_cache, torch.tensor([[0, 1], [2, 3]], dtype=torch.int32),
            torch.tensor([0, 3, 5], dtype=torch.int32), torch.tensor([20, 2], dtype=torch.int32),
            0.125)
    ref = torch_ref.paged_prefill_attention(*args)
    try:
        for env, expected_calls in (("1", 1), ("0", 1)):
            monkeypatch.setenv("PAGEDLLM_CPU_PREFILL_KERNEL", env)
            monkeypatch.delenv("PAGEDLLM_ATTENTION_BACKEND", raising=False)
            out = importlib.reload(backend).paged_prefill_attention(*args)
            assert len(calls) == expected_calls
            assert max_abs_err(out, ref) <= 1e-5
        monkeypatch.setenv("PAGEDLLM_CPU_PREFILL_KERNEL", "1")
        importlib.reload(backend)
        q8, s8 = torch_ref.quantize_kv(key_cache, torch.int8)
        backend.paged_prefill_attention(query, q8, q8, *args[3:], key_scales=s8,
                                        value_scales=s8)
        assert len(calls) == 1  # the int8 cache went to the twin
    finally:
        monkeypatch.undo()
        importlib.reload(backend)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("slot_dtype", [torch.int64, torch.int32])
def test_kv_write_equals_the_twin(dtype, slot_dtype):
    """The C++ KV write: rows to their slots (strided value rows out of a qkv tensor), padding
    slots (-1) skipped, every other slot left as it was."""
    gen = torch.Generator().manual_seed(7)
    shape = (6, 4, 3, 16)  # blocks, block size, KV heads, head dim
    caches = [torch.randn(shape, generator=gen).to(dtype) for _ in range(2)]
    caches += [c.clone() for c in caches]
    qkv = torch.randn(5, 5 * 3 * 16, generator=gen).to(dtype)
    key = qkv[:, :48].view(5, 3, 16).clone()
    value = qkv[:, 48:96].view(5, 3, 16)  # a strided view, as the attention layer passes it
    slots = torch.tensor([9, -1, 0, 23, 14], dtype=slot_dtype)
    cpu_kernels.reshape_and_cache(key, value, caches[0], caches[1], slots)
    torch_ref.reshape_and_cache(key, value, caches[2], caches[3], slots)
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])
    with pytest.raises(IndexError, match="past the cache"):
        cpu_kernels.reshape_and_cache(key, value, caches[0], caches[1],
                                      torch.tensor([0, 1, 2, 3, 24]))
