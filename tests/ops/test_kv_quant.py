"""Quantized KV caches (fp8 e4m3 / e5m2, int8 + per-(token, head) scales) at the op level.

- the twins' write against the format's definition (int8: error <= half a step, the row's
  absmax maps to +-127; fp8: torch's rounding, saturated), padding slots untouched;
- the twins' attention over a quantized cache equals their attention over the de-quantized
  values in a float cache (de-quantization is all they add), and stays near fp64 dense
  attention on the original K/V (the quantization error, bounded per format);
- the Triton kernels against the twins (interpreter on CPU: tiny shapes);
- the cache engine moves scales with their blocks (swap out/in, copy-on-write) and sizes blocks
  from bytes (the block-count ratios).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pagedllm.config import CacheConfig
from pagedllm.layers.attention import Attention
from pagedllm.ops import torch_ref
from pagedllm.worker.cache_engine import CacheEngine, kv_block_bytes, kv_cache_torch_dtype

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
QUANT_DTYPES = [torch.int8, torch.float8_e4m3fn, torch.float8_e5m2]
NUM_BLOCKS, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM = 12, 16, 2, 32
# Relative Frobenius error of attention over the quantized cache vs fp64 on the original K/V
# (random N(0, 1) data; measured ~0.3%, 2.5%, 5% for int8, e4m3, e5m2).
QUANT_TOLERANCE = {torch.int8: 0.01, torch.float8_e4m3fn: 0.05, torch.float8_e5m2: 0.1}


def ids(dtype):
    return str(dtype).removeprefix("torch.")


def empty_cache(dtype, num_blocks=NUM_BLOCKS):
    shape = (num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    kc, vc = torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)
    scales = (torch.zeros(shape[:3]), torch.zeros(shape[:3])) if dtype == torch.int8 \
        else (None, None)
    return kc, vc, *scales


def dequant(cache, scales):
    return torch_ref.dequantize_kv(cache, scales, torch.float32)


# ---------------------------------------------------------------- the write


def test_int8_write_is_within_half_a_step_and_keeps_padding_slots():
    gen = torch.Generator().manual_seed(0)
    key = torch.randn(9, NUM_KV_HEADS, HEAD_DIM, generator=gen) \
        * torch.logspace(-3, 2, 9)[:, None, None]  # rows of very different magnitudes
    key[4] = 0.0  # an all-zero row: scale 0, values 0 (no NaN)
    value = -key
    slots = torch.randperm(NUM_BLOCKS * BLOCK_SIZE, generator=gen)[:9]
    slots[7] = -1
    kc, vc, ks, vs = empty_cache(torch.int8)
    kc.fill_(5)
    ks.fill_(3.0)
    torch_ref.reshape_and_cache(key, value, kc, vc, slots, ks, vs)
    written = torch.zeros(NUM_BLOCKS * BLOCK_SIZE, dtype=torch.bool)
    written[slots[slots >= 0]] = True
    assert (kc.view(-1, NUM_KV_HEADS, HEAD_DIM)[~written] == 5).all()
    assert (ks.view(-1, NUM_KV_HEADS)[~written] == 3.0).all()
    valid = slots >= 0
    for x, cache, scales in ((key, kc, ks), (value, vc, vs)):
        q = cache.view(-1, NUM_KV_HEADS, HEAD_DIM)[slots[valid]].float()
        s = scales.view(-1, NUM_KV_HEADS)[slots[valid]]
        x = x[valid]
        torch.testing.assert_close(s, x.abs().amax(-1) / 127, rtol=1e-6, atol=0)
        err = (q * s[..., None] - x).abs()
        assert (err <= s[..., None] * 0.5001 + 1e-30).all()
        assert (q.abs().amax(-1)[s > 0] == 127).all()  # the full range is used
        assert (q[s == 0] == 0).all() and torch.isfinite(q).all()


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2], ids=ids)
def test_fp8_write_rounds_like_torch_and_saturates(dtype):
    gen = torch.Generator().manual_seed(1)
    key = torch.randn(4, NUM_KV_HEADS, HEAD_DIM, generator=gen) * 4
    key[0, 0, :4] = torch.tensor([1e6, -1e6, 500.0, -7.84])
    slots = torch.tensor([3, 40, 17, 100])
    kc, vc, _, _ = empty_cache(dtype)
    torch_ref.reshape_and_cache(key, key, kc, vc, slots)
    fmax = torch.finfo(dtype).max
    got = kc.view(-1, NUM_KV_HEADS, HEAD_DIM)[slots].float()
    assert torch.isfinite(got).all() and got[0, 0, 0] == fmax and got[0, 0, 1] == -fmax
    assert torch.equal(got, key.clamp(-fmax, fmax).to(dtype).float())


# ---------------------------------------------------------------- the twins' attention


def _paged_inputs(dtype, seq_lens, q_lens, num_heads, seed):
    """Random K/V written through shuffled block tables into a quantized cache; also the same
    values de-quantized into an fp32 cache, and the original K/V per sequence."""
    gen = torch.Generator().manual_seed(seed)
    width = max(math.ceil(n / BLOCK_SIZE) for n in seq_lens)
    tables = torch.full((len(seq_lens), width), 10**6, dtype=torch.int32)
    free = torch.randperm(NUM_BLOCKS, generator=gen).tolist()
    kc, vc, ks, vs = empty_cache(dtype)
    dense = []
    for i, n in enumerate(seq_lens):
        nb = math.ceil(n / BLOCK_SIZE)
        tables[i, :nb] = torch.tensor(free[:nb])
        free = free[nb:]
        k = torch.randn(n, NUM_KV_HEADS, HEAD_DIM, generator=gen)
        v = torch.randn(n, NUM_KV_HEADS, HEAD_DIM, generator=gen)
        pos = torch.arange(n)
        slots = tables[i, pos // BLOCK_SIZE].long() * BLOCK_SIZE + pos % BLOCK_SIZE
        torch_ref.reshape_and_cache(k, v, kc, vc, slots, ks, vs)
        dense.append((k, v))
    query = torch.randn(sum(q_lens), num_heads, HEAD_DIM, generator=gen)
    qsl = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    return {"kc": kc, "vc": vc, "ks": ks, "vs": vs, "tables": tables, "query": query,
            "qsl": qsl, "seq_lens": torch.tensor(seq_lens, dtype=torch.int32), "dense": dense}


def _dense(q, k, v, q_pos, scale):
    group = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(group, 1)
    v = v.double().repeat_interleave(group, 1)
    s = torch.einsum("qhd,khd->hqk", q.double(), k) * scale
    s = s.masked_fill(~(torch.arange(k.shape[0])[None, :] <= q_pos[:, None])[None], -math.inf)
    return torch.einsum("hqk,khd->qhd", s.softmax(-1), v)


@pytest.mark.parametrize("dtype", QUANT_DTYPES, ids=ids)
def test_twins_attend_the_dequantized_cache(dtype):
    seq_lens, q_lens, num_heads, scale = [1, 17, 40, 33], [1, 5, 40, 1], 4, HEAD_DIM**-0.5
    p = _paged_inputs(dtype, seq_lens, q_lens, num_heads, seed=2)
    kf, vf = dequant(p["kc"], p["ks"]), dequant(p["vc"], p["vs"])
    out = torch_ref.paged_prefill_attention(
        p["query"], p["kc"], p["vc"], p["tables"], p["qsl"], p["seq_lens"], scale,
        key_scales=p["ks"], value_scales=p["vs"])
    ref = torch_ref.paged_prefill_attention(
        p["query"], kf, vf, p["tables"], p["qsl"], p["seq_lens"], scale)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    # Decode: the last query row of each sequence, alone.
    last = p["qsl"][1:].long() - 1
    dec = torch_ref.paged_decode_attention(
        p["query"][last], p["kc"], p["vc"], p["tables"], p["seq_lens"], scale,
        key_scales=p["ks"], value_scales=p["vs"])
    torch.testing.assert_close(dec, ref[last], rtol=0, atol=1e-6)
    # Against fp64 attention on the original, un-quantized K/V: the quantization error only.
    dense = torch.cat([
        _dense(p["query"][p["qsl"][i]:p["qsl"][i + 1]], k, v,
               torch.arange(seq_lens[i] - q_lens[i], seq_lens[i]), scale)
        for i, (k, v) in enumerate(p["dense"])])
    rel = ((out.double() - dense).norm() / dense.norm()).item()
    print(f"{dtype}: relative error {rel:.2e}")
    assert rel < QUANT_TOLERANCE[dtype], rel


def test_an_int8_cache_without_its_scales_is_refused():
    p = _paged_inputs(torch.int8, [5], [5], 2, seed=3)
    with pytest.raises(AssertionError, match="scales"):
        torch_ref.paged_decode_attention(p["query"][-1:], p["kc"], p["vc"], p["tables"],
                                         p["seq_lens"], 0.1)


# ---------------------------------------------------------------- Triton vs the twins


@pytest.mark.parametrize("dtype", QUANT_DTYPES, ids=ids)
def test_triton_write_equals_twin(dtype):
    pytest.importorskip("triton")
    from pagedllm.ops.triton import cache_ops

    gen = torch.Generator().manual_seed(4)
    key = torch.randn(7, NUM_KV_HEADS, HEAD_DIM, generator=gen) * 3
    key[2] = 0.0
    key[3, 0, 0] = 1e6  # past every format's range: saturated, not inf or NaN
    value = torch.randn(7, NUM_KV_HEADS, HEAD_DIM, generator=gen).to(torch.bfloat16)
    slots = torch.randperm(NUM_BLOCKS * BLOCK_SIZE, generator=gen)[:7]
    slots[1] = -1
    ref = empty_cache(dtype)
    out = tuple(None if t is None else t.to(DEVICE, copy=True) for t in ref)
    torch_ref.reshape_and_cache(key, value.float(), ref[0], ref[1], slots, ref[2], ref[3])
    cache_ops.reshape_and_cache(key.to(DEVICE), value.to(DEVICE), out[0], out[1],
                                slots.to(DEVICE), out[2], out[3])
    for a, b in zip(out, ref):  # bit for bit (value arrives in bf16: the same numbers)
        assert (a is None and b is None) or torch.equal(a.cpu().view(torch.uint8),
                                                        b.view(torch.uint8))


@pytest.mark.parametrize("dtype", QUANT_DTYPES, ids=ids)
def test_triton_attention_equals_twin(dtype):
    pytest.importorskip("triton")
    from pagedllm.ops.triton import paged_decode, paged_prefill

    seq_lens, q_lens, scale = [3, 40, 33], [3, 7, 1], 0.2
    p = _paged_inputs(dtype, seq_lens, q_lens, num_heads=4, seed=5)
    d = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in p.items()}
    args = (p["kc"], p["vc"], p["tables"])
    d_args = (d["kc"], d["vc"], d["tables"])
    scales = {"key_scales": p["ks"], "value_scales": p["vs"]}
    d_scales = {"key_scales": d["ks"], "value_scales": d["vs"]}
    ref = torch_ref.paged_prefill_attention(p["query"], *args, p["qsl"], p["seq_lens"], scale,
                                            **scales)
    out = paged_prefill.paged_prefill_attention(d["query"], *d_args, d["qsl"], d["seq_lens"],
                                                scale, **d_scales)
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-5, atol=1e-5)
    last = p["qsl"][1:].long() - 1
    ref = torch_ref.paged_decode_attention(p["query"][last], *args, p["seq_lens"], scale,
                                           **scales)
    for splits in (1, 2):  # one partition, and the split-K merge
        out = paged_decode._paged_decode(d["query"][last.to(DEVICE)], *d_args, d["seq_lens"],
                                         scale, 48, splits, **d_scales)
        torch.testing.assert_close(out.cpu(), ref, rtol=1e-5, atol=1e-5)


def test_triton_copy_blocks_copies_fp8_blocks_and_int8_scales():
    pytest.importorskip("triton")
    from pagedllm.ops.triton import cache_ops

    gen = torch.Generator().manual_seed(6)
    shape = (2, NUM_BLOCKS, BLOCK_SIZE, NUM_KV_HEADS)
    for layers in ([torch.randn(*shape, HEAD_DIM, generator=gen).to(torch.float8_e4m3fn)],
                   [torch.rand(*shape, generator=gen) for _ in range(2)]):  # scales
        mapping = torch.tensor([[1, 5], [2, 7]])
        ref = [t.clone() for t in layers]
        torch_ref.copy_blocks(ref, mapping)
        layers = [t.to(DEVICE) for t in layers]
        cache_ops.copy_blocks(layers, mapping.to(DEVICE))
        assert all(torch.equal(a.cpu().view(torch.uint8), b.view(torch.uint8))
                   for a, b in zip(layers, ref))
        assert torch.equal(ref[0][:, 5].view(torch.uint8), ref[0][:, 1].view(torch.uint8))


# ---------------------------------------------------------------- the cache engine


class _TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = Attention(4, HEAD_DIM, NUM_KV_HEADS, 0.1)
        self.b = Attention(4, HEAD_DIM, NUM_KV_HEADS, 0.1)


def test_cache_engine_moves_scales_with_their_blocks():
    model = _TwoLayers()
    engine = CacheEngine(model, 6, 4, BLOCK_SIZE, torch.device("cpu"), torch.int8)
    assert engine.kv_scales.shape == (2, 2, 6, BLOCK_SIZE, NUM_KV_HEADS)
    assert model.b.kv_scales.data_ptr() == engine.kv_scales[1].data_ptr()
    engine.kv.copy_(torch.randint(-127, 128, engine.kv.shape, dtype=torch.int8))
    engine.kv_scales.copy_(torch.rand(engine.kv_scales.shape))
    before_kv, before_s = engine.kv.clone(), engine.kv_scales.clone()
    engine.swap_out([(1, 3), (4, 0)])
    engine.kv[:, :, [1, 4]] = 0
    engine.kv_scales[:, :, [1, 4]] = 0
    engine.swap_in([(3, 2), (0, 5)])  # back into other device blocks
    assert torch.equal(engine.kv[:, :, [2, 5]], before_kv[:, :, [1, 4]])
    assert torch.equal(engine.kv_scales[:, :, [2, 5]], before_s[:, :, [1, 4]])
    engine.copy([(0, 1)])  # copy-on-write
    assert torch.equal(engine.kv[:, :, 1], before_kv[:, :, 0])
    assert torch.equal(engine.kv_scales[:, :, 1], before_s[:, :, 0])


def test_block_bytes_and_count_ratios():
    args = (30, 16, 3, 64)  # SmolLM2-135M: 30 layers, 3 KV heads of 64
    fp32 = kv_block_bytes(*args, torch.float32)
    assert fp32 == 2 * 30 * 16 * 3 * 64 * 4
    assert kv_block_bytes(*args, torch.bfloat16) == fp32 // 2
    for name in ("fp8", "fp8_e5m2"):
        assert kv_block_bytes(*args, kv_cache_torch_dtype(name, torch.float32)) == fp32 // 4
    # int8 adds a 4-byte scale per (token, head) for K and V: 64 + 4 bytes per head vector.
    int8 = kv_block_bytes(*args, kv_cache_torch_dtype("int8", torch.float32))
    assert int8 == 2 * 30 * 16 * 3 * (64 + 4)
    assert kv_cache_torch_dtype("auto", torch.bfloat16) == torch.bfloat16
    budget = 2**30
    num_fp32, num_fp8 = budget // fp32, budget // kv_block_bytes(*args, torch.float8_e4m3fn)
    assert 4 * num_fp32 <= num_fp8 < 4 * (num_fp32 + 1)  # 4x, up to the floor of each count
    assert budget // int8 == budget * 64 // (fp32 * 68 // 4) >= 3.76 * num_fp32


def test_config_rejects_unknown_cache_dtypes():
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of auto, fp8, fp8_e5m2"):
        CacheConfig(cache_dtype="fp4")
    from pagedllm.engine.arg_utils import EngineArgs

    with pytest.raises(ValueError, match="kv_cache_dtype must be 'auto'"):
        EngineArgs(load_format="simulate", kv_cache_dtype="int8").create_engine_config()
