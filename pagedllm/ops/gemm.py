"""The door for the linear layers' matmuls (y = x W^T): F.linear, except where a small-M
matmul has a faster kernel on its device.

- CPU: pre-packed weights. MKL's plain sgemm (what F.linear calls) re-packs the weight matrix
  on every call; with few rows (M = batch of decode tokens) that copy costs more than the math,
  and decode on a CPU ran at ~50 GFLOP/s. oneDNN can keep the weight in its blocked layout once,
  which is faster for 3 <= M <= 256 in fp32 (1.0-1.2x, 30 layers of SmolLM2's shapes with
  cache-cold weights) and for every M <= 256 in bf16, where it runs on AMX tiles (1.4x at
  M = 1 and 32, 1.5x at 256 against bf16 F.linear). One or two fp32 rows stay on MKL's sgemv,
  which streams the plain layout at ~24 GB/s where oneDNN's packed GEMV reads ~15 GB/s
  (17.9 vs 28.9 ms per decode step's weights). All of that was measured on an Intel Xeon.
  MKL runs its fast AVX-512 code on Intel CPUs only: on a 2-core AMD EPYC oneDNN's packed
  GEMM is faster at every M (fp32: 15.0 vs 27.2 ms for one row of 30 layers' weights, 1.06
  vs 2.54 s for 2,048 rows; bf16 9.6 vs 14.0 ms and 0.55 vs 0.60 s), so off Intel every M is
  packed. The packed copy doubles the linear layers' weight memory on CPU;
  PAGEDLLM_CPU_PACKED_GEMM=0 turns it off.
- CUDA (Hopper): M <= 16 rows (decode at small batch) go to the Triton skinny GEMM
  (ops/triton/skinny_gemm.py), which streams the weight without cuBLAS's split-K reduce;
  PAGEDLLM_SKINNY_GEMM=0 (or `set_skinny_enabled(False)`) keeps cuBLAS.

- Quantized weights (`--quantization`, CPU): every M takes ops/quant_linear.py.

Large-M matmuls (prefill) keep F.linear on Intel CPUs and CUDA: they are compute-bound, and on
CPU that is what HF transformers runs, bit for bit. Except in batch-invariant mode (ops/batch_invariant.py):
there every M takes the packed path (fp32 or bf16), whose per-row reduction order does not
depend on M, and a single row goes in as a pair (oneDNN's one-row GEMV reduces in another
order).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from pagedllm.ops import batch_invariant, quant_linear
from pagedllm.ops.quant_linear import QuantizedWeight

try:
    from pagedllm.ops.triton import skinny_gemm as _skinny
except ImportError:  # no triton
    _skinny = None




def _intel_cpu() -> bool:
    """MKL (F.linear's CPU GEMM) takes its fast AVX-512 code on Intel CPUs only; elsewhere
    (AMD EPYC, 2 cores: prompts 1.4x slower, one row 2x, than oneDNN) every M is packed."""
    try:
        with open("/proc/cpuinfo") as f:
            return "GenuineIntel" in f.read(4096)
    except OSError:
        return False


_MKL_FAST = _intel_cpu()
# Rows above which F.linear is as fast on CPU (measured on a 2-core AVX-512 Xeon); no limit
# where MKL is slow.
SMALL_M = 256 if _MKL_FAST else 2**62
# At most this many fp32 rows take MKL's sgemv, which beats the packed GEMV on Intel (above).
FP32_GEMV_M = 2 if _MKL_FAST else 0
_PACKED_DTYPES = (torch.float32, torch.bfloat16)
_ENABLED = os.environ.get("PAGEDLLM_CPU_PACKED_GEMM", "1") != "0"
_skinny_enabled = os.environ.get("PAGEDLLM_SKINNY_GEMM", "1") != "0" and _skinny is not None


def set_skinny_enabled(enabled: bool) -> None:
    """Turn the CUDA skinny GEMM on or off for modules run (or captured) from now on."""
    global _skinny_enabled
    _skinny_enabled = bool(enabled) and _skinny is not None


def prepack(weight: torch.Tensor, quantization: str | None = None
            ) -> torch.Tensor | QuantizedWeight | None:
    """What `linear` multiplies by instead of `weight`: its quantized blocks (quantization
    set: ops/quant_linear.py), else the weight in oneDNN's layout, or None where neither
    applies."""
    if quantization is not None and quant_linear.can_quantize(weight):
        return quant_linear.quantize(weight, quantization)
    if not (_ENABLED and weight.device.type == "cpu" and weight.dtype in _PACKED_DTYPES
            and torch.backends.mkldnn.is_available()):
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 256)  # a row-count hint
    except (RuntimeError, AttributeError):  # a torch build without these ops
        return None


def _packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None
                   ) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, bias, "none", [], "")


def _invariant_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      packed: torch.Tensor | None) -> torch.Tensor:
    """Batch-invariant mode: each row reduced in one order, whatever M is."""
    if packed is None:
        raise RuntimeError(f"batch-invariant mode needs every CPU weight pre-packed; a "
                           f"{tuple(weight.shape)} {weight.dtype} weight is not (is "
                           "PAGEDLLM_CPU_PACKED_GEMM=0 set?)")
    shape = x.shape
    x = x.reshape(-1, shape[-1])
    if x.shape[0] == 1:  # NOTE: as a pair: one row alone takes oneDNN's GEMV, another order
        return _packed_linear(x.expand(2, -1), packed, bias)[:1].reshape(*shape[:-1], -1)
    return _packed_linear(x, packed, bias).reshape(*shape[:-1], -1)


def check_row_invariant(dtype: torch.dtype = torch.float32,
                        sizes: tuple[int, ...] = (576, 1536, 2048),
                        rows: tuple[int, ...] = (1, 2, 3, 17, 300, 513, 2048)) -> None:
    """Probe, on this machine's oneDNN, that the packed path of `_invariant_linear` gives every
    row the same bits for every M (and 1 vs 2 threads) in `dtype`; raise if it does not. A few
    ms."""
    if prepack(torch.ones(8, 8, dtype=dtype)) is None:
        raise RuntimeError(f"batch-invariant mode needs oneDNN's packed {dtype} GEMM, which is "
                           "unavailable here (PAGEDLLM_CPU_PACKED_GEMM=0, or no mkldnn)")
    gen = torch.Generator().manual_seed(0)
    threads = torch.get_num_threads()
    try:
        for k in sizes:
            weight = torch.randn(96, k, generator=gen).to(dtype)
            packed = prepack(weight)
            x = torch.randn(max(rows), k, generator=gen).to(dtype)
            full = _invariant_linear(x, weight, None, packed)
            for m in rows:
                torch.set_num_threads(1 if m % 2 else threads)
                alone = _invariant_linear(x[m - 1:m], weight, None, packed)  # the last row
                batch = _invariant_linear(x[:m], weight, None, packed)
                if not (torch.equal(alone[0], full[m - 1]) and torch.equal(batch, full[:m])):
                    raise RuntimeError(
                        f"this machine's oneDNN {dtype} GEMM is not row-invariant (K={k}, "
                        f"M={m}): batch-invariant mode cannot be honoured here")
    finally:
        torch.set_num_threads(threads)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
           packed: torch.Tensor | QuantizedWeight | None) -> torch.Tensor:
    if isinstance(packed, QuantizedWeight):  # every M: one order per row (batch-invariant too)
        return quant_linear.linear(x, packed, bias)
    if batch_invariant.enabled and x.device.type == "cpu":
        return _invariant_linear(x, weight, bias, packed)
    if packed is not None and x.dim() == 2 and x.shape[0] <= SMALL_M and not (
            x.dtype == torch.float32 and x.shape[0] <= FP32_GEMV_M):
        return _packed_linear(x, packed, bias)
    if _skinny_enabled and _skinny.supports(x, weight, bias):  # CUDA tensors only
        return _skinny.skinny_linear(x, weight, bias)
    return F.linear(x, weight, bias)
