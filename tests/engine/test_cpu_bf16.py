"""bf16 on the CPU (`dtype="bfloat16"`: oneDNN's packed bf16 GEMM, AMX tiles where the CPU has
them) against HF transformers in bf16 on the same weights.

bf16 rounds every product differently in each engine's kernels, so token equality is not
expected everywhere; the check is vLLM's rule for such comparisons: where the two greedy
sequences first differ, HF's token is among our top-5 there, and most sequences agree for the
whole length."""

from __future__ import annotations

import pytest
import torch
import transformers

from pagedllm import LLM, SamplingParams
from pagedllm.loader import default_model_path, iter_weights, load_model_config

from ..conftest import SMALL_ENGINE
from ..test_batch_invariance_kernels import bf16_row_invariant
from .test_hf_parity import hf_greedy


@pytest.mark.slow
def test_default_model_in_bf16_follows_hf_bf16(chat_prompt_ids):
    path = default_model_path()
    config = load_model_config(path, "gguf")
    hf = transformers.LlamaForCausalLM(config).eval()
    hf.load_state_dict(dict(iter_weights(path, "gguf", config)), strict=False)
    hf.tie_weights()
    hf = hf.to(torch.bfloat16)
    prompts = chat_prompt_ids[:8]
    expected = hf_greedy(hf, prompts, 16)
    del hf

    llm = LLM(dtype="bfloat16", **SMALL_ENGINE)
    # the mode is the default where this machine's oneDNN bf16 GEMM is row-invariant
    assert llm.llm_engine.engine_core.executor.runner.batch_invariant is bf16_row_invariant()
    params = SamplingParams(temperature=0.0, max_tokens=16, logprobs=5)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    llm.shutdown()
    whole = follows_by_top5(expected, outs, "HF")
    assert whole >= len(prompts) // 2, f"only {whole}/{len(prompts)} agree for 16 tokens"


def follows_by_top5(expected: list[list[int]], outs, reference: str) -> int:
    """vLLM's rule: where each greedy output first differs from the reference's tokens, the
    reference's token is among the output's top-5 logprobs there. Returns how many outputs
    equal the reference for its whole length."""
    whole = 0
    for i, (want, out) in enumerate(zip(expected, outs)):
        got = out.outputs[0].token_ids[:len(want)]
        at = next((j for j, (a, b) in enumerate(zip(want, got)) if a != b), None)
        if at is None:
            whole += 1
            continue
        top5 = out.outputs[0].logprobs[at]
        assert want[at] in top5, (f"prompt {i}: {reference}'s token {want[at]} at {at} not in "
                                  f"{top5}")
    return whole
