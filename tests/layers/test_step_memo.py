"""The step memo (forward_context.step_memo): what every layer of a forward pass would work
out again (rotary tables, the KV write's slots) is worked out once, lives for that pass only,
and gives the same values as working it out per call."""

from __future__ import annotations

import torch

from pagedllm.forward_context import AttentionMetadata, forward_context, step_memo
from pagedllm.layers.rotary import RotaryEmbedding
from pagedllm.ops import torch_ref


def _meta() -> AttentionMetadata:
    z = torch.zeros(1, dtype=torch.int32)
    return AttentionMetadata(slot_mapping=torch.zeros(1, dtype=torch.int64), block_tables=z[None],
                             seq_lens=z, query_start_loc=torch.zeros(2, dtype=torch.int32),
                             max_query_len=1, max_seq_len=1)


def test_memo_lives_for_one_forward_pass():
    assert step_memo() is None
    with forward_context(_meta()):
        first = step_memo()
        first["x"] = 1
        with forward_context(_meta()):
            assert step_memo() == {}
        assert step_memo() is first
    assert step_memo() is None


def test_layers_share_rotary_tables_within_a_pass_only():
    a = RotaryEmbedding(64, 128, 10000.0)
    b = RotaryEmbedding(64, 128, 10000.0)
    other = RotaryEmbedding(64, 128, 500000.0)  # another base: its own tables
    pos = torch.tensor([3, 7, 7, 100])
    q, k = torch.randn(4, 4, 64), torch.randn(4, 2, 64)
    plain = a(pos, q, k)
    with forward_context(_meta()):
        cos_a, _ = a._cos_sin(pos, q.dtype)
        cos_b, _ = b._cos_sin(pos, q.dtype)
        assert cos_b is cos_a  # one gather for every layer of the pass
        assert other._cos_sin(pos, q.dtype)[0] is not cos_a
        assert not torch.equal(other._cos_sin(pos, q.dtype)[0], cos_a)
        new_pos = pos + 1  # another tensor: never served from the memo
        assert torch.equal(a._cos_sin(new_pos, q.dtype)[0], a.cos_cache[new_pos].unsqueeze(1))
        for got, want in zip(b(pos, q, k), plain):
            assert torch.equal(got, want)


def test_kv_write_inside_a_pass_equals_the_plain_write():
    gen = torch.Generator().manual_seed(0)
    key, value = torch.randn(5, 2, 8, generator=gen), torch.randn(5, 2, 8, generator=gen)
    for slots in (torch.tensor([3, 4, 9, 17, 30]), torch.tensor([3, -1, 9, -1, 30])):
        want_k, want_v = torch.zeros(4, 16, 2, 8), torch.zeros(4, 16, 2, 8)
        torch_ref.reshape_and_cache(key, value, want_k, want_v, slots)
        got_k, got_v = torch.zeros(4, 16, 2, 8), torch.zeros(4, 16, 2, 8)
        with forward_context(_meta()):
            for _ in range(3):  # three layers through one memo entry
                torch_ref.reshape_and_cache(key, value, got_k, got_v, slots)
            assert len(step_memo()) == 1
        assert torch.equal(got_k, want_k) and torch.equal(got_v, want_v)


def test_prompt_rows_through_the_kernel_inside_a_pass_equal_the_plain_call():
    import pytest

    from pagedllm.ops import cpu_kernels

    if not cpu_kernels.load():
        pytest.skip(f"no C++ CPU kernel: {cpu_kernels.load_error()}")
    gen = torch.Generator().manual_seed(0)
    kc, vc = torch.randn(8, 16, 2, 64, generator=gen), torch.randn(8, 16, 2, 64, generator=gen)
    q = torch.randn(5, 4, 64, generator=gen)
    args = (q, kc, vc, torch.tensor([[0, 1], [2, 3]], dtype=torch.int32),
            torch.tensor([0, 3, 5], dtype=torch.int32), torch.tensor([20, 2], dtype=torch.int32),
            0.125)
    plain = cpu_kernels.paged_prefill_attention(*args)
    with forward_context(_meta()):
        outs = [cpu_kernels.paged_prefill_attention(*args) for _ in range(3)]
        assert len(step_memo()) == 1
        other = cpu_kernels.paged_prefill_attention(  # other rows: their own entry
            q, kc, vc, args[3], torch.tensor([0, 1, 5], dtype=torch.int32), args[5], 0.125)
        assert len(step_memo()) == 2
    assert all(torch.equal(o, plain) for o in outs)
    assert not torch.equal(other, plain)
