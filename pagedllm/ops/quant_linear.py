"""Weight-only quantized linear layers on CPU (`--quantization q8_0 | q4_1`).

At decode batch 1 a CPU step is bound by the bytes of weights it reads: fp32 SmolLM2-135M
reads ~540 MB per token. Quantized after loading, in GGUF's block layouts (32 weights along
the input dimension per block, fp16 scales as there):

    q8_0  w = d * q,       q int8        34 bytes per 32 weights (fp32: 128)
    q4_1  w = d * q + m,   q in 0..15    20 bytes per 32 weights

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
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from pagedllm.ops.cpu_build import CppLibrary

METHODS = ("q8_0", "q4_1")
BLOCK = 32  # weights per block, along the input dimension

_ptr, _i64 = ctypes.c_void_p, ctypes.c_int64


def _declare(lib: ctypes.CDLL) -> None:
    lib.pagedllm_quant_linear.argtypes = [_ptr] * 6 + [_i64] * 3
    lib.pagedllm_quant_linear.restype = None


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
    [N, K / 32] fp16. scales [N, K / 32] fp16."""

    method: str
    qweight: torch.Tensor
    scales: torch.Tensor
    mins: torch.Tensor | None
    shape: tuple[int, int]  # (N, K)
    # The kernel's weight arguments (data pointers), worked out once: a decode step makes
    # ~120 of these calls, and each Python-side step costs about a microsecond.
    pointers: tuple[int, int, int | None] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        n, k = self.shape
        q4 = self.method == "q4_1"
        assert self.qweight.is_contiguous() and self.qweight.shape == (n, k // 2 if q4 else k)
        assert self.qweight.dtype == (torch.uint8 if q4 else torch.int8)
        for t in (self.scales,) + ((self.mins,) if q4 else ()):
            assert t.dtype == torch.float16 and t.is_contiguous() and t.shape == (n, k // BLOCK)
        object.__setattr__(self, "pointers", (
            self.qweight.data_ptr(), self.scales.data_ptr(),
            None if self.mins is None else self.mins.data_ptr()))

    def __reduce__(self):  # a copy (deepcopy, pickle) works out its own tensors' pointers
        return QuantizedWeight, (self.method, self.qweight, self.scales, self.mins, self.shape)

    @property
    def nbytes(self) -> int:
        extra = 0 if self.mins is None else self.mins.nbytes
        return self.qweight.nbytes + self.scales.nbytes + extra


def can_quantize(weight: torch.Tensor) -> bool:
    """A 2-D CPU weight whose input dimension fills whole blocks."""
    return (weight.dim() == 2 and weight.device.type == "cpu" and weight.shape[1] > 0
            and weight.shape[1] % BLOCK == 0)


def quantize(weight: torch.Tensor, method: str) -> QuantizedWeight:
    """Round-to-nearest per block, as llama.cpp's reference quantizers do: q8_0 scales the
    block's largest magnitude to 127; q4_1 maps its range [min, max] onto 0..15. Scales and
    minimums are rounded to fp16 first and the weights rounded against those, so a weight that
    is already on a block's fp16 grid (a GGUF file's own blocks) comes back exactly."""
    if method not in METHODS:
        raise ValueError(f"quantization must be one of {METHODS}, got {method!r}")
    if not can_quantize(weight):
        raise ValueError(f"cannot quantize a {tuple(weight.shape)} {weight.device} weight "
                         f"(CPU, 2-D, input size a multiple of {BLOCK})")
    n, k = weight.shape
    w = weight.detach().float().reshape(n, k // BLOCK, BLOCK)
    if method == "q8_0":
        scales = (w.abs().amax(-1) / 127).half()
        q = torch.round(w / _nonzero(scales)[..., None]).clamp(-127, 127).to(torch.int8)
        return QuantizedWeight(method, q.reshape(n, k).contiguous(), scales.contiguous(), None,
                               (n, k))
    mins = w.amin(-1).half()
    scales = ((w.amax(-1) - mins.float()) / 15).half()
    q = torch.round((w - mins.float()[..., None]) / _nonzero(scales)[..., None])
    q = q.clamp(0, 15).to(torch.uint8)
    half = BLOCK // 2
    packed = q[..., :half] | (q[..., half:] << 4)  # [N, K / 32, 16]
    return QuantizedWeight(method, packed.reshape(n, k // 2).contiguous(), scales.contiguous(),
                           mins.contiguous(), (n, k))


def _nonzero(scales: torch.Tensor) -> torch.Tensor:
    """fp32 scales with 0 (an all-zero block) replaced by 1: its weights round to q = 0."""
    s = scales.float()
    return torch.where(s > 0, s, torch.ones_like(s))


def dequantize(qw: QuantizedWeight) -> torch.Tensor:
    """The fp32 [N, K] weight the blocks stand for (the twin's weight)."""
    n, k = qw.shape
    if qw.mins is None:
        q = qw.qweight.reshape(n, k // BLOCK, BLOCK).float()
        return (q * qw.scales.float()[..., None]).reshape(n, k)
    b = qw.qweight.reshape(n, k // BLOCK, BLOCK // 2)
    q = torch.cat([b & 0xF, b >> 4], dim=-1).float()
    return (q * qw.scales.float()[..., None] + qw.mins.float()[..., None]).reshape(n, k)


def linear(x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., K] @ W^T + bias in fp32, returned in x's dtype."""
    n, k = qw.shape
    if x.shape[-1] != k:  # the kernel would read past x's rows
        raise ValueError(f"input of {x.shape[-1]} features for a {n} x {k} quantized weight")
    x2 = x if x.dim() == 2 else x.reshape(-1, k)
    if x2.dtype != torch.float32 or not x2.is_contiguous():
        x2 = x2.float().contiguous()
    bias32 = None if bias is None else bias.float().contiguous()
    if _LIBRARY.lib is None and not load():
        out = F.linear(x2, dequantize(qw), bias32)
    else:
        m = x2.shape[0]
        out = torch.empty((m, n), dtype=torch.float32)
        if m:
            _LIBRARY.lib.pagedllm_quant_linear(
                x2.data_ptr(), *qw.pointers, None if bias32 is None else bias32.data_ptr(),
                out.data_ptr(), m, n, k)
    if out.dtype != x.dtype:
        out = out.to(x.dtype)
    return out if x.dim() == 2 else out.reshape(*x.shape[:-1], n)

