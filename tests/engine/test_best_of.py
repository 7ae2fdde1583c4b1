"""best_of > n: best_of samples, the n with the highest cumulative logprob returned (vLLM v0).

The oracle is the engine itself with n = best_of and the same seed: sequence i of a seeded
request draws from seed + i, so those are the very samples best_of ranks; sorting them by
cumulative logprob by hand must give the returned n, in order.
"""

from __future__ import annotations

import pytest

from pagedllm import LLM, SamplingParams

PROMPTS = ["The capital of France is", "Once upon a time", "def main():"]
BEST_OF, N = 6, 2


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    return LLM(model=tiny_llama_dir, max_model_len=512, cpu_kv_cache_gib=0.05, swap_space=0.05)


def _run(llm, **kw):
    params = SamplingParams(temperature=1.0, max_tokens=8, seed=11, **kw)
    return [o.outputs for o in llm.generate(PROMPTS, params, use_tqdm=False)]


def test_best_of_returns_the_top_n_by_cumulative_logprob(llm):
    every = _run(llm, n=BEST_OF, logprobs=0)
    best = _run(llm, n=N, best_of=BEST_OF, logprobs=0)
    plain = _run(llm, n=N, best_of=BEST_OF)  # no logprobs asked: same choice, none reported
    reordered = False
    for samples, got, got_plain in zip(every, best, plain):
        ranked = sorted(samples, key=lambda o: -o.cumulative_logprob)[:N]
        assert [o.token_ids for o in got] == [o.token_ids for o in ranked]
        assert [o.cumulative_logprob for o in got] == [o.cumulative_logprob for o in ranked]
        assert [o.index for o in got] == list(range(N))
        assert [o.token_ids for o in got_plain] == [o.token_ids for o in ranked]
        assert all(o.cumulative_logprob is None and o.logprobs is None for o in got_plain)
        reordered |= [o.token_ids for o in ranked] != [o.token_ids for o in samples[:N]]
    # The choice matters here: returning the first n samples would fail the test.
    assert reordered


def test_best_of_bad_values():
    with pytest.raises(ValueError, match="best_of must be in"):
        SamplingParams(n=3, best_of=2)
    with pytest.raises(ValueError, match="needs sampling"):
        SamplingParams(n=1, best_of=2, temperature=0.0)
    SamplingParams(n=2, best_of=2, temperature=0.0)  # best_of == n: plain n
