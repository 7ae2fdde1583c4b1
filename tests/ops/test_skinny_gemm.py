"""The Triton skinny GEMM (ops/triton/skinny_gemm.py) against its twin, F.linear in fp32, and
the linear door (ops/gemm.py) that picks it.

On CPU the kernel runs in Triton's interpreter on small shapes (fp16, and bf16 for the FMA
path); on a GPU on the Llama-3-8B decode shapes. Both sides sum in fp32 in different orders, so
the bound is a few output roundings, relative to the largest output.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")

from pagedllm.ops import gemm  # noqa: E402
from pagedllm.ops.triton import skinny_gemm  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
# (N, K): the Llama-3-8B decode shapes, plus N not a multiple of any BLOCK_N and K not a
# multiple of BLOCK_K, on purpose.
SHAPES = ([(6144, 4096), (4093, 14336), (1001, 4000), (128256, 4096)] if HAS_CUDA
          else [(40, 96), (33, 100)])
SMALL_CONFIGS = [{"BLOCK_N": 16, "BLOCK_K": 32, "num_warps": 4, "num_stages": 1}]
TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3}  # ~one output rounding (the interpreter truncates bf16)


def rand(*shape, dtype, seed):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    return torch.randn(shape, generator=gen, device=DEVICE).to(dtype)


def check(y, x, w, b, dtype):
    ref = F.linear(x.float(), w.float(), None if b is None else b.float())
    assert y.dtype == dtype and y.shape == ref.shape
    err = ((y.float() - ref).abs().max() / ref.abs().max()).item()
    assert err < TOL[dtype], err


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 3, 16])
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_matches_twin(dtype, m, n, k, bias):
    x, w = rand(m, k, dtype=dtype, seed=m), rand(n, k, dtype=dtype, seed=n) / k**0.5
    b = rand(n, dtype=dtype, seed=k) if bias else None
    for cfg in [None] if HAS_CUDA else SMALL_CONFIGS:
        cfg = cfg if m > 1 or cfg is None else dict(cfg, BLOCK_N=8)
        check(skinny_gemm.skinny_linear(x, w, b, config=cfg), x, w, b, dtype)


def test_strided_rows():
    """x as a row-strided view (a slice of a wider activation), as the model can pass it."""
    dtype = torch.float16
    n, k = SHAPES[0]
    x = rand(4, 2 * k, dtype=dtype, seed=1)[:, :k]
    w = rand(n, k, dtype=dtype, seed=2) / k**0.5
    cfg = None if HAS_CUDA else SMALL_CONFIGS[0]
    check(skinny_gemm.skinny_linear(x, w, None, config=cfg), x, w, None, dtype)


@pytest.mark.skipif(not HAS_CUDA, reason="supports() takes CUDA tensors only")
def test_supports_rejects_what_the_kernel_cannot_take():
    dtype = torch.bfloat16
    x, w = rand(4, 256, dtype=dtype, seed=1), rand(64, 256, dtype=dtype, seed=2)
    assert skinny_gemm.supports(x, w)
    assert skinny_gemm.supports(rand(4, 512, dtype=dtype, seed=3)[:, :256], w)  # row stride
    assert skinny_gemm.supports(x, w, rand(64, dtype=dtype, seed=4))
    rejected = [
        (rand(17, 256, dtype=dtype, seed=1), w, None),  # too many rows
        (x.float(), w.float(), None),  # fp32
        (x, w.half(), None),  # mixed dtypes
        (x[None], w, None),  # 3-D x
        (rand(4, 512, dtype=dtype, seed=3)[:, ::2], w, None),  # K not contiguous in x
        (x, rand(256, 64, dtype=dtype, seed=5).t(), None),  # K not contiguous in the weight
        (x, w[:, :128], None),  # K mismatch
        (x, w, rand(64, dtype=torch.float32, seed=4)),  # bias dtype
        (x, w, rand(65, dtype=dtype, seed=4)),  # bias length
        (x.cpu(), w.cpu(), None),
    ]
    for args in rejected:
        assert not skinny_gemm.supports(*args), [tuple(a.shape) for a in args if a is not None]


@pytest.mark.skipif(not HAS_CUDA, reason="needs ~4.3 GB of GPU memory")
@pytest.mark.parametrize("m", [1, 8])
def test_weight_offsets_past_2_to_31(m):
    """N * K > 2^31 elements: weight row offsets must be computed in 64 bits."""
    dtype, k = torch.bfloat16, 4096
    n = 2**31 // k + 128
    w = torch.empty(n, k, dtype=dtype, device=DEVICE)
    w[-2000:].uniform_(-0.05, 0.05)
    w[:-2000].zero_()
    x = rand(m, k, dtype=dtype, seed=m)
    y = skinny_gemm.skinny_linear(x, w)
    check(y[:, -2000:], x, w[-2000:], None, dtype)
    assert y[:, :-2000].abs().max().item() == 0
    del w


@pytest.mark.skipif(not HAS_CUDA, reason="the door sends CUDA tensors to the kernel")
def test_door_takes_skinny_for_few_rows_only(monkeypatch):
    dtype = torch.bfloat16
    w = rand(4096, 4096, dtype=dtype, seed=3) / 64
    b = rand(4096, dtype=dtype, seed=4)
    calls = []
    real = skinny_gemm.skinny_linear
    monkeypatch.setattr(skinny_gemm, "skinny_linear",
                        lambda *a, **kw: calls.append(a[0].shape[0]) or real(*a, **kw))
    for m in (1, 16, 17):
        x = rand(m, 4096, dtype=dtype, seed=m)
        y = gemm.linear(x, w, b, None)
        if m <= skinny_gemm.MAX_M:
            assert torch.equal(y, real(x, w, b))
        else:
            assert torch.equal(y, F.linear(x, w, b))
        gemm.set_skinny_enabled(False)
        try:
            assert torch.equal(gemm.linear(x, w, b, None), F.linear(x, w, b))
        finally:
            gemm.set_skinny_enabled(True)
    assert calls == [1, 16]  # M = 17 and the disabled door went to cuBLAS


def test_door_keeps_cpu_numerics():
    """On CPU (fp32) the door never takes the kernel: the CPU path stays bit for bit."""
    x = torch.randn(3, 64)
    w = torch.randn(32, 64)
    assert torch.equal(gemm.linear(x, w, None, None), F.linear(x, w))
    x16, w16 = x.half(), w.half()
    assert not skinny_gemm.supports(x16, w16)  # CPU tensors never take it
