"""Paged attention: the PyTorch twins against dense attention, the Triton kernels against twins.

On CPU the kernels run in Triton's interpreter (tests/ops/conftest.py) on tiny shapes; on a GPU
the same tests compile them and use realistic shapes (more heads, contexts past 1k tokens).
The oracle is always the twin run in fp32 on the upcast inputs, so a low-precision kernel is
judged only on its own rounding.
"""

from __future__ import annotations

import math

import pytest
import torch

from pagedllm.ops import torch_ref

triton = pytest.importorskip("triton")

from pagedllm.ops.triton import paged_decode as triton_decode  # noqa: E402
from pagedllm.ops.triton import paged_prefill as triton_prefill  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
NUM_KV_HEADS = 8 if HAS_CUDA else 2
NUM_SEQS = 24 if HAS_CUDA else 3
MAX_CONTEXT = 1200 if HAS_CUDA else 70
NUM_BLOCKS = 2048 if HAS_CUDA else 48
POISON = 10**6  # block-table tail entries: in-bounds reads of them would fault or show up

# (relative Frobenius error, max abs error) allowed against the fp32 oracle.
TOLERANCE = {
    torch.float32: (1e-5, 1e-4),
    torch.float16: (2e-3, 1e-2),
    torch.bfloat16: (1e-2, 6e-2),
}
LOW_PRECISION = torch.float16 if not HAS_CUDA else torch.bfloat16


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    rel_tol, abs_tol = TOLERANCE[dtype]
    out, ref = out.double(), ref.double()
    assert torch.isfinite(out).all(), "NaN/inf in the output"
    rel = ((out - ref).norm() / ref.norm().clamp_min(1e-12)).item()
    err = (out - ref).abs().max().item()
    assert rel < rel_tol and err < abs_tol, f"rel {rel:.2e} (tol {rel_tol}), max {err:.2e}"


def randn(*shape, dtype, seed):
    """Random data made on the device (GPU-sized caches would be slow to make on the CPU)."""
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    return torch.randn(shape, generator=gen, device=DEVICE).to(dtype)


def make_cache(block_size, head_dim, dtype, seed):
    shape = (NUM_BLOCKS, block_size, NUM_KV_HEADS, head_dim)
    return randn(*shape, dtype=dtype, seed=seed), randn(*shape, dtype=dtype, seed=seed + 1)


def make_block_tables(seq_lens: list[int], block_size: int, gen, width: int | None = None):
    """Each sequence gets distinct, shuffled (non-contiguous) blocks; the unused tail is poison."""
    needed = [math.ceil(s / block_size) for s in seq_lens]
    width = width or max(max(needed), 1)
    ids = torch.randperm(NUM_BLOCKS, generator=gen)[: sum(needed)].tolist()
    table = torch.full((len(seq_lens), width), POISON, dtype=torch.int32)
    for i, n in enumerate(needed):
        table[i, :n] = torch.tensor(ids[:n], dtype=torch.int32)
        ids = ids[n:]
    return table.to(DEVICE)


def ragged_lens(num: int, gen, max_len: int = MAX_CONTEXT) -> list[int]:
    # Fixed edge cases (1 token, a block boundary, one past it) plus random lengths.
    fixed = [1, 16, 33, max_len]
    rand = torch.randint(1, max_len + 1, (max(0, num - len(fixed)),), generator=gen).tolist()
    return (fixed + rand)[:num] if num >= len(fixed) else [1, 33, max_len][:num]


def dense_attention(q, k, v, q_pos, scale):
    """Naive float64 attention of one sequence: q [q, Hq, D], k/v [L, Hkv, D], q_pos [q]."""
    group = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(group, dim=1)
    v = v.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) * scale
    visible = torch.arange(k.shape[0])[None, :] <= q_pos[:, None]  # [q, L]
    scores = scores.masked_fill(~visible[None], float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


# ---------------------------------------------------------------- the twins vs dense attention


@pytest.mark.parametrize("group", [1, 3, 4])
@pytest.mark.parametrize("block_size", [16, 32])
def test_twins_match_dense_attention(group, block_size):
    """Write dense K/V through the block tables, then check both twins against dense math."""
    gen = torch.Generator().manual_seed(7 * group + block_size)
    num_kv_heads, head_dim, num_blocks = 2, 32, 64
    seq_lens = [1, 17, 50, 64]
    q_lens = [1, 5, 50, 1]  # whole prompt, chunk with context, decode-like rows
    tables = torch.full((4, 8), POISON, dtype=torch.int32)
    ids = torch.randperm(num_blocks, generator=gen).tolist()
    key_cache = torch.zeros(num_blocks, block_size, num_kv_heads, head_dim)
    value_cache = torch.zeros_like(key_cache)
    dense = []
    for i, seq_len in enumerate(seq_lens):
        n = math.ceil(seq_len / block_size)
        tables[i, :n] = torch.tensor(ids[:n])
        ids = ids[n:]
        k = torch.randn(seq_len, num_kv_heads, head_dim, generator=gen)
        v = torch.randn(seq_len, num_kv_heads, head_dim, generator=gen)
        pos = torch.arange(seq_len)
        slots = tables[i, pos // block_size].long() * block_size + pos % block_size
        torch_ref.reshape_and_cache(k, v, key_cache, value_cache, slots)
        dense.append((k, v))
    scale = head_dim**-0.5
    num_heads = num_kv_heads * group
    seq_lens_t = torch.tensor(seq_lens, dtype=torch.int32)

    query = torch.randn(len(seq_lens), num_heads, head_dim, generator=gen)
    out = torch_ref.paged_decode_attention(
        query, key_cache, value_cache, tables, seq_lens_t, scale
    )
    for i, (k, v) in enumerate(dense):
        ref = dense_attention(query[i : i + 1], k, v, torch.tensor([seq_lens[i] - 1]), scale)
        assert_close(out[i : i + 1], ref, torch.float32)

    query = torch.randn(sum(q_lens), num_heads, head_dim, generator=gen)
    starts = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    out = torch_ref.paged_prefill_attention(
        query, key_cache, value_cache, tables, starts, seq_lens_t, scale
    )
    for i, (k, v) in enumerate(dense):
        q0, q1 = starts[i].item(), starts[i + 1].item()
        q_pos = torch.arange(seq_lens[i] - q_lens[i], seq_lens[i])
        assert_close(out[q0:q1], dense_attention(query[q0:q1], k, v, q_pos, scale), torch.float32)


# ---------------------------------------------------------------- Triton decode vs the twin


def run_decode(group, block_size, head_dim, dtype, seed, seq_lens=None, num_splits=None,
               max_seq_len=None, query=None):
    gen = torch.Generator().manual_seed(seed)
    seq_lens = seq_lens or ragged_lens(NUM_SEQS, gen)
    key_cache, value_cache = make_cache(block_size, head_dim, dtype, seed)
    tables = make_block_tables(seq_lens, block_size, gen)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    if query is None:
        query = randn(len(seq_lens), NUM_KV_HEADS * group, head_dim, dtype=dtype, seed=seed + 2)
    scale = head_dim**-0.5
    if num_splits is None:
        out = triton_decode.paged_decode_attention(
            query, key_cache, value_cache, tables, lens, scale, max_seq_len
        )
    else:
        out = triton_decode._paged_decode(
            query, key_cache, value_cache, tables, lens, scale,
            max_seq_len or max(seq_lens), num_splits,
        )
    ref = torch_ref.paged_decode_attention(
        query.float(), key_cache.float(), value_cache.float(), tables, lens, scale
    )
    return out, ref


DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def kernel_cases() -> list:
    """(group, block_size, head_dim, dtype); the interpreter runs every shape in fp32 and the
    low-precision dtypes on one representative shape."""
    cases = [
        pytest.param(g, b, d, dt, id=f"g{g}-bs{b}-d{d}-{str(dt)[6:]}")
        for g in (1, 3, 4) for b in (16, 32) for d in (64, 128) for dt in DTYPES
    ]
    if HAS_CUDA:
        return cases
    return [c for c in cases if c.values[3] == torch.float32 or c.values[:3] == (4, 16, 128)]


@pytest.mark.parametrize("group,block_size,head_dim,dtype", kernel_cases())
def test_decode_matches_twin(group, block_size, head_dim, dtype):
    out, ref = run_decode(group, block_size, head_dim, dtype, seed=group * 100 + head_dim)
    assert out.dtype == dtype and out.shape == ref.shape
    assert_close(out, ref, dtype)


@pytest.mark.parametrize("num_splits", [1, 2, 3, 7])
def test_decode_split_k(num_splits):
    """Forced partition counts, with sequences that leave some partitions empty."""
    seq_lens = [1, 9, MAX_CONTEXT // 3, MAX_CONTEXT, 2 * MAX_CONTEXT + 5]
    out, ref = run_decode(4, 16, 64, LOW_PRECISION, 11, seq_lens, num_splits)
    assert_close(out, ref, LOW_PRECISION)


def test_decode_max_seq_len_hint_too_small_is_still_correct():
    seq_lens = [5, MAX_CONTEXT, 2 * MAX_CONTEXT]
    out, ref = run_decode(3, 16, 64, torch.float32, 12, seq_lens, max_seq_len=MAX_CONTEXT // 4)
    assert_close(out, ref, torch.float32)


def test_decode_empty_sequence_gives_zeros():
    """seq_len 0 rows (CUDA-graph padding) must give finite zeros, split or not."""
    for num_splits in (1, 3):
        out, ref = run_decode(2, 16, 64, torch.float32, 13, [0, 40, 0, 3], num_splits, 64)
        assert torch.equal(out[0], torch.zeros_like(out[0]))
        assert torch.equal(out[2], torch.zeros_like(out[2]))
        assert_close(out[[1, 3]], ref[[1, 3]], torch.float32)


@pytest.mark.parametrize("head_dim", [16, 32, 96, 256] if HAS_CUDA else [32, 96])
def test_decode_other_head_dims(head_dim):
    out, ref = run_decode(2, 16, head_dim, torch.float32, 14 + head_dim)
    assert_close(out, ref, torch.float32)


def test_decode_strided_query_view():
    """q as a slice of a fused qkv projection: non-contiguous over tokens and heads."""
    group, head_dim = 4, 64
    num_heads = NUM_KV_HEADS * group
    qkv = randn(NUM_SEQS, (num_heads + 2 * NUM_KV_HEADS) * head_dim, dtype=torch.float32, seed=15)
    query = qkv[:, : num_heads * head_dim].view(NUM_SEQS, num_heads, head_dim)
    assert not query.is_contiguous()
    out, ref = run_decode(group, 16, head_dim, torch.float32, 15, query=query)
    assert_close(out, ref, torch.float32)


def test_decode_picks_more_splits_for_small_batches_and_long_contexts(monkeypatch):
    monkeypatch.setattr(triton_decode, "num_sms", lambda device: 132)  # an H100's count
    splits = [triton_decode.choose_num_splits(s, 8, 8192, DEVICE) for s in (1, 8, 32, 64, 256)]
    assert splits == [64, 9, 3, 1, 1]
    assert triton_decode.choose_num_splits(1, 8, 128, DEVICE) == 1  # too short to split


# ---------------------------------------------------------------- Triton prefill vs the twin


def run_prefill(group, block_size, head_dim, dtype, seed, q_lens, seq_lens):
    gen = torch.Generator().manual_seed(seed)
    key_cache, value_cache = make_cache(block_size, head_dim, dtype, seed)
    tables = make_block_tables(seq_lens, block_size, gen)
    starts = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    query = randn(sum(q_lens), NUM_KV_HEADS * group, head_dim, dtype=dtype, seed=seed + 2)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    starts = starts.to(DEVICE)
    scale = head_dim**-0.5
    out = triton_prefill.paged_prefill_attention(
        query, key_cache, value_cache, tables, starts, lens, scale
    )
    ref = torch_ref.paged_prefill_attention(
        query.float(), key_cache.float(), value_cache.float(), tables, starts, lens, scale
    )
    return out, ref


def mixed_batch() -> tuple[list[int], list[int]]:
    """(q_lens, seq_lens): whole prompts, chunks after a cached prefix, decode rows, an empty
    entry, and a chunk that ends mid-block."""
    if HAS_CUDA:
        q_lens = [700, 256, 1, 1, 0, 93, 1, 512]
        context = [0, 1024, 1500, 30, 17, 333, 0, 128]
    else:
        q_lens = [40, 23, 1, 0, 9, 1]
        context = [0, 30, 47, 5, 3, 0]
    return q_lens, [q + c for q, c in zip(q_lens, context)]


@pytest.mark.parametrize("group,block_size,head_dim,dtype", kernel_cases())
def test_prefill_matches_twin(group, block_size, head_dim, dtype):
    seed = group * 1000 + block_size + head_dim
    q_lens, seq_lens = mixed_batch()
    out, ref = run_prefill(group, block_size, head_dim, dtype, seed, q_lens, seq_lens)
    assert out.dtype == dtype and out.shape == ref.shape
    assert_close(out, ref, dtype)


def test_prefill_many_short_sequences():
    """Many sequences exercise the tile -> sequence binary search and the small-tile config."""
    gen = torch.Generator().manual_seed(21)
    num = 40 if HAS_CUDA else 9
    q_lens = torch.randint(0, 6, (num,), generator=gen).tolist()
    context = torch.randint(0, 40, (num,), generator=gen).tolist()
    seq_lens = [max(q + c, 1) for q, c in zip(q_lens, context)]
    out, ref = run_prefill(4, 16, 64, torch.float32, 21, q_lens, seq_lens)
    assert_close(out, ref, torch.float32)


def test_prefill_decode_rows_agree_with_decode_kernel():
    """A batch of q_len 1 rows through prefill equals the decode kernel on the same cache."""
    gen = torch.Generator().manual_seed(22)
    seq_lens = ragged_lens(NUM_SEQS, gen)
    key_cache, value_cache = make_cache(16, 64, torch.float32, seed=22)
    tables = make_block_tables(seq_lens, 16, gen)
    query = randn(len(seq_lens), NUM_KV_HEADS * 3, 64, dtype=torch.float32, seed=25)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    starts = torch.arange(len(seq_lens) + 1, dtype=torch.int32, device=DEVICE)
    a = triton_prefill.paged_prefill_attention(
        query, key_cache, value_cache, tables, starts, lens, 0.125
    )
    b = triton_decode.paged_decode_attention(query, key_cache, value_cache, tables, lens, 0.125)
    assert_close(a, b, torch.float32)


@pytest.mark.skipif(not HAS_CUDA, reason="CUDA graphs need a GPU")
def test_kernels_replay_in_cuda_graph():
    """No host syncs inside: capture once, then change seq_lens / queries in place and replay."""
    gen = torch.Generator().manual_seed(30)
    num_seqs, group, head_dim = 8, 4, 128
    width = 2048 // 16
    key_cache, value_cache = make_cache(16, head_dim, torch.bfloat16, seed=30)
    tables = make_block_tables([16 * width] * num_seqs, 16, gen)
    lens = torch.full((num_seqs,), 100, dtype=torch.int32, device=DEVICE)
    query = randn(num_seqs, NUM_KV_HEADS * group, head_dim, dtype=torch.bfloat16, seed=31)
    starts = torch.arange(num_seqs + 1, dtype=torch.int32, device=DEVICE)
    scale = head_dim**-0.5

    def step():
        return (
            triton_decode.paged_decode_attention(
                query, key_cache, value_cache, tables, lens, scale
            ),
            triton_prefill.paged_prefill_attention(
                query, key_cache, value_cache, tables, starts, lens, scale
            ),
        )

    step()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        decode_out, prefill_out = step()
    for new_lens in ([1, 2047, 16, 17, 2048, 900, 5, 1000], [3] * num_seqs):
        lens.copy_(torch.tensor(new_lens, dtype=torch.int32))
        query.copy_(torch.randn(query.shape, generator=gen).to(query))
        graph.replay()
        ref = torch_ref.paged_decode_attention(
            query.float(), key_cache.float(), value_cache.float(), tables, lens, scale
        )
        assert_close(decode_out, ref, torch.bfloat16)
        assert_close(prefill_out, ref, torch.bfloat16)
