"""Weight-only quantized linear layers (ops/quant_linear.py, csrc/quant_linear_cpu.cpp): the
blocks, the C++ matmul against its twin (de-quantize + F.linear, in float64), one reduction
order per row whatever M and the thread count, and the door (ops/gemm.py, the engine flag)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pagedllm.ops import gemm, quant_linear
from pagedllm.ops.quant_linear import BLOCK, METHODS, dequantize, quantize

needs_kernel = pytest.mark.skipif(not quant_linear.load(),
                                  reason=f"kernel not built: {quant_linear.load_error()}")


def _weight(n: int, k: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=gen) * 0.05


@pytest.mark.parametrize("method", METHODS)
def test_blocks_round_to_nearest(method):
    w = _weight(64, 96)
    qw = quantize(w, method)
    blocks = w.reshape(64, -1, BLOCK)
    step = qw.scales.float()[..., None]  # one quantization step per block
    # within half a step, plus what rounding the block's minimum (q4_1) and scale to fp16 moved
    slack = 1e-6 + 16 * step * 2**-11
    if qw.mins is not None:
        slack = slack + (qw.mins.float() - blocks.amin(-1)).abs()[..., None]
    err = (dequantize(qw).reshape(blocks.shape) - blocks).abs()
    assert (err <= step / 2 + slack).all()
    assert qw.nbytes < w.nbytes / (3.7 if method == "q8_0" else 6.3)
    if method == "q4_1":  # each block's minimum and maximum, up to fp16 rounding
        got = dequantize(qw).reshape(blocks.shape)
        torch.testing.assert_close(got.amin(-1), blocks.amin(-1), rtol=2**-10, atol=1e-6)
        torch.testing.assert_close(got.amax(-1), blocks.amax(-1), rtol=2**-9, atol=1e-5)


def test_a_block_on_the_grid_round_trips():
    gen = torch.Generator().manual_seed(1)
    q = torch.randint(-127, 128, (8, 64), generator=gen).float()
    q[:, 0], q[:, 32] = 127, -127  # each block's largest magnitude sets its scale
    w = q * 0.0078125  # a scale fp16 holds exactly, as a GGUF file's own blocks have
    assert torch.equal(dequantize(quantize(w, "q8_0")), w)
    nib = torch.randint(0, 16, (8, 64), generator=gen).float()
    nib[:, 0], nib[:, 1], nib[:, 32], nib[:, 33] = 0, 15, 0, 15
    w = nib * 0.25 - 1.0
    assert torch.equal(dequantize(quantize(w, "q4_1")), w)


def test_refuses_what_it_cannot_block():
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize(torch.ones(4, 48), "q8_0")
    with pytest.raises(ValueError, match="must be one of"):
        quantize(torch.ones(4, 64), "q3_k")


@needs_kernel
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("n,k", [(1, 32), (7, 64), (300, 576), (96, 1536)])
@pytest.mark.parametrize("m", [1, 3, 4, 5, 64, 67, 130])
def test_kernel_equals_its_twin(method, n, k, m):
    w = _weight(n, k, seed=n + k)
    bias = torch.randn(n) if n % 2 else None
    qw = quantize(w, method)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
    want = F.linear(x.double(), dequantize(qw).double(),
                    None if bias is None else bias.double())
    got = quant_linear.linear(x, qw, bias)
    assert got.dtype == torch.float32 and got.shape == (m, n)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@needs_kernel
def test_bf16_activations_come_back_in_bf16():
    qw = quantize(_weight(64, 128), "q4_1")
    x = torch.randn(5, 128).to(torch.bfloat16)
    got = quant_linear.linear(x, qw, None)
    assert got.dtype == torch.bfloat16
    want = F.linear(x.float(), dequantize(qw))
    torch.testing.assert_close(got.float(), want, rtol=1e-2, atol=1e-2)


@needs_kernel
@pytest.mark.parametrize("method", METHODS)
def test_one_reduction_order_per_row(method):
    """A row alone, or anywhere in a batch of any size, on one thread or two: the same bits."""
    qw = quantize(_weight(1728, 576), method)
    x = torch.randn(70, 576, generator=torch.Generator().manual_seed(3))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        full = quant_linear.linear(x, qw, None)
        torch.set_num_threads(max(2, threads))
        for m in (1, 2, 3, 5, 17, 64, 70):
            alone = quant_linear.linear(x[m - 1:m], qw, None)
            batch = quant_linear.linear(x[:m], qw, None)
            assert torch.equal(alone[0], full[m - 1]), m
            assert torch.equal(batch, full[:m]), m
    finally:
        torch.set_num_threads(threads)


def test_gemm_door_takes_quantized_weights(monkeypatch):
    calls = []
    real = quant_linear.linear
    monkeypatch.setattr(quant_linear, "linear", lambda *a: calls.append(a) or real(*a))
    w = _weight(48, 64)
    prepared = gemm.prepack(w, "q8_0")
    assert isinstance(prepared, quant_linear.QuantizedWeight)
    x = torch.randn(300, 64)  # past SMALL_M: still the quantized kernel
    got = gemm.linear(x, w, None, prepared)
    assert len(calls) == 1
    torch.testing.assert_close(got, F.linear(x, dequantize(prepared)), rtol=1e-5, atol=1e-5)
    assert not isinstance(gemm.prepack(torch.ones(8, 48), "q8_0"), quant_linear.QuantizedWeight)


def test_engine_refuses_quantization_it_does_not_have():
    from pagedllm.engine.arg_utils import EngineArgs

    with pytest.raises(ValueError, match="must be one of"):
        EngineArgs(load_format="dummy", quantization="awq").create_engine_config()
    with pytest.raises(ValueError, match="not implemented"):
        EngineArgs(load_format="simulate", quantization="q8_0").create_engine_config()


@needs_kernel
def test_a_copy_points_at_its_own_tensors():
    import copy
    import pickle

    qw = quantize(_weight(16, 64), "q4_1")
    for twin in (copy.deepcopy(qw), pickle.loads(pickle.dumps(qw))):
        assert twin.pointers[0] == twin.qweight.data_ptr() != qw.pointers[0]
        x = torch.randn(3, 64)
        assert torch.equal(quant_linear.linear(x, twin, None), quant_linear.linear(x, qw, None))
    with pytest.raises(ValueError, match="features"):
        quant_linear.linear(torch.randn(2, 32), qw, None)
