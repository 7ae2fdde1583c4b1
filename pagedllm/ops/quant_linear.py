"""Weight-only quantized linear layers on CPU (`--quantization q8_0 | q4_1`).

At decode batch 1 a CPU step is bound by the bytes of weights it reads: fp32 SmolLM2-135M
reads ~540 MB per token. Quantized after loading, in GGUF's block layouts (32 weights along
the input dimension per block, fp32 scales here):

    q8_0  w = d * q,       q int8        36 bytes per 32 weights (fp32: 128)
    q4_1  w = d * q + m,   q in 0..15    24 bytes per 32 weights

The matmul is csrc/quant_linear_cpu.cpp: each block is de-quantized in registers and used for
several rows of x; the sums are fp32. It serves every M (prompts too), with one reduction order
per output whatever M is, so batch-invariant mode holds with quantized weights as well. Its
twin (`dequantize` + F.linear) serves where the library cannot be built.

Every linear layer and the LM head are quantized; the embedding table (a lookup, not a
matmul) stays in the model dtype, and so does a tied LM head's table for the lookups. What it
costs in accuracy is measured in benchmarks/quant_accuracy.py.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pagedllm.ops.cpu_build import CppLibrary

METHODS = ("q8_0", "q4_1")
BLOCK = 32  # weights per block, along the input dimension

_ptr, _i64 = ctypes.c_void_p, ctypes.c_int64


def _declare(lib: ctypes.CDLL) -> None:
    lib.pagedllm_quant_linear.argtypes = [_ptr] * 6 + [_i64] * 3
    lib.pagedllm_quant_linear.restype = None
    lib.pagedllm_quant_linear_vectorized.argtypes = []
    lib.pagedllm_quant_linear_vectorized.restype = ctypes.c_int


_LIBRARY = CppLibrary("pagedllm_quant_linear", "quant_linear_cpu.cpp",
                      "quantized linear kernel", _declare)


def load() -> bool:
    return _LIBRARY.load()


def load_error() -> str | None:
    return _LIBRARY.error()


@dataclass(frozen=True)
class QuantizedWeight:
    """A [N, K] weight in blocks of 32 along K. q8_0: qweight int8 [N, K], mins None;
    q4_1: qweight uint8 [N, K / 2] (byte j of a block: weight j low, j + 16 high), mins
    [N, K / 32]. scales [N, K / 32] fp32."""

    method: str
    qweight: torch.Tensor
    scales: torch.Tensor
    mins: torch.Tensor | None
    shape: tuple[int, int]  # (N, K)

    @property
    def nbytes(self) -> int:
        extra = 0 if self.mins is None else self.mins.nbytes
        return self.qweight.nbytes + self.scales.nbytes + extra


def can_quantize(weight: torch.Tensor) -> bool:
    """A 2-D CPU weight whose input dimension fills whole blocks."""
    return weight.dim() == 2 and weight.device.type == "cpu" and weight.shape[1] % BLOCK == 0


def quantize(weight: torch.Tensor, method: str) -> QuantizedWeight:
    """Round-to-nearest per block, as llama.cpp's reference quantizers do: q8_0 scales the
    block's largest magnitude to 127; q4_1 maps its range [min, max] onto 0..15."""
    if method not in METHODS:
        raise ValueError(f"quantization must be one of {METHODS}, got {method!r}")
    if not can_quantize(weight):
        raise ValueError(f"cannot quantize a {tuple(weight.shape)} {weight.device} weight "
                         f"(CPU, 2-D, input size a multiple of {BLOCK})")
    n, k = weight.shape
    w = weight.detach().float().reshape(n, k // BLOCK, BLOCK)
    if method == "q8_0":
        scales = w.abs().amax(-1) / 127
        inv = torch.where(scales > 0, 1 / scales, torch.zeros_like(scales))
        q = torch.round(w * inv[..., None]).clamp(-127, 127).to(torch.int8)
        return QuantizedWeight(method, q.reshape(n, k).contiguous(), scales.contiguous(), None,
                               (n, k))
    mins, maxs = w.amin(-1), w.amax(-1)
    scales = (maxs - mins) / 15
    inv = torch.where(scales > 0, 1 / scales, torch.zeros_like(scales))
    q = torch.round((w - mins[..., None]) * inv[..., None]).clamp(0, 15).to(torch.uint8)
    half = BLOCK // 2
    packed = q[..., :half] | (q[..., half:] << 4)  # [N, K / 32, 16]
    return QuantizedWeight(method, packed.reshape(n, k // 2).contiguous(), scales.contiguous(),
                           mins.contiguous(), (n, k))


def dequantize(qw: QuantizedWeight) -> torch.Tensor:
    """The fp32 [N, K] weight the blocks stand for (the twin's weight)."""
    n, k = qw.shape
    if qw.mins is None:
        q = qw.qweight.reshape(n, k // BLOCK, BLOCK).float()
        return (q * qw.scales[..., None]).reshape(n, k)
    b = qw.qweight.reshape(n, k // BLOCK, BLOCK // 2)
    q = torch.cat([b & 0xF, b >> 4], dim=-1).float()
    return (q * qw.scales[..., None] + qw.mins[..., None]).reshape(n, k)


def linear(x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., K] @ W^T + bias in fp32, returned in x's dtype."""
    shape = x.shape
    n, k = qw.shape
    x2 = x.reshape(-1, k).float().contiguous()
    bias32 = None if bias is None else bias.float().contiguous()
    if not load():
        out = F.linear(x2, dequantize(qw), bias32)
    else:
        out = torch.empty((x2.shape[0], n), dtype=torch.float32)
        if x2.shape[0]:
            _LIBRARY.lib.pagedllm_quant_linear(
                x2.data_ptr(), qw.qweight.data_ptr(), qw.scales.data_ptr(),
                None if qw.mins is None else qw.mins.data_ptr(),
                None if bias32 is None else bias32.data_ptr(), out.data_ptr(),
                x2.shape[0], n, k)
    return out.to(x.dtype).reshape(*shape[:-1], n)


def vectorized() -> bool:
    """Whether this machine runs the kernel's AVX-512 copy (else its portable loops)."""
    return load() and bool(_LIBRARY.lib.pagedllm_quant_linear_vectorized())
