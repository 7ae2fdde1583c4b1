"""Quantized KV caches on CUDA: the compiled Triton kernels against their twins on GPU-sized
shapes (bf16 queries; fp8 e4m3 / e5m2 and int8 + scales), and the engine with an fp8 / int8
cache: CUDA graphs give the tokens eager steps give, and the profiled block count doubles."""

from __future__ import annotations

import math

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

pytest.importorskip("transformers")
pytest.importorskip("triton")

from .test_gpu_engine import free_gpu, make_llm, random_prompts, tiny_llama  # noqa: F401

QUANT = [torch.float8_e4m3fn, torch.float8_e5m2, torch.int8]
NUM_BLOCKS, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, GROUP = 2048, 16, 8, 128, 4


def ids(dtype):
    return str(dtype).removeprefix("torch.")


def _cache(dtype):
    shape = (NUM_BLOCKS, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    kc = torch.zeros(shape, dtype=dtype, device="cuda")
    scales = [torch.zeros(shape[:3], device="cuda") for _ in range(2)] \
        if dtype == torch.int8 else [None, None]
    return [kc, kc.clone(), *scales]


@pytest.mark.parametrize("dtype", QUANT, ids=ids)
def test_write_kernel_equals_twin(dtype):
    from pagedllm.ops import torch_ref
    from pagedllm.ops.triton import cache_ops

    gen = torch.Generator(device="cuda").manual_seed(0)
    key = torch.randn(3000, NUM_KV_HEADS, HEAD_DIM, generator=gen, device="cuda") * 4
    value = torch.randn_like(key).to(torch.bfloat16)
    slots = torch.randperm(NUM_BLOCKS * BLOCK_SIZE, generator=gen, device="cuda")[:3000]
    slots[::7] = -1
    ref, out = [None if t is None else t.cpu() for t in _cache(dtype)], _cache(dtype)
    # NOTE: the twin runs on the CPU: PyTorch's CUDA tensor / scalar multiplies by the
    # reciprocal (not an IEEE division), so on the GPU it is not the oracle bit for bit.
    torch_ref.reshape_and_cache(key.cpu(), value.cpu(), *ref[:2], slots.cpu(), *ref[2:])
    cache_ops.reshape_and_cache(key, value, *out[:2], slots, *out[2:])
    for a, b in zip(out, ref):
        if a is not None:
            assert torch.equal(a.cpu().view(torch.uint8), b.view(torch.uint8))


@pytest.mark.parametrize("dtype", QUANT, ids=ids)
def test_attention_kernels_equal_twins(dtype):
    """bf16 kernels against the fp32 twin on the same quantized cache (contexts past 1k)."""
    from pagedllm.ops import torch_ref
    from pagedllm.ops.triton import paged_decode, paged_prefill

    gen = torch.Generator(device="cuda").manual_seed(1)
    seq_lens = [1, 17, 300, 1200, 2000, 64]
    q_lens = [1, 17, 40, 1, 128, 1]
    kc, vc, ks, vs = _cache(dtype)
    width = max(math.ceil(n / BLOCK_SIZE) for n in seq_lens)
    tables = torch.randperm(NUM_BLOCKS, generator=gen, device="cuda")[:len(seq_lens) * width]
    tables = tables.view(len(seq_lens), width).to(torch.int32)
    slots = (tables.long()[:, :, None] * BLOCK_SIZE + torch.arange(BLOCK_SIZE, device="cuda"))
    slots = slots.flatten()
    kv = torch.randn(2, slots.numel(), NUM_KV_HEADS, HEAD_DIM, generator=gen, device="cuda")
    torch_ref.reshape_and_cache(kv[0], kv[1], kc, vc, slots, ks, vs)
    seq_t = torch.tensor(seq_lens, dtype=torch.int32, device="cuda")
    qsl = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32,
                       device="cuda")
    query = torch.randn(sum(q_lens), NUM_KV_HEADS * GROUP, HEAD_DIM, generator=gen,
                        device="cuda").to(torch.bfloat16)
    scales = {"key_scales": ks, "value_scales": vs}
    scale = HEAD_DIM**-0.5

    def check(out, ref):
        rel = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
        assert torch.isfinite(out).all() and rel < 1e-2, rel

    ref = torch_ref.paged_prefill_attention(query.float(), kc, vc, tables, qsl, seq_t, scale,
                                            **scales)
    check(paged_prefill.paged_prefill_attention(query, kc, vc, tables, qsl, seq_t, scale,
                                                **scales), ref)
    last = qsl[1:].long() - 1
    ref = torch_ref.paged_decode_attention(query[last].float(), kc, vc, tables, seq_t, scale,
                                           **scales)
    check(paged_decode.paged_decode_attention(query[last], kc, vc, tables, seq_t, scale,
                                              **scales), ref)


@pytest.mark.parametrize("cache_dtype", ["fp8", "int8"])
def test_engine_graphs_equal_eager_and_blocks_double(tiny_llama, cache_dtype):  # noqa: F811
    path, _ = tiny_llama
    prompts = random_prompts([5 + 23 * i for i in range(9)], seed=4)

    def run(**kwargs):
        from pagedllm import SamplingParams

        llm = make_llm(path, kv_cache_dtype=cache_dtype, **kwargs)
        params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        blocks = llm.llm_engine.engine_core.block_manager.pool.num_blocks
        del llm
        free_gpu()
        return [o.outputs[0].token_ids for o in outs], blocks

    graphs, _ = run()
    eager, _ = run(enforce_eager=True)
    assert graphs == eager
    # Profiled sizing (no override): about the same budget; a head vector (head_dim 64) takes
    # 128 bytes in bf16, 64 in fp8, 64 + a 4-byte scale in int8.
    auto_blocks, quant_blocks = profiled_blocks(path, "auto"), profiled_blocks(path, cache_dtype)
    ratio = quant_blocks / auto_blocks
    expected = 2.0 if cache_dtype == "fp8" else 128 / 68
    assert abs(ratio - expected) < 0.02 * expected, (auto_blocks, quant_blocks)


def profiled_blocks(path, cache_dtype):
    from pagedllm import LLM

    llm = LLM(path, kv_cache_dtype=cache_dtype, gpu_memory_utilization=0.3, swap_space=0,
              max_num_seqs=16, enforce_eager=True)
    blocks = llm.llm_engine.engine_core.block_manager.pool.num_blocks
    del llm
    free_gpu()
    return blocks
