"""Request handling through the engine: bad input, seeds, stop strings, logprobs, metrics."""

from __future__ import annotations

import math

import pytest

from pagedllm import SamplingParams


@pytest.mark.parametrize("kwargs, field", [
    (dict(max_tokens=0), "max_tokens"),
    (dict(max_tokens=-3), "max_tokens"),
    (dict(temperature=-0.5), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
])
def test_invalid_sampling_params_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_bad_prompts_raise_and_the_engine_keeps_serving(default_llm, chat_prompt_ids):
    engine = default_llm.llm_engine
    params = SamplingParams(temperature=0.0, max_tokens=8)
    with pytest.raises(ValueError, match="prompt must not be empty"):
        default_llm.generate("", params)
    with pytest.raises(ValueError, match="prompt must not be empty"):
        default_llm.generate({"prompt_token_ids": []}, params)
    too_long = {"prompt_token_ids": [100] * engine.max_model_len}
    with pytest.raises(ValueError, match=f"maximum context length is {engine.max_model_len}"):
        default_llm.generate(too_long, params)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        default_llm.generate({"prompt_token_ids": [5, 10**9]}, params)
    # A bad prompt in a list queues nothing, not even the good ones before it.
    with pytest.raises(ValueError):
        default_llm.generate([{"prompt_token_ids": chat_prompt_ids[0]}, ""], params)
    assert not engine.has_unfinished_requests()
    # ...and the same LLM still serves.
    outs = default_llm.generate({"prompt_token_ids": chat_prompt_ids[0]}, params, use_tqdm=False)
    assert len(outs[0].outputs[0].token_ids) == 8
    assert default_llm.get_metrics()["kv_cache_usage_perc"] == 0.0


def test_seeded_sampling_is_reproducible_whatever_the_batch(default_llm, chat_prompt_ids):
    def sample(seed, others):
        params = [SamplingParams(temperature=1.0, seed=seed, max_tokens=16)] + [
            SamplingParams(temperature=1.0, max_tokens=16)] * others
        prompts = [{"prompt_token_ids": chat_prompt_ids[1]}] + [
            {"prompt_token_ids": p} for p in chat_prompt_ids[2:2 + others]]
        return default_llm.generate(prompts, params, use_tqdm=False)[0].outputs[0].token_ids

    a = sample(123, 0)
    assert sample(123, 5) == a
    assert sample(7, 0) != a


def test_stop_string_cuts_the_text_and_is_kept_only_on_request(default_llm, chat_prompt_ids):
    prompt = {"prompt_token_ids": chat_prompt_ids[0]}
    full = default_llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=32),
                                use_tqdm=False)[0].outputs[0]
    words = full.text.split()
    assert len(words) >= 3, full.text
    stop = words[2]
    cut = full.text[: full.text.index(stop)]
    out = default_llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=32, stop=[stop]),
                               use_tqdm=False)[0].outputs[0]
    assert out.text == cut and out.finish_reason == "stop" and out.stop_reason == stop
    kept = default_llm.generate(prompt, SamplingParams(
        temperature=0.0, max_tokens=32, stop=[stop], include_stop_str_in_output=True),
        use_tqdm=False)[0].outputs[0]
    assert kept.text == cut + stop


def test_stop_token_ids_and_min_tokens(default_llm, chat_prompt_ids):
    prompt = {"prompt_token_ids": chat_prompt_ids[0]}
    free = default_llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=12),
                                use_tqdm=False)[0].outputs[0]
    stop_id = free.token_ids[3]
    out = default_llm.generate(prompt, SamplingParams(
        temperature=0.0, max_tokens=12, stop_token_ids=[stop_id]), use_tqdm=False)[0].outputs[0]
    first = free.token_ids.index(stop_id)
    assert out.token_ids == free.token_ids[: first + 1] and out.stop_reason == stop_id
    # min_tokens bans the stop token until enough tokens exist.
    late = default_llm.generate(prompt, SamplingParams(
        temperature=0.0, max_tokens=12, stop_token_ids=[stop_id], min_tokens=8),
        use_tqdm=False)[0].outputs[0]
    assert stop_id not in late.token_ids[:8] and len(late.token_ids) >= 8


def test_logprobs_are_consistent(default_llm, chat_prompt_ids):
    out = default_llm.generate({"prompt_token_ids": chat_prompt_ids[3]},
                               SamplingParams(temperature=0.0, max_tokens=6, logprobs=3),
                               use_tqdm=False)[0].outputs[0]
    assert len(out.logprobs) == 6
    total = 0.0
    for token, entry in zip(out.token_ids, out.logprobs):
        assert token in entry and entry[token].rank == 1  # greedy picks the top token
        top = sorted(entry.values(), key=lambda lp: -lp.logprob)
        assert top[0].logprob == entry[token].logprob and all(lp.logprob <= 0 for lp in top)
        assert len(entry) == 3
        total += entry[token].logprob
    assert math.isclose(out.cumulative_logprob, total, rel_tol=1e-6)


def test_prompt_logprobs_cover_every_prompt_token(default_llm, chat_prompt_ids):
    ids = chat_prompt_ids[4]
    out = default_llm.generate({"prompt_token_ids": ids},
                               SamplingParams(max_tokens=1, prompt_logprobs=2), use_tqdm=False)[0]
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(ids)
    for tok, entry in zip(ids[1:], out.prompt_logprobs[1:]):
        assert tok in entry and entry[tok].logprob <= 0


def test_metrics_count_tokens(default_llm, chat_prompt_ids):
    before = default_llm.get_metrics()
    default_llm.generate([{"prompt_token_ids": p} for p in chat_prompt_ids[:3]],
                         SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True),
                         use_tqdm=False)
    after = default_llm.get_metrics()
    assert after["generation_tokens_total"] - before["generation_tokens_total"] == 15
    assert after["prompt_tokens_total"] - before["prompt_tokens_total"] == sum(
        len(p) for p in chat_prompt_ids[:3])
    assert after["num_requests_running"] == 0 and after["num_requests_waiting"] == 0
