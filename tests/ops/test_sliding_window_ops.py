"""Paged attention with a sliding window W: a query at position p sees keys p - W < k <= p.

The twins are checked against float64 dense attention with HF's window mask; the Triton
kernels (interpreter on CPU) and the C++ CPU decode kernel against the twins. Block-table
entries of blocks wholly before every query's window are "released" as the block manager
leaves them: -1, or out-of-range poison where a read would only show up as a wrong answer, so
an op that reads one fails.
"""

from __future__ import annotations

import math

import pytest
import torch

from pagedllm.ops import cpu_kernels, torch_ref

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
NUM_KV_HEADS, HEAD_DIM, NUM_BLOCKS = 2, 32, 64
POISON = 10**6
WINDOWS = [1, 7, 16, 33, 1000]  # one token; inside a block; a block; past one; wider than all


def make_case(seq_lens, q_lens, window, block_size=16, group=2, seed=0, released=POISON):
    """(query, key_cache, value_cache, block_tables, query_start_loc, seq_lens, dense K/V)."""
    gen = torch.Generator().manual_seed(seed)
    shape = (NUM_BLOCKS, block_size, NUM_KV_HEADS, HEAD_DIM)
    key_cache, value_cache = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    width = max(math.ceil(n / block_size) for n in seq_lens) + 1
    tables = torch.full((len(seq_lens), width), POISON, dtype=torch.int32)
    ids = torch.randperm(NUM_BLOCKS, generator=gen).tolist()
    dense = []
    for i, (seq_len, q_len) in enumerate(zip(seq_lens, q_lens)):
        n = math.ceil(seq_len / block_size)
        tables[i, :n] = torch.tensor(ids[:n], dtype=torch.int32)
        ids = ids[n:]
        pos = torch.arange(seq_len)
        blocks = tables[i, pos // block_size].long()
        dense.append((key_cache[blocks, pos % block_size], value_cache[blocks, pos % block_size]))
        # What the block manager has freed by now: blocks before the first query's window.
        first_live = max(seq_len - q_len - window + 1, 0) // block_size
        tables[i, :first_live] = released
    query = torch.randn(sum(q_lens), NUM_KV_HEADS * group, HEAD_DIM, generator=gen)
    starts = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    return query, key_cache, value_cache, tables, starts, lens, dense


def dense_window_attention(q, k, v, q_pos, scale, window):
    """float64 reference of one sequence: q [q, Hq, D], k/v [L, Hkv, D], q_pos [q]."""
    group = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(group, dim=1)
    v = v.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) * scale
    k_pos = torch.arange(k.shape[0])[None, :]
    visible = (k_pos <= q_pos[:, None]) & (k_pos > q_pos[:, None] - window)  # HF's mask
    scores = scores.masked_fill(~visible[None], float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def to(device, *tensors):
    return [t.to(device) for t in tensors]


SEQ_LENS = [1, 16, 33, 70, 50, 9]
Q_LENS = [1, 16, 5, 40, 1, 9]  # decode rows, whole prompts, chunks after a long context


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("block_size", [16, 32])
def test_twins_match_dense_window_attention(window, block_size):
    scale = HEAD_DIM**-0.5
    q, kc, vc, tables, starts, lens, dense = make_case(SEQ_LENS, Q_LENS, window, block_size,
                                                       seed=window + block_size)
    out = torch_ref.paged_prefill_attention(q, kc, vc, tables, starts, lens, scale,
                                            sliding_window=window)
    for i, (k, v) in enumerate(dense):
        q0, q1 = starts[i].item(), starts[i + 1].item()
        q_pos = torch.arange(SEQ_LENS[i] - Q_LENS[i], SEQ_LENS[i])
        ref = dense_window_attention(q[q0:q1], k, v, q_pos, scale, window)
        torch.testing.assert_close(out[q0:q1].double(), ref, rtol=1e-5, atol=1e-5)

    # Decode: one query per sequence, at its last position; released blocks are -1.
    q, kc, vc, tables, _, lens, dense = make_case(SEQ_LENS, [1] * len(SEQ_LENS), window,
                                                  block_size, seed=window, released=-1)
    out = torch_ref.paged_decode_attention(q, kc, vc, tables, lens, scale, sliding_window=window)
    for i, (k, v) in enumerate(dense):
        ref = dense_window_attention(q[i:i + 1], k, v, torch.tensor([SEQ_LENS[i] - 1]), scale,
                                     window)
        torch.testing.assert_close(out[i:i + 1].double(), ref, rtol=1e-5, atol=1e-5)


def test_a_window_wider_than_the_context_is_full_attention():
    q, kc, vc, tables, starts, lens, _ = make_case(SEQ_LENS, Q_LENS, 10**6)
    full = torch_ref.paged_prefill_attention(q, kc, vc, tables, starts, lens, 0.2)
    windowed = torch_ref.paged_prefill_attention(q, kc, vc, tables, starts, lens, 0.2,
                                                 sliding_window=max(SEQ_LENS))
    torch.testing.assert_close(windowed, full, rtol=0, atol=1e-6)


# ---------------------------------------------------------------- C++ CPU decode vs the twin


@pytest.mark.skipif(not cpu_kernels.load(), reason=f"CPU kernel not built: "
                    f"{cpu_kernels.load_error()}")
@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("group", [1, 3])
def test_cpu_decode_kernel_matches_twin(window, group):
    q, kc, vc, tables, _, lens, _ = make_case(SEQ_LENS, [1] * len(SEQ_LENS), window, group=group,
                                              seed=group, released=-1)
    ref = torch_ref.paged_decode_attention(q, kc, vc, tables, lens, 0.17, sliding_window=window)
    out = cpu_kernels.paged_decode_attention(q, kc, vc, tables, lens, 0.17, 80,
                                             sliding_window=window)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- Triton vs the twin

@pytest.fixture(scope="module")
def kernels():
    pytest.importorskip("triton")
    from pagedllm.ops.triton import paged_decode, paged_prefill

    return paged_decode, paged_prefill


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("num_splits", [1, 3])
def test_triton_decode_matches_twin(kernels, window, num_splits):
    paged_decode, _ = kernels
    q, kc, vc, tables, _, lens, _ = make_case(SEQ_LENS, [1] * len(SEQ_LENS), window, group=3,
                                              seed=num_splits)
    q, kc, vc, tables, lens = to(DEVICE, q, kc, vc, tables, lens)
    ref = torch_ref.paged_decode_attention(q, kc, vc, tables, lens, 0.17, sliding_window=window)
    out = paged_decode._paged_decode(q, kc, vc, tables, lens, 0.17,
                                     min(max(SEQ_LENS), window), num_splits,
                                     sliding_window=window)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    out = paged_decode.paged_decode_attention(q, kc, vc, tables, lens, 0.17,
                                              sliding_window=window)  # its own split policy
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("group", [1, 3])
def test_triton_prefill_matches_twin(kernels, window, group):
    _, paged_prefill = kernels
    case = make_case(SEQ_LENS, Q_LENS, window, group=group, seed=10 * group)
    q, kc, vc, tables, starts, lens = to(DEVICE, *case[:6])
    ref = torch_ref.paged_prefill_attention(q, kc, vc, tables, starts, lens, 0.17,
                                            sliding_window=window)
    out = paged_prefill.paged_prefill_attention(q, kc, vc, tables, starts, lens, 0.17,
                                                sliding_window=window)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window", [3, 40])
def test_triton_prefill_big_tiles_with_a_small_window(kernels, window):
    """One long chunk takes 128-row tiles (64 tokens x 2 heads): a window of 3 hides whole
    KV tiles from most rows of a tile (the first tiles they see hold no key for them)."""
    _, paged_prefill = kernels
    case = make_case([150], [130], window, seed=window)
    q, kc, vc, tables, starts, lens = to(DEVICE, *case[:6])
    assert paged_prefill.prefill_block_m(130, 1, 2) == 128
    ref = torch_ref.paged_prefill_attention(q, kc, vc, tables, starts, lens, 0.17,
                                            sliding_window=window)
    out = paged_prefill.paged_prefill_attention(q, kc, vc, tables, starts, lens, 0.17,
                                                sliding_window=window)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
