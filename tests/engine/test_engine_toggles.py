"""Engine-vs-engine toggles give identical greedy outputs: alone vs batched, chunked prefill,
forced preemption (recompute and swap), prefix caching on and off."""

from __future__ import annotations

import pytest

from pagedllm import LLM, SamplingParams

from ..conftest import SMALL_ENGINE

MAX_TOKENS = 24
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)


def run(llm: LLM, prompts) -> list[list[int]]:
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def batched_reference(default_llm, chat_prompt_ids):
    """All 16 mixed-length prompts in one batch on the default engine."""
    return run(default_llm, chat_prompt_ids)


def test_each_prompt_alone_equals_the_batch(default_llm, chat_prompt_ids, batched_reference):
    assert len({len(p) for p in chat_prompt_ids}) > 4, "prompts must have mixed lengths"
    for i, prompt in enumerate(chat_prompt_ids):
        assert run(default_llm, [prompt])[0] == batched_reference[i], f"prompt {i}"


def test_chunked_prefill_gives_the_same_tokens(chat_prompt_ids, batched_reference):
    # A 16-token budget splits every prompt into several chunks, mixed with decodes.
    llm = LLM(max_num_batched_tokens=16, **SMALL_ENGINE)
    assert run(llm, chat_prompt_ids) == batched_reference
    llm.llm_engine.engine_core.block_manager.check_integrity()


def test_prefix_caching_off_gives_the_same_tokens(chat_prompt_ids, batched_reference):
    llm = LLM(enable_prefix_caching=False, **SMALL_ENGINE)
    assert run(llm, chat_prompt_ids) == batched_reference
    assert llm.get_metrics()["prefix_cache_hits_total"] == 0


def test_prefix_cache_hits_on_the_shared_chat_template(default_llm, chat_prompt_ids):
    before = default_llm.get_metrics()["prefix_cache_hits_total"]
    outs = default_llm.generate({"prompt_token_ids": chat_prompt_ids[1]}, GREEDY, use_tqdm=False)
    # The system prompt of the template spans at least one full block, cached by now.
    hits = default_llm.get_metrics()["prefix_cache_hits_total"] - before
    assert hits > 0 and outs[0].num_cached_tokens == hits


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_forced_preemption_gives_the_same_tokens(mode, chat_prompt_ids, batched_reference):
    # 16 prompts of ~40-50 tokens + 24 new tokens need ~80 blocks of 16; give 20.
    llm = LLM(num_gpu_blocks_override=20, preemption_mode=mode, **SMALL_ENGINE)
    assert run(llm, chat_prompt_ids) == batched_reference
    m = llm.get_metrics()
    assert m["num_preemptions_total"] > 0
    if mode == "swap":
        assert m["num_swapped_out_blocks_total"] > 0
        assert m["num_swapped_in_blocks_total"] == m["num_swapped_out_blocks_total"]
    assert m["kv_cache_usage_perc"] == 0.0 and m["num_requests_running"] == 0
    llm.llm_engine.engine_core.block_manager.check_integrity()


def test_request_larger_than_the_whole_cache_fails_clearly_and_others_finish(chat_prompt_ids):
    llm = LLM(num_gpu_blocks_override=4, **SMALL_ENGINE)  # 64 tokens of KV
    long_prompt = {"prompt_token_ids": list(range(100, 180))}  # 80 tokens: can never fit
    outs = llm.generate([long_prompt, {"prompt_token_ids": chat_prompt_ids[0][:20]}],
                        SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)
    assert outs[0].error and "needs 5 KV blocks but the cache has only 4" in outs[0].error
    assert outs[0].outputs[0].finish_reason == "abort"
    assert outs[1].error is None and len(outs[1].outputs[0].token_ids) == 4
    assert llm.get_metrics()["kv_cache_usage_perc"] == 0.0


def test_cache_salt_separates_prefix_cache_tenants(chat_prompt_ids):
    llm = LLM(**SMALL_ENGINE)
    ids = chat_prompt_ids[0] * 3  # several full blocks
    params = SamplingParams(temperature=0.0, max_tokens=4)

    def cached(salt):
        prompt = {"prompt_token_ids": ids, **({"cache_salt": salt} if salt else {})}
        return llm.generate(prompt, params, use_tqdm=False)[0]

    first = cached("tenant-a")
    assert first.num_cached_tokens == 0
    assert cached("tenant-b").num_cached_tokens == 0  # another tenant: no sharing
    again = cached("tenant-a")
    assert again.num_cached_tokens == (len(ids) - 1) // 16 * 16  # its own blocks are shared
    assert cached(None).num_cached_tokens == 0  # unsalted requests share among themselves only
    assert again.outputs[0].token_ids == first.outputs[0].token_ids
    with pytest.raises(ValueError, match="cache_salt"):
        llm.generate({"prompt_token_ids": ids, "cache_salt": ""}, params)
