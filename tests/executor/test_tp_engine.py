"""Tensor parallelism through the whole engine: LLM(tensor_parallel_size=2) against TP=1.

The executor-level tests (test_tensor_parallel.py) cover the splits; this one covers the
wiring: EngineCore -> MultiprocExecutor, in process and behind the engine-core process.
"""

from __future__ import annotations

import pytest

from pagedllm import LLM, SamplingParams

ENGINE = dict(cpu_kv_cache_gib=0.05, swap_space=0.05)
PROMPTS = ["The capital of France is", "Hello, my name is", "def fib(n):", "1, 2, 3,"]


def _run(llm: LLM):
    greedy = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=16, logprobs=2),
                          use_tqdm=False)
    sampled = llm.generate(PROMPTS[:2], SamplingParams(temperature=1.0, seed=5, n=2,
                                                       max_tokens=12), use_tqdm=False)
    return greedy, [[c.token_ids for c in o.outputs] for o in sampled]


@pytest.fixture(scope="module")
def tp1(tiny_llama_dir):
    return _run(LLM(tiny_llama_dir, **ENGINE))


@pytest.mark.parametrize("engine_core", ["inproc", "process"])
def test_llm_tp2_equals_tp1(tiny_llama_dir, tp1, engine_core):
    llm = LLM(tiny_llama_dir, tensor_parallel_size=2, engine_core=engine_core, **ENGINE)
    try:
        greedy, sampled = _run(llm)
    finally:
        llm.shutdown()
    ref_greedy, ref_sampled = tp1
    assert [o.outputs[0].token_ids for o in greedy] == \
        [o.outputs[0].token_ids for o in ref_greedy]
    assert sampled == ref_sampled
    for ours, ref in zip(greedy, ref_greedy):
        for pos_ours, pos_ref in zip(ours.outputs[0].logprobs, ref.outputs[0].logprobs):
            assert pos_ours.keys() == pos_ref.keys()
            for tid in pos_ref:
                assert abs(pos_ours[tid].logprob - pos_ref[tid].logprob) < 1e-4


def test_tp2_on_an_unsplittable_model_fails_at_start_naming_why():
    # The default model has 9 attention heads: 2 ranks cannot split them.
    with pytest.raises(ValueError, match=r"num_attention_heads \(9\).*tensor_parallel_size \(2\)"):
        LLM(tensor_parallel_size=2, **ENGINE)
