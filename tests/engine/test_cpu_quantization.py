"""`quantization="q8_0" | "q4_1"` on the default model (ops/quant_linear.py): what it costs in
accuracy against the unquantized engine, and that batch-invariant mode still holds.

Quantized weights change every product, so the check against the fp32 engine is vLLM's rule
for such comparisons (as tests/engine/test_cpu_bf16.py): where the two greedy sequences first
differ, the fp32 token is among the quantized engine's top-5, and most sequences agree for the
whole length. benchmarks/quant_accuracy.py measures the same on more text."""

from __future__ import annotations

import pytest

from pagedllm import LLM, SamplingParams
from pagedllm.ops import quant_linear

from ..conftest import SMALL_ENGINE
from .test_cpu_bf16 import follows_by_top5

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not quant_linear.load(), reason="no C++ quantized kernel")]

TOKENS = 16


# q4_1 runs the default GGUF's own weights (test below), so only the order of its sums differs
# from fp32: 8/8 agree here; q8_0 re-rounds 4-bit weights onto an 8-bit grid: 6/8.
@pytest.mark.parametrize("method,min_whole", [("q8_0", 5), ("q4_1", 7)])
def test_quantized_default_model_follows_fp32(default_llm, chat_prompt_ids, method, min_whole):
    prompts = [{"prompt_token_ids": p} for p in chat_prompt_ids[:8]]
    greedy = SamplingParams(temperature=0.0, max_tokens=TOKENS, logprobs=5)
    expected = [o.outputs[0].token_ids for o in
                default_llm.generate(prompts, greedy, use_tqdm=False)]

    llm = LLM(quantization=method, **SMALL_ENGINE)
    runner = llm.llm_engine.engine_core.executor.runner
    assert runner.batch_invariant  # the quantized kernel keeps one order per row
    together = llm.generate(prompts, greedy, use_tqdm=False)
    alone = [llm.generate([p], greedy, use_tqdm=False)[0] for p in prompts[:3]]
    llm.shutdown()

    for a, b in zip(alone, together):  # bitwise, whatever shares the step
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert a.outputs[0].logprobs == b.outputs[0].logprobs
    whole = follows_by_top5(expected, together, "fp32")
    assert whole >= min_whole, f"only {whole}/{len(prompts)} agree with fp32 for {TOKENS} tokens"


def test_q4_1_blocks_are_the_gguf_files_own():
    """The default model's GGUF stores its linear layers as Q4_1 blocks of 32 and its token
    table as Q8_0: quantizing the de-quantized weights again gives back the same values, so
    `--quantization q4_1` runs exactly the weights llama.cpp runs from that file."""
    import torch

    from pagedllm.loader import default_model_path, iter_weights, load_model_config

    path = default_model_path()
    config = load_model_config(path, "gguf")
    checked = 0
    for name, w in iter_weights(path, "gguf", config):
        if w.dim() != 2:
            continue
        method = "q8_0" if "embed" in name else "q4_1"  # the head's blocks: HEAD_QUANTIZATION
        back = quant_linear.dequantize(quant_linear.quantize(w, method))
        assert torch.equal(back, w.float()), name
        checked += 1
    assert checked == 1 + 7 * config.num_hidden_layers  # embedding + q, k, v, o, gate, up, down
