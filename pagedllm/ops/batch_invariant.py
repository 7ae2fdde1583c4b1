"""Batch-invariant mode (CPU): one reduction order per row, whatever else shares the step.

A row's logits (and so its logprobs and sampled token) then depend only on its own tokens, not
on the batch size, how the prompt was chunked, whether its prefix came from the cache, or which
requests ran beside it. Two kernels decide a row's reduction order; the mode pins both:

- GEMM (ops/gemm.py): oneDNN's packed fp32 matmul (bf16 too where the start-up probe passes:
  AVX512-BF16, not AMX) reduces each row in the same order for every M >= 2, and with any
  thread count; a single row takes a GEMV path with another order, and MKL's
  F.linear (the default above 256 rows) blocks K by M. In the mode every linear layer takes the
  packed path and a single row is computed as a pair. `check_gemm()` probes it at start-up.
- Attention (ops/cpu_kernels.py): torch SDPA picks its kernel by shape (a causal prompt and a
  masked chunk over cached blocks differ). In the mode every query row, of a prompt, a chunk or a
  decode step, goes through the one C++ paged kernel, as a one-token query over its own context.

Quantized weights (`--quantization`, ops/quant_linear.py) take one C++ matmul for every M, with
the same instructions per row whatever M is, so they need nothing more. The rest is row-local
already: RMSNorm, rotary, SiLU (PyTorch's or the C++ ops of ops/cpu_layer_ops.py),
log_softmax/softmax over the vocabulary (torch splits rows between threads, never a row), and
seeded sampling draws from each request's own generator. tests/test_batch_invariance_*.py check the whole path bit for bit.

The ModelRunner resolves EngineConfig.batch_invariant once (`resolve`) and runs each step's
forward pass inside `scope(on)`, so engines with and without the mode can share a process; the
kernels read `enabled` with one attribute access on the hot path.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch

logger = logging.getLogger(__name__)
enabled = False


def resolve(on: bool | None, device: torch.device, dtype: torch.dtype,
            kv_cache_dtype: torch.dtype, model: torch.nn.Module | None = None) -> bool:
    """Whether an engine runs in the mode: True (raise where it cannot be honoured), False, or
    None (the default: on where it can be, quietly off elsewhere: a GPU, fp16, a quantized
    cache, no compiler for the C++ kernel).

    Its cost in fp32 on 2 quiet cores of an Intel Xeon, wall time (docs/benchmarks.md, CPU
    peers): +4% on 32 random prompts of 32-256 tokens x 64, none on the first 64 ShareGPT
    requests (medians of three runs): under the 10% that makes it the CPU default. Batch-1
    decode pays more, +36% (44.6 against 32.9 ms/token): outside the mode one row takes MKL's
    sgemv, which reads the weights faster than oneDNN's packed kernel, whose order the mode
    needs; `--no-batch-invariant` for chat latency. Off Intel every row count takes oneDNN's
    packed GEMM either way, and the mode costs nothing measurable (fp32 and bf16, 2-core AMD
    EPYC)."""
    if on is False:
        return False
    try:
        _check(device, dtype, kv_cache_dtype)
        if model is not None:
            _check_model(model)
    except (NotImplementedError, ValueError, RuntimeError) as e:
        if on:
            raise
        logger.info("batch-invariant mode is off: %s", e)
        return False
    return True


@contextlib.contextmanager
def scope(on: bool) -> Iterator[None]:
    """The mode on (or off) for the kernels called inside: one step's forward pass."""
    global enabled
    prev, enabled = enabled, on
    try:
        yield
    finally:
        enabled = prev


def _check(device: torch.device, dtype: torch.dtype, kv_cache_dtype: torch.dtype) -> None:
    from pagedllm.ops import backend, cpu_kernels, gemm

    if device.type != "cpu":
        raise NotImplementedError(
            f"batch_invariant=True is implemented for CPU only (device {device.type!r})")
    if dtype not in (torch.float32, torch.bfloat16) or kv_cache_dtype != dtype:
        raise NotImplementedError(
            f"batch_invariant=True needs float32 or bfloat16 weights and a KV cache of the same "
            f"dtype on CPU (got {dtype}, KV cache {kv_cache_dtype})")
    if backend.forced_backend() is not None:
        raise ValueError("batch_invariant=True runs the C++ CPU kernel; unset "
                         "PAGEDLLM_ATTENTION_BACKEND")
    if not cpu_kernels.load():
        raise RuntimeError("batch_invariant=True needs the C++ CPU attention kernel, which is "
                           f"unavailable: {cpu_kernels.load_error()}")
    gemm.check_row_invariant(dtype)


def _check_model(model: torch.nn.Module) -> None:
    from pagedllm.layers.moe import MoEExperts
    from pagedllm.ops import quant_linear

    quantized = any(isinstance(getattr(m, "packed_weight", None), quant_linear.QuantizedWeight)
                    for m in model.modules())
    if quantized and not quant_linear.load():
        # NOTE: the twin (de-quantize + F.linear) reduces in MKL's M-dependent order
        raise RuntimeError("batch_invariant=True with quantized weights needs the C++ quantized "
                           f"kernel, which is unavailable: {quant_linear.load_error()}")
    if any(isinstance(m, MoEExperts) for m in model.modules()):
        # NOTE: experts run F.linear on however many tokens routed to them: not row-invariant.
        raise NotImplementedError("batch_invariant=True does not cover mixture-of-experts "
                                  "layers yet")
