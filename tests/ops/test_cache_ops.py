"""KV-cache ops (twins against explicit loops, Triton against twins) and the backend switch."""

from __future__ import annotations

import importlib

import pytest
import torch

from pagedllm.ops import torch_ref

triton = pytest.importorskip("triton")

from pagedllm.ops.triton import cache_ops as triton_cache_ops  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
NUM_BLOCKS, NUM_KV_HEADS, HEAD_DIM = (512, 8, 128) if HAS_CUDA else (12, 2, 32)


def randn(*shape, dtype=torch.float32, seed=0):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    return torch.randn(shape, generator=gen, device=DEVICE).to(dtype)


def fused_kv(num_tokens, dtype, seed):
    """key/value as views into one fused projection output, as the model produces them."""
    num_heads = 4 * NUM_KV_HEADS
    qkv = randn(num_tokens, (num_heads + 2 * NUM_KV_HEADS) * HEAD_DIM, dtype=dtype, seed=seed)
    kv = qkv[:, num_heads * HEAD_DIM :].view(num_tokens, 2, NUM_KV_HEADS, HEAD_DIM)
    return kv[:, 0], kv[:, 1]


def random_slots(num_tokens, block_size, seed, dtype=torch.int64):
    """Distinct slots, with every third token marked padding (-1)."""
    gen = torch.Generator().manual_seed(seed)
    slots = torch.randperm(NUM_BLOCKS * block_size, generator=gen)[:num_tokens]
    slots[::3] = -1
    return slots.to(dtype).to(DEVICE)


@pytest.mark.parametrize("block_size", [16, 32])
def test_twin_reshape_and_cache_matches_loop(block_size):
    key, value = fused_kv(10, torch.float32, seed=1)
    slots = random_slots(10, block_size, seed=1)
    key_cache = randn(NUM_BLOCKS, block_size, NUM_KV_HEADS, HEAD_DIM, seed=2)
    value_cache = randn(NUM_BLOCKS, block_size, NUM_KV_HEADS, HEAD_DIM, seed=3)
    expect_k, expect_v = key_cache.clone(), value_cache.clone()
    for t, slot in enumerate(slots.tolist()):
        if slot >= 0:
            expect_k[slot // block_size, slot % block_size] = key[t]
            expect_v[slot // block_size, slot % block_size] = value[t]
    torch_ref.reshape_and_cache(key, value, key_cache, value_cache, slots)
    assert torch.equal(key_cache, expect_k) and torch.equal(value_cache, expect_v)


@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("block_size", [16, 32])
def test_reshape_and_cache_matches_twin(block_size, dtype, slot_dtype):
    num_tokens = 300 if HAS_CUDA else 11
    key, value = fused_kv(num_tokens, dtype, seed=4)
    slots = random_slots(num_tokens, block_size, seed=5, dtype=slot_dtype)
    key_cache = randn(NUM_BLOCKS, block_size, NUM_KV_HEADS, HEAD_DIM, dtype=dtype, seed=6)
    value_cache = randn(NUM_BLOCKS, block_size, NUM_KV_HEADS, HEAD_DIM, dtype=dtype, seed=7)
    ref_k, ref_v = key_cache.clone(), value_cache.clone()
    triton_cache_ops.reshape_and_cache(key, value, key_cache, value_cache, slots)
    torch_ref.reshape_and_cache(key, value, ref_k, ref_v, slots)
    # A pure copy: bit-exact, and the padding slots left every other slot untouched.
    assert torch.equal(key_cache, ref_k) and torch.equal(value_cache, ref_v)


def make_layers(num_layers, block_size, dtype, seed):
    shape = (2, NUM_BLOCKS, block_size, NUM_KV_HEADS, HEAD_DIM)
    return [randn(*shape, dtype=dtype, seed=seed + i) for i in range(num_layers)]


def test_twin_copy_blocks_matches_loop():
    layers = make_layers(2, 16, torch.float32, seed=8)
    mapping = torch.tensor([[1, 5], [2, 7], [9, 0]], device=DEVICE)
    expect = [kv.clone() for kv in layers]
    for kv in expect:
        for src, dst in mapping.tolist():
            kv[:, dst] = kv[:, src].clone()
    torch_ref.copy_blocks(layers, mapping)
    assert all(torch.equal(a, b) for a, b in zip(layers, expect))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("block_size", [16, 32])
def test_copy_blocks_matches_twin(block_size, dtype):
    num_layers = 4 if HAS_CUDA else 3
    layers = make_layers(num_layers, block_size, dtype, seed=10)
    gen = torch.Generator().manual_seed(11)
    blocks = torch.randperm(NUM_BLOCKS, generator=gen)[:8]
    mapping = blocks.view(4, 2).to(DEVICE)  # disjoint src and dst sets
    ref = [kv.clone() for kv in layers]
    triton_cache_ops.copy_blocks(layers, mapping)
    torch_ref.copy_blocks(ref, mapping)
    assert all(torch.equal(a, b) for a, b in zip(layers, ref))
    # Empty mapping: a no-op.
    triton_cache_ops.copy_blocks(layers, mapping[:0])
    assert all(torch.equal(a, b) for a, b in zip(layers, ref))


# ---------------------------------------------------------------- backend dispatch


@pytest.fixture
def fresh_backend(monkeypatch):
    """Import ops.backend under a given PAGEDLLM_ATTENTION_BACKEND; restore it afterwards."""
    from pagedllm.ops import backend

    def load(value: str | None):
        if value is None:
            monkeypatch.delenv("PAGEDLLM_ATTENTION_BACKEND", raising=False)
        else:
            monkeypatch.setenv("PAGEDLLM_ATTENTION_BACKEND", value)
        return importlib.reload(backend)

    yield load
    monkeypatch.undo()
    importlib.reload(backend)


def test_backend_picks_by_device(fresh_backend):
    backend = fresh_backend(None)
    assert backend.get_backend_name("cpu") == "torch"
    if HAS_CUDA:
        assert backend.get_backend_name("cuda") == "triton"
    assert fresh_backend("torch").get_backend_name(DEVICE) == "torch"
    assert fresh_backend("triton").get_backend_name("cpu") == "triton"
    with pytest.raises(ValueError, match="PAGEDLLM_ATTENTION_BACKEND"):
        fresh_backend("cuda")


@pytest.mark.parametrize("forced", [None, "torch", "triton"])
def test_backend_ops_agree_with_twins(fresh_backend, forced):
    """Every op through the backend (either side) gives the twin's numbers."""
    backend = fresh_backend(forced)
    block_size, group, num_tokens = 16, 2, 9
    key, value = fused_kv(num_tokens, torch.float32, seed=20)
    caches = make_layers(2, block_size, torch.float32, seed=21)
    key_cache, value_cache = caches[0][0], caches[0][1]
    ref_caches = [kv.clone() for kv in caches]
    # One sequence of 9 tokens in blocks 3 and 7, the last 4 tokens new this step.
    table = torch.tensor([[3, 7]], dtype=torch.int32, device=DEVICE)
    pos = torch.arange(num_tokens, device=DEVICE)
    slots = table[0, pos // block_size].long() * block_size + pos % block_size
    backend.reshape_and_cache(key, value, key_cache, value_cache, slots)
    torch_ref.reshape_and_cache(key, value, ref_caches[0][0], ref_caches[0][1], slots)
    assert torch.equal(caches[0], ref_caches[0])

    seq_lens = torch.tensor([num_tokens], dtype=torch.int32, device=DEVICE)
    query = randn(4, NUM_KV_HEADS * group, HEAD_DIM, seed=22)
    starts = torch.tensor([0, 4], dtype=torch.int32, device=DEVICE)
    out = backend.paged_prefill_attention(
        query, key_cache, value_cache, table, starts, seq_lens, 0.1
    )
    ref = torch_ref.paged_prefill_attention(
        query, key_cache, value_cache, table, starts, seq_lens, 0.1
    )
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    out = backend.paged_decode_attention(query[-1:], key_cache, value_cache, table, seq_lens, 0.1)
    torch.testing.assert_close(out, ref[-1:], rtol=1e-4, atol=1e-4)

    mapping = torch.tensor([[3, 5]], device=DEVICE)
    backend.copy_blocks(caches, mapping)
    torch_ref.copy_blocks(ref_caches, mapping)
    assert all(torch.equal(a, b) for a, b in zip(caches, ref_caches))
