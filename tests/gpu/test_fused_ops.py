"""Fused layer kernels (ops/triton/layer_ops.py) against the layers' own PyTorch code, on CUDA.

SiLU-mul rounds exactly where the PyTorch code rounds: equal bits. Rotary rounds at the same
places, but the compiler may merge a multiply-add (one rounding fewer), so a few elements are
one rounding apart; RMSNorm sums its squares in another order: one rounding apart at most.
"""

from __future__ import annotations

import pytest
import torch

from pagedllm.layers.activation import SiluAndMul
from pagedllm.layers.norm import RMSNorm
from pagedllm.layers.rotary import RotaryEmbedding
from pagedllm.ops import fused

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def reference(module, *args):
    """The layer's PyTorch code on the same CUDA tensors (fused kernels off)."""
    fused.set_enabled(False)
    try:
        return module(*args)
    finally:
        fused.set_enabled(True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens,hidden", [(1, 4096), (7, 576), (300, 1000)])
def test_rms_norm(dtype, num_tokens, hidden):
    gen = torch.Generator(device="cuda").manual_seed(num_tokens)
    norm = RMSNorm(hidden, 1e-5).to("cuda", dtype)
    norm.weight.data.uniform_(0.5, 1.5, generator=gen)
    x = torch.randn(num_tokens, hidden, device="cuda", dtype=dtype, generator=gen) * 3
    res = torch.randn(num_tokens, hidden, device="cuda", dtype=dtype, generator=gen)
    tol = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-5}[dtype]

    out = norm(x)
    torch.testing.assert_close(out, reference(norm, x), rtol=tol, atol=tol)
    out, new_res = norm(x, res)
    ref_out, ref_res = reference(norm, x, res)
    assert torch.equal(new_res, ref_res)  # the residual add rounds like PyTorch's
    torch.testing.assert_close(out, ref_out, rtol=tol, atol=tol)
    assert not out.isnan().any()


def test_rms_norm_fp32_weight_promotes_like_pytorch():
    norm = RMSNorm(256).cuda()  # fp32 weight, bf16 activations -> fp32 output
    x = torch.randn(4, 256, device="cuda", dtype=torch.bfloat16)
    out = norm(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, reference(norm, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(32, 8, 128), (9, 3, 64), (4, 4, 80)])
def test_rotary(dtype, heads, kv_heads, head_dim):
    gen = torch.Generator(device="cuda").manual_seed(heads)
    rope = RotaryEmbedding(head_dim, 4096, 500000.0).cuda()
    num_tokens = 37
    # q and k as views of one fused projection, as the model passes them.
    qkv = torch.randn(num_tokens, (heads + 2 * kv_heads) * head_dim, device="cuda",
                      dtype=dtype, generator=gen)
    q, k, _ = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q, k = q.view(num_tokens, heads, head_dim), k.view(num_tokens, kv_heads, head_dim)
    positions = torch.randint(0, 4096, (num_tokens,), device="cuda", generator=gen)
    out_q, out_k = rope(positions, q, k)
    ref_q, ref_k = reference(rope, positions, q, k)
    for out, ref in ((out_q, ref_q), (out_k, ref_k)):
        # One rounding apart at most (measured on an H100: 14-22% of the elements differ).
        ulp = torch.finfo(dtype).eps
        torch.testing.assert_close(out, ref, rtol=ulp, atol=ulp)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens,d", [(1, 14336), (33, 1000), (5, 64)])
def test_silu_and_mul_is_bit_exact(dtype, num_tokens, d):
    gen = torch.Generator(device="cuda").manual_seed(d)
    x = torch.randn(num_tokens, 2 * d, device="cuda", dtype=dtype, generator=gen) * 4
    act = SiluAndMul()
    assert torch.equal(act(x), reference(act, x))


def test_empty_batch():
    x = torch.empty(0, 64, device="cuda", dtype=torch.bfloat16)
    assert RMSNorm(64).to("cuda", torch.bfloat16)(x).shape == (0, 64)
    assert SiluAndMul()(torch.empty(0, 128, device="cuda")).shape == (0, 64)
