"""Batch-invariant mode end to end, offline: a request's tokens and logprobs are bitwise the same
run alone (batch 1) or among 32, with a cold or a warm prefix cache, with 1 or 2 threads; and
greedy decoding still equals HF transformers in the mode.

Without the mode the batch-of-32 logprobs differ from the alone ones (0/32 equal when this test
was written: MKL's F.linear above 256 rows, and SDPA's causal vs masked kernels), which
`test_without_the_mode_logprobs_depend_on_the_batch` keeps visible.
"""

from __future__ import annotations

import random

import pytest
import torch

from pagedllm import LLM, SamplingParams

from .conftest import SMALL_ENGINE

WORDS = ("the of and to in is was for on that with as by at from his an were are which this be "  # noqa: SIM905
         "has or river light music north garden table winter engine").split()
PARAMS = SamplingParams(temperature=0.6, top_p=1.0, max_tokens=8, seed=42, logprobs=5)


def prompts(n: int, seed: int = 0) -> list[str]:
    """n prompts of 10-50 random words."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(10, 50))) for _ in range(n)]


def result(out) -> tuple:
    """Token ids, and each step's {token id: logprob} as exact floats."""
    c = out.outputs[0]
    return tuple(c.token_ids), [{k: v.logprob for k, v in d.items()} for d in c.logprobs]


def run_alone_and_batched(llm: LLM, texts: list[str], alone: list[int]) -> tuple[list, list]:
    llm.llm_engine.engine_core.block_manager.reset_prefix_cache()
    solo = [result(llm.generate([texts[i]], PARAMS, use_tqdm=False)[0]) for i in alone]
    batch = [result(o) for o in llm.generate(texts, PARAMS, use_tqdm=False)]  # warm cache
    return solo, [batch[i] for i in alone]


@pytest.fixture(scope="module")
def invariant_llm():
    llm = LLM(batch_invariant=True, **SMALL_ENGINE)
    yield llm
    llm.shutdown()


def test_batch_of_one_equals_batch_of_32_bitwise(invariant_llm):
    texts = prompts(32)
    alone = [0, 7, 19, 31]  # alone = cold cache; the batch of 32 reuses their cached blocks
    solo, batched = run_alone_and_batched(invariant_llm, texts, alone)
    for i, a, b in zip(alone, solo, batched):
        assert a == b, f"prompt {i}"
    # A cold cache for the whole batch, with one thread: still the same bits.
    invariant_llm.llm_engine.engine_core.block_manager.reset_prefix_cache()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        again = invariant_llm.generate([texts[i] for i in alone], PARAMS, use_tqdm=False)
    finally:
        torch.set_num_threads(threads)
    assert [result(o) for o in again] == solo


@pytest.mark.slow
def test_without_the_mode_logprobs_depend_on_the_batch():
    """The mode is what makes the test above pass: without it the bits differ."""
    llm = LLM(batch_invariant=False, **SMALL_ENGINE)
    try:
        solo, batched = run_alone_and_batched(llm, prompts(32), [0, 7, 19, 31])
    finally:
        llm.shutdown()
    assert solo != batched


@pytest.mark.parametrize("mode", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_bf16_batch_of_one_equals_batch_of_32_bitwise(mode):
    """bf16 weights and KV cache: the mode holds there too (oneDNN's packed bf16 GEMM, the C++
    kernel's bf16 rows), and without it the bits differ (one row takes oneDNN's GEMV)."""
    from .test_batch_invariance_kernels import bf16_row_invariant

    if mode and not bf16_row_invariant():
        pytest.skip("this machine's oneDNN bf16 GEMM is not row-invariant (the mode is off)")
    llm = LLM(dtype="bfloat16", batch_invariant=mode, **SMALL_ENGINE)
    try:
        assert llm.llm_engine.engine_core.executor.runner.batch_invariant is mode
        solo, batched = run_alone_and_batched(llm, prompts(32, seed=1), [0, 7, 19, 31])
    finally:
        llm.shutdown()
    assert (solo == batched) is mode


def test_the_default_on_cpu_is_the_mode(default_llm):
    assert default_llm.llm_engine.engine_core.executor.runner.batch_invariant


@pytest.mark.slow  # ~25 s of HF generate on 2 cores
def test_greedy_parity_with_hf_holds_in_the_mode(invariant_llm, chat_prompt_ids):
    import transformers

    from pagedllm.loader import default_model_path, iter_weights, load_model_config

    from .engine.test_hf_parity import assert_same, hf_greedy, ours_greedy

    path = default_model_path()
    config = load_model_config(path, "gguf")
    hf = transformers.LlamaForCausalLM(config).eval()
    hf.load_state_dict(dict(iter_weights(path, "gguf", config)), strict=False)
    hf.tie_weights()
    prompts_ = chat_prompt_ids[:8]
    assert_same(hf_greedy(hf, prompts_, 32), ours_greedy(invariant_llm, prompts_, 32))
