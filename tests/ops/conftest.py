"""Kernel tests run the Triton kernels on the GPU, or through Triton's interpreter on CPU.

TRITON_INTERPRET must be set before triton is first imported, and only when there is no GPU:
with a GPU the same tests compile and run the real kernels on realistic shapes.
"""

from __future__ import annotations

import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False


def _fix_interpreter() -> None:
    """Three bugs of Triton 3.6's CPU interpreter (not of compiled kernels), fixed here for tests:

    - a scalar becomes a loop bound through int(<1-element array>), which numpy >= 2.4 rejects
      (triton-lang/triton#9171); our loop bounds come from seq_lens, so we hit it;
    - tl.dot multiplies bf16 operands as their raw uint16 bit patterns; widen them to fp32;
    - a cast to fp8 whose rounding carries into the exponent gives a wrong value (7.84 -> 4.0,
      not 8.0): casts to and from fp8 go through torch's (round to nearest even, as the GPU's
      cvt.rn does).
    """
    if HAS_CUDA or not HAS_TRITON:
        return
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    patch_tensor = interpreter._patch_lang_tensor
    if getattr(patch_tensor, "_pagedllm_fixed", False):
        return

    def patched_tensor(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    builder = interpreter.InterpreterBuilder
    create_dot = builder.create_dot

    def widen(x):
        if x.dtype.scalar != tl.bfloat16:
            return x
        data = interpreter._convert_float(x.data, tl.bfloat16, tl.float32, None)
        return interpreter.TensorHandle(data.view(np.float32), tl.float32)

    def patched_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return create_dot(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    convert_float = interpreter._convert_float
    fp8 = {tl.float8e4nv: torch.float8_e4m3fn, tl.float8e5: torch.float8_e5m2}
    wide = {tl.float32: torch.float32, tl.float16: torch.float16, tl.bfloat16: torch.bfloat16}

    def patched_convert_float(data, src, dst, rounding_mode):
        if not ((src in fp8 and dst in wide) or (src in wide and dst in fp8)):
            return convert_float(data, src, dst, rounding_mode)
        to_torch = {**fp8, **wide}
        bits = torch.from_numpy(np.ascontiguousarray(data).copy().reshape(-1).view(
            getattr(np, f"uint{src.primitive_bitwidth}")).astype(np.int64))
        x = bits.to(getattr(torch, f"uint{src.primitive_bitwidth}")).view(to_torch[src])
        y = x.to(to_torch[dst]).view(getattr(torch, f"uint{dst.primitive_bitwidth}"))
        return y.numpy().reshape(data.shape)

    patched_tensor._pagedllm_fixed = True
    interpreter._patch_lang_tensor = patched_tensor
    builder.create_dot = patched_dot
    interpreter._convert_float = patched_convert_float


def _reload_compiled_kernels() -> None:
    """Kernels are bound to the interpreter when decorated: if a test module elsewhere imported
    them before this conftest set TRITON_INTERPRET, re-import them (in dependency order)."""
    if HAS_CUDA or not HAS_TRITON:
        return
    import importlib
    import sys

    from triton.runtime.interpreter import InterpretedFunction

    common = sys.modules.get("pagedllm.ops.triton.common")
    if common is None or isinstance(common.attend_kv_tile, InterpretedFunction):
        return
    for name in ("common", "paged_decode", "paged_prefill", "cache_ops", "skinny_gemm"):
        module = sys.modules.get(f"pagedllm.ops.triton.{name}")
        if module is not None:
            importlib.reload(module)


_fix_interpreter()
_reload_compiled_kernels()
