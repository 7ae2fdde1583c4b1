"""Async scheduling (plan step N+1 while step N runs) gives exactly the outputs of synchronous
steps: EOS, stop strings and stop ids that end a sequence one step late on the host, length
limits, n > 1, forced preemption, prefix-cache hits, aborts, and requests that switch the
engine back to synchronous steps. On a CPU the model runs synchronously, but every piece of
bookkeeping (placeholders, tokens fed from the previous step's device tensor) is the same."""

from __future__ import annotations

import pytest

from pagedllm import LLM, SamplingParams
from pagedllm.core.sequence import PLACEHOLDER_TOKEN_ID

from ..conftest import SMALL_ENGINE


@pytest.fixture(scope="module")
def async_llm():
    return LLM(async_scheduling=True, **SMALL_ENGINE)


def mixed_params(tokenizer) -> list[SamplingParams]:
    """A spread of ways to stop: natural EOS, a stop string, a stop id, min_tokens, lengths."""
    newline = tokenizer.encode("\n")[-1]
    return [
        SamplingParams(temperature=0.0, max_tokens=64),
        SamplingParams(temperature=0.0, max_tokens=40, stop=[" the", "."]),
        SamplingParams(temperature=0.0, max_tokens=40, stop_token_ids=[newline]),
        SamplingParams(temperature=0.0, max_tokens=1),
        SamplingParams(temperature=0.0, max_tokens=7, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=30, min_tokens=12, stop=["."]),
        SamplingParams(temperature=0.8, max_tokens=24, seed=3, n=2),
        SamplingParams(temperature=0.0, max_tokens=48, stop=["\n"],
                       include_stop_str_in_output=True),
    ]


def summary(outs):
    return [[(c.token_ids, c.text, c.finish_reason, c.stop_reason) for c in o.outputs]
            for o in outs]


def test_async_equals_sync_across_stop_conditions(default_llm, async_llm, chat_prompt_ids):
    params = mixed_params(default_llm.get_tokenizer())
    prompts = [{"prompt_token_ids": p} for p in chat_prompt_ids]
    per_prompt = [params[i % len(params)] for i in range(len(prompts))]
    reference = default_llm.generate(prompts, per_prompt, use_tqdm=False)
    assert not default_llm.llm_engine.config.async_scheduling
    got = async_llm.generate(prompts, per_prompt, use_tqdm=False)
    assert summary(got) == summary(reference)
    # The workload must really stop in each way, or this test proves less than it says.
    reasons = {(c.finish_reason, type(c.stop_reason).__name__) for o in reference
               for c in o.outputs}
    assert {("stop", "NoneType"), ("stop", "str"), ("length", "NoneType")} <= reasons
    async_llm.llm_engine.engine_core.block_manager.check_integrity()


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_async_forced_preemption_gives_the_same_tokens(mode, default_llm, chat_prompt_ids):
    greedy = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    prompts = [{"prompt_token_ids": p} for p in chat_prompt_ids]
    reference = default_llm.generate(prompts, greedy, use_tqdm=False)
    llm = LLM(num_gpu_blocks_override=20, preemption_mode=mode, async_scheduling=True,
              **SMALL_ENGINE)
    assert summary(llm.generate(prompts, greedy, use_tqdm=False)) == summary(reference)
    assert llm.get_metrics()["num_preemptions_total"] > 0
    llm.llm_engine.engine_core.block_manager.check_integrity()


def test_async_prefix_cache_hits_and_chunked_prefill(default_llm, chat_prompt_ids):
    greedy = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    prompts = [{"prompt_token_ids": p} for p in chat_prompt_ids[:6]]
    reference = default_llm.generate(prompts, greedy, use_tqdm=False)
    llm = LLM(async_scheduling=True, max_num_batched_tokens=16, **SMALL_ENGINE)
    first = llm.generate(prompts, greedy, use_tqdm=False)
    again = llm.generate(prompts, greedy, use_tqdm=False)  # every prompt hits the cache now
    assert summary(first) == summary(reference) == summary(again)
    assert all(o.num_cached_tokens > 0 for o in again)


def test_streaming_outputs_never_show_placeholders(default_llm, async_llm, chat_prompt_ids):
    engine = async_llm.llm_engine
    params = SamplingParams(temperature=0.0, max_tokens=20)
    for i, p in enumerate(chat_prompt_ids[:4]):
        engine.add_request(f"s{i}", None, params, prompt_token_ids=p)
    seen: dict[str, list[int]] = {}
    overlapped = False
    while engine.has_unfinished_requests():
        for out in engine.step():
            ids = out.outputs[0].token_ids
            assert PLACEHOLDER_TOKEN_ID not in ids
            assert ids[:len(seen.get(out.request_id, []))] == seen.get(out.request_id, [])
            seen[out.request_id] = list(ids)
        overlapped |= engine.engine_core._inflight is not None
    assert overlapped, "async scheduling never had a step in flight"
    reference = default_llm.generate([{"prompt_token_ids": p} for p in chat_prompt_ids[:4]],
                                     params, use_tqdm=False)
    assert [seen[f"s{i}"] for i in range(4)] == [o.outputs[0].token_ids for o in reference]


def test_abort_while_a_step_is_in_flight_frees_everything(async_llm, chat_prompt_ids):
    engine = async_llm.llm_engine
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    for i, p in enumerate(chat_prompt_ids[:5]):
        engine.add_request(f"a{i}", None, params, prompt_token_ids=p)
    for _ in range(4):
        engine.step()
    assert engine.engine_core._inflight is not None
    engine.abort_request("a1")
    engine.abort_request("a3")
    finished = set()
    while engine.has_unfinished_requests():
        finished |= {o.request_id for o in engine.step() if o.finished}
    assert finished == {"a0", "a2", "a4"}
    bm = engine.engine_core.block_manager
    bm.check_integrity()
    assert not bm.block_tables and bm.num_free_blocks == bm.pool.num_blocks


def test_sync_only_requests_switch_the_engine_to_sync_steps(default_llm, async_llm,
                                                            chat_prompt_ids):
    prompts = [{"prompt_token_ids": p} for p in chat_prompt_ids[:4]]
    params = [SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True),
              SamplingParams(temperature=0.0, max_tokens=16, repetition_penalty=1.3),
              SamplingParams(temperature=0.0, max_tokens=16, logprobs=2),
              SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)]
    reference = default_llm.generate(prompts, params, use_tqdm=False)
    got = async_llm.generate(prompts, params, use_tqdm=False)
    assert summary(got) == summary(reference)
    assert got[2].outputs[0].logprobs == reference[2].outputs[0].logprobs
    assert async_llm.llm_engine.engine_core._num_sync_groups == 0


def scheduled_batches(llm: LLM, prompts, params) -> list[list[tuple[int, int]]]:
    """(seq id, new tokens) of every step's schedule, while generating."""
    sched = llm.llm_engine.engine_core.scheduler
    batches, schedule = [], sched.schedule

    def record():
        out = schedule()
        if out.scheduled:  # (async ends with a call that only reads the last step back)
            batches.append([(e.seq.seq_id, e.num_new_tokens) for e in out.scheduled])
        return out

    sched.schedule = record
    llm.generate(prompts, params, use_tqdm=False)
    del sched.schedule
    return batches


@pytest.mark.parametrize("engine_kwargs", [dict(max_num_seqs=3),
                                           dict(num_gpu_blocks_override=20)],
                         ids=["max_num_seqs", "preempted"])
def test_length_limited_requests_run_the_batches_of_sync_steps(engine_kwargs, chat_prompt_ids):
    """A sequence whose last token is due frees its row and blocks when that step is
    launched, as a synchronous engine frees them before planning the next step: the same
    batches run (on a GPU, where kernels are not batch invariant, the same bits too)."""
    prompts = [{"prompt_token_ids": p} for p in chat_prompt_ids[:10]]
    params = [SamplingParams(temperature=0.0, max_tokens=6 + 2 * i, ignore_eos=True)
              for i in range(len(prompts))]
    runs = [scheduled_batches(LLM(async_scheduling=a, **engine_kwargs, **SMALL_ENGINE),
                              prompts, params) for a in (False, True)]
    assert runs[0] == runs[1]
    assert any(len(b) == 3 for b in runs[0]) or "num_gpu_blocks_override" in engine_kwargs


def test_server_engine_streams_and_aborts_with_async_steps(default_llm, async_llm,
                                                          chat_prompt_ids):
    """AsyncLLM (the server's frontend) over an async-scheduling core, as on a GPU:
    concurrent streams equal the synchronous answers, and closing a stream mid-way aborts the
    request and frees its blocks while other steps are in flight."""
    import asyncio

    from pagedllm.engine.async_engine import AsyncLLM

    params = SamplingParams(temperature=0.0, max_tokens=24)
    prompts = chat_prompt_ids[:4]
    reference = default_llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                                     use_tqdm=False)
    frontend = async_llm.llm_engine

    async def main():
        engine = AsyncLLM(frontend.config, frontend.tokenizer, engine_core="thread")
        engine.start()
        try:
            long = await engine.add_request(
                "long", prompts[0], SamplingParams(temperature=0.0, max_tokens=500,
                                                   ignore_eos=True))
            streams = [await engine.add_request(f"r{i}", p, params)
                       for i, p in enumerate(prompts)]
            await long.__anext__()
            long.close()  # a client disconnect

            async def text(stream):
                return "".join([o.outputs[0].delta_text async for o in stream])
            texts = await asyncio.gather(*(text(s) for s in streams))
            assert await engine.check_integrity()
            for _ in range(100):  # the abort lands in the core's next drain
                metrics = await engine.get_core_metrics()
                if metrics["kv_cache_usage_perc"] == 0.0:
                    break
                await asyncio.sleep(0.05)
            return texts, metrics
        finally:
            engine.stop()

    texts, metrics = asyncio.run(asyncio.wait_for(main(), timeout=300))
    assert texts == [o.outputs[0].text for o in reference]
    assert metrics["kv_cache_usage_perc"] == 0.0 and metrics["num_requests_running"] == 0
