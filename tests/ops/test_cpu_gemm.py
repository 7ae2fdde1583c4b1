"""The CPU door of the linear layers (ops/gemm.py): which kernel each M and dtype takes (spies
on both kernels), and that each route computes the product (against F.linear in fp64)."""

import pytest
import torch
import torch.nn.functional as F

from pagedllm.ops import gemm

pytestmark = pytest.mark.skipif(gemm.prepack(torch.ones(8, 8)) is None,
                                reason="no oneDNN packed GEMM in this torch build")
BF16_PACKED = gemm.prepack(torch.ones(8, 8, dtype=torch.bfloat16)) is not None
needs_bf16 = pytest.mark.skipif(not BF16_PACKED, reason="this CPU's oneDNN packs no bf16")
DTYPES = [torch.float32, pytest.param(torch.bfloat16, marks=needs_bf16)]


def _case(m: int, dtype: torch.dtype, k: int = 576, n: int = 200, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen).to(dtype)
    w = (torch.randn(n, k, generator=gen) / k ** 0.5).to(dtype)
    b = torch.randn(n, generator=gen).to(dtype)
    return x, w, b, gemm.prepack(w)


INTEL_SMALL_M = 256  # gemm's thresholds where MKL runs its fast code (an Intel CPU)


@pytest.fixture
def route(monkeypatch):
    """The kernels `gemm.linear` called, in order: 'packed' or 'F.linear'; the thresholds set
    as on an Intel CPU (test_every_m_is_packed_where_mkl_is_slow: elsewhere)."""
    monkeypatch.setattr(gemm, "SMALL_M", INTEL_SMALL_M)
    monkeypatch.setattr(gemm, "FP32_GEMV_M", 2)
    calls = []
    packed, plain = gemm._packed_linear, F.linear
    monkeypatch.setattr(gemm, "_packed_linear",
                        lambda *a: calls.append("packed") or packed(*a))
    monkeypatch.setattr(gemm.F, "linear", lambda *a: calls.append("F.linear") or plain(*a))
    return calls


@needs_bf16
def test_weights_of_both_dtypes_are_packed():
    assert gemm.prepack(torch.ones(16, 16)) is not None
    assert gemm.prepack(torch.ones(16, 16, dtype=torch.bfloat16)) is not None
    assert gemm.prepack(torch.ones(16, 16, dtype=torch.float16)) is None


@pytest.mark.parametrize("m", [1, 2])
def test_one_or_two_fp32_rows_take_mkl_gemv(m, route):
    x, w, b, packed = _case(m, torch.float32)
    y = gemm.linear(x, w, b, packed)
    assert route == ["F.linear"]
    assert torch.equal(y, F.linear(x, w, b))


@pytest.mark.parametrize("m,dtype", [(3, torch.float32), (64, torch.float32),
                                     (INTEL_SMALL_M, torch.float32),
                                     pytest.param(1, torch.bfloat16, marks=needs_bf16),
                                     pytest.param(32, torch.bfloat16, marks=needs_bf16),
                                     pytest.param(INTEL_SMALL_M, torch.bfloat16, marks=needs_bf16)])
def test_few_rows_take_the_packed_kernel(m, dtype, route):
    x, w, b, packed = _case(m, dtype)
    y = gemm.linear(x, w, b, packed)
    assert route == ["packed"]
    ref = F.linear(x.double(), w.double(), b.double())
    tol = 1e-4 if dtype == torch.float32 else 2e-2  # bf16: one rounding of the output
    torch.testing.assert_close(y.double(), ref, rtol=tol, atol=tol * ref.abs().max().item())


@pytest.mark.parametrize("dtype", DTYPES)
def test_many_rows_take_f_linear(dtype, route):
    x, w, b, packed = _case(INTEL_SMALL_M + 1, dtype)
    gemm.linear(x, w, b, packed)
    assert route == ["F.linear"]


@pytest.mark.parametrize("m,dtype", [(1, torch.float32), (2, torch.float32), (300, torch.float32),
                                     pytest.param(2048, torch.bfloat16, marks=needs_bf16)])
def test_every_m_is_packed_where_mkl_is_slow(m, dtype, route, monkeypatch):
    monkeypatch.setattr(gemm, "SMALL_M", 2**62)  # gemm's settings off Intel CPUs
    monkeypatch.setattr(gemm, "FP32_GEMV_M", 0)
    x, w, b, packed = _case(m, dtype)
    y = gemm.linear(x, w, b, packed)
    assert route == ["packed"]
    ref = F.linear(x.double(), w.double(), b.double())
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(y.double(), ref, rtol=tol, atol=tol * ref.abs().max().item())
