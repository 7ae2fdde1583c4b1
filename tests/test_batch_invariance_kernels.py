"""Batch-invariant mode, kernel by kernel (ops/batch_invariant.py): a row's bits do not depend
on how many rows share the call, how a prompt is chunked, or the thread count.

The end-to-end checks are tests/test_batch_invariance_offline.py (LLM.generate) and
tests/test_batch_invariance_online.py (a real server); these find which kernel broke.
"""

from __future__ import annotations

import pytest
import torch

from pagedllm.ops import batch_invariant, cpu_kernels, gemm, torch_ref

pytestmark = pytest.mark.skipif(not cpu_kernels.load(), reason="no C++ CPU kernel here")


def bf16_row_invariant() -> bool:
    """Whether this machine's oneDNN bf16 GEMM passes the mode's start-up probe (it does with
    AVX512-BF16 alone; on AMX tiles it did not: the mode is then off in bf16)."""
    try:
        gemm.check_row_invariant(torch.bfloat16)
    except RuntimeError:
        return False
    return True


@pytest.fixture
def invariant_mode():
    assert batch_invariant.resolve(True, torch.device("cpu"), torch.float32, torch.float32)
    with batch_invariant.scope(True):
        yield


# SmolLM2-135M's projections (K x N): qkv, o, gate_up, down, lm_head (a slice of it).
SHAPES = [(576, 960), (576, 576), (576, 3072), (1536, 576), (576, 4096)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k,n", SHAPES)
def test_every_row_of_a_linear_layer_is_independent_of_m(invariant_mode, k, n, dtype):
    if dtype == torch.bfloat16 and not bf16_row_invariant():
        pytest.skip("this machine's oneDNN bf16 GEMM is not row-invariant (the mode is off)")
    gen = torch.Generator().manual_seed(k + n)
    weight = (torch.randn(n, k, generator=gen) / k**0.5).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype)
    packed = gemm.prepack(weight)
    x = torch.randn(600, k, generator=gen).to(dtype)
    full = gemm.linear(x, weight, bias, packed)
    # Close to the plain matmul (it is one; bf16: up to an output rounding apart), and bitwise
    # the same row for every M, 1 included.
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(full, torch.nn.functional.linear(x, weight, bias),
                               rtol=tol, atol=tol)
    for m in (1, 2, 3, 16, 257, 600):
        assert torch.equal(gemm.linear(x[:m], weight, bias, packed), full[:m]), m
        assert torch.equal(gemm.linear(x[m - 1:m], weight, bias, packed)[0], full[m - 1]), m
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(gemm.linear(x[:37], weight, bias, packed), full[:37])
    finally:
        torch.set_num_threads(threads)


def _paged(seq_lens: list[int], block_size: int, heads: tuple[int, int], head_dim: int,
           seed: int):
    """A cache holding the sequences' K/V in shuffled blocks, and their block tables."""
    gen = torch.Generator().manual_seed(seed)
    num_kv = heads[1]
    per_seq = [(n + block_size - 1) // block_size for n in seq_lens]
    num_blocks = sum(per_seq) + 3
    key_cache = torch.randn(num_blocks, block_size, num_kv, head_dim, generator=gen)
    value_cache = torch.randn(num_blocks, block_size, num_kv, head_dim, generator=gen)
    order = torch.randperm(num_blocks, generator=gen).tolist()
    width = max(per_seq)
    tables = torch.full((len(seq_lens), width), -1, dtype=torch.int32)
    for i, nb in enumerate(per_seq):
        tables[i, :nb] = torch.tensor([order.pop() for _ in range(nb)], dtype=torch.int32)
    return key_cache, value_cache, tables


# (query heads, KV heads), head_dim, block_size: SmolLM2's; the AVX-512 task's other head sizes,
# with a block of 8 (keys scored one at a time) and of 32 (two groups of 16 per block).
LAYOUTS = [((9, 3), 64, 16), ((4, 4), 32, 8), ((8, 2), 128, 32)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [None, 7])
@pytest.mark.parametrize("heads,head_dim,block_size", LAYOUTS)
def test_prefill_rows_are_the_decode_kernel_rows(heads, head_dim, block_size, window, dtype):
    """The prefill matches the SDPA twin (to fp32 rounding; bf16: to an output rounding), and
    each of its rows is bitwise the decode kernel's answer for that row: alone, in a chunk over
    cached blocks, or in the whole prompt (where the kernel scores up to 16 rows of one
    sequence together, a tile: 150 rows make ten)."""
    seq_lens = [1, 23, 48, 70, 150]
    key_cache, value_cache, tables = _paged(seq_lens, block_size, heads, head_dim, 0)
    key_cache, value_cache = key_cache.to(dtype), value_cache.to(dtype)
    gen = torch.Generator().manual_seed(1)
    queries = [torch.randn(n, heads[0], head_dim, generator=gen).to(dtype) for n in seq_lens]
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    scale = head_dim**-0.5

    def prefill(q_lens: list[int], impl):  # each sequence's last q_len rows
        q = torch.cat([qs[-n:] for qs, n in zip(queries, q_lens)])
        loc = torch.tensor([0] + q_lens).cumsum(0).to(torch.int32)
        return impl(q, key_cache, value_cache, tables, loc, torch.tensor(seq_lens, dtype=torch.int32),
                    scale, None, window)

    whole = prefill(seq_lens, cpu_kernels.paged_prefill_attention)
    torch.testing.assert_close(whole, prefill(seq_lens, torch_ref.paged_prefill_attention),
                               rtol=tol, atol=tol)
    chunks = [min(n, c) for n, c in zip(seq_lens, (1, 2, 17, 5, 40))]  # over cached blocks
    tails = prefill(chunks, cpu_kernels.paged_prefill_attention)
    starts = torch.tensor([0] + seq_lens).cumsum(0).tolist()
    expected = torch.cat([whole[s + n - c:s + n] for s, n, c in zip(starts, seq_lens, chunks)])
    assert torch.equal(tails, expected)
    # The last row of each sequence, as a decode step (all sequences at once, and one alone).
    last = torch.stack([qs[-1] for qs in queries])
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    decode = cpu_kernels.paged_decode_attention(last, key_cache, value_cache, tables, lens,
                                                scale, None, window)
    assert torch.equal(decode, whole[[s + n - 1 for s, n in zip(starts, seq_lens)]])
    one = cpu_kernels.paged_decode_attention(last[2:3], key_cache, value_cache, tables[2:3],
                                             lens[2:3], scale, None, window)
    assert torch.equal(one[0], decode[2])


def test_the_mode_refuses_what_it_cannot_honour_and_the_default_skips_it():
    cpu, f32 = torch.device("cpu"), torch.float32
    bf16 = torch.bfloat16
    for args, match in [((torch.device("cuda"), f32, f32), "CPU only"),
                        ((cpu, torch.float16, torch.float16), "float32 or bfloat16"),
                        ((cpu, bf16, f32), "KV cache of the same dtype"),
                        ((cpu, f32, torch.int8), "KV cache")]:
        with pytest.raises(NotImplementedError, match=match):
            batch_invariant.resolve(True, *args)
        assert batch_invariant.resolve(None, *args) is False
    assert batch_invariant.resolve(None, cpu, f32, f32) is True
    assert batch_invariant.resolve(None, cpu, bf16, bf16) is bf16_row_invariant()
    from pagedllm.layers.moe import MoEExperts  # experts' F.linear is not row-invariant

    moe = torch.nn.Sequential(MoEExperts(2, 8, 16))
    with pytest.raises(NotImplementedError, match="mixture-of-experts"):
        batch_invariant.resolve(True, cpu, f32, f32, moe)
    assert batch_invariant.resolve(None, cpu, f32, f32, moe) is False
    assert batch_invariant.resolve(False, cpu, f32, f32) is False
