"""The CPU door of the linear layers (ops/gemm.py): which kernel each M and dtype takes, and
that each route computes the product (against F.linear in fp64)."""

import pytest
import torch
import torch.nn.functional as F

from pagedllm.ops import gemm

pytestmark = pytest.mark.skipif(gemm.prepack(torch.ones(8, 8)) is None,
                                reason="no oneDNN packed GEMM in this torch build")


def _case(m: int, dtype: torch.dtype, k: int = 576, n: int = 200, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen).to(dtype)
    w = (torch.randn(n, k, generator=gen) / k ** 0.5).to(dtype)
    b = torch.randn(n, generator=gen).to(dtype)
    return x, w, b, gemm.prepack(w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weights_of_both_dtypes_are_packed(dtype):
    assert gemm.prepack(torch.ones(16, 16, dtype=dtype)) is not None
    assert gemm.prepack(torch.ones(16, 16, dtype=torch.float16)) is None


@pytest.mark.parametrize("m", [1, 2])
def test_one_or_two_fp32_rows_take_mkl_gemv(m):
    x, w, b, packed = _case(m, torch.float32)
    assert torch.equal(gemm.linear(x, w, b, packed), F.linear(x, w, b))


@pytest.mark.parametrize("m,dtype", [(3, torch.float32), (64, torch.float32),
                                     (gemm.SMALL_M, torch.float32), (1, torch.bfloat16),
                                     (32, torch.bfloat16), (gemm.SMALL_M, torch.bfloat16)])
def test_few_rows_take_the_packed_kernel(m, dtype):
    x, w, b, packed = _case(m, dtype)
    y = gemm.linear(x, w, b, packed)
    assert torch.equal(y, gemm._packed_linear(x, packed, b))
    ref = F.linear(x.double(), w.double(), b.double())
    tol = 1e-4 if dtype == torch.float32 else 2e-2  # bf16: one rounding of the output
    torch.testing.assert_close(y.double(), ref, rtol=tol, atol=tol * ref.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_many_rows_take_f_linear(dtype):
    x, w, b, packed = _case(gemm.SMALL_M + 1, dtype)
    assert torch.equal(gemm.linear(x, w, b, packed), F.linear(x, w, b))
